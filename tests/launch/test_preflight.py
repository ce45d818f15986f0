from pathlib import Path

import pytest

from launch import preflight
from launch.errors import LaunchError

from .fakes import ScriptedRunner


@pytest.mark.parametrize("location", ["US-CENTRAL2", "us-central2", "US",
                                      "NAM4", "EU"])
def test_bucket_in_the_region_or_a_multi_region_passes(location):
  runner = ScriptedRunner([location])
  preflight.check_bucket_region(runner, "b", "us-central2")
  assert runner.history == [["gcloud", "storage", "buckets", "describe",
                             "gs://b", "--format=value(location)"]]


def test_bucket_in_another_region_is_refused():
  with pytest.raises(LaunchError) as e:
    preflight.check_bucket_region(ScriptedRunner(["EUROPE-WEST4"]), "b",
                                  "us-central2")
  assert e.value.problem == ("bucket gs://b is in europe-west4, the TPU in "
                             "us-central2")
  assert "--location=us-central2" in e.value.fix


@pytest.mark.parametrize("status, warned", [("", False), (" M launch/tpu.py", True)])
def test_dirty_tree_warning(capsys, status, warned):
  runner = ScriptedRunner([status])
  preflight.warn_if_dirty(runner, Path("/repo"))
  assert runner.history == [["git", "-C", "/repo", "status", "--porcelain",
                             "--untracked-files=no"]]
  assert ("uncommitted changes do not ship" in capsys.readouterr().err) == warned


def test_uncommitted_gin_file_is_refused():
  runner = ScriptedRunner(["gin/models/a.gin"])
  with pytest.raises(LaunchError, match="gin/t5x/new.gin is not committed"):
    preflight.check_committed(runner, Path("/repo"),
                              ["gin/models/a.gin", "gin/t5x/new.gin"])
  assert runner.history == [["git", "-C", "/repo", "ls-tree", "--name-only",
                             "HEAD", "--", "gin/models/a.gin",
                             "gin/t5x/new.gin"]]
  preflight.check_committed(ScriptedRunner(["gin/models/a.gin"]),
                            Path("/repo"), ["gin/models/a.gin"])
