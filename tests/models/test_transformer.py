"""Tests for the encoder-decoder module: tree, masks, packing, layouts, scan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import transformer
from tests.models import conftest

make_module = conftest.make_module
make_sparse_module = conftest.make_sparse_module


init = conftest.random_variables


def logits_of(module, variables, batch, **kwargs):
  return conftest.jit_apply(module, **kwargs)(
      variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"])


def flat_shapes(tree):
  return {"/".join(str(p.key) for p in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_tree_follows_the_contract(batch):
  module = make_sparse_module(extra_mlp=True, num_encoder_layers=2, num_decoder_layers=2)
  variables = init(module, batch)
  shapes = flat_shapes(variables["params"])
  expected = {
      "token_embedder/embedding": (32, 16),
      "encoder/relpos_bias/rel_embedding": (2, 32),
      "encoder/layers_0/pre_attention_layer_norm/scale": (16,),
      "encoder/layers_0/attention/query/kernel": (16, 2, 8),
      "encoder/layers_0/attention/out/kernel": (2, 8, 16),
      "encoder/layers_0/mlp/wi_0": (16, 32),
      "encoder/layers_0/mlp/wo": (32, 16),
      "encoder/layers_1/mlp/router/w": (16, 4),
      "encoder/layers_1/mlp/expert/wi_0": (4, 16, 24),
      "encoder/layers_1/pre_extra_mlp_layer_norm/scale": (16,),
      "encoder/layers_1/extra_mlp/wi_1": (16, 32),
      "encoder/encoder_norm/scale": (16,),
      "decoder/relpos_bias/rel_embedding": (2, 32),
      "decoder/layers_0/pre_self_attention_layer_norm/scale": (16,),
      "decoder/layers_0/self_attention/key/kernel": (16, 2, 8),
      "decoder/layers_0/pre_cross_attention_layer_norm/scale": (16,),
      "decoder/layers_0/encoder_decoder_attention/value/kernel": (16, 2, 8),
      "decoder/layers_1/mlp/expert/wo": (4, 24, 16),
      "decoder/decoder_norm/scale": (16,),
      "decoder/logits_dense/kernel": (16, 32),
  }
  for name, shape in expected.items():
    assert shapes.get(name) == shape, name
  assert not any("bias" in name and "relpos" not in name for name in shapes)
  assert "extra_mlp" not in "".join(n for n in shapes if "layers_0" in n)
  # Every parameter has logical axes (t5x's params_axes collection).
  axes = flat_shapes(jax.tree.map(lambda a: np.zeros(len(a.names)), variables["params_axes"],
                                  is_leaf=lambda x: hasattr(x, "names")))
  assert {n[:-len("_axes")] for n in axes} == set(shapes)


def test_tied_logits_use_scaled_embedding(batch):
  module = make_module(logits_via_embedding=True)
  variables = init(module, batch)
  assert "logits_dense" not in variables["params"]["decoder"]
  # Recompute the logits from the decoder's final hidden states by hand.
  logits, state = jax.jit(lambda v: module.apply(
      v, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=False,
      capture_intermediates=lambda m, _: m.name == "decoder_norm",
      mutable=["intermediates"]))(variables)
  hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
  table = variables["params"]["token_embedder"]["embedding"]
  expected = hidden @ table.T / np.sqrt(16)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal(batch):
  module = make_module()
  variables = init(module, batch)
  base = logits_of(module, variables, batch)
  changed = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"].at[0, 3].set(20),
                 decoder_target_tokens=batch["decoder_target_tokens"].at[0, 3].set(20))
  moved = logits_of(module, variables, changed)
  np.testing.assert_allclose(moved[0, :3], base[0, :3], atol=1e-6)
  assert not np.allclose(moved[0, 3], base[0, 3])


@pytest.mark.parametrize("sparse", [False, True])
def test_packed_examples_do_not_attend_across_segments(batch, sparse):
  """Packing two examples in one row gives each the logits it has alone."""
  module = make_sparse_module() if sparse else make_module()
  variables = init(module, batch)
  alone = logits_of(module, variables, batch)
  enc = jnp.array([[5, 6, 7, 8, 1, 9, 10, 1]], jnp.int32)
  dec_in = jnp.array([[0, 11, 12, 13, 0, 14]], jnp.int32)
  dec_tgt = jnp.array([[11, 12, 13, 1, 14, 1]], jnp.int32)
  packed = conftest.jit_apply(module)(
      variables, enc, dec_in, dec_tgt,
      encoder_segment_ids=jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]]),
      decoder_segment_ids=jnp.array([[1, 1, 1, 1, 2, 2]]),
      encoder_positions=jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]]),
      decoder_positions=jnp.array([[0, 1, 2, 3, 0, 1]]))
  np.testing.assert_allclose(packed[0, :4], alone[0, :4], atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:], alone[1, :2], atol=1e-5)


@pytest.mark.parametrize("num_layers, num_sparse, layout, expected", [
    (12, 3, "mixed", (3, 7, 11)),          # the reference's test case
    (12, 2, "middle", (5, 6)),             # the reference's test case
    (12, 6, transformer.LayerLayout.MIXED, (1, 3, 5, 7, 9, 11)),   # Switch: every other
    (24, 6, "MIXED", (3, 7, 11, 15, 19, 23)),                      # ST-MoE: every 4th
    (8, 3, "bottom", (0, 1, 2)),
    (8, 3, "top", (5, 6, 7)),
    (5, 2, "middle", (2, 3)),
    (4, 4, "mixed", (0, 1, 2, 3)),
    (4, 0, "top", ()),
])
def test_sparse_layer_indices(num_layers, num_sparse, layout, expected):
  assert transformer.sparse_layer_indices(num_layers, num_sparse, layout) == expected


@pytest.mark.parametrize("num_sparse, layout, message", [
    (3, "diagonal", "Unknown sparse layout 'diagonal'"),
    (5, "mixed", "must divide num_layers=12"),
    (13, "top", r"must lie in \[0, 12\]"),
])
def test_bad_layouts_raise_clear_errors(num_sparse, layout, message):
  with pytest.raises(ValueError, match=message):
    transformer.sparse_layer_indices(12, num_sparse, layout)


def test_sparse_layers_land_where_the_layout_says(batch):
  module = make_sparse_module(num_encoder_layers=4, num_decoder_layers=4,
                              num_encoder_sparse_layers=2, encoder_sparse_layout="bottom",
                              num_decoder_sparse_layers=1, decoder_sparse_layout="top")
  params = init(module, batch)["params"]
  sparse = {stack: [i for i in range(4) if "router" in params[stack][f"layers_{i}"]["mlp"]]
            for stack in ("encoder", "decoder")}
  assert sparse == {"encoder": [0, 1], "decoder": [3]}


def test_module_validation_errors(batch):
  with pytest.raises(ValueError, match="no sparse_mlp factory"):
    init(make_module(num_encoder_sparse_layers=1), batch)
  with pytest.raises(ValueError, match="periodic sparse layout"):
    init(make_sparse_module(scan_layers=True, encoder_sparse_layout="bottom"), batch)
  with pytest.raises(ValueError, match="Unknown remat_policy"):
    init(make_module(remat_policy="sometimes"), batch)


def _stack_layers(params, stack, names, period):
  """Unscanned `layers_{i}` -> scanned `layers[/subblock_j]` with a leading axis."""
  layers = [params[stack].pop(name) for name in names]
  if period == 1:
    params[stack]["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  else:
    params[stack]["layers"] = {
        f"subblock_{j}": jax.tree.map(lambda *xs: jnp.stack(xs), *layers[j::period])
        for j in range(period)}
  return params


@pytest.mark.parametrize("sparse, remat", [(False, "none"), (True, "full")])
def test_scanned_layers_compute_the_same_function(batch, sparse, remat):
  build = make_sparse_module if sparse else make_module
  module = build(num_encoder_layers=4, num_decoder_layers=4,
                 **({"num_encoder_sparse_layers": 2, "num_decoder_sparse_layers": 2}
                    if sparse else {}))
  variables = init(module, batch)
  expected = logits_of(module, variables, batch)
  scanned = module.clone(config=dataclasses.replace(module.config, scan_layers=True,
                                                     remat_policy=remat))
  period = 2 if sparse else 1
  params = jax.tree.map(lambda x: x, variables["params"])
  for stack in ("encoder", "decoder"):
    _stack_layers(params, stack, [f"layers_{i}" for i in range(4)], period)
  reference_shapes = jax.tree.map(jnp.shape, init(scanned, batch)["params"])
  assert jax.tree.map(jnp.shape, params) == reference_shapes
  np.testing.assert_allclose(logits_of(scanned, {"params": params}, batch), expected,
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_keep_float32_params_and_logits(batch):
  module = make_module(dtype=jnp.bfloat16)
  variables = init(module, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
  logits = logits_of(module, variables, batch)
  assert logits.dtype == jnp.float32
  full = logits_of(make_module(), variables, batch)
  np.testing.assert_allclose(logits, full, atol=0.3)


def test_dropout_only_in_training(batch):
  module = make_module(dropout_rate=0.5)
  variables = init(module, batch)
  eval_a = logits_of(module, variables, batch)
  train = conftest.jit_apply(module, enable_dropout=True)(
      variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], rngs={"dropout": jax.random.key(1, impl="rbg")})
  assert not np.allclose(train, eval_a)
