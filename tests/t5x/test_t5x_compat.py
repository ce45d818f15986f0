"""t5x drives moe_jax's MoE module through gin/t5x/*.gin (needs t5x installed).

The run files are exercised end to end with the real t5x entry points, as
subprocesses exactly as a user would call them: `t5x.train` from scratch with
t5x's MoE pretrain run, `t5x.train` with gin/t5x/finetune_flan.gin from that
checkpoint, then `t5x.infer` and `t5x.eval`. A tiny in-memory seqio task and
a byte vocabulary replace the Flan mixture and its SentencePiece model, so
nothing is downloaded.

t5x is not on PyPI; without it the test is skipped (README "Running under
t5x" shows how to install it from source).
"""

import glob
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

try:
  t5x = importlib.import_module("t5x")
  importlib.import_module("t5x.contrib.moe.models")
except ImportError as e:
  pytest.skip(
      "t5x is not installed (not on PyPI); see README 'Running under t5x' "
      f"({e}).", allow_module_level=True)

import tensorflow as tf  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T5X_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(t5x.__file__)))

TOY_TASKS = '''
"""A copy task held in memory, with an exact-match metric."""
import seqio
import tensorflow as tf

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


def _dataset(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  n = 64 if split == "train" else 16
  inputs = [f"copy: {WORDS[i % 8]} {WORDS[(3 * i + 1) % 8]}" for i in range(n)]
  targets = [s[len("copy: "):] for s in inputs]
  return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})


def exact_match(targets, predictions):
  return {"exact_match": sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


VOCABULARY = seqio.ByteVocabulary()
seqio.TaskRegistry.add(
    "t5x_compat_toy",
    source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
    preprocessors=[seqio.preprocessors.tokenize,
                   seqio.preprocessors.append_eos_after_trim],
    output_features={"inputs": seqio.Feature(VOCABULARY),
                     "targets": seqio.Feature(VOCABULARY)},
    metric_fns=[exact_match])
'''

# Replaces the Flan mixture and vocabulary, shrinks everything.
TOY_OVERRIDES = """
from __gin__ import dynamic_registration
import seqio
from t5x import utils

VOCABULARY = @seqio.ByteVocabulary()
NUM_EMBEDDINGS = 384
ACTIVATION_DTYPE = 'float32'
MIXTURE_OR_TASK_NAME = 't5x_compat_toy'
MIXTURE_OR_TASK_MODULE = 't5x_compat_toy_tasks'
TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}
BATCH_SIZE = 8
USE_CACHED_TASKS = False
NUM_MODEL_PARTITIONS = 1
RANDOM_SEED = 0
EVAL_PERIOD = 5
BEAM_SIZE = 2
utils.DatasetConfig.split = 'validation'
"""


# t5x's MoE pretrain run hard-codes its evaluation period.
TOY_PRETRAIN = """
from __gin__ import dynamic_registration
import __main__ as train_script

train_script.train.eval_period = 5
"""


def _run_t5x(script, gin_files, bindings, tmp_path):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(tmp_path)] + [p for p in [env.get("PYTHONPATH")] if p])
  env.setdefault("JAX_PLATFORMS", "cpu")
  # One CPU device, as a user's run: tests/conftest.py fakes 8 for the suite,
  # and t5x's CPU mesh would put all 8 on the model axis.
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  command = [sys.executable, "-m", f"t5x.{script}",
             f"--gin_search_paths={REPO},{T5X_ROOT},{tmp_path}"]
  command += [f"--gin_file={f}" for f in gin_files]
  command += [f"--gin.{k}={v}" for k, v in bindings.items()]
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, (
      f"t5x.{script} failed:\n{' '.join(command)}\n{result.stderr[-5000:]}")
  return result


def _scalars(log_dir):
  """{tag: {step: value}} from the TensorBoard events t5x wrote."""
  values = {}
  for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("tensor"):
          array = tf.make_ndarray(value.tensor)
          if array.shape or array.dtype.kind != "f":
            continue  # text summaries (the gin config) and histograms
          number = float(array)
        else:
          number = value.simple_value
        values.setdefault(value.tag, {})[event.step] = number
  return values


def test_t5x_trains_finetunes_infers_and_evaluates_our_moe_module(tmp_path):
  (tmp_path / "t5x_compat_toy_tasks.py").write_text(textwrap.dedent(TOY_TASKS))
  (tmp_path / "toy_overrides.gin").write_text(TOY_OVERRIDES)
  (tmp_path / "toy_pretrain.gin").write_text(TOY_PRETRAIN)
  model_gin = "gin/models/tiny_moe.gin"

  # 1. From scratch: t5x's MoE pretrain run around our module.
  pretrain_dir = tmp_path / "pretrain"
  _run_t5x("train", [model_gin, "t5x/contrib/moe/configs/runs/pretrain.gin",
                     "gin/t5x/moe_model.gin", "toy_overrides.gin", "toy_pretrain.gin"],
           {"MODEL_DIR": f'"{pretrain_dir}"', "TRAIN_STEPS": 10}, tmp_path)
  assert (pretrain_dir / "checkpoint_10").is_dir()
  train = _scalars(pretrain_dir / "train")
  for tag in ("loss", "cross_ent_loss", "experts/auxiliary_loss",
              "experts/router_z_loss", "experts/fraction_tokens_left_behind",
              "experts/expert_usage", "experts/router_confidence"):
    assert tag in train, f"t5x logged no {tag!r}; logged {sorted(train)}"
  assert all(math.isfinite(v) for v in train["loss"].values())

  # 2. Fine-tune with our Flan run file from that checkpoint.
  finetune_dir = tmp_path / "finetune"
  _run_t5x("train", [model_gin, "gin/t5x/finetune_flan.gin", "toy_overrides.gin"],
           {"MODEL_DIR": f'"{finetune_dir}"', "TRAIN_STEPS": 20,
            "INITIAL_CHECKPOINT_PATH": f'"{pretrain_dir / "checkpoint_10"}"',
            "LEARNING_RATE": 1e-3}, tmp_path)
  assert (finetune_dir / "checkpoint_20").is_dir()
  assert _scalars(pretrain_dir / "training_eval" / "t5x_compat_toy")["cross_ent_loss"]
  first = train["cross_ent_loss"][5]
  last = _scalars(finetune_dir / "train")["cross_ent_loss"][20]
  assert last < first, f"training loss did not fall: step 5 {first}, step 20 {last}"

  # 3. Decode with t5x's beam search through our module's cache.
  infer_dir = tmp_path / "infer"
  _run_t5x("infer", [model_gin, "gin/t5x/infer.gin", "toy_overrides.gin"],
           {"CHECKPOINT_PATH": f'"{finetune_dir / "checkpoint_20"}"',
            "INFER_OUTPUT_DIR": f'"{infer_dir}"'}, tmp_path)
  (predictions,) = glob.glob(str(infer_dir / "t5x_compat_toy-predict.jsonl-*-of-*[0-9]"))
  with open(predictions, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 16 and all(isinstance(r["prediction"], str) for r in rows)

  # 4. seqio evaluation.
  eval_dir = tmp_path / "eval"
  _run_t5x("eval", [model_gin, "gin/t5x/eval.gin", "toy_overrides.gin"],
           {"CHECKPOINT_PATH": f'"{finetune_dir / "checkpoint_20"}"',
            "EVAL_OUTPUT_DIR": f'"{eval_dir}"'}, tmp_path)
  with open(eval_dir / "inference_eval" / "t5x_compat_toy-metrics.jsonl",
            encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  assert metrics[-1]["step"] == 20
  assert 0.0 <= metrics[-1]["exact_match"] <= 1.0
