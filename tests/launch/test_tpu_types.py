import pytest

from launch import tpu_types
from launch.errors import LaunchError


@pytest.mark.parametrize("name, accelerator, chips, hosts, runtime", [
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-64", "v4-64", 32, 8, "tpu-ubuntu2204-base"),
    ("v4-4096", "v4-4096", 2048, 512, "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5e-256", "v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("V5E-256", "v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-128", "v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_resolve(name, accelerator, chips, hosts, runtime):
  tpu = tpu_types.resolve(name)
  assert (tpu.accelerator_type, tpu.chips, tpu.hosts) == (accelerator, chips, hosts)
  assert tpu.generation.runtime_version == runtime
  assert tpu.chips_per_host * tpu.hosts == tpu.chips
  assert tpu.skypilot_accelerator == f"tpu-{accelerator}"


def test_multi_host_slices_have_four_chips_per_host():
  for gen in tpu_types.GENERATIONS:
    for size in gen.sizes:
      tpu = tpu_types.resolve(f"{gen.type_prefix}-{size}")
      assert tpu.chips_per_host == (4 if tpu.hosts > 1 else tpu.chips)


@pytest.mark.parametrize("name", ["v4-63", "v4-4", "v3-8", "v5e", "tpu-v4-64",
                                  "v6e-512", "v5litepod-2", ""])
def test_unknown_type(name):
  with pytest.raises(LaunchError, match="unknown --tpu_type") as e:
    tpu_types.resolve(name)
  assert "v4-{8,16,32,64" in e.value.fix and "v5e-N" in e.value.fix
