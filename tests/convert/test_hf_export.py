"""`python -m moe_jax.convert to_hf`: exports that transformers loads and computes alike.

Parity: the exported directory is loaded with `from_pretrained` (the
independent reference) and its teacher-forced logits are compared with ours
(float32, max |ours - theirs| / max |theirs| <= 1e-5). Round trip: a
transformers checkpoint imported with `convert hf` and exported again gives
the identical tensors. Refusals: routing transformers cannot express is
named, and `--approximate` states each change on its own line.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export tests need the `hf` extra (torch)")
transformers = pytest.importorskip(
    "transformers", reason="export tests need the `hf` extra (transformers)")
safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="export tests need the `hf` extra (safetensors)")

import gin  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from moe_jax import checkpoints  # pylint: disable=g-import-not-at-top
from moe_jax import config  # pylint: disable=g-import-not-at-top
from moe_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
from moe_jax.convert import hf  # pylint: disable=g-import-not-at-top

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2,
              num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
TOLERANCE = 1e-5

# Tiny moe_jax models (gin/models/tiny_moe.gin: 2+2 layers, layer 1 of each
# stack sparse, 4 experts), float32.
TINY = """
from __gin__ import dynamic_registration
from moe_jax.layers import moe
from moe_jax.layers import routing
include 'gin/models/tiny_moe.gin'
NUM_EMBEDDINGS = 64
ACTIVATION_DTYPE = 'float32'
"""
# Plain (not gated) FFNs, as SwitchTransformers has; still top-2, routing
# groups of up to 64 tokens, capacity factor 2.0 at evaluation.
RELU = TINY + "MLP_ACTIVATIONS = ('relu',)\n"
# What SwitchTransformers computes: top-1, one routing group per sequence, a
# fixed per-expert capacity (3 of 12 tokens: some are dropped).
PER_SEQUENCE = "moe.MoeLayer.group_by_sequence = True\nmoe.MoeLayer.expert_capacity = 3\n"
SWITCH = RELU + "NUM_SELECTED_EXPERTS = 1\n" + PER_SEQUENCE


def _inputs():
  rng = np.random.RandomState(0)
  encoder = rng.randint(2, VOCAB, size=(3, 12))
  encoder[1, 9:] = 0
  encoder[2, 5:] = 0
  targets = rng.randint(2, VOCAB, size=(3, 8))
  decoder = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return encoder, decoder, targets


def _hf_logits(model_dir):
  reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
  encoder, decoder, _ = _inputs()
  with torch.no_grad():
    return reference(
        input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder != 0),
        decoder_input_ids=torch.tensor(decoder)).logits.numpy()


def _our_logits(gin_files, params, bindings=()):
  gin.clear_config()
  model = config.load_model(gin_files, list(bindings))
  encoder, decoder, targets = _inputs()
  return np.asarray(jax.jit(model.compute_logits)(params, {
      "encoder_input_tokens": jnp.asarray(encoder),
      "decoder_input_tokens": jnp.asarray(decoder),
      "decoder_target_tokens": jnp.asarray(targets)}))


def _relative_error(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _gin(tmp_path, text, name="model.gin"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _random_checkpoint(tmp_path, gin_file, bindings=(), seed=0):
  gin.clear_config()
  model = config.load_model([gin_file], list(bindings))
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(
      jax.random.PRNGKey(seed))["params"]
  path = str(tmp_path / f"params_{seed}")
  checkpoints.save_params(params, path)
  return path, params


# ---------------------------------------------------------------------------
# Round trips: transformers -> moe_jax -> transformers.
# ---------------------------------------------------------------------------


def _switch(expert_capacity):
  return transformers.SwitchTransformersForConditionalGeneration(
      transformers.SwitchTransformersConfig(
          num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
          expert_capacity=expert_capacity, router_jitter_noise=0.0, **COMMON))


def _t5(feed_forward_proj, **kwargs):
  return transformers.T5ForConditionalGeneration(
      transformers.T5Config(feed_forward_proj=feed_forward_proj, **COMMON, **kwargs))


def _untie_head(model_dir):
  """Rewrites a saved T5 as Flan-T5 files look: own lm_head, tie_word_embeddings false."""
  path = os.path.join(model_dir, hf.SAFETENSORS_FILE)
  tensors = safetensors_numpy.load_file(path)
  tensors["lm_head.weight"] = np.random.RandomState(1).normal(
      size=tensors["shared.weight"].shape).astype(np.float32)
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
  config_path = os.path.join(model_dir, hf.CONFIG_FILE)
  with open(config_path, encoding="utf-8") as f:
    hf_config = json.load(f)
  hf_config["tie_word_embeddings"] = False
  for key in ("scale_decoder_outputs", "is_gated_act", "dense_act_fn"):
    hf_config.pop(key, None)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(hf_config, f)


def _round_trip(tmp_path, build_fn, untie=False):
  torch.manual_seed(0)
  source = str(tmp_path / "hf")
  build_fn().save_pretrained(source)
  if untie:
    _untie_head(source)
  imported = hf.convert(source, str(tmp_path / "imported"))
  gin.clear_config()
  exported = str(tmp_path / "exported")
  result = hf.export([imported.gin_file], imported.checkpoint_dir, exported)
  return source, exported, imported, result


def _assert_identical_tensors(source, exported):
  theirs = safetensors_numpy.load_file(os.path.join(source, hf.SAFETENSORS_FILE))
  ours = safetensors_numpy.load_file(os.path.join(exported, hf.SAFETENSORS_FILE))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
    assert np.array_equal(ours[name], value), name


@pytest.mark.parametrize("capacity", [64, 2])
def test_switch_round_trip_and_parity(tmp_path, capacity):
  source, exported, imported, result = _round_trip(tmp_path, lambda: _switch(capacity))
  assert result.plan.approximations == ()
  _assert_identical_tensors(source, exported)
  with open(os.path.join(exported, hf.CONFIG_FILE), encoding="utf-8") as f:
    written = json.load(f)
  assert written["expert_capacity"] == capacity and written["num_experts"] == 4
  theirs = _hf_logits(exported)
  np.testing.assert_array_equal(theirs, _hf_logits(source))
  ours = _our_logits([imported.gin_file],
                     checkpoints.restore_params(imported.checkpoint_dir))
  assert _relative_error(ours, theirs) <= TOLERANCE


def test_flan_t5_round_trip_and_parity(tmp_path):
  source, exported, imported, result = _round_trip(
      tmp_path, lambda: _t5("gated-gelu"), untie=True)
  assert result.plan.architecture.model_type == "t5"
  _assert_identical_tensors(source, exported)
  ours = _our_logits([imported.gin_file],
                     checkpoints.restore_params(imported.checkpoint_dir))
  assert _relative_error(ours, _hf_logits(exported)) <= TOLERANCE


def test_t5_v1_0_tied_round_trip_and_parity(tmp_path):
  source, exported, imported, _ = _round_trip(tmp_path, lambda: _t5("relu"))
  _assert_identical_tensors(source, exported)
  with open(os.path.join(exported, hf.CONFIG_FILE), encoding="utf-8") as f:
    written = json.load(f)
  assert written["tie_word_embeddings"] and written["feed_forward_proj"] == "relu"
  ours = _our_logits([imported.gin_file],
                     checkpoints.restore_params(imported.checkpoint_dir))
  assert _relative_error(ours, _hf_logits(exported)) <= TOLERANCE


def test_t5_v1_1_as_transformers_5_saves_it(tmp_path):
  # Tied head without logit scaling: exported as an untied lm_head equal to
  # `shared`; the loaded models hold identical tensors.
  source, exported, _, _ = _round_trip(
      tmp_path, lambda: _t5("gated-gelu", tie_word_embeddings=False))
  theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(source).state_dict()
  ours = transformers.AutoModelForSeq2SeqLM.from_pretrained(exported).state_dict()
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    assert torch.equal(ours[name], value), name


def test_gated_exact_gelu_keeps_its_activation(tmp_path):
  source, exported, imported, _ = _round_trip(tmp_path, lambda: _t5("gated-gelu_python"))
  assert imported.architecture.mlp_activations == ("gelu_exact", "linear")
  ours = _our_logits([imported.gin_file],
                     checkpoints.restore_params(imported.checkpoint_dir))
  assert _relative_error(ours, _hf_logits(exported)) <= TOLERANCE
  _assert_identical_tensors(source, exported)


# ---------------------------------------------------------------------------
# moe_jax models exported as they are.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, capacity", [
    ("", 3),                                    # fixed capacity, tokens dropped
    ("MOE_DISPATCH = 'dropless'\n", hf.DROPLESS_CAPACITY),   # nothing dropped
    ("SCAN_LAYERS = True\n", 3),                # scanned parameters are unstacked
])
def test_switch_style_moe_jax_model_exports_exactly(tmp_path, extra, capacity):
  gin_file = _gin(tmp_path, SWITCH + extra)
  path, params = _random_checkpoint(tmp_path, gin_file)
  out = str(tmp_path / "hf")
  result = hf.export([gin_file], path, out)
  assert result.plan.approximations == ()
  assert result.plan.architecture.expert_capacity == capacity
  assert _relative_error(_our_logits([gin_file], params), _hf_logits(out)) <= TOLERANCE
  # And back: the transformers directory imports to the same parameters.
  reimported = hf.convert(out, str(tmp_path / "back"))
  flat = checkpoints.flatten(hf.unscan_params(params, result.plan.architecture.config))
  back = checkpoints.flatten(checkpoints.restore_params(reimported.checkpoint_dir))
  assert sorted(back) == sorted(flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(back[name], np.asarray(value), err_msg=name)


def test_dense_t5_1_1_model_exports_exactly(tmp_path):
  gin_file = _gin(tmp_path, "include 'gin/models/tiny.gin'\nNUM_EMBEDDINGS = 64\n"
                  "ACTIVATION_DTYPE = 'float32'\n")
  path, params = _random_checkpoint(tmp_path, gin_file)
  out = str(tmp_path / "hf")
  hf.export([gin_file], path, out)
  assert _relative_error(_our_logits([gin_file], params), _hf_logits(out)) <= TOLERANCE


def test_sentencepiece_vocabulary_becomes_the_tokenizer(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = ["the cat sat on the mat", "a dog ran in the park", "birds fly over trees",
            "what is two plus two", "four is the answer"] * 5
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=40,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False)
  gin_file = _gin(tmp_path, f"""
from __gin__ import dynamic_registration
import seqio
from moe_jax.models import model
include 'gin/models/tiny.gin'
NUM_EMBEDDINGS = 64
ACTIVATION_DTYPE = 'float32'
VOCABULARY = @seqio.SentencePieceVocabulary()
seqio.SentencePieceVocabulary.sentencepiece_model_file = '{tmp_path / "spm.model"}'
seqio.SentencePieceVocabulary.extra_ids = 3
model.EncoderDecoderModel.input_vocabulary = %VOCABULARY
model.EncoderDecoderModel.output_vocabulary = %VOCABULARY
""")
  path, _ = _random_checkpoint(tmp_path, gin_file)
  out = tmp_path / "hf"
  result = hf.export([gin_file], path, str(out))
  assert str(out / hf.SPIECE_FILE) in result.files
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  vocabulary = config.load_model([gin_file]).output_vocabulary
  for text in ("the cat ran in the park", "four birds"):
    assert tokenizer(text).input_ids == list(vocabulary.encode(text)) + [vocabulary.eos_id]
  assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocabulary.vocab_size - 1


# ---------------------------------------------------------------------------
# What transformers cannot express.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    # tiny_moe.gin: ST-MoE style top-2 with grouped routing and a capacity factor.
    ("", ["encoder and decoder: top-2 routing becomes top-1",
          "encoder and decoder: routing groups of up to 64 tokens with capacity factor "
          "2.0 (eval; 1.25 in training; at least 4) become one group per sequence with "
          "a fixed capacity of 32 tokens per expert"]),
    # Expert choice in the encoder, grouped top-1 with a capacity factor in the decoder.
    ("NUM_SELECTED_EXPERTS = 1\nENCODER_ROUTER = @encoder/routing.ExpertChoiceRouter()\n",
     ["encoder: expert-choice routing (each expert takes its best tokens) becomes "
      "token-choice top-1",
      "encoder and decoder: routing groups of up to 64 tokens with capacity factor 2.0"]),
    ("ENCODER_ROUTER = @encoder/routing.GShardTop2Router()\n"
     "DECODER_ROUTER = @decoder/routing.GShardTop2Router()\n" + PER_SEQUENCE,
     ["encoder and decoder: GShard top-2 routing (two experts per token, renormalized "
      "gates) becomes top-1"]),
    ("NUM_SELECTED_EXPERTS = 1\nENCODER_BATCH_PRIORITIZED_ROUTING = True\n" + PER_SEQUENCE,
     ["encoder: batch-prioritized routing (the most confident tokens take capacity "
      "first) becomes position order"]),
])
def test_refusals_name_what_differs(tmp_path, extra, expected):
  gin_file = _gin(tmp_path, RELU + extra)
  path, _ = _random_checkpoint(tmp_path, gin_file)
  with pytest.raises(ValueError, match="cannot compute this model exactly") as refusal:
    hf.export([gin_file], path, str(tmp_path / "refused"))
  for line in expected:
    assert line in str(refusal.value)
  assert "--approximate" in str(refusal.value)
  assert not os.path.exists(tmp_path / "refused")

  out = str(tmp_path / "approximated")
  result = hf.export([gin_file], path, out, approximate=True)
  assert len(result.plan.approximations) == len(expected)
  for line in expected:
    assert any(l.startswith(line) for l in result.plan.approximations), (
        line, result.plan.approximations)
  # transformers loads and runs it (computing something else).
  assert np.all(np.isfinite(_hf_logits(out)))


def test_approximate_cli_prints_one_line_per_change(tmp_path, capsys):
  gin_file = _gin(tmp_path, RELU + "moe.MoeLayer.expert_capacity = 3\n")
  path, _ = _random_checkpoint(tmp_path, gin_file)
  out = str(tmp_path / "hf")
  argv = ["to_hf", "--gin_file", gin_file, "--checkpoint", path, "--output_dir", out]
  assert convert_cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("python -m moe_jax.convert: transformers'")
  assert convert_cli.main(argv + ["--approximate", "--expert_capacity", "5"]) == 0
  printed = capsys.readouterr().out.splitlines()
  changes = [l.strip() for l in printed if l.startswith("  ")]
  assert changes == [
      "encoder and decoder: top-2 routing becomes top-1 (the most probable expert only, "
      "gated by its probability)",
      "encoder and decoder: routing groups of up to 64 tokens with a fixed capacity of 3 "
      "become one group per sequence with a fixed capacity of 5 tokens per expert "
      "(--expert_capacity)"]
  with open(os.path.join(out, hf.CONFIG_FILE), encoding="utf-8") as f:
    assert json.load(f)["expert_capacity"] == 5


@pytest.mark.parametrize("text, message", [
    # ST-MoE's extra dense FFN and gated experts have no place in SwitchTransformers.
    (TINY + "EXTRA_MLP = True\n", "extra dense FFN after each sparse FFN"),
    (TINY, "SwitchTransformers FFNs and experts are wi -> ACT -> wo"),
    (SWITCH + "EXPERT_MLP_DIM = 48\n", "encoder experts are 48 wide, the dense FFN 64"),
    (SWITCH + "ENCODER_SPARSE_LAYOUT = 'bottom'\n",
     "encoder sparse layers [0]: transformers makes layer i sparse iff"),
])
def test_blockers_are_refused_even_when_approximating(tmp_path, text, message):
  gin_file = _gin(tmp_path, text)
  path, _ = _random_checkpoint(tmp_path, gin_file)
  with pytest.raises(ValueError, match="transformers cannot represent this model") as error:
    hf.export([gin_file], path, str(tmp_path / "out"), approximate=True)
  assert message in str(error.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
  gin_file = _gin(tmp_path, SWITCH)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert convert_cli.main(["to_hf", "--gin_file", gin_file, "--checkpoint", str(empty),
                           "--output_dir", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert "holds no parameters: expected a training MODEL_DIR" in err[0]
  assert "t5x checkpoint directory" in err[0]

  path, _ = _random_checkpoint(tmp_path, gin_file)
  wrong = _gin(tmp_path, SWITCH + "EMBED_DIM = 16\n", name="wrong.gin")
  assert convert_cli.main(["to_hf", "--gin_file", wrong, "--checkpoint", path,
                           "--output_dir", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "The parameters do not fit the model" in err[0]
  assert len(err) == 2 and "rerun with --debug" in err[1]
