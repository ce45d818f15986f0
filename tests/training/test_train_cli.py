"""`python -m moe_jax.train` fails fast on bad input, with one clear line."""

import pytest

from tests.training import conftest

EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("flags, devices, message", [
    (["--gin.MODEL_DIR='{dir}'", "--gin.moe.MoeLayer.num_expertz=2"], None,
     "doesn't have a parameter named 'num_expertz'"),
    ([], None, "MODEL_DIR is required: set it in a gin file or pass --gin.MODEL_DIR="),
    (["--gin.MODEL_DIR='{dir}'", "--gin.MESH_SHAPE={{'expert': 8}}"], EIGHT_DEVICES,
     "num_experts=4 must be divisible by num_expert_partitions=8 (the mesh's expert axis)"),
    (["--gin.MODEL_DIR='{dir}'", "--gin.BATCH_SIZE=6"], EIGHT_DEVICES,
     "BATCH_SIZE 6 does not split over the 8 batch slices"),
    (["--gin.MODEL_DIR='{dir}'", "--gin.MIXTURE_OR_TASK_NAME='toy_cpy'"], None,
     "Unknown mixture or task 'toy_cpy'"),
])
def test_bad_input_is_one_line(tmp_path, flags, devices, message):
  env = conftest.command_env(**({"XLA_FLAGS": devices} if devices else {}))
  result = conftest.run_command(
      "moe_jax.train", f"--gin_file={conftest.TOY_RUN}",
      *(f.format(dir=tmp_path / "run") for f in flags), env=env)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_initial_checkpoint_of_another_architecture_is_named(tmp_path):
  conftest.train_toy(tmp_path / "small", TRAIN_STEPS=1)
  result = conftest.run_command(
      "moe_jax.train", f"--gin_file={conftest.TOY_RUN}", f"--gin.MODEL_DIR='{tmp_path / 'big'}'",
      "--gin.EMBED_DIM=48", f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'small'}'")
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "The initial checkpoint's 'decoder/decoder_norm/scale' has shape (32,)" in lines[0]
  assert "needs (48,): it is another architecture" in lines[0]
