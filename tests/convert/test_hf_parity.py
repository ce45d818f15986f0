"""Converted Hugging Face checkpoints compute what transformers computes.

Tiny random models are built with `transformers` (the independent reference),
saved with `save_pretrained` (safetensors), converted with
`python -m moe_jax.convert hf`'s code path, and compared on teacher-forced
logits (max |ours - theirs| / max |theirs| < 1e-4, float32) and on greedy
decodes (our KV-cache decoding vs `generate`).

Covered: Switch Transformers top-1 with a capacity that drops nothing and one
that drops tokens (checked on the transformers side), T5 v1.1 / Flan-T5
(gated GELU, untied head), T5 v1.1 as transformers 5 saves it (tied head, no
logit scaling) and T5 v1.0 (ReLU, tied, scaled logits).
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the `hf` extra (torch)")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need the `hf` extra (transformers)")
safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="parity tests need the `hf` extra (safetensors)")

import gin  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from moe_jax import checkpoints  # pylint: disable=g-import-not-at-top
from moe_jax import config  # pylint: disable=g-import-not-at-top
from moe_jax.convert import hf  # pylint: disable=g-import-not-at-top
from moe_jax.models import decoding  # pylint: disable=g-import-not-at-top

VOCAB = 64
ENC_LEN, DEC_LEN = 12, 8
COMMON = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2,
              num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)


def _switch(expert_capacity):
  config = transformers.SwitchTransformersConfig(
      num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
      expert_capacity=expert_capacity, router_jitter_noise=0.0, **COMMON)
  return transformers.SwitchTransformersForConditionalGeneration(config)


def _t5(feed_forward_proj, **kwargs):
  config = transformers.T5Config(feed_forward_proj=feed_forward_proj, **COMMON, **kwargs)
  return transformers.T5ForConditionalGeneration(config)


def _untie_head(model_dir):
  """Rewrites a saved T5 as Flan-T5 files look: own lm_head, tie_word_embeddings false."""
  path = os.path.join(model_dir, hf.SAFETENSORS_FILE)
  tensors = safetensors_numpy.load_file(path)
  tensors["lm_head.weight"] = np.random.RandomState(1).normal(
      size=tensors["shared.weight"].shape).astype(np.float32)
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
  config_path = os.path.join(model_dir, hf.CONFIG_FILE)
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config["tie_word_embeddings"] = False
  for key in ("scale_decoder_outputs", "is_gated_act", "dense_act_fn"):
    config.pop(key, None)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f)


def _inputs():
  rng = np.random.RandomState(0)
  encoder = rng.randint(2, VOCAB, size=(3, ENC_LEN))
  encoder[1, 9:] = 0  # a padded row
  encoder[2, 5:] = 0
  targets = rng.randint(2, VOCAB, size=(3, DEC_LEN))
  decoder = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return encoder, decoder, targets


def _build(tmp_path, build_fn, *, untie=False, bindings=()):
  """Saves a random transformers model, converts it, loads both sides."""
  torch.manual_seed(0)
  reference = build_fn()
  hf_dir, out_dir = str(tmp_path / "hf"), str(tmp_path / "converted")
  reference.save_pretrained(hf_dir)
  if untie:
    _untie_head(hf_dir)
  # The reference is what transformers loads back from the files we convert.
  reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
  result = hf.convert(hf_dir, out_dir)
  # The model's MoE layer factories read gin bindings whenever the model runs,
  # so the config stays parsed until the next test clears it.
  gin.clear_config()
  model = config.load_model([result.gin_file], list(bindings))
  params = checkpoints.restore_params(out_dir)
  return reference, model, params, result


def _relative_logit_error(reference, model, params):
  encoder, decoder, targets = _inputs()
  with torch.no_grad():
    theirs = reference(
        input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
        decoder_input_ids=torch.tensor(decoder)).logits.numpy()
  ours = np.asarray(jax.jit(model.compute_logits)(params, {
      "encoder_input_tokens": jnp.asarray(encoder),
      "decoder_input_tokens": jnp.asarray(decoder),
      "decoder_target_tokens": jnp.asarray(targets)}))
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _until_eos(row, eos_id=1):
  row = [int(t) for t in row]
  return row[:row.index(eos_id) + 1] if eos_id in row else row


def _assert_same_greedy_decodes(reference, model, params):
  encoder, _, _ = _inputs()
  with torch.no_grad():
    theirs = reference.generate(
        input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
        do_sample=False, num_beams=1, max_new_tokens=DEC_LEN).numpy()[:, 1:]
  model.decode_fn = decoding.greedy
  ours = np.asarray(model.predict_batch(params, {
      "encoder_input_tokens": jnp.asarray(encoder),
      "decoder_input_tokens": jnp.zeros((len(encoder), DEC_LEN), jnp.int32)}))
  for row_ours, row_theirs in zip(ours, theirs):
    assert _until_eos(row_ours) == _until_eos(row_theirs)


def _hf_dropped_tokens(reference):
  """Tokens transformers' Switch routers left unprocessed in one forward pass."""
  dropped = []

  def hook(module, args, output):
    del module, args
    dispatch = output[0]  # one-hot expert choice, zeroed beyond capacity
    dropped.append(int((dispatch.sum(-1) == 0).sum()))

  router_cls = transformers.models.switch_transformers.modeling_switch_transformers \
      .SwitchTransformersTop1Router
  handles = [m.register_forward_hook(hook) for m in reference.modules()
             if isinstance(m, router_cls)]
  encoder, decoder, _ = _inputs()
  with torch.no_grad():
    reference(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
              decoder_input_ids=torch.tensor(decoder))
  for handle in handles:
    handle.remove()
  return sum(dropped)


def test_switch_without_token_dropping(tmp_path):
  reference, model, params, result = _build(tmp_path, lambda: _switch(expert_capacity=64))
  assert result.architecture.encoder_sparse_layers == (1,)
  assert result.architecture.decoder_sparse_layers == (1,)
  assert _hf_dropped_tokens(reference) == 0
  assert _relative_logit_error(reference, model, params) < 1e-4
  _assert_same_greedy_decodes(reference, model, params)


@pytest.mark.parametrize("num_sparse, step, expected", [
    (3, 2, (1,)),        # explicit step wins over the count: only layer 1
    (1, 1, (0, 1, 2)),   # step 1: every layer sparse
    (3, 0, ()),          # step 0: no sparse layer at all
])
def test_switch_sparse_step_as_transformers_builds_it(tmp_path, num_sparse, step, expected):
  def build():
    config = transformers.SwitchTransformersConfig(
        num_experts=4, num_sparse_encoder_layers=num_sparse,
        num_sparse_decoder_layers=num_sparse, expert_capacity=64, router_jitter_noise=0.0,
        **dict(COMMON, num_layers=3, num_decoder_layers=3))
    # transformers 5 saves the steps to config.json and builds from them.
    config.encoder_sparse_step = config.decoder_sparse_step = step
    return transformers.SwitchTransformersForConditionalGeneration(config)

  reference, model, params, result = _build(tmp_path, build)
  for stack in ("encoder", "decoder"):
    blocks = getattr(reference, stack).block
    assert tuple(i for i, block in enumerate(blocks) if block.is_sparse) == expected
    assert getattr(result.architecture, f"{stack}_sparse_layers") == expected
  assert _relative_logit_error(reference, model, params) < 1e-4
  _assert_same_greedy_decodes(reference, model, params)


def test_switch_with_token_dropping(tmp_path):
  reference, model, params, _ = _build(tmp_path, lambda: _switch(expert_capacity=2))
  assert _hf_dropped_tokens(reference) > 0
  assert _relative_logit_error(reference, model, params) < 1e-4
  _assert_same_greedy_decodes(reference, model, params)


def test_switch_capacity_changes_the_logits(tmp_path):
  """Control for the test above: ignoring HF's capacity breaks parity."""
  reference, model, params, _ = _build(
      tmp_path, lambda: _switch(expert_capacity=2), bindings=["EXPERT_CAPACITY = 64"])
  assert _relative_logit_error(reference, model, params) > 1e-3


def test_flan_t5_style_untied_gated_gelu(tmp_path):
  reference, model, params, result = _build(
      tmp_path, lambda: _t5("gated-gelu"), untie=True)
  assert result.architecture.mlp_activations == ("gelu", "linear")
  assert not result.architecture.logits_via_embedding
  assert _relative_logit_error(reference, model, params) < 1e-4
  _assert_same_greedy_decodes(reference, model, params)


def test_t5_v1_1_as_saved_by_transformers_5(tmp_path):
  # transformers 5 ties the head and records `scale_decoder_outputs: false`.
  reference, model, params, result = _build(
      tmp_path, lambda: _t5("gated-gelu", tie_word_embeddings=False))
  assert not result.architecture.logits_via_embedding
  assert _relative_logit_error(reference, model, params) < 1e-4


def test_t5_v1_0_relu_tied_scaled(tmp_path):
  reference, model, params, result = _build(tmp_path, lambda: _t5("relu"))
  assert result.architecture.logits_via_embedding
  assert result.architecture.mlp_activations == ("relu",)
  assert _relative_logit_error(reference, model, params) < 1e-4
  _assert_same_greedy_decodes(reference, model, params)
