"""Tests of moe_jax.training.optimizers: Adafactor factoring, schedules, freezing."""

import math

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import checkpoints
from moe_jax.training import optimizers

# ---------------------------------------------------------------------------
# Test trees (built by hand; distinct shapes per leaf so state arrays can be
# attributed to parameters by shape).
# ---------------------------------------------------------------------------

E, D, F, MLP, VOCAB = 3, 12, 20, 24, 40

MOE_SPECS = {
    "token_embedder/embedding": ((VOCAB, D), ("vocab", "embed")),
    "encoder/layers_0/attention/query/kernel": ((D, 2, 5), ("embed", "heads", "kv")),
    "encoder/layers_0/pre_attention_layer_norm/scale": ((D,), ("embed",)),
    "encoder/layers_1/mlp/router/w": ((D, E), ("embed", "unmodeled")),
    "encoder/layers_1/mlp/expert/wi_0": ((E, D, F), ("expert", "embed", "expert_mlp")),
    "encoder/layers_1/mlp/expert/wo": ((E, F, D), ("expert", "expert_mlp", "embed")),
    "decoder/layers_0/mlp/wi_0": ((D, MLP), ("embed", "mlp")),
    "decoder/layers_0/mlp/wo": ((MLP, D), ("mlp", "embed")),
}
SCANNED_SPECS = {
    "token_embedder/embedding": ((VOCAB, D), ("vocab", "embed")),
    "encoder/layers/subblock_1/mlp/router/w": ((2, D, E), ("layers", "embed", "unmodeled")),
    "encoder/layers/subblock_1/mlp/expert/wi_0": (
        (2, E, D, F), ("layers", "expert", "embed", "expert_mlp")),
    "encoder/layers/subblock_0/mlp/wi_0": ((2, D, MLP), ("layers", "embed", "mlp")),
}
DENSE_SPECS = {k: v for k, v in MOE_SPECS.items() if "/router/" not in k and "/expert/" not in k}


def _tree(specs, seed=0):
  """(params, names): params ~ N(0, 0.1^2) float32, names as tuples."""
  rng = np.random.default_rng(seed)
  params = {p: jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32)
            for p, (shape, _) in specs.items()}
  return (checkpoints.unflatten(params),
          checkpoints.unflatten({p: axes for p, (_, axes) in specs.items()}))


def _grads(params, step):
  """Nonzero gradients that differ per step."""
  rng = np.random.default_rng(1000 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 1, p.shape), jnp.float32), params)


def _bits(x):
  return np.asarray(x).view(np.uint32)


# ---------------------------------------------------------------------------
# Adafactor against an independent float64 numpy reference.
# ---------------------------------------------------------------------------


def _reference_adafactor(x, grads, *, lr, min_dim, clip=1.0, eps1=1e-30, eps2=1e-3,
                         decay_rate=0.8, momentum=None, weight_decay=None):
  """Adafactor (Shazeer & Stern 2018, Alg. 4/5) on `x` `[slices, a, b]` or `[slices, n]`.

  Every slice is an independent parameter: its own factored (row sums R,
  column sums C) or full second moments, update clipping and relative step
  size. Returns the update (new - old) of every step.
  """
  x = np.array(x, np.float64)
  moments = [None] * x.shape[0]
  trace = np.zeros_like(x)
  deltas = []
  for t, g in enumerate(grads, start=1):
    g = np.array(g, np.float64).reshape(x.shape)
    rho = 1.0 - t ** -decay_rate
    new_x = x.copy()
    for s in range(x.shape[0]):
      g2 = g[s] ** 2 + eps1
      if g[s].ndim == 2 and min(g[s].shape) >= min_dim:
        r, c = moments[s] if moments[s] is not None else (0.0, 0.0)
        r = rho * r + (1 - rho) * g2.sum(axis=1)
        c = rho * c + (1 - rho) * g2.sum(axis=0)
        moments[s] = (r, c)
        v = np.outer(r, c) / r.sum()
      else:
        v = rho * (moments[s] if moments[s] is not None else 0.0) + (1 - rho) * g2
        moments[s] = v
      u = g[s] / np.sqrt(v)
      if clip is not None:
        u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / clip)
      step = lr * max(eps2, np.sqrt(np.mean(x[s] ** 2))) * u
      if momentum is not None:
        trace[s] = momentum * trace[s] + (1 - momentum) * step
        step = trace[s]
      if weight_decay is not None:
        step = step + weight_decay * x[s]
      new_x[s] = x[s] - step
    deltas.append(new_x - x)
    x = new_x
  return deltas


def _run(tx, params, steps):
  """The updates of `steps` steps of `tx` on `_grads`, and the final state."""
  state = tx.init(params)
  updates_seen = []
  for step in range(steps):
    updates, state = tx.update(_grads(params, step), state, params)
    updates_seen.append(updates)
    params = optax.apply_updates(params, updates)
  return updates_seen, state


@pytest.mark.parametrize("shape,names,slices_view,kwargs", [
    # Expert kernels: per-expert factored statistics.
    ((E, D, F), ("expert", "embed", "expert_mlp"), (E, D, F), {}),
    ((E, F, D), ("expert", "expert_mlp", "embed"), (E, F, D), {}),
    # Scanned expert kernel: one slice per (layer, expert).
    ((2, E, D, F), ("layers", "expert", "embed", "expert_mlp"), (2 * E, D, F), {}),
    # Attention kernel: factored as the matrix [embed] x [heads * kv].
    ((D, 2, 5), ("embed", "heads", "kv"), (1, D, 10), {}),
    # Per-expert vectors and too-small expert slices keep full moments.
    ((E, F), ("expert", "expert_mlp"), (E, F), {}),
    ((E, 6, F), ("expert", "embed", "expert_mlp"), (E, 6, F), {}),
    ((E, D, F), ("expert", "embed", "expert_mlp"), (E, D, F),
     dict(momentum=0.9, weight_decay_rate=1e-2, clipping_threshold=None)),
])
def test_adafactor_matches_numpy_reference(shape, names, slices_view, kwargs):
  rng = np.random.default_rng(0)
  # Experts on very different scales: pooled statistics would differ.
  scale = 10.0 ** np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
  x = (rng.normal(0, 0.1, shape) * scale).astype(np.float32)
  grads = [(rng.normal(0, 1, shape) * scale).astype(np.float32) for _ in range(3)]
  lr, min_dim = 0.05, 8
  factory = optimizers.adafactor(lr, min_dim_size_to_factor=min_dim, **kwargs)
  tx = factory({"w": names})
  params = {"w": jnp.asarray(x)}
  state = tx.init(params)
  got = []
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    got.append(np.asarray(updates["w"]))
    params = optax.apply_updates(params, updates)

  want = _reference_adafactor(
      x.reshape(slices_view), [g.reshape(slices_view) for g in grads], lr=lr, min_dim=min_dim,
      clip=kwargs.get("clipping_threshold", 1.0), momentum=kwargs.get("momentum"),
      weight_decay=kwargs.get("weight_decay_rate"))
  for step, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g.reshape(slices_view), w, rtol=2e-4, atol=1e-9,
                               err_msg=f"step {step}")


def test_pooled_adafactor_differs_from_per_expert():
  """optax.adafactor clips and scales the whole [E, d, f] block: not per expert."""
  rng = np.random.default_rng(0)
  scale = 10.0 ** np.arange(E).reshape(E, 1, 1)
  x = jnp.asarray(rng.normal(0, 0.1, (E, D, F)) * scale, jnp.float32)
  g = jnp.asarray(rng.normal(0, 1, (E, D, F)) * scale, jnp.float32)
  per_expert = optimizers.adafactor(0.05, min_dim_size_to_factor=8)(
      {"w": ("expert", "embed", "expert_mlp")})
  pooled = optax.adafactor(0.05, min_dim_size_to_factor=8)
  a, _ = per_expert.update({"w": g}, per_expert.init({"w": x}), {"w": x})
  b, _ = pooled.update({"w": g}, pooled.init({"w": x}), {"w": x})
  assert not np.allclose(a["w"], b["w"], rtol=1e-2)


def test_scanned_stack_updates_like_its_layers():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0, 0.1, (2, E, D, F)), jnp.float32)
  names = ("expert", "embed", "expert_mlp")
  stacked_tx = optimizers.adafactor(0.05, min_dim_size_to_factor=8)(
      {"layers": {"wi": ("layers",) + names}})
  unrolled_tx = optimizers.adafactor(0.05, min_dim_size_to_factor=8)(
      {"layers_0": {"wi": names}, "layers_1": {"wi": names}})
  stacked = {"layers": {"wi": x}}
  unrolled = {"layers_0": {"wi": x[0]}, "layers_1": {"wi": x[1]}}
  s_state, u_state = stacked_tx.init(stacked), unrolled_tx.init(unrolled)
  for step in range(3):
    g = jnp.asarray(np.random.default_rng(step).normal(0, 1, x.shape), jnp.float32)
    s_up, s_state = stacked_tx.update({"layers": {"wi": g}}, s_state, stacked)
    u_up, u_state = unrolled_tx.update(
        {"layers_0": {"wi": g[0]}, "layers_1": {"wi": g[1]}}, u_state, unrolled)
    np.testing.assert_allclose(
        s_up["layers"]["wi"], np.stack([u_up["layers_0"]["wi"], u_up["layers_1"]["wi"]]),
        rtol=1e-6, atol=1e-12)
    stacked = optax.apply_updates(stacked, s_up)
    unrolled = optax.apply_updates(unrolled, u_up)


# ---------------------------------------------------------------------------
# Non-batched kernels: bit-identical to optax.adafactor.
# ---------------------------------------------------------------------------

PLAIN_SPECS = {
    "embedding": ((VOCAB, D), ("vocab", "embed")),
    "mlp/wi": ((D, MLP), ("embed", "mlp")),
    "mlp/wo": ((MLP, D), ("mlp", "embed")),
    "small/wi": ((6, MLP), ("embed", "mlp")),  # Below min_dim_size_to_factor.
    "square": ((D, D), ("embed", "mlp")),
    "relpos": ((2, 32), ("heads", "relpos_buckets")),
    "norm/scale": ((D,), ("embed",)),
}


@pytest.mark.parametrize("ours,theirs", [
    (dict(), dict()),
    (dict(momentum=0.9, weight_decay_rate=1e-3, clipping_threshold=None,
          multiply_by_parameter_scale=False, decay_rate=0.5, step_offset=2, epsilon1=1e-20),
     dict(momentum=0.9, weight_decay_rate=1e-3, clipping_threshold=None,
          multiply_by_parameter_scale=False, decay_rate=0.5, decay_offset=2, eps=1e-20)),
])
@pytest.mark.parametrize("learning_rate", [
    1e-2, optax.linear_schedule(1e-2, 1e-3, transition_steps=4)])
def test_plain_kernels_match_optax_adafactor_exactly(ours, theirs, learning_rate):
  params, names = _tree(PLAIN_SPECS)
  tx = optimizers.adafactor(learning_rate, min_dim_size_to_factor=8, **ours)(names)
  reference = optax.adafactor(learning_rate, min_dim_size_to_factor=8, **theirs)
  got, _ = _run(tx, params, steps=4)
  want, _ = _run(reference, params, steps=4)
  for step, (g, w) in enumerate(zip(got, want)):
    for path in checkpoints.flatten(g):
      np.testing.assert_array_equal(_bits(checkpoints.flatten(g)[path]),
                                    _bits(checkpoints.flatten(w)[path]),
                                    err_msg=f"{path} step {step}")


# ---------------------------------------------------------------------------
# State layout.
# ---------------------------------------------------------------------------


def test_state_layout_with_default_factoring():
  specs = {
      "expert/wi": ((2, 128, 256), ("expert", "embed", "expert_mlp")),
      "expert/wo": ((2, 256, 128), ("expert", "expert_mlp", "embed")),
      "expert/small": ((2, 64, 256), ("expert", "embed", "expert_mlp")),
      "scanned/wi": ((3, 2, 128, 256), ("layers", "expert", "embed", "expert_mlp")),
      "attention/kernel": ((128, 4, 64), ("embed", "heads", "kv")),
      "router/w": ((128, 8), ("embed", "unmodeled")),
      "norm/scale": ((128,), ("embed",)),
  }
  params = checkpoints.unflatten(
      {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, (s, _) in specs.items()})
  names = checkpoints.unflatten({p: a for p, (_, a) in specs.items()})
  state = jax.eval_shape(optimizers.adafactor(1e-3, momentum=0.9)(names).init, params)
  (factored,) = [s for s in state if isinstance(s, optimizers.FactoredRmsState)]
  v_row, v_col, v = (checkpoints.flatten(tree) for tree in factored[1:])
  shapes = {p: tuple(None if m[p] is None else m[p].shape for m in (v_row, v_col, v))
            for p in specs}
  assert shapes == {
      "expert/wi": ((2, 128), (2, 256), None),
      "expert/wo": ((2, 128), (2, 256), None),
      "expert/small": (None, None, (2, 64, 256)),
      "scanned/wi": ((3, 2, 128), (3, 2, 256), None),
      "attention/kernel": ((128,), (4, 64), None),
      "router/w": (None, None, (128, 8)),
      "norm/scale": (None, None, (128,)),
  }
  (momentum,) = [s for s in state if isinstance(s, optax.EmaState)]
  assert {p: t.shape for p, t in checkpoints.flatten(momentum.ema).items()} == {
      p: s for p, (s, _) in specs.items()}


def test_factor_rule_errors():
  with pytest.raises(ValueError, match=r"'mystery'.*'a/w'.*factor_rules"):
    optimizers.adafactor(1e-3)({"a": {"w": ("embed", "mystery")}})
  with pytest.raises(ValueError, match=r"'w'.*incomplete"):
    optimizers.adafactor(1e-3, min_dim_size_to_factor=1)(
        {"w": ("embed", "heads", "unmodeled")}).init({"w": jnp.zeros((4, 4, 4))})
  with pytest.raises(ValueError, match=r"'b/w' has no logical axis names"):
    optimizers.adafactor(1e-3)({"a": {"w": ("embed",)}}).init(
        {"a": {"w": jnp.zeros(4)}, "b": {"w": jnp.zeros(4)}})
  with pytest.raises(ValueError, match="factor_rules values"):
    optimizers.adafactor(1e-3, factor_rules={"embed": "rows"})({"w": ("embed",)})


# ---------------------------------------------------------------------------
# Schedules and the learning rate.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("factors,kwargs,step,want", [
    ("constant * rsqrt_decay", dict(base_learning_rate=1.0, warmup_steps=10000), 0, 0.01),
    ("constant * rsqrt_decay", dict(base_learning_rate=1.0, warmup_steps=10000), 10000, 0.01),
    ("constant * rsqrt_decay", dict(base_learning_rate=1.0, warmup_steps=10000), 40000, 0.005),
    ("constant", dict(base_learning_rate=1e-4), 123456, 1e-4),
    ("constant * linear_warmup", dict(base_learning_rate=1e-3, warmup_steps=1000), 500, 5e-4),
    ("constant * linear_warmup", dict(base_learning_rate=1e-3, warmup_steps=1000), 5000, 1e-3),
    # Floored at min_learning_rate (t5x's 1e-8).
    ("constant * linear_warmup", dict(base_learning_rate=1e-3, warmup_steps=1000), 0, 1e-8),
    ("linear_warmup * rsqrt_decay", dict(warmup_steps=100), 50, 0.05),
    ("rsqrt_normalized_decay", dict(warmup_steps=100), 400, 0.5),
    ("constant * decay_every", dict(base_learning_rate=2.0, decay_factor=0.5,
                                    steps_per_decay=100), 250, 0.5),
    ("constant * cosine_decay", dict(base_learning_rate=2.0, warmup_steps=100,
                                     steps_per_cycle=1000), 100, 2.0),
    ("constant * cosine_decay", dict(base_learning_rate=2.0, warmup_steps=100,
                                     steps_per_cycle=1000), 600, 1.0),
    ("constant * cosine_decay", dict(base_learning_rate=2.0, warmup_steps=100,
                                     steps_per_cycle=1000), 850, 2.0 * (1 - math.sqrt(0.5)) / 2),
])
def test_schedule_values(factors, kwargs, step, want):
  fn = optimizers.schedule(factors, **kwargs)
  np.testing.assert_allclose(fn(step), want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(jnp.asarray(step, jnp.int32)), want, rtol=1e-6)


def test_schedule_errors():
  with pytest.raises(ValueError, match=r"\['rsqrt'\].*linear_warmup"):
    optimizers.schedule("constant * rsqrt")
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizers.schedule("constant * linear_warmup", warmup_steps=0)


def test_learning_rate_fn_and_kind():
  sched = optimizers.schedule("constant * rsqrt_decay", 1.0, warmup_steps=100)
  factory = optimizers.adafactor(sched)
  assert optimizers.kind(factory) == "adafactor"
  assert optimizers.kind(optimizers.adamw(1e-3)) == "adam"
  np.testing.assert_allclose(optimizers.learning_rate_fn(factory)(400), 0.05, rtol=1e-6)
  constant = optimizers.learning_rate_fn(optimizers.adamw(3e-4))(jnp.asarray(7))
  assert constant.dtype == jnp.float32 and np.isclose(constant, 3e-4)


def test_update_n_uses_learning_rate_at_n():
  """With SGD the update is -lr(n) * g: the logged rate is the applied one."""
  sched = optimizers.schedule("constant * linear_warmup", 1.0, warmup_steps=4)
  factory = optimizers.OptimizerFactory(lambda _: optax.sgd(sched), sched, "adam")
  tx = optimizers.build(factory, {"w": ("embed",)})
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  for n in range(6):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -optimizers.learning_rate_fn(factory)(n),
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# Freezing.
# ---------------------------------------------------------------------------


def _frozen_paths(specs, groups):
  def member(path, group):
    parts = path.split("/")
    moe = "router" in parts or "expert" in parts
    return {"router": "router" in parts, "experts": "expert" in parts, "moe": moe,
            "non_moe": not moe}[group]
  return {p for p in specs if any(member(p, g) for g in groups)}


def _factor_shapes(shape):
  """Shapes of a parameter's possible state arrays: itself and any dims removed."""
  out = {tuple(shape)}
  for mask in range(1, 2 ** len(shape) - 1):
    out.add(tuple(s for d, s in enumerate(shape) if not mask >> d & 1))
  return out


def _dict_paths(state):
  """'/'-joined dict keys of every state array."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): leaf
          for path, leaf in leaves}


@pytest.mark.parametrize("factory", [
    optimizers.adafactor(1e-2, min_dim_size_to_factor=4, momentum=0.9),
    optimizers.adamw(1e-2),
], ids=["adafactor", "adamw"])
@pytest.mark.parametrize("specs,freeze", [
    pytest.param(MOE_SPECS, ("router",), id="router"),
    pytest.param(MOE_SPECS, ("experts",), id="experts"),
    pytest.param(MOE_SPECS, ("moe",), id="moe"),
    pytest.param(MOE_SPECS, ("non_moe",), id="non_moe"),
    pytest.param(MOE_SPECS, "router", id="router-as-string"),
    pytest.param(MOE_SPECS, ("router", "experts"), id="router+experts"),
    pytest.param(SCANNED_SPECS, ("experts",), id="scanned-experts"),
    pytest.param(SCANNED_SPECS, ("non_moe",), id="scanned-non_moe"),
])
def test_frozen_groups_are_bit_identical_and_stateless(factory, specs, freeze):
  params, names = _tree(specs)
  tx = optimizers.build(factory, names, freeze=freeze, grad_clip_norm=10.0)
  frozen = _frozen_paths(specs, (freeze,) if isinstance(freeze, str) else freeze)
  assert frozen and frozen != set(specs)

  @jax.jit
  def train_step(params, state, step):
    grads = jax.tree.map(lambda p: jnp.sin(p * 100.0 + step) + 0.5, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  new_params = params
  for step in range(3):
    new_params, state = train_step(new_params, state, step)

  before, after = checkpoints.flatten(params), checkpoints.flatten(new_params)
  for path in specs:
    if path in frozen:
      np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]), err_msg=path)
    else:
      assert np.all(np.asarray(after[path]) != np.asarray(before[path])), path
  # No state array belongs to, or is shaped like, a frozen parameter or its factors.
  state_arrays = _dict_paths(state)
  assert not [p for p in state_arrays if any(p.endswith(f) for f in frozen)]
  trainable_shapes = set().union(*(_factor_shapes(specs[p][0]) for p in specs if p not in frozen))
  frozen_shapes = set().union(*(_factor_shapes(specs[p][0]) for p in frozen)) - trainable_shapes
  assert not [a.shape for a in state_arrays.values() if tuple(a.shape) in frozen_shapes]
  # And every trainable parameter does have state.
  for path in set(specs) - frozen:
    assert any(p.endswith(path) for p in state_arrays), path


def test_freeze_with_flax_axis_names():
  """The names tree as the model provides it: FrozenDict of PartitionSpecs."""

  class Holder(nn.Module):
    specs: tuple

    @nn.compact
    def __call__(self):
      for name, shape, axes in self.specs:
        nn_partitioning.param_with_axes(name, nn.initializers.normal(0.1), shape, axes=axes)

  class Layer(nn.Module):
    @nn.compact
    def __call__(self):
      Holder(((("w", (D, E), ("embed", "unmodeled"))),), name="router")()
      Holder((("wi_0", (E, D, F), ("expert", "embed", "expert_mlp")),), name="expert")()
      Holder((("scale", (D,), ("embed",)),), name="norm")()

  variables = Layer().init(jax.random.PRNGKey(0))
  names = nn_partitioning.get_axis_names(variables["params_axes"])
  params = variables["params"]
  tx = optimizers.build(optimizers.adafactor(1e-2, min_dim_size_to_factor=4), names,
                        freeze=("router",))
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert not np.any(updates["router"]["w"])
  assert np.all(updates["expert"]["wi_0"] != 0) and np.all(updates["norm"]["scale"] != 0)


@pytest.mark.parametrize("specs,freeze,match", [
    (MOE_SPECS, ("gate",), r"Unknown freeze group 'gate'.*'router', 'experts', 'moe', 'non_moe'"),
    (MOE_SPECS, ("expert",), r"Unknown freeze group 'expert'"),
    (DENSE_SPECS, ("router",), r"'router' matches no parameter.*dense model"),
    (DENSE_SPECS, ("experts",), r"'experts' matches no parameter"),
    (DENSE_SPECS, ("moe",), r"'moe' matches no parameter"),
    ({k: v for k, v in MOE_SPECS.items() if "/mlp/" in k and "decoder" not in k},
     ("non_moe",), r"'non_moe' matches no parameter"),
    (MOE_SPECS, ("moe", "non_moe"), "freezes every parameter"),
])
def test_freeze_errors(specs, freeze, match):
  _, names = _tree(specs)
  with pytest.raises(ValueError, match=match):
    optimizers.build(optimizers.adafactor(1e-3), names, freeze=freeze)


def test_adamw_with_freezing_matches_optax_adamw_on_trainable_params():
  params, names = _tree(MOE_SPECS)
  tx = optimizers.build(optimizers.adamw(1e-2, weight_decay=1e-2), names, freeze=("experts",))
  got, _ = _run(tx, params, steps=3)
  want, _ = _run(optax.adamw(1e-2, weight_decay=1e-2), params, steps=3)
  for g, w in zip(got, want):
    for path, update in checkpoints.flatten(g).items():
      if "/expert/" in path:
        assert not np.any(update)
      else:
        np.testing.assert_array_equal(_bits(update), _bits(checkpoints.flatten(w)[path]),
                                      err_msg=path)


# ---------------------------------------------------------------------------
# Global-norm clipping.
# ---------------------------------------------------------------------------

SGD = optimizers.OptimizerFactory(lambda _: optax.sgd(1.0), 1.0, "adam")


@pytest.mark.parametrize("grad_scale,clipped", [(100.0, True), (1e-3, False)])
def test_global_norm_clipping_bounds_the_update(grad_scale, clipped):
  params, names = _tree(MOE_SPECS)
  tx = optimizers.build(SGD, names, freeze=("router",), grad_clip_norm=1.0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_scale), params)
  # A huge frozen gradient must not take part in the trainable norm.
  grads["encoder"]["layers_1"]["mlp"]["router"]["w"] *= 1e6
  updates, _ = tx.update(grads, tx.init(params), params)
  trainable = {p: g for p, g in checkpoints.flatten(grads).items() if "/router/" not in p}
  norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in trainable.values()))
  factor = 1.0 / norm if clipped else 1.0
  for path, g in trainable.items():
    np.testing.assert_allclose(checkpoints.flatten(updates)[path], -g * factor, rtol=1e-5,
                               err_msg=path)
  trainable_norm = optax.tree.norm({p: checkpoints.flatten(updates)[p] for p in trainable})
  assert trainable_norm <= 1.0 + 1e-5
  assert not np.any(checkpoints.flatten(updates)["encoder/layers_1/mlp/router/w"])
