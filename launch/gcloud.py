"""`gcloud compute tpus` command lines for one slice (built, never run, here).

Flag names as documented in the gcloud reference:
- tpu-vm create NAME --zone --accelerator-type --version [--spot]
- queued-resources create NAME --zone --node-id --accelerator-type
  --runtime-version [--spot]; delete --force removes its nodes too
- tpu-vm ssh NAME --worker=all|N --command; tpu-vm scp SRC NAME:DEST --worker
- describe --format=value(state) (node) / value(state.state) (queued)
"""

from __future__ import annotations

import dataclasses
import re

from launch.errors import LaunchError
from launch.tpu_types import TpuSlice

TPU = ["gcloud", "compute", "tpus"]
# Node states (TPU API Node.State) and queued-resource states
# (QueuedResourceState.State) that mean "usable" or "gone, recreate".
READY_STATES = frozenset({"READY", "ACTIVE"})
LOST_STATES = frozenset({"PREEMPTED", "TERMINATED", "SUSPENDING", "SUSPENDED",
                         "FAILED"})


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  name: str
  slice: TpuSlice
  zone: str
  project: str
  spot: bool
  queued: bool  # created through the queued-resources API
  runtime_version: str

  @property
  def region(self) -> str:
    return self.zone.rsplit("-", 1)[0]

  @property
  def where(self) -> str:
    return self.slice.accelerator_type


def check_zone(zone: str | None) -> str:
  if not zone:
    raise LaunchError("missing --zone",
                      "pass the TPU zone, e.g. --zone us-central2-b")
  if re.fullmatch(r"[a-z]+-[a-z]+\d+", zone):
    raise LaunchError(f"--zone {zone} is a region",
                      f"pass one of its zones, e.g. --zone {zone}-b")
  if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone):
    raise LaunchError(f"--zone {zone!r} is not a zone name",
                      "pass e.g. --zone us-central2-b")
  return zone


def _place(spec: SliceSpec) -> list[str]:
  return [f"--zone={spec.zone}", f"--project={spec.project}"]


def _api(spec: SliceSpec) -> list[str]:
  return TPU + (["queued-resources"] if spec.queued else ["tpu-vm"])


def create(spec: SliceSpec) -> list[str]:
  accel = f"--accelerator-type={spec.slice.accelerator_type}"
  if spec.queued:
    argv = _api(spec) + ["create", spec.name, *_place(spec),
                         f"--node-id={spec.name}", accel,
                         f"--runtime-version={spec.runtime_version}"]
  else:
    argv = _api(spec) + ["create", spec.name, *_place(spec), accel,
                         f"--version={spec.runtime_version}"]
  return argv + (["--spot"] if spec.spot else [])


def delete(spec: SliceSpec, unattended: bool) -> list[str]:
  """Deletes the slice; gcloud asks first unless `unattended` (--quiet)."""
  argv = _api(spec) + ["delete", spec.name, *_place(spec)]
  if spec.queued:
    argv.append("--force")  # the queued resource and its TPU VMs together
  return argv + (["--quiet"] if unattended else [])


def state(spec: SliceSpec) -> list[str]:
  field = "state.state" if spec.queued else "state"
  return _api(spec) + ["describe", spec.name, *_place(spec),
                       f"--format=value({field})"]


def scp_to_all(spec: SliceSpec, local: str, remote: str) -> list[str]:
  return TPU + ["tpu-vm", "scp", local, f"{spec.name}:{remote}",
                "--worker=all", *_place(spec)]


def ssh(spec: SliceSpec, worker: str, command: str) -> list[str]:
  """Runs `command` on worker N, or on every worker at once ("all")."""
  return TPU + ["tpu-vm", "ssh", spec.name, *_place(spec),
                f"--worker={worker}", f"--command={command}"]


def bucket_location(bucket: str) -> list[str]:
  return ["gcloud", "storage", "buckets", "describe", f"gs://{bucket}",
          "--format=value(location)"]
