"""Grouped matmul: forward and custom VJP against a per-row weight gather.

Also the GPU candidates: tokamax's ragged_dot (wiring, where it may run) and
the Mosaic GPU tiles measured per shape. Tests named `*_on_hopper` need a
Hopper GPU (and skip elsewhere); the rest run on the CPU, with the GPU's
facts (backend, compute capability, tokamax installed) patched in.
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import tuning
from moe_jax.kernels import cpu_gmm
from moe_jax.layers import dispatch
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


@pytest.fixture(autouse=True)
def _static_tuning(monkeypatch, tmp_path):
  """Default tiles, no measuring, a private cache (tests that measure say so)."""
  monkeypatch.setenv(tuning.ENV_VAR, "static")
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  tuning.clear_memo()
  yield
  tuning.clear_memo()


HOPPER = grouped_matmul.mosaic_gpu_unsupported_reason(jnp.bfloat16, 128, 256) == ""
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (Mosaic GPU kernels)")
TOKAMAX_REASON = grouped_matmul.tokamax_unsupported_reason(jnp.bfloat16, 128, 256)
needs_tokamax_on_hopper = pytest.mark.skipif(
    not HOPPER or TOKAMAX_REASON != "", reason=f"needs tokamax on a Hopper GPU: {TOKAMAX_REASON}")
needs_tokamax_installed = pytest.mark.skipif(
    grouped_matmul._tokamax_import_error() != "",  # pylint: disable=protected-access
    reason="tokamax is not installed")


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


HOPPER_SIZES = [[96, 0, 300, 116], [0, 0, 512, 0], [1, 63, 65, 127], [40, 0, 200, 0]]


def _assert_bf16_matches_float32_reference(implementation, sizes, rows=512, din=128,
                                           dout=256):
  """Forward, dx and dw in bfloat16 within 1e-2 (relative norm) of float32."""
  x, w, dy = _inputs(jnp.bfloat16, rows=rows, din=din, dout=dout)
  group_sizes = jnp.array(sizes, jnp.int32)
  out, vjp = jax.jit(lambda x, w: jax.vjp(lambda x, w: grouped_matmul.gmm(
      x, w, group_sizes, implementation=implementation), x, w))(x, w)
  got = (out,) + vjp(dy)
  ref = jax.vjp(lambda x, w: _reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                         group_sizes), x, w)
  want = (ref[0],) + ref[1](dy.astype(jnp.float32))
  for g, expected in zip(got, want):
    g, expected = np.asarray(g, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(g))
    rel = np.linalg.norm(g - expected) / np.linalg.norm(expected)
    assert rel < 1e-2, rel
  owned = int(sum(sizes))
  # Rows no expert owns: zero output, zero input gradient.
  assert np.all(np.asarray(got[0][owned:], np.float32) == 0)
  assert np.all(np.asarray(got[1][owned:], np.float32) == 0)


@needs_hopper
@pytest.mark.parametrize("sizes", HOPPER_SIZES)
def test_mosaic_gpu_matches_reference(sizes):
  _assert_bf16_matches_float32_reference("mosaic_gpu", sizes)


def _tile_cases():
  for product in grouped_matmul.PRODUCTS:
    pool = (grouped_matmul.WEIGHT_TILE_CANDIDATES if product == grouped_matmul.WEIGHT
            else grouped_matmul.ROW_TILE_CANDIDATES)
    for blocks in pool:
      yield pytest.param(product, blocks, id=f"{product}-{blocks.name}")


@needs_hopper
@pytest.mark.parametrize("product, blocks", list(_tile_cases()))
def test_every_mosaic_tile_candidate_matches_reference_on_hopper(product, blocks):
  # Each candidate the measured 'auto' may pick computes the same function.
  sizes = [96, 0, 300, 116]
  x, w, dy = _inputs(jnp.bfloat16, rows=512, din=256, dout=512)
  group_sizes = jnp.array(sizes, jnp.int32)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if product == grouped_matmul.WEIGHT:
    assert blocks.fits(product, 256, 512)
    got = grouped_matmul._mosaic_weight_product(x, dy, group_sizes, blocks)
    ends = np.cumsum(sizes)
    want = np.stack([np.asarray(f32(x[e - n:e])).T @ np.asarray(f32(dy[e - n:e]))
                     for n, e in zip(sizes, ends)])
  elif product == grouped_matmul.TRANSPOSED:
    assert blocks.fits(product, 512, 256)
    got = grouped_matmul._mosaic_forward_product(dy, w, group_sizes, blocks,
                                                 transpose_rhs=True)
    want = _reference(f32(dy), jnp.swapaxes(f32(w), 1, 2), group_sizes)
  else:
    assert blocks.fits(product, 256, 512)
    got = grouped_matmul._mosaic_forward_product(x, w, group_sizes, blocks,
                                                 transpose_rhs=False)
    want = _reference(f32(x), f32(w), group_sizes)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@needs_tokamax_on_hopper
@pytest.mark.parametrize("sizes", HOPPER_SIZES)
def test_tokamax_matches_reference_on_hopper(sizes):
  _assert_bf16_matches_float32_reference("tokamax", sizes)


@needs_hopper
def test_tile_search_measures_each_candidate_once_on_hopper(monkeypatch):
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  args = (grouped_matmul.FORWARD, 2048, 256, 512, 8, jnp.bfloat16)
  blocks = grouped_matmul.mosaic_gpu_tiles(*args)
  candidates = grouped_matmul.tile_candidates(*args[:1], 256, 512)
  assert blocks in candidates
  decision, = tuning.decisions()
  assert decision.source == "measured"
  assert set(decision.times_ms) == {b.name for b in candidates}
  tuning.clear_memo()
  assert grouped_matmul.mosaic_gpu_tiles(*args) == blocks  # From the disk cache now.
  assert [d.source for d in tuning.decisions()] == ["cache"]


@needs_hopper
def test_layer_auto_measures_tiles_inside_its_own_measurement_on_hopper(monkeypatch):
  # The layer's 'auto' times ragged/mosaic_gpu (and tokamax, overflow); building
  # the Mosaic candidate measures its tiles: a nested choice, which must not
  # deadlock on the outer measurement's locks.
  from moe_jax.layers import moe, routing  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  layer = moe.MoeLayer(num_experts=4, router=routing.TokensChooseRouter(num_selected_experts=2),
                       expert_mlp_dim=256, max_group_size=256, dispatch="dropless",
                       dtype=jnp.bfloat16)
  result = {}
  thread = threading.Thread(target=lambda: result.update(
      plan=layer.dispatch_plan((2, 128, 128), jnp.bfloat16, train=True)), daemon=True)
  thread.start()
  thread.join(timeout=240)
  assert not thread.is_alive(), "nested measurement deadlocked"
  sources = {d.problem.get("op", d.problem.get("layer")): d.source for d in tuning.decisions()}
  assert sources == {"grouped_matmul.mosaic_gpu_tiles": "measured", "MoeLayer": "measured"}
  assert result["plan"].strategy in ("ragged", "overflow")


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
    pytest.param("mosaic_gpu", marks=needs_hopper),
    pytest.param("tokamax", marks=needs_tokamax_on_hopper),
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


# ----------------------------------------------------------------------------
# Mosaic GPU tiles: names, fit rules, cache keys, who decides (CPU)
# ----------------------------------------------------------------------------
ALL_TILES = sorted(set(grouped_matmul.ROW_TILE_CANDIDATES
                       + grouped_matmul.WEIGHT_TILE_CANDIDATES), key=lambda b: b.name)


@pytest.mark.parametrize("blocks", ALL_TILES, ids=lambda b: b.name)
def test_tile_names_round_trip(blocks):
  assert grouped_matmul.MosaicGpuBlocks.from_name(blocks.name) == blocks


@pytest.mark.parametrize("name", ["m128_n128_k64_s4", "128x128", "m128_n128_k64_s4_g1_x2",
                                  "m128_n128_k64_s04_g1"])
def test_bad_tile_names_raise(name):
  with pytest.raises(ValueError, match="not a Mosaic GPU tile name"):
    grouped_matmul.MosaicGpuBlocks.from_name(name)


def test_tile_fit_rules():
  fits = grouped_matmul.MosaicGpuBlocks(64, 128, 64, 6, 2).fits
  # Row products: contraction by block_k, output by block_n x grid_block_n.
  assert fits(grouped_matmul.FORWARD, 512, 2048) and fits(grouped_matmul.TRANSPOSED, 2048, 512)
  assert not fits(grouped_matmul.FORWARD, 512, 128)   # 128 % (128 * 2)
  assert not fits(grouped_matmul.FORWARD, 96, 512)    # 96 % 64
  # Weight gradient: in-features by block_m, out-features by block_n x grid_block_n.
  assert fits(grouped_matmul.WEIGHT, 64, 256) and not fits(grouped_matmul.WEIGHT, 96, 256)
  with pytest.raises(ValueError, match="Unknown product"):
    fits("backward", 512, 512)
  # The README's shapes take every candidate.
  for product in grouped_matmul.PRODUCTS:
    for k, n in ((512, 2048), (2048, 512), (1024, 4096), (4096, 1024)):
      pool = (grouped_matmul.WEIGHT_TILE_CANDIDATES if product == grouped_matmul.WEIGHT
              else grouped_matmul.ROW_TILE_CANDIDATES)
      assert grouped_matmul.tile_candidates(product, k, n) == pool


def test_tile_cache_keys_separate_products_and_shapes():
  env = tuning.environment()

  def key(product="forward", rows=8192, k=512, n=2048, groups=8, dtype=jnp.bfloat16):
    candidates = grouped_matmul.tile_candidates(product, k, n)
    return tuning.cache_key(grouped_matmul.tile_problem(product, rows, k, n, groups, dtype,
                                                        candidates), env)

  keys = [key(), key("transposed"), key("weight"), key(rows=8192 * 2), key(k=1024),
          key(n=4096), key(groups=32), key(dtype=jnp.float16)]
  assert len(set(keys)) == len(keys)
  assert key() == key()  # Stable: the cache finds it again.
  problem = grouped_matmul.tile_problem("forward", 8192, 512, 2048, 8, jnp.bfloat16,
                                        grouped_matmul.ROW_TILE_CANDIDATES)
  assert problem["candidates"] == [b.name for b in grouped_matmul.ROW_TILE_CANDIDATES]
  assert json_round_trip(problem) == problem


def json_round_trip(value):
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(json.dumps(value))


def _forbid_choose(*args, **kwargs):
  raise AssertionError("tuning.choose must not be asked")


def test_fixed_tiles_are_never_overridden(monkeypatch):
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  monkeypatch.setattr(tuning, "choose", _forbid_choose)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  fixed = grouped_matmul.MosaicGpuBlocks(64, 64, 64, 2, 1)
  with grouped_matmul.mosaic_gpu_blocks(fixed):
    for product in grouped_matmul.PRODUCTS:
      assert grouped_matmul.mosaic_gpu_tiles(product, 8192, 512, 2048, 8, jnp.bfloat16) == fixed
  # Restored on exit: the static rule again (measuring off).
  monkeypatch.setenv(tuning.ENV_VAR, "static")
  assert grouped_matmul.mosaic_gpu_tiles("forward", 8192, 512, 2048, 8,
                                         jnp.bfloat16) == grouped_matmul.DEFAULT_BLOCKS


@pytest.mark.parametrize("mode, devices", [("static", 1), ("measure", 8)])
def test_static_rule_without_measuring_or_with_several_devices(monkeypatch, mode, devices):
  monkeypatch.setenv(tuning.ENV_VAR, mode)
  monkeypatch.setattr(tuning, "choose", _forbid_choose)
  monkeypatch.setattr(jax, "device_count", lambda: devices)
  assert grouped_matmul.mosaic_gpu_tiles("weight", 8192, 512, 2048, 8,
                                         jnp.bfloat16) == grouped_matmul.DEFAULT_BLOCKS


def test_static_rule_is_the_first_fitting_candidate_where_defaults_do_not_fit(monkeypatch):
  monkeypatch.setattr(grouped_matmul, "DEFAULT_BLOCKS",
                      grouped_matmul.MosaicGpuBlocks(128, 128, 64, 4, 8))  # n % 1024
  assert grouped_matmul.mosaic_gpu_tiles(
      "forward", 8192, 512, 512, 8, jnp.bfloat16) == grouped_matmul.ROW_TILE_CANDIDATES[0]


@pytest.mark.parametrize("product", grouped_matmul.PRODUCTS)
def test_measured_tiles_are_chosen_by_tuning(monkeypatch, product):
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  asked = []

  def choose(problem, builders, static):
    asked.append((problem, sorted(builders), static))
    return tuning.Decision(problem, sorted(builders)[-1], {}, "measured")

  monkeypatch.setattr(tuning, "choose", choose)
  blocks = grouped_matmul.mosaic_gpu_tiles(product, 8192, 512, 2048, 32, jnp.bfloat16)
  (problem, names, static), = asked
  expected = grouped_matmul.tile_candidates(product, 512, 2048)
  assert names == sorted(b.name for b in expected)
  assert static == grouped_matmul.DEFAULT_BLOCKS.name
  assert problem["product"] == product and problem["groups"] == 32 and problem["rows"] == 8192
  assert blocks == grouped_matmul.MosaicGpuBlocks.from_name(names[-1])


def test_representative_group_sizes_are_balanced_and_fixed():
  sizes = grouped_matmul._representative_group_sizes(8192, 128)  # pylint: disable=protected-access
  assert sizes.sum() == 8192 and sizes.shape == (128,) and sizes.min() > 20
  np.testing.assert_array_equal(sizes, grouped_matmul._representative_group_sizes(8192, 128))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# tokamax: where it may run, the candidates, the wiring (CPU)
# ----------------------------------------------------------------------------
@pytest.fixture
def device(monkeypatch):
  """Pretends to be a device: (backend, compute capability, tokamax import error)."""
  def set_device(backend, capability="", tokamax_error=""):
    monkeypatch.setattr(grouped_matmul, "_backend", lambda: backend)
    monkeypatch.setattr(grouped_matmul, "_gpu_capability", lambda: capability)
    monkeypatch.setattr(grouped_matmul, "_tokamax_import_error", lambda: tokamax_error)
  return set_device


@pytest.mark.parametrize("backend, capability, dtype, sizes, reason", [
    ("gpu", "9.0", jnp.bfloat16, (512, 2048), ""),
    ("gpu", "9.0", jnp.float16, (1024, 4096), ""),
    ("gpu", "9.0", jnp.float32, (512, 2048), "float32 is not bfloat16"),
    ("gpu", "9.0", jnp.bfloat16, (320, 2048), "in_features=320 is not a multiple of 128"),
    ("gpu", "8.0", jnp.bfloat16, (512, 2048), "need Hopper"),
    ("gpu", "10.0", jnp.bfloat16, (512, 2048), "need Hopper"),
    ("tpu", "", jnp.float32, (512, 2048), ""),
    ("tpu", "", jnp.bfloat16, (64, 2048), "in_features=64 is under 128"),
    ("cpu", "", jnp.float32, (512, 2048), "default backend is 'cpu'"),
])
def test_tokamax_runs_only_where_its_kernels_do(device, backend, capability, dtype, sizes,
                                                reason):
  device(backend, capability)
  got = grouped_matmul.tokamax_unsupported_reason(dtype, *sizes)
  assert (got == "") if not reason else (reason in got)


def test_tokamax_not_installed_is_a_reason(device):
  device("gpu", "9.0", tokamax_error="tokamax is not importable (ImportError: x)")
  assert "not importable" in grouped_matmul.tokamax_unsupported_reason(jnp.bfloat16, 512, 2048)
  assert grouped_matmul.alternative_kernels("mosaic_gpu", jnp.bfloat16, 512, 2048) == ()


def test_real_cpu_has_no_tokamax_candidate():
  assert grouped_matmul.alternative_kernels("cpu_blas", jnp.float32, 512, 2048) == ()
  with pytest.raises(ValueError, match="'tokamax' cannot run here"):
    grouped_matmul.resolve_implementation("tokamax", jnp.bfloat16, 512, 2048)


Plan = dispatch.Plan
MOSAIC, TOKAMAX = Plan("ragged", "mosaic_gpu"), Plan("ragged", "tokamax")
OVERFLOW, BUFFERS = Plan("overflow"), Plan("sorted_buffers")


def _settings(**overrides):
  settings = dict(dispatch="dropless", dropless_backend="auto",
                  grouped_matmul_implementation="auto", expert_choice=False,
                  num_expert_partitions=1, dtype=jnp.bfloat16, embed=512, expert_mlp_dim=2048,
                  device_count=1)
  settings.update(overrides)
  return settings


@pytest.mark.parametrize("tokamax_error, overrides, expected", [
    # 'auto': Mosaic (static rule), tokamax, overflow, measured by the layer.
    ("", {}, (MOSAIC, TOKAMAX, OVERFLOW)),
    ("not importable", {}, (MOSAIC, OVERFLOW)),
    ("", dict(dropless_backend="ragged"), (MOSAIC, TOKAMAX)),
    # Explicit implementations are never overridden.
    ("", dict(grouped_matmul_implementation="tokamax", dropless_backend="ragged"), (TOKAMAX,)),
    ("", dict(grouped_matmul_implementation="mosaic_gpu", dropless_backend="ragged"),
     (MOSAIC,)),
    ("", dict(grouped_matmul_implementation="tokamax"), (TOKAMAX, OVERFLOW)),
    ("", dict(dropless_backend="overflow"), (OVERFLOW,)),
    # 'sorted': padded buffers under 'auto'; exact rows on a kernel asked for by name.
    ("", dict(dispatch="sorted"), (BUFFERS,)),
    ("", dict(dispatch="sorted", grouped_matmul_implementation="tokamax"),
     (Plan("sorted_rows", "tokamax"),)),
    ("", dict(dispatch="sorted", grouped_matmul_implementation="mosaic_gpu"),
     (Plan("sorted_rows", "mosaic_gpu"),)),
    ("", dict(dispatch="sorted", grouped_matmul_implementation="tokamax",
              num_expert_partitions=2), (BUFFERS,)),
    ("", dict(dispatch="sorted", grouped_matmul_implementation="xla"), (BUFFERS,)),
])
def test_hopper_candidates(device, monkeypatch, tokamax_error, overrides, expected):
  device("gpu", "9.0", tokamax_error=tokamax_error)
  assert grouped_matmul.efficient_implementation(jnp.bfloat16, 512, 2048) == "mosaic_gpu"
  assert dispatch.candidates(**_settings(**overrides)) == expected


def test_tpu_candidates(device):
  device("tpu")
  assert dispatch.candidates(**_settings()) == (Plan("ragged", "xla"), TOKAMAX, OVERFLOW)
  assert dispatch.candidates(**_settings(dtype=jnp.float32, embed=64)) == (
      Plan("ragged", "xla"), OVERFLOW)


def test_float32_on_hopper_has_no_grouped_kernel(device):
  device("gpu", "9.0")
  assert dispatch.candidates(**_settings(dtype=jnp.float32)) == (OVERFLOW,)


@pytest.mark.parametrize("plan", [TOKAMAX, Plan("sorted_rows", "tokamax"),
                                  Plan("sorted_rows", "mosaic_gpu"), MOSAIC])
def test_explicit_fields_select_exactly_the_gpu_plans(device, plan):
  device("gpu", "9.0")
  assert dispatch.candidates(**_settings(**dispatch.explicit_fields(plan))) == (plan,)


def test_the_layer_and_the_benchmark_accept_tokamax():
  from benchmarks import moe_layer  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import moe, routing  # pylint: disable=g-import-not-at-top
  assert "tokamax" in grouped_matmul.IMPLEMENTATIONS
  args = moe_layer.parse_args(["--grouped_matmul_implementation", "tokamax"])
  assert args.grouped_matmul_implementation == "tokamax"
  layer = moe.MoeLayer(num_experts=4, router=routing.TokensChooseRouter(),
                       grouped_matmul_implementation="tokamax", expert_mlp_dim=16)
  x = jnp.ones((1, 8, 8))
  with pytest.raises(ValueError, match="'tokamax' cannot run here"):
    layer.init(jax.random.PRNGKey(0), x)  # Validated, then refused: this is a CPU.


class _PoisoningTokamax:
  """A stand-in for `tokamax` whose kernels leave garbage past the groups."""

  @staticmethod
  def ragged_dot(x, w, group_sizes, implementation=None):
    del implementation

    @jax.custom_vjp
    def product(x, w):
      return _poison(jax.lax.ragged_dot(x, w, group_sizes), group_sizes)

    def fwd(x, w):
      return product(x, w), (x, w)

    def bwd(residuals, dy):
      x, w = residuals
      _, vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes), x, w)
      dx, dw = vjp(dy)
      return _poison(dx, group_sizes), dw

    product.defvjp(fwd, bwd)
    return product(x, w)


def _poison(rows, group_sizes):
  owned = jnp.arange(rows.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(owned[:, None], rows, jnp.nan)


@pytest.mark.parametrize("sizes", GROUP_SIZES)
def test_tokamax_wiring_masks_rows_past_the_groups(monkeypatch, sizes):
  monkeypatch.setattr(grouped_matmul, "_tokamax", lambda: _PoisoningTokamax)
  x, w, dy = _inputs(jnp.float32)
  group_sizes = jnp.array(sizes, jnp.int32)
  out, vjp = jax.vjp(lambda x, w: grouped_matmul._tokamax_gmm(x, w, group_sizes), x, w)  # pylint: disable=protected-access
  ref, ref_vjp = jax.vjp(lambda x, w: _reference(x, w, group_sizes), x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_tokamax_installed
@pytest.mark.parametrize("sizes", GROUP_SIZES)
def test_tokamax_api_and_its_vjp_through_its_xla_backend(monkeypatch, sizes):
  # tokamax's own XLA implementation runs on the CPU: the same call, the same
  # VJP machinery (its custom_vjp), under jit, as its GPU kernels get.
  monkeypatch.setattr(grouped_matmul, "_TOKAMAX_IMPLEMENTATION", "xla")
  x, w, dy = _inputs(jnp.float32)
  group_sizes = jnp.array(sizes, jnp.int32)
  out, vjp = jax.jit(lambda x, w: jax.vjp(
      lambda x, w: grouped_matmul._tokamax_gmm(x, w, group_sizes), x, w))(x, w)  # pylint: disable=protected-access
  ref, ref_vjp = jax.vjp(lambda x, w: _reference(x, w, group_sizes), x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_tokamax_installed
def test_tokamax_ignores_the_programs_own_flags(monkeypatch):
  # tokamax parses absl flags from sys.argv when nobody has: a benchmark's
  # `--tokens` would raise UnrecognizedFlagError inside a jit trace.
  from absl import flags  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr("sys.argv", ["moe_layer.py", "--tokens", "4096"])
  flags.FLAGS.unparse_flags()
  monkeypatch.setattr(grouped_matmul, "_TOKAMAX_IMPLEMENTATION", "xla")
  x, w, _ = _inputs(jnp.float32)
  out = grouped_matmul._tokamax_gmm(x, w, jnp.array([4, 4, 4, 4], jnp.int32))  # pylint: disable=protected-access
  assert out.shape == (16, 6) and flags.FLAGS.is_parsed()


# ----------------------------------------------------------------------------
# moe_jax.tuning: nested choices, preferences (what the GPU candidates need)
# ----------------------------------------------------------------------------
def _sleeper(seconds):
  return lambda: (lambda: time.sleep(seconds))


def test_a_choice_made_while_a_candidate_is_built_does_not_deadlock(monkeypatch):
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  inner = {}

  def outer_candidate():
    # As a layer candidate does when its grouped matmuls pick their tiles.
    inner["decision"] = tuning.choose({"name": "inner"}, {"x": _sleeper(0.02),
                                                          "y": _sleeper(0.0)}, static="x")
    return lambda: time.sleep(0.0)

  result = {}
  thread = threading.Thread(target=lambda: result.update(decision=tuning.choose(
      {"name": "outer"}, {"a": outer_candidate, "b": _sleeper(0.03)}, static="b")),
      daemon=True)
  thread.start()
  thread.join(timeout=120)
  assert not thread.is_alive(), "nested tuning.choose deadlocked"
  assert (inner["decision"].choice, inner["decision"].source) == ("y", "measured")
  assert (result["decision"].choice, result["decision"].source) == ("a", "measured")
  assert sorted(e["problem"]["name"] for e in tuning.read_cache().values()) == ["inner",
                                                                                "outer"]
  assert [d.problem["name"] for d in tuning.decisions()] == ["inner", "outer"]


@pytest.mark.parametrize("tokamax_ms, expected", [
    (1.00, "ragged/tokamax"), (1.02, "ragged/tokamax"), (0.90, "ragged/tokamax"),
    (1.05, "ragged/mosaic_gpu")])
def test_tokamax_wins_near_ties(monkeypatch, tokamax_ms, expected):
  # "Prefer the maintained library where it is at least as fast": within
  # grouped_matmul.TOKAMAX_PREFERENCE (3%) of the fastest.
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  times = {"ragged/mosaic_gpu": 1.0, "ragged/tokamax": tokamax_ms, "overflow": 1.5}
  monkeypatch.setattr(tuning, "measure", lambda candidates, rounds=tuning.ROUNDS: dict(times))
  decision = tuning.choose({"name": f"tie {tokamax_ms}"}, {n: _sleeper(0) for n in times},
                           static="ragged/mosaic_gpu")
  assert decision.choice == expected


@pytest.mark.parametrize("product", grouped_matmul.PRODUCTS)
def test_tile_steps_feed_each_kernel_its_operands(monkeypatch, product):
  # The measuring steps, with XLA standing in for the Mosaic kernels (CPU).
  seen = []

  def forward(x, w, group_sizes, blocks, *, transpose_rhs):
    seen.append((x.shape, w.shape, group_sizes.shape, blocks, transpose_rhs))
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose_rhs else w, group_sizes)

  def weight(x, dy, group_sizes, blocks):
    seen.append((x.shape, dy.shape, group_sizes.shape, blocks, None))
    return jnp.zeros((group_sizes.shape[0], x.shape[1], dy.shape[1]), x.dtype)

  monkeypatch.setattr(grouped_matmul, "_mosaic_forward_product", forward)
  monkeypatch.setattr(grouped_matmul, "_mosaic_weight_product", weight)
  blocks = grouped_matmul.ROW_TILE_CANDIDATES[1]
  step = grouped_matmul._tile_step(product, 256, 64, 128, 4, jnp.bfloat16, blocks)()  # pylint: disable=protected-access
  outputs = jax.block_until_ready(step())
  reps = len(outputs)
  assert 1 <= reps <= 8 and len(seen) == reps  # Distinct inputs, one trace.
  expected = {"forward": ((256, 64), (4, 64, 128), (4,), blocks, False),
              "transposed": ((256, 64), (4, 128, 64), (4,), blocks, True),
              "weight": ((256, 64), (256, 128), (4,), blocks, None)}[product]
  assert seen[0] == expected
  assert outputs[0].shape == ((4, 64, 128) if product == "weight" else (256, 128))
