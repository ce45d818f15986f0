"""The driver command every launcher runs, t5x style, and the checks on it.

`python -m moe_jax.{train,eval,infer} --gin_file=F ... --gin_search_paths=P
--gin.MODEL_DIR='gs://b/run' --gin.NAME=VALUE ...`: the same argv on every
host; the driver initializes jax.distributed itself, saves a checkpoint on
SIGTERM and resumes from the latest checkpoint in MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from launch import mesh
from launch.errors import LaunchError

DRIVERS = ("train", "eval", "infer")
# Environment variables of the driver's explicit jax.distributed mode (GPU
# clusters); TPU VMs need none, the driver reads the TPU metadata.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
COORDINATOR_PORT = 8476  # jax's own default coordinator port

_OVERRIDE = re.compile(r"--gin\.([A-Za-z_][A-Za-z0-9_./]*)=(.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class DriverRun:
  driver: str  # one of DRIVERS
  gin_files: tuple[str, ...]
  gin_search_paths: str
  model_dir: str
  overrides: tuple[tuple[str, str], ...]  # (NAME, VALUE) in the order given

  def argv(self, python: str = "python3") -> list[str]:
    return [
        python, "-m", f"moe_jax.{self.driver}",
        *(f"--gin_file={f}" for f in self.gin_files),
        f"--gin_search_paths={self.gin_search_paths}",
        f"--gin.MODEL_DIR='{self.model_dir}'",
        *(f"--gin.{name}={value}" for name, value in self.overrides),
    ]

  def override(self, name: str) -> str | None:
    values = [v for n, v in self.overrides if n == name]
    return values[-1] if values else None

  def check_mesh(self, devices: int, where: str) -> None:
    text = self.override("MESH_SHAPE")
    if text is not None:
      mesh.check_fits(mesh.parse(text), devices, where)

  @property
  def bucket(self) -> str | None:
    if self.model_dir.startswith("gs://"):
      return self.model_dir.split("/")[2]
    return None


def pip_install(extra: str) -> list[str]:
  """Installs the project (cwd) with an extra such as tpu or gpu.

  --use-pep517: an isolated build gets a current setuptools; the stock one of
  a TPU VM image predates the recursive package_data globs in setup.py.
  """
  return ["python3", "-m", "pip", "install", "--quiet", "--use-pep517",
          f".[{extra}]"]


def parse_overrides(extras: Sequence[str]) -> tuple[tuple[str, str], ...]:
  """Turns the flags argparse did not know into gin bindings, or refuses."""
  overrides = []
  for arg in extras:
    match = _OVERRIDE.fullmatch(arg)
    if not match:
      raise LaunchError(
          f"unknown flag {arg!r}",
          "see --help; driver settings go in as --gin.NAME=VALUE")
    name, value = match.groups()
    if name == "MODEL_DIR":
      raise LaunchError("--gin.MODEL_DIR is set by the launcher",
                        "pass --model_dir gs://BUCKET/PATH instead")
    overrides.append((name, value))
  return tuple(overrides)


def check_model_dir(model_dir: str | None, hosts: int, where: str,
                    spot: bool, shared_fs: bool = False) -> str:
  """Returns model_dir if every host can write it and a preemption keeps it."""
  if not model_dir:
    raise LaunchError("missing --model_dir",
                      "pass --model_dir gs://BUCKET/PATH for checkpoints")
  if "'" in model_dir:
    raise LaunchError(f"--model_dir {model_dir!r} contains a quote",
                      "use a path without quotes")
  if model_dir.startswith("gs://"):
    if len(model_dir.split("/")) < 3 or not model_dir.split("/")[2]:
      raise LaunchError(f"--model_dir {model_dir} names no bucket",
                        "write it as gs://BUCKET/PATH")
    return model_dir
  if hosts > 1 and not shared_fs:
    raise LaunchError(
        f"--model_dir {model_dir} is local, but the {hosts} hosts of {where} "
        "must write one checkpoint",
        "use --model_dir gs://BUCKET/PATH")
  if hosts > 1 and not model_dir.startswith("/"):
    raise LaunchError(f"--model_dir {model_dir} is relative",
                      "give an absolute path on the shared filesystem")
  if spot:
    raise LaunchError(
        f"--model_dir {model_dir} is local, and a preempted spot VM "
        "takes its disk (and every checkpoint) with it",
        "use --model_dir gs://BUCKET/PATH")
  return model_dir


def check_gin_files(gin_files: Sequence[str], search_paths: str,
                    root: Path) -> None:
  """The code ships as the repository, so repo-relative gin files must exist."""
  if not gin_files:
    raise LaunchError("no --gin_file given",
                      "pass e.g. --gin_file=gin/models/flan_switch_base.gin")
  if search_paths != ".":
    return  # other search paths may hold them; the driver will say
  for name in gin_files:
    if not Path(name).is_absolute() and not (root / name).is_file():
      raise LaunchError(f"--gin_file {name} is not in the repository",
                        "give a path relative to the repository root")
