"""Grouped matmul: forward and custom VJP against a per-row weight gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kernels import cpu_gmm
from moe_jax.layers import grouped_matmul

needs_cpu_kernels = pytest.mark.skipif(
    cpu_gmm.unavailable_reason() != "",
    reason=f"CPU grouped matmul kernels unavailable: {cpu_gmm.unavailable_reason()}")
EXACT_IMPLEMENTATIONS = ["xla", pytest.param("cpu_blas", marks=needs_cpu_kernels)]

GROUP_SIZES = [
    [3, 5, 4, 4],    # every row owned
    [0, 7, 0, 9],    # empty experts
    [2, 0, 3, 0],    # rows past the groups must come out zero
    [16, 0, 0, 0],   # one expert takes everything
]


def _reference(x, w, group_sizes):
  """out[r] = x[r] @ w[expert of row r]; zero for rows no expert owns."""
  ends = jnp.cumsum(group_sizes)
  row_expert = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
  owned = jnp.arange(x.shape[0]) < ends[-1]
  per_row_w = jnp.take(w, jnp.minimum(row_expert, w.shape[0] - 1), axis=0)
  out = jnp.einsum("ri,rio->ro", x, per_row_w, precision="highest")
  return jnp.where(owned[:, None], out, 0.0)


@pytest.fixture(autouse=True)
def _full_float32_precision():
  """No TF32 matmuls when the suite runs on a GPU: the tolerances are float32's."""
  with jax.default_matmul_precision("highest"):
    yield


def _inputs(dtype, rows=16, experts=4, din=8, dout=6):
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(kx, (rows, din), dtype),
          jax.random.normal(kw, (experts, din, dout), dtype),
          jax.random.normal(kd, (rows, dout), dtype))


@pytest.mark.parametrize("implementation", EXACT_IMPLEMENTATIONS)
@pytest.mark.parametrize("sizes", GROUP_SIZES)
def test_forward_and_gradients_match_reference(sizes, implementation):
  x, w, dy = _inputs(jnp.float32)
  group_sizes = jnp.array(sizes, jnp.int32)
  out, vjp = jax.vjp(lambda x, w: grouped_matmul.gmm(
      x, w, group_sizes, implementation=implementation), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: _reference(x, w, group_sizes), x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", EXACT_IMPLEMENTATIONS)
def test_rows_past_groups_get_no_gradient_and_zero_output(implementation):
  x, w, dy = _inputs(jnp.float32)
  group_sizes = jnp.array([2, 0, 3, 0], jnp.int32)
  out = grouped_matmul.gmm(x, w, group_sizes, implementation=implementation)
  assert np.all(np.asarray(out[5:]) == 0)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped_matmul.gmm(
      x, w, group_sizes, implementation=implementation) * dy), argnums=(0, 1)))(x, w)
  assert np.all(np.asarray(dx[5:]) == 0)
  assert np.all(np.asarray(dw[1]) == 0) and np.all(np.asarray(dw[3]) == 0)
  # Expert 0's gradient is the hand-written x_0^T dy_0.
  np.testing.assert_allclose(dw[0], np.asarray(x[:2]).T @ np.asarray(dy[:2]), rtol=1e-5)


@pytest.mark.skipif(grouped_matmul.mosaic_gpu_unsupported_reason(jnp.bfloat16, 128, 256) != "",
                    reason="needs a Hopper GPU (Mosaic GPU kernels)")
@pytest.mark.parametrize("sizes", [[96, 0, 300, 116], [0, 0, 512, 0], [1, 63, 65, 127]])
def test_mosaic_gpu_matches_reference(sizes):
  rows, din, dout = 512, 128, 256
  x, w, dy = _inputs(jnp.bfloat16, rows=rows, din=din, dout=dout)
  group_sizes = jnp.array(sizes, jnp.int32)

  def grads(implementation):
    out, vjp = jax.vjp(lambda x, w: grouped_matmul.gmm(
        x, w, group_sizes, implementation=implementation), x, w)
    return (out,) + vjp(dy)

  ref = jax.vjp(lambda x, w: _reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                         group_sizes), x, w)
  want = (ref[0],) + ref[1](dy.astype(jnp.float32))
  for got, expected in zip(grads("mosaic_gpu"), want):
    got = np.asarray(got, np.float32)
    expected = np.asarray(expected, np.float32)
    assert np.all(np.isfinite(got))
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel < 1e-2, rel


def test_mosaic_gpu_refuses_clearly_where_it_cannot_run():
  x, w, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="cannot run here.*implementation='xla'"):
    grouped_matmul.gmm(x, w, jnp.array([4, 4, 4, 4], jnp.int32),
                       implementation="mosaic_gpu")


def test_cpu_blas_refuses_bfloat16():
  x, w, _ = _inputs(jnp.bfloat16)
  with pytest.raises(ValueError, match="bfloat16 is not float32"):
    grouped_matmul.gmm(x, w, jnp.array([4, 4, 4, 4], jnp.int32), implementation="cpu_blas")


@needs_cpu_kernels
def test_cpu_blas_rejects_group_sizes_beyond_the_rows():
  x, w, _ = _inputs(jnp.float32)
  with pytest.raises(Exception, match="group_sizes sum to more than the row count"):
    jax.block_until_ready(grouped_matmul.gmm(
        x, w, jnp.array([8, 8, 8, 8], jnp.int32), implementation="cpu_blas"))


def test_auto_keeps_xla_dense_lowering_out_of_multi_device_cpu():
  # conftest gives 8 CPU devices: the custom call has no partitioning rule.
  assert grouped_matmul.efficient_implementation(jnp.float32, 8, 6) == ""
  assert grouped_matmul.resolve_implementation("auto", jnp.float32, 8, 6) == "xla"


@pytest.mark.parametrize("kwargs, message", [
    (dict(implementation="cutlass"), "Unknown grouped matmul implementation"),
    (dict(group_sizes=jnp.array([16], jnp.int32)), "one count per expert"),
])
def test_bad_arguments_raise(kwargs, message):
  x, w, _ = _inputs(jnp.float32)
  kwargs = {"group_sizes": jnp.array([4, 4, 4, 4], jnp.int32), **kwargs}
  with pytest.raises(ValueError, match=message):
    grouped_matmul.gmm(x, w, **kwargs)



@pytest.mark.parametrize("implementation", [
    "xla",
    pytest.param("mosaic_gpu", marks=pytest.mark.skipif(
        grouped_matmul.mosaic_gpu_unsupported_reason(jnp.bfloat16, 128, 256) != "",
        reason="needs a Hopper GPU (Mosaic GPU kernels)")),
])
def test_bfloat16_dropless_layer_matches_einsum(implementation):
  from moe_jax.layers import moe, routing
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 128, 128), jnp.bfloat16)

  def run(**kwargs):
    # Evaluation capacity of the whole group: einsum drops nothing either.
    layer = moe.MoeLayer(num_experts=8, router=routing.TokensChooseRouter(num_selected_experts=2),
                         expert_mlp_dim=256, max_group_size=256, eval_capacity_factor=8.0,
                         dtype=jnp.bfloat16, **kwargs)
    params = layer.init(jax.random.PRNGKey(1), x, enable_dropout=False)["params"]
    loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x, enable_dropout=False)
                                .astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  want = run(dispatch="einsum")
  got = run(dispatch="dropless", dropless_backend="ragged",
            grouped_matmul_implementation=implementation)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-6
