"""The one place where logical axis names meet mesh axes.

Every parameter and key activation in moe_jax is annotated with *logical* axis
names (`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`, `expert`,
`expert_mlp`, `unmodeled`, ...). Only this module maps them onto the physical
mesh axes `('data', 'expert', 'model')`, following t5x's MoE partitioner
(`t5x.contrib.moe.partitioning.standard_logical_axis_rules`) so that a t5x
user's rule overrides carry over unchanged:

  * `batch` is sharded over `('expert', 'data')`: every device holds distinct
    tokens, and the expert axis doubles as a data axis outside MoE layers.
  * `expert` (the leading axis of every expert parameter and of the expert
    buffers inside an MoE layer) is sharded over `expert`; moving a
    `[groups, experts, capacity, embed]` buffer from `batch` to `expert`
    sharding is the all-to-all of expert parallelism.
  * `mlp`, `heads`, `vocab`, `expert_mlp` go to `model` (tensor parallelism).

Layers call `with_sharding_constraint(x, logical_axes)`; it is a no-op unless
a mesh and rules are active (`with mesh, axis_rules(rules): ...`), so the same
modules run on a laptop CPU.
"""

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import flax.core
from jax.experimental import mesh_utils
from jax.interpreters import pxla
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from moe_jax import types

MESH_AXES = ("data", "expert", "model")

AxisRules = Sequence[Tuple[str, Union[str, Tuple[str, ...], None]]]

param_with_axes = nn_partitioning.param_with_axes
axis_rules = nn_partitioning.axis_rules


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Optional[AxisRules] = None,
) -> AxisRules:
  """Logical-to-mesh rules for the 3-D `('data', 'expert', 'model')` mesh.

  Args:
    activation_partitioning_dims: 1 shards activations over the batch only; 2
      also shards their `embed` axis over `model` (t5x's 2-D activation
      sharding, useful for very wide models).
    parameter_partitioning_dims: 1 shards parameters over `model` only; 2 also
      shards their `embed` axis over `data` (2-D parameter sharding).
    additional_rules: rules that take precedence over the defaults (the first
      rule naming a logical axis wins).

  Returns:
    A list of `(logical_axis, mesh_axes)` pairs.
  """
  if activation_partitioning_dims not in (1, 2):
    raise ValueError(
        f"activation_partitioning_dims must be 1 or 2, got "
        f"{activation_partitioning_dims}.")
  if parameter_partitioning_dims not in (1, 2):
    raise ValueError(
        f"parameter_partitioning_dims must be 1 or 2, got "
        f"{parameter_partitioning_dims}.")
  rules = [
      ("batch", ("expert", "data")),
      ("vocab", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("joined_kv", "model"),
      ("embed", "model" if activation_partitioning_dims == 2 else
       ("data" if parameter_partitioning_dims == 2 else None)),
      ("relpos_buckets", None),
      ("abspos_buckets", None),
      ("length", None),
      ("layers", None),
      ("stack", None),
      ("mlp_activations", None),
      # Mixture-of-Experts axes.
      ("expert", "expert"),
      ("expert_mlp", "model"),
      ("expert_replicas", "data"),
      ("unmodeled", None),
  ]
  return list(additional_rules or []) + rules


def create_mesh(
    data: int = -1,
    expert: int = 1,
    model: int = 1,
    devices: Optional[Sequence[jax.Device]] = None,
) -> jax.sharding.Mesh:
  """Builds a `('data', 'expert', 'model')` device mesh.

  Args:
    data: data-parallel degree; -1 takes whatever devices are left.
    expert: expert-parallel degree (experts are sharded this many ways).
    model: tensor-parallel degree.
    devices: devices to use (default: all of `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` with axis names `MESH_AXES`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if expert < 1 or model < 1:
    raise ValueError(f"expert ({expert}) and model ({model}) must be >= 1.")
  if data == -1:
    if len(devices) % (expert * model):
      raise ValueError(
          f"{len(devices)} devices cannot be split into expert={expert} x "
          f"model={model}; choose degrees whose product divides the device "
          "count.")
    data = len(devices) // (expert * model)
  if data * expert * model != len(devices):
    raise ValueError(
        f"Mesh data={data} x expert={expert} x model={model} needs "
        f"{data * expert * model} devices, but {len(devices)} are available.")
  # Topology-aware on TPU (neighbouring chips share the fast `model` axis);
  # device order elsewhere.
  device_array = mesh_utils.create_device_mesh((data, expert, model), devices)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def mesh_from_shape(shape: Optional[dict] = None,
                    devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """The mesh of a `MESH_SHAPE` dict such as `{'data': 2, 'expert': 4}`.

  Missing axes are 1, except `data`, which takes all remaining devices
  unless another axis is -1; at most one axis may be -1.
  """
  shape = dict(shape or {})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"MESH_SHAPE has unknown axes {sorted(unknown)}; use "
                     f"{list(MESH_AXES)}, e.g. {{'data': -1, 'expert': 4}}.")
  if list(shape.values()).count(-1) > 1:
    raise ValueError(f"MESH_SHAPE {shape} has more than one -1 (all remaining devices).")
  sizes = {axis: shape.get(axis, 1) for axis in MESH_AXES}
  if "data" not in shape and -1 not in shape.values():
    sizes["data"] = -1
  devices = list(jax.devices() if devices is None else devices)
  free = [axis for axis, size in sizes.items() if size == -1]
  if free:
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fixed < 1 or len(devices) % fixed:
      raise ValueError(f"MESH_SHAPE {shape}: {len(devices)} devices cannot be split into "
                       f"axes of sizes {sizes}; choose sizes whose product divides the "
                       "device count.")
    sizes[free[0]] = len(devices) // fixed
  return create_mesh(**sizes, devices=devices)


def parse_mesh_spec(spec: str) -> dict:
  """Parses 'data=2,expert=4,model=1' into `create_mesh` keyword arguments."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in MESH_AXES:
      raise ValueError(
          f"Bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE with "
          f"AXIS in {MESH_AXES}, e.g. 'data=2,expert=4,model=1'.")
    out[name] = int(value)
  return out


def active_mesh_shape() -> Dict[str, int]:
  """Axis sizes of the mesh the caller is tracing under ({} without one).

  Covers `jax.set_mesh(mesh)` (moe_jax's trainer) and the legacy
  `with mesh:` context (t5x's partitioner).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    mesh = pxla.thread_resources.env.physical_mesh
  return {} if mesh.empty else dict(mesh.shape)


def with_sharding_constraint(x: types.Array,
                             logical_axes: types.LogicalAxes) -> types.Array:
  """Constrains `x` by logical axis names; a no-op without active rules."""
  if len(logical_axes) != x.ndim:
    raise ValueError(
        f"Sharding constraint names {len(logical_axes)} axes {logical_axes} "
        f"for an array of shape {x.shape}.")
  if not nn_partitioning.get_axis_rules():
    return x
  return nn_partitioning.with_sharding_constraint(x, logical_axes)


def logical_to_mesh_sharding(
    logical_axes_tree,
    mesh: jax.sharding.Mesh,
    rules: AxisRules,
):
  """Maps a pytree of logical axes (e.g. `params_axes`) to NamedShardings."""
  names = flax.core.unfreeze(nn_partitioning.get_axis_names(logical_axes_tree))
  return nn.logical_to_mesh_sharding(names, mesh, rules)
