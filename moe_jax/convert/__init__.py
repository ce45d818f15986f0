"""Checkpoint conversion between moe_jax and other frameworks (Hugging Face)."""
