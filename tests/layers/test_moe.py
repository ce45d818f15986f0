"""Tests for MoeLayer: dispatch equivalence, an independent oracle, groups, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kernels import cpu_gmm
from moe_jax.layers import dispatch
from moe_jax.layers import moe
from moe_jax.layers import routing
from tests.layers import reference_moe

EMBED, FF, EXPERTS = 8, 16, 4
CPU_BLAS = pytest.param("cpu_blas", marks=pytest.mark.skipif(
    cpu_gmm.unavailable_reason() != "",
    reason=f"CPU grouped matmul kernels unavailable: {cpu_gmm.unavailable_reason()}"))


def _layer(dispatch="sorted", router=None, **kwargs):
  kwargs.setdefault("max_group_size", 16)
  return moe.MoeLayer(
      num_experts=kwargs.pop("num_experts", EXPERTS),
      router=router or routing.TokensChooseRouter(num_selected_experts=2),
      expert_mlp_dim=FF, dispatch=dispatch, **kwargs)


def _jit_apply(layer):
  """`layer.apply`, compiled (eager execution of many small ops is slow)."""
  return jax.jit(layer.apply, static_argnames=("enable_dropout", "mutable"))


def _inputs(shape=(2, 16, EMBED), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _loss_and_grads(layer, params, x, enable_dropout=False):
  def loss(p, x):
    y, state = _jit_apply(layer)({"params": p}, x, enable_dropout=enable_dropout,
                           mutable=("intermediates",),
                           rngs={"gating": jax.random.PRNGKey(7)})
    metrics = moe.collect_moe_metrics(state["intermediates"])
    return jnp.sum(y) + metrics["auxiliary_loss"] + metrics["router_z_loss"], (y, metrics)
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, (y, metrics)), grads = grad_fn(params, x)
  return y, grads, metrics


def _assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


ROUTERS = {
    "switch": lambda: routing.TokensChooseRouter(num_selected_experts=1),
    "st_top2": lambda: routing.TokensChooseRouter(num_selected_experts=2),
    "st_top2_bpr": lambda: routing.TokensChooseRouter(num_selected_experts=2,
                                                      batch_prioritized_routing=True),
    "gshard": lambda: routing.GShardTop2Router(second_expert_policy="random"),
}


@pytest.mark.parametrize("router_name", sorted(ROUTERS))
def test_all_dispatch_modes_agree_when_nothing_drops(router_name):
  x = _inputs()
  # Capacity = group size: no expert can overflow.
  layers = {d: _layer(d, ROUTERS[router_name](), train_capacity_factor=EXPERTS,
                      eval_capacity_factor=EXPERTS)
            for d in ("einsum", "sorted", "dropless")}
  params = layers["einsum"].init(jax.random.PRNGKey(1), x)["params"]
  results = {d: _loss_and_grads(layer, params, x, enable_dropout=True)
             for d, layer in layers.items()}
  assert float(results["einsum"][2]["fraction_tokens_left_behind"]) == 0.0
  for d in ("sorted", "dropless"):
    np.testing.assert_allclose(results[d][0], results["einsum"][0], atol=1e-5, rtol=1e-5)
    _assert_trees_close(results[d][1], results["einsum"][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["auto", CPU_BLAS])
@pytest.mark.parametrize("router_name", sorted(ROUTERS) + ["expert_choice"])
def test_einsum_and_sorted_agree_exactly_when_dropping(router_name, implementation):
  # With 'cpu_blas', 'sorted' runs the kept assignments as exact rows.
  x = _inputs()
  router = (routing.ExpertChoiceRouter() if router_name == "expert_choice"
            else ROUTERS[router_name]())
  kwargs = dict(train_capacity_factor=0.5, eval_capacity_factor=0.5, min_expert_capacity=1)
  einsum_layer = _layer("einsum", router, **kwargs)
  sorted_layer = _layer("sorted", router, grouped_matmul_implementation=implementation, **kwargs)
  params = einsum_layer.init(jax.random.PRNGKey(1), x)["params"]
  y_e, g_e, m_e = _loss_and_grads(einsum_layer, params, x)
  y_s, g_s, m_s = _loss_and_grads(sorted_layer, params, x)
  assert float(m_e["fraction_tokens_left_behind"]) > 0.0
  np.testing.assert_allclose(y_s, y_e, atol=1e-6, rtol=1e-6)
  _assert_trees_close(g_s, g_e, atol=1e-5, rtol=1e-5)
  _assert_trees_close(m_s, m_e, atol=1e-7)


@pytest.mark.parametrize("dispatch", ["einsum", "sorted", "dropless"])
@pytest.mark.parametrize("k, gshard", [(1, False), (2, False), (2, True)])
def test_matches_independent_numpy_moe(dispatch, k, gshard):
  x = _inputs((1, 12, EMBED), seed=3)
  router = (routing.GShardTop2Router(eval_second_expert_policy="all") if gshard
            else routing.TokensChooseRouter(num_selected_experts=k))
  layer = _layer(dispatch, router, eval_capacity_factor=EXPERTS)
  params = layer.init(jax.random.PRNGKey(2), x)["params"]
  y = _jit_apply(layer)({"params": params}, x)
  e = params["expert"]
  expected = reference_moe.token_choice_moe(
      np.asarray(x[0], np.float64), np.asarray(params["router"]["w"], np.float64),
      np.asarray(e["wi_0"]), np.asarray(e["wi_1"]), np.asarray(e["wo"]), k, gshard=gshard)
  np.testing.assert_allclose(np.asarray(y[0]), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("max_rows, experts, expected", [
    (5632, 8, 1024),   # 704 rows per expert -> 1024
    (8032, 128, 64),   # 63 -> 64
    (10, 4, 8),        # at least 8
])
def test_overflow_block_size_bounds_blocks(max_rows, experts, expected):
  block = dispatch.overflow_block_size(max_rows, experts)
  assert block == expected
  assert dispatch.row_layout_size(max_rows, experts, block) // block <= 2 * experts


@pytest.mark.parametrize("block_size", [1, 4])
def test_row_layout_sorts_assignments_by_expert(block_size):
  # 1 group of 3 tokens, k=2, 3 experts; capacity 1 leaves the overflow.
  decision = routing.TokenChoiceDecision(
      expert_index=jnp.array([[[0, 1], [0, 2], [0, 1]]]),
      combine_weights=jnp.ones((1, 3, 2)),
      priority=jnp.array([[[0, 0], [1, 0], [2, 1]]]),
      valid=jnp.ones((1, 3, 2), bool), router_probs=jnp.zeros((1, 3, 3)),
      token_mask=jnp.ones((1, 3), bool), auxiliary_loss=0.0, router_z_loss=0.0)
  layout = dispatch.row_layout(decision, 3, first_slot=1, block_size=block_size)
  # Overflow: expert 0 gets tokens 1, 2 (first choices); expert 1 gets token 2.
  pad = lambda n: -(-n // block_size) * block_size
  np.testing.assert_array_equal(layout.group_sizes, [pad(2), pad(1), 0])
  filled = np.asarray(layout.slots.slot_filled[0])
  tokens = np.asarray(layout.slots.token_of_slot[0])[filled]
  np.testing.assert_array_equal(tokens, [1, 2, 2])
  np.testing.assert_array_equal(np.asarray(layout.row_expert)[filled], [0, 0, 1])


@pytest.mark.parametrize("dispatch_mode", ["sorted", "dropless"])
def test_skewed_routing_overflows_capacity(dispatch_mode):
  # Positive inputs and a router that only scores expert 0: every token's
  # first choice is expert 0 and its second (a tie, broken by index) expert 1,
  # so those experts overflow any capacity below the group size.
  x = jnp.abs(_inputs((1, 16, EMBED), seed=4))
  layer = _layer(dispatch_mode, routing.TokensChooseRouter(num_selected_experts=2),
                 eval_capacity_factor=EXPERTS if dispatch_mode == "sorted" else 1.0,
                 min_expert_capacity=1)
  params = layer.init(jax.random.PRNGKey(2), x)["params"]
  params["router"]["w"] = jnp.zeros_like(params["router"]["w"]).at[:, 0].set(1.0)
  y, state = _jit_apply(layer)({"params": params}, x, mutable=("intermediates",))
  fractions = moe.collect_moe_metrics(state["intermediates"])["expert_fraction"]
  np.testing.assert_allclose(fractions, [0.5, 0.5, 0.0, 0.0])
  e = params["expert"]
  expected = reference_moe.token_choice_moe(
      np.asarray(x[0], np.float64), np.asarray(params["router"]["w"], np.float64),
      np.asarray(e["wi_0"]), np.asarray(e["wi_1"]), np.asarray(e["wo"]), 2)
  np.testing.assert_allclose(np.asarray(y[0]), expected, atol=1e-5, rtol=1e-4)
  # Gradients through the overflow pass equal those of a capacity that
  # fits everything.
  no_drop = _layer("einsum", routing.TokensChooseRouter(num_selected_experts=2),
                   train_capacity_factor=EXPERTS, eval_capacity_factor=EXPERTS)
  _assert_trees_close(_loss_and_grads(layer, params, x)[1],
                      _loss_and_grads(no_drop, params, x)[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch, length, max_group_size, partitions, by_sequence, expected", [
    (8, 512, 1024, 1, False, (4, 1024)),   # One device: the group size asked for.
    (8, 512, 1024, 8, False, (8, 512)),    # Group count rounded up to the EP degree.
    (1, 15, 4, 1, False, (4, 4)),          # Padded up to 16 tokens, never truncated.
    (3, 1, 4096, 2, False, (2, 2)),
    (3, 7, 4, 1, True, (3, 7)),            # One group per sequence.
])
def test_group_shape(batch, length, max_group_size, partitions, by_sequence, expected):
  layer = moe.MoeLayer(num_experts=8, router=routing.TokensChooseRouter(),
                       max_group_size=max_group_size, num_expert_partitions=partitions,
                       group_by_sequence=by_sequence)
  assert layer.group_shape(batch, length) == expected


@pytest.mark.parametrize("cf, k, scales, group_size, minimum, expected", [
    (1.25, 2, False, 1024, 4, 160),   # round(1.25 * 1024 / 8)
    (1.25, 2, True, 1024, 4, 320),    # x k
    (1.0, 1, False, 16, 4, 4),        # The minimum capacity applies.
    (2.0, 1, False, 8, 4, 4),         # round(2 * 8 / 8) = 2 -> min 4
    (8.0, 1, False, 8, 4, 8),         # Capped at the group size.
])
def test_expert_capacity_rule(cf, k, scales, group_size, minimum, expected):
  layer = moe.MoeLayer(num_experts=8, router=routing.TokensChooseRouter(num_selected_experts=k),
                       eval_capacity_factor=cf, capacity_scales_with_k=scales,
                       min_expert_capacity=minimum)
  assert layer.capacity(group_size, train=False) == expected


def test_fixed_expert_capacity_overrides_factors():
  layer = moe.MoeLayer(num_experts=8, router=routing.TokensChooseRouter(),
                       expert_capacity=64, train_capacity_factor=0.1)
  assert layer.capacity(1024, train=True) == 64
  assert layer.capacity(16, train=False) == 16


def test_group_by_sequence_routes_each_row_independently():
  # Row 1 repeats row 0: per-row groups give both rows identical outputs even
  # when capacity drops tokens (a shared group would drop row 1's copies).
  row = _inputs((1, 8, EMBED), seed=9)
  x = jnp.concatenate([row, row], axis=0)
  layer = _layer("sorted", group_by_sequence=True, expert_capacity=1)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  y = _jit_apply(layer)({"params": params}, x)
  np.testing.assert_allclose(y[0], y[1], atol=1e-6)
  shared = _jit_apply(_layer("sorted", num_groups=1, expert_capacity=1))({"params": params}, x)
  assert not np.allclose(shared[0], shared[1])


def test_padding_tokens_are_not_routed_and_outputs_match_unpadded():
  # 15 tokens with groups of 4 -> one padding token in the last group.
  x = _inputs((1, 15, EMBED), seed=5)
  layer = _layer("sorted", max_group_size=4, eval_capacity_factor=EXPERTS)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  y, state = _jit_apply(layer)({"params": params}, x, mutable=("intermediates",))
  assert y.shape == x.shape
  # Same tokens through groups of 5 (no padding): identical per-token output
  # since nothing drops.
  y_ref = _jit_apply(_layer("sorted", max_group_size=5, eval_capacity_factor=EXPERTS))(
      {"params": params}, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)
  metrics = moe.collect_moe_metrics(state["intermediates"])
  # 15 real tokens x 2 choices fill 30 of 4 groups x 4 experts x 4 slots.
  np.testing.assert_allclose(float(metrics["expert_usage"]), 30 / 64, rtol=1e-6)


def test_metrics_hand_computed_for_a_dropping_switch_layer():
  # One group of 4 tokens, 2 experts, capacity 1 (cf 0.5): expert choices
  # come from the router logits set through the identity-like weights.
  logits = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0]], np.float32)
  x = jnp.asarray(logits)[None]  # [1, 4, 2]: embed = experts = 2
  layer = moe.MoeLayer(num_experts=2, router=routing.TokensChooseRouter(),
                       expert_mlp_dim=4, max_group_size=4, eval_capacity_factor=0.5,
                       min_expert_capacity=1)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  params["router"]["w"] = jnp.eye(2)
  _, state = _jit_apply(layer)({"params": params}, x, mutable=("intermediates",))
  m = moe.collect_moe_metrics(state["intermediates"])
  probs = reference_moe.softmax(logits.astype(np.float64))
  # Tokens 0 and 2 win their experts' single slots; 1 and 3 are left behind.
  np.testing.assert_allclose(float(m["fraction_tokens_left_behind"]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(m["expert_usage"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m["expert_fraction"]), [0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(float(m["router_confidence"]), probs.max(-1).mean(), rtol=1e-5)


def test_expert_dropout_only_in_training():
  x = _inputs()
  layer = _layer("sorted", expert_dropout_rate=0.5)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  evals = [_jit_apply(layer)({"params": params}, x, rngs={"dropout": jax.random.PRNGKey(i)})
           for i in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  trains = [_jit_apply(layer)({"params": params}, x, enable_dropout=True,
                        rngs={"dropout": jax.random.PRNGKey(i)}) for i in range(2)]
  assert not np.allclose(trains[0], trains[1])


def test_params_carry_logical_axes_and_expert_in_path():
  layer = _layer("sorted")
  variables = layer.init(jax.random.PRNGKey(0), _inputs())
  axes = jax.tree.map(lambda a: a.names, variables["params_axes"],
                      is_leaf=lambda a: hasattr(a, "names"))
  assert axes["expert"]["wi_0_axes"] == ("expert", "embed", "expert_mlp")
  assert axes["expert"]["wo_axes"] == ("expert", "expert_mlp", "embed")
  assert axes["router"]["w_axes"] == ("embed", "unmodeled")
  assert variables["params"]["expert"]["wi_0"].shape == (EXPERTS, EMBED, FF)


def test_bfloat16_experts_keep_float32_router():
  x = _inputs().astype(jnp.bfloat16)
  layer = _layer("sorted", dtype=jnp.bfloat16)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  y, state = _jit_apply(layer)({"params": params}, x, mutable=("intermediates",))
  assert y.dtype == jnp.bfloat16
  assert params["router"]["w"].dtype == jnp.float32
  assert moe.collect_moe_metrics(state["intermediates"])["router_z_loss"].dtype == jnp.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(dispatch="scatter"), "Unknown dispatch"),
    (dict(router=routing.TokensChooseRouter(num_selected_experts=5)), "k=5"),
    (dict(num_groups=6, num_expert_partitions=4), "num_groups=6"),
    (dict(num_experts=6, num_expert_partitions=4), "num_experts=6"),
    (dict(dispatch="dropless", router=routing.ExpertChoiceRouter()), "fixed capacity"),
    (dict(dropless_backend="cuda"), "dropless_backend"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
  layer = _layer(**kwargs)
  with pytest.raises(ValueError, match=message):
    layer.init(jax.random.PRNGKey(0), _inputs())


def test_collect_moe_metrics_averages_over_layers():
  intermediates = {
      "layers_0": {"mlp": {"auxiliary_loss": (jnp.array(1.0),),
                           "expert_fraction": (jnp.array([1.0, 0.0]),)}},
      "layers_1": {"mlp": {"auxiliary_loss": (jnp.array(3.0),),
                           "expert_fraction": (jnp.array([0.0, 1.0]),)}},
  }
  m = moe.collect_moe_metrics(intermediates)
  assert float(m["auxiliary_loss"]) == 2.0
  np.testing.assert_allclose(m["expert_fraction"], [0.5, 0.5])
  assert moe.collect_moe_metrics({}) == {}


@pytest.mark.parametrize("implementation", ["xla", CPU_BLAS])
@pytest.mark.parametrize("router_name", ["switch", "st_top2"])
def test_dropless_ragged_and_overflow_backends_agree(router_name, implementation):
  # XLA's ragged_dot runs densely on CPU but is exact, so it checks the layout
  # every grouped kernel relies on (group sizes, row order).
  x = _inputs()
  layers = {b: _layer("dropless", ROUTERS[router_name](), dropless_backend=b,
                      grouped_matmul_implementation=implementation)
            for b in ("ragged", "overflow")}
  params = layers["overflow"].init(jax.random.PRNGKey(1), x)["params"]
  y_r, g_r, m_r = _loss_and_grads(layers["ragged"], params, x)
  y_c, g_c, m_c = _loss_and_grads(layers["overflow"], params, x)
  np.testing.assert_allclose(y_r, y_c, atol=1e-5, rtol=1e-5)
  _assert_trees_close(g_r, g_c, atol=1e-5, rtol=1e-4)
  assert float(m_c["fraction_tokens_left_behind"]) == 0.0


@pytest.mark.parametrize("implementation", ["auto", CPU_BLAS])
def test_expert_biases_agree_across_dispatch_modes(implementation):
  x = _inputs()
  layers = {d: _layer(d, use_bias=True, eval_capacity_factor=EXPERTS,
                      grouped_matmul_implementation=implementation)
            for d in ("einsum", "sorted", "dropless")}
  params = layers["einsum"].init(jax.random.PRNGKey(1), x)["params"]
  # Biases start at zero; make them matter.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: (p + jax.random.normal(jax.random.PRNGKey(len(path)), p.shape)
                       if "bias" in str(path[-1]) else p), params)
  outputs = {d: _jit_apply(layer)({"params": params}, x) for d, layer in layers.items()}
  for d in ("sorted", "dropless"):
    np.testing.assert_allclose(outputs[d], outputs["einsum"], atol=1e-4, rtol=1e-4)
