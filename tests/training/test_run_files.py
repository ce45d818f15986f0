"""gin/runs/*.gin parse with a model gin and bind what their entry points need."""

import gin
import pytest

from moe_jax import config
from moe_jax.training import evaluation
from moe_jax.training import inference
from moe_jax.training import loop

REQUIRED = {
    "pretrain": ["MODEL_DIR = '/tmp/run'"],
    "finetune": ["MODEL_DIR = '/tmp/run'", "INITIAL_CHECKPOINT_PATH = '/tmp/ckpt'"],
    "eval": ["CHECKPOINT_PATH = '/tmp/run'", "MIXTURE_OR_TASK_NAME = 'mmlu_5shot_direct'"],
    "infer": ["CHECKPOINT_PATH = '/tmp/run'", "INFER_OUTPUT_DIR = '/tmp/out'",
              "INPUT_FILE = '/tmp/in.jsonl'"],
}
TARGETS = {"pretrain": loop.train, "finetune": loop.train, "eval": evaluation.evaluate,
           "infer": inference.infer}


@pytest.fixture(autouse=True)
def _clear():
  yield
  gin.clear_config()


@pytest.mark.parametrize("run", sorted(REQUIRED))
def test_run_file_binds_every_required_argument(run):
  config.parse(["gin/models/flan_st_base.gin", f"gin/runs/{run}.gin"], REQUIRED[run],
               finalize=True)
  fn = TARGETS[run]
  name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
  assert gin.query_parameter(f"{name}.model") is not None


@pytest.mark.parametrize("run, macro", [("finetune", "INITIAL_CHECKPOINT_PATH"),
                                        ("pretrain", "MODEL_DIR"),
                                        ("eval", "CHECKPOINT_PATH")])
def test_unset_required_macro_is_named(run, macro):
  bindings = [b for b in REQUIRED[run] if not b.startswith(macro)]
  with pytest.raises(config.GinError, match=f"{macro} is required"):
    config.parse(["gin/models/flan_st_base.gin", f"gin/runs/{run}.gin"], bindings,
                 finalize=True)


def test_the_demo_is_complete_by_itself():
  config.parse(["gin/runs/demo.gin"], ["MODEL_DIR = '/tmp/demo'"], finalize=True)
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "flan_sample"
  assert gin.query_parameter("%TRAIN_STEPS") > 0


def test_finetune_encodes_the_flan_moe_recipe():
  config.parse(["gin/models/flan_st_base.gin", "gin/runs/finetune.gin"], REQUIRED["finetune"],
               finalize=True)
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 2048, "targets": 512}
  assert gin.query_parameter("%DROPOUT_RATE") == 0.05
  assert gin.query_parameter("%EXPERT_DROPOUT_RATE") == 0.2
  assert gin.query_parameter("%LEARNING_RATE") == 1e-4
