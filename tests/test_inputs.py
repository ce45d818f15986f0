"""moe_jax/inputs.py on tiny in-memory seqio tasks and one bundled sample task."""

import json
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio
import tensorflow as tf

from moe_jax import inputs
from moe_jax import partitioning

NUM_EXAMPLES = 64
LENGTHS = {"inputs": 16, "targets": 8}
SAMPLE_TASK = "sample:niv2:task1146_country_capital:zs"  # Bundled with moe_jax_tasks.


def _examples(offset):
  """Example i has inputs [i+offset] * (i % 4 + 1): its first token names it."""
  def example(i):
    token = tf.cast(i + offset, tf.int32)
    return {"inputs": tf.fill([i % 4 + 1], token), "targets": tf.fill([i % 3 + 1], token)}

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.range(NUM_EXAMPLES).map(example)
  return dataset_fn


@pytest.fixture(scope="module", autouse=True)
def tiny_tasks():
  vocabulary = seqio.PassThroughVocabulary(size=1024, eos_id=1)
  features = {k: seqio.Feature(vocabulary, add_eos=False) for k in LENGTHS}
  for name, offset in (("inputs_test:count", 2), ("inputs_test:other", 500)):
    seqio.TaskRegistry.add(name, seqio.FunctionDataSource(
        _examples(offset), splits=["train", "validation"]), output_features=features)
  seqio.MixtureRegistry.add("inputs_test:mix", ["inputs_test:count",
                                                "inputs_test:other"], default_rate=1.0)
  yield
  seqio.MixtureRegistry.remove("inputs_test:mix")
  for name in ("inputs_test:count", "inputs_test:other"):
    seqio.TaskRegistry.remove(name)


def _cfg(**overrides):
  fields = dict(mixture_or_task_name="inputs_test:mix", task_feature_lengths=LENGTHS,
                batch_size=4, seed=3)
  return inputs.DatasetConfig(**{**fields, **overrides})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _equal(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(a, b))


@pytest.mark.parametrize("overrides, message", [
    (dict(mixture_or_task_name=""), "MIXTURE_OR_TASK_NAME"),
    (dict(task_feature_lengths={}), "TASK_FEATURE_LENGTHS"),
    (dict(task_feature_lengths={"inputs": 8, "targets": 0}), "positive length"),
    (dict(batch_size=0), "BATCH_SIZE"),
    (dict(seed=1.5), "RANDOM_SEED"),
])
def test_config_rejects_bad_fields(overrides, message):
  with pytest.raises(ValueError, match=message):
    _cfg(**overrides)


@pytest.mark.parametrize("name, module, suggestion", [
    ("inputs_test:cuont", None, "'inputs_test:count'"),
    ("flan_sampel", "moe_jax_tasks", "'flan_sample'"),
])
def test_unknown_name_suggests_registered_ones(name, module, suggestion):
  cfg = _cfg(mixture_or_task_name=name, module=module)
  with pytest.raises(ValueError) as error:
    inputs.DatasetIterator(cfg, seqio.ShardInfo(0, 1))
  message = str(error.value)
  assert f"Unknown mixture or task {name!r}" in message
  assert f"Did you mean {suggestion}" in message


def test_unimportable_module_is_named():
  with pytest.raises(ValueError, match="MIXTURE_OR_TASK_MODULE 'no_such_tasks_mod'"):
    inputs.get_mixture_or_task("inputs_test:count", "no_such_tasks_mod")


@pytest.mark.parametrize("lengths, message", [
    ({"inputs": 8}, r"lacks \['targets'\]"),
    ({"inputs": 8, "targets": 4, "target": 4}, r"names \['target'\]"),
])
def test_feature_lengths_checked_against_task(lengths, message):
  with pytest.raises(ValueError, match=message):
    inputs.validate(_cfg(task_feature_lengths=lengths), num_shards=1)


def test_missing_split_is_named():
  with pytest.raises(ValueError, match="Split 'test' is missing"):
    inputs.validate(_cfg(split="test"), num_shards=1)


@pytest.mark.parametrize("batch_size, num_shards", [(6, 4), (3, 2), (1, 2)])
def test_batch_must_divide_by_shards(batch_size, num_shards):
  message = f"BATCH_SIZE {batch_size} .* {num_shards} data shards"
  with pytest.raises(ValueError, match=message):
    inputs.get_dataset(_cfg(batch_size=batch_size), seqio.ShardInfo(0, num_shards))


@pytest.mark.parametrize("pack", [True, False])
def test_same_seed_same_batches_other_seed_other_order(pack):
  shard = seqio.ShardInfo(0, 1)
  first = _take(inputs.DatasetIterator(_cfg(pack=pack), shard), 6)
  again = _take(inputs.DatasetIterator(_cfg(pack=pack), shard), 6)
  other = _take(inputs.DatasetIterator(_cfg(pack=pack, seed=4), shard), 6)
  assert _equal(first, again)
  assert not _equal(first, other)
  assert all(isinstance(v, np.ndarray) for batch in first for v in batch.values())


@pytest.mark.parametrize("pack", [True, False])
def test_features_and_shapes(pack):
  cfg = _cfg(pack=pack, batch_size=6)
  batch = next(inputs.DatasetIterator(cfg, seqio.ShardInfo(1, 3)))
  expected = inputs.batch_shapes(cfg)
  assert set(batch) == set(expected)
  packed = {"encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
            "decoder_positions"}
  assert packed <= set(batch) if pack else not packed & set(batch)
  for name, array in batch.items():
    assert array.shape == (2, expected[name][1]) and array.dtype == np.int32, name


def test_packing_puts_several_examples_in_a_row():
  batch = next(inputs.DatasetIterator(_cfg(pack=True), seqio.ShardInfo(0, 1)))
  segments, positions = batch["encoder_segment_ids"], batch["encoder_positions"]
  np.testing.assert_array_equal(segments > 0, batch["encoder_input_tokens"] > 0)
  assert segments.max() >= 2
  starts = (segments > 0) & (np.diff(segments, prepend=0, axis=1) != 0)
  assert np.all(positions[starts] == 0)  # Positions restart in each segment.


def test_bundled_sample_task_packs_and_resumes():
  # Its source is a Python generator, which tf.data iterator checkpoints reject.
  cfg = inputs.DatasetConfig(SAMPLE_TASK, {"inputs": 256, "targets": 32}, batch_size=2,
                             seed=0, module="moe_jax_tasks")
  running = inputs.DatasetIterator(cfg, seqio.ShardInfo(0, 1))
  batch = next(running)
  assert batch["encoder_input_tokens"].shape == (2, 256)
  assert batch["encoder_segment_ids"].max() >= 2
  np.testing.assert_array_equal(batch["decoder_loss_weights"] > 0,
                                batch["decoder_target_tokens"] > 0)
  _take(running, 2)
  resumed = inputs.DatasetIterator(cfg, seqio.ShardInfo(0, 1))
  resumed.restore(running.state())
  assert _equal(_take(resumed, 2), _take(running, 2))


@pytest.mark.parametrize("shuffle", [False, True])
def test_hosts_read_disjoint_examples(shuffle):
  cfg = _cfg(mixture_or_task_name="inputs_test:count", pack=False, batch_size=8,
             shuffle=shuffle)
  seen = []
  for index in range(2):
    batches = _take(inputs.DatasetIterator(cfg, seqio.ShardInfo(index, 2)), 8)
    assert all(b["encoder_input_tokens"].shape[0] == 4 for b in batches)
    # Unpacked rows start with their example's token, i + 2.
    firsts = np.concatenate([b["encoder_input_tokens"][:, 0] for b in batches])
    seen.append(set(firsts.tolist()))
  assert not seen[0] & seen[1]
  if not shuffle:  # One pass over each host's half: together, every example once.
    assert seen[0] | seen[1] == set(range(2, NUM_EXAMPLES + 2))


def _manager(directory):
  return ocp.CheckpointManager(directory, item_names=("state", "dataset"))


@pytest.mark.parametrize("pack, position", [(True, 5), (False, 3), (True, 0)])
def test_resume_through_checkpoint_manager(tmp_path, pack, position):
  cfg = _cfg(pack=pack)
  shard = seqio.ShardInfo(0, 1)
  expected = _take(inputs.DatasetIterator(cfg, shard), position + 4)[position:]

  running = inputs.DatasetIterator(cfg, shard)
  _take(running, position)
  params = {"w": np.arange(4.0)}
  save_args, _ = inputs.checkpoint_args(running)
  with _manager(tmp_path) as manager:
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                            dataset=save_args))
    # The position was captured at save(); drawing on while arrays are written is fine.
    assert _equal(_take(running, 4), expected)
    manager.wait_until_finished()

  resumed = inputs.DatasetIterator(cfg, shard)
  _, restore_args = inputs.checkpoint_args(resumed)
  with _manager(tmp_path) as manager:
    restored = manager.restore(7, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params), dataset=restore_args))
  assert restored.dataset is resumed and resumed.position == position
  np.testing.assert_array_equal(restored.state["w"], params["w"])
  assert _equal(_take(resumed, 4), expected)


def test_resume_adopts_the_saved_clock_seed(monkeypatch):
  monkeypatch.setattr(inputs, "_clock_seed", lambda: 11)
  first = inputs.DatasetIterator(_cfg(seed=None), seqio.ShardInfo(0, 1))
  _take(first, 2)
  state = first.state()
  expected = _take(first, 3)
  monkeypatch.setattr(inputs, "_clock_seed", lambda: 12)
  resumed = inputs.DatasetIterator(_cfg(seed=None), seqio.ShardInfo(0, 1))
  resumed.restore(state)
  assert state["seed"] == 11 and _equal(_take(resumed, 3), expected)


@pytest.mark.parametrize("cfg, shard, edit, message", [
    (_cfg(batch_size=8), seqio.ShardInfo(0, 1), {}, "batch_size: saved 4, now 8"),
    (_cfg(), seqio.ShardInfo(1, 2), {}, "shard_index: saved 0, now 1"),
    (_cfg(seed=5), seqio.ShardInfo(0, 1), {}, "seed: saved 3, now RANDOM_SEED = 5"),
    (_cfg(), seqio.ShardInfo(0, 1), {"digest": "0" * 64}, "did not reproduce"),
])
def test_restore_rejects_another_stream(cfg, shard, edit, message):
  saved = inputs.DatasetIterator(_cfg(), seqio.ShardInfo(0, 1))
  _take(saved, 2)
  with pytest.raises(ValueError, match=message):
    inputs.DatasetIterator(cfg, shard).restore({**saved.state(), **edit})


def test_handler_writes_one_file_per_process(tmp_path):
  iterator = inputs.DatasetIterator(_cfg(), seqio.ShardInfo(0, 1))
  _take(iterator, 2)
  handler = inputs.DatasetCheckpointHandler()
  handler.save(tmp_path, args=inputs.DatasetSave(iterator))
  written = tmp_path / "process-000-of-001.json"
  assert json.loads(written.read_text())["position"] == 2
  written.rename(tmp_path / "process-000-of-002.json")
  with pytest.raises(FileNotFoundError, match="as many processes"):
    handler.restore(tmp_path, args=inputs.DatasetRestore(iterator))


@pytest.mark.parametrize("whole_batch", [False, True])
@pytest.mark.parametrize("degrees", [dict(data=8), dict(data=2, expert=4),
                                     dict(data=2, expert=2, model=2)])
def test_global_arrays_shard_batch_over_expert_and_data(degrees, whole_batch):
  mesh = partitioning.create_mesh(**degrees)
  info = inputs.shard_info(mesh)
  assert (info.index, info.num_shards) == (0, 1)
  local = {"encoder_input_tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  assert inputs.batch_partition_spec() == jax.sharding.PartitionSpec(("expert", "data"))
  arrays = inputs.to_global_arrays(local, mesh, whole_batch=whole_batch)
  array = arrays["encoder_input_tokens"]
  assert array.sharding.spec == jax.sharding.PartitionSpec(("expert", "data"))
  np.testing.assert_array_equal(np.asarray(array), local["encoder_input_tokens"])
  rows = 8 // (mesh.shape["expert"] * mesh.shape["data"])
  coords = {d.id: c for c, d in np.ndenumerate(mesh.devices)}
  for shard in array.addressable_shards:
    data, expert, _ = coords[shard.device.id]
    first = (expert * mesh.shape["data"] + data) * rows  # 'expert' is the major axis.
    np.testing.assert_array_equal(shard.data,
                                  local["encoder_input_tokens"][first:first + rows])


@pytest.mark.parametrize("whole_batch", [False, True])
def test_global_arrays_reject_rows_that_do_not_split(whole_batch):
  mesh = partitioning.create_mesh(data=2, expert=4)
  with pytest.raises(ValueError, match="6 rows .* multiple of the mesh's 8 batch slices"):
    inputs.to_global_arrays({"x": np.zeros((6, 2), np.int32)}, mesh,
                            whole_batch=whole_batch)


@pytest.mark.parametrize("cfg_seed, seed, expected", [(None, 9, 9), (3, 9, 3)])
def test_train_inputs_on_a_mesh(cfg_seed, seed, expected):
  mesh = partitioning.create_mesh(data=2, expert=4)
  data = inputs.TrainInputs(_cfg(batch_size=8, seed=cfg_seed), mesh, seed=seed)
  assert data.shard_info == seqio.ShardInfo(0, 1)
  assert data.iterator.state()["seed"] == expected
  batch = inputs.to_global_arrays(next(data.iterator), mesh)
  assert {k: v.shape for k, v in batch.items()} == data.global_shapes
  assert data.global_shapes["encoder_segment_ids"] == (8, LENGTHS["inputs"])


def test_train_inputs_reject_batch_that_does_not_split_over_the_mesh():
  mesh = partitioning.create_mesh(data=2, expert=4)
  with pytest.raises(ValueError, match="BATCH_SIZE 12 does not split over the 8 batch"):
    inputs.TrainInputs(_cfg(batch_size=12), mesh)


def _fake_mesh(processes, shape):
  """A mesh-like object whose device d belongs to process processes[d]."""
  devices = np.array([types.SimpleNamespace(process_index=p) for p in processes],
                     dtype=object).reshape(shape)
  return types.SimpleNamespace(devices=devices, axis_names=partitioning.MESH_AXES,
                               shape=dict(zip(partitioning.MESH_AXES, shape)))


@pytest.mark.parametrize("processes, shape, expected", [
    # 2 hosts x 4 devices, data=2 x expert=4: each host holds one data row.
    ([0, 0, 0, 0, 1, 1, 1, 1], (2, 4, 1), [(0, 2), (1, 2)]),
    # model=2 spans the hosts: both hold every batch slice, so they read alike.
    ([0, 1, 0, 1, 0, 1, 0, 1], (4, 1, 2), [(0, 1), (0, 1)]),
    # 4 hosts, data=4 x model=2 within each host.
    ([0, 0, 1, 1, 2, 2, 3, 3], (4, 1, 2), [(0, 4), (1, 4), (2, 4), (3, 4)]),
])
def test_shard_info_groups_hosts_holding_the_same_rows(monkeypatch, processes, shape,
                                                       expected):
  mesh = _fake_mesh(processes, shape)
  for process, (index, num_shards) in enumerate(expected):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    assert inputs.shard_info(mesh) == seqio.ShardInfo(index, num_shards)
