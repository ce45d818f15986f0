"""Cloud TPU slice shapes: the table behind host counts and mesh validation.

Facts per generation (Cloud TPU docs "TPU versions" / "TPU software versions",
and the same shapes in xpk's system_characteristics.py):
- accelerator type strings: v4-N and v5p-N count TensorCores (2 per chip);
  v5litepod-N and v6e-N count chips.
- one JAX device per chip on all four generations (v4/v5p megacore).
- multi-host slices have 4 chips per TPU VM; single-host v5e/v6e slices hold
  up to 8 chips on one VM.
- runtime (software) versions for JAX: tpu-ubuntu2204-base (v4),
  v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).
"""

from __future__ import annotations

import dataclasses

from launch.errors import LaunchError


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # what users call it: v4, v5e, v5p, v6e
  type_prefix: str  # accelerator-type prefix gcloud, xpk and SkyPilot use
  cores_per_chip: int  # the accelerator type's number counts cores
  max_single_host_chips: int
  runtime_version: str
  sizes: tuple[int, ...]  # the accelerator-type numbers Cloud TPU offers


GENERATIONS = (
    Generation("v4", "v4", 2, 4, "tpu-ubuntu2204-base",
               (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    Generation("v5e", "v5litepod", 1, 8, "v2-alpha-tpuv5-lite",
               (1, 4, 8, 16, 32, 64, 128, 256)),
    Generation("v5p", "v5p", 2, 4, "v2-alpha-tpuv5",
               (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288)),
    Generation("v6e", "v6e", 1, 8, "v2-alpha-tpuv6e",
               (1, 4, 8, 16, 32, 64, 128, 256)),
)
_CHIPS_PER_MULTI_HOST_VM = 4


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  generation: Generation
  accelerator_type: str  # e.g. v4-64, v5litepod-256 (gcloud, xpk)
  chips: int  # == JAX devices

  @property
  def hosts(self) -> int:
    """TPU VMs (gcloud "workers") in the slice; one driver process each."""
    if self.chips <= self.generation.max_single_host_chips:
      return 1
    return self.chips // _CHIPS_PER_MULTI_HOST_VM

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def skypilot_accelerator(self) -> str:
    return f"tpu-{self.accelerator_type}"


def resolve(tpu_type: str) -> TpuSlice:
  """Maps v4-64, v5litepod-256 (or its alias v5e-256), v6e-16, ... to a slice."""
  prefix, _, number = tpu_type.strip().lower().rpartition("-")
  for gen in GENERATIONS:
    if prefix in (gen.type_prefix, gen.name) and number.isdigit():
      size = int(number)
      if size in gen.sizes:
        return TpuSlice(gen, f"{gen.type_prefix}-{size}",
                        size // gen.cores_per_chip)
  raise LaunchError(
      f"unknown --tpu_type {tpu_type!r}",
      "use one of " + ", ".join(
          f"{g.type_prefix}-{{{','.join(map(str, g.sizes))}}}"
          for g in GENERATIONS) + " (v5e-N means v5litepod-N)")
