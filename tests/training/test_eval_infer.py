"""`python -m moe_jax.eval` and `python -m moe_jax.infer` on a toy checkpoint."""

import json
import os

import pytest

from tests.training import conftest

MODEL = """include 'gin/models/tiny_moe.gin'
include 'gin/runs/{run}.gin'
from __gin__ import dynamic_registration
from tests.training import toy_tasks
NUM_EMBEDDINGS = 260
ACTIVATION_DTYPE = 'float32'
VOCABULARY = @toy_tasks.vocabulary()
MIXTURE_OR_TASK_MODULE = 'tests.training.toy_tasks'
TASK_FEATURE_LENGTHS = {{'inputs': 32, 'targets': 16}}
BATCH_SIZE = 8
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("toy")
  conftest.train_toy(root / "run", TRAIN_STEPS=2)
  for name in ("eval", "infer"):
    (root / f"{name}.gin").write_text(MODEL.format(run=name))
  return root


def test_eval_writes_results_per_task(run):
  result = conftest.run_command(
      "moe_jax.eval", f"--gin_file={run / 'eval.gin'}",
      f"--gin.CHECKPOINT_PATH='{run / 'run'}'", "--gin.MIXTURE_OR_TASK_NAME='toy_copy'")
  assert result.returncode == 0, result.stderr
  with open(run / "run" / "eval_results.json", encoding="utf-8") as f:
    latest = json.load(f)["latest"]
  assert latest["step"] == 2
  assert 0.0 <= latest["tasks"]["toy_copy"]["exact_match"] <= 100.0
  assert "toy_copy" in result.stdout and "Wrote" in result.stdout


def test_infer_decodes_a_jsonl_file_and_a_task(run):
  questions = run / "questions.jsonl"
  questions.write_text('{"inputs": "copy: alpha beta", "id": 7}\n\n'
                       '{"inputs": "copy: omega"}\n')
  common = [f"--gin_file={run / 'infer.gin'}", f"--gin.CHECKPOINT_PATH='{run / 'run'}'",
            f"--gin.INFER_OUTPUT_DIR='{run / 'out'}'"]
  result = conftest.run_command("moe_jax.infer", *common, f"--gin.INPUT_FILE='{questions}'")
  assert result.returncode == 0, result.stderr
  rows = [json.loads(l) for l in (run / "out" / "questions.predictions.jsonl").read_text()
          .splitlines()]
  assert [r.get("id") for r in rows] == [7, None]
  assert all(isinstance(r["prediction"], str) for r in rows)

  result = conftest.run_command("moe_jax.infer", *common,
                                "--gin.MIXTURE_OR_TASK_NAME='toy_copy'")
  assert result.returncode == 0, result.stderr
  rows = (run / "out" / "toy_copy-validation.jsonl").read_text().splitlines()
  assert len(rows) == 16
  assert json.loads(rows[0])["targets"] == "alpha alpha alpha"


def test_infer_refuses_both_or_neither_input(run):
  result = conftest.run_command(
      "moe_jax.infer", f"--gin_file={run / 'infer.gin'}",
      f"--gin.CHECKPOINT_PATH='{run / 'run'}'", f"--gin.INFER_OUTPUT_DIR='{run / 'o'}'")
  assert result.returncode == 2
  assert "Give either a task or mixture" in result.stderr
  assert not os.path.exists(run / "o")
