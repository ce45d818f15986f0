"""Test session setup: 8 fake CPU devices, set before jax is imported anywhere;
a compilation cache for the session; the `fake_bucket` fixture."""

import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The static rule picks MoE strategies (moe_jax.tuning): results must not depend on
# timings, tests must not pay for measurements or write the user's cache.
# Subprocesses inherit it.
os.environ.setdefault("MOE_JAX_TUNING", "static")
# Many tests compile the same programs (the driver tests compile the toy model's
# init and train step, about 5 s each, in many runs and subprocesses): jax's
# persistent compilation cache, one directory for the session, shared by the
# xdist workers and subprocesses, which inherit the environment. jax keeps only
# programs that took over a second to compile, so the directory stays small;
# a size limit turns on jax's file locks, so no process reads an entry another
# is still writing.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_jax_test_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils.epath import gpath  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils.epath import testing as epath_testing  # pylint: disable=g-import-not-at-top,wrong-import-position

# The longest tests (whole training runs in subprocesses) start first, so that
# `-n 2` does not end with one worker busy on one of them and the other idle.
_LONGEST_FIRST = ("tests/training/", "tests/benchmarks/", "tests/test_report.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: not item.nodeid.startswith(_LONGEST_FIRST))


def pytest_unconfigure(config):
  del config
  if _OWN_COMPILATION_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


_BUCKET = "gs://bucket/"
_FUNCTIONS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
              "remove", "rename", "replace", "rmtree", "stat", "walk")


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """`gs://bucket/<p>` is `tmp_path/<p>` for epath (Cloud Storage is out of
  reach in tests); yields tmp_path. Any other bucket fails the test."""
  def local(value):
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(_BUCKET):
      return str(tmp_path / os.fspath(value)[len(_BUCKET):])
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith("gs://"):
      raise AssertionError(f"unexpected bucket in {value}")
    return value

  def redirect(original, *args, **kwargs):
    return original(*map(local, args), **kwargs)

  # With TensorFlow installed epath sends gs:// to TensorFlow, past its own mock.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  with epath_testing.mock_epath(**{name: redirect for name in _FUNCTIONS}):
    yield tmp_path
