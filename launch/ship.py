"""Packs the code at the current commit for the workers (git archive HEAD).

A commit, not the working tree: every host runs the same, reproducible code,
and .venv or local data never travel.
"""

from __future__ import annotations

from pathlib import Path


def archive(root: Path, dest: Path) -> list[str]:
  return ["git", "-C", str(root), "archive", "--format=tar.gz",
          f"--output={dest}", "HEAD"]
