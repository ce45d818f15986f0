"""`python -m moe_jax.score`: log-likelihoods from a checkpoint, and its errors."""

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from moe_jax import checkpoints
from moe_jax import config
from moe_jax import score
from moe_jax.convert import hf
from moe_jax.models import transformer

ARCH = hf.HfArchitecture(
    model_type="t5", scale_logits=False, config=transformer.TransformerConfig(
        vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
        num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"),
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        logits_via_embedding=False, dropout_rate=0.0))

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "birds fly over trees",
          "what is two plus two", "four is the answer", "rain falls on the roof"] * 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random tiny model: model.gin (with a SentencePiece vocabulary) + orbax params."""
  root = tmp_path_factory.mktemp("score")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(root / "spiece"), vocab_size=40,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False)
  gin_file = root / "model.gin"
  gin_file.write_text(hf.model_gin(ARCH, source="test", eos_id=1,
                                   vocabulary_file=str(root / "spiece.model")))
  gin.clear_config()
  model = config.load_model([str(gin_file)])
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(
      jax.random.PRNGKey(0))["params"]
  checkpoints.save_params(params, str(root / "checkpoint"))
  return root, model, params


def _write_lines(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")


def _unbatched_log_likelihood(model, params, inputs, targets):
  """One example, no padding: sum_t log p(target_t | inputs, targets_<t)."""
  batch = {"encoder_input_tokens": jnp.asarray([inputs]),
           "decoder_input_tokens": jnp.asarray([[0] + targets[:-1]]),
           "decoder_target_tokens": jnp.asarray([targets])}
  log_probs = jax.nn.log_softmax(np.asarray(jax.jit(model.compute_logits)(params, batch))[0])
  return float(sum(log_probs[i, t] for i, t in enumerate(targets)))


def test_token_ids_score_like_unbatched_forward_passes(checkpoint, tmp_path):
  root, model, params = checkpoint
  examples = [{"inputs_ids": [5, 6, 7, 1], "targets_ids": [9, 1], "id": 0},
              {"inputs_ids": [3] * 11 + [1], "targets_ids": [4, 5, 6, 7, 8, 9, 10, 1]},
              {"inputs_ids": [12, 1], "targets_ids": [13, 14, 1]}]
  _write_lines(tmp_path / "in.jsonl", examples)
  # batch_size 2: a full and a half-full (padded) batch.
  assert score.main(["--gin_file", str(root / "model.gin"), "--checkpoint", str(root),
                     "--input_file", str(tmp_path / "in.jsonl"),
                     "--output_file", str(tmp_path / "out.jsonl"), "--batch_size", "2"]) == 0
  rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r.get("id") for r in rows] == [0, None, None]
  for example, row in zip(examples, rows):
    expected = _unbatched_log_likelihood(model, params, example["inputs_ids"],
                                         example["targets_ids"])
    assert row["log_likelihood"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert row["num_target_tokens"] == len(example["targets_ids"])


def test_text_is_tokenized_with_eos(checkpoint, tmp_path):
  root, model, params = checkpoint
  vocabulary = model.input_vocabulary
  text_in, text_out = "the cat sat", "on the mat"
  ids_in = list(vocabulary.encode(text_in)) + [1]
  ids_out = list(vocabulary.encode(text_out)) + [1]
  _write_lines(tmp_path / "in.jsonl", [{"inputs": text_in, "targets": text_out},
                                       {"inputs_ids": ids_in, "targets_ids": ids_out}])
  count = score.score_file(model, params, str(tmp_path / "in.jsonl"),
                           str(tmp_path / "out.jsonl"))
  assert count == 2
  text_row, ids_row = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert text_row["log_likelihood"] == pytest.approx(ids_row["log_likelihood"], rel=1e-6)
  assert text_row["num_target_tokens"] == len(ids_out)


@pytest.mark.parametrize("lines, message", [
    (['{"inputs_ids": [3, 1], "targets_ids": [4, 1]}', "{not json"], "line 2: not valid JSON"),
    ([{"inputs_ids": [3, 1]}], "line 1: missing 'targets'"),
    ([{"inputs": "a", "inputs_ids": [3], "targets": "b"}], "line 1: give either 'inputs'"),
    ([{"inputs_ids": [3, 0], "targets_ids": [4]}], "line 1: 'inputs_ids' must be"),
    (["[1, 2]"], "line 1: expected a JSON object"),
])
def test_bad_lines_name_the_line(checkpoint, tmp_path, lines, message):
  _, model, params = checkpoint
  _write_lines(tmp_path / "in.jsonl", lines)
  with pytest.raises(score.InputError, match=message):
    score.score_file(model, params, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))
  assert not (tmp_path / "out.jsonl").exists()


def test_text_without_vocabulary_is_refused(checkpoint, tmp_path, capsys):
  root, _, _ = checkpoint
  no_vocab = tmp_path / "model.gin"
  no_vocab.write_text(hf.model_gin(ARCH, source="test", eos_id=1))
  _write_lines(tmp_path / "in.jsonl", [{"inputs": "the cat", "targets": "sat"}])
  gin.clear_config()
  assert score.main(["--gin_file", str(no_vocab), "--checkpoint", str(root),
                     "--input_file", str(tmp_path / "in.jsonl"),
                     "--output_file", str(tmp_path / "out.jsonl")]) == 2
  assert "line 1: 'inputs' is text, but the model has no vocabulary" in capsys.readouterr().err


def test_missing_files_are_named(checkpoint, tmp_path):
  root, model, params = checkpoint
  with pytest.raises(FileNotFoundError, match="Input file .*nope.jsonl"):
    score.score_file(model, params, str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl"))
  with pytest.raises(FileNotFoundError, match="Checkpoint .*missing"):
    checkpoints.restore_params(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="holds no parameters"):
    checkpoints.restore_params(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="gin file .*absent.gin"):
    config.load_model([str(tmp_path / "absent.gin")])
