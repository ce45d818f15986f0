"""Expert parallelism on 8 fake CPU devices, mesh (data=2, expert=4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import partitioning
from moe_jax.layers import moe
from moe_jax.layers import routing

MESH_SHAPE = dict(data=2, expert=4, model=1)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                "must be set before jax is imported (tests/conftest.py does it)")
  return partitioning.create_mesh(**MESH_SHAPE)


def _layer(dispatch):
  return moe.MoeLayer(
      num_experts=8, router=routing.TokensChooseRouter(num_selected_experts=2),
      expert_mlp_dim=32, max_group_size=16, dispatch=dispatch,
      num_expert_partitions=MESH_SHAPE["expert"], eval_capacity_factor=1.0)


def _loss(layer, params, x):
  y, state = layer.apply({"params": params}, x, mutable=["intermediates"])
  metrics = moe.collect_moe_metrics(state["intermediates"])
  return jnp.sum(y ** 2) + metrics["auxiliary_loss"] + metrics["router_z_loss"]


@pytest.mark.parametrize("dispatch", ["einsum", "sorted"])
def test_sharded_forward_and_grad_match_single_device(mesh, dispatch):
  layer = _layer(dispatch)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16))
  variables = layer.init(jax.random.PRNGKey(1), x)
  params = variables["params"]
  grad_fn = jax.value_and_grad(lambda p, x: _loss(layer, p, x), argnums=(0, 1))
  expected_loss, expected_grads = jax.jit(grad_fn)(params, x)

  rules = partitioning.standard_logical_axis_rules()
  param_shardings = partitioning.logical_to_mesh_sharding(
      variables["params_axes"], mesh, rules)
  data_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("expert", "data")))
  with jax.set_mesh(mesh), partitioning.axis_rules(rules):
    sharded = jax.jit(grad_fn, in_shardings=(param_shardings, data_sharding))
    compiled = sharded.lower(params, x).compile()
    loss, grads = compiled(jax.device_put(params, param_shardings),
                           jax.device_put(x, data_sharding))
  # Experts really are split four ways.
  wi = jax.device_put(params, param_shardings)["expert"]["wi_0"]
  assert wi.sharding.shard_shape(wi.shape)[0] == 8 // MESH_SHAPE["expert"]
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  # Tokens move to their experts' devices by all-to-all.
  assert "all-to-all" in compiled.as_text()
