"""Dispatch strategies: the resolution table, explicit settings, the interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import dispatch
from moe_jax.layers import grouped_matmul
from moe_jax.layers import moe
from moe_jax.layers import routing

Plan = dispatch.Plan
ROWS, BUFFERS = Plan("sorted_rows", "cpu_blas"), Plan("sorted_buffers")
OVERFLOW = Plan("overflow")


def _settings(**overrides):
  settings = dict(dispatch="sorted", dropless_backend="auto", grouped_matmul_implementation="auto",
                  expert_choice=False, num_expert_partitions=1, dtype=jnp.float32, embed=8,
                  expert_mlp_dim=16, device_count=1)
  settings.update(overrides)
  return settings


@pytest.fixture
def efficient(monkeypatch):
  """Sets which grouped kernel `grouped_matmul` finds here ('' = none)."""
  def set_kernel(kernel):
    monkeypatch.setattr(grouped_matmul, "efficient_implementation",
                        lambda *args, **kwargs: kernel)
  return set_kernel


@pytest.mark.parametrize("kernel, overrides, expected", [
    # 'sorted' + 'auto': measured between exact rows and buffers where the
    # CPU kernels run (static rule: rows first), buffers elsewhere.
    ("cpu_blas", {}, (ROWS, BUFFERS)),
    ("", {}, (BUFFERS,)),
    ("xla", {}, (BUFFERS,)),
    ("mosaic_gpu", {}, (BUFFERS,)),
    ("cpu_blas", dict(num_expert_partitions=2), (BUFFERS,)),
    # Explicit implementations are never overridden.
    ("", dict(grouped_matmul_implementation="cpu_blas"), (ROWS,)),
    ("cpu_blas", dict(grouped_matmul_implementation="xla"), (BUFFERS,)),
    ("cpu_blas", dict(grouped_matmul_implementation="cpu_blas", num_expert_partitions=2),
     (BUFFERS,)),
    # 'dropless' + 'auto': ragged on the grouped kernel (static rule) or overflow.
    ("cpu_blas", dict(dispatch="dropless"), (Plan("ragged", "cpu_blas"), OVERFLOW)),
    ("xla", dict(dispatch="dropless"), (Plan("ragged", "xla"), OVERFLOW)),
    ("", dict(dispatch="dropless"), (OVERFLOW,)),
    ("", dict(dispatch="dropless", grouped_matmul_implementation="xla"), (OVERFLOW,)),
    ("cpu_blas", dict(dispatch="dropless", dropless_backend="overflow"), (OVERFLOW,)),
    ("cpu_blas", dict(dispatch="dropless", dropless_backend="ragged"),
     (Plan("ragged", "cpu_blas"),)),
    ("", dict(dispatch="dropless", dropless_backend="ragged"), (Plan("ragged", "xla"),)),
    ("cpu_blas", dict(dispatch="dropless", dropless_backend="ragged",
                      grouped_matmul_implementation="xla"), (Plan("ragged", "xla"),)),
    # einsum and expert choice have one strategy each.
    ("cpu_blas", dict(dispatch="einsum"), (Plan("einsum"),)),
    ("cpu_blas", dict(expert_choice=True), (Plan("expert_choice"),)),
    ("cpu_blas", dict(expert_choice=True, dispatch="einsum"), (Plan("einsum"),)),
])
def test_candidates_table(efficient, kernel, overrides, expected):
  efficient(kernel)
  assert dispatch.candidates(**_settings(**overrides)) == expected


@pytest.mark.parametrize("plan", [
    Plan("einsum"), BUFFERS, ROWS, Plan("ragged", "cpu_blas"), Plan("ragged", "xla"), OVERFLOW])
@pytest.mark.parametrize("kernel", ["cpu_blas", "", "xla"])
def test_explicit_fields_select_exactly_their_plan(efficient, plan, kernel):
  # How measured candidates are forced, and "explicit is never overridden".
  efficient(kernel)
  assert dispatch.candidates(**_settings(**dispatch.explicit_fields(plan))) == (plan,)


def test_resolve_asks_the_chooser_only_when_there_is_a_choice(efficient):
  asked = []

  def choose(plans):
    asked.append(plans)
    return plans[-1]

  efficient("cpu_blas")
  assert dispatch.resolve(choose=choose, **_settings()) == BUFFERS
  assert asked == [(ROWS, BUFFERS)]
  # Explicit: nothing to choose.
  assert dispatch.resolve(choose=choose, **_settings(grouped_matmul_implementation="cpu_blas")) \
      == ROWS
  # Several devices: the layer is partitioned, a one-device timing would
  # not represent it, so the static rule applies (ragged here).
  assert dispatch.resolve(choose=choose, **_settings(dispatch="dropless", device_count=8)) \
      == Plan("ragged", "cpu_blas")
  # No chooser: the static rule.
  assert dispatch.resolve(**_settings()) == ROWS
  assert len(asked) == 1


def test_resolve_rejects_a_chooser_that_invents_a_plan(efficient):
  efficient("cpu_blas")
  with pytest.raises(ValueError, match="not one of"):
    dispatch.resolve(choose=lambda plans: Plan("einsum"), **_settings())


@pytest.mark.parametrize("name", sorted(dispatch.STRATEGIES))
def test_every_strategy_has_the_one_interface(name):
  # Tokens [G, S, d], a decision, the experts, a capacity ->
  # (output [G, S, d], kept, slots); each mode's strategies agree here
  # (capacity = group size: nothing drops).
  groups, group_size, embed, experts, k = 2, 8, 4, 4, 2
  x = jax.random.normal(jax.random.PRNGKey(0), (groups, group_size, embed))
  router = (routing.ExpertChoiceRouter() if name == "expert_choice"
            else routing.TokensChooseRouter(num_selected_experts=k))
  capacity = group_size
  decision, _ = router.init_with_output(
      jax.random.PRNGKey(1), x, num_experts=experts, expert_capacity=capacity,
      group_padding=jnp.zeros((groups, group_size), bool), padding_mask=None,
      enable_dropout=False)
  weights = moe.Experts(num_experts=experts, mlp_dim=16).init_with_output(
      jax.random.PRNGKey(2), embed)[0]
  layer_experts = moe.LayerExperts(weights=weights, activations=("gelu", "linear"),
                                   implementation="xla")
  result = dispatch.STRATEGIES[name](x, decision, layer_experts, capacity)
  assert result.output.shape == x.shape
  if name == "expert_choice":
    assert result.kept.shape == (groups, experts, capacity)
    reference = dispatch.einsum_strategy(x, decision, layer_experts, capacity)
  else:
    assert result.kept.shape == (groups, group_size, k)
    reference = dispatch.sorted_buffers_strategy(x, decision, layer_experts, capacity)
  assert int(result.slots) == (int(jnp.sum(decision.valid)) if name == "ragged"
                               else groups * experts * capacity)
  np.testing.assert_allclose(result.output, reference.output, atol=1e-5, rtol=1e-5)


def test_plan_names():
  assert ROWS.name == "sorted_rows/cpu_blas"
  assert BUFFERS.name == "sorted_buffers"
