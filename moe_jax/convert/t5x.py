"""Reads t5x checkpoints (the released T5 / Flan-T5 / Switch format) without t5x.

A t5x checkpoint is a step directory `checkpoint_<step>/` written by t5x's
`checkpoints.Checkpointer` (t5x's legacy, non-orbax format):

  checkpoint        msgpack (flax serialization) of
                    `{'version': 3, 'optimizer': {'target': params,
                    'state': {'step': ..., 'param_states': ...}}}`
                    (version 0: the optimizer state dict itself);
  target.<a>.<b>/   one zarr array per parameter written with tensorstore;
  state.param_states.<...>/   the optimizer's, likewise.

(t5x's orbax checkpointer, its default since 2024, writes `state/` instead:
an orbax item holding the same `{'target', 'state'}` tree; also read.)

Each msgpack leaf is either the value itself (flax's ndarray extension type,
or a `__msgpack_chunked_array__` dict for big arrays) or a tensorstore spec
`{'driver': 'zarr', 'kvstore': {'driver': 'file'|'gfile'|'gcs', 'path':
'target.a.b'}, 'metadata': {...}}` whose path is relative to the step
directory (tensorstore < 0.1.14 wrote `path` at the top level). Only
`target` (the parameters) is read here: with msgpack and tensorstore, from a
local directory (copy a `gs://` checkpoint down first).

Parameter names: t5x runs of moe_jax modules use moe_jax's names. The
released checkpoints come from flaxformer / t5x's example network, whose
dense layers keep their weight under `kernel`; `canonical_name` maps those:

  .../mlp/{wi,wi_0,wi_1,wo}/kernel            .../mlp/{wi,wi_0,wi_1,wo}
  .../mlp/expert/{wi,wi_0,wi_1,wo}/kernel     .../mlp/expert/{wi,...,wo}
  .../mlp/router/router_weights/w/kernel      .../mlp/router/w
  .../extra_mlp/{wi,...}/kernel               .../extra_mlp/{wi,...}

(a zero `router_weights/w/bias` is dropped; a non-zero one is refused: moe_jax
routers have no bias). Everything else (attention `query/kernel`, norms'
`scale`, `relpos_bias/rel_embedding`, `token_embedder/embedding`,
`decoder/logits_dense/kernel`) is named alike. Their DenseGeneral also stores
attention kernels flattened to 2-D (`reshape_kernel`): `query/key/value`
`[embed, heads * kv]` and `out` `[heads * kv, embed]` become moe_jax's
`[embed, heads, kv]` / `[heads, kv, embed]`, with the stack's head count from
its `relpos_bias/rel_embedding` `[heads, buckets]`.
"""

import copy
import dataclasses
import os
import re
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import jax
import ml_dtypes
import msgpack
import numpy as np
import tensorstore as ts
from etils import epath

from moe_jax import checkpoints
from moe_jax import paths

CHECKPOINT_FILE = "checkpoint"
ORBAX_STATE_ITEM = "state"
TARGET = "target"
_NDARRAY, _COMPLEX, _SCALAR = 1, 2, 3  # flax's msgpack extension type codes
_CHUNKED = "__msgpack_chunked_array__"
_RENAMES = (
    (re.compile(r"^(.*/(?:mlp|extra_mlp)(?:/expert)?)/(wi|wi_\d+|wo)/kernel$"), r"\1/\2"),
    (re.compile(r"^(.*/mlp/router)/router_weights/w/kernel$"), r"\1/w"),
)
_ROUTER_BIAS = re.compile(r"^.*/mlp/router/router_weights/w/bias$")
_ATTENTION_KERNEL = re.compile(
    r"^(encoder|decoder)/.*/(?:attention|self_attention|encoder_decoder_attention)/"
    r"(query|key|value|out)/kernel$")


def canonical_name(name: str) -> str:
  """A t5x / flaxformer parameter path ('a/b/c') -> the moe_jax one."""
  for pattern, replacement in _RENAMES:
    name = pattern.sub(replacement, name)
  return name


def _is_msgpack_checkpoint(directory: str) -> bool:
  path = epath.Path(directory) / CHECKPOINT_FILE
  if not path.is_file():
    return False
  with path.open("rb") as f:
    head = f.read(64)
  # A msgpack map (fixmap / map16 / map32) with t5x's keys; not, e.g., TF's
  # text `checkpoint` index.
  return bool(head) and (head[0] & 0xF0 == 0x80 or head[0] in (0xDE, 0xDF)) and any(
      key in head for key in (b"version", b"optimizer", b"target", b"state"))


def _orbax_state_dir(directory: str) -> Optional[str]:
  """t5x's orbax format (`train.use_orbax`, t5x's default): `state/` holds the train state."""
  state = epath.Path(directory) / ORBAX_STATE_ITEM
  if state.is_dir() and any((state / marker).exists()
                            for marker in ("_METADATA", "manifest.ocdbt")):
    return str(state)
  return None


def is_t5x_checkpoint(directory: str) -> bool:
  """Whether `directory` is a t5x step directory.

  Either t5x's legacy checkpointer wrote it (a msgpack `checkpoint` file and
  tensorstore arrays: the released checkpoints), or its orbax one (a
  `state/` orbax item with `target` and `state`).
  """
  return _is_msgpack_checkpoint(directory) or _orbax_state_dir(directory) is not None


def _dtype(name: Any) -> np.dtype:
  """A numpy / tensorstore dtype name ('float32', 'bfloat16') or typestr ('<f4')."""
  name = name.decode() if isinstance(name, bytes) else str(name)
  try:
    return np.dtype(name)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, name))


def _ndarray(data: bytes) -> np.ndarray:
  shape, dtype, buffer = msgpack.unpackb(data, raw=True)
  return np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
  if code == _NDARRAY:
    return _ndarray(data)
  if code == _SCALAR:
    return _ndarray(data)[()]
  if code == _COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def _is_spec(value: Any) -> bool:
  return isinstance(value, dict) and "driver" in value and (
      "kvstore" in value or "path" in value)


def _unchunk(value: Dict[str, Any]) -> np.ndarray:
  shape = tuple(value["shape"][str(i)] for i in range(len(value["shape"])))
  chunks = [value["chunks"][str(i)] for i in range(len(value["chunks"]))]
  return np.concatenate(chunks).reshape(shape)


def _leaves(tree: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
  if isinstance(tree, dict) and not _is_spec(tree) and _CHUNKED not in tree:
    for key, value in tree.items():
      yield from _leaves(value, f"{prefix}/{key}" if prefix else str(key))
  elif isinstance(tree, dict) and _CHUNKED in tree:
    yield prefix, _unchunk(tree)
  else:
    yield prefix, tree


@dataclasses.dataclass(frozen=True)
class _OrbaxLeaf:
  """A `target` array of t5x's orbax format: its name there, shape and dtype."""

  name: str
  shape: Tuple[int, ...]
  dtype: np.dtype


def array_kvstore(directory: str, path: str) -> Dict[str, str]:
  """The tensorstore kvstore of array `path` (relative to the step `directory`):
  a local file, or a Cloud Storage object when `directory` is `gs://bucket/...`."""
  if directory.startswith("gs://"):
    bucket, _, prefix = directory[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket,
            "path": "/".join(part for part in (prefix.rstrip("/"), path) if part)}
  return {"driver": "file",
          "path": path if os.path.isabs(path) else os.path.join(directory, path)}


class T5xCheckpoint:
  """The parameters (`target`) of one t5x step directory, read lazily.

  Attributes:
    directory: the step directory.
    step: the training step stored in the checkpoint (None if absent).
  """

  def __init__(self, directory: str):
    self.directory = paths.absolute(directory).rstrip("/")
    if not is_t5x_checkpoint(self.directory):
      raise FileNotFoundError(
          f"{self.directory!r} is not a t5x checkpoint: expected a msgpack "
          f"`{CHECKPOINT_FILE}` file written by t5x's Checkpointer (or t5x's orbax "
          f"`{ORBAX_STATE_ITEM}/` item).")
    self._orbax = None if _is_msgpack_checkpoint(self.directory) else _orbax_state_dir(
        self.directory)
    self._orbax_values: Optional[Dict[str, np.ndarray]] = None
    match = re.search(r"_(\d+)$", os.path.basename(self.directory))
    self.step = int(match.group(1)) if match else None
    if self._orbax:
      state = {TARGET: self._orbax_metadata()}
    else:
      path = os.path.join(self.directory, CHECKPOINT_FILE)
      contents = msgpack.unpackb(epath.Path(path).read_bytes(), ext_hook=_ext_hook,
                                 raw=False, strict_map_key=False)
      # Versions >= 1 wrap the optimizer state; version 0 is the state itself.
      state = contents.get("optimizer", contents) if "version" in contents else contents
      if not isinstance(state, dict) or TARGET not in state:
        raise ValueError(f"The t5x checkpoint {path!r} has no {TARGET!r} (parameters); "
                         f"found {sorted(state) if isinstance(state, dict) else type(state)}.")
      step = state.get("state", {}).get("step") if isinstance(state.get("state"), dict) else None
      if step is not None:
        self.step = int(np.asarray(step))
    self._entries: Dict[str, Any] = {}
    for name, value in _leaves(state[TARGET]):
      if _ROUTER_BIAS.match(name):
        if np.any(self._read_full(value)):
          raise ValueError(
              f"The t5x checkpoint has a non-zero router bias {name!r}; moe_jax "
              "routers have none.")
        continue
      canonical = canonical_name(name)
      if canonical in self._entries:
        raise ValueError(f"The t5x checkpoint names {canonical!r} twice (as t5x and "
                         "moe_jax parameter names).")
      self._entries[canonical] = value
    self._shapes = {name: self._stored_shape(value) for name, value in self._entries.items()}
    self._unflattened = self._attention_shapes()

  def _orbax_metadata(self) -> Dict[str, Any]:
    """The `target` tree of t5x's orbax item, leaves `_OrbaxLeaf`s."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.PyTreeCheckpointer() as reader:
      metadata = reader.metadata(self._orbax)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if TARGET not in tree:
      raise ValueError(f"The t5x checkpoint {self._orbax!r} has no {TARGET!r} (parameters); "
                       f"found {sorted(tree)}.")
    return checkpoints.unflatten({
        name: _OrbaxLeaf(name, tuple(leaf.shape), np.dtype(leaf.dtype))
        for name, leaf in checkpoints.flatten(tree[TARGET]).items()})

  def _orbax_read(self, name: str) -> np.ndarray:
    """One `target` array of t5x's orbax item (all of them are read, once)."""
    if self._orbax_values is None:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      leaves = checkpoints.flatten(self._orbax_metadata())
      item = {TARGET: checkpoints.unflatten(
          {n: np.zeros((), leaf.dtype) for n, leaf in leaves.items()})}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(self._orbax, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
      self._orbax_values = {
          n: np.asarray(v) for n, v in checkpoints.flatten(restored[TARGET]).items()}
    return self._orbax_values[name]

  def _stored_shape(self, value: Any) -> Tuple[Tuple[int, ...], np.dtype]:
    if isinstance(value, _OrbaxLeaf):
      return value.shape, value.dtype
    if _is_spec(value):
      metadata = value.get("metadata") or {}
      dtype = value.get("dtype") or metadata.get("dtype")
      if "shape" in metadata and dtype is not None:
        return tuple(metadata["shape"]), _dtype(dtype)
      store = self._open(value)
      return tuple(store.shape), store.dtype.numpy_dtype
    array = np.asarray(value)
    return array.shape, array.dtype

  def _attention_shapes(self) -> Dict[str, Tuple[int, ...]]:
    """{name: moe_jax shape} of attention kernels stored flattened to 2-D."""
    out = {}
    for name, (shape, _) in self._shapes.items():
      match = _ATTENTION_KERNEL.match(name)
      if not match or len(shape) != 2:
        continue
      relpos = self._shapes.get(f"{match.group(1)}/relpos_bias/rel_embedding")
      if relpos is None or len(relpos[0]) != 2:
        continue
      heads = relpos[0][0]
      joined = shape[0] if match.group(2) == "out" else shape[1]
      if joined % heads:
        raise ValueError(f"The t5x checkpoint's {name!r} {shape} does not split into "
                         f"{heads} heads (from {match.group(1)}/relpos_bias).")
      split = (heads, joined // heads)
      out[name] = split + (shape[1],) if match.group(2) == "out" else (shape[0],) + split
    return out

  def names(self):
    return sorted(self._entries)

  def _spec(self, spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The stored spec, opened for reading from this directory."""
    spec = copy.deepcopy(dict(spec))
    kvstore = spec.get("kvstore")
    if not isinstance(kvstore, dict):
      kvstore = {"driver": kvstore or "file"}
    if "path" in spec and "path" not in kvstore:  # tensorstore < 0.1.14
      kvstore["path"] = spec.pop("path")
    # t5x writes paths relative to the step directory (a checkpoint saved to
    # GCS also names a dummy bucket): read them from this directory.
    spec["kvstore"] = array_kvstore(self.directory, str(kvstore.get("path", "")))
    metadata = dict(spec.get("metadata") or {})
    # The chunking and compressor of the write are not constraints on a read.
    metadata.pop("chunks", None)
    metadata.pop("compressor", None)
    spec["metadata"] = metadata
    spec.pop("dtype", None)  # as stored (a `cast` on write stores that dtype)
    return spec

  def _open(self, spec: Mapping[str, Any]) -> ts.TensorStore:
    return ts.open(self._spec(spec), open=True).result()

  def _read_full(self, value: Any) -> np.ndarray:
    if isinstance(value, _OrbaxLeaf):
      return self._orbax_read(value.name)
    if _is_spec(value):
      return np.asarray(self._open(value).read().result())
    return np.asarray(value)

  def shape_dtype(self, name: str) -> jax.ShapeDtypeStruct:
    """moe_jax shape and stored dtype of parameter `name` (from the msgpack)."""
    shape, dtype = self._shapes[name]
    return jax.ShapeDtypeStruct(self._unflattened.get(name, shape), dtype)

  def read(self, name: str, index: Optional[Tuple[slice, ...]] = None) -> np.ndarray:
    """Parameter `name` (or the `index` slice of it), in the stored dtype."""
    value = self._entries[name]
    if name in self._unflattened:
      array = self._read_full(value).reshape(self._unflattened[name])
      return array if index is None else array[index]
    if isinstance(value, _OrbaxLeaf):
      array = self._read_full(value)
      return array if index is None else array[index]
    if _is_spec(value):
      store = self._open(value)
      return np.asarray((store if index is None else store[index]).read().result())
    array = np.asarray(value)
    return array if index is None else array[index]


def stored_params(directory: str) -> Dict[str, Any]:
  """`{param tree of jax.ShapeDtypeStruct}` of a t5x checkpoint (msgpack only)."""
  checkpoint = T5xCheckpoint(directory)
  return checkpoints.unflatten({name: checkpoint.shape_dtype(name) for name in checkpoint.names()})


def restore_params(directory: str, target: Optional[Any] = None, *,
                   partial: bool = False) -> Dict[str, Any]:
  """Reads the parameters of a t5x checkpoint into the moe_jax tree.

  Args:
    directory: the step directory.
    target: optional tree of `jax.ShapeDtypeStruct`s (with shardings): read
      just these, cast to their dtypes and, where a sharding is given, as
      global arrays of which each process reads only its own shards.
    partial: with `target`, allow the checkpoint to hold more parameters.

  Returns:
    The parameter tree: float32 numpy arrays (all of them, without `target`).

  Raises:
    ValueError: a target parameter that is missing or of another shape, or
      (unless `partial`) checkpoint parameters the target lacks.
  """
  checkpoint = T5xCheckpoint(directory)
  names = checkpoint.names()
  if target is None:
    return checkpoints.unflatten({name: checkpoint.read(name).astype(np.float32) for name in names})
  wanted = checkpoints.flatten(target)
  missing = sorted(set(wanted) - set(names))
  if missing:
    raise ValueError(
        f"The t5x checkpoint {directory!r} has no parameter {missing[0]!r} "
        f"({len(missing)} missing); it holds {len(names)} parameters, e.g. {names[:3]}.")
  extra = sorted(set(names) - set(wanted))
  if extra and not partial:
    raise ValueError(f"The t5x checkpoint {directory!r} has {len(extra)} parameters the "
                     f"model lacks, e.g. {extra[:3]}.")
  out = {}
  for name, want in wanted.items():
    stored = checkpoint.shape_dtype(name)
    if tuple(stored.shape) != tuple(want.shape):
      raise ValueError(f"Shape mismatch for {name}: the t5x checkpoint has "
                       f"{tuple(stored.shape)}, the model expects {tuple(want.shape)}.")
    dtype = getattr(want, "dtype", np.float32)
    sharding = getattr(want, "sharding", None)
    if sharding is None:
      out[name] = checkpoint.read(name).astype(dtype)
    else:
      out[name] = jax.make_array_from_callback(
          tuple(want.shape), sharding,
          lambda index, name=name, dtype=dtype: checkpoint.read(name, index).astype(dtype))
  return checkpoints.unflatten(out)


# ---------------------------------------------------------------------------
# `python -m moe_jax.convert t5x`: a t5x checkpoint -> moe_jax's own layout.
# ---------------------------------------------------------------------------


def _resolve_gin_file(gin_file: str, search_paths) -> str:
  if os.path.isfile(gin_file):
    return os.path.abspath(gin_file)
  for root in search_paths:
    candidate = os.path.join(root, gin_file)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"gin file {gin_file!r} was not found in {list(search_paths)}.")


def model_gin(source: str, step: Optional[int], gin_files, gin_bindings=(),
              gin_search_paths=()) -> str:
  """model.gin of a conversion: includes the model's gin files, then its bindings."""
  from moe_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  paths = config_lib.search_paths(gin_search_paths)
  lines = [f"# t5x checkpoint imported from {source}"
           + (f" (step {step})" if step is not None else ""),
           "# by `python -m moe_jax.convert t5x`: the model is the gin files and bindings",
           "# given to the import.", ""]
  lines += [f"include {_resolve_gin_file(f, paths)!r}" for f in gin_files]
  lines += list(gin_bindings)
  return "\n".join(lines) + "\n"


def convert(checkpoint_dir: str, out_dir: str, gin_files, *, gin_bindings=(),
            gin_search_paths=()) -> Dict[str, Any]:
  """Imports a t5x checkpoint into OUT/checkpoint (orbax) and OUT/model.gin.

  Every parameter is checked against the gin-built model before anything is
  written (missing, extra or mis-shaped parameters are named).

  Args:
    checkpoint_dir: a t5x step directory, or a t5x MODEL_DIR (latest step).
    out_dir: new or empty output directory.
    gin_files: gin files that build the model the checkpoint belongs to.
    gin_bindings: extra bindings (kept in model.gin).
    gin_search_paths: where gin includes are looked up.

  Returns:
    `{'checkpoint_dir', 'gin_file', 'step', 'num_parameters'}`.
  """
  from moe_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from moe_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  directory, _ = checkpoints.find_checkpoint(checkpoint_dir)
  if not is_t5x_checkpoint(directory):
    raise ValueError(f"{checkpoint_dir!r} is not a t5x checkpoint (it resolves to the "
                     f"orbax checkpoint {directory!r}, which moe_jax reads as it is).")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"Output directory {out_dir!r} is not empty; choose a new one.")
  model = config_lib.load_model(gin_files, gin_bindings, gin_search_paths)
  checkpoints.check_params_match_model(stored_params(directory),
                                       checkpoints.param_shapes(model))
  checkpoint = T5xCheckpoint(directory)
  text = model_gin(directory, checkpoint.step, gin_files, gin_bindings, gin_search_paths)
  params = restore_params(directory)
  os.makedirs(out_dir, exist_ok=True)
  gin_file = os.path.join(out_dir, "model.gin")
  with open(gin_file, "w", encoding="utf-8") as f:
    f.write(text)
  saved = os.path.join(out_dir, checkpoints.CONVERTED_SUBDIR)
  checkpoints.save_params(params, saved)
  return {"checkpoint_dir": saved, "gin_file": gin_file, "step": checkpoint.step,
          "num_parameters": sum(int(np.prod(v.shape))
                                for v in checkpoints.flatten(params).values())}
