"""Grouped matrix multiplication: the expert matmuls of dropless MoE.

`gmm(x, w, group_sizes)` multiplies rows sorted by expert by their expert's
weights: rows `[start_e, start_e + group_sizes[e])` use `w[e]`, where
`start_e = sum(group_sizes[:e])`; rows past `sum(group_sizes)` come out zero
(the semantics of `jax.lax.ragged_dot`). Its gradient is two more grouped
products, written out as a custom VJP so that each runs on the same kernels:

  dx    = gmm(dy, w^T)           rows still sorted by expert;
  dw[e] = x_e^T dy_e             a grouped product over a ragged contracting
                                 dimension (the rows of expert e).

Implementations:
  'xla': `jax.lax.ragged_dot` / `jax.lax.ragged_dot_general`. Where XLA has no
    grouped kernel (CPU; CUDA GPUs without its cuDNN ragged-dot fusion) it
    computes every row against every expert: E times the work.
  'mosaic_gpu': the Pallas Mosaic GPU grouped kernels that ship with jax
    (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` and
    `transposed_ragged_dot_mgpu`, wgmma tensor-core kernels): each row tile
    meets its own expert's weights only. Hopper GPUs (compute capability 9.x),
    bfloat16/float16, feature sizes that are multiples of the block sizes.
  'cpu_blas': XLA FFI custom calls (`moe_jax/kernels/cpu_gmm.cc`) that run one
    OpenBLAS sgemm per expert over exactly its rows, compiled on first use.
    XLA:CPU has no grouped kernel; these compute no padding at all and, on
    the benchmark's shapes, are faster per row than XLA:CPU's batched dot.
    float32, CPU backend; 'auto' picks it only with a single device (the
    custom call has no partitioning rule, so under a multi-device mesh GSPMD
    would gather its operands onto every device).
  'auto' (a setting of the MoE layer, resolved once by
    `moe_jax.layers.dispatch.resolve`; `gmm` itself takes a concrete one):
    'mosaic_gpu' or 'cpu_blas' where they apply, else 'xla'.
"""

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import types
from moe_jax.kernels import cpu_gmm

IMPLEMENTATIONS = ("auto", "xla", "mosaic_gpu", "cpu_blas")
_MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicGpuBlocks:
  """Tile sizes of the Mosaic GPU kernels (rows x out-features x contraction).

  Attributes:
    block_m: rows per tile (in-features per tile for the weight gradient).
    block_n: output features per tile.
    block_k: contraction step (rows per step for the weight gradient).
    max_concurrent_steps: pipeline depth of the shared-memory copies.
    grid_block_n: tiles along the output features visited together (L2 reuse).
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 1

  def kernel_kwargs(self):
    return dataclasses.asdict(self)


DEFAULT_BLOCKS = MosaicGpuBlocks()


def mosaic_gpu_unsupported_reason(x_dtype, in_features: int, out_features: int) -> str:
  """Why the Mosaic GPU kernels cannot run this product here ('' if they can)."""
  blocks = DEFAULT_BLOCKS  # Read at call time: the tiles the kernels will use.
  if jax.default_backend() != "gpu":
    return f"the default backend is {jax.default_backend()!r}, not a GPU"
  capability = getattr(jax.devices()[0], "compute_capability", "")
  if not str(capability).startswith("9"):
    return f"the GPU has compute capability {capability!r}; the kernels need Hopper (9.x)"
  if jnp.dtype(x_dtype) not in _MOSAIC_DTYPES:
    return f"dtype {jnp.dtype(x_dtype).name} is not bfloat16 or float16"
  for name, size in (("in", in_features), ("out", out_features)):
    # Either side is the contraction of one of the three products.
    if size % blocks.block_n or size % blocks.block_m or size % blocks.block_k:
      return (f"{name}_features={size} is not a multiple of the block sizes "
              f"({blocks.block_m}, {blocks.block_n}, {blocks.block_k})")
  return ""


def cpu_blas_unsupported_reason(x_dtype, *, single_device: bool = True,
                                device_count: Optional[int] = None) -> str:
  """Why the CPU BLAS kernels cannot run this product here ('' if they can).

  Args:
    x_dtype: the product's dtype.
    single_device: require a single device (what 'auto' does: the custom call
      has no partitioning rule).
    device_count: the device count to judge by (default: `jax.device_count()`).
  """
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()!r}, not the CPU"
  device_count = jax.device_count() if device_count is None else device_count
  if single_device and device_count != 1:
    return f"there are {device_count} devices; the kernels have no partitioning rule"
  if jnp.dtype(x_dtype) != jnp.float32:
    return f"dtype {jnp.dtype(x_dtype).name} is not float32"
  return cpu_gmm.unavailable_reason()


def efficient_implementation(x_dtype, in_features: int, out_features: int, *,
                             device_count: Optional[int] = None) -> str:
  """The implementation that computes only each row's own expert ('' if none).

  'xla' on TPU, 'mosaic_gpu' on Hopper GPUs, 'cpu_blas' on a single-device
  CPU; '' where the only grouped product is XLA's dense lowering.
  """
  if jax.default_backend() == "tpu":
    return "xla"
  if not mosaic_gpu_unsupported_reason(x_dtype, in_features, out_features):
    return "mosaic_gpu"
  if not cpu_blas_unsupported_reason(x_dtype, device_count=device_count):
    return "cpu_blas"
  return ""


def grouped_kernel(implementation: str, x_dtype, in_features: int, out_features: int, *,
                   device_count: Optional[int] = None) -> str:
  """What `gmm(..., implementation)` runs, or '' where that is XLA's dense lowering.

  `implementation` may be 'auto' (the efficient one, if any).
  """
  efficient = efficient_implementation(x_dtype, in_features, out_features,
                                       device_count=device_count)
  if implementation == "auto":
    return efficient
  return implementation if implementation != "xla" or efficient == "xla" else ""


def resolve_implementation(implementation: str, x_dtype, in_features: int,
                           out_features: int, *, device_count: Optional[int] = None) -> str:
  """Maps 'auto' to a concrete implementation; checks an explicit one."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown grouped matmul implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}.")
  if implementation == "auto":
    return efficient_implementation(x_dtype, in_features, out_features,
                                    device_count=device_count) or "xla"
  if implementation == "mosaic_gpu":
    reason = mosaic_gpu_unsupported_reason(x_dtype, in_features, out_features)
  elif implementation == "cpu_blas":
    # Asked for by name, several devices are allowed: exact, if not parallel.
    reason = cpu_blas_unsupported_reason(x_dtype, single_device=False)
  else:
    reason = ""
  if reason:
    raise ValueError(f"grouped matmul implementation {implementation!r} cannot run "
                     f"here: {reason}. Use implementation='xla' (or 'auto').")
  return implementation


def _zero_rows_past_groups(out: types.Array, group_sizes: types.Array) -> types.Array:
  """Rows no group owns are left unwritten by the kernels: make them zero."""
  owned = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(owned[:, None], out, jnp.zeros((), out.dtype))


def _forward_product(x, w, group_sizes, implementation: str, transpose_rhs: bool):
  """[rows, in] x [E, in, out] (or [E, out, in] transposed) -> [rows, out]."""
  if implementation == "xla":
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose_rhs else w,
                              group_sizes)
  if implementation == "cpu_blas":
    out_features = w.shape[1] if transpose_rhs else w.shape[2]
    return jax.ffi.ffi_call(
        cpu_gmm.GROUPED_MATMUL_TARGET,
        jax.ShapeDtypeStruct((x.shape[0], out_features), x.dtype),
        vmap_method="sequential")(x, w, group_sizes, transpose_rhs=transpose_rhs)
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # GPU-only import.
  out = ragged_dot_mgpu.ragged_dot(
      x, w, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
      **DEFAULT_BLOCKS.kernel_kwargs())
  return _zero_rows_past_groups(out, group_sizes)


def _weight_product(x, dy, group_sizes, implementation: str):
  """dw[e] = x_e^T dy_e: [rows, in] x [rows, out] -> [E, in, out]."""
  if implementation == "xla":
    return jax.lax.ragged_dot_general(
        x, dy, group_sizes,
        ragged_dot_dimension_numbers=jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=[0], rhs_group_dimensions=[]))
  if implementation == "cpu_blas":
    return jax.ffi.ffi_call(
        cpu_gmm.WEIGHT_GRADIENT_TARGET,
        jax.ShapeDtypeStruct((group_sizes.shape[0], x.shape[1], dy.shape[1]), x.dtype),
        vmap_method="sequential")(x, dy, group_sizes)
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
  return transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x, dy, group_sizes=group_sizes, **DEFAULT_BLOCKS.kernel_kwargs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, implementation):
  return _forward_product(x, w, group_sizes, implementation, transpose_rhs=False)


def _gmm_fwd(x, w, group_sizes, implementation):
  out = _forward_product(x, w, group_sizes, implementation, transpose_rhs=False)
  return out, (x, w, group_sizes)


def _gmm_bwd(implementation, residuals, dy) -> Tuple:
  x, w, group_sizes = residuals
  dy = dy.astype(x.dtype)
  dx = _forward_product(dy, w, group_sizes, implementation, transpose_rhs=True)
  dw = _weight_product(x, dy, group_sizes, implementation)
  # Rows past the groups carry no weight gradient; the kernels never read them.
  return (dx.astype(x.dtype), dw.astype(w.dtype),
          np.zeros(group_sizes.shape, jax.dtypes.float0))


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x: types.Array, w: types.Array, group_sizes: types.Array, *,
        implementation: str = "xla") -> types.Array:
  """Grouped matmul of rows sorted by expert (see the module docstring).

  Args:
    x: `[rows, in_features]`, the rows of expert e contiguous and in expert
      order.
    w: `[experts, in_features, out_features]`.
    group_sizes: <int32>[experts] rows per expert; `sum <= rows`.
    implementation: 'xla', 'mosaic_gpu' or 'cpu_blas' (`resolve_implementation`
      maps 'auto' to one of them).

  Returns:
    `[rows, out_features]` in `x`'s dtype.
  """
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f"gmm expects x [rows, in] and w [experts, in, out]; got "
                     f"x {x.shape} and w {w.shape}.")
  if group_sizes.shape != (w.shape[0],):
    raise ValueError(f"group_sizes has shape {group_sizes.shape}; expected "
                     f"({w.shape[0]},), one count per expert.")
  if implementation == "auto":
    raise ValueError("gmm runs a concrete implementation; resolve 'auto' first with "
                     "grouped_matmul.resolve_implementation(...).")
  w = w.astype(x.dtype)
  # Checks that it can run here (an explicit choice is never replaced).
  implementation = resolve_implementation(implementation, x.dtype, w.shape[1], w.shape[2])
  return _gmm(x, w, group_sizes.astype(jnp.int32), implementation)
