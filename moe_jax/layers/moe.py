"""MoeLayer: a sparse feed-forward block (groups, capacity, router, dispatch, experts).

A batch's path through the layer (`MoeLayer.__call__`):

  tokens [batch, length, embed]
    -> groups [groups, group_size, embed]            (padded, never truncated)
    -> route: routing decision + losses               (float32)
    -> dispatch -> experts -> combine                 (one strategy of
       `dispatch.STRATEGIES`, resolved once per call by `dispatch.resolve`;
       the experts: one (gated) FFN per expert, in self.dtype)
    -> metrics (sown)
    -> [batch, length, embed]

Losses and metrics are sown into the `intermediates` collection under the
names t5x's `MoeEncoderDecoderModel` reads (`auxiliary_loss`, `router_z_loss`,
`fraction_tokens_left_behind`, `expert_usage`, `router_confidence`), plus
`expert_fraction`, the per-expert share of routed assignments.

Expert parallelism: with a mesh whose `expert` axis shards experts (rules in
`moe_jax.partitioning`), the expert buffer `[groups, experts, capacity, embed]`
is constrained from group sharding (`batch`) to expert sharding (`expert`),
which GSPMD lowers to an all-to-all, as in GShard
(https://arxiv.org/abs/2006.16668).
"""

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax import tuning
from moe_jax import types
from moe_jax.layers import dense
from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import grouped_matmul
from moe_jax.layers import routing

MOE_METRICS = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind",
               "expert_usage", "router_confidence", "expert_fraction")
DROPLESS_BACKENDS = ("auto", "ragged", "overflow")


def _per_expert_init(init: types.Initializer) -> types.Initializer:
  """Initializes `[experts, ...]` as independent per-expert kernels.

  Fan-in based initializers would otherwise count the expert axis as a
  receptive field and shrink the scale by sqrt(experts).
  """
  def init_fn(rng, shape, dtype=jnp.float32):
    keys = jax.random.split(rng, shape[0])
    return jax.vmap(lambda key: init(key, shape[1:], dtype))(keys)
  return init_fn


@flax.struct.dataclass
class ExpertWeights:
  """The stacked weights of all experts, in the computation dtype.

  Attributes:
    wi: one `[experts, embed, expert_mlp]` kernel per activation.
    wo: `[experts, expert_mlp, embed]`.
    bi: optional `[experts, expert_mlp]` biases, one per activation.
    bo: optional `[experts, embed]` bias.
  """

  wi: Tuple[types.Array, ...]
  wo: types.Array
  bi: Optional[Tuple[types.Array, ...]] = None
  bo: Optional[types.Array] = None


class Experts(nn.Module):
  """Parameters of `num_experts` independent (gated) FFNs, stacked.

  Parameters (logical axes in parentheses): `wi` or `wi_0`, `wi_1`, ...
  `[experts, embed, expert_mlp]` ('expert', 'embed', 'expert_mlp') and `wo`
  `[experts, expert_mlp, embed]`; with `use_bias`, `*_bias`. Calling the module
  returns the weights; `apply_experts` computes with them (a pure function, so
  it can run inside `lax.cond`).

  Attributes:
    num_experts: number of experts.
    mlp_dim: hidden width of each expert.
    activations: as in `dense.MlpBlock` (one input kernel per activation).
    use_bias: whether projections carry biases.
    dtype: computation dtype (parameters stay float32).
    kernel_init: initializer of one expert's kernel.
  """

  num_experts: int
  mlp_dim: int
  activations: Sequence[dense.Activation] = ("gelu", "linear")
  use_bias: bool = False
  dtype: types.DType = jnp.float32
  kernel_init: types.Initializer = dense.default_kernel_init

  @nn.compact
  def __call__(self, embed_dim: int) -> ExpertWeights:
    init = _per_expert_init(self.kernel_init)
    names = ["wi"] if len(self.activations) == 1 else [
        f"wi_{i}" for i in range(len(self.activations))]
    wi = tuple(
        partitioning.param_with_axes(
            name, init, (self.num_experts, embed_dim, self.mlp_dim), jnp.float32,
            axes=("expert", "embed", "expert_mlp")).astype(self.dtype)
        for name in names)
    wo = partitioning.param_with_axes(
        "wo", init, (self.num_experts, self.mlp_dim, embed_dim), jnp.float32,
        axes=("expert", "expert_mlp", "embed")).astype(self.dtype)
    if not self.use_bias:
      return ExpertWeights(wi=wi, wo=wo)
    bi = tuple(
        partitioning.param_with_axes(
            f"{name}_bias", nn.initializers.zeros, (self.num_experts, self.mlp_dim),
            jnp.float32, axes=("expert", "expert_mlp")).astype(self.dtype)
        for name in names)
    bo = partitioning.param_with_axes(
        "wo_bias", nn.initializers.zeros, (self.num_experts, embed_dim),
        jnp.float32, axes=("expert", "embed")).astype(self.dtype)
    return ExpertWeights(wi=wi, wo=wo, bi=bi, bo=bo)


def apply_experts(
    weights: ExpertWeights,
    x: types.Array,
    activations: Sequence[dense.Activation],
    *,
    group_sizes: Optional[types.Array] = None,
    row_expert: Optional[types.Array] = None,
    block_expert: Optional[types.Array] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[types.PRNGKey] = None,
    grouped_matmul_implementation: str = "xla",
) -> types.Array:
  """Runs every expert on its rows.

  Args:
    weights: the experts' weights.
    x: `[experts, tokens, embed]`, row block e going to expert e (batched
      matmuls); with `group_sizes`, `[rows, embed]` sorted by expert with
      `group_sizes[e]` rows for expert e (grouped matmul, `jax.lax.ragged_dot`);
      with `block_expert`, `[blocks, block_size, embed]`, block b going to
      expert `block_expert[b]` (batched matmuls against gathered weights).
    activations: as in `dense.MlpBlock`.
    group_sizes: <int32>[experts] for the grouped layout.
    row_expert: <int32>[rows] expert of each row (grouped layout with biases).
    block_expert: <int32>[blocks] for the block layout.
    dropout_rate: expert dropout on the hidden activations.
    dropout_rng: key for the dropout mask; None disables dropout.
    grouped_matmul_implementation: `grouped_matmul.gmm`'s (concrete)
      implementation for the grouped layout.

  Returns:
    Expert outputs shaped like `x`.
  """
  if block_expert is not None:
    # Blocks of one expert are adjacent, so each weight gather is a slice copy.
    project = lambda a, w: jnp.einsum("nbi,nio->nbo", a, jnp.take(w, block_expert, axis=0))
    expand = lambda b: jnp.take(b, block_expert, axis=0)[:, None, :]
  elif group_sizes is None:
    project = lambda a, w: jnp.einsum("eti,eio->eto", a, w)
    expand = lambda b: b[:, None, :]  # [experts, 1, features]
  else:
    project = lambda a, w: grouped_matmul.gmm(
        a, w, group_sizes, implementation=grouped_matmul_implementation)
    expand = lambda b: jnp.take(b, row_expert, axis=0)
  dropout = None
  if dropout_rng is not None and dropout_rate > 0:
    def dropout(h):
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, h.shape)
      return jnp.where(keep, h / (1.0 - dropout_rate), jnp.zeros((), h.dtype))
  return dense.mlp_forward(
      x.astype(weights.wo.dtype), weights.wi, weights.wo, activations, project=project,
      bi=None if weights.bi is None else [expand(b) for b in weights.bi],
      bo=None if weights.bo is None else expand(weights.bo),
      dropout=dropout)


def experts_on_buffer(weights: ExpertWeights, buffer: types.Array,
                      activations: Sequence[dense.Activation], *,
                      dropout_rate: float = 0.0,
                      dropout_rng: Optional[types.PRNGKey] = None) -> types.Array:
  """Runs the experts on `[groups, experts, capacity, embed]`, expert-parallel.

  Moving the buffer from group sharding (`batch`) to expert sharding
  (`expert`) and back is the all-to-all of expert parallelism.
  """
  groups, num_experts, capacity, embed = buffer.shape
  buffer = partitioning.with_sharding_constraint(
      buffer, ("batch", "unmodeled", "length", "embed"))
  # [groups, experts, capacity, embed] -> [experts, groups, capacity, embed]
  buffer = jnp.swapaxes(buffer, 0, 1)
  buffer = partitioning.with_sharding_constraint(
      buffer, ("expert", "expert_replicas", "length", "embed"))
  # -> [experts, groups * capacity, embed]
  out = apply_experts(weights, buffer.reshape(num_experts, groups * capacity, embed),
                      activations, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  out = out.reshape(num_experts, groups, capacity, embed)
  out = partitioning.with_sharding_constraint(
      out, ("expert", "expert_replicas", "length", "embed"))
  # -> [groups, experts, capacity, embed]
  out = jnp.swapaxes(out, 0, 1)
  return partitioning.with_sharding_constraint(
      out, ("batch", "unmodeled", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class LayerExperts:
  """The experts of one layer call, as `dispatch.Experts` (strategies call it).

  Attributes:
    weights: the experts' weights.
    activations: as in `dense.MlpBlock`.
    dropout_rate: expert dropout rate.
    dropout_rng: key of the dropout masks; None disables dropout.
    implementation: the concrete grouped matmul of `on_rows` (row strategies).
  """

  weights: ExpertWeights
  activations: Sequence[dense.Activation]
  dropout_rate: float = 0.0
  dropout_rng: Optional[types.PRNGKey] = None
  implementation: Optional[str] = None

  def on_buffers(self, buffer: types.Array) -> types.Array:
    return experts_on_buffer(self.weights, buffer, self.activations,
                             dropout_rate=self.dropout_rate, dropout_rng=self.dropout_rng)

  def on_rows(self, rows, group_sizes, row_expert) -> types.Array:
    return apply_experts(self.weights, rows, self.activations, group_sizes=group_sizes,
                         row_expert=row_expert, dropout_rate=self.dropout_rate,
                         dropout_rng=self.dropout_rng,
                         grouped_matmul_implementation=self.implementation)

  def on_blocks(self, blocks, block_expert) -> types.Array:
    # The overflow pass's own dropout stream, apart from the buffers'.
    rng = None if self.dropout_rng is None else jax.random.fold_in(self.dropout_rng, 1)
    return apply_experts(self.weights, blocks, self.activations, block_expert=block_expert,
                         dropout_rate=self.dropout_rate, dropout_rng=rng)


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts feed-forward layer.

  Attributes:
    num_experts: number of experts E.
    router: a `routing.Router` module (TokensChooseRouter, GShardTop2Router,
      ExpertChoiceRouter); the layer adopts it as its `router/` child, so gin
      may build it anywhere.
    expert_mlp_dim: hidden width of each expert.
    activations: expert activations, e.g. ('gelu', 'linear') for gated GELU
      or ('relu',) for Switch-Base's plain FFN.
    expert_dropout_rate: dropout inside each expert's MLP (train only);
      Switch fine-tuning uses a higher rate here than in the rest of the
      model.
    use_bias: biases in the expert projections (T5 has none).
    max_group_size: tokens are routed in groups of at most this many. Group
      count G = ceil(tokens / max_group_size), rounded up to a multiple of the
      batch's shards (the mesh's `data` x `expert` devices, so every device
      holds whole groups; without a mesh the expert-parallel degree); tokens
      are padded to fill G equal groups (the padding is never routed and is
      sliced off the output).
    num_groups: fixes G instead (must divide by the expert-parallel degree).
    group_by_sequence: make every sequence (batch row) its own group, whatever
      its length, as Hugging Face's Switch Transformers does; needed to
      reproduce those checkpoints' token dropping exactly.
    train_capacity_factor / eval_capacity_factor: per-group expert capacity
      C = max(round(cf * group_size / E), min_expert_capacity) (x k with
      `capacity_scales_with_k`), capped at the group size. Training uses the
      first (when `enable_dropout`), evaluation and decoding the second.
    min_expert_capacity: lower bound of C.
    expert_capacity: if set, C is exactly this (capped at the group size),
      ignoring the capacity factors: Hugging Face Switch checkpoints use a
      fixed capacity per sequence.
    capacity_scales_with_k: multiply C by the router's k. Off by default, as
      in the reference (Mesh-TF / flaxformer), where top-2 routers share a
      top-1 sized buffer and second choices drop first.
    dispatch: 'einsum', 'sorted' or 'dropless' (see `moe_jax.layers.dispatch`).
      All three give the same outputs for the same routing decisions;
      'dropless' keeps every assignment and is for token-choice routers only.
    dropless_backend: how 'dropless' runs the experts. 'ragged': grouped
      matmuls over all assignments sorted by expert (`grouped_matmul.gmm`:
      XLA's ragged_dot on TPU, jax's Mosaic GPU grouped kernels on Hopper
      GPUs in bfloat16, our OpenBLAS kernels on a single-device CPU in
      float32). 'overflow': 'sorted' dispatch at the configured
      capacity (batched matmuls, the same all-to-all), plus, only when some
      expert's load exceeds it, the excess as rows sorted by expert in blocks
      of one expert. This is the path without a grouped kernel: XLA:CPU (and
      XLA:GPU without one) lowers ragged_dot to a dense matmul against every
      expert (E/k times the work). 'auto': where a grouped kernel applies
      (TPU, Mosaic GPU, CPU BLAS) the faster of ragged and overflow, measured
      on a single device (`moe_jax.tuning`; static rule: ragged), else
      overflow.
    grouped_matmul_implementation: `grouped_matmul.gmm`'s implementation
      for 'ragged' ('auto', 'xla', 'mosaic_gpu' or 'cpu_blas'). With
      'cpu_blas', 'sorted' runs its kept assignments as exact rows on those
      kernels instead of padded capacity buffers: the same assignments, no
      padding. With 'auto' on a single-device CPU in float32, 'sorted' runs
      whichever of the two is faster here, measured once per shape and
      environment (`moe_jax.tuning`; `MOE_JAX_TUNING=static` takes the rows).
      See `dispatch.candidates` for every rule; explicit settings are never
      overridden.
    num_expert_partitions: expert-parallel degree; must divide
      `num_experts`. Leave it unset: it is then the size of the `expert`
      axis of the mesh the layer is traced under (1 without a mesh), so the
      mesh alone decides it. Set, it must agree with that mesh.
    dtype: expert computation dtype (router math is always float32).
    kernel_init: initializer of each expert's kernels.
  """

  num_experts: int
  router: routing.Router
  expert_mlp_dim: int = 2048
  activations: Sequence[dense.Activation] = ("gelu", "linear")
  expert_dropout_rate: float = 0.0
  use_bias: bool = False
  max_group_size: int = 4096
  num_groups: Optional[int] = None
  group_by_sequence: bool = False
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  expert_capacity: Optional[int] = None
  capacity_scales_with_k: bool = False
  dispatch: str = "sorted"
  dropless_backend: str = "auto"
  grouped_matmul_implementation: str = "auto"
  num_expert_partitions: Optional[int] = None
  dtype: types.DType = jnp.float32
  kernel_init: types.Initializer = dense.default_kernel_init

  def setup(self):
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
    if self.dispatch not in dispatch_lib.DISPATCH_MODES:
      raise ValueError(
          f"Unknown dispatch {self.dispatch!r}; choose one of "
          f"{dispatch_lib.DISPATCH_MODES}.")
    if self.dropless_backend not in DROPLESS_BACKENDS:
      raise ValueError(
          f"Unknown dropless_backend {self.dropless_backend!r}; choose one of "
          f"{DROPLESS_BACKENDS}.")
    if self.grouped_matmul_implementation not in grouped_matmul.IMPLEMENTATIONS:
      raise ValueError(
          f"Unknown grouped_matmul_implementation "
          f"{self.grouped_matmul_implementation!r}; choose one of "
          f"{grouped_matmul.IMPLEMENTATIONS}.")
    if not isinstance(self.router, routing.Router):
      raise ValueError(
          f"router must be a moe_jax.layers.routing.Router module (e.g. "
          f"TokensChooseRouter(), GShardTop2Router(), ExpertChoiceRouter()), got "
          f"{type(self.router).__name__}.")
    if self.dispatch == "dropless" and isinstance(self.router, routing.ExpertChoiceRouter):
      raise ValueError(
          "Expert choice has a fixed capacity by construction; use "
          "dispatch='einsum' or 'sorted' with ExpertChoiceRouter.")
    partitions = self.expert_partitions
    if partitions < 1 or self.num_experts % partitions:
      raise ValueError(
          f"num_experts={self.num_experts} must be divisible by "
          f"num_expert_partitions={partitions} (the mesh's expert axis); change "
          "the number of experts or the mesh's 'expert' size.")
    if self.num_groups is not None and (self.num_groups < 1 or self.num_groups % partitions):
      raise ValueError(
          f"num_groups={self.num_groups} must be a positive multiple of the "
          f"expert-parallel degree num_expert_partitions={partitions}, "
          "so that every expert shard receives whole groups; change num_groups or "
          "leave it unset to derive it from max_group_size.")
    if self.group_by_sequence and self.num_groups is not None:
      raise ValueError("Set either group_by_sequence or num_groups, not both.")
    if self.expert_capacity is not None and self.expert_capacity < 1:
      raise ValueError(f"expert_capacity must be >= 1, got {self.expert_capacity}.")
    if self.max_group_size < 1:
      raise ValueError(f"max_group_size must be >= 1, got {self.max_group_size}.")
    if not 0.0 <= self.expert_dropout_rate < 1.0:
      raise ValueError(
          f"expert_dropout_rate must be in [0, 1), got {self.expert_dropout_rate}.")
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
    self.router.validate(self.num_experts)
    # Adopt the router as `router/` even when it was built inside a parent's
    # compact method (as gin does), which would otherwise make it the
    # parent's child.
    self._router = (self.router if self.router.parent is self
                    else self.router.clone(parent=self, name="router"))
    self.expert = Experts(
        num_experts=self.num_experts, mlp_dim=self.expert_mlp_dim,
        activations=self.activations, use_bias=self.use_bias, dtype=self.dtype,
        kernel_init=self.kernel_init)

  @property
  def num_selected_experts(self) -> int:
    """k: experts per token (1 for expert choice, whose k varies per token)."""
    return getattr(self.router, "num_selected_experts", 1)

  @property
  def expert_partitions(self) -> int:
    """The expert-parallel degree: the mesh's `expert` axis (see the field)."""
    mesh_degree = partitioning.active_mesh_shape().get("expert")
    if self.num_expert_partitions is None:
      return mesh_degree or 1
    if mesh_degree is not None and mesh_degree != self.num_expert_partitions:
      raise ValueError(
          f"MoeLayer.num_expert_partitions={self.num_expert_partitions} disagrees with "
          f"the mesh's expert axis ({mesh_degree} devices); leave it unset (the mesh "
          "decides) or change MESH_SHAPE.")
    return self.num_expert_partitions

  def group_shape(self, batch: int, length: int) -> Tuple[int, int]:
    """(num_groups, group_size) for a `[batch, length]` batch of tokens."""
    if self.group_by_sequence:
      return batch, length
    num_tokens = batch * length
    groups = self.num_groups
    if groups is None:
      mesh = partitioning.active_mesh_shape()
      shards = (mesh.get("data", 1) * mesh.get("expert", 1) if mesh
                else self.expert_partitions)
      groups = math.ceil(num_tokens / self.max_group_size)
      groups = math.ceil(groups / shards) * shards
    return groups, math.ceil(num_tokens / groups)

  def capacity(self, group_size: int, *, train: bool) -> int:
    """Per-group capacity C of each expert (the reference rule)."""
    if self.expert_capacity is not None:
      return min(self.expert_capacity, group_size)
    factor = self.train_capacity_factor if train else self.eval_capacity_factor
    if self.capacity_scales_with_k:
      factor *= self.num_selected_experts
    capacity = max(int(round(factor * group_size / self.num_experts)),
                   self.min_expert_capacity)
    return min(capacity, group_size)

  def __call__(self, inputs: types.Array, *, enable_dropout: bool = False,
               padding_mask: Optional[types.Array] = None) -> types.Array:
    """Applies the layer.

    Args:
      inputs: <float>[batch, length, embed].
      enable_dropout: training mode (expert dropout, router jitter, GShard's
        random policy, the train capacity factor).
      padding_mask: optional <bool>[batch, length], True for real tokens; used
        by routers with `ignore_padding_tokens`.

    Returns:
      <float>[batch, length, embed] in the dtype of `inputs`.
    """
    batch, length, embed = inputs.shape
    num_tokens = batch * length
    groups, group_size = self.group_shape(batch, length)
    pad = groups * group_size - num_tokens
    x = partitioning.with_sharding_constraint(inputs, ("batch", "length", "embed"))
    # [batch, length, embed] -> [tokens (+ pad), embed] -> [groups, group_size, embed]
    x = jnp.pad(x.reshape(num_tokens, embed), ((0, pad), (0, 0)))
    x = x.reshape(groups, group_size, embed)
    x = partitioning.with_sharding_constraint(x, ("batch", "length", "embed"))
    group_padding = (jnp.arange(groups * group_size) >= num_tokens).reshape(groups, group_size)
    if padding_mask is not None:
      padding_mask = jnp.pad(padding_mask.reshape(num_tokens), (0, pad)).reshape(
          groups, group_size)

    capacity = self.capacity(group_size, train=enable_dropout)
    # Route -> dispatch -> experts -> combine -> metrics.
    decision = self._router(
        x, num_experts=self.num_experts, expert_capacity=capacity,
        group_padding=group_padding, padding_mask=padding_mask,
        enable_dropout=enable_dropout)
    plan = self.dispatch_plan(inputs.shape, inputs.dtype, train=enable_dropout)
    experts = LayerExperts(
        weights=self.expert(embed), activations=self.activations,
        dropout_rate=self.expert_dropout_rate,
        dropout_rng=(self.make_rng("dropout")
                     if enable_dropout and self.expert_dropout_rate > 0 else None),
        implementation=plan.implementation)
    result = dispatch_lib.STRATEGIES[plan.strategy](
        x.astype(self.dtype), decision, experts, capacity)
    self._sow_metrics(decision, result.kept, result.slots)
    # [groups, group_size, embed] -> [batch, length, embed]
    y = result.output.reshape(groups * group_size, embed)[:num_tokens]
    y = partitioning.with_sharding_constraint(y.reshape(batch, length, embed),
                                              ("batch", "length", "embed"))
    return y.astype(inputs.dtype)

  def dispatch_plan(self, input_shape: Sequence[int], input_dtype: types.DType = jnp.float32,
                    *, train: bool) -> dispatch_lib.Plan:
    """The strategy this layer runs on `<input_dtype>[batch, length, embed]`.

    Resolved from the settings, the router, the device count and the dtype
    (`dispatch.resolve`). Where several strategies can run, the fastest here,
    measured once per shape and environment and cached (`moe_jax.tuning`);
    during `init` the static rule (parameters do not depend on it).
    """
    batch, length, embed = input_shape
    groups, group_size = self.group_shape(batch, length)
    capacity = self.capacity(group_size, train=train)

    def choose(plans: Sequence[dispatch_lib.Plan]) -> dispatch_lib.Plan:
      problem = {
          "name": (f"MoeLayer {self.dispatch} E={self.num_experts} "
                   f"k={self.num_selected_experts} groups={groups}x{group_size} "
                   f"C={capacity} embed={embed} mlp={self.expert_mlp_dim}"),
          "layer": "MoeLayer", "dispatch": self.dispatch,
          "candidates": [plan.name for plan in plans],
          "router": type(self.router).__name__, "num_experts": self.num_experts,
          "k": self.num_selected_experts, "groups": groups, "group_size": group_size,
          "capacity": capacity, "embed": embed, "expert_mlp_dim": self.expert_mlp_dim,
          "activations": [str(a) for a in self.activations], "use_bias": self.use_bias,
          "dtype": jnp.dtype(self.dtype).name, "input_dtype": jnp.dtype(input_dtype).name,
          "train": train, "expert_dropout_rate": self.expert_dropout_rate if train else 0.0,
      }
      builders = self._timing_steps(plans, tuple(input_shape), input_dtype, train)
      choice = tuning.choose(problem, builders, static=plans[0].name).choice
      return next(plan for plan in plans if plan.name == choice)

    initializing = self.scope is not None and self.is_initializing()
    return dispatch_lib.resolve(
        dispatch=self.dispatch, dropless_backend=self.dropless_backend,
        grouped_matmul_implementation=self.grouped_matmul_implementation,
        expert_choice=isinstance(self.router, routing.ExpertChoiceRouter),
        num_expert_partitions=self.expert_partitions, dtype=self.dtype,
        embed=embed, expert_mlp_dim=self.expert_mlp_dim,
        choose=None if initializing else choose)

  def _timing_steps(self, plans: Sequence[dispatch_lib.Plan], input_shape: Tuple[int, ...],
                    input_dtype: types.DType, train: bool) -> Dict[str, tuning.Builder]:
    """Builders of jit(value_and_grad) of this layer forced to each plan.

    Forward and backward (parameters and inputs) of sum(outputs) + the
    auxiliary losses on random inputs of the real shape, as in training. The
    plans share one set of parameters and inputs (the parameters do not
    depend on the plan). Everything runs in tuning's worker thread: no array
    may be made in the caller's, which may be tracing.
    """
    layers = {plan.name: self.clone(parent=None, name=None,
                                    **dispatch_lib.explicit_fields(plan)) for plan in plans}
    shared = {}

    def rngs():
      return {name: jax.random.PRNGKey(i)
              for i, name in enumerate(("params", "dropout", "jitter", "gating"))}

    def inputs():
      if not shared:
        layer = next(iter(layers.values()))
        shared["x"] = jax.random.normal(jax.random.PRNGKey(0), input_shape, input_dtype)
        shared["params"] = jax.jit(lambda x: layer.init(rngs(), x, enable_dropout=train))(
            shared["x"])["params"]
      return shared["params"], shared["x"]

    def builder(layer) -> tuning.Builder:
      def build() -> tuning.Step:
        params, x = inputs()

        def loss(params, x):
          y, state = layer.apply({"params": params}, x, enable_dropout=train, rngs=rngs(),
                                 mutable=["intermediates"])
          metrics = collect_moe_metrics(state["intermediates"])
          return (jnp.sum(y.astype(jnp.float32)) + metrics["auxiliary_loss"]
                  + metrics["router_z_loss"])

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return lambda: step(params, x)
      return build

    return {name: builder(layer) for name, layer in layers.items()}

  def _sow_metrics(self, decision, kept, slots) -> None:
    """Sows the losses and the load/drop metrics (float32 scalars).

    `expert_usage` is the filled share of the expert slots: of the capacity
    `groups * experts * C` for capacity dispatch (as in the reference) and
    CPU dropless (whose overflow can push it past 1), 1 for ragged dropless.
    """
    token_mask = decision.token_mask
    num_real = jnp.maximum(jnp.sum(token_mask), 1)
    if isinstance(decision, routing.ExpertChoiceDecision):
      groups, group_size = token_mask.shape
      served = jnp.zeros((groups, group_size), bool).at[
          jnp.arange(groups)[:, None], decision.token_index.reshape(groups, -1)].max(
              decision.valid.reshape(groups, -1))
      per_expert = jnp.sum(decision.valid, axis=(0, 2)).astype(jnp.float32)
    else:
      served = jnp.any(kept, axis=-1)
      per_expert = jnp.sum(
          jax.nn.one_hot(decision.expert_index, self.num_experts, dtype=jnp.float32)
          * kept[..., None], axis=(0, 1, 2))
    metrics = {
        "auxiliary_loss": decision.auxiliary_loss,
        "router_z_loss": decision.router_z_loss,
        "fraction_tokens_left_behind":
            1.0 - jnp.sum(served & token_mask) / num_real,
        "expert_usage": jnp.sum(kept) / jnp.maximum(slots, 1),
        "router_confidence":
            jnp.sum(decision.router_probs.max(axis=-1) * token_mask) / num_real,
        "expert_fraction": per_expert / jnp.maximum(jnp.sum(per_expert), 1.0),
    }
    for name, value in metrics.items():
      self.sow("intermediates", name, jnp.asarray(value, jnp.float32))


def collect_moe_metrics(intermediates: Mapping[str, Any]) -> Dict[str, types.Array]:
  """Averages each sown MoE metric over every MoE layer (and scan step).

  Args:
    intermediates: the `intermediates` collection returned by `apply(...,
      mutable=['intermediates'])`.

  Returns:
    {metric name: mean value}; `expert_fraction` is averaged elementwise.
    Empty if the model has no MoE layer.
  """
  found: Dict[str, list] = {name: [] for name in MOE_METRICS}
  for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    for name in reversed(names):
      if name in found:
        found[name].append(value)
        break
  out = {}
  for name, values in found.items():
    if not values:
      continue
    if name == "expert_fraction":
      rows = [v.reshape(-1, v.shape[-1]) for v in values]
      out[name] = jnp.mean(jnp.concatenate(rows, axis=0), axis=0)
    else:
      out[name] = jnp.mean(jnp.concatenate([jnp.ravel(v) for v in values]))
  return out
