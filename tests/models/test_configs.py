"""Tests for gin/models: every config builds, describe reproduces published sizes."""

import glob
import json
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config
from moe_jax import describe
from moe_jax.models import model as model_lib
from tests.models import conftest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_GINS = sorted(os.path.relpath(p, REPO)
                    for p in glob.glob(os.path.join(REPO, "gin/models/*.gin")))


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_all_expected_configs_exist():
  names = {os.path.basename(p)[:-len(".gin")] for p in MODEL_GINS}
  expected = ({f"t5_1_1_{s}" for s in ("small", "base", "large", "xl", "xxl")}
              | {f"switch_base_{e}" for e in (8, 16, 32, 64, 128, 256)}
              | {"switch_large_128", "switch_xxl_128", "switch_c_2048", "tiny", "tiny_moe"}
              | {f"flan_switch_{s}" for s in ("base", "large", "xxl")}
              | {f"flan_{r}_{s}" for r in ("gs", "ec") for s in ("small", "base", "large")}
              | {"flan_st_base", "flan_st_32b"})
  assert expected <= names


@pytest.mark.parametrize("gin_file", MODEL_GINS)
def test_every_config_builds(gin_file):
  model = config.load_model([gin_file])
  assert isinstance(model, model_lib.EncoderDecoderModel)
  module = model.module
  # What setup() validates, without tracing the (possibly huge) model.
  for stack in ("encoder", "decoder"):
    indices = module.config.sparse_layers(stack)
    factory = getattr(module, f"{stack}_sparse_mlp")
    assert bool(indices) == (factory is not None)
    if factory is not None:
      layer = factory()
      layer.router.validate(layer.num_experts)
      assert layer.num_experts % layer.expert_partitions == 0


# Published totals: Switch Transformer paper / T5X checkpoint docs, ST-MoE
# paper; T5.1.1 sizes from the T5X model docs.
PUBLISHED = [
    ("switch_base_128", 7.4e9),
    ("switch_large_128", 26.3e9),
    ("switch_xxl_128", 395e9),
    ("switch_c_2048", 1571e9),
    ("flan_st_32b", 269e9),
    ("t5_1_1_small", 77e6),
    ("t5_1_1_base", 248e6),
    ("t5_1_1_large", 783e6),
    ("t5_1_1_xl", 2.85e9),
    ("t5_1_1_xxl", 11.1e9),
]


@pytest.mark.parametrize("name, total", PUBLISHED)
def test_describe_reproduces_published_totals(name, total):
  figures = describe.describe(config.load_model([f"gin/models/{name}.gin"]))
  assert abs(figures["total_params"] / total - 1) < 0.02


def test_st_moe_32b_activated_params():
  figures = describe.describe(config.load_model(["gin/models/flan_st_32b.gin"]))
  # Non-expert parameters + 2 of 64 experts per sparse layer: ~32B for the
  # two stacks (hence "32B"), plus the two 164M embedding tables.
  expert = 3 * 5120 * 20480
  sparse_layers = 12
  expected = figures["total_params"] - sparse_layers * 62 * expert
  assert figures["activated_params"] == pytest.approx(expected, rel=1e-6)
  assert 32e9 < figures["flops_per_token"] < 36e9


def test_describe_counts_the_tiny_moe_by_hand():
  figures = describe.describe(config.load_model(
      ["gin/models/tiny_moe.gin"], ["NUM_EMBEDDINGS = 64"]))
  d, h, ff, vocab, experts = 32, 4 * 8, 64, 64, 4
  attention = 4 * d * h
  dense_ffn = 3 * d * ff
  expert_ffn = experts * 3 * d * ff + d * experts        # experts + router
  encoder = 2 * attention + dense_ffn + expert_ffn + 4 * d + d + 4 * 32
  decoder = 4 * attention + dense_ffn + expert_ffn + 6 * d + d + 4 * 32 + d * vocab
  assert figures["total_params"] == vocab * d + encoder + decoder
  assert figures["activated_params"] == figures["total_params"] - 2 * 2 * 3 * d * ff


def test_tiny_moe_config_computes_a_training_loss():
  model = config.load_model(["gin/models/tiny_moe.gin"],
                              ["NUM_EMBEDDINGS = 64", "ACTIVATION_DTYPE = 'float32'"])
  batch = {"encoder_input_tokens": jnp.array([[4, 5, 6, 1]]),
           "decoder_input_tokens": jnp.array([[0, 7, 8]]),
           "decoder_target_tokens": jnp.array([[7, 8, 1]])}
  variables = conftest.random_variables(model.module, batch)
  loss, metrics = jax.jit(model.loss_fn)(variables["params"], batch,
                                         jax.random.key(1, impl="rbg"))
  assert np.isfinite(loss) and "experts/router_z_loss" in metrics
  assert model.aux_loss_factor == 0.01 and model.router_z_loss_factor == 1e-3


def test_memory_figures_and_json_cli(capsys):
  describe.main(["--gin_file", "gin/models/switch_base_8.gin", "--mesh",
                 "data=2,expert=8,model=2", "--batch", "32", "--lengths", "512,128", "--json"])
  line = capsys.readouterr().out.strip()
  assert "\n" not in line
  figures = json.loads(line)
  memory = figures["memory"]
  # Expert kernels split 8 (experts) x 2 (expert_mlp) ways, the rest 2 ways
  # over model where they have a model-sharded axis, so per-device params lie
  # between total / 16 and total / 2.
  total_bytes = 4 * figures["total_params"]
  assert total_bytes / 16 < memory["params_bytes"] < total_bytes / 2
  assert memory["grads_bytes"] == memory["params_bytes"]
  assert 0 < memory["optimizer_bytes"] < memory["params_bytes"]
  assert memory["activation_bytes"] > 0
  assert memory["total_bytes"] == sum(v for k, v in memory.items()
                                      if k.endswith("_bytes") and k != "total_bytes")
  for key in ("total_params", "activated_params", "flops_per_token"):
    assert key in figures


@pytest.mark.parametrize("args, message", [
    (["--gin_file", "gin/models/switch_base_8.gin", "--mesh", "expert=16"],
     "'expert' dimension \\(8\\) is sharded over mesh axes \\('expert',\\) of total size 16"),
    (["--gin_file", "gin/models/tiny_moe.gin", "--gin_bindings",
      "ENCODER_SPARSE_LAYOUT = 'diagonal'"], "Unknown sparse layout 'diagonal'"),
    (["--gin_file", "gin/models/tiny_moe.gin", "--gin_bindings",
      "NUM_ENCODER_SPARSE_LAYERS = 3"], "must lie in \\[0, 2\\]"),
    (["--gin_file", "gin/models/tiny_moe.gin", "--gin_bindings",
      "moe.MoeLayer.num_expert_partitions = 3"],
     "must be divisible by num_expert_partitions=3"),
])
def test_bad_configs_give_clear_errors(args, message, capsys):
  assert describe.main(args) == 2
  error = capsys.readouterr().err
  assert re.search(message, error), error
  assert len(error.strip().splitlines()) <= 2
