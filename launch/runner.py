"""The single door to the outside world: every external command goes through it.

`--dry_run` prints each command, in order, instead of running it; tests
subclass Runner and script `_call`/`_output` to see the exact command list.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from launch import shell
from launch.errors import CommandFailed, LaunchError


class Runner:

  def __init__(self, dry_run: bool, echo: bool = False,
               stdout: TextIO | None = None, stderr: TextIO | None = None):
    self.dry_run = dry_run
    self.echo = echo  # --debug: show each command before running it
    self.stdout = stdout or sys.stdout
    self.stderr = stderr or sys.stderr
    self.history: list[list[str]] = []

  def run(self, argv: Sequence[str]) -> None:
    """Runs a command with the terminal attached; raises if it fails."""
    if self._announce(argv):
      return
    returncode = self._call(list(argv))
    if returncode:
      raise CommandFailed(argv, returncode)

  def capture(self, argv: Sequence[str]) -> str:
    """Runs a read-only probe and returns its stripped stdout ("" when dry)."""
    if self._announce(argv):
      return ""
    returncode, out, err = self._output(list(argv))
    if returncode:
      raise CommandFailed(argv, returncode, err)
    return out.strip()

  def note(self, text: str) -> None:
    """A line for the user: a `#` comment in a dry run, stderr otherwise."""
    if self.dry_run:
      print(f"# {text}", file=self.stdout)
    else:
      print(text, file=self.stderr)

  def sleep(self, seconds: float) -> None:
    time.sleep(seconds)

  def _announce(self, argv: Sequence[str]) -> bool:
    """Records argv; prints it when dry (returns True) or echoing."""
    self.history.append(list(argv))
    if self.dry_run:
      print(shell.join(argv), file=self.stdout)
      return True
    if self.echo:
      print("+ " + shell.join(argv), file=self.stderr)
    return False

  def _call(self, argv: list[str]) -> int:
    try:
      return subprocess.run(argv, check=False).returncode
    except FileNotFoundError as e:
      raise _missing_tool(argv[0]) from e

  def _output(self, argv: list[str]) -> tuple[int, str, str]:
    try:
      proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    except FileNotFoundError as e:
      raise _missing_tool(argv[0]) from e
    return proc.returncode, proc.stdout, proc.stderr


def _missing_tool(name: str) -> LaunchError:
  fixes = {
      "gcloud": "install the Google Cloud CLI and run `gcloud auth login`",
      "git": "install git; runs ship the code at the current git commit",
  }
  return LaunchError(f"`{name}` is not on PATH",
                     fixes.get(name, f"install {name}"))
