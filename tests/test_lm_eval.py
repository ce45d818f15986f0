"""moe_jax.lm_eval: the harness adapter on a tiny byte-level MoE model, offline.

Requests are the harness's own `Instance`s; expected values come from the
model's `score_batch` / `compute_logits` on tokens built here, independently
of the adapter. The eval capacity factor is raised so that no token is ever
dropped: scores do not depend on how requests are batched.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("lm_eval")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from lm_eval.api import registry
from lm_eval.api.instance import Instance
import seqio

from moe_jax import checkpoints
from moe_jax import config
from moe_jax import lm_eval as moe_lm_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 1
BYTE_VOCAB_GIN = """from __gin__ import dynamic_registration
import seqio
from moe_jax.models import model
NUM_EMBEDDINGS = 260
ACTIVATION_DTYPE = 'float32'
EVAL_EXPERT_CAPACITY_FACTOR = 4.0
VOCABULARY = @seqio.ByteVocabulary()
model.EncoderDecoderModel:
  input_vocabulary = %VOCABULARY
  output_vocabulary = %VOCABULARY
"""
# The harness's defaults when --batch_size is not given: model_args must win.
HARNESS_CONFIG = {"batch_size": 1, "max_batch_size": None, "device": None}
VOCAB = seqio.ByteVocabulary()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  gin_file = root / "byte_vocab.gin"
  gin_file.write_text(BYTE_VOCAB_GIN)
  files = ["gin/models/tiny_moe.gin", str(gin_file)]
  model = config.load_model(files)
  params = model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 8),
                              "decoder_input_tokens": (1, 8)})["params"]
  checkpoints.save_params(params, str(root / "ckpt"))
  return types.SimpleNamespace(root=root, model=model, params=params, gin_files=files,
                               checkpoint=str(root / "ckpt"))


def model_args(tiny, **extra):
  args = {"gin_file": "+".join(tiny.gin_files), "checkpoint": tiny.checkpoint,
          "batch_size": 3, "max_length": 64, "max_decoder_length": 16, "max_gen_toks": 8,
          "mesh_shape": "data=1", **extra}
  return ",".join(f"{k}={v}" for k, v in args.items())


@pytest.fixture(scope="module")
def lm(tiny):
  return moe_lm_eval.MoeJaxLM.create_from_arg_string(model_args(tiny), HARNESS_CONFIG)


# -----------------------------------------------------------------------------
# Independent references.
# -----------------------------------------------------------------------------


def encoder_ids(context):
  return list(VOCAB.encode(context)) + [EOS]


def score_batch_reference(tiny, pairs):
  """`(log-likelihood, is_greedy)` per (encoder ids, target ids), one padded batch."""
  enc_len = max(len(e) for e, _ in pairs)
  dec_len = max(len(d) for _, d in pairs)
  batch = {name: np.zeros((len(pairs), length), np.int32) for name, length in (
      ("encoder_input_tokens", enc_len), ("decoder_input_tokens", dec_len),
      ("decoder_target_tokens", dec_len), ("decoder_loss_weights", dec_len))}
  for row, (enc, dec) in enumerate(pairs):
    batch["encoder_input_tokens"][row, :len(enc)] = enc
    batch["decoder_target_tokens"][row, :len(dec)] = dec
    batch["decoder_input_tokens"][row, 1:len(dec)] = dec[:-1]
    batch["decoder_loss_weights"][row, :len(dec)] = 1
  scores = np.asarray(jax.jit(tiny.model.score_batch)(tiny.params, batch))
  argmax = np.asarray(jnp.argmax(jax.jit(tiny.model.compute_logits)(tiny.params, batch), -1))
  greedy = [bool(np.all(argmax[row, :len(dec)] == dec)) for row, (_, dec) in enumerate(pairs)]
  return scores, greedy


def greedy_reference(tiny, context, steps):
  """Greedy continuation ids (EOS excluded) by repeated full forward passes."""
  enc = np.asarray([encoder_ids(context)], np.int32)
  decoder_inputs = np.zeros((1, steps), np.int32)
  logits_fn = jax.jit(tiny.model.compute_logits)
  out = []
  for step in range(steps):
    # Targets only shape the padding masks: mark every position real.
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": decoder_inputs,
             "decoder_target_tokens": np.full((1, steps), 3, np.int32)}
    token = int(np.argmax(logits_fn(tiny.params, batch)[0, step]))
    if token == EOS:
      break
    out.append(token)
    if step + 1 < steps:
      decoder_inputs[0, step + 1] = token
  return out


def requests(kind, args_list):
  return [Instance(request_type=kind, doc={}, arguments=args, idx=i,
                   metadata=("moe_jax_test", i, 1)) for i, args in enumerate(args_list)]


# -----------------------------------------------------------------------------
# Tests.
# -----------------------------------------------------------------------------


def test_registered_and_built_from_model_args(lm):
  assert registry.get_model("moe_jax") is moe_lm_eval.MoeJaxLM
  assert lm.batch_size == 3  # model_args win over the harness's default of 1
  assert (lm.max_length, lm.max_decoder_length, lm.max_gen_toks) == (64, 16, 8)
  assert lm.mesh.devices.size == 1
  assert lm.tok_encode("a") == [ord("a") + 3]


LOGLIKELIHOOD = [
    ("Question: what is 2+2?\nAnswer:", " 4"),
    ("", "hello"),
    ("abc", " def"),
    ("a", " a longer answer"),  # 16 bytes: max_decoder_length
    ("a much longer context, longer than sixteen bytes for sure", " yes"),
    ("x", " y"),
    ("Question: 2+2=", " four"),
]


def test_loglikelihood_matches_score_batch_in_request_order(tiny, lm):
  results = lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)
  pairs = [(encoder_ids(c), list(VOCAB.encode(x))) for c, x in LOGLIKELIHOOD]
  scores, greedy = score_batch_reference(tiny, pairs)
  assert len(results) == len(LOGLIKELIHOOD)
  np.testing.assert_allclose([r[0] for r in results], scores, rtol=1e-5, atol=1e-4)
  assert [r[1] for r in results] == greedy
  assert all(isinstance(r[0], float) and isinstance(r[1], bool) for r in results)


def test_context_trailing_space_moves_to_the_continuation(lm):
  a, b = lm.loglikelihood(requests("loglikelihood", [("abc ", "def"), ("abc", " def")]),
                          disable_tqdm=True)
  assert a == pytest.approx(b, abs=1e-5)
  assert lm.encode_pair("", "hi") == ([EOS], list(VOCAB.encode("hi")))


def test_is_greedy_for_the_argmax_continuation(tiny, lm):
  context = "Q: name a colour.\nA:"
  greedy_ids = greedy_reference(tiny, context, 4)
  assert len(greedy_ids) >= 2, "the tiny model should not emit EOS this early"
  other = greedy_ids[:-1] + [greedy_ids[-1] % 250 + 4]
  pairs = [(encoder_ids(context), greedy_ids), (encoder_ids(context), other)]
  results = lm.score_tokens(pairs)
  scores, _ = score_batch_reference(tiny, pairs)
  assert [r[1] for r in results] == [True, False]
  np.testing.assert_allclose([r[0] for r in results], scores, rtol=1e-5, atol=1e-4)


def test_loglikelihood_rolling_scores_decoder_windows(tiny, lm):
  long_text = "The quick brown fox jumps over the lazy dog"  # 43 bytes + EOS
  texts = [long_text, "short", ""]
  results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]),
                                     disable_tqdm=True)
  tokens = list(VOCAB.encode(long_text)) + [EOS]
  assert len(tokens) == 44
  # Windows of 16 targets. The encoder sees the harness's rolling context: EOS,
  # then the token before a full window; the last, partial window gets enough
  # earlier tokens to fill 16 + 1 with its targets.
  windows = [([EOS], tokens[0:16]), ([tokens[15]], tokens[16:32]), (tokens[27:32], tokens[32:44]),
             ([EOS], list(VOCAB.encode("short")) + [EOS]),
             ([EOS], [EOS])]
  scores, _ = score_batch_reference(tiny, windows)
  expected = [scores[0] + scores[1] + scores[2], scores[3], scores[4]]
  np.testing.assert_allclose(results, expected, rtol=1e-5, atol=1e-4)
  assert lm.rolling_windows(long_text) == windows[:3]


def test_generate_until_stops_at_until_and_max_gen_toks(tiny, lm):
  contexts = ["copy: alpha beta", "Q: 1+1=\nA:", "hello world, this is a longer prompt"]
  greedy = {c: greedy_reference(tiny, c, 8) for c in contexts}
  text = {c: VOCAB.decode(ids) for c, ids in greedy.items()}
  first = contexts[0]
  assert len(text[first]) >= 2, f"need a decoded text to cut, got {text[first]!r}"
  stop = text[first][1]
  cut = text[first][:text[first].index(stop)]
  assert cut != text[first]
  args = [
      (first, {"until": [stop], "max_gen_toks": 8}),
      (contexts[1], {"until": [], "max_gen_toks": 8}),
      (contexts[2], {"until": "\n\n\n", "max_gen_toks": 3, "do_sample": False}),
      (first, {"until": [], "max_gen_toks": 8}),
      (contexts[1], {"until": "\n\n\n", "max_gen_toks": 3, "do_sample": False}),
      (contexts[2], {"max_new_tokens": 8, "until": []}),
  ]
  results = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
  assert results == [
      cut,
      text[contexts[1]],
      VOCAB.decode(greedy[contexts[2]][:3]),
      text[first],
      VOCAB.decode(greedy[contexts[1]][:3]),
      text[contexts[2]],
  ]
  # At most max_gen_toks tokens (bytes, for this vocabulary).
  assert len(results[2].encode("utf-8")) <= 3


def test_sharded_batch_matches(tiny):
  lm2 = moe_lm_eval.MoeJaxLM.create_from_arg_string(
      model_args(tiny, mesh_shape="data=2"), HARNESS_CONFIG)
  assert lm2.batch_size == 4  # 3 rounded up to the 2 batch shards
  chosen = LOGLIKELIHOOD[:5]
  results = lm2.loglikelihood(requests("loglikelihood", chosen), disable_tqdm=True)
  scores, _ = score_batch_reference(
      tiny, [(encoder_ids(c), list(VOCAB.encode(x))) for c, x in chosen])
  np.testing.assert_allclose([r[0] for r in results], scores, rtol=1e-5, atol=1e-4)


def test_model_args_parsing_and_errors(tiny, lm):
  assert moe_lm_eval.gin_files_arg("a.gin+b.gin") == ["a.gin", "b.gin"]
  assert moe_lm_eval.gin_files_arg(["a.gin", "b.gin"]) == ["a.gin", "b.gin"]
  assert moe_lm_eval.gin_files_arg(tiny.gin_files[1]) == [tiny.gin_files[1]]
  assert moe_lm_eval.split_arg("A = 1; B = 'x'", ";") == ["A = 1", "B = 'x'"]
  assert moe_lm_eval.mesh_shape_arg("data=2;expert=4") == {"data": 2, "expert": 4}
  assert moe_lm_eval.length_bucket(5, 64) == 16
  assert moe_lm_eval.length_bucket(17, 64) == 32
  assert moe_lm_eval.length_bucket(40, 48) == 48

  settings = moe_lm_eval.generation_settings(
      {"until": "\n", "max_new_tokens": 5, "num_beams": 2}, 256)
  assert settings == moe_lm_eval.GenerationSettings(until=("\n",), max_gen_toks=5)
  sampled = moe_lm_eval.generation_settings({"do_sample": True, "top_k": 40}, 7)
  assert (sampled.sample, sampled.temperature, sampled.top_k, sampled.max_gen_toks) == (
      True, 1.0, 40, 7)
  assert not moe_lm_eval.generation_settings({"temperature": 0.0}, 7).sample

  no_vocabulary = (f"gin_file=gin/models/tiny_moe.gin,checkpoint={tiny.checkpoint},"
                   "gin_bindings=NUM_EMBEDDINGS=260;ACTIVATION_DTYPE='float32'")
  with pytest.raises(ValueError, match="no vocabulary"):
    moe_lm_eval.MoeJaxLM.create_from_arg_string(no_vocabulary + ",mesh_shape=data=1")
  with_byte = moe_lm_eval.MoeJaxLM.create_from_arg_string(
      no_vocabulary + ",vocabulary=byte,mesh_shape=data=1")
  assert with_byte.tok_encode("a") == [ord("a") + 3]
  with pytest.raises(ValueError, match="unknown model_args"):
    moe_lm_eval.MoeJaxLM.create_from_arg_string(model_args(tiny, pretrained="t5"))
  with pytest.raises(ValueError, match="exceeds max_decoder_length=16"):
    lm.loglikelihood(requests("loglikelihood", [("a", " seventeen bytes!")]))
  with pytest.raises(ValueError, match="checkpoint"):
    moe_lm_eval.MoeJaxLM(gin_file=tiny.gin_files)


TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: {output_type}
test_split: test
doc_to_text: {text}
doc_to_target: {target}
{extra}
metric_list:
{metrics}
metadata:
  version: 1.0
"""


def test_lm_eval_command_line_end_to_end(tiny, tmp_path):
  data = tmp_path / "toy.jsonl"
  with open(data, "w", encoding="utf-8") as f:
    for q, a in (("2+2=", "4"), ("3+3=", "6"), ("1+0=", "1")):
      f.write(json.dumps({"question": q, "answer": a, "choices": ["4", "6", "1"],
                          "label": ["4", "6", "1"].index(a),
                          "text": f"The answer to {q} is {a}."}) + "\n")
  tasks = {
      "moe_jax_toy_mc": dict(output_type="multiple_choice", text='"Q: {{question}}\\nA:"',
                             target="label", extra="doc_to_choice: choices",
                             metrics="  - metric: acc"),
      "moe_jax_toy_gen": dict(output_type="generate_until", text='"Q: {{question}}\\nA:"',
                              target="answer",
                              extra='generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4',
                              metrics="  - metric: exact_match"),
      "moe_jax_toy_ppl": dict(output_type="loglikelihood_rolling", text='""',
                              target='"{{text}}"', extra="",
                              metrics="  - metric: word_perplexity\n  - metric: bits_per_byte"),
  }
  for name, fields in tasks.items():
    (tmp_path / f"{name}.yaml").write_text(TASK.format(name=name, data=data, **fields))
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             HF_HOME=str(tmp_path / "hf"), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "moe_jax.lm_eval", "--model", "moe_jax",
       "--model_args", model_args(tiny, batch_size=4), "--tasks", ",".join(tasks),
       "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  [path] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs
            if f.startswith("results") and f.endswith(".json")]
  with open(path, encoding="utf-8") as f:
    results = json.load(f)["results"]
  assert 0.0 <= results["moe_jax_toy_mc"]["acc,none"] <= 1.0
  assert 0.0 <= results["moe_jax_toy_gen"]["exact_match,none"] <= 1.0
  assert results["moe_jax_toy_ppl"]["bits_per_byte,none"] > 0.0
