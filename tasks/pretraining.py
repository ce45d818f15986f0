"""Span-corruption pretraining (T5's objective) on C4 and on a bundled sample.

The objective follows Raffel et al. 2020 (section 3.1.4) and the released T5
recipe: documents are tokenized, concatenated and cut into chunks whose corrupted
form fits the inputs length; in each chunk 15% of the tokens, in spans of mean
length 3, are noise. The inputs keep the other tokens with one sentinel in place
of each noise span; the targets are each sentinel followed by its span. Sentinel k
(k = 0, 1, ...) is the vocabulary's id `vocab_size - 1 - k`, i.e. `<extra_id_k>`.

Tasks:
  c4_v220_span_corruption  `c4/en:3.0.1` from TFDS (t5x's task name), the Flan
                           vocabulary (T5's SentencePiece with 100 extra ids).
  sample_span_corruption   the bundled text in sample/data/pretraining (one
                           document per line), `sample_vocabulary()`: the sample
                           SentencePiece model plus 100 extra ids as sentinels.

Every random choice comes from seqio's per-example seeds through stateless ops, so
a task's output is fixed by `get_dataset(seed=...)` and its tf.data iterator can be
checkpointed.
"""

import functools
import os
from typing import Mapping, Optional

import gin
import seqio
import tensorflow as tf

from moe_jax_tasks import config
from moe_jax_tasks import sample
from moe_jax_tasks import sources
from moe_jax_tasks import vocabulary as vocabulary_lib

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# Documents concatenated before chunking, so that few chunks are short (T5's 128).
DOCUMENTS_PER_CONCATENATION = 128
SAMPLE_EXTRA_IDS = 100

C4_TFDS_NAME = "c4/en:3.0.1"
C4_SPLITS = ("train", "validation")
SAMPLE_TEXT_DIR = os.path.join(sample.DATA_DIR, "pretraining")


# ------------------------------------------------------------------- arithmetic

def noise_span_counts(length: int,
                      noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                      ) -> tuple[int, int]:
  """(noise tokens, noise spans) in a chunk of `length` >= 2 tokens.

  At least one token is noise and one is not, and there is at least one span;
  Python's `round` (half to even) matches `tf.round` in `random_spans_noise_mask`.
  """
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  return num_noise, max(round(num_noise / mean_noise_span_length), 1)


def corrupted_lengths(chunk_length: int,
                      noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                      ) -> tuple[int, int]:
  """(inputs, targets) lengths, EOS included, of a corrupted chunk."""
  num_noise, num_spans = noise_span_counts(chunk_length, noise_density,
                                           mean_noise_span_length)
  return chunk_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(inputs_length: int,
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                            ) -> tuple[int, int]:
  """(chunk length, targets length) for corrupted inputs of `inputs_length`.

  The chunk is the longest whose corrupted inputs, EOS included, fit; e.g. inputs
  512 -> chunks of 568 tokens and targets of 114. Corrupted lengths never shrink
  as the chunk grows, so the first chunk length that overflows ends the search.
  """
  def fits(chunk_length):
    return corrupted_lengths(chunk_length, noise_density,
                             mean_noise_span_length)[0] <= inputs_length

  if not fits(2):
    shortest, _ = corrupted_lengths(2, noise_density, mean_noise_span_length)
    raise ValueError(f"Span corruption needs inputs of at least {shortest} "
                     f"tokens, got {inputs_length}.")
  chunk_length = 2
  while fits(chunk_length + 1):
    chunk_length += 1
  return chunk_length, corrupted_lengths(chunk_length, noise_density,
                                         mean_noise_span_length)[1]


# ------------------------------------------------------------------ corruption

def _random_composition(total: tf.Tensor, parts: tf.Tensor,
                        seed: tf.Tensor) -> tf.Tensor:
  """`parts` positive ints summing to `total`, uniform over such splits: [parts]."""
  # Cutting the row of `total` items in `parts - 1` of its `total - 1` gaps,
  # chosen uniformly without replacement.
  gaps = tf.argsort(tf.random.stateless_uniform([total - 1], seed))
  cuts = tf.sort(gaps[:parts - 1] + 1)
  bounds = tf.concat([[0], cuts, [total]], axis=0)  # [parts + 1]
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length: tf.Tensor, seeds: tf.Tensor,
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                            ) -> tf.Tensor:
  """Which of `length` tokens are noise, as T5 chooses them: bool [length].

  Non-noise and noise spans alternate, starting with non-noise and ending with
  noise; the span lengths split the counts of `noise_span_counts` uniformly at
  random (each span non-empty, so there must be as many kept tokens as noise
  spans: true for T5's settings and any density not close to 1).

  Args:
    length: int32 scalar, the chunk's length.
    seeds: [2, 2] int32, stateless seeds for the noise and non-noise splits.
    noise_density: the fraction of noise tokens.
    mean_noise_span_length: the mean number of tokens in a noise span.
  """
  # One token cannot hold both kinds of span: mask two and keep the first.
  padded = tf.maximum(length, 2)
  # float64 rounds exactly as `noise_span_counts` (Python floats) does.
  num_noise = tf.cast(tf.round(tf.cast(padded, tf.float64) * noise_density),
                      tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, padded - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64)
                               / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_composition(num_noise, num_spans, seeds[0])
  kept_lengths = _random_composition(padded - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1),
                            [-1])  # [2 * num_spans]: kept, noise, kept, ...
  span_is_noise = tf.tile([False, True], [num_spans])
  return tf.repeat(span_is_noise, span_lengths)[:length]


def corrupt(tokens: tf.Tensor, noise_mask: tf.Tensor,
            first_sentinel: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) of a chunk under a noise mask.

  Noise span k (counted from the start) becomes sentinel `first_sentinel - k` in
  the inputs; the targets are each sentinel followed by its span's tokens.

  Args:
    tokens: int [length].
    noise_mask: bool [length].
    first_sentinel: the id of sentinel 0; later ones count down from it.

  Returns:
    inputs: int [length - noise tokens + noise spans].
    targets: int [noise tokens + noise spans].
  """
  previous_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  span_starts = noise_mask & ~previous_is_noise  # [length]
  sentinels = first_sentinel + 1 - tf.cumsum(tf.cast(span_starts, tokens.dtype))
  # Row i is (sentinel if a span starts at i, token i); each side keeps its parts.
  pairs = tf.stack([sentinels, tokens], axis=1)  # [length, 2]
  inputs = tf.boolean_mask(pairs, tf.stack([span_starts, ~noise_mask], axis=1))
  targets = tf.boolean_mask(pairs, tf.stack([span_starts, noise_mask], axis=1))
  return inputs, targets


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_chunk(example: Mapping[str, tf.Tensor], seeds: tf.Tensor,
                   first_sentinel: int, noise_density: float,
                   mean_noise_span_length: float) -> dict[str, tf.Tensor]:
  tokens = example["targets"]
  noise_mask = random_spans_noise_mask(tf.size(tokens), seeds, noise_density,
                                       mean_noise_span_length)
  inputs, targets = corrupt(tokens, noise_mask, first_sentinel)
  return {"inputs": inputs, "targets": targets}


def concatenate_and_split(dataset: tf.data.Dataset, chunk_length: int,
                          documents: int = DOCUMENTS_PER_CONCATENATION
                          ) -> tf.data.Dataset:
  """`targets` of `documents` examples at a time, end to end, in chunks.

  Every chunk has `chunk_length` tokens except the last of each concatenation;
  empty documents vanish. Other features are dropped. (T5 first cuts documents to
  a random window of 65,536 tokens; this keeps them whole, C4's being far shorter.)

  Returns:
    {"targets": int [<= chunk_length]} examples.
  """
  def split(tokens):  # ragged [documents, None] -> ragged [chunks, None]
    tokens = tokens.flat_values
    starts = tf.range(0, tf.size(tokens, out_type=tf.int64), chunk_length)
    return tf.RaggedTensor.from_row_starts(tokens, starts)

  chunks = (dataset.map(lambda example: example["targets"])
            .ragged_batch(documents).map(split).unbatch())
  return chunks.map(lambda chunk: {"targets": chunk})


def span_corruption(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                    ) -> tf.data.Dataset:
  """seqio preprocessor: tokenized `targets` documents -> span-corrupted chunks.

  Chunks are sized so that the inputs, once EOS is appended, fill
  `sequence_length["inputs"]`; EOS is left to `append_eos_after_trim`.

  Raises:
    ValueError: without an inputs length, when the targets length is too short
      for the corrupted targets, or when the vocabulary has fewer extra ids than
      a chunk has noise spans.
  """
  if not sequence_length or not sequence_length.get("inputs"):
    raise ValueError("Span corruption sizes its chunks from "
                     "sequence_length['inputs']; pass sequence lengths.")
  chunk_length, targets_length = span_corruption_lengths(
      sequence_length["inputs"], noise_density, mean_noise_span_length)
  if sequence_length.get("targets", targets_length) < targets_length:
    raise ValueError(
        f"Span corruption of {sequence_length['inputs']} input tokens makes "
        f"targets of {targets_length} tokens (EOS included), longer than "
        f"sequence_length['targets'] = {sequence_length['targets']}.")
  vocabulary = output_features["targets"].vocabulary
  _, num_spans = noise_span_counts(chunk_length, noise_density,
                                   mean_noise_span_length)
  if num_spans > vocabulary.extra_ids:
    raise ValueError(
        f"Chunks of {chunk_length} tokens have {num_spans} noise spans, but the "
        f"vocabulary has {vocabulary.extra_ids} extra ids for sentinels.")
  chunks = concatenate_and_split(dataset, chunk_length)
  return _corrupt_chunk(chunks, first_sentinel=vocabulary.vocab_size - 1,
                        noise_density=noise_density,
                        mean_noise_span_length=mean_noise_span_length)


# ------------------------------------------------------------------ data sources

class _DataRootTfdsLoader(seqio.utils.LazyTfdsLoader):
  """seqio's TFDS loader reading <data root>/tfds unless seqio's override is set.

  The directory is looked up when the data is read, so FLAN_DATA_DIR or the gin
  binding set after import applies, as for the registry's other sources.
  """

  @property
  def data_dir(self) -> str:
    return super().data_dir or os.path.join(config.data_dir(), "tfds")


class DataRootTfdsSource(seqio.TfdsDataSource):
  """A prepared TFDS dataset under the data root (or t5x's --tfds_data_dir).

  Read-only: a dataset that is not prepared raises `sources.DataNotFoundError`
  instead of starting a download.
  """

  def __init__(self, tfds_name: str, splits: tuple[str, ...], hint: str):
    super().__init__(tfds_name, splits=splits, read_only=True)
    # Replaces the parent's loader (see `tfds_dataset`), which has a fixed data_dir.
    self._loader = _DataRootTfdsLoader(tfds_name, split_map={s: s for s in splits},
                                       read_only=True)
    self._hint = hint

  @property
  def tfds_dataset(self) -> seqio.utils.LazyTfdsLoader:
    return self._loader

  def get_dataset(self, split: Optional[str] = None, *args,
                  **kwargs) -> tf.data.Dataset:
    name, _, version = self._loader.name.partition(":")
    directory = os.path.join(self._loader.data_dir, name, version)
    if not tf.io.gfile.exists(os.path.join(directory, "dataset_info.json")):
      raise sources.DataNotFoundError(
          f"TFDS dataset {self._loader.name} is not prepared at {directory}. "
          f"{self._hint}")
    return super().get_dataset(split, *args, **kwargs)


@seqio.map_over_dataset
def _line_as_targets(line: tf.Tensor) -> dict[str, tf.Tensor]:
  return {"targets": line}


# ------------------------------------------------------------------ vocabulary

@gin.configurable
def sample_vocabulary_spec(extra_ids: int = SAMPLE_EXTRA_IDS) -> tuple[str, int]:
  """The sample model (as `moe_jax_tasks.sample.vocabulary_spec` sets it) + sentinels.

  Extra ids go after the model's pieces, so every other id means what it means in
  the sample tasks' vocabulary: a model pretrained with this vocabulary can be
  fine-tuned on `flan_sample` as long as its embedding has room for both.
  """
  return sample.vocabulary_spec()[0], extra_ids


SAMPLE_VOCABULARY = vocabulary_lib.ConfiguredVocabulary(
    sample_vocabulary_spec, hint="Unset FLAN_SAMPLE_VOCAB to use the bundled model.")


def sample_vocabulary() -> seqio.Vocabulary:
  """The vocabulary of `sample_span_corruption` (the shared instance, for gin)."""
  return SAMPLE_VOCABULARY


# ------------------------------------------------------------------ tasks

def _register() -> None:
  pipeline = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
              span_corruption, seqio.preprocessors.append_eos_after_trim]
  seqio.TaskRegistry.add(
      "c4_v220_span_corruption",
      source=DataRootTfdsSource(
          C4_TFDS_NAME, C4_SPLITS,
          hint="C4 is built with Apache Beam from Common Crawl (and TFDS's "
          "current code builds 3.1.0, not t5x's 3.0.1): copy a prepared "
          "c4/en/3.0.1 there, or point FLAN_DATA_DIR (t5x: --tfds_data_dir) at "
          "a TFDS data dir holding one."),
      preprocessors=[functools.partial(seqio.preprocessors.rekey,
                                       key_map={"targets": "text"})] + pipeline,
      output_features=vocabulary_lib.output_features(),
      metric_fns=[])
  seqio.TaskRegistry.add(
      "sample_span_corruption",
      source=seqio.TextLineDataSource(
          {split: os.path.join(SAMPLE_TEXT_DIR, f"{split}.txt")
           for split in ("train", "validation")}),
      preprocessors=[_line_as_targets] + pipeline,
      output_features=vocabulary_lib.output_features(SAMPLE_VOCABULARY),
      metric_fns=[])


_register()
