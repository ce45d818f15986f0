"""Multi-head attention with T5 relative position biases and a decode cache.

Three pieces, all without biases as in T5 (Raffel et al. 2020,
https://arxiv.org/abs/1910.10683):

  * `RelativePositionBiases`: the learned per-head scalar added to attention
    logits, indexed by a log-bucketed relative distance. One instance is
    shared by all layers of a stack.
  * `MultiHeadDotProductAttention`: query/key/value/out projections with
    kernels `[embed, heads, kv]` / `[heads, kv, embed]`, no `1/sqrt(d)` query
    scaling (T5 folds it into the query initializer), and an autoregressive
    key/value cache in flax's `cache` collection.
  * Mask helpers (`make_attention_mask`, `make_causal_mask`,
    `make_decoder_mask`, `combine_masks`) producing `[batch, 1, q, k]` masks
    where 1 means "may attend".
"""

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import partitioning
from moe_jax import types

# Added to masked-out attention logits; large but finite so that fully masked
# rows (padding queries) stay NaN-free.
_MASK_VALUE = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


# ---------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------


def make_attention_mask(
    query_input: types.Array,
    key_input: types.Array,
    pairwise_fn: Callable[[types.Array, types.Array], types.Array] = jnp.logical_and,
    dtype: types.DType = jnp.float32,
) -> types.Array:
  """Pairwise mask `pairwise_fn(query_input[q], key_input[k])`.

  Args:
    query_input: `[batch, q_length]` (e.g. `tokens > 0` or segment ids).
    key_input: `[batch, k_length]`.
    pairwise_fn: combines one query entry with one key entry.
    dtype: mask dtype.

  Returns:
    `<dtype>[batch, 1, q_length, k_length]`.
  """
  # [batch, q, 1] x [batch, 1, k] -> [batch, q, k]
  mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
  return mask[:, None].astype(dtype)


def make_causal_mask(tokens: types.Array, dtype: types.DType = jnp.float32) -> types.Array:
  """Lower-triangular `[batch, 1, length, length]` mask (key <= query)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
  return make_attention_mask(positions, positions, jnp.greater_equal, dtype)


def combine_masks(*masks: Optional[types.Array],
                  dtype: types.DType = jnp.float32) -> Optional[types.Array]:
  """Logical AND of the given masks (`None`s are skipped)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  combined = present[0] > 0
  for mask in present[1:]:
    combined = jnp.logical_and(combined, mask > 0)
  return combined.astype(dtype)


def make_decoder_mask(
    decoder_target_tokens: types.Array,
    decoder_segment_ids: Optional[types.Array] = None,
    dtype: types.DType = jnp.float32,
) -> types.Array:
  """Causal self-attention mask for the decoder, padding- and packing-aware.

  A query may see a key if the key is not later, both are real tokens
  (`decoder_target_tokens > 0`), and, for packed inputs, both belong to the
  same segment.

  Args:
    decoder_target_tokens: `<int>[batch, length]`, 0 marks padding.
    decoder_segment_ids: optional `<int>[batch, length]` packing segment ids.
    dtype: mask dtype.

  Returns:
    `<dtype>[batch, 1, length, length]`.
  """
  real = decoder_target_tokens > 0
  masks = [
      make_causal_mask(decoder_target_tokens, dtype),
      make_attention_mask(real, real, dtype=dtype),
  ]
  if decoder_segment_ids is not None:
    masks.append(make_attention_mask(
        decoder_segment_ids, decoder_segment_ids, jnp.equal, dtype))
  return combine_masks(*masks, dtype=dtype)


# ---------------------------------------------------------------------------
# Relative position biases.
# ---------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: types.Array,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> types.Array:
  """T5's bucketing of `key_position - query_position`.

  Half of the buckets (all of them if unidirectional) hold exact distances
  `0 .. max_exact - 1`; the rest cover `max_exact .. max_distance` on a log
  scale, and farther distances share the last bucket. Bidirectional buckets
  reserve the upper half for keys to the right of the query. A decoder
  (unidirectional) maps every key to the right of the query to bucket 0; the
  causal mask hides those keys anyway.

  Args:
    relative_position: `<int>[...]`, key position minus query position.
    bidirectional: whether keys after the query get their own buckets.
    num_buckets: number of buckets.
    max_distance: distance from which all positions share one bucket.

  Returns:
    `<int32>[...]` bucket ids in `[0, num_buckets)`.
  """
  # Distance looking backwards (positive when the key precedes the query).
  distance = -relative_position
  bucket = jnp.zeros_like(relative_position, dtype=jnp.int32)
  if bidirectional:
    num_buckets //= 2
    bucket += (distance < 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # Log-spaced buckets for max_exact <= distance < max_distance.
  log_ratio = (jnp.log(distance.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
               / np.log(max_distance / max_exact))
  large_bucket = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large_bucket = jnp.minimum(large_bucket, num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large_bucket)


class RelativePositionBiases(nn.Module):
  """Learned T5 relative position bias, shared by the layers of one stack.

  Attributes:
    num_heads: number of attention heads (one scalar per head and bucket).
    num_buckets: number of relative-distance buckets (T5: 32).
    max_distance: distance beyond which all positions share a bucket (128).
    dtype: dtype of the returned bias.
    embedding_init: initializer of the `[heads, buckets]` table.
  """

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: types.DType = jnp.float32
  embedding_init: types.Initializer = nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform")

  @nn.compact
  def __call__(self, query_length: int, key_length: int, bidirectional: bool) -> types.Array:
    """Returns the bias `<dtype>[1, heads, query_length, key_length]`."""
    # Static bucket ids: lengths are Python ints, so numpy builds a constant.
    relative_position = (np.arange(key_length)[None, :]
                         - np.arange(query_length)[:, None])
    buckets = relative_position_bucket(
        jnp.asarray(relative_position, jnp.int32), bidirectional,
        self.num_buckets, self.max_distance)
    table = partitioning.param_with_axes(
        "rel_embedding", self.embedding_init, (self.num_heads, self.num_buckets),
        jnp.float32, axes=("heads", "relpos_buckets"))
    # [heads, buckets] x [q, k] -> [heads, q, k] (one-hot matmul gathers
    # shard-friendly along `heads`).
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
    bias = jnp.einsum("hb,qkb->hqk", table.astype(self.dtype), one_hot)
    return bias[None]


# ---------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------


class _Kernel(nn.Module):
  """Owns one projection `kernel` (t5x / flaxformer layout `<name>/kernel`)."""

  shape: Tuple[int, ...]
  axes: Tuple[str, ...]
  kernel_init: types.Initializer

  @nn.compact
  def __call__(self) -> types.Array:
    return partitioning.param_with_axes(
        "kernel", self.kernel_init, self.shape, jnp.float32, axes=self.axes)


class MultiHeadDotProductAttention(nn.Module):
  """T5 multi-head attention (no biases, no query scaling) with a KV cache.

  Decoding protocol (flax's, as t5x expects): calling with `decode=True`
  when the `cache` collection is empty and mutable creates
  `cached_key` / `cached_value` `[batch, max_length, heads, kv]` (zeros) and a
  scalar `cache_index`, sized from the full-length inputs of that call. Later
  calls with `decode=True` feed one position `[batch, 1, embed]`, write its key
  and value at `cache_index`, attend to cached positions `<= cache_index` and
  advance the index. A full-sequence `bias` `[1, heads, max_length,
  max_length]` is sliced to the current query row.

  Attributes:
    num_heads: number of heads.
    head_dim: per-head query/key/value width.
    dtype: computation dtype (parameters stay float32).
    dropout_rate: dropout on the attention probabilities (train only).
    kernel_init: initializer of the projections; the query kernel's is
      divided by `sqrt(head_dim)`, which replaces the usual logit scaling.
    float32_logits: compute logits and softmax in float32 under bf16.
  """

  num_heads: int
  head_dim: int
  dtype: types.DType = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: types.Initializer = default_kernel_init
  float32_logits: bool = False

  def _projection(self, name: str, inputs: types.Array,
                  kernel_init: types.Initializer) -> types.Array:
    kernel = _Kernel((inputs.shape[-1], self.num_heads, self.head_dim),
                     ("embed", "heads", "kv"), kernel_init, name=name)()
    # [batch, length, embed] x [embed, heads, kv] -> [batch, length, heads, kv]
    projected = jnp.einsum("bld,dhk->blhk", inputs.astype(self.dtype),
                           kernel.astype(self.dtype))
    return partitioning.with_sharding_constraint(
        projected, ("batch", "length", "heads", "kv"))

  @nn.compact
  def __call__(
      self,
      inputs_q: types.Array,
      inputs_kv: types.Array,
      mask: Optional[types.Array] = None,
      bias: Optional[types.Array] = None,
      *,
      enable_dropout: bool = False,
      decode: bool = False,
  ) -> types.Array:
    """Attends from `inputs_q` to `inputs_kv`.

    Args:
      inputs_q: `[batch, q_length, embed]`.
      inputs_kv: `[batch, kv_length, embed]`.
      mask: optional `[batch, 1, q_length, kv_length]`, 1 = may attend.
      bias: optional additive `[1 or batch, heads, q_length, kv_length]`
        (relative positions); in cached decoding the full-length bias.
      enable_dropout: apply attention dropout.
      decode: use / create the autoregressive cache (self-attention only).

    Returns:
      `[batch, q_length, embed]`.
    """
    query_init = lambda *args: self.kernel_init(*args) / np.sqrt(self.head_dim)
    query = self._projection("query", inputs_q, query_init)
    key = self._projection("key", inputs_kv, self.kernel_init)
    value = self._projection("value", inputs_kv, self.kernel_init)

    if decode:
      key, value, mask, bias = self._update_cache(query, key, value, mask, bias)

    # [batch, q, heads, kv] x [batch, k, heads, kv] -> [batch, heads, q, k]
    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(logits_dtype),
                        key.astype(logits_dtype))
    if bias is not None:
      logits = logits + bias.astype(logits_dtype)
    if mask is not None:
      logits = jnp.where(mask > 0, logits, jnp.asarray(_MASK_VALUE, logits_dtype))
    weights = jax.nn.softmax(logits).astype(self.dtype)
    weights = nn.Dropout(rate=self.dropout_rate)(
        weights, deterministic=not enable_dropout)

    # [batch, heads, q, k] x [batch, k, heads, kv] -> [batch, q, heads, kv]
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    attended = partitioning.with_sharding_constraint(
        attended, ("batch", "length", "heads", "kv"))
    out_kernel = _Kernel((self.num_heads, self.head_dim, inputs_q.shape[-1]),
                         ("heads", "kv", "embed"), self.kernel_init, name="out")()
    # [batch, q, heads, kv] x [heads, kv, embed] -> [batch, q, embed]
    out = jnp.einsum("bqhd,hde->bqe", attended, out_kernel.astype(self.dtype))
    return partitioning.with_sharding_constraint(out, ("batch", "length", "embed"))

  def _update_cache(self, query, key, value, mask, bias):
    """Creates the cache, or appends one position and returns the full K/V."""
    is_initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                 value.dtype)
    cache_index = self.variable("cache", "cache_index",
                                lambda: jnp.array(0, dtype=jnp.int32))
    if not is_initialized:
      # Initialization pass: shapes come from the full-length call; the
      # outputs of this call are not used.
      return key, value, mask, bias
    batch, max_length, num_heads, head_dim = cached_key.value.shape
    if query.shape != (batch, 1, num_heads, head_dim):
      raise ValueError(
          f"Cached decoding feeds one position at a time: expected query shape "
          f"{(batch, 1, num_heads, head_dim)}, got {query.shape}. Initialize the "
          "cache with the batch size (times beams) used for decoding.")
    index = cache_index.value
    key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (0, index, 0, 0))
    value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (0, index, 0, 0))
    cached_key.value = key
    cached_value.value = value
    cache_index.value = index + 1
    # Only positions written so far are visible. [batch, 1, 1, max_length]
    visible = jnp.broadcast_to(jnp.arange(max_length) <= index,
                               (batch, 1, 1, max_length)).astype(jnp.float32)
    mask = combine_masks(mask, visible)
    if bias is not None:
      if bias.shape[-2:] != (max_length, max_length):
        raise ValueError(
            f"Cached decoding needs the position bias of the full decode length "
            f"{max_length}, got {bias.shape[-2:]}: pass max_decode_length={max_length} "
            "to the decoder.")
      # The query row of the full-length bias: [1, heads, 1, max_length].
      bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=-2)
    return key, value, mask, bias

