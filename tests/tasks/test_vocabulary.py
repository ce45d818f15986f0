"""The configured vocabulary: chosen at first use, through seqio's public API."""

import gin
import pytest
import seqio
import tensorflow as tf

from moe_jax_tasks import errors
from moe_jax_tasks import vocabulary

TEXT = "The capital of France is Paris."


@pytest.fixture
def gin_bindings():
  yield gin.parse_config
  gin.clear_config()


@pytest.mark.parametrize("extra_ids", [0, 3])
def test_behaves_as_the_sentencepiece_vocabulary(spm_model, extra_ids):
  spec = {}
  configured = vocabulary.ConfiguredVocabulary(lambda: (spec["path"], extra_ids))
  spec["path"] = spm_model  # Chosen after construction: read at first use.
  plain = seqio.SentencePieceVocabulary(spm_model, extra_ids)
  ids = plain.encode(TEXT)
  assert configured.encode(TEXT) == ids
  assert configured.decode(ids) == plain.decode(ids) == TEXT
  assert configured.encode_tf(tf.constant(TEXT)).numpy().tolist() == ids
  assert configured.decode_tf(tf.constant(ids)).numpy() == TEXT.encode()
  for attribute in ("vocab_size", "extra_ids", "eos_id", "unk_id", "bos_id",
                    "pad_id", "sentencepiece_model_file"):
    assert getattr(configured, attribute) == getattr(plain, attribute), attribute
  assert configured.decode([*ids, configured.vocab_size + 5]) == plain.decode(
      [*ids, plain.vocab_size + 5])


def test_resolves_to_a_public_sentencepiece_vocabulary_once(spm_model, tmp_path):
  spec = {"path": spm_model}
  configured = vocabulary.ConfiguredVocabulary(lambda: (spec["path"], 0))
  resolved = configured.resolve()
  assert isinstance(resolved, seqio.SentencePieceVocabulary)
  assert not isinstance(configured, seqio.SentencePieceVocabulary)
  spec["path"] = str(tmp_path / "other.model")
  assert configured.resolve() is resolved  # Kept: tokens never change meaning.


def test_gin_binding_after_import_applies(gin_bindings, spm_model):
  configured = vocabulary.ConfiguredVocabulary()
  gin_bindings(f"moe_jax_tasks.config.vocabulary_spec.path = '{spm_model}'")
  assert configured.sentencepiece_model_file == spm_model
  assert configured == vocabulary.ConfiguredVocabulary()  # Same configuration.


@pytest.mark.parametrize("content", [None, b"not a sentencepiece model"])
def test_unreadable_model_names_the_path_and_the_fix(tmp_path, content):
  path = tmp_path / "vocab.model"
  if content is not None:
    path.write_bytes(content)
  configured = vocabulary.ConfiguredVocabulary(lambda: (str(path), 0))
  with pytest.raises(vocabulary.VocabularyError) as error:
    configured.encode(TEXT)
  message = str(error.value)
  assert isinstance(error.value, errors.Error) and "\n" not in message
  assert message.startswith(f"Cannot read the SentencePiece vocabulary {path} (")
  assert "FLAN_VOCAB" in message and "sample.vocabulary_path()" in message
