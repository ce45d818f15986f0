"""moe-jax: sparse Mixture-of-Experts encoder-decoder models in JAX/Flax."""

__version__ = "0.1.0"
