"""A run's files on gs://: our file code goes through epath, as orbax does.

Cloud Storage is not reachable from tests: the `fake_bucket` fixture
(conftest.py) maps `gs://bucket/...` onto a temporary directory for epath;
orbax's, tensorstore's and TensorFlow's own gs:// I/O are theirs to test.
"""

import json
import os

import pytest

from moe_jax import checkpoints
from moe_jax import paths
from moe_jax.training import evaluation
from moe_jax.training import inference
from moe_jax.training import metrics as metrics_lib

BUCKET = "gs://bucket/"  # What the fake_bucket fixture maps.

@pytest.mark.parametrize("path, expected", [
    ("gs://bucket/run", "gs://bucket/run"),
    ("run/../other", os.path.join(os.getcwd(), "other")),
])
def test_absolute_keeps_urls(path, expected):
  assert paths.absolute(path) == expected


def test_json_written_atomically_on_gs(fake_bucket):
  metrics_lib.write_json(BUCKET + "run/compile_stats.json", {"flops": 3})
  assert json.loads((fake_bucket / "run" / "compile_stats.json").read_text()) == {"flops": 3}
  assert os.listdir(fake_bucket / "run") == ["compile_stats.json"]


def test_predictions_written_on_gs(fake_bucket):
  # pylint: disable-next=protected-access
  inference._write_jsonl(BUCKET + "out/x.jsonl", [{"a": 1}, {"a": 2}])
  assert (fake_bucket / "out" / "x.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'


def test_checkpoints_found_on_gs(fake_bucket):
  for step in (100, 200):
    (fake_bucket / "run" / f"checkpoint_{step}" / "params").mkdir(parents=True)
    (fake_bucket / "run" / f"checkpoint_{step}" / "params" / "_METADATA").write_text("{}")
  (fake_bucket / "run" / "checkpoint_300.orbax-checkpoint-tmp-7").mkdir()  # An unfinished save.
  assert checkpoints.latest_step(BUCKET + "run") == 200
  assert checkpoints.latest_step(BUCKET + "missing") is None
  assert checkpoints.step_of(BUCKET + "run/checkpoint_200") == 200
  assert checkpoints.find_checkpoint(BUCKET + "run") == (
      BUCKET + "run/checkpoint_200/params", False)
  assert evaluation.default_output_dir(BUCKET + "run/checkpoint_200") == BUCKET + "run"
  assert evaluation.default_output_dir(BUCKET + "run/") == BUCKET + "run"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.find_checkpoint(BUCKET + "missing")
