"""Multi-process start-up: `jax.distributed` when the environment says so.

A run is multi-process when either
  * the environment names a coordinator explicitly: `JAX_COORDINATOR_ADDRESS`
    (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
    (what launch/'s SLURM and SkyPilot GPU files export); or
  * a cluster JAX recognizes by itself describes several processes: a
    multi-host Cloud TPU slice (TPU VM metadata), SLURM (`SLURM_NTASKS` > 1),
    Open MPI (`OMPI_COMM_WORLD_SIZE` > 1).
Otherwise the run is one process and nothing is initialized.
"""

import os

import jax

_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _int_env(name: str) -> int:
  value = os.environ.get(name)
  if value is None:
    raise ValueError(f"JAX_COORDINATOR_ADDRESS is set, so {name} must be too "
                     "(the number of processes and this process's index).")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _multi_host_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize() -> bool:
  """Initializes `jax.distributed` for multi-process runs (see module docstring).

  Must run before anything touches a JAX device.

  Returns:
    Whether `jax.distributed` was initialized.
  """
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  cluster = _multi_host_tpu() or any(
      int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARIABLES)
  if not coordinator and not cluster:
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms.split(",")[0] == "cpu":
    # Cross-process collectives on the CPU backend need an implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=_int_env("JAX_NUM_PROCESSES"),
                               process_id=_int_env("JAX_PROCESS_ID"))
  else:
    jax.distributed.initialize()
  return True
