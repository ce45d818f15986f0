"""Span corruption (moe_jax_tasks.pretraining) and its tasks.

Golden lengths are worked out by hand from T5's rounding (Python's round, half to
even); corruption goldens are hand-built; the span-length distribution is checked
against the combinatorics of a uniformly random split.
"""

import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from moe_jax_tasks import pretraining
from moe_jax_tasks import sample
from moe_jax_tasks import sources
from moe_jax_tasks import vocabulary as vocabulary_lib

EOS = 1
SAMPLE_LENGTHS = {"inputs": 128, "targets": 29}


@pytest.mark.parametrize("inputs_length, chunk_length, targets_length", [
    # 568 tokens: 85 noise (85.2), 28 spans (28.3): inputs 483 + 28 + 1 = 512,
    # targets 85 + 28 + 1 = 114; 569 has 85 noise and 28 spans: inputs 513.
    (512, 568, 114),
    # 141: 21 noise (21.15), 7 spans: 120 + 7 + 1 = 128; 142 (21.3): 129.
    (128, 141, 29),
    # 1137: 171 noise (170.55), 57 spans: 966 + 57 + 1 = 1024; 1138 (170.7 ->
    # 171, 57 spans): 1025.
    (1024, 1137, 229),
    # 2274: 341 noise (341.1), 114 spans (113.7): 1933 + 114 + 1 = 2048.
    (2048, 2274, 456),
])
def test_span_corruption_lengths(inputs_length, chunk_length, targets_length):
  assert pretraining.span_corruption_lengths(inputs_length) == (chunk_length,
                                                               targets_length)
  assert pretraining.corrupted_lengths(chunk_length) == (inputs_length,
                                                         targets_length)


def test_noise_span_counts_of_t5_chunk():
  assert pretraining.noise_span_counts(568) == (85, 28)


def test_too_short_inputs_raise():
  with pytest.raises(ValueError, match="at least 3"):
    pretraining.span_corruption_lengths(2)


@pytest.mark.parametrize("tokens, mask, inputs, targets", [
    # Two spans, starting with kept tokens (T5's layout).
    ([10, 11, 12, 13, 14, 15], "..##.#", [10, 11, 99, 14, 98],
     [99, 12, 13, 98, 15]),
    # A mask may start with noise: sentinels still count spans from the start.
    ([10, 11, 12, 13, 14, 15], "#..##.", [99, 11, 12, 98, 15],
     [99, 10, 98, 13, 14]),
    ([1, 2, 3, 4, 5], ".###.", [1, 99, 5], [99, 2, 3, 4]),
    ([7, 8, 9], "#.#", [99, 8, 98], [99, 7, 98, 9]),
    ([7, 8, 9], "...", [7, 8, 9], []),
])
def test_corrupt_with_fixed_mask(tokens, mask, inputs, targets):
  got_inputs, got_targets = pretraining.corrupt(
      tf.constant(tokens, tf.int32), tf.constant([c == "#" for c in mask]), 99)
  assert got_inputs.numpy().tolist() == inputs
  assert got_targets.numpy().tolist() == targets


@tf.function(input_signature=[tf.TensorSpec((), tf.int32),
                              tf.TensorSpec((2, 2), tf.int32)])
def _mask(length, seeds):
  return pretraining.random_spans_noise_mask(length, seeds)


def _seeds(n):
  return tf.constant([[n, 1], [n, 2]], tf.int32)


def _runs(mask):
  """(lengths of noise runs, lengths of kept runs) of a bool array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[-1], mask.astype(int), [-1]])))
  lengths = np.diff(edges)
  values = mask[edges[:-1]]
  return lengths[values], lengths[~values]


@pytest.mark.parametrize("length", [141, 568, 1137])
def test_random_mask_statistics(length):
  num_noise, num_spans = pretraining.noise_span_counts(length)
  noise_runs, kept_runs = [], []
  for n in range(150):
    mask = _mask(length, _seeds(n)).numpy()
    assert mask.shape == (length,)
    assert not mask[0] and mask[-1]  # Kept first, noise last, as in T5.
    noise, kept = _runs(mask)
    assert (noise.sum(), len(noise), len(kept)) == (num_noise, num_spans, num_spans)
    noise_runs += noise.tolist()
    kept_runs += kept.tolist()
  assert abs(num_noise / length - 0.15) < 0.01
  assert abs(np.mean(noise_runs) - 3.0) < 0.1
  # A uniformly random split of n items in k non-empty parts has a part of length
  # 1 with probability (k - 1) / (n - 1): this checks the spans are random.
  for runs, items in ((noise_runs, num_noise), (kept_runs, length - num_noise)):
    expected = (num_spans - 1) / (items - 1)
    assert abs(np.mean(np.equal(runs, 1)) - expected) < 0.05


def test_random_mask_counts_match_the_length_arithmetic():
  for length in range(2, 700):
    noise, _ = _runs(_mask(length, _seeds(length)).numpy())
    assert (noise.sum(), len(noise)) == pretraining.noise_span_counts(length)


def test_random_mask_of_one_token():
  assert _mask(1, _seeds(0)).numpy().tolist() == [False]


def _reconstruct(inputs, targets, vocab_size, extra_ids):
  """The chunk, from corrupted inputs and targets (numpy, independent)."""
  is_sentinel = lambda t: t >= vocab_size - extra_ids
  spans, current = {}, None
  for token in targets:
    if is_sentinel(token):
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in inputs:
    out += spans.pop(token) if is_sentinel(token) else [token]
  assert not spans
  return out


@pytest.mark.parametrize("length", [2, 7, 50, 568])
def test_corruption_is_reversible(length):
  rng = np.random.default_rng(length)
  for n in range(20):
    tokens = rng.integers(2, 900, size=length).astype(np.int32)
    mask = _mask(length, _seeds(n))
    inputs, targets = pretraining.corrupt(tf.constant(tokens), mask, 999)
    assert _reconstruct(inputs.numpy(), targets.numpy(), 1000, 100) == (
        tokens.tolist())


def _examples(task_name, sequence_length, split="train", seed=5):
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(sequence_length, split=split, shuffle=False,
                             seed=seed)
  return [(e["inputs"].tolist(), e["targets"].tolist())
          for e in dataset.as_numpy_iterator()]


def _text_ids(split):
  vocabulary = sample.vocabulary()
  path = os.path.join(pretraining.SAMPLE_TEXT_DIR, f"{split}.txt")
  with open(path, encoding="utf-8") as f:
    return [t for line in f for t in vocabulary.encode(line.rstrip("\n"))]


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("lengths, full_targets", [
    (SAMPLE_LENGTHS, 29),
    # Chunks of 70: 10 noise (10.5 rounds to even), 3 spans: targets 14.
    ({"inputs": 64, "targets": 16}, 14),
    ({"inputs": 512, "targets": 114}, 114),
])
def test_sample_task_fits_lengths_and_keeps_the_text(split, lengths,
                                                     full_targets):
  vocabulary = pretraining.sample_vocabulary()
  examples = _examples("sample_span_corruption", lengths, split)
  assert examples
  for n, (inputs, targets) in enumerate(examples):
    assert inputs[-1] == EOS and targets[-1] == EOS
    assert len(inputs) <= lengths["inputs"] and len(targets) <= lengths["targets"]
    if n < len(examples) - 1:  # Only the last chunk of the text is short.
      assert (len(inputs), len(targets)) == (lengths["inputs"], full_targets)
  text = []
  for inputs, targets in examples:
    text += _reconstruct(inputs[:-1], targets[:-1], vocabulary.vocab_size, 100)
  assert text == _text_ids(split)


def test_sample_task_same_seed_same_output():
  first = _examples("sample_span_corruption", SAMPLE_LENGTHS, seed=11)
  assert first == _examples("sample_span_corruption", SAMPLE_LENGTHS, seed=11)
  assert first != _examples("sample_span_corruption", SAMPLE_LENGTHS, seed=12)


def test_sample_task_iterator_checkpoint_resumes(tmp_path):
  task = seqio.get_mixture_or_task("sample_span_corruption")
  dataset = task.get_dataset(SAMPLE_LENGTHS, shuffle=False, seed=3)
  iterator = iter(dataset)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  next(iterator)
  path = checkpoint.save(str(tmp_path / "ckpt"))
  expected = [next(iterator)["inputs"].numpy().tolist() for _ in range(3)]
  checkpoint.restore(path)
  assert [next(iterator)["inputs"].numpy().tolist() for _ in range(3)] == expected


def test_sample_vocabulary_adds_sentinels_after_the_sample_model():
  base, with_sentinels = sample.vocabulary(), pretraining.sample_vocabulary()
  assert with_sentinels.vocab_size == base.vocab_size + 100
  text = "The river runs past the mill."
  assert with_sentinels.encode(text) == base.encode(text)
  top = with_sentinels.vocab_size - 1
  assert with_sentinels.decode([top - 1]) == "<extra_id_1>"


@pytest.mark.parametrize("lengths, message", [
    (None, "sequence_length"),
    ({"inputs": 512, "targets": 113}, "114"),
])
def test_bad_lengths_raise(lengths, message):
  features = vocabulary_lib.output_features(pretraining.sample_vocabulary())
  dataset = tf.data.Dataset.from_tensors({"targets": tf.range(3, 600)})
  with pytest.raises(ValueError, match=message):
    pretraining.span_corruption(dataset, lengths, features)


def test_vocabulary_without_enough_extra_ids_raises():
  features = vocabulary_lib.output_features(sample.vocabulary())  # No extra ids.
  dataset = tf.data.Dataset.from_tensors({"targets": tf.range(3, 600)})
  with pytest.raises(ValueError, match="28 noise spans"):
    pretraining.span_corruption(dataset, {"inputs": 512, "targets": 114},
                                features)


def test_c4_task_is_registered_without_reading_data():
  task = seqio.get_mixture_or_task("c4_v220_span_corruption")
  assert isinstance(task.source, seqio.TfdsDataSource)
  assert task.source.tfds_dataset.name == "c4/en:3.0.1"
  assert tuple(task.source.splits) == ("train", "validation")
  assert set(task.output_features) == {"inputs", "targets"}
  for feature in task.output_features.values():
    assert feature.vocabulary is vocabulary_lib.vocabulary() and feature.add_eos


def test_c4_source_reads_the_data_root(tmp_path, monkeypatch):
  monkeypatch.setenv("FLAN_DATA_DIR", str(tmp_path))
  source = seqio.get_mixture_or_task("c4_v220_span_corruption").source
  with pytest.raises(sources.DataNotFoundError, match="c4/en:3.0.1 is not prepared"):
    source.get_dataset("validation")
  directory = tmp_path / "tfds" / "c4" / "en" / "3.0.1"
  directory.mkdir(parents=True)
  features = tfds.features.FeaturesDict({
      "text": tfds.features.Text(), "timestamp": tfds.features.Text(),
      "url": tfds.features.Text()})
  texts = ["A river runs past the mill.", "Bread needs flour and water."]
  with tf.io.TFRecordWriter(
      str(directory / "c4-validation.tfrecord-00000-of-00001")) as writer:
    for text in texts:
      writer.write(features.serialize_example(
          {"text": text, "timestamp": "2019-04-01", "url": "https://example.com"}))
  tfds.folder_dataset.write_metadata(data_dir=str(directory), features=features,
                                     split_infos=None, version="3.0.1")
  dataset = source.get_dataset("validation", shuffle=False)
  assert [e["text"].decode() for e in dataset.as_numpy_iterator()] == texts
