"""Parameter checkpoints: writing, finding, reading and checking `params` trees.

One home for the parameter I/O that `convert`, `score`, `eval`, `infer` and
training share. Parameters are found in any of:

  * a conversion output `OUT/` (`python -m moe_jax.convert`): its
    `checkpoint/` is an orbax checkpoint of `{'params': tree}`;
  * such an orbax checkpoint directory itself;
  * a training run's MODEL_DIR (its latest `checkpoint_<step>/`), or one
    step directory; a step keeps the parameters as its own `params` item;
  * a t5x checkpoint (`checkpoint_<step>/` with a msgpack `checkpoint` file
    and tensorstore arrays: the released T5 / Flan-T5 / Switch checkpoints,
    or t5x's orbax format with a `state/` item), or a t5x MODEL_DIR of such
    steps; read by `moe_jax.convert.t5x` without t5x.

Trees use the canonical moe_jax / t5x parameter names.
"""

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from moe_jax import paths

PyTree = Any
# The subdirectory of a conversion output that holds its parameters.
CONVERTED_SUBDIR = "checkpoint"
# Training step directories are `checkpoint_<step>` (t5x's naming).
STEP_PREFIX = "checkpoint"
PARAMS_ITEM = "params"
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}` (nested mappings only)."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """`{'a/b': x}` -> `{'a': {'b': x}}` (the inverse of `flatten`)."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def save_params(params: PyTree, directory: str) -> None:
  """Writes `{'params': params}` to `directory` as an orbax checkpoint.

  Orbax writes into a temporary directory and renames it when complete, so
  an interrupted save leaves no partial checkpoint at `directory`.
  """
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.absolute(directory), {"params": params})
    checkpointer.wait_until_finished()


def _is_orbax_dir(path: str) -> bool:
  return any((epath.Path(path) / marker).exists() for marker in _ORBAX_MARKERS)


def latest_step(model_dir: str) -> Optional[int]:
  """The newest complete training step under `model_dir`, or None.

  Orbax writes a step into a temporary directory and renames it when the
  save is complete, so only finished steps match `checkpoint_<step>`.
  """
  directory = epath.Path(model_dir)
  if not directory.is_dir():
    return None
  steps = [int(m.group(1)) for m in (_STEP_DIR.match(p.name) for p in directory.iterdir())
           if m and (directory / m.group(0)).is_dir()]
  return max(steps, default=None)


def step_of(directory: str) -> int:
  """The training step a checkpoint directory was saved at (0 if none, e.g. a conversion)."""
  for part in reversed(paths.absolute(directory).split("/")):
    match = _STEP_DIR.match(part)
    if match:
      return int(match.group(1))
  return 0


def is_t5x_checkpoint(directory: str) -> bool:
  """Whether `directory` (from `find_checkpoint`) is a t5x checkpoint, not orbax."""
  from moe_jax.convert import t5x  # pylint: disable=g-import-not-at-top
  return t5x.is_t5x_checkpoint(directory)


def find_checkpoint(path: str) -> Tuple[str, bool]:
  """Resolves where the parameters under `path` are (see the module docstring).

  Returns:
    `(directory, wrapped)`: an orbax directory, with `wrapped` when it holds
    `{'params': tree}` rather than the tree itself; or a t5x step directory
    (`is_t5x_checkpoint`), whose parameters are its `target` (`wrapped`).

  Raises:
    FileNotFoundError: naming what was expected at `path`.
  """
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
  nested = os.path.join(path, CONVERTED_SUBDIR)
  if epath.Path(nested).is_dir():
    return find_checkpoint(nested)
  item = os.path.join(path, PARAMS_ITEM)
  if epath.Path(item).is_dir() and _is_orbax_dir(item):
    return item, False
  if is_t5x_checkpoint(path):  # Before orbax: t5x's orbax steps are t5x checkpoints.
    return path, True
  if _is_orbax_dir(path):
    return path, True
  step = latest_step(path)
  if step is not None:
    return find_checkpoint(os.path.join(path, f"{STEP_PREFIX}_{step}"))
  raise FileNotFoundError(
      f"{path!r} holds no parameters: expected a training MODEL_DIR (with "
      f"{STEP_PREFIX}_<step>/ directories), a step directory, an orbax checkpoint, "
      f"a directory with a `{CONVERTED_SUBDIR}/` subdirectory (what "
      "`python -m moe_jax.convert` writes), or a t5x checkpoint directory (a msgpack "
      "`checkpoint` file with tensorstore arrays, or t5x's orbax `state/`) or t5x "
      "MODEL_DIR.")


def stored_params(path: str) -> PyTree:
  """The shapes and dtypes of the parameters under `path`, read from metadata only."""
  directory, wrapped = find_checkpoint(path)
  if is_t5x_checkpoint(directory):
    from moe_jax.convert import t5x  # pylint: disable=g-import-not-at-top
    return t5x.stored_params(directory)
  with ocp.StandardCheckpointer() as reader:
    metadata = reader.metadata(paths.absolute(directory))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return tree["params"] if wrapped else tree


def restore_params(path: str, target: Optional[PyTree] = None, *,
                   partial: bool = False) -> PyTree:
  """Restores the parameters under `path` (see `find_checkpoint`).

  Args:
    path: where the parameters are.
    target: optional tree of `jax.ShapeDtypeStruct`s with shardings: restore
      straight into that placement (each host reads only its shards).
    partial: `target` names only some of the stored parameters: read just
      those (an initial checkpoint for another model).
  """
  directory, wrapped = find_checkpoint(path)
  if is_t5x_checkpoint(directory):
    from moe_jax.convert import t5x  # pylint: disable=g-import-not-at-top
    return t5x.restore_params(directory, target, partial=partial)
  if target is not None and wrapped:
    target = {"params": target}
  if target is not None and partial:
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
          paths.absolute(directory),
          args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
    return restored["params"] if wrapped else restored
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(paths.absolute(directory), target)
  if not wrapped:
    return restored
  if "params" not in restored:
    raise ValueError(f"Checkpoint {path!r} has no 'params' entry (found {sorted(restored)}).")
  return restored["params"]


def param_shapes(model: Any) -> PyTree:
  """The `params` shapes of an `EncoderDecoderModel` (traced, no computation)."""
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  variables = jax.eval_shape(
      lambda rng: model.get_initial_variables(rng, shapes), jax.random.PRNGKey(0))
  return variables["params"]


def check_params_match_model(params: PyTree, expected: PyTree) -> None:
  """Raises ValueError naming every parameter that is missing, extra or misshapen.

  Args:
    params: parameters read from somewhere (a checkpoint, a conversion).
    expected: the model's parameter tree (arrays or shape structs).
  """
  got, want = flatten(params), flatten(expected)
  problems = [f"missing {p} {tuple(want[p].shape)}" for p in sorted(set(want) - set(got))]
  problems += [f"unexpected {p} {tuple(got[p].shape)}" for p in sorted(set(got) - set(want))]
  problems += [
      f"shape mismatch for {p}: checkpoint {tuple(got[p].shape)}, model expects "
      f"{tuple(want[p].shape)}"
      for p in sorted(set(got) & set(want)) if tuple(got[p].shape) != tuple(want[p].shape)]
  if problems:
    raise ValueError(
        f"The parameters do not fit the model ({len(problems)} problems; first: "
        f"{problems[0]}):\n  " + "\n  ".join(problems))
