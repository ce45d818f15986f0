import io
import sys

import pytest

from launch.errors import CommandFailed, LaunchError
from launch.runner import Runner


def test_dry_run_prints_and_records_without_running():
  out = io.StringIO()
  runner = Runner(dry_run=True, stdout=out)
  runner.run(["definitely-not-a-command", "a b"])
  assert runner.capture(["also-not", "x"]) == ""
  runner.note("hello")
  assert out.getvalue() == ("definitely-not-a-command 'a b'\nalso-not x\n"
                            "# hello\n")
  assert runner.history == [["definitely-not-a-command", "a b"],
                            ["also-not", "x"]]


def test_runs_and_captures():
  err = io.StringIO()
  runner = Runner(dry_run=False, echo=True, stderr=err)
  runner.run([sys.executable, "-c", "pass"])
  assert runner.capture([sys.executable, "-c", "print(' hi ')"]) == "hi"
  assert err.getvalue().startswith("+ ")
  runner.note("to stderr")
  assert err.getvalue().endswith("to stderr\n")


def test_failures():
  runner = Runner(dry_run=False)
  with pytest.raises(CommandFailed, match="exited with 3"):
    runner.run([sys.executable, "-c", "raise SystemExit(3)"])
  with pytest.raises(CommandFailed, match="exited with 1: last line"):
    runner.capture([sys.executable, "-c",
                    "import sys; sys.stderr.write('x\\nlast line\\n'); "
                    "sys.exit(1)"])


@pytest.mark.parametrize("call", ["run", "capture"])
def test_missing_tool_says_how_to_get_it(monkeypatch, tmp_path, call):
  monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
  with pytest.raises(LaunchError, match="`gcloud` is not on PATH") as e:
    getattr(Runner(dry_run=False), call)(["gcloud", "version"])
  assert "gcloud auth login" in e.value.fix
