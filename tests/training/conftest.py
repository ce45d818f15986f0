"""Shared helpers for the driver tests: the toy run, in process and as a command."""

import json
import os
import subprocess
import sys

import gin

from moe_jax import config
from moe_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_RUN = "tests/training/toy_run.gin"


def toy_bindings(model_dir, **macros):
  """gin bindings of the toy run: MODEL_DIR plus `MACRO=value` overrides."""
  bindings = [f"MODEL_DIR = {str(model_dir)!r}"]
  bindings += [f"{name} = {value!r}" for name, value in macros.items()]
  return bindings


def train_toy(model_dir, gin_files=(TOY_RUN,), **macros) -> loop.RunSummary:
  """Runs `loop.train` in this process, configured like the command line does."""
  config.parse(list(gin_files), toy_bindings(model_dir, **macros))
  try:
    return config.call_configured(loop.train, TOY_RUN)
  finally:
    gin.clear_config()


def losses(model_dir):
  """{step: loss} from a run's train_metrics.jsonl."""
  with open(os.path.join(model_dir, "train_metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: row["loss"] for row in rows}


def command_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.update(extra)
  return env


def run_command(*args, env=None, timeout=600):
  """`python -m ARGS` from the repository root; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env or command_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)

