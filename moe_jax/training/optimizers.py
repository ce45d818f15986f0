"""Optimizers: Adafactor with t5x's MoE factoring, AdamW, t5x LR schedules, freezing.

An optimizer is configured (by gin) as an `OptimizerFactory`: the optax
transformation it builds depends on the parameters' logical axis names, which
only the model knows. `build` turns a factory into the training
transformation, adding parameter freezing and global-norm gradient clipping:

    factory = optimizers.adafactor(optimizers.schedule('constant', 1e-4))
    names = nn_partitioning.get_axis_names(variables['params_axes'])
    tx = optimizers.build(factory, names, freeze=('router',))

Adafactor follows t5x's `Adafactor` with `adafactor_utils.logical_factor_rules()`
(the flaxformer MoE configs): axes named `expert` (and the scan axis `layers`)
are *batch* axes, so every expert of every layer keeps its own factored second
moments, update-clipping RMS and parameter scale, exactly as if it were a
separate parameter. The remaining transformations are optax's own.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
import types
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Shape = tuple[int, ...]
# A nested mapping like the parameters whose leaves are tuples (or
# PartitionSpecs) of logical axis names, one per dimension:
# `flax.linen.partitioning.get_axis_names(variables['params_axes'])`.
AxisNames = Any

# How Adafactor treats a logical axis (t5x `adafactor.FactorDim`).
BATCH, ROW, COLUMN, NONE = "batch", "row", "column", "none"

MOE_FACTOR_RULES: Mapping[str, str] = types.MappingProxyType({
    # t5x `adafactor.standard_logical_factor_rules()`.
    "vocab": COLUMN, "embed": ROW, "mlp": COLUMN, "heads": COLUMN, "kv": COLUMN,
    "joined_kv": COLUMN, "relpos_buckets": NONE, "layers": BATCH, "stack": BATCH,
    # t5x `contrib/moe/adafactor_utils.logical_factor_rules()` on top.
    "expert": BATCH, "expert_mlp": COLUMN, "mlp_embed": ROW, "unmodeled": NONE,
})

FREEZE_GROUPS = ("router", "experts", "moe", "non_moe")
_TRAINABLE, _FROZEN = "trainable", "frozen"


def _path_str(path: Sequence[Any]) -> str:
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _flatten_names(tree: AxisNames, prefix: str = "") -> dict[str, tuple[Optional[str], ...]]:
  """`{'a': {'b': ('embed', 'mlp')}}` -> `{'a/b': ('embed', 'mlp')}`."""
  if isinstance(tree, Mapping):
    flat = {}
    for key, sub in tree.items():
      flat.update(_flatten_names(sub, f"{prefix}/{key}" if prefix else str(key)))
    return flat
  if isinstance(tree, (tuple, list, jax.sharding.PartitionSpec)):
    return {prefix: tuple(tree)}
  raise TypeError(
      f"Logical axis names of {prefix!r} must be a tuple of names, got {tree!r}; pass "
      "flax.linen.partitioning.get_axis_names(variables['params_axes']).")


# ---------------------------------------------------------------------------
# Adafactor.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SliceLayout:
  """How Adafactor sees one parameter.

  The parameter is a stack of independent *slices* indexed by its `batch`
  dims (experts, scanned layers). Each slice has its own second-moment
  statistics, update-clipping RMS and parameter scale. A slice is factored as
  the matrix `[rows] x [cols]` when `rows` (and `cols`) are non-empty, and
  otherwise keeps a full second-moment estimate.
  """

  batch: tuple[int, ...] = ()
  rows: tuple[int, ...] = ()
  cols: tuple[int, ...] = ()

  @property
  def factored(self) -> bool:
    return bool(self.rows)

  def slice_dims(self, ndim: int) -> tuple[int, ...]:
    """The dims one slice spans: the reduction dims of per-slice RMS."""
    return tuple(d for d in range(ndim) if d not in self.batch)


LayoutFn = Callable[[str, Shape], SliceLayout]


def slice_layout(kinds: Sequence[str], shape: Shape, min_dim_size_to_factor: int) -> SliceLayout:
  """The layout of a parameter of `shape` whose axes have factor `kinds`.

  Slices of rank <= 2 use optax's heuristic on the slice shape (factor the two
  dims, the smaller one as rows, when both are >= `min_dim_size_to_factor`),
  so a 2-D non-batched kernel behaves exactly as in `optax.adafactor`, and a
  scanned stack exactly as its unscanned layers. Higher-rank slices (e.g.
  attention `[embed, heads, kv]`) are factored as t5x does, by the names: the
  matrix `[row axes] x [column axes]`, when both sides have at least
  `min_dim_size_to_factor` elements.
  """
  batch = tuple(d for d, kind in enumerate(kinds) if kind == BATCH)
  inner = tuple(d for d in range(len(shape)) if d not in batch)
  if len(inner) < 2:
    return SliceLayout(batch)
  if len(inner) == 2:
    small, large = np.argsort([shape[d] for d in inner])  # optax `_factored_dims`
    if shape[inner[small]] < min_dim_size_to_factor:
      return SliceLayout(batch)
    return SliceLayout(batch, rows=(inner[small],), cols=(inner[large],))
  rows = tuple(d for d in inner if kinds[d] == ROW)
  cols = tuple(d for d in inner if kinds[d] == COLUMN)
  if not rows or not cols:
    return SliceLayout(batch)
  if len(rows) + len(cols) != len(inner):
    raise ValueError(f"Factor kinds {tuple(kinds)} mix row, column and unfactored axes "
                     "(t5x calls this an incomplete Adafactor spec).")
  if min(math.prod(shape[d] for d in rows),
         math.prod(shape[d] for d in cols)) < min_dim_size_to_factor:
    return SliceLayout(batch)
  return SliceLayout(batch, rows, cols)


def layout_fn(params_axes_names: AxisNames, factor_rules: Mapping[str, str] = MOE_FACTOR_RULES,
              min_dim_size_to_factor: int = 128) -> LayoutFn:
  """`(parameter path, shape) -> SliceLayout` from the parameters' axis names.

  Every axis name is checked against `factor_rules` now, so a model with an
  axis the rules do not cover fails when the optimizer is built.
  """
  bad_kinds = set(factor_rules.values()) - {BATCH, ROW, COLUMN, NONE}
  if bad_kinds:
    raise ValueError(f"factor_rules values must be {(BATCH, ROW, COLUMN, NONE)}, "
                     f"got {sorted(bad_kinds)}.")
  kinds = {}
  names_of = _flatten_names(params_axes_names)
  for path, names in names_of.items():
    unknown = [n for n in names if n is not None and n not in factor_rules]
    if unknown:
      raise ValueError(
          f"No Adafactor factor rule for logical axis {unknown[0]!r} of parameter {path!r} "
          f"{names}; add it to `factor_rules` (known: {sorted(factor_rules)}).")
    kinds[path] = tuple(NONE if n is None else factor_rules[n] for n in names)

  @functools.cache
  def layout_of(path: str, shape: Shape) -> SliceLayout:
    if path not in kinds:
      raise ValueError(f"Parameter {path!r} has no logical axis names; the names tree "
                       "must cover every parameter.")
    if len(kinds[path]) != len(shape):
      raise ValueError(f"Parameter {path!r} of shape {shape} has axis names for "
                       f"{len(kinds[path])} dims.")
    try:
      return slice_layout(kinds[path], shape, min_dim_size_to_factor)
    except ValueError as e:
      raise ValueError(f"Parameter {path!r} {names_of[path]}: {e}") from None

  return layout_of


def _map_with_layout(fn: Callable[..., Any], layout_of: LayoutFn, tree: PyTree,
                     *rest: PyTree) -> PyTree:
  """`fn(layout, leaf, *rest_leaves)` over `tree` (masked-out leaves skipped)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x, *r: fn(layout_of(_path_str(path), tuple(x.shape)), x, *r), tree, *rest)


class FactoredRmsState(NamedTuple):
  """State of `scale_by_sliced_factored_rms` (the layout of optax's `FactoredState`).

  `v_row`, `v_col` and `v` are trees like the parameters, each parameter's
  entry None where unused. A factored parameter has `v_row`, the mean of
  squared gradients over its column dims (its shape with `cols` removed), and
  `v_col`, the mean over its row dims (`rows` removed); batch dims stay in
  place, so an expert kernel's statistics keep the expert axis where the
  kernel has it. An unfactored parameter has `v`, of its own shape.
  """

  count: jax.Array  # <int32>[] updates applied so far.
  v_row: PyTree
  v_col: PyTree
  v: PyTree


def _drop(shape: Shape, dims: tuple[int, ...]) -> Shape:
  return tuple(s for d, s in enumerate(shape) if d not in dims)


def _unzip(structure: PyTree, tree_of_tuples: PyTree, n: int) -> list[PyTree]:
  """A tree with an n-tuple at each leaf of `structure` -> n trees."""
  return [jax.tree.map(lambda _, t: t[i], structure, tree_of_tuples) for i in range(n)]


def scale_by_sliced_factored_rms(layout_of: LayoutFn, decay_rate: float = 0.8,
                                 step_offset: int = 0,
                                 epsilon: float = 1e-30) -> optax.GradientTransformation:
  """`optax.scale_by_factored_rms`, per slice and with the factored dims of `layout_of`.

  Args:
    layout_of: `(parameter path, shape) -> SliceLayout` (see `layout_fn`).
    decay_rate: second-moment decay exponent: beta2 at update `t` (1-based,
      after `step_offset`) is `1 - t ** -decay_rate`.
    step_offset: update count at which beta2's schedule restarts.
    epsilon: added to squared gradients (t5x's epsilon1).

  Returns:
    A transformation whose state is a `FactoredRmsState`.
  """

  def init_fn(params):
    def init(layout, p):
      if layout.factored:
        return (jnp.zeros(_drop(p.shape, layout.cols), jnp.float32),
                jnp.zeros(_drop(p.shape, layout.rows), jnp.float32), None)
      return None, None, jnp.zeros(p.shape, jnp.float32)
    moments = _unzip(params, _map_with_layout(init, layout_of, params), 3)
    return FactoredRmsState(jnp.zeros([], jnp.int32), *moments)

  def update_fn(updates, state, params=None):
    del params
    # The same float32 arithmetic as optax.scale_by_factored_rms, so that
    # non-batched 2-D kernels get bit-identical updates.
    decay = 1.0 - jnp.array(state.count - step_offset + 1, jnp.float32) ** (-decay_rate)

    def update(layout, g, v_row, v_col, v):
      g_sqr = g * g + epsilon
      if layout.factored:
        v_row = decay * v_row + (1.0 - decay) * jnp.mean(g_sqr, axis=layout.cols)
        v_col = decay * v_col + (1.0 - decay) * jnp.mean(g_sqr, axis=layout.rows)
        # Row dims' positions in v_row, whose cols are removed.
        rows_in_v_row = tuple(r - sum(c < r for c in layout.cols) for r in layout.rows)
        row_factor = (v_row / jnp.mean(v_row, axis=rows_in_v_row, keepdims=True)) ** -0.5
        col_factor = v_col ** -0.5
        u = (g * jnp.expand_dims(row_factor, layout.cols)
             * jnp.expand_dims(col_factor, layout.rows))
        return u, v_row, v_col, None
      v = decay * v + (1.0 - decay) * g_sqr
      return g * v ** -0.5, None, None, v

    out = _map_with_layout(update, layout_of, updates, state.v_row, state.v_col, state.v)
    new_updates, *moments = _unzip(updates, out, 4)
    return new_updates, FactoredRmsState(optax.safe_increment(state.count), *moments)

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_slice_rms(layout_of: LayoutFn, threshold: float) -> optax.GradientTransformation:
  """`optax.clip_by_block_rms` with one RMS per slice (per expert, per layer)."""

  def update_fn(updates, state, params=None):
    del params

    def clip(layout, u):
      rms = jnp.sqrt(jnp.mean(u * u, axis=layout.slice_dims(u.ndim), keepdims=True))
      return u / jnp.maximum(1.0, rms / threshold)

    return _map_with_layout(clip, layout_of, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_slice_rms(layout_of: LayoutFn,
                             min_scale: float = 1e-3) -> optax.GradientTransformation:
  """`optax.scale_by_param_block_rms` with one parameter RMS per slice."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_param_slice_rms needs the parameters in update().")

    def scale(layout, u, p):
      rms = jnp.sqrt(jnp.mean(p * p, axis=layout.slice_dims(p.ndim), keepdims=True))
      return u * jnp.maximum(rms, min_scale)

    return _map_with_layout(scale, layout_of, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------
# Optimizer factories.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerFactory:
  """An optimizer waiting for the parameters' logical axis names.

  Attributes:
    make: `params_axes_names -> optax.GradientTransformation`.
    learning_rate: the float or `count -> rate` schedule it applies; update
      number `n` (0-based: the optimizer state's count) uses `learning_rate(n)`.
    kind: the optimizer family, as `moe_jax.describe` counts state memory
      ('adafactor' or 'adam').
  """

  make: Callable[[AxisNames], optax.GradientTransformation]
  learning_rate: optax.ScalarOrSchedule
  kind: str

  def __call__(self, params_axes_names: AxisNames) -> optax.GradientTransformation:
    return self.make(params_axes_names)


def learning_rate_fn(factory: OptimizerFactory) -> optax.Schedule:
  """`step -> <float32>[]` learning rate of `factory`, for logging."""
  lr = factory.learning_rate
  if callable(lr):
    return lambda step: jnp.asarray(lr(step), jnp.float32)
  return lambda step: jnp.asarray(lr, jnp.float32)


def kind(factory: OptimizerFactory) -> str:
  """The optimizer family of `factory` ('adafactor' or 'adam')."""
  return factory.kind


def adafactor(learning_rate: optax.ScalarOrSchedule, *, decay_rate: float = 0.8,
              step_offset: int = 0, clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30, epsilon2: float = 1e-3,
              momentum: Optional[float] = None, weight_decay_rate: Optional[float] = None,
              factor_rules: Mapping[str, str] = MOE_FACTOR_RULES) -> OptimizerFactory:
  """Adafactor with the t5x / flaxformer MoE defaults.

  `optax.adafactor`'s chain (factored RMS scaling, update clipping, learning
  rate, parameter scale, momentum, weight decay), with per-slice statistics:
  axes that `factor_rules` maps to 'batch' (`expert`, `layers`, `stack`)
  split a parameter into slices treated as separate parameters (see
  `slice_layout`). Parameters without batch axes, rank <= 2, are updated
  bit-identically to `optax.adafactor` with the same hyperparameters (whose
  parameter-scale floor is fixed at `epsilon2`'s default, 1e-3).

  State for an expert kernel `wi` `[E, d, f]` ('expert', 'embed',
  'expert_mlp') with `d <= f`, both >= `min_dim_size_to_factor`:
  `FactoredRmsState` entries `v_row` `[E, d]` and `v_col` `[E, f]` (per-expert
  row and column means of squared gradients, expert axis leading like the
  kernel); with a smaller dim, `v` `[E, d, f]` instead. `momentum` adds an
  optax `EmaState.ema` `[E, d, f]`. Scalars: the factored-RMS count (and the
  schedule's count when `learning_rate` is a schedule).

  Args:
    learning_rate: a float or a schedule (e.g. `schedule(...)`).
    decay_rate: second-moment decay exponent (beta2_t = 1 - t^-decay_rate).
    step_offset: update count at which the second-moment schedule restarts.
    clipping_threshold: per-slice update RMS clipping (None: off).
    multiply_by_parameter_scale: scale updates by each slice's parameter RMS.
    min_dim_size_to_factor: factor only slices whose two sides are this large.
    epsilon1: added to squared gradients.
    epsilon2: floor of the parameter scale.
    momentum: optional beta1 (an extra parameter-sized state).
    weight_decay_rate: optional decoupled weight decay (not scaled by the LR).
    factor_rules: logical axis name -> 'batch' | 'row' | 'column' | 'none'.
  """

  def make(params_axes_names: AxisNames) -> optax.GradientTransformation:
    layout_of = layout_fn(params_axes_names, factor_rules, min_dim_size_to_factor)
    chain = [scale_by_sliced_factored_rms(layout_of, decay_rate, step_offset, epsilon1)]
    if clipping_threshold is not None:
      chain.append(clip_by_slice_rms(layout_of, clipping_threshold))
    chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
      chain.append(scale_by_param_slice_rms(layout_of, epsilon2))
    if momentum is not None:
      chain.append(optax.ema(momentum, debias=False))
    if weight_decay_rate is not None:
      chain.append(optax.add_decayed_weights(weight_decay_rate))
    chain.append(optax.scale(-1))
    return optax.chain(*chain)

  return OptimizerFactory(make, learning_rate, "adafactor")


def adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-4) -> OptimizerFactory:
  """`optax.adamw` (decay applied to every parameter); state `mu`, `nu` per parameter."""

  def make(params_axes_names: AxisNames) -> optax.GradientTransformation:
    del params_axes_names  # Adam's statistics are elementwise.
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  return OptimizerFactory(make, learning_rate, "adam")


# ---------------------------------------------------------------------------
# Learning-rate schedules.
# ---------------------------------------------------------------------------

SCHEDULE_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay",
                    "decay_every", "cosine_decay")


def schedule(factors: str = "constant * rsqrt_decay", base_learning_rate: float = 1.0,
             warmup_steps: int = 10000, decay_factor: float = 0.5,
             steps_per_decay: int = 20000, steps_per_cycle: int = 100000,
             min_learning_rate: float = 1e-8) -> optax.Schedule:
  """t5x's `utils.create_learning_rate_scheduler`: a product of named factors.

  Factors: `constant` (base_learning_rate), `linear_warmup`
  (min(1, step / warmup_steps)), `rsqrt_decay` (1 / sqrt(max(step,
  warmup_steps))), `rsqrt_normalized_decay` (rsqrt_decay * sqrt(warmup_steps)),
  `decay_every` (decay_factor ** (step // steps_per_decay)), `cosine_decay`
  (cyclic: 0.5 * (1 + cos(pi * (progress % 1))), progress = max(0, step -
  warmup_steps) / steps_per_cycle). The product is floored at
  `min_learning_rate`.

  Returns:
    `step -> <float32>[]`, usable as any `learning_rate` argument.
  """
  names = [name.strip() for name in factors.split("*")]
  unknown = [name for name in names if name not in SCHEDULE_FACTORS]
  if unknown:
    raise ValueError(f"Unknown learning-rate factor(s) {unknown} in {factors!r}; "
                     f"factors are {SCHEDULE_FACTORS}, joined by '*'.")
  if warmup_steps <= 0 and {"linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay"} & set(names):
    raise ValueError(f"{factors!r} divides by warmup_steps, which must be > 0 "
                     f"(got {warmup_steps}).")

  def step_fn(step):
    rate = 1.0
    for name in names:
      if name == "constant":
        rate *= base_learning_rate
      elif name == "linear_warmup":
        rate *= jnp.minimum(1.0, step / warmup_steps)
      elif name == "rsqrt_decay":
        rate /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == "rsqrt_normalized_decay":
        rate *= jnp.sqrt(warmup_steps) / jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == "decay_every":
        rate *= decay_factor ** (step // steps_per_decay)
      else:  # cosine_decay
        progress = jnp.maximum(0.0, (step - warmup_steps) / steps_per_cycle)
        rate *= 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0)))
    return jnp.asarray(jnp.maximum(rate, min_learning_rate), jnp.float32)

  return step_fn


# ---------------------------------------------------------------------------
# Freezing and the training transformation.
# ---------------------------------------------------------------------------


def _in_group(path: str, group: str) -> bool:
  parts = path.split("/")
  router, experts = "router" in parts, "expert" in parts
  return {"router": router, "experts": experts, "moe": router or experts,
          "non_moe": not (router or experts)}[group]


def _freeze_groups(freeze: Union[str, Sequence[str]], paths: Sequence[str]) -> tuple[str, ...]:
  """Validated freeze groups (a single name may be given as a string)."""
  groups = (freeze,) if isinstance(freeze, str) else tuple(freeze)
  for group in groups:
    if group not in FREEZE_GROUPS:
      raise ValueError(
          f"Unknown freeze group {group!r}; choose from {FREEZE_GROUPS}: 'router' "
          "(paths with a 'router' component), 'experts' (an 'expert' component), "
          "'moe' (either), 'non_moe' (everything else).")
    if not any(_in_group(path, group) for path in paths):
      what = ("no parameter path has a 'router' or 'expert' component (a dense model?)"
              if group != "non_moe" else "every parameter is a router or expert parameter")
      raise ValueError(f"Freeze group {group!r} matches no parameter: {what}.")
  if groups and all(any(_in_group(path, g) for g in groups) for path in paths):
    raise ValueError(f"freeze={groups} freezes every parameter; nothing would train.")
  return groups


def build(factory: OptimizerFactory, params_axes_names: AxisNames, *,
          freeze: Union[str, Sequence[str]] = (),
          grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """The training transformation: `factory`'s optimizer on the trainable parameters.

  Args:
    factory: from `adafactor(...)` or `adamw(...)`.
    params_axes_names: the parameters' logical axis names
      (`flax.linen.partitioning.get_axis_names(variables['params_axes'])`).
    freeze: groups of `FREEZE_GROUPS` to keep fixed (the Flan-MoE ablations),
      matched on '/'-joined parameter paths. Frozen parameters get exactly
      zero updates and no optimizer state (`optax.partition` masks them out
      of the optimizer, leaving `optax.MaskedNode`s in its state).
    grad_clip_norm: clip the trainable gradients to this global norm before
      the optimizer (t5x's `global_norm_clip_threshold`; None: off).

  Returns:
    An `optax.GradientTransformation`; `update` needs `params`.
  """
  paths = list(_flatten_names(params_axes_names))
  groups = _freeze_groups(freeze, paths)
  tx = factory(params_axes_names)
  if grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  if not groups:
    return tx

  def labels(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _FROZEN if any(_in_group(_path_str(path), g) for g in groups)
        else _TRAINABLE, tree)

  return optax.partition({_TRAINABLE: tx, _FROZEN: optax.set_to_zero()}, labels)
