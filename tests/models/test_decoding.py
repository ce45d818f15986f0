"""Tests for decoding: beam search and sampling on hand-built toy models."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import decoding

EOS = 1
NEG = -1e9


def markov_tokens_to_logits(log_table):
  """A toy "model": next-token log-probs depend on the last two tokens.

  The previous token lives in the cache, so beams that reorder without
  reordering the cache would read the wrong row.

  Args:
    log_table: [vocab, vocab, vocab] log p(next | previous, current).
  """
  log_table = jnp.asarray(log_table, jnp.float32)

  def tokens_to_logits(state):
    current = state.cur_token[:, 0]
    previous = state.cache["previous"]
    return log_table[previous, current], {"previous": current}

  return tokens_to_logits


def first_order_table(rows):
  """Second-order table that ignores the previous token: rows[current]."""
  rows = np.log(np.asarray(rows, np.float64) + 1e-30)
  vocab = rows.shape[0]
  return np.broadcast_to(rows[None], (vocab, vocab, vocab))


def brute_force_best(log_table, max_len, alpha):
  """Best finished sequence (and score) by enumerating all continuations."""
  vocab = log_table.shape[0]
  best = (-math.inf, None)
  for length in range(1, max_len + 1):
    for body in itertools.product(range(2, vocab), repeat=length - 1):
      seq = list(body) + [EOS]
      previous, current, log_prob = 0, 0, 0.0
      for token in seq:
        log_prob += log_table[previous, current, token]
        previous, current = current, token
      score = log_prob / ((5.0 + length) / 6.0) ** alpha
      if score > best[0]:
        best = (score, seq + [0] * (max_len - length))
  return best


def run_beam(log_table, max_len, beams, alpha, batch=1):
  inputs = jnp.zeros((batch, max_len), jnp.int32)
  cache = {"previous": jnp.zeros((batch,), jnp.int32)}
  return decoding.beam_search(inputs, cache, markov_tokens_to_logits(log_table), EOS,
                              num_decodes=beams, alpha=alpha)


@pytest.mark.parametrize("alpha, expected", [(0.0, [EOS, 0]), (1.0, [2, EOS])])
def test_beam_search_length_penalty_by_hand(alpha, expected):
  # From BOS: EOS 0.5, token 2 0.5; after 2: EOS ~1. "EOS" has log-prob
  # log(.5) and length 1; "2 EOS" log(.5) + log(.999) and length 2.
  # alpha=0: -0.6931 beats -0.6941. alpha=1: -0.6941 / (7/6) = -0.5950 beats
  # -0.6931 / 1.
  rows = np.zeros((4, 4))
  rows[0] = [0, 0.5, 0.5, 0]
  rows[2] = [0, 0.999, 0, 0.001]
  rows[3] = [0, 1.0, 0, 0]
  decodes, scores = run_beam(first_order_table(rows), max_len=2, beams=2, alpha=alpha)
  np.testing.assert_array_equal(decodes[0, -1], expected)
  expected_score = (math.log(0.5) if alpha == 0 else
                    (math.log(0.5) + math.log(0.999)) / (7 / 6))
  np.testing.assert_allclose(scores[0, -1], expected_score, rtol=1e-5)


def test_beam_search_beats_greedy_by_hand():
  # Greedy takes 2 (0.6) then must continue; "3 EOS" = 0.4 * 0.9 = 0.36 is the
  # most likely finished sequence, "2 EOS" only 0.6 * 0.25 = 0.15.
  rows = np.zeros((4, 4))
  rows[0] = [0, 0, 0.6, 0.4]
  rows[2] = [0, 0.25, 0.4, 0.35]
  rows[3] = [0, 0.9, 0.05, 0.05]
  table = first_order_table(rows)
  decodes, scores = run_beam(table, max_len=2, beams=2, alpha=0.0)
  np.testing.assert_array_equal(decodes[0, -1], [3, EOS])
  np.testing.assert_allclose(scores[0, -1], math.log(0.36), rtol=1e-5)
  greedy, _ = decoding.greedy(jnp.zeros((1, 2), jnp.int32),
                              {"previous": jnp.zeros((1,), jnp.int32)},
                              markov_tokens_to_logits(table), EOS)
  np.testing.assert_array_equal(greedy[0, -1], [2, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_matches_exhaustive_search(seed):
  # With 2 non-EOS tokens and 3 steps there are at most 4 live prefixes, so a
  # beam of 4 is exact: it must find the enumeration's optimum.
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(3), size=(4, 4))
  table = np.full((4, 4, 4), NEG)
  table[..., 1:] = np.log(probs)
  max_len, alpha = 3, 0.6
  best_score, best_seq = brute_force_best(table, max_len, alpha)
  decodes, scores = run_beam(table, max_len, beams=4, alpha=alpha, batch=2)
  for row in range(2):
    np.testing.assert_array_equal(decodes[row, -1], best_seq)
    np.testing.assert_allclose(scores[row, -1], best_score, rtol=1e-5)
  # Beams come sorted by increasing score.
  assert np.all(np.diff(np.asarray(scores), axis=-1) >= 0)


def test_greedy_follows_argmax_and_stops_at_eos():
  rows = np.zeros((4, 4))
  rows[0] = [0, 0.1, 0.2, 0.7]
  rows[3] = [0, 0.2, 0.5, 0.3]
  rows[2] = [0, 0.8, 0.1, 0.1]
  decodes, log_probs = decoding.greedy(jnp.zeros((1, 5), jnp.int32),
                                       {"previous": jnp.zeros((1,), jnp.int32)},
                                       markov_tokens_to_logits(first_order_table(rows)), EOS)
  np.testing.assert_array_equal(decodes[0, 0], [3, 2, EOS, 0, 0])
  np.testing.assert_allclose(log_probs[0, 0], math.log(0.7 * 0.5 * 0.8), rtol=1e-5)


def test_forced_prompt_tokens_are_kept():
  rows = np.full((4, 4), 0.25)
  # Decoder-input alignment: position 0 is BOS, so [0, 3, 2] forces 3 then 2.
  prompt = jnp.array([[0, 3, 2, 0, 0]], jnp.int32)
  decodes, _ = decoding.greedy(prompt, {"previous": jnp.zeros((1,), jnp.int32)},
                               markov_tokens_to_logits(first_order_table(rows)), EOS)
  np.testing.assert_array_equal(decodes[0, 0, :2], [3, 2])
  beam, _ = decoding.beam_search(prompt, {"previous": jnp.zeros((1,), jnp.int32)},
                                 markov_tokens_to_logits(first_order_table(rows)), EOS,
                                 num_decodes=2)
  np.testing.assert_array_equal(beam[0, -1, :2], [3, 2])


def test_sampling_respects_topk_and_temperature():
  rows = np.zeros((5, 5))
  rows[:, 1:] = [0.1, 0.2, 0.3, 0.4]
  table = first_order_table(rows)
  cache = {"previous": jnp.zeros((2,), jnp.int32)}
  decodes, _ = decoding.temperature_sample(
      jnp.zeros((2, 6), jnp.int32), cache, markov_tokens_to_logits(table), EOS,
      decode_rng=jax.random.PRNGKey(0), num_decodes=8, temperature=1.0, topk=2)
  assert decodes.shape == (2, 8, 6)
  assert set(np.unique(decodes)) <= {3, 4}
  with pytest.raises(ValueError, match="decode_rng"):
    decoding.temperature_sample(jnp.zeros((1, 2), jnp.int32), cache,
                                markov_tokens_to_logits(table), EOS, temperature=0.5)


def test_topp_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  filtered = decoding._filter_logits(logits, topk=0, topp=0.7)
  # 0.5 then 0.3 reach 0.8 >= 0.7: the nucleus is the first two tokens.
  np.testing.assert_array_equal(np.asarray(filtered[0]) > -1e6, [True, True, False, False])
