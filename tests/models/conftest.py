"""Shared tiny models and batches for the model tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import moe
from moe_jax.layers import routing
from moe_jax.models import transformer

VOCAB = 32


def make_moe_factory(num_experts=4, k=2, **kwargs):
  """An MoE layer factory with capacity large enough that no token drops.

  Each call builds a fresh router (one router instance shared by several
  layers would share its weights, see `transformer`'s module docstring).
  """
  defaults = dict(num_experts=num_experts, expert_mlp_dim=24,
                  train_capacity_factor=float(num_experts), eval_capacity_factor=float(num_experts),
                  max_group_size=256)
  defaults.update(kwargs)

  def factory(**names):
    router = routing.TokensChooseRouter(num_selected_experts=k)
    return moe.MoeLayer(router=router, **defaults, **names)

  return factory


def make_module(*, encoder_sparse_mlp=None, decoder_sparse_mlp=None, **overrides):
  """A 2+2-layer, width-16 encoder-decoder; `overrides` are config fields."""
  fields = dict(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                num_encoder_layers=2, num_decoder_layers=2, dtype=jnp.float32)
  fields.update(overrides)
  return transformer.EncoderDecoder(
      config=transformer.TransformerConfig(**fields),
      encoder_sparse_mlp=encoder_sparse_mlp, decoder_sparse_mlp=decoder_sparse_mlp)


def make_sparse_module(**overrides):
  fields = dict(num_encoder_sparse_layers=1, num_decoder_sparse_layers=1,
                encoder_sparse_mlp=make_moe_factory(), decoder_sparse_mlp=make_moe_factory())
  fields.update(overrides)
  return make_module(**fields)


@pytest.fixture
def batch():
  """Two unpacked examples with padding (EOS = 1 ends each target)."""
  return dict(
      encoder_input_tokens=jnp.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0]], jnp.int32),
      decoder_input_tokens=jnp.array([[0, 11, 12, 13, 0], [0, 14, 0, 0, 0]], jnp.int32),
      decoder_target_tokens=jnp.array([[11, 12, 13, 1, 0], [14, 1, 0, 0, 0]], jnp.int32),
  )


def random_variables(module, batch, seed=0, scale=0.3):
  """Variables of `module` with numpy-random values (no compiled init).

  Shapes and `params_axes` come from `jax.eval_shape` of `module.init`; norm
  scales are drawn around 1, everything else around 0.
  """
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                          enable_dropout=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    values = rng.normal(0.0, scale, leaf.shape)
    if getattr(path[-1], "key", None) == "scale":
      values += 1.0
    return jnp.asarray(values, leaf.dtype)

  variables = dict(shapes)
  variables["params"] = jax.tree_util.tree_map_with_path(fill, shapes["params"])
  return variables


def jit_apply(module, **kwargs):
  """`module.apply` jitted with keyword-only settings (e.g. enable_dropout)."""
  kwargs.setdefault("enable_dropout", False)
  return jax.jit(functools.partial(module.apply, **kwargs))
