"""Launchers for moe-jax runs: Cloud TPU VMs (gcloud), SkyPilot, xpk (GKE) and SLURM.

Pure standard-library Python: nothing here imports jax or moe_jax, so a laptop
with only `python3`, `git` and the cloud CLIs can drive a run. Entry points:
`python launch/tpu.py` and `python launch/gpu.py`; see launch/README.md.
"""
