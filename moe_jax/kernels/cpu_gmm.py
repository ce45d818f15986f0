"""Builds and registers the CPU grouped-matmul kernels (`cpu_gmm.cc`).

The kernels are XLA FFI custom calls that run one OpenBLAS sgemm per expert
over exactly that expert's rows, split into column blocks run on XLA's own
intra-op thread pool; OpenBLAS itself is set to one thread (its threads
busy-wait, and beside XLA's threads or another process that oversubscribes
the cores). They are compiled on first use with the C++
compiler (`$CXX`, default `c++`) against the XLA FFI headers of the installed
jaxlib and the OpenBLAS of the `scipy-openblas32` wheel, into
`$MOE_JAX_CACHE_DIR` (default `~/.cache/moe_jax`), once per source, jaxlib and
OpenBLAS: later processes load the cached library. Where that cannot happen
(no compiler, no wheel), `unavailable_reason()` says why and the callers use
XLA's own ops instead.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess

import jax
import jaxlib

GROUPED_MATMUL_TARGET = "moe_jax_cpu_grouped_matmul"
WEIGHT_GRADIENT_TARGET = "moe_jax_cpu_weight_gradient"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gmm.cc")


def cache_dir() -> str:
  return os.environ.get("MOE_JAX_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "moe_jax"))


def _compile(output: str, openblas) -> None:
  """Compiles the kernels to `output`, atomically (a temp file, then rename)."""
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
  lib_dir = openblas.get_lib_dir()
  temporary = f"{output}.{os.getpid()}.tmp"
  command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC",
             f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}",
             _SOURCE, "-o", temporary, f"-L{lib_dir}", f"-l{openblas.get_library()}",
             f"-Wl,-rpath,{lib_dir}"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"compiling {_SOURCE} failed:\n{result.stderr[:2000]}")
  os.replace(temporary, output)


def build_key() -> str:
  """Hash of what the library is built from: source, jaxlib, OpenBLAS.

  Raises:
    ImportError: no scipy-openblas32.
  """
  import scipy_openblas32  # pylint: disable=g-import-not-at-top
  with open(_SOURCE, "rb") as source:
    return hashlib.sha256(source.read() + jaxlib.__version__.encode()
                          + scipy_openblas32.get_lib_dir().encode()).hexdigest()[:16]


def build() -> str:
  """Path of the kernels' shared library, compiled first if not cached.

  Raises:
    ImportError: no scipy-openblas32 (or no fcntl on this platform).
    RuntimeError: no compiler, or the compilation failed.
    OSError: the cache directory is not writable.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  import scipy_openblas32  # pylint: disable=g-import-not-at-top
  key = build_key()
  directory = cache_dir()
  library = os.path.join(directory, f"cpu_gmm-{key}.so")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"cpu_gmm-{key}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # One compiler per cache, across processes.
    if not os.path.exists(library):
      _compile(library, scipy_openblas32)
  return library


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
  """Builds (if needed) and registers the kernels, once per process.

  Returns:
    '' once the custom calls are registered, else why they are not.
  """
  try:
    handle = ctypes.cdll.LoadLibrary(build())
  except (ImportError, OSError, RuntimeError) as error:
    logging.warning("moe_jax CPU grouped matmul kernels unavailable: %s", error)
    return f"{type(error).__name__}: {error}"
  # The kernels parallelize on XLA's threads; OpenBLAS's own would spin beside
  # them. This library copy (scipy-openblas32) serves only these kernels.
  handle.scipy_openblas_set_num_threads(1)
  jax.ffi.register_ffi_target(GROUPED_MATMUL_TARGET,
                              jax.ffi.pycapsule(handle.MoeJaxCpuGroupedMatmul),
                              platform="cpu")
  jax.ffi.register_ffi_target(WEIGHT_GRADIENT_TARGET,
                              jax.ffi.pycapsule(handle.MoeJaxCpuWeightGradient),
                              platform="cpu")
  return ""
