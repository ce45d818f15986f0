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
    Tiles (`MosaicGpuBlocks`) per product and shape: fixed by
    `mosaic_gpu_blocks(...)`, else measured once among a few candidates from
    the search space of jax's example (`mosaic_gpu_tiles`, cached by
    `moe_jax.tuning`), else (`MOE_JAX_TUNING=static`) `DEFAULT_BLOCKS`.
  'tokamax': `tokamax.ragged_dot` (DeepMind's maintained kernel library, on
    PyPI; imported lazily, optional): its Pallas Mosaic kernels (Hopper GPUs
    in bfloat16/float16, TPUs) at tokamax's own configs (its autotuning cache,
    else its heuristics), differentiated by tokamax's own VJP (its kernels
    for dx and dw), not ours.
  'cpu_blas': XLA FFI custom calls (`moe_jax/kernels/cpu_gmm.cc`) that run one
    OpenBLAS sgemm per expert over exactly its rows, compiled on first use.
    XLA:CPU has no grouped kernel; these compute no padding at all and, on
    the benchmark's shapes, are faster per row than XLA:CPU's batched dot.
    float32, CPU backend; 'auto' picks it only with a single device (the
    custom call has no partitioning rule, so under a multi-device mesh GSPMD
    would gather its operands onto every device).
  'auto' (a setting of the MoE layer, resolved once by
    `moe_jax.layers.dispatch.resolve`; `gmm` itself takes a concrete one):
    'mosaic_gpu' or 'cpu_blas' where they apply, else 'xla'; where tokamax
    can run too (`alternative_kernels`), the MoE layer measures both
    (`moe_jax.tuning`, which picks tokamax when it is within
    `TOKAMAX_PREFERENCE` of the fastest: the maintained library wins ties).
"""

import contextlib
import dataclasses
import functools
import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import tuning
from moe_jax import types
from moe_jax.kernels import cpu_gmm

IMPLEMENTATIONS = ("auto", "xla", "mosaic_gpu", "tokamax", "cpu_blas")
_MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# tokamax's ragged_dot implementation (a name of its API): 'mosaic' is its
# Pallas Mosaic GPU kernel on NVIDIA devices and its Mosaic TPU kernel on TPUs.
_TOKAMAX_IMPLEMENTATION = "mosaic"
# Feature sizes tokamax's kernels are run at: multiples of its tiles on GPUs
# (its Hopper heuristics use 64 x 64 x 128), at least 128 on TPUs.
_TOKAMAX_FEATURE_MULTIPLE = 128
# The maintained library wins near-ties: measured within 3% of the fastest
# candidate (less than run-to-run spread), a tokamax candidate is chosen.
TOKAMAX_PREFERENCE = 0.03
tuning.prefer("tokamax", within=TOKAMAX_PREFERENCE)

# The three products of `gmm` with its VJP, as the Mosaic kernels see them.
FORWARD = "forward"        # [rows, k] x [E, k, n]   -> [rows, n] (ragged_dot_mgpu)
TRANSPOSED = "transposed"  # [rows, k] x [E, n, k]^T -> [rows, n] (dx; transpose_rhs)
WEIGHT = "weight"          # [rows, m]^T x [rows, n] -> [E, m, n] (dw; transposed_ragged_dot)
PRODUCTS = (FORWARD, TRANSPOSED, WEIGHT)


def _backend() -> str:
  return jax.default_backend()


def _gpu_capability() -> str:
  """The first device's compute capability, e.g. '9.0' ('' off GPUs)."""
  return str(getattr(jax.devices()[0], "compute_capability", ""))


# ----------------------------------------------------------------------------
# Mosaic GPU tiles
# ----------------------------------------------------------------------------
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

  @property
  def name(self) -> str:
    """E.g. 'm128_n128_k64_s4_g1' (a tuning candidate's name)."""
    return (f"m{self.block_m}_n{self.block_n}_k{self.block_k}_"
            f"s{self.max_concurrent_steps}_g{self.grid_block_n}")

  @classmethod
  def from_name(cls, name: str) -> "MosaicGpuBlocks":
    try:
      m, n, k, s, g = (int(part[1:]) for part in name.split("_"))
    except ValueError:
      raise ValueError(f"{name!r} is not a Mosaic GPU tile name like "
                       f"{cls().name!r}.") from None
    blocks = cls(m, n, k, s, g)
    if blocks.name != name:
      raise ValueError(f"{name!r} is not a Mosaic GPU tile name like {cls().name!r}.")
    return blocks

  def fits(self, product: str, k: int, n: int) -> bool:
    """Whether the kernel of `product` takes these tiles at these sizes.

    `k` and `n` are the contracted and output features of FORWARD and
    TRANSPOSED (rows are ragged: any count); for WEIGHT, the output's two
    feature sizes (`m` and `n`; its contraction is the ragged rows).
    """
    if product not in PRODUCTS:
      raise ValueError(f"Unknown product {product!r}; one of {PRODUCTS}.")
    if product == WEIGHT:
      return k % self.block_m == 0 and n % (self.block_n * self.grid_block_n) == 0
    return k % self.block_k == 0 and n % (self.block_n * self.grid_block_n) == 0


DEFAULT_BLOCKS = MosaicGpuBlocks()
# Candidates measured per product and shape (the first that fits is the
# static rule's unless DEFAULT_BLOCKS fits). From the search spaces of jax's
# examples (`ragged_dot_mgpu.main`: block_m, block_n in 64/128/192, block_k
# 64, 2-6 stages, grid_block_n 1-16; `transposed_ragged_dot_mgpu.main`:
# 64/128, block_k 64/128, 1-6 stages), kept small (every candidate is a
# compilation): 64-row tiles waste less on experts with few rows (each expert
# rounds its rows up to a tile), deeper pipelines and L2-grouped columns help
# large ones.
ROW_TILE_CANDIDATES = (
    DEFAULT_BLOCKS,
    MosaicGpuBlocks(64, 128, 64, 4, 1),
    MosaicGpuBlocks(64, 128, 64, 6, 2),
)
WEIGHT_TILE_CANDIDATES = (
    DEFAULT_BLOCKS,
    MosaicGpuBlocks(64, 128, 64, 4, 1),
)

_fixed_blocks: Optional[MosaicGpuBlocks] = None


@contextlib.contextmanager
def mosaic_gpu_blocks(blocks: Optional[MosaicGpuBlocks]) -> Iterator[None]:
  """Fixes the Mosaic GPU tiles of every product traced inside (no measuring).

  Process-wide (the tiles are read when a product is traced, possibly in
  `moe_jax.tuning`'s worker thread); `None` restores measured tiles.
  """
  global _fixed_blocks
  previous, _fixed_blocks = _fixed_blocks, blocks
  try:
    yield
  finally:
    _fixed_blocks = previous


def tile_candidates(product: str, k: int, n: int) -> Tuple[MosaicGpuBlocks, ...]:
  """The tile candidates of `product` that fit these sizes (see `fits`)."""
  pool = WEIGHT_TILE_CANDIDATES if product == WEIGHT else ROW_TILE_CANDIDATES
  return tuple(blocks for blocks in pool if blocks.fits(product, k, n))


def tile_problem(product: str, rows: int, k: int, n: int, groups: int, dtype,
                 candidates: Sequence[MosaicGpuBlocks]) -> Dict:
  """`moe_jax.tuning`'s problem (with the environment, the cache key)."""
  dtype = jnp.dtype(dtype).name
  return {
      "name": f"mosaic_gpu tiles {product} rows={rows} k={k} n={n} E={groups} {dtype}",
      "op": "grouped_matmul.mosaic_gpu_tiles", "product": product, "rows": rows,
      "k": k, "n": n, "groups": groups, "dtype": dtype,
      "candidates": [blocks.name for blocks in candidates],
  }


def _representative_group_sizes(rows: int, groups: int) -> np.ndarray:
  """Rows per expert as a balanced router spreads them (fixed seed)."""
  rng = np.random.default_rng(0)
  return rng.multinomial(rows, np.full(groups, 1.0 / groups)).astype(np.int32)


def _tile_step(product: str, rows: int, k: int, n: int, groups: int, dtype,
               blocks: MosaicGpuBlocks) -> tuning.Builder:
  """Builds a step that runs one product at these tiles (several times).

  One jit runs the product on `reps` distinct inputs, so that a step is
  kernel time (a few hundred microseconds at least), not dispatch time.
  """
  def build() -> tuning.Step:
    flops = 2.0 * rows * k * n
    reps = int(min(8, max(1, math.ceil(3e-4 / (flops / 5e14)))))
    group_sizes = jnp.asarray(_representative_group_sizes(rows, groups))
    keys = jax.random.split(jax.random.PRNGKey(0), reps + 1)
    lhs = [jax.random.normal(key, (rows, k), dtype) for key in keys[:-1]]
    if product == WEIGHT:
      rhs = jax.random.normal(keys[-1], (rows, n), dtype)
      product_fn = functools.partial(_mosaic_weight_product, blocks=blocks)
    else:
      shape = (groups, n, k) if product == TRANSPOSED else (groups, k, n)
      rhs = jax.random.normal(keys[-1], shape, dtype)
      product_fn = functools.partial(_mosaic_forward_product, blocks=blocks,
                                     transpose_rhs=product == TRANSPOSED)
    # Group sizes are an argument, as in the layer (not constants to fold).
    step = jax.jit(lambda lhs, rhs, sizes: [product_fn(a, rhs, sizes) for a in lhs])
    return lambda: step(lhs, rhs, group_sizes)
  return build


def mosaic_gpu_tiles(product: str, rows: int, k: int, n: int, groups: int,
                     dtype) -> MosaicGpuBlocks:
  """The tiles one Mosaic GPU product runs at.

  Fixed tiles (`mosaic_gpu_blocks`) are never overridden. Otherwise, on a
  single device with measuring on (`moe_jax.tuning`), the fastest of the
  candidates that fit, measured once per product, shape and environment and
  cached on disk; else the static rule: `DEFAULT_BLOCKS` (the first fitting
  candidate where the defaults do not fit).

  Args:
    product: FORWARD, TRANSPOSED or WEIGHT.
    rows: rows of the ragged operand.
    k, n: see `MosaicGpuBlocks.fits`.
    groups: experts.
    dtype: the operands' dtype.
  """
  if _fixed_blocks is not None:
    return _fixed_blocks
  candidates = tile_candidates(product, k, n)
  default = DEFAULT_BLOCKS  # Read at call time.
  static = default if default.fits(product, k, n) or not candidates else candidates[0]
  if static not in candidates:
    candidates = (static,) + candidates
  if len(candidates) == 1 or tuning.mode() == "static" or jax.device_count() != 1:
    return static
  builders = {blocks.name: _tile_step(product, rows, k, n, groups, dtype, blocks)
              for blocks in candidates}
  decision = tuning.choose(tile_problem(product, rows, k, n, groups, dtype, candidates),
                           builders, static=static.name)
  return MosaicGpuBlocks.from_name(decision.choice)


# ----------------------------------------------------------------------------
# Where each implementation runs
# ----------------------------------------------------------------------------
def mosaic_gpu_unsupported_reason(x_dtype, in_features: int, out_features: int) -> str:
  """Why the Mosaic GPU kernels cannot run this product here ('' if they can)."""
  blocks = DEFAULT_BLOCKS  # Read at call time: the tiles the kernels will use.
  if _backend() != "gpu":
    return f"the default backend is {_backend()!r}, not a GPU"
  capability = _gpu_capability()
  if not capability.startswith("9"):
    return f"the GPU has compute capability {capability!r}; the kernels need Hopper (9.x)"
  if jnp.dtype(x_dtype) not in _MOSAIC_DTYPES:
    return f"dtype {jnp.dtype(x_dtype).name} is not bfloat16 or float16"
  for name, size in (("in", in_features), ("out", out_features)):
    # Either side is the contraction of one of the three products.
    if size % blocks.block_n or size % blocks.block_m or size % blocks.block_k:
      return (f"{name}_features={size} is not a multiple of the block sizes "
              f"({blocks.block_m}, {blocks.block_n}, {blocks.block_k})")
  return ""


@functools.lru_cache(maxsize=None)
def _tokamax_import_error() -> str:
  """'' once `tokamax` imports, else why not (checked once per process)."""
  try:
    import tokamax  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as error:  # pylint: disable=broad-except
    return f"tokamax is not importable ({type(error).__name__}: {error}); pip install tokamax"
  return ""


def _tokamax():
  """The `tokamax` module, its absl flags settled.

  tokamax reads its options through absl flags and, when nobody parsed them,
  parses `sys.argv`: under a program with flags of its own (a benchmark's
  `--tokens`) that raises UnrecognizedFlagError. Marking the flags parsed
  keeps tokamax's defaults instead.
  """
  import tokamax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def tokamax_unsupported_reason(x_dtype, in_features: int, out_features: int) -> str:
  """Why tokamax's ragged_dot kernels cannot run this product here ('' if they can).

  Hopper GPUs in bfloat16/float16 (its Blackwell kernel has no weight
  gradient) and TPUs; feature sizes multiples of 128 (GPU) or at least 128
  (TPU); tokamax installed.
  """
  backend = _backend()
  sizes = (("in", in_features), ("out", out_features))
  if backend == "gpu":
    capability = _gpu_capability()
    if not capability.startswith("9"):
      return (f"the GPU has compute capability {capability!r}; tokamax's kernels with "
              "a weight gradient need Hopper (9.x)")
    if jnp.dtype(x_dtype) not in _MOSAIC_DTYPES:
      return f"dtype {jnp.dtype(x_dtype).name} is not bfloat16 or float16"
    for name, size in sizes:
      if size % _TOKAMAX_FEATURE_MULTIPLE:
        return f"{name}_features={size} is not a multiple of {_TOKAMAX_FEATURE_MULTIPLE}"
  elif backend == "tpu":
    for name, size in sizes:
      if size < _TOKAMAX_FEATURE_MULTIPLE:
        return f"{name}_features={size} is under {_TOKAMAX_FEATURE_MULTIPLE}"
  else:
    return (f"the default backend is {backend!r}; tokamax's ragged_dot kernels run on "
            "Hopper GPUs and TPUs")
  return _tokamax_import_error()


def cpu_blas_unsupported_reason(x_dtype, *, single_device: bool = True,
                                device_count: Optional[int] = None) -> str:
  """Why the CPU BLAS kernels cannot run this product here ('' if they can).

  Args:
    x_dtype: the product's dtype.
    single_device: require a single device (what 'auto' does: the custom call
      has no partitioning rule).
    device_count: the device count to judge by (default: `jax.device_count()`).
  """
  if _backend() != "cpu":
    return f"the default backend is {_backend()!r}, not the CPU"
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
  if _backend() == "tpu":
    return "xla"
  if not mosaic_gpu_unsupported_reason(x_dtype, in_features, out_features):
    return "mosaic_gpu"
  if not cpu_blas_unsupported_reason(x_dtype, device_count=device_count):
    return "cpu_blas"
  return ""


def alternative_kernels(efficient: str, x_dtype, in_features: int,
                        out_features: int) -> Tuple[str, ...]:
  """Other grouped kernels worth measuring against `efficient` here.

  tokamax beside the Mosaic GPU kernels on Hopper and beside XLA's native
  ragged_dot on TPU, where it can run (`tokamax_unsupported_reason`).
  """
  competes = efficient == "mosaic_gpu" or (efficient == "xla" and _backend() == "tpu")
  if competes and not tokamax_unsupported_reason(x_dtype, in_features, out_features):
    return ("tokamax",)
  return ()


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
  elif implementation == "tokamax":
    reason = tokamax_unsupported_reason(x_dtype, in_features, out_features)
  elif implementation == "cpu_blas":
    # Asked for by name, several devices are allowed: exact, if not parallel.
    reason = cpu_blas_unsupported_reason(x_dtype, single_device=False)
  else:
    reason = ""
  if reason:
    raise ValueError(f"grouped matmul implementation {implementation!r} cannot run "
                     f"here: {reason}. Use implementation='xla' (or 'auto').")
  return implementation


# ----------------------------------------------------------------------------
# The products
# ----------------------------------------------------------------------------
def _owned_rows(rows: int, group_sizes: types.Array) -> types.Array:
  return jnp.arange(rows) < jnp.sum(group_sizes)


def _zero_rows_past_groups(out: types.Array, group_sizes: types.Array) -> types.Array:
  """Rows no group owns are left unwritten by the kernels: make them zero."""
  return jnp.where(_owned_rows(out.shape[0], group_sizes)[:, None], out,
                   jnp.zeros((), out.dtype))


def _mosaic_forward_product(x, w, group_sizes, blocks: MosaicGpuBlocks, *,
                            transpose_rhs: bool):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # GPU-only import.
  out = ragged_dot_mgpu.ragged_dot(
      x, w, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
      **blocks.kernel_kwargs())
  return _zero_rows_past_groups(out, group_sizes)


def _mosaic_weight_product(x, dy, group_sizes, blocks: MosaicGpuBlocks):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
  return transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x, dy, group_sizes=group_sizes, **blocks.kernel_kwargs())


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
  out_features = w.shape[1] if transpose_rhs else w.shape[2]
  blocks = mosaic_gpu_tiles(TRANSPOSED if transpose_rhs else FORWARD, x.shape[0],
                            x.shape[1], out_features, w.shape[0], x.dtype)
  return _mosaic_forward_product(x, w, group_sizes, blocks, transpose_rhs=transpose_rhs)


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
  blocks = mosaic_gpu_tiles(WEIGHT, x.shape[0], x.shape[1], dy.shape[1],
                            group_sizes.shape[0], x.dtype)
  return _mosaic_weight_product(x, dy, group_sizes, blocks)


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


@jax.custom_vjp
def _zero_gradient_past_groups(x, group_sizes):
  """Identity whose gradient is zero on the rows no group owns."""
  return x


def _zero_gradient_past_groups_fwd(x, group_sizes):
  return x, group_sizes


def _zero_gradient_past_groups_bwd(group_sizes, grad):
  return (_zero_rows_past_groups(grad, group_sizes),
          np.zeros(group_sizes.shape, jax.dtypes.float0))


_zero_gradient_past_groups.defvjp(_zero_gradient_past_groups_fwd,
                                  _zero_gradient_past_groups_bwd)


def _tokamax_gmm(x, w, group_sizes):
  """`tokamax.ragged_dot` with its own VJP, in `gmm`'s semantics.

  Its kernels leave the rows past the groups unwritten in the output and in
  dx: both are masked to zero here.
  """
  tokamax = _tokamax()
  x = _zero_gradient_past_groups(x, group_sizes)
  out = tokamax.ragged_dot(x, w, group_sizes, implementation=_TOKAMAX_IMPLEMENTATION)
  return _zero_rows_past_groups(out.astype(x.dtype), group_sizes)


def gmm(x: types.Array, w: types.Array, group_sizes: types.Array, *,
        implementation: str = "xla") -> types.Array:
  """Grouped matmul of rows sorted by expert (see the module docstring).

  Args:
    x: `[rows, in_features]`, the rows of expert e contiguous and in expert
      order.
    w: `[experts, in_features, out_features]`.
    group_sizes: <int32>[experts] rows per expert; `sum <= rows`.
    implementation: 'xla', 'mosaic_gpu', 'tokamax' or 'cpu_blas'
      (`resolve_implementation` maps 'auto' to one of them).

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
  group_sizes = group_sizes.astype(jnp.int32)
  if implementation == "tokamax":
    return _tokamax_gmm(x, w, group_sizes)
  return _gmm(x, w, group_sizes, implementation)
