"""Tests for EncoderDecoderModel: losses, scoring, cached decoding, t5x API."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import decoding
from moe_jax.models import model as model_lib
from moe_jax.models import transformer
from tests.models import conftest


def reference_token_losses(logits, targets, label_smoothing, z_loss):
  """Cross-entropy against an explicit smoothed target distribution (numpy)."""
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  log_z = np.log(np.sum(np.exp(logits), axis=-1))
  log_probs = logits - log_z[..., None]
  soft = np.full(logits.shape, label_smoothing / (vocab - 1))
  np.put_along_axis(soft, np.asarray(targets)[..., None], 1.0 - label_smoothing, axis=-1)
  entropy = -np.sum(np.where(soft > 0, soft * np.log(np.maximum(soft, 1e-30)), 0.0), axis=-1)
  return -np.sum(soft * log_probs, axis=-1) - entropy + z_loss * log_z ** 2, z_loss * log_z ** 2


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 1e-4), (0.2, 1e-2)])
def test_cross_entropy_matches_reference(label_smoothing, z_loss):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)) * 3
  targets = rng.integers(0, 7, size=(2, 3))
  loss, z = model_lib.cross_entropy_with_logits(
      jnp.asarray(logits), jnp.asarray(targets), label_smoothing=label_smoothing, z_loss=z_loss)
  expected_loss, expected_z = reference_token_losses(logits, targets, label_smoothing, z_loss)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z, expected_z, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("factor, expected_weights, expected_divisor", [
    (None, [[1, 1, 1, 0], [1, 1, 0, 0]], 1.0),
    (8.0, [[1, 1, 1, 0], [1, 1, 0, 0]], 8.0),
    ("NUM_REAL_TARGET_TOKENS", [[1, 1, 1, 0], [1, 1, 0, 0]], 5.0),
    ("num_total_target_tokens", [[1, 1, 1, 0], [1, 1, 0, 0]], 8.0),
    # Row 0 packs a 1-token and a 2-token sequence; row 1 one 2-token one.
    ("AVERAGE_PER_SEQUENCE", [[1, 0.5, 0.5, 0], [0.5, 0.5, 0, 0]], 3.0),
])
def test_loss_normalizing_factors(factor, expected_weights, expected_divisor):
  weights = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  segments = jnp.array([[1, 2, 2, 0], [1, 1, 0, 0]])
  scaled, divisor = model_lib.loss_normalizing_weights(weights, factor, segments)
  np.testing.assert_allclose(scaled, expected_weights)
  np.testing.assert_allclose(divisor, expected_divisor)
  with pytest.raises(ValueError, match="Unknown loss_normalizing_factor"):
    model_lib.loss_normalizing_weights(weights, "PER_TOKEN")


def make_model(module, **kwargs):
  return model_lib.EncoderDecoderModel(module, **kwargs)


@pytest.mark.parametrize("sparse", [False, True])
def test_loss_fn_adds_weighted_moe_losses(batch, sparse):
  module = conftest.make_sparse_module() if sparse else conftest.make_module()
  model = make_model(module, label_smoothing=0.1, z_loss=1e-3,
                     loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                     aux_loss_factor=0.5, router_z_loss_factor=0.25)
  params = conftest.random_variables(module, batch)["params"]
  loss, metrics = jax.jit(model.eval_fn)(params, batch)
  # Independent recomputation from the logits and the sown MoE losses.
  logits, state = jax.jit(functools.partial(model.compute_logits, mutable=("intermediates",)))(
      params, batch)
  token_loss, token_z = reference_token_losses(logits, batch["decoder_target_tokens"], 0.1, 1e-3)
  weights = np.asarray(batch["decoder_target_tokens"] > 0, np.float64)
  expected_ce = np.sum(token_loss * weights) / weights.sum()
  np.testing.assert_allclose(metrics["cross_ent_loss"] + metrics["z_loss"], expected_ce,
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], np.sum(token_z * weights) / weights.sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(metrics["weight_sum"], 6.0)
  if sparse:
    sown = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    by_name = {}
    for path, value in sown:
      name = [p.key for p in path if hasattr(p, "key")][-1]
      by_name.setdefault(name, []).append(float(np.mean(value)))
    assert len(by_name["auxiliary_loss"]) == 2        # one encoder + one decoder MoE layer
    aux = np.mean(by_name["auxiliary_loss"])
    router_z = np.mean(by_name["router_z_loss"])
    np.testing.assert_allclose(metrics["experts/auxiliary_loss"], 0.5 * aux, rtol=1e-5)
    np.testing.assert_allclose(metrics["experts/router_z_loss"], 0.25 * router_z, rtol=1e-5)
    np.testing.assert_allclose(loss, expected_ce + 0.5 * aux + 0.25 * router_z, rtol=1e-5)
    for name in ("fraction_tokens_left_behind", "expert_usage", "router_confidence",
                 "max_expert_fraction"):
      assert f"experts/{name}" in metrics
  else:
    np.testing.assert_allclose(loss, expected_ce, rtol=1e-5)
    assert not any(k.startswith("experts/") for k in metrics)


def test_training_loss_is_differentiable_with_dropout(batch):
  module = conftest.make_sparse_module(dropout_rate=0.1)
  model = make_model(module, aux_loss_factor=0.01)
  params = conftest.random_variables(module, batch)["params"]
  grads, metrics = jax.jit(jax.grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.key(0, impl="rbg"))
  norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
  assert all(np.isfinite(n) for n in jax.tree.leaves(norms))
  assert norms["encoder"]["layers_1"]["mlp"]["router"]["w"] > 0
  assert np.isfinite(metrics["loss"])


def test_score_batch_is_the_target_log_likelihood(batch):
  module = conftest.make_module()
  model = make_model(module)
  params = conftest.random_variables(module, batch)["params"]
  scores, extra = jax.jit(functools.partial(model.score_batch, return_intermediates=True))(
      params, batch)
  logits = np.asarray(jax.jit(model.compute_logits)(params, batch), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  targets = np.asarray(batch["decoder_target_tokens"])
  expected = [sum(log_probs[b, t, targets[b, t]] for t in range(targets.shape[1])
                  if targets[b, t] > 0) for b in range(2)]
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  assert extra["token_scores"].shape == targets.shape


@pytest.mark.parametrize("scan, sparse", [(False, False), (True, True)])
def test_cached_decoding_equals_full_decoding(batch, scan, sparse):
  """Greedy decoding with the KV cache = argmax of full forward passes."""
  build = conftest.make_sparse_module if sparse else conftest.make_module
  module = build(scan_layers=scan)
  model = make_model(module, decode_fn=decoding.greedy, eos_id=1)
  params = conftest.random_variables(module, batch, scale=0.6)["params"]
  decodes, aux = jax.jit(model.predict_batch_with_aux)(params, batch)
  length = batch["decoder_input_tokens"].shape[1]
  # Reference: feed the growing prefix through the full (uncached) model.
  full = jax.jit(model.compute_logits)
  prefix = np.zeros((2, length), np.int32)
  expected = np.zeros((2, length), np.int32)
  expected_log_prob = np.zeros(2)
  done = np.zeros(2, bool)
  for step in range(length):
    logits = np.asarray(full(params, dict(batch, decoder_input_tokens=jnp.asarray(prefix),
                                          decoder_target_tokens=jnp.ones_like(prefix))))
    token = logits[:, step].argmax(-1)
    log_probs = jax.nn.log_softmax(logits[:, step])
    for row in range(2):
      if not done[row]:
        expected[row, step] = token[row]
        expected_log_prob[row] += log_probs[row, token[row]]
        done[row] = token[row] == 1
    if step + 1 < length:
      prefix[:, step + 1] = expected[:, step]
  np.testing.assert_array_equal(decodes, expected)
  np.testing.assert_allclose(aux["scores"], expected_log_prob, rtol=1e-4)


def test_beam_search_prediction_shapes_and_order(batch):
  module = conftest.make_module()
  model = make_model(module, default_decoder_params={"alpha": 0.6})
  params = conftest.random_variables(module, batch, scale=0.6)["params"]
  decodes, aux = jax.jit(functools.partial(model.predict_batch_with_aux, num_decodes=3,
                                           return_all_decodes=True))(params, batch)
  assert decodes.shape == (2, 3, 5)
  assert np.all(np.diff(np.asarray(aux["scores"]), axis=-1) >= 0)
  best = jax.jit(functools.partial(model.predict_batch_with_aux, num_decodes=3))(params, batch)
  np.testing.assert_array_equal(best[0], decodes[:, -1])


def test_get_initial_variables_and_t5x_signatures(batch):
  module = conftest.make_module()
  model = make_model(module)
  variables = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 5),
                              "encoder_segment_ids": (2, 6), "decoder_segment_ids": (2, 5)}))
  assert set(variables) == {"params", "params_axes"}
  # The argument lists t5x's EncoderDecoderModel passes (t5x/models.py).
  call = inspect.signature(transformer.EncoderDecoder.__call__).parameters
  assert list(call)[1:8] == ["encoder_input_tokens", "decoder_input_tokens",
                             "decoder_target_tokens", "encoder_segment_ids",
                             "decoder_segment_ids", "encoder_positions", "decoder_positions"]
  for method, names in ((transformer.EncoderDecoder.encode,
                         ["encoder_input_tokens", "encoder_segment_ids", "encoder_positions"]),
                        (transformer.EncoderDecoder.decode,
                         ["encoded", "encoder_input_tokens", "decoder_input_tokens",
                          "decoder_target_tokens", "encoder_segment_ids",
                          "decoder_segment_ids", "decoder_positions"])):
    params = inspect.signature(method).parameters
    assert list(params)[1:len(names) + 1] == names
  for method in (transformer.EncoderDecoder.__call__, transformer.EncoderDecoder.decode):
    params = inspect.signature(method).parameters
    for keyword in ("enable_dropout", "decode", "max_decode_length"):
      assert params[keyword].kind == inspect.Parameter.KEYWORD_ONLY
  assert module.scan_layers is False     # t5x reads it to pick the cache's batch axis


def test_t5x_style_cache_initialization(batch):
  """t5x sizes the cache by a full-length `__call__` with decode=True."""
  module = conftest.make_module()
  params = conftest.random_variables(module, batch)["params"]
  ones = jnp.ones_like
  _, variables = jax.jit(lambda p: module.apply(
      {"params": p}, ones(batch["encoder_input_tokens"]), ones(batch["decoder_input_tokens"]),
      ones(batch["decoder_input_tokens"]), decode=True, enable_dropout=False,
      mutable=["cache"]))(params)
  cache = variables["cache"]["decoder"]["layers_0"]["self_attention"]
  assert cache["cached_key"].shape == (2, 5, 2, 8)
  assert int(cache["cache_index"]) == 0
  with pytest.raises(ValueError, match="max_decode_length"):
    jax.eval_shape(lambda c: module.apply(
        {"params": params, "cache": c}, jnp.zeros((2, 6, 16)),
        batch["encoder_input_tokens"], batch["decoder_input_tokens"][:, :1],
        batch["decoder_input_tokens"][:, :1], decode=True, enable_dropout=False,
        mutable=["cache"], method=module.decode), variables["cache"])
