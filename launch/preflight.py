"""Cheap checks before a run spends money: what ships, and where it writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from launch import gcloud
from launch.errors import LaunchError
from launch.runner import Runner


def warn_if_dirty(runner: Runner, root: Path) -> None:
  """Only committed code ships (git archive HEAD): say so if that is not all."""
  changed = runner.capture(["git", "-C", str(root), "status", "--porcelain",
                            "--untracked-files=no"])
  if changed:
    runner.note("warning: uncommitted changes do not ship; the workers run "
                "the last commit (commit first to include them)")


def check_committed(runner: Runner, root: Path, paths: Sequence[str]) -> None:
  """A gin file that exists here but not in HEAD would be missing remotely."""
  if not paths:
    return
  listed = runner.capture(["git", "-C", str(root), "ls-tree", "--name-only",
                           "HEAD", "--", *paths])
  if runner.dry_run:
    return
  missing = [p for p in paths if p not in listed.splitlines()]
  if missing:
    raise LaunchError(f"{missing[0]} is not committed, and only HEAD ships",
                      "commit it (git add, git commit) and run again")


def check_bucket_region(runner: Runner, bucket: str, region: str) -> None:
  """A bucket in another region than the TPU bills every read and write of
  every checkpoint as cross-region egress, and slows them down."""
  location = runner.capture(gcloud.bucket_location(bucket)).lower()
  # Multi- and dual-region locations (US, EU, NAM4, ...) have no dash.
  if "-" in location and location != region:
    raise LaunchError(
        f"bucket gs://{bucket} is in {location}, the TPU in {region}",
        f"use a bucket in {region} (gcloud storage buckets create "
        f"gs://NEW --location={region}) or a zone in {location}")
