"""The scripts as users start them, in a fresh interpreter."""

import subprocess
import sys

import pytest

from launch.cli import REPO_ROOT

ARGS = ["create", "--name", "a", "--tpu_type", "v4-8", "--zone",
        "us-central2-b", "--project", "p", "--dry_run"]
EXPECTED = ("gcloud compute tpus tpu-vm create a --zone=us-central2-b "
            "--project=p --accelerator-type=v4-8 --version=tpu-ubuntu2204-base\n")


@pytest.mark.parametrize("launcher", [["launch/tpu.py"], ["-m", "launch.tpu"]])
def test_tpu_script_runs_from_the_repository_root(launcher):
  done = subprocess.run([sys.executable, *launcher, *ARGS], cwd=REPO_ROOT,
                        capture_output=True, text=True, check=True)
  assert done.stdout == EXPECTED


def test_gpu_script_reports_errors_in_one_line():
  done = subprocess.run([sys.executable, "launch/gpu.py", "--emit", "slurm"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
  assert done.returncode == 2
  assert done.stderr == "error: missing --name; pass --name NAME (lowercase " \
      "letters, digits and dashes, starting with a letter)\n"


def test_launch_imports_no_training_code():
  code = ("import sys, pkgutil, importlib, launch\n"
          "for m in pkgutil.iter_modules(launch.__path__):\n"
          "  importlib.import_module('launch.' + m.name)\n"
          "heavy = {'jax', 'moe_jax', 'moe_jax_tasks', 'flax', 'tensorflow',"
          " 'numpy', 'yaml'}\n"
          "print(sorted(heavy & {n.split('.')[0] for n in sys.modules}))")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                        capture_output=True, text=True, check=True)
  assert done.stdout == "[]\n"
