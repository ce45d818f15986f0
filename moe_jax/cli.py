"""What every moe_jax command line shares: quiet start-up and one-line errors.

* Quiet by default: TensorFlow and XLA print C++ start-up notices (oneDNN,
  CUDA stubs) straight to file descriptor 2 when their native libraries load,
  before any Python logging setting applies. While quiet, the import of those
  packages runs with descriptor 2 pointed at /dev/null; Python warnings and
  errors are unaffected. `--verbose` keeps everything.
* Errors we anticipate (a bad flag value, a missing file, a bad gin binding,
  a shape mismatch) print `prog: message` (one line, plus one pointing to
  `--debug` when the message has details) and exit 2; `--debug` shows the
  traceback instead.
"""

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from typing import Callable, Iterator, Optional, Sequence

EXIT_ERROR = 2
# Exceptions that mean "the input is wrong", not "moe_jax is broken".
ANTICIPATED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                      PermissionError, KeyError, ImportError, FloatingPointError)
# Packages whose native libraries print at load time.
_NOISY_PACKAGES = ("tensorflow",)
_NOISY_LOGGERS = ("absl", "jax", "jax._src.xla_bridge", "orbax", "tensorflow",
                  "tensorstore")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
  """Points file descriptor 2 at /dev/null (C/C++ writes), then restores it."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
  """Runs another loader's `exec_module` with native stderr silenced."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    with _native_stderr_silenced():
      self._loader.exec_module(module)


class _QuietImportFinder(importlib.abc.MetaPathFinder):
  """Silences the first import of the noisy top-level packages."""

  def find_spec(self, name, path, target=None):
    if name not in _NOISY_PACKAGES:
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


def quiet_startup() -> None:
  """Silences native start-up notices and library INFO logs for this process."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if not any(isinstance(f, _QuietImportFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietImportFinder())
  for name in _NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.ERROR)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is at the time of each record."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value  # Always the current sys.stderr.


@contextlib.contextmanager
def plain_logs() -> Iterator[None]:
  """While a command runs, our own log lines print as their message alone (each
  names its module), not as `WARNING:moe_jax.x:...` when a library has set up
  root logging."""
  package = logging.getLogger("moe_jax")
  handler, propagate = _StderrHandler(), package.propagate
  handler.setFormatter(logging.Formatter("%(message)s"))
  package.addHandler(handler)
  package.propagate = False
  try:
    yield
  finally:
    package.removeHandler(handler)
    package.propagate = propagate


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  """t5x's gin flags: `--gin_file` (repeatable), `--gin_search_paths`, and
  bindings as `--gin.NAME=VALUE` (or `--gin_bindings "NAME = VALUE"`)."""
  parser.add_argument("--gin_file", action="append", required=True,
                      help="gin file (repeatable; includes resolve against the search paths)")
  parser.add_argument("--gin_search_paths", type=lambda s: [p for p in s.split(",") if p],
                      default=[], help="comma-separated directories for gin files and includes")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding such as \"NUM_EXPERTS = 16\" (repeatable); "
                      "--gin.NUM_EXPERTS=16 does the same")


def _gin_flag_bindings(extra: Sequence[str], parser: argparse.ArgumentParser) -> list:
  """`--gin.NAME=VALUE` (or `--gin.NAME VALUE`) flags -> 'NAME = VALUE' bindings."""
  bindings, i = [], 0
  while i < len(extra):
    flag = extra[i]
    if not flag.startswith("--gin."):
      parser.error(f"unrecognized argument {flag!r}")
    name, sep, value = flag[len("--gin."):].partition("=")
    if not sep:
      if i + 1 == len(extra):
        parser.error(f"{flag} needs a value: {flag}=VALUE")
      i, value = i + 1, extra[i + 1]
    bindings.append(f"{name} = {value}")
    i += 1
  return bindings


def add_output_flags(parser: argparse.ArgumentParser) -> None:
  """`--verbose` and `--debug`, which every moe_jax CLI takes."""
  parser.add_argument("--verbose", action="store_true",
                      help="keep library start-up notices and INFO logs")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error")


def error_lines(prog: str, error: BaseException) -> str:
  """`prog: first line of the message`, plus a pointer when details were cut."""
  message = str(error).strip() or type(error).__name__
  if isinstance(error, KeyError) and len(error.args) == 1:
    message = str(error.args[0])
  # gin appends where a configurable was called; the message itself is enough.
  message = "\n".join(line for line in message.splitlines()
                      if not line.strip().startswith("In call to configurable"))
  first, _, rest = message.partition("\n")
  text = f"{prog}: {first}"
  if rest.strip():
    text += f"\n{prog}: ({len(rest.splitlines())} more lines; rerun with --debug)"
  return text


def run(main: Callable[[argparse.Namespace], Optional[int]],
        parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
  """Parses `argv`, quiets start-up unless `--verbose`, runs `main(args)`.

  Flags `--gin.NAME=VALUE` are appended to `args.gin_bindings` for parsers
  that have gin flags (`add_gin_flags`).

  Args:
    main: the command.
    parser: its flags (with `add_output_flags`).
    argv: the arguments (default: sys.argv[1:]).

  Returns:
    `main`'s exit code (0 if it returns None), or `EXIT_ERROR` after printing
    an anticipated error (re-raised with `--debug`).
  """
  args, extra = parser.parse_known_args(argv)
  if extra:
    if not hasattr(args, "gin_bindings"):
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.gin_bindings += _gin_flag_bindings(extra, parser)
  if not args.verbose:
    quiet_startup()
  try:
    with plain_logs():
      return main(args) or 0
  except ANTICIPATED_ERRORS as error:
    if args.debug:
      raise
    print(error_lines(parser.prog, error), file=sys.stderr)
    return EXIT_ERROR


def run_gin_function(prog: str, doc: str, module: str, function: str, run_file: str,
                     argv: Optional[Sequence[str]] = None) -> int:
  """A gin-driven command: parse t5x's flags, then call `module.function` as gin binds it.

  The module is imported after start-up is quieted (it may load TensorFlow),
  and after `jax.distributed` is initialized for multi-process runs.

  Args:
    prog: the command's name, e.g. 'python -m moe_jax.train'.
    doc: its module docstring (the first paragraph is the description).
    module: e.g. 'moe_jax.training.loop'.
    function: e.g. 'train'.
    run_file: the gin run file that binds it (named in errors).
    argv: the arguments.
  """
  parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
  add_gin_flags(parser)
  add_output_flags(parser)

  def command(args: argparse.Namespace) -> None:
    from moe_jax import config  # pylint: disable=g-import-not-at-top
    from moe_jax.training import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize()  # Before anything touches a device.
    target = getattr(importlib.import_module(module), function)
    config.parse(args.gin_file, args.gin_bindings, args.gin_search_paths, finalize=True)
    config.call_configured(target, run_file)

  return run(command, parser, argv)
