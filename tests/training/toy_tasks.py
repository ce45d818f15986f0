"""A tiny in-memory seqio task for the driver's tests (importable by name).

`toy_copy`: inputs "copy: w1 w2 w3", targets "w1 w2 w3", over a byte
vocabulary; 256 training and 16 validation examples, scored by exact match.
Registered on import, so a gin file can name this module as
MIXTURE_OR_TASK_MODULE.
"""

import seqio
import tensorflow as tf

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta")
VOCABULARY = seqio.ByteVocabulary()


def vocabulary() -> seqio.Vocabulary:
  return VOCABULARY


def _examples(split: str):
  count = 256 if split == "train" else 16
  offset = 0 if split == "train" else 1000
  inputs, targets = [], []
  for i in range(offset, offset + count):
    words = " ".join(WORDS[(i * p) % len(WORDS)] for p in (1, 3, 5))
    inputs.append(f"copy: {words}")
    targets.append(words)
  return inputs, targets


def _dataset(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed
  inputs, targets = _examples(split)
  return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})


def exact_match(targets, predictions):
  return {"exact_match": 100.0 * sum(t == p for t, p in zip(targets, predictions))
                         / len(targets)}


if "toy_copy" not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      "toy_copy",
      source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(VOCABULARY, add_eos=True),
                       "targets": seqio.Feature(VOCABULARY, add_eos=True)},
      metric_fns=[exact_match])
