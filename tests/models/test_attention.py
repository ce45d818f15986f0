"""Tests for attention: T5 relative position buckets, masks, the decode cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import attention


def t5_bucket_by_hand(relative_position, bidirectional, num_buckets=32, max_distance=128):
  """Scalar restatement of the T5 paper's bucketing, for comparison."""
  distance = -relative_position
  offset = 0
  if bidirectional:
    num_buckets //= 2
    if distance < 0:
      offset = num_buckets
    distance = abs(distance)
  else:
    distance = max(distance, 0)
  exact = num_buckets // 2
  if distance < exact:
    return offset + distance
  scaled = math.log(distance / exact) / math.log(max_distance / exact) * (num_buckets - exact)
  return offset + min(exact + int(scaled), num_buckets - 1)


@pytest.mark.parametrize("bidirectional, cases", [
    # (key - query, bucket): keys before the query use buckets 0..15, keys
    # after it 16..31; distance 20 -> 8 + int(8 * ln(2.5) / ln(16)) = 10.
    (True, [(0, 0), (-1, 1), (1, 17), (-7, 7), (-8, 8), (-20, 10), (20, 26), (-200, 15),
            (200, 31)]),
    # Decoder: 16 exact buckets; 20 -> 16 + int(16 * ln(1.25) / ln(8)) = 17;
    # future keys share bucket 0.
    (False, [(0, 0), (-1, 1), (-15, 15), (-20, 17), (-127, 31), (-500, 31), (5, 0)]),
])
def test_relative_position_bucket_known_values(bidirectional, cases):
  positions = jnp.array([rel for rel, _ in cases])
  buckets = attention.relative_position_bucket(positions, bidirectional)
  np.testing.assert_array_equal(buckets, [b for _, b in cases])
  np.testing.assert_array_equal(buckets, [t5_bucket_by_hand(r, bidirectional) for r, _ in cases])


def test_relative_position_bucket_matches_restatement_everywhere():
  rel = np.arange(-300, 300)
  for bidirectional in (True, False):
    np.testing.assert_array_equal(
        attention.relative_position_bucket(jnp.asarray(rel), bidirectional),
        [t5_bucket_by_hand(int(r), bidirectional) for r in rel])


def test_decoder_mask_is_causal_padding_and_segment_aware():
  targets = jnp.array([[3, 4, 5, 6, 0]])
  segments = jnp.array([[1, 1, 2, 2, 0]])
  mask = attention.make_decoder_mask(targets, segments)
  expected = np.array([
      [1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0],
      [0, 0, 1, 0, 0],
      [0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0],
  ])
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_cached_decoding_requires_one_position():
  layer = attention.MultiHeadDotProductAttention(num_heads=2, head_dim=4)
  x = jnp.ones((2, 3, 8))
  variables = layer.init(jax.random.PRNGKey(0), x, x)
  _, cache = layer.apply(variables, x, x, decode=True, mutable=["cache"])
  assert cache["cache"]["cached_key"].shape == (2, 3, 2, 4)
  with pytest.raises(ValueError, match="one position at a time"):
    layer.apply({**variables, **cache}, x, x, decode=True, mutable=["cache"])
