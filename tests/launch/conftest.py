"""Helpers for the launcher tests: run a CLI in-process, nothing external."""

import subprocess
import tempfile

import pytest

from launch import cli, gpu, tpu

STAGING = "/staging"  # where `run` writes the code archive (never touched dry)


@pytest.fixture
def no_subprocess(monkeypatch):
  """Fails the test if anything tries to start a process."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"a command ran: {args}")
  monkeypatch.setattr(subprocess, "run", refuse)
  monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture
def launch_cli(no_subprocess, monkeypatch, capsys):
  """Runs launch/tpu.py or launch/gpu.py; returns (exit code, stdout, stderr)."""
  monkeypatch.setattr(tempfile, "tempdir", STAGING)

  def invoke(script: str, *argv: str):
    entry = {"tpu": tpu.main, "gpu": gpu.main}[script]
    code = cli.main(entry, list(argv))
    out, err = capsys.readouterr()
    return code, out, err

  return invoke
