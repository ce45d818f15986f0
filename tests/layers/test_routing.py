"""Tests for routing: hand-computed decisions and loss formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import dispatch
from moe_jax.layers import routing
from tests.layers import reference_moe


def _route(router, logits, capacity=4, enable_dropout=False, rngs=None):
  """Routes tokens whose router logits are exactly `logits` [groups, size, E].

  With inputs = logits and router weights = identity, the router's logits
  equal the inputs, so every test states its logits directly.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_experts = logits.shape[-1]
  params = {"params": {"w": jnp.eye(num_experts)}}
  group_padding = jnp.zeros(logits.shape[:2], bool)
  apply = jax.jit(router.apply, static_argnames=(
      "num_experts", "expert_capacity", "enable_dropout"))
  return apply(params, logits, num_experts=num_experts, expert_capacity=capacity,
               group_padding=group_padding, enable_dropout=enable_dropout, rngs=rngs)


def _kept(decision, capacity):
  return np.asarray(decision.valid & (decision.priority < capacity))


def test_switch_top1_drops_in_position_order():
  # Tokens 0-2 prefer expert 0, token 3 prefers expert 1; capacity 2.
  logits = [[[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]]
  d = _route(routing.TokensChooseRouter(num_selected_experts=1), logits, capacity=2)
  np.testing.assert_array_equal(d.expert_index[0, :, 0], [0, 0, 0, 1])
  np.testing.assert_array_equal(d.priority[0, :, 0], [0, 1, 2, 0])
  np.testing.assert_array_equal(_kept(d, 2)[0, :, 0], [True, True, False, True])
  # Combine weight = raw softmax probability of the chosen expert.
  np.testing.assert_allclose(d.combine_weights[0, 0, 0], 1 / (1 + np.exp(-2.0)), rtol=1e-6)


def test_batch_prioritized_routing_serves_confident_tokens_first():
  logits = [[[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]]
  d = _route(routing.TokensChooseRouter(num_selected_experts=1,
                                        batch_prioritized_routing=True),
             logits, capacity=2)
  # Confidence order of the expert-0 tokens: token 2 (p=.95), 0 (.88), 1 (.73).
  np.testing.assert_array_equal(d.priority[0, :, 0], [1, 2, 0, 0])
  np.testing.assert_array_equal(_kept(d, 2)[0, :, 0], [True, False, True, True])


def test_top2_first_choices_take_capacity_before_second_choices():
  # Preferences: t0: e0 > e1, t1: e0 > e2, t2: e0 > e1. Capacity 2.
  logits = [[[3.0, 2.0, 0.0], [3.0, 0.0, 2.0], [3.0, 2.0, 0.0]]]
  d = _route(routing.TokensChooseRouter(num_selected_experts=2), logits, capacity=2)
  np.testing.assert_array_equal(d.expert_index[0], [[0, 1], [0, 2], [0, 1]])
  # e0 serves the first choices t0, t1, t2 in that order; then second
  # choices: e1 gets t0 then t2, e2 gets t1.
  np.testing.assert_array_equal(d.priority[0], [[0, 0], [1, 0], [2, 1]])
  np.testing.assert_array_equal(_kept(d, 2)[0], [[True, True], [True, True], [False, True]])


@pytest.mark.parametrize("policy, expected_second", [
    ("all", [True, True]),
    ("threshold", [True, False]),
])
def test_gshard_gates_normalized_and_deterministic_policies(policy, expected_second):
  # Token 0: normalized second gate 0.4 (> 0.2); token 1: 0.1 (< 0.2).
  p0 = np.array([0.6, 0.4, 0.0]) * 0.9 + 0.1 / 3
  p1 = np.array([0.9, 0.1, 0.0]) * 0.9 + 0.1 / 3
  logits = np.log(np.stack([p0, p1]))[None]
  router = routing.GShardTop2Router(second_expert_policy=policy,
                                    eval_second_expert_policy=policy)
  d = _route(router, logits)
  gates = np.sort(np.stack([p0, p1]), axis=-1)[:, ::-1][:, :2]
  gates = gates / gates.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(d.valid[0, :, 1]), expected_second)
  np.testing.assert_allclose(d.combine_weights[0, :, 0], gates[:, 0], rtol=1e-5)
  np.testing.assert_allclose(d.combine_weights[0, :, 1],
                             np.where(expected_second, gates[:, 1], 0.0), rtol=1e-5)


def test_gshard_random_policy_keeps_second_with_probability_gate_over_threshold():
  # Normalized second gate 0.1 everywhere: kept with probability 0.1 / 0.2.
  probs = np.array([0.9, 0.1])
  logits = np.broadcast_to(np.log(probs), (1, 8192, 2))
  router = routing.GShardTop2Router(second_expert_policy="random")
  d = _route(router, logits, enable_dropout=True, rngs={"gating": jax.random.PRNGKey(0)})
  rate = float(np.mean(d.valid[0, :, 1]))
  assert 0.47 < rate < 0.53, rate
  # The first expert is always used.
  assert bool(np.all(d.valid[0, :, 0]))


def test_expert_choice_each_expert_takes_its_top_c_tokens():
  logits = [[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 0.5]]]
  d = _route(routing.ExpertChoiceRouter(), logits, capacity=2)
  # p(e0) per token: .73, .95, .12, .38 -> e0 takes t1, t0; e1 takes t2, t3.
  np.testing.assert_array_equal(d.token_index[0], [[1, 0], [2, 3]])
  assert float(d.auxiliary_loss) == 0.0


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_expert_choice_never_overfills_an_expert(capacity):
  logits = jax.random.normal(jax.random.PRNGKey(capacity), (2, 8, 4))
  d = _route(routing.ExpertChoiceRouter(), logits, capacity=capacity)
  mask, _ = dispatch.einsum_masks(d, 4, capacity, jnp.float32)
  per_expert = np.asarray(mask).sum(axis=(1, 3))  # [groups, experts]
  assert per_expert.max() <= capacity
  # Each slot holds exactly one token; a token sits at most once per expert.
  assert np.asarray(mask).sum(axis=1).max() <= 1
  assert np.asarray(mask).sum(axis=3).max() <= 1


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_matches_hand_formula(k):
  rng = np.random.default_rng(k)
  logits = rng.normal(size=(2, 6, 4)).astype(np.float32)
  d = _route(routing.TokensChooseRouter(num_selected_experts=k), logits)
  probs = reference_moe.softmax(logits.astype(np.float64))
  top = np.argsort(-probs, axis=-1)[..., :k]
  f = np.zeros((2, 4))
  for g in range(2):
    for t in range(6):
      f[g, top[g, t]] += 1 / 6
  expected = 16 * np.mean(f * probs.mean(axis=1))
  np.testing.assert_allclose(float(d.auxiliary_loss), expected, rtol=1e-5)


def test_balanced_router_loss_is_k():
  # Uniform probabilities: P = 1/E and sum_e f = k, so the loss is exactly k.
  logits = np.zeros((1, 8, 4))
  for k in (1, 2):
    d = _route(routing.TokensChooseRouter(num_selected_experts=k), logits)
    np.testing.assert_allclose(float(d.auxiliary_loss), k, rtol=1e-6)


def test_router_z_loss_matches_hand_formula():
  logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
  d = _route(routing.TokensChooseRouter(num_selected_experts=1), logits)
  lse = np.log(np.exp([1.0, 2.0, 3.0]).sum()), np.log(3.0)
  np.testing.assert_allclose(float(d.router_z_loss), np.mean(np.square(lse)), rtol=1e-6)


def test_ignore_padding_tokens_excludes_zero_vectors():
  logits = np.array([[[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]]])
  router = routing.TokensChooseRouter(num_selected_experts=1, ignore_padding_tokens=True)
  d = _route(router, logits)
  np.testing.assert_array_equal(np.asarray(d.valid[0, :, 0]), [True, False, True])
  # The padding token's logsumexp (log 2) does not enter the z-loss.
  expected = np.mean([np.log(np.exp(2) + 1) ** 2, np.log(np.exp(3) + 1) ** 2])
  np.testing.assert_allclose(float(d.router_z_loss), expected, rtol=1e-6)


def test_jitter_only_in_training():
  logits = np.random.default_rng(0).normal(size=(1, 16, 4))
  router = routing.TokensChooseRouter(num_selected_experts=1, jitter_noise=0.5)
  rngs = {"jitter": jax.random.PRNGKey(3)}
  eval_a = _route(router, logits, rngs=rngs)
  plain = _route(routing.TokensChooseRouter(num_selected_experts=1), logits)
  np.testing.assert_array_equal(eval_a.router_probs, plain.router_probs)
  train = _route(router, logits, enable_dropout=True, rngs=rngs)
  assert not np.allclose(train.router_probs, plain.router_probs)


@pytest.mark.parametrize("router, message", [
    (routing.TokensChooseRouter(num_selected_experts=3), "k=3"),
    (routing.GShardTop2Router(second_expert_policy="sometimes"), "second_expert_policy"),
    (routing.TokensChooseRouter(jitter_noise=1.5), "jitter_noise"),
])
def test_bad_router_configs_raise(router, message):
  with pytest.raises(ValueError, match=message):
    _route(router, np.zeros((1, 2, 2)))
