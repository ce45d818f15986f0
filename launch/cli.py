"""What launch/tpu.py and launch/gpu.py share: flags, parsing, error handling."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from launch import driver
from launch.errors import LaunchError

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME_HELP = "lowercase letters, digits and dashes, starting with a letter"


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad flag is a one-line LaunchError, not usage + exit,
  and no abbreviations (--gin.* flags pass through untouched)."""

  def __init__(self, **kwargs):
    super().__init__(allow_abbrev=False, **kwargs)

  def error(self, message: str):
    raise LaunchError(message, f"see `{self.prog} --help`")


def add_driver_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "driver", "the moe_jax run; any other --gin.NAME=VALUE is passed through")
  group.add_argument("--driver", choices=driver.DRIVERS, default="train",
                     help="python -m moe_jax.DRIVER (default: train)")
  group.add_argument("--gin_file", action="append", default=[],
                     help="repeatable, relative to the repository root")
  group.add_argument("--gin_search_paths", default=".",
                     help="default: the shipped repository root")
  group.add_argument("--model_dir",
                     help="gs://BUCKET/PATH; checkpoints, resumed on rerun")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", type=Path,
                      help="write the emitted file here instead of stdout")
  parser.add_argument("--debug", action="store_true",
                      help="tracebacks instead of one-line errors; echo commands")


def driver_run(args: argparse.Namespace, overrides: tuple[tuple[str, str], ...],
               model_dir: str) -> driver.DriverRun:
  """The DriverRun the flags describe, with a model_dir already checked."""
  driver.check_gin_files(args.gin_file, args.gin_search_paths, REPO_ROOT)
  return driver.DriverRun(
      driver=args.driver,
      gin_files=tuple(args.gin_file),
      gin_search_paths=args.gin_search_paths,
      model_dir=model_dir,
      overrides=overrides)


def check_name(name: str | None) -> str:
  """Valid as a TPU node, queued resource, SkyPilot, xpk and SLURM name."""
  if not name:
    raise LaunchError("missing --name", f"pass --name NAME ({NAME_HELP})")
  if not re.fullmatch(r"[a-z](?:[-a-z0-9]{0,38}[a-z0-9])?", name):
    raise LaunchError(f"--name {name!r} is not a valid resource name",
                      f"use at most 40 {NAME_HELP}, not ending in a dash")
  return name


def write_or_print(text: str, out: Path | None) -> None:
  if out is None:
    sys.stdout.write(text)
  else:
    out.write_text(text)


def main(entry: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
  """Runs a CLI entry point: one-line errors (exit 2, or 1 when a command
  failed), a full traceback with --debug."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return entry(argv)
  except LaunchError as e:
    if "--debug" in argv:
      raise
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print("interrupted; whatever already started in the cloud keeps running",
          file=sys.stderr)
    return 130
