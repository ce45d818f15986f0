"""MoeLayer: a sparse feed-forward block (groups, capacity, router, dispatch, experts).

A batch's path through the layer:

  tokens [batch, length, embed]
    -> groups [groups, group_size, embed]            (padded, never truncated)
    -> router: routing decision + losses              (float32)
    -> dispatch ('einsum' | 'sorted' | 'dropless')    (tokens -> expert buffers)
    -> experts: one (gated) FFN per expert            (self.dtype)
    -> combine: weighted sum of each token's experts  (buffers -> tokens)
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

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax import types
from moe_jax.layers import dense
from moe_jax.layers import dispatch
from moe_jax.layers import routing

MOE_METRICS = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind",
               "expert_usage", "router_confidence", "expert_fraction")
DROPLESS_BACKENDS = ("auto", "ragged", "blocked")


def _per_expert_init(init: types.Initializer) -> types.Initializer:
  """Initializes `[experts, ...]` as independent per-expert kernels.

  Fan-in based initializers would otherwise count the expert axis as a
  receptive field and shrink the scale by sqrt(experts).
  """
  def init_fn(rng, shape, dtype=jnp.float32):
    keys = jax.random.split(rng, shape[0])
    return jax.vmap(lambda key: init(key, shape[1:], dtype))(keys)
  return init_fn


class Experts(nn.Module):
  """`num_experts` independent (gated) FFNs with stacked weights.

  Parameters (logical axes in parentheses): `wi` or `wi_0`, `wi_1`, ...
  `[experts, embed, expert_mlp]` ('expert', 'embed', 'expert_mlp') and `wo`
  `[experts, expert_mlp, embed]`; optional biases `*_bias`.

  Attributes:
    num_experts: number of experts.
    mlp_dim: hidden width of each expert.
    activations: as in `dense.MlpBlock`.
    dropout_rate: expert dropout on the hidden activations (train only).
    use_bias: whether projections carry biases.
    dtype: computation dtype (parameters stay float32).
    kernel_init: initializer of one expert's kernel.
  """

  num_experts: int
  mlp_dim: int
  activations: Sequence[dense.Activation] = ("gelu", "linear")
  dropout_rate: float = 0.0
  use_bias: bool = False
  dtype: types.DType = jnp.float32
  kernel_init: types.Initializer = dense.default_kernel_init

  @nn.compact
  def __call__(self, x: types.Array, *, layout: str,
               enable_dropout: bool = False,
               block_expert: Optional[types.Array] = None,
               row_expert: Optional[types.Array] = None,
               group_sizes: Optional[types.Array] = None) -> types.Array:
    """Applies the experts in one of three layouts.

    Args:
      x: 'batched': `[experts, tokens, embed]`, row e goes to expert e;
        'blocked': `[blocks, block_size, embed]`, block b goes to
        `block_expert[b]`; 'ragged': `[rows, embed]` sorted by expert, with
        `group_sizes[e]` rows for expert e.
      layout: 'batched', 'blocked' or 'ragged'.
      enable_dropout: apply expert dropout.
      block_expert: <int32>[blocks] for 'blocked'.
      row_expert: <int32>[rows] for 'ragged' biases.
      group_sizes: <int32>[experts] for 'ragged'.

    Returns:
      Expert outputs shaped like `x`.
    """
    embed = x.shape[-1]
    init = _per_expert_init(self.kernel_init)
    names = ["wi"] if len(self.activations) == 1 else [
        f"wi_{i}" for i in range(len(self.activations))]
    wi = [
        partitioning.param_with_axes(
            name, init, (self.num_experts, embed, self.mlp_dim), jnp.float32,
            axes=("expert", "embed", "expert_mlp")).astype(self.dtype)
        for name in names
    ]
    wo = partitioning.param_with_axes(
        "wo", init, (self.num_experts, self.mlp_dim, embed), jnp.float32,
        axes=("expert", "expert_mlp", "embed")).astype(self.dtype)
    bi = bo = None
    if self.use_bias:
      bi = [
          partitioning.param_with_axes(
              f"{name}_bias", nn.initializers.zeros, (self.num_experts, self.mlp_dim),
              jnp.float32, axes=("expert", "expert_mlp")).astype(self.dtype)
          for name in names
      ]
      bo = partitioning.param_with_axes(
          "wo_bias", nn.initializers.zeros, (self.num_experts, embed),
          jnp.float32, axes=("expert", "embed")).astype(self.dtype)

    if layout == "batched":
      project = lambda a, w: jnp.einsum("eti,eio->eto", a, w)
      expand = lambda b: b[:, None, :]  # [experts, 1, features]
    elif layout == "blocked":
      # Each block reads its expert's weights; blocks of one expert are
      # adjacent, so this is a cheap slice copy per block.
      project = lambda a, w: jnp.einsum("nbi,nio->nbo", a, jnp.take(w, block_expert, axis=0))
      expand = lambda b: jnp.take(b, block_expert, axis=0)[:, None, :]
    elif layout == "ragged":
      project = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
      expand = lambda b: jnp.take(b, row_expert, axis=0)
    else:
      raise ValueError(f"Unknown expert layout {layout!r}.")
    dropout = nn.Dropout(rate=self.dropout_rate)
    return dense.mlp_forward(
        x.astype(self.dtype), wi, wo, self.activations, project=project,
        bi=None if bi is None else [expand(b) for b in bi],
        bo=None if bo is None else expand(bo),
        dropout=lambda h: dropout(h, deterministic=not enable_dropout))


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts feed-forward layer.

  Attributes:
    num_experts: number of experts E.
    router: a `routing.Router` module (TokensChooseRouter, GShardTop2Router,
      ExpertChoiceRouter); its parameters live under `router/`.
    expert_mlp_dim: hidden width of each expert.
    activations: expert activations, e.g. ('gelu', 'linear') for gated GELU
      or ('relu',) for Switch-Base's plain FFN.
    expert_dropout_rate: dropout inside each expert's MLP (train only);
      Switch fine-tuning uses a higher rate here than in the rest of the
      model.
    use_bias: biases in the expert projections (T5 has none).
    max_group_size: tokens are routed in groups of at most this many. Group
      count G = ceil(tokens / max_group_size), rounded up to a multiple of the
      expert-parallel degree; tokens are padded to fill G equal groups (the
      padding is never routed and is sliced off the output).
    num_groups: fixes G instead (must divide by `num_expert_partitions`).
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
    dropless_backend: how 'dropless' runs the experts. 'ragged' is a grouped
      matmul (`jax.lax.ragged_dot`), native on TPU and GPU; on CPU XLA lowers
      ragged_dot to a dense matmul against every expert, so 'blocked' (the
      exact CPU path: rows padded to blocks of one expert, batched block
      matmuls) is used there. 'auto' picks ragged on TPU/GPU, blocked on CPU.
    dropless_block_size: rows per block (and per-expert padding granularity)
      of dropless layouts; None picks `dispatch.default_block_size`.
    num_expert_partitions: expert-parallel degree (size of the mesh's
      `expert` axis); must divide `num_experts`.
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
  dropless_block_size: Optional[int] = None
  num_expert_partitions: int = 1
  dtype: types.DType = jnp.float32
  kernel_init: types.Initializer = dense.default_kernel_init

  def setup(self):
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
    if self.dispatch not in dispatch.DISPATCH_MODES:
      raise ValueError(
          f"Unknown dispatch {self.dispatch!r}; choose one of "
          f"{dispatch.DISPATCH_MODES}.")
    if self.dropless_backend not in DROPLESS_BACKENDS:
      raise ValueError(
          f"Unknown dropless_backend {self.dropless_backend!r}; choose one of "
          f"{DROPLESS_BACKENDS}.")
    if not isinstance(self.router, routing.Router):
      raise ValueError(
          f"router must be a moe_jax.layers.routing.Router module (e.g. "
          f"TokensChooseRouter(), GShardTop2Router(), ExpertChoiceRouter()), got "
          f"{type(self.router).__name__}.")
    if self.dispatch == "dropless" and isinstance(self.router, routing.ExpertChoiceRouter):
      raise ValueError(
          "Expert choice has a fixed capacity by construction; use "
          "dispatch='einsum' or 'sorted' with ExpertChoiceRouter.")
    if self.num_expert_partitions < 1 or self.num_experts % self.num_expert_partitions:
      raise ValueError(
          f"num_experts={self.num_experts} must be divisible by "
          f"num_expert_partitions={self.num_expert_partitions} (the mesh's expert "
          "axis); change either.")
    if self.num_groups is not None and (
        self.num_groups < 1 or self.num_groups % self.num_expert_partitions):
      raise ValueError(
          f"num_groups={self.num_groups} must be a positive multiple of the "
          f"expert-parallel degree num_expert_partitions={self.num_expert_partitions}, "
          "so that every expert shard receives whole groups; change num_groups or "
          "leave it unset to derive it from max_group_size.")
    if self.group_by_sequence and self.num_groups is not None:
      raise ValueError("Set either group_by_sequence or num_groups, not both.")
    if self.expert_capacity is not None and self.expert_capacity < 1:
      raise ValueError(f"expert_capacity must be >= 1, got {self.expert_capacity}.")
    if self.max_group_size < 1:
      raise ValueError(f"max_group_size must be >= 1, got {self.max_group_size}.")
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
        activations=self.activations, dropout_rate=self.expert_dropout_rate,
        use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.kernel_init)

  @property
  def num_selected_experts(self) -> int:
    """k: experts per token (1 for expert choice, whose k varies per token)."""
    return getattr(self.router, "num_selected_experts", 1)

  def group_shape(self, batch: int, length: int) -> tuple:
    """(num_groups, group_size) for a `[batch, length]` batch of tokens."""
    if self.group_by_sequence:
      return batch, length
    num_tokens = batch * length
    groups = self.num_groups
    if groups is None:
      groups = math.ceil(num_tokens / self.max_group_size)
      groups = math.ceil(groups / self.num_expert_partitions) * self.num_expert_partitions
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
    decision = self._router(
        x, num_experts=self.num_experts, expert_capacity=capacity,
        group_padding=group_padding, padding_mask=padding_mask,
        enable_dropout=enable_dropout)

    if self.dispatch == "dropless":
      y, slots_used, num_slots, kept = self._dropless(x, decision, enable_dropout)
    else:
      y, kept = self._with_capacity(x, decision, capacity, enable_dropout)
      slots_used = jnp.sum(kept)
      num_slots = groups * self.num_experts * capacity

    self._sow_metrics(decision, kept, slots_used, num_slots)
    # [groups, group_size, embed] -> [batch, length, embed]
    y = y.reshape(groups * group_size, embed)[:num_tokens].reshape(batch, length, embed)
    y = partitioning.with_sharding_constraint(y, ("batch", "length", "embed"))
    return y.astype(inputs.dtype)

  def _call_experts_on_buffer(self, buffer: types.Array,
                              enable_dropout: bool) -> types.Array:
    """Runs the experts on `[groups, experts, capacity, embed]`, expert-parallel.

    Moving the buffer from group sharding to expert sharding (and back) is
    the all-to-all of expert parallelism.
    """
    groups, num_experts, capacity, embed = buffer.shape
    buffer = partitioning.with_sharding_constraint(
        buffer, ("batch", "unmodeled", "length", "embed"))
    # [groups, experts, capacity, embed] -> [experts, groups, capacity, embed]
    buffer = jnp.swapaxes(buffer, 0, 1)
    buffer = partitioning.with_sharding_constraint(
        buffer, ("expert", "expert_replicas", "length", "embed"))
    # -> [experts, groups * capacity, embed]
    out = self.expert(buffer.reshape(num_experts, groups * capacity, embed),
                      layout="batched", enable_dropout=enable_dropout)
    out = out.reshape(num_experts, groups, capacity, embed)
    out = partitioning.with_sharding_constraint(
        out, ("expert", "expert_replicas", "length", "embed"))
    # -> [groups, experts, capacity, embed]
    out = jnp.swapaxes(out, 0, 1)
    return partitioning.with_sharding_constraint(
        out, ("batch", "unmodeled", "length", "embed"))

  def _with_capacity(self, x, decision, capacity, enable_dropout):
    """'einsum' and 'sorted' dispatch: per-group `[experts, capacity]` buffers."""
    groups, group_size, embed = x.shape
    compute = x.astype(self.dtype)
    if self.dispatch == "einsum":
      dispatch_mask, combine = dispatch.einsum_masks(
          decision, self.num_experts, capacity, self.dtype)
      buffer = dispatch.einsum_dispatch(compute, dispatch_mask)
      out = self._call_experts_on_buffer(buffer, enable_dropout)
      y = dispatch.einsum_combine(out, combine)
    elif isinstance(decision, routing.ExpertChoiceDecision):
      buffer = dispatch.expert_choice_gather(compute, decision)
      out = self._call_experts_on_buffer(
          buffer.reshape(groups, self.num_experts, capacity, embed), enable_dropout)
      y = dispatch.expert_choice_combine(
          out.reshape(groups, self.num_experts * capacity, embed), decision, group_size)
    else:
      slots = dispatch.capacity_slot_map(decision, self.num_experts, capacity)
      buffer = dispatch.permute(compute, slots)
      out = self._call_experts_on_buffer(
          buffer.reshape(groups, self.num_experts, capacity, embed), enable_dropout)
      out = out.reshape(groups, self.num_experts * capacity, embed)
      y = dispatch.combine_choices(dispatch.unpermute(out, slots), decision.combine_weights)
    if isinstance(decision, routing.ExpertChoiceDecision):
      kept = decision.valid
    else:
      kept = decision.valid & (decision.priority < capacity)
    return y, kept

  def _dropless(self, x, decision, enable_dropout):
    """Every assignment is served: grouped (ragged) or block-padded experts."""
    groups, group_size, embed = x.shape
    k = decision.expert_index.shape[-1]
    block_size = self.dropless_block_size or dispatch.default_block_size(
        groups * group_size * k, self.num_experts)
    backend = self.dropless_backend
    if backend == "auto":
      backend = "ragged" if jax.default_backend() in ("tpu", "gpu") else "blocked"
    layout = dispatch.dropless_layout(decision, self.num_experts, block_size)
    tokens = x.reshape(1, groups * group_size, embed).astype(self.dtype)
    rows = dispatch.permute(tokens, layout.slots)[0]  # [rows, embed]
    num_rows = rows.shape[0]
    if backend == "ragged":
      out = self.expert(rows, layout="ragged", enable_dropout=enable_dropout,
                        group_sizes=layout.group_sizes, row_expert=layout.row_expert)
    else:
      out = self.expert(rows.reshape(num_rows // block_size, block_size, embed),
                        layout="blocked", enable_dropout=enable_dropout,
                        block_expert=layout.block_expert)
    out = out.reshape(1, num_rows, embed)
    y = dispatch.combine_choices(
        dispatch.unpermute(out, layout.slots),
        decision.combine_weights.reshape(1, groups * group_size, k))
    kept = decision.valid
    return y.reshape(groups, group_size, embed), jnp.sum(kept), num_rows, kept

  def _sow_metrics(self, decision, kept, slots_used, num_slots) -> None:
    """Sows the losses and the load/drop metrics (float32 scalars)."""
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
        "expert_usage": slots_used / num_slots,
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
