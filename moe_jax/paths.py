"""Paths that may be local or on Cloud Storage (`gs://bucket/...`).

A run's MODEL_DIR, its checkpoints and its outputs live on gs:// on TPU pods
and on disk elsewhere. Everything here goes through `etils.epath` (what orbax
uses: TensorFlow's file system for gs://, the OS for local paths), so one
code path serves both.
"""

import os

from etils import epath


def absolute(path: str) -> str:
  """`path` made absolute; a URL such as `gs://bucket/dir` is already."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def write_text_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed over it, so a
  reader never sees a partial file (gs:// renames are copy + delete)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp"
  tmp.write_text(text)
  tmp.replace(target)
