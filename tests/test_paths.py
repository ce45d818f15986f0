"""A run's files on gs://: our file code goes through epath, as orbax does.

Cloud Storage is not reachable from tests, so `gs://bucket/...` is mapped onto
a temporary directory for epath (every backend function is redirected); orbax
and TensorFlow's own gs:// I/O are theirs to test.
"""

import json
import os

import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from moe_jax import checkpoints
from moe_jax import paths
from moe_jax.training import evaluation
from moe_jax.training import inference
from moe_jax.training import metrics as metrics_lib

BUCKET = "gs://bucket/"
_FUNCTIONS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
              "remove", "rename", "replace", "rmtree", "stat", "walk")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """`gs://bucket/<p>` is `tmp_path/<p>` for epath; yields tmp_path."""
  def local(value):
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(BUCKET):
      return str(tmp_path / os.fspath(value)[len(BUCKET):])
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith("gs://"):
      raise AssertionError(f"unexpected bucket in {value}")
    return value

  def redirect(original, *args, **kwargs):
    return original(*map(local, args), **kwargs)

  # With TensorFlow installed epath sends gs:// to TensorFlow, past its own mock.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  with epath_testing.mock_epath(**{name: redirect for name in _FUNCTIONS}):
    yield tmp_path


@pytest.mark.parametrize("path, expected", [
    ("gs://bucket/run", "gs://bucket/run"),
    ("run/../other", os.path.join(os.getcwd(), "other")),
])
def test_absolute_keeps_urls(path, expected):
  assert paths.absolute(path) == expected


def test_json_written_atomically_on_gs(bucket):
  metrics_lib.write_json(BUCKET + "run/compile_stats.json", {"flops": 3})
  assert json.loads((bucket / "run" / "compile_stats.json").read_text()) == {"flops": 3}
  assert os.listdir(bucket / "run") == ["compile_stats.json"]


def test_predictions_written_on_gs(bucket):
  inference._write_jsonl(BUCKET + "out/x.jsonl", [{"a": 1}, {"a": 2}])  # pylint: disable=protected-access
  assert (bucket / "out" / "x.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'


def test_checkpoints_found_on_gs(bucket):
  for step in (100, 200):
    (bucket / "run" / f"checkpoint_{step}" / "params").mkdir(parents=True)
    (bucket / "run" / f"checkpoint_{step}" / "params" / "_METADATA").write_text("{}")
  (bucket / "run" / "checkpoint_300.orbax-checkpoint-tmp-7").mkdir()  # An unfinished save.
  assert checkpoints.latest_step(BUCKET + "run") == 200
  assert checkpoints.latest_step(BUCKET + "missing") is None
  assert checkpoints.step_of(BUCKET + "run/checkpoint_200") == 200
  assert checkpoints.find_checkpoint(BUCKET + "run") == (
      BUCKET + "run/checkpoint_200/params", False)
  assert evaluation.default_output_dir(BUCKET + "run/checkpoint_200") == BUCKET + "run"
  assert evaluation.default_output_dir(BUCKET + "run/") == BUCKET + "run"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.find_checkpoint(BUCKET + "missing")
