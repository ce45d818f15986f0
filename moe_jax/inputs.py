"""Input pipeline: seqio mixture -> feature converter -> host batches -> global arrays.

Training data follows t5x's `utils.get_dataset`:

  * `DatasetConfig` names the data (t5x's field names: MIXTURE_OR_TASK_NAME,
    TASK_FEATURE_LENGTHS, BATCH_SIZE, RANDOM_SEED, USE_CACHED_TASKS,
    MIXTURE_OR_TASK_MODULE); `validate` fails fast on a bad one.
  * `get_dataset` gives this host's shard (`seqio.ShardInfo`, see `shard_info`)
    of the mixture, converted by `seqio.EncDecFeatureConverter` (packing),
    repeated, in batches of `batch_size // num_shards` rows.
  * `DatasetIterator` yields numpy batches; its position is an orbax checkpoint
    item (`DatasetSave` / `DatasetRestore`, `DatasetCheckpointHandler`) saved in
    the same atomic step as the model, one file per process.
  * `to_global_arrays` turns each host's batch into global `jax.Array`s with the
    batch axis sharded over `('expert', 'data')`.
  * `TrainInputs` puts these together for a run on a mesh.

Resuming replays the stream rather than checkpointing tf.data's iterator: the
state is (seed, batches drawn); restoring rebuilds the pipeline with that seed,
skips that many batches inside tf.data and checks the last one against a digest
saved with the position. tf.data iterator checkpoints cannot hold
`Dataset.from_generator` sources (the NIv2, CoT and P3 file sources of
`moe_jax_tasks` are generators) and would store every task's shuffle buffer.

Evaluation, where every process holds the whole batch, places it with
`to_global_arrays(batch, mesh, whole_batch=True)`.

Tasks are looked up by name; a task module is imported by name
(`DatasetConfig.module`), never as code.
"""

import dataclasses
import difflib
import hashlib
import importlib
import json
import logging
import time
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Type

import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils

from moe_jax import partitioning

Batch = Dict[str, np.ndarray]
FeatureConverterCls = Type[seqio.FeatureConverter]

# Bumped when the saved data state changes meaning.
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read; t5x's `utils.DatasetConfig` fields and meanings.

  Attributes:
    mixture_or_task_name: a registered seqio Mixture or Task
      (MIXTURE_OR_TASK_NAME), e.g. 'flan2022_submix' or 'flan_sample'.
    task_feature_lengths: task feature -> maximum length
      (TASK_FEATURE_LENGTHS), e.g. `{'inputs': 2048, 'targets': 512}`.
    batch_size: global batch in sequences (rows, each holding several
      examples when packing), summed over all hosts (BATCH_SIZE).
    split: the split to read.
    shuffle: shuffle the examples (tasks shuffle with their buffer size).
    seed: RANDOM_SEED for shuffling and mixing; None takes host 0's clock,
      shared by all hosts. Either way it is recorded with the data position,
      so a resumed run reads the same stream.
    use_cached: read seqio's offline cache (USE_CACHED_TASKS).
    pack: pack several examples into each row (adds segment ids and positions).
    module: a module that registers the tasks, imported by name before the
      lookup (MIXTURE_OR_TASK_MODULE), e.g. 'moe_jax_tasks'.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  shuffle: bool = True
  seed: Optional[int] = None
  use_cached: bool = False
  pack: bool = True
  module: Optional[str] = None

  def __post_init__(self):
    if not isinstance(self.mixture_or_task_name, str) or not self.mixture_or_task_name:
      raise ValueError(
          f"MIXTURE_OR_TASK_NAME must be a registered mixture or task name, got "
          f"{self.mixture_or_task_name!r}.")
    lengths = self.task_feature_lengths
    if (not isinstance(lengths, Mapping) or not lengths or not all(
        isinstance(k, str) and _is_int(v) and v > 0 for k, v in lengths.items())):
      raise ValueError(
          f"TASK_FEATURE_LENGTHS must map each task feature to a positive length, "
          f"e.g. {{'inputs': 2048, 'targets': 512}}; got {lengths!r}.")
    if not _is_int(self.batch_size) or self.batch_size < 1:
      raise ValueError(
          f"BATCH_SIZE must be a positive number of sequences, got {self.batch_size!r}.")
    if self.seed is not None and not _is_int(self.seed):
      raise ValueError(f"RANDOM_SEED must be an integer or None, got {self.seed!r}.")
    # Python ints in a private copy: the data state is JSON, and gin or the
    # caller may reuse (and mutate) the dict they passed.
    object.__setattr__(self, "task_feature_lengths",
                       {k: int(v) for k, v in lengths.items()})
    object.__setattr__(self, "batch_size", int(self.batch_size))
    if self.seed is not None:
      object.__setattr__(self, "seed", int(self.seed))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def get_mixture_or_task(name: str, module: Optional[str] = None
                        ) -> seqio.DatasetProviderBase:
  """The registered mixture or task `name`, after importing `module` by name.

  Raises:
    ValueError: the module cannot be imported, or nothing is registered under
      `name` (the message suggests close registered names).
  """
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(
          f"MIXTURE_OR_TASK_MODULE {module!r} cannot be imported ({e}); set it to "
          "an importable module that registers seqio tasks, e.g. 'moe_jax_tasks'."
      ) from e
  registered = set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names())
  if name in registered:
    return seqio.get_mixture_or_task(name)
  close = difflib.get_close_matches(name, sorted(registered), n=3)
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  source = (f"after importing {module!r}" if module else
            "and no MIXTURE_OR_TASK_MODULE was imported (e.g. 'moe_jax_tasks')")
  raise ValueError(f"Unknown mixture or task {name!r}: {len(registered)} names are "
                   f"registered {source}.{hint}")


def validate(cfg: DatasetConfig, num_shards: int,
             feature_converter_cls: FeatureConverterCls = seqio.EncDecFeatureConverter
             ) -> seqio.DatasetProviderBase:
  """Checks `cfg` against the registry and the host count without reading data.

  Args:
    cfg: the data to read.
    num_shards: hosts reading distinct data (`shard_info().num_shards`).
    feature_converter_cls: the converter that will see the task features.

  Returns:
    The mixture or task.

  Raises:
    ValueError: one message saying what to change.
  """
  if cfg.batch_size % num_shards:
    nearest = max(1, cfg.batch_size // num_shards) * num_shards
    raise ValueError(
        f"BATCH_SIZE {cfg.batch_size} (global, in sequences) is not divisible by "
        f"the {num_shards} data shards (one per host reading distinct data); use a "
        f"multiple of {num_shards}, e.g. {nearest}.")
  provider = get_mixture_or_task(cfg.mixture_or_task_name, cfg.module)
  lengths = cfg.task_feature_lengths
  missing = sorted(set(feature_converter_cls.TASK_FEATURES) - set(lengths))
  if missing:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS {lengths} lacks {missing}: "
        f"{feature_converter_cls.__name__} needs a length for each of "
        f"{sorted(feature_converter_cls.TASK_FEATURES)}, e.g. "
        "{'inputs': 2048, 'targets': 512}.")
  unknown = sorted(set(lengths) - set(provider.output_features))
  if unknown:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS names {unknown}, which {cfg.mixture_or_task_name!r} "
        f"does not produce; its features are {sorted(provider.output_features)}.")
  lacking = [t.name for t in seqio.get_subtasks(provider) if cfg.split not in t.splits]
  if lacking:
    raise ValueError(
        f"Split {cfg.split!r} is missing from {len(lacking)} task(s) of "
        f"{cfg.mixture_or_task_name!r}, e.g. {lacking[:3]}.")
  return provider


def _clock_seed() -> int:
  # t5x's rule for RANDOM_SEED = None: host 0's clock, so all hosts mix alike.
  return int(multihost_utils.broadcast_one_to_all(np.int32(int(time.time()) % 2**31)))


def get_dataset(cfg: DatasetConfig, shard_info: seqio.ShardInfo,
                feature_converter_cls: FeatureConverterCls = seqio.EncDecFeatureConverter
                ) -> tf.data.Dataset:
  """This host's training batches, repeated indefinitely.

  Args:
    cfg: the data to read.
    shard_info: this host's shard (`shard_info()`); hosts read disjoint examples.
    feature_converter_cls: built with `pack=cfg.pack`.

  Returns:
    Batches of `batch_size // num_shards` rows: `encoder_input_tokens`
    [rows, inputs_length] and `decoder_target_tokens`, `decoder_input_tokens`,
    `decoder_loss_weights` [rows, targets_length], int32; packing adds
    `{encoder,decoder}_{segment_ids,positions}`. The same seed gives the same
    batches.
  """
  provider = validate(cfg, shard_info.num_shards, feature_converter_cls)
  ds = seqio.get_dataset(
      provider,
      task_feature_lengths=cfg.task_feature_lengths,
      feature_converter=feature_converter_cls(pack=cfg.pack),
      dataset_split=cfg.split,
      use_cached=cfg.use_cached,
      shuffle=cfg.shuffle,
      num_epochs=None,
      shard_info=shard_info,
      seed=_clock_seed() if cfg.seed is None else cfg.seed,
      batch_size=cfg.batch_size // shard_info.num_shards)
  options = tf.data.Options()
  # Resuming replays the stream: its order must not depend on thread timing.
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def batch_shapes(cfg: DatasetConfig,
                 feature_converter_cls: FeatureConverterCls = seqio.EncDecFeatureConverter
                 ) -> Dict[str, Tuple[int, int]]:
  """Global `[batch_size, length]` of each model feature, without reading data.

  What `model.get_initial_variables` needs as input shapes.
  """
  converter = feature_converter_cls(pack=cfg.pack)
  return {name: (cfg.batch_size, length) for name, length in
          converter.get_model_feature_lengths(cfg.task_feature_lengths).items()}


def _digest(batch: Batch) -> str:
  digest = hashlib.sha256()
  for name in sorted(batch):
    array = np.ascontiguousarray(batch[name])
    digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
    digest.update(array.data)
  return digest.hexdigest()


class DatasetIterator:
  """This host's batches of `get_dataset` (dicts of numpy arrays), resumable.

  The pipeline is built on the first batch (or on `restore`), so restoring
  does not build it twice. `state()` is the position; `restore(state)` makes
  the next batch the one an uninterrupted iterator would have yielded.

  Draw batches only as the training loop consumes them: the position counts
  batches handed out, so a prefetcher outside this iterator would make a
  checkpoint skip what it held (tf.data already prefetches inside).
  """

  def __init__(self, cfg: DatasetConfig, shard_info: seqio.ShardInfo,
               feature_converter_cls: FeatureConverterCls = seqio.EncDecFeatureConverter):
    validate(cfg, shard_info.num_shards, feature_converter_cls)
    self._cfg = cfg
    self._shard_info = shard_info
    self._feature_converter_cls = feature_converter_cls
    self._seed = _clock_seed() if cfg.seed is None else cfg.seed
    self._position = 0
    self._last: Optional[Batch] = None
    self._batches: Optional[Iterator[Batch]] = None

  @property
  def position(self) -> int:
    """Batches handed out since the start of the stream."""
    return self._position

  def _open(self, skip: int) -> None:
    cfg = dataclasses.replace(self._cfg, seed=self._seed)
    ds = get_dataset(cfg, self._shard_info, self._feature_converter_cls)
    self._batches = ds.skip(skip).as_numpy_iterator()

  def __iter__(self) -> "DatasetIterator":
    return self

  def __next__(self) -> Batch:
    if self._batches is None:
      self._open(skip=self._position)
    self._last = next(self._batches)
    self._position += 1
    return self._last

  def _stream(self) -> Dict[str, Any]:
    # What a saved position is a position in; restoring requires the same.
    cfg = self._cfg
    return {
        "mixture_or_task_name": cfg.mixture_or_task_name,
        "split": cfg.split,
        "task_feature_lengths": dict(cfg.task_feature_lengths),
        "batch_size": cfg.batch_size,
        "shuffle": cfg.shuffle,
        "use_cached": cfg.use_cached,
        "pack": cfg.pack,
        "shard_index": self._shard_info.index,
        "num_shards": self._shard_info.num_shards,
    }

  def state(self) -> Dict[str, Any]:
    """The position as JSON-able data: the stream's identity, seed, count, digest."""
    return {
        "version": _STATE_VERSION,
        **self._stream(),
        "seed": self._seed,
        "position": self._position,
        # The last batch handed out; restoring recomputes and compares it.
        "digest": None if self._last is None else _digest(self._last),
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues the stream `state` describes (written by `state()`).

    Rebuilds the pipeline with the saved seed and replays `position` batches
    inside tf.data (cost: preprocessing them again, no model work).

    Raises:
      ValueError: the state belongs to a different stream (other data, batch,
        shard or seed) or the replayed stream differs from the saved one.
    """
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"Data state version {state.get('version')!r} is not "
                       f"{_STATE_VERSION}, the one this moe_jax writes.")
    current = self._stream()
    changed = [f"{k}: saved {state[k]!r}, now {v!r}"
               for k, v in current.items() if state[k] != v]
    if self._cfg.seed is not None and state["seed"] != self._seed:
      changed.append(f"seed: saved {state['seed']!r}, now RANDOM_SEED = {self._seed!r}")
    if changed:
      raise ValueError(
          "Cannot resume the input stream; the checkpoint's data position belongs "
          f"to other data settings ({'; '.join(changed)}). Resume with the saved "
          "settings, or restore the checkpoint without its 'dataset' item to "
          "start the data from the beginning.")
    self._seed = state["seed"]
    self._position = position = state["position"]
    self._last = self._batches = None
    if not position:
      return
    logging.info("Resuming the input stream of shard %d/%d: replaying %d batches.",
                 self._shard_info.index, self._shard_info.num_shards, position)
    self._open(skip=position - 1)
    self._last = next(self._batches)
    if _digest(self._last) != state["digest"]:
      raise ValueError(
          f"The input stream did not reproduce: batch {position} replayed with seed "
          f"{self._seed} differs from the one the checkpoint saw. The data files, "
          "the task definitions or a non-deterministic preprocessor changed the "
          "stream; restore without the 'dataset' item to start the data afresh.")


def _state_file(process_index: int, process_count: int) -> str:
  return f"process-{process_index:03d}-of-{process_count:03d}.json"


class DatasetCheckpointHandler(ocp.CheckpointHandler):
  """Saves each process's `DatasetIterator.state()` in an orbax checkpoint item.

  Each process writes `process-III-of-NNN.json` into the item directory and
  reads its own back. Saving is synchronous: the position is captured before
  `CheckpointManager.save` returns, while the model arrays may still be
  written in the background, so the loop can draw the next batch at once.
  """

  def save(self, directory: epath.Path, args: "DatasetSave") -> None:
    path = directory / _state_file(jax.process_index(), jax.process_count())
    path.write_text(json.dumps(args.iterator.state()))

  def restore(self, directory: epath.Path, args: "DatasetRestore") -> "DatasetIterator":
    path = directory / _state_file(jax.process_index(), jax.process_count())
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
          f"{directory} holds no data position for process {jax.process_index()} "
          f"of {jax.process_count()} (found {found}); resuming the input stream "
          "needs as many processes as the run that saved it.")
    args.iterator.restore(json.loads(path.read_text()))
    return args.iterator


@ocp.args.register_with_handler(DatasetCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DatasetSave(ocp.args.CheckpointArgs):
  """Saves `iterator`'s position (an item of `ocp.args.Composite`)."""

  iterator: DatasetIterator


@ocp.args.register_with_handler(DatasetCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DatasetRestore(ocp.args.CheckpointArgs):
  """Moves `iterator` (same settings, fresh) to the saved position."""

  iterator: DatasetIterator


def batch_partition_spec(rules: Optional[partitioning.AxisRules] = None
                         ) -> jax.sharding.PartitionSpec:
  """Mesh axes of the batch dimension (the 'batch' rule; `('expert', 'data')`)."""
  rules = partitioning.standard_logical_axis_rules() if rules is None else rules
  return nn.logical_to_mesh_axes(("batch",), rules)


def shard_info(mesh: Optional[jax.sharding.Mesh] = None,
               partition_spec: Optional[jax.sharding.PartitionSpec] = None
               ) -> seqio.ShardInfo:
  """This process's data shard.

  Without a mesh, one shard per process. With one, processes whose devices hold
  the same rows of the batch (e.g. when 'model' spans hosts) are replicas and
  must read the same data: shards are the distinct sets of batch slices held
  by a process, ordered by their first slice.

  Args:
    mesh: the device mesh the batch is sharded over.
    partition_spec: its batch axes (default `batch_partition_spec()`).
  """
  if mesh is None:
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
  axes = (partition_spec or batch_partition_spec())[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  order = [list(mesh.axis_names).index(a) for a in axes]
  sizes = [mesh.devices.shape[i] for i in order]
  slices: Dict[int, set] = {}
  for where, device in np.ndenumerate(mesh.devices):
    row = int(np.ravel_multi_index([where[i] for i in order], sizes)) if order else 0
    slices.setdefault(device.process_index, set()).add(row)
  shards = sorted({frozenset(s) for s in slices.values()}, key=min)
  if sum(map(len, shards)) != len(set().union(*shards)):
    raise ValueError(
        f"Mesh {dict(mesh.shape)} gives processes overlapping but unequal batch "
        f"slices ({[sorted(s) for s in shards]}); order the devices so that each "
        "process holds whole batch slices.")
  return seqio.ShardInfo(index=shards.index(frozenset(slices[jax.process_index()])),
                         num_shards=len(shards))


def _batch_slices(sharding: jax.sharding.NamedSharding) -> Tuple[int, int]:
  """(All, this process's) distinct slices of the batch axis under `sharding`."""
  # Counted by their starts: slices are unhashable before Python 3.12.
  shape = (sharding.mesh.size,)
  every = {i[0].start for i in sharding.devices_indices_map(shape).values()}
  local = {i[0].start for i in sharding.addressable_devices_indices_map(shape).values()}
  return len(every), len(local)


def to_global_arrays(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                     partition_spec: Optional[jax.sharding.PartitionSpec] = None, *,
                     whole_batch: bool = False) -> Dict[str, jax.Array]:
  """Global arrays from what each process holds.

  Args:
    batch: `[rows, ...]` arrays: this process's rows, `rows = batch_size //
      num_shards` (its shard from `shard_info(mesh)`), which fill its batch
      slices in increasing order; or, with `whole_batch`, all `batch_size`
      rows, the same on every process.
    mesh: the device mesh.
    partition_spec: the batch axes (default `batch_partition_spec()`, i.e.
      `('expert', 'data')`); the other dimensions are replicated.
    whole_batch: every process passes the whole batch (evaluation); each
      device takes its rows. Needed when a process's slices are not
      contiguous rows, e.g. 'expert' spanning processes.

  Returns:
    `[batch_size, ...]` `jax.Array`s, each device holding its batch slice.
  """
  spec = partition_spec or batch_partition_spec()
  sharding = jax.sharding.NamedSharding(mesh, spec)
  every, local = _batch_slices(sharding)
  divisor = every if whole_batch else local
  for name, array in batch.items():
    if array.shape[0] % divisor:
      holder = "the batch" if whole_batch else "this process"
      raise ValueError(
          f"Feature {name!r} has {array.shape[0]} rows in {holder}, which do not "
          f"split over {divisor} batch slices ({spec[0]} sharding): BATCH_SIZE "
          f"must be a multiple of the mesh's {every} batch slices.")
  if whole_batch:
    return {name: jax.make_array_from_process_local_data(sharding, array, array.shape)
            for name, array in batch.items()}
  return jax.make_array_from_process_local_data(sharding, dict(batch))


def checkpoint_args(iterator: DatasetIterator) -> Tuple[DatasetSave, DatasetRestore]:
  """The (save, restore) args of `iterator`'s position as a checkpoint item."""
  return DatasetSave(iterator), DatasetRestore(iterator)


class TrainInputs:
  """A run's training data on this process, for a batch sharded over `mesh`.

  Attributes:
    shard_info: this process's data shard (`shard_info(mesh)`).
    iterator: its `DatasetIterator` (checkpoint item: `checkpoint_args`).
    global_shapes: `batch_shapes(cfg)`, global `[batch_size, length]` per
      model feature.
  """

  def __init__(self, cfg: DatasetConfig, mesh: jax.sharding.Mesh,
               seed: Optional[int] = None,
               feature_converter_cls: FeatureConverterCls = seqio.EncDecFeatureConverter):
    """Checks the batch against the mesh and opens the data (lazily).

    Args:
      cfg: the training data.
      mesh: the device mesh; the batch goes over `batch_partition_spec()`.
      seed: RANDOM_SEED, used when `cfg.seed` is None (the config's wins).
      feature_converter_cls: as in `get_dataset`.
    """
    every, _ = _batch_slices(jax.sharding.NamedSharding(mesh, batch_partition_spec()))
    if cfg.batch_size % every:
      raise ValueError(
          f"BATCH_SIZE {cfg.batch_size} does not split over the {every} batch slices "
          f"of mesh {dict(mesh.shape)} (the batch is sharded over "
          f"{batch_partition_spec()[0]}); use a multiple of {every}.")
    if cfg.seed is None and seed is not None:
      cfg = dataclasses.replace(cfg, seed=seed)
    self.shard_info = shard_info(mesh)
    self.iterator = DatasetIterator(cfg, self.shard_info, feature_converter_cls)
    self.global_shapes = batch_shapes(cfg, feature_converter_cls)
