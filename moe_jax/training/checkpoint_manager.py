"""Training checkpoints (orbax) and where a run's first parameters come from.

`CheckpointManager` saves, every `period` steps, one orbax step directory
`MODEL_DIR/checkpoint_<step>/` holding the items

  params      the parameters (sharded; each host writes its shards);
  opt_state   the optimizer state;
  dataset     each process's input position (`moe_jax.inputs`);
  meta        JSON: the step, and the step the optimizer state started at.

Orbax writes a step into a temporary directory and renames it only once
every item is complete, so a crash or `kill -9` at any moment leaves the
previous step restorable; leftovers are removed when the next run starts.
Saves are asynchronous (the device-to-host copy happens before `save`
returns, the file writes in the background), and the newest `keep` steps
are kept.

`initial_state` starts a run from a checkpoint of another run: our own
checkpoints, `python -m moe_jax.convert` outputs (Hugging Face Flan-T5 / T5 /
Switch), with regexes naming parameters to re-initialize, and sparse
upcycling (Komatsuzaki et al. 2022, https://arxiv.org/abs/2212.05055): a
dense checkpoint into an MoE model, each expert a copy of the dense FFN at
its layer, routers freshly initialized.
"""

import os
import re
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_jax import checkpoints
from moe_jax import paths
from moe_jax.training import trainer as trainer_lib

PyTree = Any
META_ITEM = "meta"
DATASET_ITEM = "dataset"


class CheckpointManager:
  """Saves and restores a run's train state together with its data position.

  Attributes:
    model_dir: the run's directory.
    period: `should_save` asks for a checkpoint every this many steps.
    keep: how many step directories to keep (None: all).
    async_save: write in the background.
    dataset_args: `iterator -> (save args, restore args)` of the data
      position item, or None for runs without one (e.g. tests).
  """

  def __init__(self, model_dir: str, *, period: int, keep: Optional[int] = None,
               async_save: bool = True,
               dataset_handler: Optional[ocp.CheckpointHandler] = None,
               dataset_args: Optional[Callable[[Any], Any]] = None):
    if period < 1:
      raise ValueError(f"The checkpoint period must be >= 1 step, got {period}.")
    self.model_dir = paths.absolute(model_dir)
    handlers = {checkpoints.PARAMS_ITEM: ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                META_ITEM: ocp.JsonCheckpointHandler()}
    if dataset_handler is not None:
      handlers[DATASET_ITEM] = dataset_handler
    self._dataset_args = dataset_args
    self.period = period
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=checkpoints.STEP_PREFIX,
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.model_dir, options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the period asks for a checkpoint at `step`."""
    return step % self.period == 0

  def step_dir(self, step: int) -> str:
    return os.path.join(self.model_dir, f"{checkpoints.STEP_PREFIX}_{step}")

  def save(self, state: trainer_lib.TrainState, data_iterator: Any = None) -> None:
    """Saves `state` and the data position as step `state.step`."""
    step = int(jax.device_get(state.step))
    items = {checkpoints.PARAMS_ITEM: ocp.args.StandardSave(state.params),
             "opt_state": ocp.args.StandardSave(state.opt_state),
             META_ITEM: ocp.args.JsonSave(
                 {"step": step, "first_step": int(jax.device_get(state.first_step))})}
    if self._dataset_args is not None and data_iterator is not None:
      items[DATASET_ITEM] = self._dataset_args(data_iterator)[0]
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: trainer_lib.TrainState, data_iterator: Any = None,
              step: Optional[int] = None) -> trainer_lib.TrainState:
    """Restores a step (default: the latest) into `abstract_state`'s placement."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.model_dir}.")
    items = {checkpoints.PARAMS_ITEM: ocp.args.StandardRestore(abstract_state.params),
             "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
             META_ITEM: ocp.args.JsonRestore()}
    if self._dataset_args is not None and data_iterator is not None:
      items[DATASET_ITEM] = self._dataset_args(data_iterator)[1]
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    meta = restored[META_ITEM]
    return trainer_lib.TrainState(
        step=jax.device_put(np.int32(step), abstract_state.step.sharding),
        first_step=jax.device_put(np.int32(meta["first_step"]),
                                  abstract_state.first_step.sharding),
        params=restored[checkpoints.PARAMS_ITEM], opt_state=restored["opt_state"])

  def wait(self) -> None:
    """Blocks until background writes are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# ---------------------------------------------------------------------------
# Initial checkpoints.
# ---------------------------------------------------------------------------


def _dense_source(path: str) -> Optional[str]:
  """`.../mlp/expert/wi_0` -> `.../mlp/wi_0`: the dense FFN an expert copies."""
  if "/expert/" not in path:
    return None
  return path.replace("/expert/", "/", 1)


def initial_state(trainer: trainer_lib.Trainer, path: str, rng: jax.Array, *,
                  reinitialize: Sequence[str] = (), upcycle: bool = False
                  ) -> trainer_lib.TrainState:
  """A fresh train state whose parameters come from the checkpoint at `path`.

  Args:
    trainer: the run's trainer (model, shardings).
    path: anything `checkpoints.find_checkpoint` accepts (a run's MODEL_DIR or
      step directory, a `convert` output, a t5x checkpoint).
    rng: initializes the parameters the checkpoint does not provide.
    reinitialize: regexes over '/'-joined parameter paths whose values are
      initialized afresh instead of read (e.g. '.*/router/.*').
    upcycle: read a dense checkpoint into an MoE model: each expert parameter
      `.../mlp/expert/W` `[E, ...]` is `E` copies of the dense `.../mlp/W`;
      routers (and anything else only the MoE model has) are initialized.

  Returns:
    The state at the checkpoint's step (0 for conversions), with a fresh
    optimizer state.

  Raises:
    ValueError: naming the first parameter the checkpoint cannot provide
      (missing, or of another shape), i.e. another architecture.
  """
  directory, _ = checkpoints.find_checkpoint(path)
  stored = checkpoints.flatten(checkpoints.stored_params(path))
  patterns = [re.compile(p) for p in reinitialize]
  fresh = trainer.init_state(rng)
  model_params = checkpoints.flatten(trainer.placement.abstract_params)

  # Which stored tensor feeds each parameter, checked before anything is read.
  sources: Dict[str, str] = {}
  for name, target in sorted(model_params.items()):
    if any(p.fullmatch(name) for p in patterns):
      continue
    source = name if name in stored else (_dense_source(name) if upcycle else None)
    if upcycle and name not in stored and "/router/" in name:
      continue  # Routers are new in an upcycled model.
    if source is None or source not in stored:
      raise ValueError(
          f"The initial checkpoint {path!r} has no parameter {name!r} "
          f"{tuple(target.shape)}: it is another architecture. Use a checkpoint of "
          "this model, set UPCYCLE=True for a dense checkpoint into an MoE model, or "
          "re-initialize such parameters with INITIAL_CHECKPOINT_REINITIALIZE.")
    expected = tuple(target.shape[1:]) if source != name else tuple(target.shape)
    if tuple(stored[source].shape) != expected:
      raise ValueError(
          f"The initial checkpoint's {source!r} has shape {tuple(stored[source].shape)}, "
          f"but the model's {name!r} needs {expected}: it is another architecture "
          "(check the model gin against the checkpoint's).")
    sources[name] = source

  # Read just those tensors: same-shape ones straight into their shards.
  shardings = checkpoints.flatten(trainer.state_shardings.params)
  target = {}
  for name, source in sources.items():
    info = model_params[name]
    sharding = shardings[name] if source == name else None
    shape = info.shape if source == name else info.shape[1:]
    target[source] = jax.ShapeDtypeStruct(shape, info.dtype, sharding=sharding)
  loaded = checkpoints.flatten(
      checkpoints.restore_params(path, checkpoints.unflatten(target), partial=True))

  params = checkpoints.flatten(fresh.params)
  for name, source in sources.items():
    value = loaded[source]
    if source != name:  # Upcycled: one copy per expert.
      value = np.broadcast_to(np.asarray(value)[None], model_params[name].shape)
    params[name] = value
  state = trainer.state_from_params(checkpoints.unflatten(params),
                                    step=checkpoints.step_of(directory))
  return state
