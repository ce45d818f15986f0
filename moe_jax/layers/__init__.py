"""Leaf Flax modules: embeddings, MLPs, attention, routers, dispatch, MoE."""
