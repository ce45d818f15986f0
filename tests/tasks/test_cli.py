"""The command line fails cleanly (one line, exit 2) and starts quietly."""

import json
import os
import re
import subprocess
import sys

import pytest
import seqio
import tensorflow as tf

from moe_jax_tasks import __main__ as cli
from moe_jax_tasks import errors
from moe_jax_tasks import formats
from moe_jax_tasks import prepare
from moe_jax_tasks import sources
from moe_jax_tasks import startup
from moe_jax_tasks import vocabulary

SAMPLE_TASK = "sample:niv2:task1146_country_capital:zs"
NIV2_FILE = os.path.join("niv2", "tasks", "task1146_country_capital.json")
VALID_NIV2 = json.dumps({"Definition": ["Name the capital."],
                         "Instances": [{"input": "France", "output": ["Paris"]}]})
# A TensorFlow/absl C++ log line, `I0000 00:00:17.1 5376 port.cc:153] ...`: its tag.
CPP_LOG_TAG = re.compile(r"^[IWEF]\d{4} \S+ +\d+ (\S+:\d+)\]", re.MULTILINE)
ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog()"


def _environment(**variables):
  """This process's environment without our settings, plus `variables`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("FLAN_") and k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(variables)
  return env


def _run(*args, **variables):
  return subprocess.run([sys.executable, "-m", "moe_jax_tasks", *args],
                        capture_output=True, text=True, timeout=600,
                        env=_environment(**variables))


def _data_root(tmp_path, niv2_text):
  path = tmp_path / NIV2_FILE
  path.parent.mkdir(parents=True)
  path.write_text(niv2_text, encoding="utf-8")
  return str(tmp_path)


def _malformed_niv2(tmp_path):
  return (["show", "task1146_country_capital"],
          {"FLAN_DATA_DIR": _data_root(tmp_path, "{not json")},
          [f"{tmp_path / NIV2_FILE} is not valid JSON",
           "Task 'task1146_country_capital'"])


def _unknown_task(tmp_path):
  del tmp_path
  return (["show", "no_such_task"], {},
          ["Unknown task 'no_such_task'", "see `list`"])


def _unreadable_vocabulary(tmp_path):
  # Few-shot prompts are fitted to a token budget: they need the vocabulary.
  missing = str(tmp_path / "missing.model")
  return (["show", "task1146_country_capital", "--format", "fs5"],
          {"FLAN_DATA_DIR": _data_root(tmp_path, VALID_NIV2), "FLAN_VOCAB": missing},
          [f"Cannot read the SentencePiece vocabulary {missing}",
           "Point FLAN_VOCAB at a local SentencePiece model"])


@pytest.mark.parametrize("case", [_malformed_niv2, _unknown_task,
                                  _unreadable_vocabulary])
def test_anticipated_errors_print_one_line_and_exit_2(tmp_path, case):
  args, variables, expected = case(tmp_path)
  result = _run(*args, **variables)
  lines = result.stderr.splitlines()
  assert result.returncode == 2, result.stderr
  assert 1 <= len(lines) <= 2, result.stderr
  for text in expected:
    assert text in result.stderr
  assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
  result = _run("show", "task1146_country_capital", "--debug",
                FLAN_DATA_DIR=_data_root(tmp_path, "{not json"))
  assert result.returncode == 2
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.splitlines()[-1].startswith(
      "error: Task 'task1146_country_capital':")


def test_start_up_is_quiet_and_verbose_lets_the_cpp_log_through():
  quiet = _run("show", SAMPLE_TASK, "--n", "1")
  assert quiet.returncode == 0 and "Paris" in quiet.stdout
  assert quiet.stderr == ""
  # What the same imports and a first op print outside the command line.
  baseline = subprocess.run(
      [sys.executable, "-c",
       "import moe_jax_tasks, tensorflow as tf; tf.constant(0)"],
      capture_output=True, text=True, timeout=600, env=_environment())
  noise = set(CPP_LOG_TAG.findall(baseline.stderr))
  if not noise and ABSL_NOTICE not in baseline.stderr:
    pytest.skip("TensorFlow prints no C++ start-up log on this machine.")
  verbose = _run("--verbose", "show", SAMPLE_TASK, "--n", "1")
  assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
  assert noise <= set(CPP_LOG_TAG.findall(verbose.stderr))
  assert (ABSL_NOTICE in verbose.stderr) == (ABSL_NOTICE in baseline.stderr)


@pytest.mark.parametrize("args,expected", [
    (["show", "task1146_country_capital"], "FLAN_DATA_DIR"),
    (["show", "rte", "--format", "zs"], "Task 'rte' has no format 'zs'"),
    (["show", SAMPLE_TASK, "--split", "test"], "has no split 'test'"),
    (["prepare", "--out", "unused", "--parts", "nope"], "Unknown prepare parts"),
])
def test_usage_errors_in_process(monkeypatch, capsys, args, expected):
  monkeypatch.delenv("FLAN_DATA_DIR", raising=False)
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("argv", [["--debug", "list", "--mixture", "cot"],
                                  ["list", "--mixture", "cot", "--verbose"]])
def test_flags_go_before_or_after_the_command(capsys, argv):
  assert cli.main(argv) == 0
  assert len(capsys.readouterr().out.splitlines()) == 9


def test_unanticipated_errors_keep_their_traceback():
  assert cli.anticipated_message(KeyError("bug")) is None


def _missing_vocabulary(tmp_path):
  return vocabulary.ConfiguredVocabulary(
      lambda: (str(tmp_path / "missing.model"), 0))


def test_show_renders_text_without_a_vocabulary(tmp_path):
  root = _data_root(tmp_path, VALID_NIV2)
  task = seqio.Task(
      "test_cli_text", sources.niv2_source("task1146_country_capital",
                                           root=lambda: root),
      output_features=vocabulary.output_features(_missing_vocabulary(tmp_path)),
      preprocessors=[
          lambda ds: formats.zero_shot(ds, group="niv2", with_options=False,
                                       task_name="t", task_source="niv2"),
          *formats.tokenize_pipeline()])
  example = next(iter(cli.text_dataset(task, "train")))
  assert example["inputs"].numpy().decode().endswith("Input: France\nOutput:")
  assert example["targets"].numpy() == b"Paris"
  with pytest.raises(Exception) as error:  # Tokenizing needs the vocabulary.
    next(iter(task.get_dataset(None, split="train", shuffle=False)))
  assert "missing.model" in cli.anticipated_message(error.value)


def test_errors_tensorflow_wraps_are_found(tmp_path):
  bad_root = _data_root(tmp_path, "{not json")
  source = sources.niv2_source("task1146_country_capital", root=lambda: bad_root)
  with pytest.raises(tf.errors.OpError) as error:  # Raised in a tf.data generator.
    next(iter(source.get_dataset("train")))
  assert cli.anticipated_message(error.value) == (
      f"Task 'task1146_country_capital': {tmp_path / NIV2_FILE} is not valid JSON "
      "(Expecting property name enclosed in double quotes: line 1 column 2 "
      "(char 1)).")
  rows = tf.data.Dataset.from_tensor_slices({
      "question": ["q1", "q2"], "answer": ["a1", "a2"],
      "chain_of_thought": ["c1", "c2"]})
  features = vocabulary.output_features(_missing_vocabulary(tmp_path))
  with pytest.raises(Exception) as error:  # Raised while tf.data traces a map.
    formats.few_shot(rows, features, group="cot", with_options=False,
                     task_name="t", task_source="cot", num_shots=1,
                     same_template=False, max_input_tokens=100)
  message = cli.anticipated_message(error.value)
  assert message.startswith(f"Cannot read the SentencePiece vocabulary "
                            f"{tmp_path / 'missing.model'}")
  assert "\n" not in message


@pytest.mark.parametrize("argv,orig_argv,quiet", [
    (["-m", "show"], ["python", "-m", "moe_jax_tasks", "show"], True),
    (["-m"], ["python", "-X", "dev", "-mmoe_jax_tasks"], True),
    (["-m", "list"], ["python", "-m", "moe_jax_tasks.__main__", "list"], True),
    (["-m", "show", "--verbose"],
     ["python", "-m", "moe_jax_tasks", "show", "--verbose"], False),
    (["-m", "tests"], ["python", "-m", "pytest", "tests"], False),
    (["train.py"], ["python", "train.py"], False),
    (["-c"], ["python", "-c", "import moe_jax_tasks"], False),
])
def test_only_the_command_line_starts_quiet(monkeypatch, argv, orig_argv, quiet):
  monkeypatch.setattr(sys, "argv", argv)
  monkeypatch.setattr(sys, "orig_argv", orig_argv)
  assert startup.quiet_command_line("moe_jax_tasks") == quiet


def test_cpp_log_lines_are_dropped_and_the_rest_kept(capfd):
  with startup.without_cpp_log_lines():
    for line in (f"{ABSL_NOTICE} is called are written to STDERR",
                 "I0000 00:00:1796104226.633473    5376 port.cc:153] oneDNN on.",
                 "E0000 00:00:1796104517.929437    7745 cuda_platform.cc:52] "
                 "failed call to cuInit: INTERNAL: CUDA error",
                 "UserWarning: something Python wants you to know"):
      os.write(2, (line + "\n").encode())
  assert capfd.readouterr().err == "UserWarning: something Python wants you to know\n"


def test_offline_download_names_the_url():
  url = "file:///nonexistent/moe_jax_tasks/data.tar"
  with pytest.raises(prepare.DownloadError, match="needs internet") as error:
    prepare.urllib_fetch(url)
  assert url in str(error.value) and isinstance(error.value, errors.Error)
