"""The five verbs of launch/tpu.py on Cloud TPU VMs, as gcloud command sequences."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from launch import gcloud, preflight, ship, worker
from launch.driver import DriverRun
from launch.errors import LaunchError
from launch.gcloud import SliceSpec
from launch.runner import Runner


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """Everything `run` needs besides the slice."""
  driver: DriverRun
  repo_root: Path
  staging_dir: Path  # where the code archive is written locally
  poll_s: float


def create(runner: Runner, spec: SliceSpec, poll_s: float) -> None:
  runner.run(gcloud.create(spec))
  if spec.queued:
    wait_until_active(runner, spec, poll_s)


def wait_until_active(runner: Runner, spec: SliceSpec, poll_s: float) -> None:
  """A queued resource is granted later; its VMs exist once it is ACTIVE."""
  if runner.dry_run:
    runner.note(f"every {poll_s:g}s until the queued resource is ACTIVE:")
    runner.capture(gcloud.state(spec))
    return
  while (state := runner.capture(gcloud.state(spec))) != "ACTIVE":
    if state in ("FAILED", "SUSPENDED"):
      raise LaunchError(
          f"queued resource {spec.name} is {state}",
          "see `gcloud compute tpus queued-resources describe`, then delete "
          "and create it again")
    runner.sleep(poll_s)


def start(runner: Runner, spec: SliceSpec, setup: RunSetup) -> None:
  """Ships the current commit to every worker, installs it, starts the driver."""
  archive = setup.staging_dir / f"moe-jax-{spec.name}.tar.gz"
  runner.run(ship.archive(setup.repo_root, archive))
  runner.run(gcloud.scp_to_all(spec, str(archive), worker.ARCHIVE))
  runner.run(gcloud.ssh(spec, "all", worker.install("tpu")))
  runner.run(gcloud.ssh(spec, "all", worker.start(setup.driver.argv())))


def run(runner: Runner, spec: SliceSpec, setup: RunSetup) -> None:
  preflight.warn_if_dirty(runner, setup.repo_root)
  if setup.driver.gin_search_paths == ".":  # gin files come from the commit
    preflight.check_committed(runner, setup.repo_root, [
        f for f in setup.driver.gin_files if not f.startswith("/")])
  if setup.driver.bucket:
    preflight.check_bucket_region(runner, setup.driver.bucket, spec.region)
  start(runner, spec, setup)
  runner.note(
      f"started on {spec.slice.hosts} worker(s) of {spec.name}; follow "
      f"worker 0 with `launch/tpu.py logs`, stop with `launch/tpu.py stop`")


def logs(runner: Runner, spec: SliceSpec) -> None:
  hosts = spec.slice.hosts
  if hosts > 1:
    runner.note(
        f"worker 0 of {hosts}; workers 1-{hosts - 1} write {worker.LOG} on "
        f"their own VM (gcloud compute tpus tpu-vm ssh {spec.name} "
        f"--zone={spec.zone} --project={spec.project} --worker=N "
        f"--command='{worker.follow_log()}')")
  runner.run(gcloud.ssh(spec, "0", worker.follow_log()))


def stop(runner: Runner, spec: SliceSpec) -> None:
  runner.run(gcloud.ssh(spec, "all", worker.stop()))
  runner.note(
      "sent SIGTERM: the driver saves a checkpoint to MODEL_DIR and exits; "
      "the slice keeps billing until `launch/tpu.py delete`")


def delete(runner: Runner, spec: SliceSpec) -> None:
  runner.run(gcloud.delete(spec, unattended=False))
