"""Building the CPU grouped-matmul kernels: cache reuse and clear failure reasons."""

import os

import pytest

from moe_jax.kernels import cpu_gmm

build = cpu_gmm.unavailable_reason.__wrapped__  # Without the per-process cache.


def test_missing_compiler_is_reported_not_raised(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler-for-moe-jax")
  assert "no C++ compiler 'no-such-compiler-for-moe-jax'" in build()
  assert not list(tmp_path.glob("*.so"))


@pytest.mark.skipif(cpu_gmm.unavailable_reason() != "",
                    reason=f"kernels unavailable here: {cpu_gmm.unavailable_reason()}")
def test_built_library_is_reused_without_a_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  assert build() == ""
  libraries = list(tmp_path.glob("cpu_gmm-*.so"))
  assert len(libraries) == 1
  stamp = os.stat(libraries[0]).st_mtime_ns
  monkeypatch.setenv("CXX", "no-such-compiler-for-moe-jax")
  assert build() == ""  # Loaded from the cache: nothing to compile.
  assert os.stat(libraries[0]).st_mtime_ns == stamp
  assert not list(tmp_path.glob("*.tmp"))
