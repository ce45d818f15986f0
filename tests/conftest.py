"""Test session setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The static rule picks MoE strategies (moe_jax.tuning): results must not depend on
# timings, tests must not pay for measurements or write the user's cache.
# Subprocesses inherit it.
os.environ.setdefault("MOE_JAX_TUNING", "static")
