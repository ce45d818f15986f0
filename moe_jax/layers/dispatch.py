"""Dispatch: moving tokens into expert buffers and expert outputs back.

Pure functions, no parameters. Three strategies, one contract: given the same
routing decision they produce the same layer output.

* `einsum` (the TPU reference path of GShard / flaxformer): one-hot dispatch
  and combine tensors `[groups, group_size, experts, capacity]`; tokens move by
  dense einsums whose cost grows with the group size.
* `sorted`: each kept (token, choice) assignment owns one slot
  `expert * capacity + priority` of a `[groups, experts * capacity]` buffer, so
  dispatch is one gather of token rows and combine one gather of slot rows.
  Both gathers have custom VJPs whose backward passes are gathers too (the
  inverse maps are exact since every slot holds at most one assignment), which
  avoids the serial scatter-adds that autodiff of a gather produces on CPU/GPU.
* `dropless`: no capacity. All assignments become rows sorted by expert
  (`row_layout`) for a grouped matmul (`jax.lax.ragged_dot`, TPU/GPU); or,
  on CPU, `sorted` dispatch at the configured capacity plus, only when some
  expert overflows it, the overflow as rows in blocks of one expert; see
  `MoeLayer.dropless_backend`.

See ../shared/reference/fast_moe.md for the cost model behind these choices.
"""

from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax import types
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
