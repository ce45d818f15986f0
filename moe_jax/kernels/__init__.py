"""Compiled kernels (XLA FFI custom calls) used by moe_jax.layers."""
