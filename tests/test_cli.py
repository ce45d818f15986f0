"""moe_jax's command lines: one-line errors (exit 2), --debug, quiet start-up."""

import os
import subprocess
import sys

import pytest

from moe_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# C++ start-up notices TensorFlow prints when its native libraries load.
NOISE = ("oneDNN custom operations", "cudart_stub", "absl::InitializeLog")


def _run(*args, **environment):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **environment)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    (["moe_jax.describe", "--gin_file", "nope.gin"],
     "gin file 'nope.gin' was not found in the search paths"),
    (["moe_jax.describe", "--gin_file", "gin/models/tiny_moe.gin",
      "--gin.moe.MoeLayer.num_expertz=3"],
     "doesn't have a parameter named 'num_expertz'"),
    (["moe_jax.score", "--gin_file", "gin/models/tiny.gin", "--checkpoint", "/nonexistent",
      "--input_file", "in.jsonl", "--output_file", "out.jsonl"],
     "Checkpoint '/nonexistent' does not exist"),
    (["moe_jax.convert", "hf", "--checkpoint_dir", "/nonexistent", "--output_dir", "/tmp/x"],
     "No config.json in '/nonexistent'"),
])
def test_anticipated_errors_are_one_line(args, message):
  result = _run(*args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert message in lines[0] and lines[0].startswith("python -m moe_jax.")


def test_lm_eval_without_the_harness_is_one_line(tmp_path):
  # An `lm_eval` that cannot be imported stands in for the extra not installed.
  (tmp_path / "lm_eval").mkdir()
  (tmp_path / "lm_eval" / "__init__.py").write_text("raise ImportError('not installed')\n")
  result = _run("moe_jax.lm_eval", "--model", "moe_jax", PYTHONPATH=os.pathsep.join(
      [str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      "python -m moe_jax.lm_eval: the lm-evaluation-harness is not installed; install the "
      "extra: pip install -e '.[lm-eval]' (or pip install 'lm-eval>=0.4.13,<0.5' "
      "'torch==2.13.0')"]


def test_debug_shows_the_traceback():
  result = _run("moe_jax.describe", "--gin_file", "nope.gin", "--debug")
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr
  assert "FileNotFoundError: gin file 'nope.gin'" in result.stderr


def test_start_up_is_quiet_unless_verbose(tmp_path):
  # A gin file that imports seqio loads TensorFlow's native libraries.
  gin_file = tmp_path / "model.gin"
  gin_file.write_text("include 'gin/models/tiny.gin'\nimport seqio\n")
  args = ["moe_jax.describe", "--gin_file", str(gin_file), "--json"]
  quiet = _run(*args)
  assert quiet.returncode == 0, quiet.stderr
  assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr
  verbose = _run(*args, "--verbose")
  assert verbose.returncode == 0
  assert quiet.stdout == verbose.stdout
  if not any(n in verbose.stderr for n in NOISE):
    pytest.skip("TensorFlow prints no start-up notices on this machine")


@pytest.mark.parametrize("extra, expected", [
    (["--gin.MODEL_DIR='/tmp/run'"], ["MODEL_DIR = '/tmp/run'"]),
    (["--gin.NUM_EXPERTS", "16", "--gin.moe.MoeLayer.dispatch='einsum'"],
     ["NUM_EXPERTS = 16", "moe.MoeLayer.dispatch = 'einsum'"]),
])
def test_gin_dot_flags_become_bindings(extra, expected):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="test")
  cli.add_gin_flags(parser)
  cli.add_output_flags(parser)
  seen = {}
  assert cli.run(lambda args: seen.update(bindings=args.gin_bindings), parser,
                 ["--gin_file", "x.gin", "--gin_bindings", "A = 1", *extra]) == 0
  assert seen["bindings"] == ["A = 1", *expected]


def test_error_lines_point_to_debug_for_details():
  text = cli.error_lines("prog", ValueError("first problem\n  detail 1\n  detail 2"))
  assert text.splitlines() == ["prog: first problem",
                               "prog: (2 more lines; rerun with --debug)"]


def test_own_log_lines_print_as_their_message_while_a_command_runs(capsys):
  import argparse  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  root_handler = logging.StreamHandler(sys.stderr)  # What logging.basicConfig() installs.
  root_handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
  logging.getLogger().addHandler(root_handler)
  parser = argparse.ArgumentParser(prog="test")
  cli.add_output_flags(parser)
  logger = logging.getLogger("moe_jax.tuning")
  try:
    assert cli.run(lambda args: logger.warning("moe_jax.tuning: measured"), parser, []) == 0
    assert capsys.readouterr().err == "moe_jax.tuning: measured\n"
    logger.warning("after")  # Outside a command, logging is as the process set it up.
    assert capsys.readouterr().err == "WARNING:moe_jax.tuning:after\n"
  finally:
    logging.getLogger().removeHandler(root_handler)
