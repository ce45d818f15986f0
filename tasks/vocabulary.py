"""The registry's vocabulary: T5's SentencePiece model unless configured otherwise."""

import seqio
import tensorflow as tf

from moe_jax_tasks import config


class ConfiguredVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose model is chosen when it is first used.

  Every task shares one instance, created at import; the model path and extra ids
  come from `spec_fn()` (by default `config.vocabulary_spec`, i.e. gin or
  FLAN_VOCAB) at first use, so bindings made after import apply.

  Args:
    spec_fn: returns (model path, extra ids).
  """

  def __init__(self, spec_fn=config.vocabulary_spec):
    self._spec_fn = spec_fn
    super().__init__(sentencepiece_model_file="", extra_ids=0)

  def _model_context(self):
    if self._model is None:
      path, extra_ids = self._spec_fn()
      if "://" not in path and not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model {path} does not exist. Set FLAN_VOCAB (or bind "
            "moe_jax_tasks.config.vocabulary_spec.path); offline, the sample "
            "model is moe_jax_tasks.sample.vocabulary_path().")
      self._sentencepiece_model_file = path
      self._extra_ids = extra_ids
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file

  @property
  def extra_ids(self) -> int:
    self._model_context()
    return self._extra_ids


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
