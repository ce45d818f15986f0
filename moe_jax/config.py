"""Gin loading: the one way every moe_jax entry point reads its configuration.

t5x's conventions: gin files (repeatable, `include`s resolved against search
paths), bindings such as `MODEL_DIR = '/tmp/run'` (the `--gin.MODEL_DIR=...`
flags), ALL_CAPS macros, and `MODEL` naming the model object. The model's
hyperparameters themselves live in `transformer.TransformerConfig`.

Search paths: the working directory and the repository root (so
`include 'gin/models/architectures/moe.gin'` works from anywhere in a
checkout), plus any the caller adds.
"""

import inspect
import os
import re
from typing import Any, List, Sequence

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GinError(ValueError):
  """A gin file or binding that cannot be used, with what to change."""


def search_paths(extra: Sequence[str] = ()) -> List[str]:
  """Where gin files and includes are looked up, in order."""
  paths = []
  for path in (*extra, os.getcwd(), REPO_ROOT):
    if path and path not in paths:
      paths.append(path)
  return paths


def _resolve(gin_file: str, paths: Sequence[str]) -> str:
  if os.path.isabs(gin_file) or os.path.isfile(gin_file):
    if not os.path.isfile(gin_file):
      raise FileNotFoundError(f"gin file {gin_file!r} does not exist.")
    return gin_file
  for root in paths:
    candidate = os.path.join(root, gin_file)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"gin file {gin_file!r} was not found in the search paths "
                 f"{list(paths)}; give its path or add its directory with "
                 "--gin_search_paths.")


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          gin_search_paths: Sequence[str] = (), *, finalize: bool = False) -> None:
  """Replaces the global gin configuration with these files and bindings.

  The configuration is cleared first (so loading twice in one process gives
  the second configuration). `finalize` locks it, as t5x's entry points do,
  which also checks that every `MACRO = %gin.REQUIRED` was set.

  Raises:
    FileNotFoundError: a gin file is missing.
    GinError: a binding or file gin rejects (unknown configurable or
      parameter, syntax error), with gin's reason.
  """
  paths = search_paths(gin_search_paths)
  files = [_resolve(f, paths) for f in gin_files]
  gin.clear_config()
  for path in paths:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False)
  except (ValueError, SyntaxError, IOError, ImportError, NameError) as e:
    # gin's message names the binding and where it came from.
    reason = " ".join(str(e).split()).rstrip(".")
    raise GinError(f"bad gin configuration: {reason}. Fix that file or binding "
                   "(`--gin.NAME=VALUE` / `--gin_bindings`).") from e
  if finalize:
    try:
      gin.finalize()
    except ValueError as e:
      required = re.match(r"(\w+)/macro\.value set to `%gin.REQUIRED`", str(e))
      if required is None:
        raise GinError(f"bad gin configuration: {e}") from e
      name = required.group(1)
      raise GinError(f"{name} is required: set it in a gin file or pass "
                     f"--gin.{name}=... (strings quoted: --gin.{name}=\"'value'\").") from None


def query(name: str) -> Any:
  """The value bound to macro `name` (e.g. 'MODEL_DIR'), resolving references.

  Raises:
    GinError: when nothing binds it.
  """
  try:
    value = gin.query_parameter(f"%{name}")
  except ValueError:
    raise GinError(f"{name} is not bound: set it in a gin file or pass "
                   f"--gin.{name}=...") from None
  if isinstance(value, gin.config.ConfigurableReference):
    # `@fn()` is called; `@fn` is the callable itself.
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def load_model(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
               gin_search_paths: Sequence[str] = ()) -> Any:
  """Parses gin (see `parse`) and builds the object bound to `MODEL`."""
  parse(gin_files, gin_bindings, gin_search_paths)
  try:
    return query("MODEL")
  except GinError:
    raise GinError(f"The gin files {list(gin_files)} do not define MODEL; include a "
                   "model config such as gin/models/tiny_moe.gin (which sets "
                   "`MODEL = @model.EncoderDecoderModel()`).") from None


def call_configured(fn: Any, run_file_hint: str) -> Any:
  """Calls `fn` with its gin bindings, after checking every required one is bound.

  Args:
    fn: a function whose keyword arguments gin binds (e.g. `loop.train`).
    run_file_hint: the run file that binds them, for the error message.

  Raises:
    GinError: naming the first required argument no gin file binds.
  """
  name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
  try:
    configurable = gin.get_configurable(fn)
  except ValueError:
    raise GinError(f"No gin file configures {name}: include a run file such as "
                   f"{run_file_hint} after the model gin.") from None
  for parameter in inspect.signature(fn).parameters.values():
    if parameter.default is not inspect.Parameter.empty:
      continue
    try:
      gin.query_parameter(f"{name}.{parameter.name}")
    except ValueError:
      raise GinError(f"{name}.{parameter.name} is not bound: include a run file such as "
                     f"{run_file_hint}, or bind it (--gin.{name}.{parameter.name}=...).") from None
  return configurable()
