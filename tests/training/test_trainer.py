"""Trainer-level behaviour: sharding, freezing, upcycling, non-finite losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import checkpoints
from moe_jax import partitioning
from moe_jax.layers import moe
from moe_jax.layers import routing
from moe_jax.models import model as model_lib
from moe_jax.models import transformer
from moe_jax.training import checkpoint_manager
from moe_jax.training import optimizers
from moe_jax.training import trainer as trainer_lib

VOCAB = 64
SHAPES = {"encoder_input_tokens": (8, 12), "decoder_input_tokens": (8, 8),
          "decoder_target_tokens": (8, 8)}


def _config(**overrides):
  fields = dict(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                num_encoder_layers=2, num_decoder_layers=2, dtype=jnp.float32)
  fields.update(overrides)
  return transformer.TransformerConfig(**fields)


def _moe_factory(num_experts=4, router=None, **kwargs):
  def factory(**names):
    return moe.MoeLayer(
        num_experts=num_experts, expert_mlp_dim=32, max_group_size=64,
        train_capacity_factor=float(num_experts), eval_capacity_factor=float(num_experts),
        router=router() if router else routing.TokensChooseRouter(num_selected_experts=2),
        **kwargs, **names)
  return factory


def _sparse_model(**moe_kwargs):
  module = transformer.EncoderDecoder(
      config=_config(num_encoder_sparse_layers=1, num_decoder_sparse_layers=1),
      encoder_sparse_mlp=_moe_factory(**moe_kwargs),
      decoder_sparse_mlp=_moe_factory(**moe_kwargs))
  return model_lib.EncoderDecoderModel(module, aux_loss_factor=0.01)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, VOCAB, size=SHAPES["encoder_input_tokens"])
  targets = rng.integers(2, VOCAB, size=SHAPES["decoder_target_tokens"])
  decoder_inputs = np.concatenate([np.zeros((8, 1), np.int64), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": jnp.asarray(inputs, jnp.int32),
          "decoder_input_tokens": jnp.asarray(decoder_inputs, jnp.int32),
          "decoder_target_tokens": jnp.asarray(targets, jnp.int32)}


def _trainer(model, mesh_shape=None, freeze=(), learning_rate=1e-2):
  mesh = partitioning.mesh_from_shape(mesh_shape)
  placement = trainer_lib.Placement(model, mesh, partitioning.standard_logical_axis_rules(),
                                    SHAPES)
  factory = optimizers.adafactor(learning_rate)
  return trainer_lib.Trainer(placement, lambda axes: optimizers.build(factory, axes,
                                                                      freeze=freeze))


def test_experts_are_sharded_over_the_expert_axis():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  trainer = _trainer(_sparse_model(), {"data": 2, "expert": 4})
  state = trainer.init_state(jax.random.PRNGKey(0))
  state, _ = trainer.train_step(state, _batch(), jax.random.PRNGKey(1))
  for stack in ("encoder", "decoder"):
    wi = state.params[stack]["layers_1"]["mlp"]["expert"]["wi_0"]
    assert wi.shape[0] == 4
    assert wi.sharding.shard_shape(wi.shape)[0] == 1  # 4 experts over 4 devices.
    dense = state.params[stack]["layers_0"]["mlp"]["wi_0"]
    assert dense.sharding.shard_shape(dense.shape) == dense.shape  # replicated


@pytest.mark.parametrize("group", optimizers.FREEZE_GROUPS)
def test_frozen_groups_stay_bit_identical_and_hold_no_optimizer_state(group):
  trainer = _trainer(_sparse_model(), freeze=(group,))
  state = trainer.init_state(jax.random.PRNGKey(0))
  before = checkpoints.flatten(jax.device_get(state.params))
  for step in range(3):
    state, metrics = trainer.train_step(state, _batch(step), jax.random.PRNGKey(1))
    assert float(metrics["finite"]) == 1.0
  after = checkpoints.flatten(jax.device_get(state.params))
  frozen = [n for n in before if optimizers._in_group(n, group)]  # pylint: disable=protected-access
  assert frozen
  for name in before:
    if name in frozen:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    else:
      assert not np.array_equal(after[name], before[name]), name
  # No optimizer state anywhere under a frozen parameter's path.
  for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    keys = "/".join(str(getattr(p, "key", "")) for p in path if hasattr(p, "key"))
    assert not any(keys.endswith(name) for name in frozen), keys


def test_a_non_finite_step_leaves_the_state_unchanged():
  trainer = _trainer(_sparse_model())
  state = trainer.init_state(jax.random.PRNGKey(0))
  state, _ = trainer.train_step(state, _batch(0), jax.random.PRNGKey(1))
  # One NaN weight makes the loss NaN.
  params = jax.tree.map(np.array, jax.device_get(state.params))
  params["decoder"]["decoder_norm"]["scale"][0] = np.nan
  poisoned = trainer.state_from_params(params, step=1)
  before = jax.device_get((poisoned.params, poisoned.opt_state))
  after, metrics = trainer.train_step(poisoned, _batch(1), jax.random.PRNGKey(1))
  assert float(metrics["finite"]) == 0.0
  assert int(after.step) == 2
  for got, want in zip(jax.tree.leaves(jax.device_get((after.params, after.opt_state))),
                       jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)


def test_upcycled_model_computes_the_dense_model_at_initialization(tmp_path):
  # Every token goes to all E experts (k = E) with gates summing to 1; the
  # experts are copies of the dense FFN, so each MoE layer computes exactly
  # that FFN: sum_e p_e FFN(x) = FFN(x).
  dense = model_lib.EncoderDecoderModel(transformer.EncoderDecoder(config=_config()))
  dense_trainer = _trainer(dense)
  dense_params = dense_trainer.init_state(jax.random.PRNGKey(3)).params
  checkpoints.save_params(jax.device_get(dense_params), str(tmp_path / "dense"))

  sparse = _sparse_model(router=lambda: routing.TokensChooseRouter(num_selected_experts=4))
  state = checkpoint_manager.initial_state(_trainer(sparse), str(tmp_path / "dense"),
                                           jax.random.PRNGKey(4), upcycle=True)
  mlp = state.params["encoder"]["layers_1"]["mlp"]
  np.testing.assert_array_equal(mlp["expert"]["wi_0"][2],
                                dense_params["encoder"]["layers_1"]["mlp"]["wi_0"])
  batch = _batch(5)
  want = jax.jit(dense.compute_logits)(dense_params, batch)
  got = jax.jit(sparse.compute_logits)(state.params, batch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_initial_checkpoint_of_another_architecture_names_the_parameter(tmp_path):
  dense = model_lib.EncoderDecoderModel(transformer.EncoderDecoder(
      config=_config(mlp_dim=48)))
  params = _trainer(dense).init_state(jax.random.PRNGKey(0)).params
  checkpoints.save_params(jax.device_get(params), str(tmp_path / "other"))
  with pytest.raises(ValueError, match="has shape .*decoder/layers_0/mlp/wi_0"):
    checkpoint_manager.initial_state(
        _trainer(model_lib.EncoderDecoderModel(transformer.EncoderDecoder(config=_config()))),
        str(tmp_path / "other"), jax.random.PRNGKey(0))


def test_reinitialized_parameters_are_not_read(tmp_path):
  model = _sparse_model()
  trainer = _trainer(model)
  saved = trainer.init_state(jax.random.PRNGKey(0)).params
  checkpoints.save_params(jax.device_get(saved), str(tmp_path / "run"))
  state = checkpoint_manager.initial_state(trainer, str(tmp_path / "run"),
                                           jax.random.PRNGKey(9),
                                           reinitialize=[".*/router/.*"])
  got, want = checkpoints.flatten(state.params), checkpoints.flatten(saved)
  for name in want:
    same = np.array_equal(np.asarray(got[name]), np.asarray(want[name]))
    assert same == ("/router/" not in name), name


def test_scanned_and_dataclass_configs_share_one_placement():
  # The same model with scanned layers places its stacked parameters too.
  module = transformer.EncoderDecoder(config=dataclasses.replace(_config(), scan_layers=True))
  trainer = _trainer(model_lib.EncoderDecoderModel(module))
  state = trainer.init_state(jax.random.PRNGKey(0))
  state, metrics = trainer.train_step(state, _batch(), jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"]))
