"""The CPU grouped-matmul kernels: build cache, failure reasons, threads, column blocks."""

import ctypes
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kernels import cpu_gmm

NO_COMPILER = "no-such-compiler-for-moe-jax"


def test_missing_compiler_is_reported_not_raised(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", NO_COMPILER)
  # Bypass the per-process cache; nothing is registered on this path.
  reason = cpu_gmm.unavailable_reason.__wrapped__()
  assert f"no C++ compiler '{NO_COMPILER}'" in reason
  assert not list(tmp_path.glob("*.so"))


@pytest.mark.skipif(cpu_gmm.unavailable_reason() != "",
                    reason=f"kernels unavailable here: {cpu_gmm.unavailable_reason()}")
def test_built_library_is_reused_without_a_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  library = cpu_gmm.build()
  assert os.path.dirname(library) == str(tmp_path)
  stamp = os.stat(library).st_mtime_ns
  monkeypatch.setenv("CXX", NO_COMPILER)
  assert cpu_gmm.build() == library  # From the cache: nothing to compile.
  assert os.stat(library).st_mtime_ns == stamp
  assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(cpu_gmm.unavailable_reason() != "",
                    reason=f"kernels unavailable here: {cpu_gmm.unavailable_reason()}")
def test_openblas_runs_single_threaded_once_registered():
  # The kernels parallelize on XLA's pool; OpenBLAS's own threads would spin.
  assert ctypes.CDLL(cpu_gmm.build()).scipy_openblas_get_num_threads() == 1


@pytest.mark.skipif(cpu_gmm.unavailable_reason() != "",
                    reason=f"kernels unavailable here: {cpu_gmm.unavailable_reason()}")
@pytest.mark.parametrize("sizes", [
    [300, 0, 1, 211],        # skewed, an empty and a one-row expert, rows left over
    [128] * 8,               # balanced: several column blocks per expert
    [0, 0, 0, 0, 0, 0, 0, 0],
])
def test_column_blocks_on_the_thread_pool_match_numpy(sizes):
  # Wide enough outputs (n = 2 x 200 + 37 columns) to be split into blocks.
  from moe_jax.layers import grouped_matmul  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  experts, rows, k, n = len(sizes), 1024, 48, 437
  x = rng.standard_normal((rows, k), np.float32)
  w = rng.standard_normal((experts, k, n), np.float32)
  dy = rng.standard_normal((rows, n), np.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  out, vjp = jax.vjp(lambda x, w: grouped_matmul.gmm(
      x, w, group_sizes, implementation="cpu_blas"), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  want_out, want_dx = np.zeros((rows, n), np.float32), np.zeros((rows, k), np.float32)
  want_dw = np.zeros((experts, k, n), np.float32)
  start = 0
  for e, m in enumerate(sizes):
    rows_e = slice(start, start + m)
    want_out[rows_e] = x[rows_e] @ w[e]
    want_dx[rows_e] = dy[rows_e] @ w[e].T
    want_dw[e] = x[rows_e].T @ dy[rows_e]
    start += m
  for got, want in ((out, want_out), (dx, want_dx), (dw, want_dw)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)
