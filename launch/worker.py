"""Shell commands that run on every TPU VM (sent with gcloud ssh --command)."""

from __future__ import annotations

from collections.abc import Sequence

from launch import driver, shell

ARCHIVE = "moe-jax.tar.gz"  # scp'd into each worker's home directory
CODE_DIR = "~/moe-jax"
RUN_DIR = "~/moe-jax-run"
LOG = f"{RUN_DIR}/driver.log"
_PID = f"{RUN_DIR}/pid"


def install(extra: str) -> str:
  """Unpacks the shipped commit and pip-installs it with `extra`.

  Refuses while a driver still runs here: reinstalling would swap its code
  and fight it for the TPU.
  """
  return (f"if pgrep -F {_PID} > /dev/null 2>&1; then echo refusing to "
          "reinstall: a driver still runs here, stop it with launch/tpu.py "
          "stop >&2; exit 3; fi; " + " && ".join([
              f"rm -rf {CODE_DIR}",
              f"mkdir -p {CODE_DIR}",
              f"tar -xzf ~/{ARCHIVE} -C {CODE_DIR}",
              f"cd {CODE_DIR}",
              shell.join(driver.pip_install(extra)),
          ]))


def start(driver_argv: Sequence[str]) -> str:
  """Starts the driver in the background and returns at once, with no exit
  code of an earlier run left for the supervisor to read.

  The ( ... &) subshell matters: a bare `cd X && cmd > /dev/null &` would
  background the whole list, holding ssh's stdout open until the driver ends.
  """
  return (f"mkdir -p {RUN_DIR} && rm -f {RUN_DIR}/exit_code && cd {CODE_DIR} "
          f"&& (setsid nohup bash launch/worker_run.sh {RUN_DIR} "
          f"{shell.join(driver_argv)} > /dev/null 2>&1 < /dev/null &)")


def stop() -> str:
  """SIGTERM to the driver: it saves a checkpoint and exits 0."""
  return f"pkill -TERM -F {_PID} 2>/dev/null || true"


def exit_code() -> str:
  """Prints the driver's exit code once it has exited, nothing before."""
  return f"cat {RUN_DIR}/exit_code 2>/dev/null || true"


def follow_log() -> str:
  return f"tail -n +1 -F {LOG}"
