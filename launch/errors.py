"""The one error type the launchers raise for problems a user can fix."""

from __future__ import annotations

from collections.abc import Sequence


class LaunchError(Exception):
  """A problem and its fix, shown to the user as one line.

  `exit_code` 2 marks a bad invocation (nothing ran); a failed external command
  uses 1 (see CommandFailed).
  """

  exit_code = 2

  def __init__(self, problem: str, fix: str):
    super().__init__(f"{problem}; {fix}")
    self.problem = problem
    self.fix = fix


class CommandFailed(LaunchError):
  """An external command (gcloud, git, ...) exited non-zero."""

  exit_code = 1

  def __init__(self, argv: Sequence[str], returncode: int, detail: str = ""):
    self.argv = list(argv)
    self.returncode = returncode
    what = f"`{' '.join(self.argv[:4])} ...` exited with {returncode}"
    if detail:
      what += f": {detail.strip().splitlines()[-1]}"
    super().__init__(what, "see its message above, or rerun with --debug")
