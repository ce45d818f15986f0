"""The registry's vocabulary: T5's SentencePiece model unless configured otherwise."""

from typing import Callable

import seqio

from moe_jax_tasks import config
from moe_jax_tasks import errors

FLAN_VOCAB_HINT = (
    "Point FLAN_VOCAB at a local SentencePiece model (or bind "
    "moe_jax_tasks.config.vocabulary_spec.path); offline, the bundled sample model "
    "is moe_jax_tasks.sample.vocabulary_path().")


class VocabularyError(errors.Error, OSError):
  """The configured SentencePiece model cannot be read."""


class ConfiguredVocabulary(seqio.Vocabulary):
  """A SentencePiece vocabulary whose model is chosen when it is first used.

  Tasks need their vocabulary when they are registered, at import, but the model is
  a setting: gin bindings and FLAN_VOCAB set after import must apply. So this
  vocabulary implements seqio's `Vocabulary` interface by delegating to a
  `seqio.SentencePieceVocabulary` built from `spec_fn()` on first use, and kept.

  Args:
    spec_fn: returns (model path, extra ids); by default `config.vocabulary_spec`
      (gin or FLAN_VOCAB).
    hint: how to configure another model, for the error when it cannot be read.
  """

  def __init__(self,
               spec_fn: Callable[[], tuple[str, int]] = config.vocabulary_spec,
               hint: str = FLAN_VOCAB_HINT):
    super().__init__()
    self._spec_fn = spec_fn
    self._hint = hint
    self._vocabulary = None

  def resolve(self) -> seqio.SentencePieceVocabulary:
    """The SentencePiece vocabulary, loaded.

    Raises:
      VocabularyError: naming the model and how to configure another one.
    """
    if self._vocabulary is None:
      path, extra_ids = self._spec_fn()
      vocabulary = seqio.SentencePieceVocabulary(path, extra_ids)
      try:
        vocabulary.load_model()
      except Exception as error:  # Any failure to read or parse the model file.
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise VocabularyError(f"Cannot read the SentencePiece vocabulary {path} "
                              f"({cause}). {self._hint}") from error
      self._vocabulary = vocabulary
    return self._vocabulary

  @property
  def sentencepiece_model_file(self) -> str:
    return self.resolve().sentencepiece_model_file

  @property
  def extra_ids(self) -> int:
    return self.resolve().extra_ids

  @property
  def vocab_size(self) -> int:
    return self.resolve().vocab_size

  @property
  def _base_vocab_size(self) -> int:
    # SentencePieceVocabulary's size already counts its extra ids.
    return self.resolve().vocab_size

  @property
  def bos_id(self):
    return self.resolve().bos_id

  @property
  def eos_id(self):
    return self.resolve().eos_id

  @property
  def unk_id(self):
    return self.resolve().unk_id

  def _encode(self, s):
    return self.resolve().encode(s)

  def _decode(self, ids):
    return self.resolve().decode(ids)

  def _encode_tf(self, s):
    return self.resolve().encode_tf(s)

  def _decode_tf(self, ids):
    return self.resolve().decode_tf(ids)

  def __eq__(self, other) -> bool:
    return (isinstance(other, ConfiguredVocabulary)
            and other._spec_fn == self._spec_fn)  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"ConfiguredVocabulary({self.resolve()})"


FLAN_VOCABULARY = ConfiguredVocabulary()


def output_features(vocabulary: seqio.Vocabulary = FLAN_VOCABULARY
                    ) -> dict[str, seqio.Feature]:
  """`inputs` / `targets` features with EOS appended, as the collection tokenizes."""
  return {"inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def vocabulary() -> seqio.Vocabulary:
  """The vocabulary every Flan task uses (the shared instance, for gin).

  Model configs must reference this instance (`@vocabulary.vocabulary()`)
  rather than build a new `ConfiguredVocabulary`: t5x checks that the task's
  and the model's vocabularies are equal before training.
  """
  return FLAN_VOCABULARY
