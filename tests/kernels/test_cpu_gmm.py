"""Building the CPU grouped-matmul kernels: cache reuse and clear failure reasons."""

import os

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
