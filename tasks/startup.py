"""A quiet start for `python -m moe_jax_tasks`: no TensorFlow/XLA C++ start-up log.

TensorFlow's C++ runtime logs at import (oneDNN notice, CUDA stubs; before absl's
logging is initialized, so no log level hides them) and at its first op (cuInit
failure, CPU feature notes). The command line, unless given --verbose, raises the C++
log threshold and drops the C++ log lines written while TensorFlow is imported.

`python -m` imports the package, and TensorFlow with it, before `__main__` parses
its flags, so the package's `__init__` asks `quiet_command_line` first. Standard
library only: it runs before TensorFlow is imported.
"""

import contextlib
import importlib
import os
import re
import sys
import tempfile
from typing import Iterator

VERBOSE_FLAG = "--verbose"
# An absl/glog line (`I0000 00:00:1796104226.633473    5376 port.cc:153] ...`) or
# absl's notice that such lines go to stderr.
_CPP_LOG_LINE = re.compile(
    r"[IWEF]\d{4} [\d:.]+ +\d+ [^\s\]]+:\d+\] |"
    r"WARNING: All log messages before absl::InitializeLog\(\) is called")


def quiet_command_line(package: str) -> bool:
  """Whether `package` is being imported by `python -m package ...` without --verbose.

  While `python -m` locates its module, `sys.argv[0]` is "-m" and `sys.orig_argv`
  ends with the module name followed by the arguments.
  """
  if sys.argv[:1] != ["-m"] or len(sys.orig_argv) < len(sys.argv):
    return False
  module = sys.orig_argv[-len(sys.argv)].removeprefix("-m")
  return (module in (package, f"{package}.__main__")
          and VERBOSE_FLAG not in sys.argv[1:])


@contextlib.contextmanager
def without_cpp_log_lines() -> Iterator[None]:
  """Drops C++ log lines written to stderr (file descriptor 2) inside the block.

  Anything else written there (Python warnings, tracebacks) is written out after
  the block; a process that dies inside it loses them all (--verbose shows them).
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode("utf-8", "replace").splitlines(True):
        if not _CPP_LOG_LINE.match(line):
          sys.stderr.write(line)
      sys.stderr.flush()


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its C++ log limited to fatal errors."""
  # An explicit TF_CPP_MIN_LOG_LEVEL is the user's choice and stays.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  with without_cpp_log_lines():
    importlib.import_module("tensorflow")
