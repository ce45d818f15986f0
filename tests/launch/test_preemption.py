"""run --restart_on_preemption against a scripted gcloud: no cloud, no sleeps."""

from pathlib import Path

import pytest

from launch import driver, gcloud, preemption, tpu_types, tpu_vm
from launch.errors import CommandFailed, LaunchError

from .fakes import ScriptedRunner


def spec(queued=False):
  return gcloud.SliceSpec(
      name="flan-moe", slice=tpu_types.resolve("v4-64"), zone="us-central2-b",
      project="p", spot=True, queued=queued,
      runtime_version="tpu-ubuntu2204-base")


SETUP = tpu_vm.RunSetup(
    driver=driver.DriverRun("train", ("gin/models/tiny.gin",), ".", "gs://b/r",
                            ()),
    repo_root=Path("/repo"), staging_dir=Path("/staging"), poll_s=30)


def verbs(runner):
  """Each command as its gcloud/git verb words, e.g. 'tpu-vm delete'."""
  return [" ".join(a[3:5]) if a[0] == "gcloud" else " ".join(a[:4:3])
          for a in runner.history]


def test_finishes_with_worker_0_exit_code():
  runner = ScriptedRunner(["READY", "", "CREATING", "READY", "0"])
  assert preemption.supervise(runner, spec(), SETUP, max_restarts=3) == 0
  assert runner.slept == [30, 30, 30]
  assert verbs(runner) == ["tpu-vm describe", "tpu-vm ssh", "tpu-vm describe",
                           "tpu-vm describe", "tpu-vm ssh"]


def test_recreates_a_preempted_slice_and_starts_again():
  runner = ScriptedRunner(["READY", "", "PREEMPTED", "READY", "0"])
  assert preemption.supervise(runner, spec(), SETUP, max_restarts=3) == 0
  assert verbs(runner) == [
      "tpu-vm describe", "tpu-vm ssh", "tpu-vm describe",
      "tpu-vm delete", "tpu-vm create",  # recreate
      "git archive", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",  # start again
      "tpu-vm describe", "tpu-vm ssh"]
  delete = runner.history[3]
  assert delete[-1] == "--quiet"  # unattended: no prompt
  assert runner.history[4][-1] == "--spot"


def test_queued_slice_waits_until_active_after_recreate():
  runner = ScriptedRunner(["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE",
                           "ACTIVE", "1"])
  assert preemption.supervise(runner, spec(queued=True), SETUP,
                              max_restarts=1) == 1
  assert verbs(runner)[:5] == ["queued-resources describe",
                               "queued-resources delete",
                               "queued-resources create",
                               "queued-resources describe",
                               "queued-resources describe"]
  assert "--force" in runner.history[1]


def test_gives_up_after_max_restarts():
  runner = ScriptedRunner(["PREEMPTED", "TERMINATED"])
  with pytest.raises(LaunchError, match="lost .TERMINATED. after 1 attempts"):
    preemption.supervise(runner, spec(), SETUP, max_restarts=1)
  assert runner.slept == [30, 30]


def test_retries_a_failed_recreate():
  """No spot capacity on the first try: create fails, the next one works."""
  class NoCapacityOnce(ScriptedRunner):
    creates = 0

    def _call(self, argv):
      if argv[4] == "create":
        self.creates += 1
        return 1 if self.creates == 1 else 0
      return 1 if argv[4] == "delete" and self.creates else 0

  runner = NoCapacityOnce(["PREEMPTED", "READY", "0"])
  assert preemption.supervise(runner, spec(), SETUP, max_restarts=2) == 0
  assert verbs(runner) == [
      "tpu-vm describe", "tpu-vm delete", "tpu-vm create",  # create fails
      "tpu-vm delete", "tpu-vm create",  # delete finds nothing; create works
      "git archive", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
      "tpu-vm describe", "tpu-vm ssh"]
  assert runner.slept == [30, 30, 30]


def test_tolerates_a_few_failed_probes_then_gives_up():
  runner = ScriptedRunner([255, "READY", "0"])
  assert preemption.supervise(runner, spec(), SETUP, max_restarts=1) == 0
  runner = ScriptedRunner([255, 255, 255])
  with pytest.raises(LaunchError, match="3 probes of flan-moe failed"):
    preemption.supervise(runner, spec(), SETUP, max_restarts=1)


def test_queued_create_fails_loudly():
  runner = ScriptedRunner(["FAILED"])
  with pytest.raises(LaunchError, match="queued resource flan-moe is FAILED"):
    tpu_vm.create(runner, spec(queued=True), poll_s=1)


def test_a_failed_command_stops_the_run():
  class Failing(ScriptedRunner):
    def _call(self, argv):
      return 1
  with pytest.raises(CommandFailed, match="exited with 1") as e:
    tpu_vm.start(Failing([]), spec(), SETUP)
  assert e.value.exit_code == 1
