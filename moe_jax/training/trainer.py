"""The train state and the jit-compiled train step over a (data, expert, model) mesh.

`Trainer` places everything with NamedShardings derived from the logical
axis rules in `moe_jax.partitioning`:

  * parameters by their `params_axes` (experts over `expert`, FFN and head
    widths over `model`);
  * optimizer state like the parameter it belongs to (a leaf that mirrors a
    parameter's shape gets its sharding; factored statistics keep the
    parameter's sharding on the dimensions they keep);
  * batches over `('expert', 'data')` along the batch axis.

One step: per-step dropout key `fold_in(seed key, step)` (so a resumed run
draws the same randomness), `model.loss_fn` on each microbatch (gradients
accumulated with `lax.scan`), the optimizer update, and metrics. A step whose
loss or gradients are not finite leaves the state unchanged and reports
`finite = 0`, so the caller can stop without a corrupt state.
"""

import contextlib
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.core
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.linen import partitioning as nn_partitioning

from moe_jax import partitioning

PyTree = Any
PartitionSpec = jax.sharding.PartitionSpec
# The batch axis of every input feature is split over these mesh axes.
BATCH_SPEC = PartitionSpec(("expert", "data"))


@flax.struct.dataclass
class TrainState:
  """What a training run checkpoints (besides the data position).

  Attributes:
    step: <int32>[] steps taken so far, counting an initial checkpoint's.
    first_step: <int32>[] the step this optimizer state started at (the
      initial checkpoint's; the learning-rate schedule counts from it).
    params: the model parameters (float32).
    opt_state: the optimizer state.
  """

  step: jax.Array
  first_step: jax.Array
  params: PyTree
  opt_state: PyTree


def _path_keys(path) -> Tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
               for p in path)


def opt_state_specs(opt_state: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
  """Partition specs of the optimizer state, following the parameters.

  optax states hold trees that mirror the parameters (moments, factored
  statistics). A state leaf whose path ends with a parameter's path takes
  that parameter's spec on the dimensions it shares: all of them when the
  shapes are equal, all but the reduced one for a factored statistic. Other
  leaves (step counts, scalars) are replicated.
  """
  flat_params = {
      _path_keys(path): (leaf.shape, spec) for (path, leaf), spec in zip(
          jax.tree_util.tree_flatten_with_path(params)[0],
          jax.tree_util.tree_leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))}
  longest = max((len(k) for k in flat_params), default=0)

  def spec_of(path, leaf) -> PartitionSpec:
    keys = _path_keys(path)
    for length in range(min(longest, len(keys)), 0, -1):
      match = flat_params.get(keys[-length:])
      if match is None:
        continue
      shape, spec = match
      axes = tuple(spec) + (None,) * (len(shape) - len(spec))
      if tuple(leaf.shape) == tuple(shape):
        return PartitionSpec(*axes)
      for dropped in reversed(range(len(shape))):
        if tuple(leaf.shape) == tuple(shape[:dropped] + shape[dropped + 1:]):
          return PartitionSpec(*(axes[:dropped] + axes[dropped + 1:]))
      return PartitionSpec()
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, opt_state)


def _microbatches(batch: Mapping[str, jax.Array], count: int) -> Dict[str, jax.Array]:
  """[batch, ...] -> [count, batch / count, ...] for `lax.scan`."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"The per-step batch ({x.shape[0]} rows) does not divide into "
                       f"{count} microbatches; change NUM_MICROBATCHES or BATCH_SIZE.")
    # Row r of microbatch m is row m + r * count: every microbatch takes
    # rows from every data shard, so no microbatch lives on one device.
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


class Placement:
  """Where a model's parameters and batches live on a mesh.

  Attributes:
    model: an `EncoderDecoderModel` (t5x-shaped: `get_initial_variables`).
    mesh: a `('data', 'expert', 'model')` mesh.
    rules: logical-axis rules (`partitioning.standard_logical_axis_rules()`).
    input_shapes: per-feature global batch shapes, e.g.
      `{'encoder_input_tokens': (B, L_in), ...}` (packing features too).
  """

  def __init__(self, model: Any, mesh: jax.sharding.Mesh, rules: partitioning.AxisRules,
               input_shapes: Mapping[str, Tuple[int, ...]]):
    self.model = model
    self.mesh = mesh
    self.rules = rules
    self.input_shapes = dict(input_shapes)
    with self.context():
      variables = jax.eval_shape(self.initial_variables, jax.random.PRNGKey(0))
    self.params_axes = variables["params_axes"]
    self.logical_specs = flax.core.unfreeze(nn_partitioning.get_axis_names(self.params_axes))
    self.param_specs = jax.tree.map(
        lambda names: nn_partitioning.logical_to_mesh_axes(names, rules), self.logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))
    self.param_shardings = self.shardings(self.param_specs)
    self.abstract_params = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        variables["params"], self.param_shardings)
    self.batch_sharding = jax.sharding.NamedSharding(mesh, BATCH_SPEC)

  def shardings(self, specs: PyTree) -> PyTree:
    return jax.tree.map(lambda spec: jax.sharding.NamedSharding(self.mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))

  @contextlib.contextmanager
  def context(self):
    """The mesh and axis rules under which the model is traced."""
    with jax.set_mesh(self.mesh), partitioning.axis_rules(self.rules):
      yield

  def initial_variables(self, rng):
    return self.model.get_initial_variables(rng, self.input_shapes)


class Trainer:
  """Initialization and the jit-compiled steps of one model on a mesh.

  Attributes:
    placement: the model's `Placement`.
    optimizer: the optax transformation (freezing and clipping included),
      built by `optimizer_fn` from the parameters' logical axis names.
    num_microbatches: gradient accumulation steps within one optimizer step.
    learning_rate_fn: optional `step -> learning rate`, logged each step.
  """

  def __init__(self, placement: Placement,
               optimizer_fn: Callable[[PyTree], optax.GradientTransformation], *,
               num_microbatches: int = 1,
               learning_rate_fn: Optional[Callable[[jax.Array], jax.Array]] = None):
    if num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}.")
    self.placement = placement
    self.model = placement.model
    self.optimizer = optimizer_fn(placement.logical_specs)
    self.num_microbatches = num_microbatches
    self.learning_rate_fn = learning_rate_fn
    abstract_opt = jax.eval_shape(self.optimizer.init, placement.abstract_params)
    self.state_specs = TrainState(
        step=PartitionSpec(), first_step=PartitionSpec(), params=placement.param_specs,
        opt_state=opt_state_specs(abstract_opt, placement.abstract_params,
                                  placement.param_specs))
    self.state_shardings = placement.shardings(self.state_specs)
    self.abstract_state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                   first_step=jax.ShapeDtypeStruct((), jnp.int32),
                   params=placement.abstract_params, opt_state=abstract_opt),
        self.state_shardings)

  def context(self):
    return self.placement.context()


  @functools.cached_property
  def _jit_init(self):
    def init(rng):
      params = self.placement.initial_variables(rng)["params"]
      return TrainState(step=jnp.zeros((), jnp.int32), first_step=jnp.zeros((), jnp.int32),
                        params=params, opt_state=self.optimizer.init(params))
    return jax.jit(init, out_shardings=self.state_shardings)

  def init_state(self, rng: jax.Array) -> TrainState:
    """A freshly initialized state, placed with `state_shardings`."""
    with self.context():
      return self._jit_init(rng)

  def state_from_params(self, params: PyTree, step: int = 0) -> TrainState:
    """A state around given parameters (fresh optimizer state)."""
    with self.context():
      params = jax.device_put(params, self.state_shardings.params)
      opt_state = jax.jit(self.optimizer.init,
                          out_shardings=self.state_shardings.opt_state)(params)
    # Two arrays: the train step donates the state, each leaf once.
    return TrainState(step=jnp.asarray(step, jnp.int32), first_step=jnp.asarray(step, jnp.int32),
                      params=params, opt_state=opt_state)

  def _loss_and_grads(self, params, batch, rng):
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    if self.num_microbatches == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return metrics, grads

    def accumulate(carry, inputs):
      index, microbatch = inputs
      (_, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
      grad_sum, metric_sum = carry
      return (jax.tree.map(jnp.add, grad_sum, grads),
              jax.tree.map(jnp.add, metric_sum, metrics)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(params, jax.tree.map(lambda x: x[0], _microbatches(batch, 1)),
                        rng)[0][1])
    metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(
        accumulate, (zeros, metric_zeros),
        (jnp.arange(self.num_microbatches), _microbatches(batch, self.num_microbatches)))
    scale = 1.0 / self.num_microbatches
    return jax.tree.map(lambda m: m * scale, metrics), jax.tree.map(lambda g: g * scale, grads)

  def _train_step(self, state: TrainState, batch, seed_rng):
    rng = jax.random.fold_in(seed_rng, state.step)
    metrics, grads = self._loss_and_grads(state.params, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    # A non-finite step changes nothing, so the last good state survives.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    if self.learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(
          self.learning_rate_fn(state.step - state.first_step), jnp.float32)
    return new_state, metrics

  @functools.cached_property
  def jit_train_step(self):
    """`(state, batch, seed_rng) -> (state, metrics)`, jit with shardings; donates state."""
    return jax.jit(
        self._train_step,
        in_shardings=(self.state_shardings, self.placement.batch_sharding, None),
        out_shardings=(self.state_shardings, None),
        donate_argnums=(0,))

  def train_step(self, state: TrainState, batch, seed_rng) -> Tuple[TrainState, Dict]:
    with self.context():
      return self.jit_train_step(state, batch, seed_rng)

  def compile_train_step(self, seed_rng):
    """Lowers and compiles the train step for the configured shapes."""
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32,
                                        sharding=self.placement.batch_sharding)
             for name, shape in self.placement.input_shapes.items()}
    with self.context():
      return self.jit_train_step.lower(self.abstract_state, batch, seed_rng).compile()

  @functools.cached_property
  def jit_eval_step(self):
    """`(params, batch) -> metrics` without dropout (eval capacity factor)."""
    return jax.jit(lambda params, batch: self.model.eval_fn(params, batch)[1],
                   in_shardings=(self.state_shardings.params, self.placement.batch_sharding))

  def eval_step(self, params, batch) -> Dict[str, jax.Array]:
    with self.context():
      return self.jit_eval_step(params, batch)
