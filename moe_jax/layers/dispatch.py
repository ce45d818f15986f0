"""Dispatch: moving tokens into expert buffers and expert outputs back.

Pure functions, no parameters. Every strategy has one interface,

  strategy(x, decision, experts, capacity) -> Dispatched(output, kept, slots)

(tokens `[groups, group_size, embed]`, a routing decision, the experts as an
`Experts` object, the per-group capacity) and one contract: given the same
routing decision, the strategies of one dispatch mode produce the same layer
output. The table `STRATEGIES`:

  strategy        mode       moves tokens by                       experts run on
  einsum          einsum     one-hot [G, S, E, C] einsums          [G, E, C] buffers
  sorted_buffers  sorted     slot gathers                          [G, E, C] buffers
  sorted_rows     sorted     the kept assignments, rows by expert  grouped matmuls
  ragged          dropless   all assignments, rows by expert       grouped matmuls
  overflow        dropless   sorted_buffers + excess rows          buffers + blocks
  expert_choice   sorted     each expert gathers its tokens        [G, E, C] buffers

* `einsum` (the TPU reference path of GShard / flaxformer): tokens move by
  dense einsums whose cost grows with the group size.
* `sorted_buffers`: each kept (token, choice) assignment owns one slot
  `expert * capacity + priority` of a `[groups, experts * capacity]` buffer, so
  dispatch is one gather of token rows and combine one gather of slot rows.
  Both gathers have custom VJPs whose backward passes are gathers too (the
  inverse maps are exact since every slot holds at most one assignment), which
  avoids the serial scatter-adds that autodiff of a gather produces on CPU/GPU.
* `sorted_rows`: the same kept assignments as exact rows sorted by expert
  (`row_layout`), no capacity padding computed; on the CPU BLAS kernels
  (measured against `sorted_buffers` under 'auto'), or on a GPU grouped
  kernel asked for by name.
* `ragged`: no capacity; all assignments as rows for a grouped matmul
  (`grouped_matmul.gmm`).
* `overflow`: no capacity; `sorted_buffers` at the configured capacity plus,
  only when some expert overflows it, the excess as rows in blocks of one
  expert (batched matmuls, for backends without a grouped kernel).

`resolve` maps the MoE layer's settings (dispatch, dropless_backend,
grouped_matmul_implementation), the router kind, the expert-parallel degree,
the device count and dtype to one `Plan` (a strategy and, for the row
strategies, a concrete grouped-matmul implementation), once per layer call
(see `candidates` for the rules). Where several plans can run, it asks a
chooser: the MoE layer's measures them (`moe_jax.tuning`).

See ../shared/reference/fast_moe.md for the cost model behind these choices.
"""

import dataclasses
from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax import types
from moe_jax.layers import grouped_matmul
from moe_jax.layers import routing

DISPATCH_MODES = ("einsum", "sorted", "dropless")


@flax.struct.dataclass
class SlotMap:
  """A bijection between kept (token, choice) assignments and buffer slots.

  Attributes:
    token_of_slot: <int32>[groups, slots] token held by each slot (0 if empty).
    choice_of_slot: <int32>[groups, slots] which of the token's k choices.
    slot_filled: <bool>[groups, slots].
    slot_of_choice: <int32>[groups, group_size, k] slot of each assignment (0
      if not kept).
    choice_kept: <bool>[groups, group_size, k].
  """

  token_of_slot: types.Array
  choice_of_slot: types.Array
  slot_filled: types.Array
  slot_of_choice: types.Array
  choice_kept: types.Array


def slot_map(slot: types.Array, kept: types.Array, num_slots: int) -> SlotMap:
  """Builds the `SlotMap` of assignments `slot` <int32>[groups, size, k]."""
  groups, group_size, k = slot.shape
  target = jnp.where(kept, slot, num_slots)  # Out of range: dropped below.
  group_index = jnp.arange(groups)[:, None, None]
  token = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[None, :, None], slot.shape)
  choice = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), slot.shape)
  empty = jnp.zeros((groups, num_slots), jnp.int32)
  return SlotMap(
      token_of_slot=empty.at[group_index, target].set(token, mode="drop"),
      choice_of_slot=empty.at[group_index, target].set(choice, mode="drop"),
      slot_filled=jnp.zeros((groups, num_slots), bool).at[group_index, target].set(
          True, mode="drop"),
      slot_of_choice=jnp.where(kept, slot, 0).astype(jnp.int32),
      choice_kept=kept,
  )


def _gather_tokens(x: types.Array, sm: SlotMap) -> types.Array:
  """[groups, group_size, d] -> [groups, slots, d]: each slot's token row."""
  rows = jnp.take_along_axis(x, sm.token_of_slot[..., None], axis=1)
  return jnp.where(sm.slot_filled[..., None], rows, jnp.zeros((), x.dtype))


def _gather_slots(buffer: types.Array, sm: SlotMap) -> types.Array:
  """[groups, slots, d] -> [groups, group_size, k, d]: each assignment's slot row."""
  groups, group_size, k = sm.slot_of_choice.shape
  index = sm.slot_of_choice.reshape(groups, group_size * k, 1)
  rows = jnp.take_along_axis(buffer, index, axis=1).reshape(
      groups, group_size, k, buffer.shape[-1])
  return jnp.where(sm.choice_kept[..., None], rows, jnp.zeros((), buffer.dtype))


def _gather_assignments(values: types.Array, sm: SlotMap) -> types.Array:
  """[groups, group_size, k, d] -> [groups, slots, d]: each slot's assignment row."""
  groups, group_size, k, d = values.shape
  index = (sm.token_of_slot * k + sm.choice_of_slot)[..., None]
  rows = jnp.take_along_axis(values.reshape(groups, group_size * k, d), index, axis=1)
  return jnp.where(sm.slot_filled[..., None], rows, jnp.zeros((), values.dtype))


@jax.custom_vjp
def permute(x: types.Array, sm: SlotMap) -> types.Array:
  """Copies token rows into their slots: [groups, size, d] -> [groups, slots, d].

  Backward: a token's gradient is the sum of its slots' gradients, read by a
  gather through the inverse map instead of a scatter-add.
  """
  return _gather_tokens(x, sm)


def _permute_fwd(x, sm):
  return _gather_tokens(x, sm), sm


def _permute_bwd(sm, grad):
  return jnp.sum(_gather_slots(grad, sm), axis=2), None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(buffer: types.Array, sm: SlotMap) -> types.Array:
  """Reads each assignment's slot row: [groups, slots, d] -> [groups, size, k, d].

  Backward: every slot holds at most one assignment, so the slot gradient is a
  gather of that assignment's gradient.
  """
  return _gather_slots(buffer, sm)


def _unpermute_fwd(buffer, sm):
  return _gather_slots(buffer, sm), sm


def _unpermute_bwd(sm, grad):
  return _gather_assignments(grad, sm), None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def combine_choices(choice_outputs: types.Array, weights: types.Array) -> types.Array:
  """Weighted sum over choices: [g, s, k, d] x [g, s, k] -> [g, s, d]."""
  return jnp.einsum("gskd,gsk->gsd", choice_outputs,
                    weights.astype(choice_outputs.dtype))


# ----------------------------------------------------------------------------
# einsum dispatch
# ----------------------------------------------------------------------------
def einsum_masks(decision, num_experts: int, capacity: int,
                 dtype: types.DType) -> Tuple[types.Array, types.Array]:
  """One-hot dispatch mask and combine tensor, both [groups, size, experts, capacity]."""
  if isinstance(decision, routing.ExpertChoiceDecision):
    group_size = decision.router_probs.shape[1]
    # [groups, experts, capacity, group_size]
    one_hot = jax.nn.one_hot(decision.token_index, group_size, dtype=jnp.float32)
    one_hot = one_hot * decision.valid[..., None]
    # -> [groups, group_size, experts, capacity]
    dispatch_mask = jnp.moveaxis(one_hot, -1, 1)
    combine = jnp.moveaxis(one_hot * decision.combine_weights[..., None], -1, 1)
    return dispatch_mask.astype(dtype), combine
  kept = decision.valid & (decision.priority < capacity)
  # [groups, size, k, experts]
  expert_one_hot = jax.nn.one_hot(decision.expert_index, num_experts,
                                  dtype=jnp.float32) * kept[..., None]
  # [groups, size, k, capacity]; priorities >= capacity give all-zero rows.
  slot_one_hot = jax.nn.one_hot(decision.priority, capacity, dtype=jnp.float32)
  dispatch_mask = jnp.einsum("gske,gskc->gsec", expert_one_hot, slot_one_hot)
  combine = jnp.einsum("gske,gskc->gsec",
                       expert_one_hot * decision.combine_weights[..., None], slot_one_hot)
  return dispatch_mask.astype(dtype), combine


def einsum_dispatch(x: types.Array, dispatch_mask: types.Array) -> types.Array:
  """[groups, size, d] -> [groups, experts, capacity, d]."""
  return jnp.einsum("gsd,gsec->gecd", x, dispatch_mask)


def einsum_combine(expert_outputs: types.Array, combine: types.Array) -> types.Array:
  """[groups, experts, capacity, d] -> [groups, size, d]."""
  return jnp.einsum("gecd,gsec->gsd", expert_outputs, combine.astype(expert_outputs.dtype))


# ----------------------------------------------------------------------------
# sorted dispatch for expert choice (token-choice uses permute / unpermute)
# ----------------------------------------------------------------------------
def expert_choice_gather(x: types.Array,
                         decision: routing.ExpertChoiceDecision) -> types.Array:
  """[groups, size, d] -> [groups, experts * capacity, d] chosen token rows.

  A token may be chosen by any number of experts, so there is no fixed-width
  inverse map; autodiff turns this gather's backward into a segment sum.
  """
  groups, num_experts, capacity = decision.token_index.shape
  index = decision.token_index.reshape(groups, num_experts * capacity, 1)
  rows = jnp.take_along_axis(x, index, axis=1)
  return rows * decision.valid.reshape(groups, -1, 1).astype(x.dtype)


def expert_choice_combine(buffer: types.Array, decision: routing.ExpertChoiceDecision,
                          group_size: int) -> types.Array:
  """[groups, experts * capacity, d] -> [groups, size, d] weighted sum per token."""
  groups = buffer.shape[0]
  weights = decision.combine_weights.reshape(groups, -1, 1).astype(buffer.dtype)
  token = decision.token_index.reshape(groups, -1)
  out = jnp.zeros((groups, group_size, buffer.shape[-1]), buffer.dtype)
  return out.at[jnp.arange(groups)[:, None], token].add(buffer * weights)


# ----------------------------------------------------------------------------
# sorted dispatch
# ----------------------------------------------------------------------------
def capacity_slot_map(decision: routing.TokenChoiceDecision, num_experts: int,
                      capacity: int) -> SlotMap:
  """Slots `expert * capacity + priority`; assignments past capacity drop."""
  kept = decision.valid & (decision.priority < capacity)
  slot = decision.expert_index * capacity + decision.priority
  return slot_map(slot, kept, num_experts * capacity)


# ----------------------------------------------------------------------------
# expert-sorted rows (dropless)
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class RowLayout:
  """Assignments of all groups as rows sorted by expert, padded to blocks.

  Attributes:
    slots: the `SlotMap` of the merged group `[1, groups * group_size * k]`;
      rows past `sum(group_sizes)` are empty.
    group_sizes: <int32>[experts] rows of each expert (a multiple of the
      block size).
    row_expert: <int32>[rows] expert owning each row.
  """

  slots: SlotMap
  group_sizes: types.Array
  row_expert: types.Array


def row_layout_size(num_assignments: int, num_experts: int, block_size: int) -> int:
  """Static row count that fits any routing: every expert may waste a block."""
  worst = num_assignments + num_experts * (block_size - 1)
  return -(-worst // block_size) * block_size


def row_layout(decision: routing.TokenChoiceDecision, num_experts: int, *,
               first_slot: int = 0, end_slot: Optional[int] = None,
               max_rows: Optional[int] = None, block_size: int = 1) -> RowLayout:
  """Lays out the assignments with `first_slot <= priority < end_slot`, by expert.

  Groups are merged (nothing is dropped). Each expert's rows start on a
  block boundary, so blocks of `block_size` rows belong to one expert.

  Args:
    decision: a token-choice routing decision.
    num_experts: number of experts.
    first_slot: assignments of lower priority are left out (they were served
      by a capacity buffer).
    end_slot: assignments of this priority and above are left out (dropped
      past the capacity); None keeps them.
    max_rows: the most assignments there can be (default: all of them).
    block_size: rows per block.

  Returns:
    The layout, with `row_layout_size(max_rows, num_experts, block_size)` rows.
  """
  groups, group_size, k = decision.expert_index.shape
  kept = decision.valid & (decision.priority >= first_slot)
  if end_slot is not None:
    kept &= decision.priority < end_slot
  # Assignments per group and expert, to rank across groups.
  counts = jnp.sum(
      jax.nn.one_hot(decision.expert_index, num_experts, dtype=jnp.int32)
      * kept[..., None], axis=(1, 2))  # [groups, experts]
  earlier_groups = jnp.cumsum(counts, axis=0) - counts
  rank = decision.priority - first_slot + jnp.take_along_axis(
      earlier_groups[:, None, :], decision.expert_index.reshape(groups, 1, -1),
      axis=2).reshape(groups, group_size, k)
  padded = -(-jnp.sum(counts, axis=0) // block_size) * block_size  # [experts]
  end = jnp.cumsum(padded)
  slot = (end - padded)[decision.expert_index] + rank
  num_rows = row_layout_size(groups * group_size * k if max_rows is None else max_rows,
                             num_experts, block_size)
  # Merge groups: token t of group g becomes token g * group_size + t.
  merged = slot_map(slot.reshape(1, groups * group_size, k),
                    kept.reshape(1, groups * group_size, k), num_rows)
  row_expert = jnp.minimum(jnp.searchsorted(end, jnp.arange(num_rows), side="right"),
                           num_experts - 1)
  return RowLayout(slots=merged, group_sizes=padded.astype(jnp.int32),
                   row_expert=row_expert.astype(jnp.int32))


def overflow_block_size(max_rows: int, num_experts: int) -> int:
  """Block size of an overflow layout: a power of two >= max_rows / experts.

  Each block reads its expert's weights, so the blocks' weights take
  (blocks / experts) times the experts' memory; with at most
  max_rows / block_size + experts <= 2 * experts blocks, that stays within
  twice the weights, and padding within max_rows + experts * block_size rows.
  """
  per_expert = max(-(-max_rows // num_experts), 8)
  return 1 << (per_expert - 1).bit_length()


# ----------------------------------------------------------------------------
# Strategies: one interface, one table
# ----------------------------------------------------------------------------
Decision = Union[routing.TokenChoiceDecision, routing.ExpertChoiceDecision]


class Experts(Protocol):
  """The experts as the strategies call them (`moe.MoeLayer` implements it)."""

  def on_buffers(self, buffer: types.Array) -> types.Array:
    """`[groups, experts, capacity, embed]` -> the same (expert-parallel)."""

  def on_rows(self, rows: types.Array, group_sizes: types.Array,
              row_expert: types.Array) -> types.Array:
    """`[rows, embed]` sorted by expert -> the same, by grouped matmuls."""

  def on_blocks(self, blocks: types.Array, block_expert: types.Array) -> types.Array:
    """`[blocks, block_size, embed]`, block b for expert `block_expert[b]`."""


@flax.struct.dataclass
class Dispatched:
  """What a strategy returns.

  Attributes:
    output: `[groups, group_size, embed]` each token's combined expert outputs.
    kept: <bool> the assignments computed: `[groups, group_size, k]` for
      token choice, `[groups, experts, capacity]` for expert choice.
    slots: expert rows computed (the denominator of `expert_usage`).
  """

  output: types.Array
  kept: types.Array
  slots: types.Array


Strategy = Callable[[types.Array, Decision, Experts, int], Dispatched]


def _num_experts(decision: Decision) -> int:
  return decision.router_probs.shape[-1]


def _capacity_kept(decision: Decision, capacity: int) -> types.Array:
  if isinstance(decision, routing.ExpertChoiceDecision):
    return decision.valid
  return decision.valid & (decision.priority < capacity)


def _capacity_slots(x: types.Array, decision: Decision, capacity: int) -> types.Array:
  return jnp.asarray(x.shape[0] * _num_experts(decision) * capacity)


def _buffers_output(x, decision, experts: Experts, capacity: int) -> types.Array:
  """Sorted dispatch into `[groups, experts, capacity, embed]` buffers."""
  groups, _, embed = x.shape
  num_experts = _num_experts(decision)
  slots = capacity_slot_map(decision, num_experts, capacity)
  buffer = permute(x, slots).reshape(groups, num_experts, capacity, embed)
  out = experts.on_buffers(buffer).reshape(groups, num_experts * capacity, embed)
  return combine_choices(unpermute(out, slots), decision.combine_weights)


def _rows_output(x, decision, experts: Experts, layout: RowLayout,
                 block_size: Optional[int] = None) -> types.Array:
  """Runs the assignments of `layout`: grouped matmuls, or blocks if given."""
  groups, group_size, embed = x.shape
  k = decision.expert_index.shape[-1]
  tokens = x.reshape(1, groups * group_size, embed)
  rows = permute(tokens, layout.slots)[0]  # [rows, embed]
  if block_size is None:
    out = experts.on_rows(rows, layout.group_sizes, layout.row_expert)
  else:
    # [rows, embed] -> [blocks, block_size, embed]; a block's expert is its first row's.
    out = experts.on_blocks(rows.reshape(-1, block_size, embed),
                            layout.row_expert[::block_size]).reshape(rows.shape)
  y = combine_choices(unpermute(out[None], layout.slots),
                      decision.combine_weights.reshape(1, groups * group_size, k))
  return y.reshape(groups, group_size, embed)


def einsum_strategy(x, decision, experts: Experts, capacity: int) -> Dispatched:
  """One-hot dispatch and combine tensors (token or expert choice)."""
  dispatch_mask, combine = einsum_masks(decision, _num_experts(decision), capacity, x.dtype)
  y = einsum_combine(experts.on_buffers(einsum_dispatch(x, dispatch_mask)), combine)
  return Dispatched(y, _capacity_kept(decision, capacity),
                    _capacity_slots(x, decision, capacity))


def sorted_buffers_strategy(x, decision, experts: Experts, capacity: int) -> Dispatched:
  """Each kept assignment owns one slot of its expert's capacity buffer."""
  return Dispatched(_buffers_output(x, decision, experts, capacity),
                    _capacity_kept(decision, capacity),
                    _capacity_slots(x, decision, capacity))


def sorted_rows_strategy(x, decision, experts: Experts, capacity: int) -> Dispatched:
  """The kept assignments of 'sorted' as exact rows: no capacity padding."""
  groups, group_size, _ = x.shape
  num_experts = _num_experts(decision)
  k = decision.expert_index.shape[-1]
  layout = row_layout(decision, num_experts, end_slot=capacity,
                      max_rows=min(groups * group_size * k, groups * num_experts * capacity))
  return Dispatched(_rows_output(x, decision, experts, layout),
                    _capacity_kept(decision, capacity),
                    _capacity_slots(x, decision, capacity))


def ragged_strategy(x, decision, experts: Experts, capacity: int) -> Dispatched:
  """Dropless: every assignment as a row, grouped matmuls; `slots` = rows used."""
  del capacity  # No capacity.
  layout = row_layout(decision, _num_experts(decision))
  return Dispatched(_rows_output(x, decision, experts, layout), decision.valid,
                    jnp.sum(decision.valid))


def overflow_strategy(x, decision, experts: Experts, capacity: int) -> Dispatched:
  """Dropless without a grouped kernel: 'sorted_buffers', then the overflow.

  Assignments past the capacity, if any, run as rows sorted by expert in
  blocks of one expert (memory bounded by the assignment count). That pass
  sits in a `lax.cond`, so a load within capacity costs (almost) what
  'sorted_buffers' costs; it is rematerialized in the backward pass, so when
  it is not taken it holds no activations.
  """
  groups, group_size, _ = x.shape
  num_experts = _num_experts(decision)
  k = decision.expert_index.shape[-1]
  y = _buffers_output(x, decision, experts, capacity)
  result = Dispatched(y, decision.valid, _capacity_slots(x, decision, capacity))
  if capacity >= group_size:
    return result  # No expert can receive more than a group's tokens.
  max_rows = groups * k * (group_size - capacity)
  block_size = overflow_block_size(max_rows, num_experts)

  def overflow(x):
    layout = row_layout(decision, num_experts, first_slot=capacity, max_rows=max_rows,
                        block_size=block_size)
    return _rows_output(x, decision, experts, layout, block_size=block_size)

  busiest = jnp.max(jnp.where(decision.valid, decision.priority, -1))
  return result.replace(output=y + jax.lax.cond(
      busiest >= capacity, jax.checkpoint(overflow), jnp.zeros_like, x))


def expert_choice_strategy(x, decision: routing.ExpertChoiceDecision, experts: Experts,
                           capacity: int) -> Dispatched:
  """Expert-choice buffers: each expert gathers its chosen tokens."""
  groups, group_size, embed = x.shape
  num_experts = _num_experts(decision)
  buffer = expert_choice_gather(x, decision)
  out = experts.on_buffers(buffer.reshape(groups, num_experts, capacity, embed))
  y = expert_choice_combine(out.reshape(groups, num_experts * capacity, embed), decision,
                            group_size)
  return Dispatched(y, decision.valid, _capacity_slots(x, decision, capacity))


STRATEGIES: Dict[str, Strategy] = {
    "einsum": einsum_strategy,
    "sorted_buffers": sorted_buffers_strategy,
    "sorted_rows": sorted_rows_strategy,
    "ragged": ragged_strategy,
    "overflow": overflow_strategy,
    "expert_choice": expert_choice_strategy,
}


# ----------------------------------------------------------------------------
# Resolution: the layer's settings -> one concrete plan
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
  """A concrete strategy (a key of `STRATEGIES`), and the grouped matmul
  implementation it runs on (row strategies only)."""

  strategy: str
  implementation: Optional[str] = None

  @property
  def name(self) -> str:
    """E.g. 'sorted_buffers', 'sorted_rows/cpu_blas'."""
    return self.strategy + (f"/{self.implementation}" if self.implementation else "")


def explicit_fields(plan: Plan) -> Dict[str, str]:
  """MoE layer settings that select exactly `plan`, whatever runs here.

  Explicit settings are never overridden, so a layer with these resolves to
  `plan` without measuring (how the candidates are timed).
  """
  fields = {
      "einsum": dict(dispatch="einsum"),
      "expert_choice": dict(dispatch="sorted"),
      "sorted_buffers": dict(dispatch="sorted", grouped_matmul_implementation="xla"),
      "sorted_rows": dict(dispatch="sorted",
                          grouped_matmul_implementation=plan.implementation),
      "ragged": dict(dispatch="dropless", dropless_backend="ragged",
                     grouped_matmul_implementation=plan.implementation),
      "overflow": dict(dispatch="dropless", dropless_backend="overflow"),
  }
  return fields[plan.strategy]


# Grouped kernels that 'sorted' runs its kept assignments on as exact rows
# when asked for by name (with 'auto', only the CPU BLAS kernels: see
# `candidates`).
ROW_KERNELS = ("cpu_blas", "mosaic_gpu", "tokamax")


def candidates(*, dispatch: str, dropless_backend: str, grouped_matmul_implementation: str,
               expert_choice: bool, num_expert_partitions: int, dtype: types.DType,
               embed: int, expert_mlp_dim: int,
               device_count: Optional[int] = None) -> Tuple[Plan, ...]:
  """The plans that can run this layer here; the first is the static rule's.

  Explicit settings leave one plan. 'auto' settings leave more where more can
  run:
    * dispatch='sorted', grouped_matmul_implementation='auto', a single device
      and expert partition, float32 on the CPU with the BLAS kernels built:
      `sorted_buffers` and `sorted_rows/cpu_blas` (static rule: rows, no
      padding computed). Everywhere else `sorted_buffers` (batched matmuls
      over the padded buffer; accelerators and expert parallelism need no
      more). An explicit row kernel ('cpu_blas', 'mosaic_gpu', 'tokamax')
      with one expert partition selects `sorted_rows/<kernel>`: the kept
      assignments as exact rows on it.
    * dispatch='dropless', dropless_backend='auto': `overflow`, plus
      `ragged/<kernel>` where a grouped kernel computes only each row's expert
      (TPU's ragged_dot, Mosaic GPU on Hopper in bfloat16/float16, the CPU
      BLAS kernels; static rule: ragged), and `ragged/tokamax` beside Mosaic
      GPU or TPU's ragged_dot where tokamax can run
      (`grouped_matmul.alternative_kernels`). XLA's dense lowering of
      ragged_dot (E times the work) is never a candidate.
    * dispatch='dropless', dropless_backend='ragged',
      grouped_matmul_implementation='auto': `ragged/<kernel>` and those
      alternatives.
    * expert-choice routers: `einsum` or `expert_choice` (dispatch='sorted').

  Args:
    dispatch, dropless_backend, grouped_matmul_implementation: the layer's
      settings.
    expert_choice: the router is an expert-choice router.
    num_expert_partitions: the expert-parallel degree.
    dtype: the experts' computation dtype.
    embed, expert_mlp_dim: the experts' feature sizes.
    device_count: devices the layer runs on (default `jax.device_count()`).
  """
  if expert_choice:
    return (Plan("einsum"),) if dispatch == "einsum" else (Plan("expert_choice"),)
  if dispatch == "einsum":
    return (Plan("einsum"),)
  kernel = grouped_matmul.grouped_kernel(grouped_matmul_implementation, dtype, embed,
                                         expert_mlp_dim, device_count=device_count)
  auto = grouped_matmul_implementation == "auto"

  def alternatives(first: str) -> Tuple[Plan, ...]:
    if not auto:
      return ()
    return tuple(Plan("ragged", other) for other in grouped_matmul.alternative_kernels(
        first, dtype, embed, expert_mlp_dim))

  if dispatch == "sorted":
    if num_expert_partitions == 1 and (
        kernel == "cpu_blas" or (not auto and kernel in ROW_KERNELS)):
      rows = (Plan("sorted_rows", kernel),)
      return rows if not auto else rows + (Plan("sorted_buffers"),)
    return (Plan("sorted_buffers"),)
  if dropless_backend == "overflow":
    return (Plan("overflow"),)
  if dropless_backend == "ragged":
    first = grouped_matmul.resolve_implementation(
        grouped_matmul_implementation, dtype, embed, expert_mlp_dim,
        device_count=device_count)
    return (Plan("ragged", first),) + alternatives(first)
  if kernel:
    return (Plan("ragged", kernel),) + alternatives(kernel) + (Plan("overflow"),)
  return (Plan("overflow"),)


def resolve(*, choose: Optional[Callable[[Sequence[Plan]], Plan]] = None,
            device_count: Optional[int] = None, **settings) -> Plan:
  """The plan to run: the only candidate, or `choose(candidates)`.

  Args:
    choose: picks one of several candidates (e.g. by measuring them); None
      applies the static rule (the first candidate).
    device_count: as in `candidates`. With several devices the layer is
      partitioned and a one-device measurement would not represent it, so the
      static rule applies.
    **settings: the other arguments of `candidates`.
  """
  device_count = jax.device_count() if device_count is None else device_count
  plans = candidates(device_count=device_count, **settings)
  if len(plans) == 1 or choose is None or device_count != 1:
    return plans[0]
  plan = choose(plans)
  if plan not in plans:
    raise ValueError(f"chooser returned {plan}, not one of {plans}.")
  return plan
