"""Writes the t5x checkpoint fixtures of tests/convert/test_t5x.py with real t5x.

Made with (t5x cc342d4, airio 69897df, jestimator 326824a installed as in
README "Running under t5x"; moe-jax installed editable in that venv):

  OPENBLAS_CORETYPE=Haswell OPENBLAS_L2_SIZE=512 MOE_JAX_TUNING=static \\
  PYTHONPATH=/work/t5x_src/t5x:/work/t5x_src/airio:/work/t5x_src/jestimator \\
    /work/t5x_venv/bin/python tests/convert/testdata/make_t5x_fixtures.py

(a minute on a CPU; the paths are those of a t5x checkout and its venv).

Two runs of `python -m t5x.train` (t5x's own entry point, as a user calls it),
2 steps each on an in-memory task of token ids, with t5x's legacy checkpointer
(`train.use_orbax = False`: the msgpack `checkpoint` file plus tensorstore
zarr arrays, the format of the released T5 / Flan-T5 / Switch checkpoints):

  t5x_moe/  our tiny MoE module (gin/models/tiny_moe.gin + tiny_moe_t5x.gin)
            under t5x's MoeEncoderDecoderModel and MoeTrainer;
  t5x_t5/   t5x's own T5.1.1 network (t5x/examples/t5), one layer per stack,
            whose parameters are stored as in the released checkpoints
            (`mlp/wi_0/kernel`, attention kernels flattened to 2-D).

Each keeps t5x's `checkpoint_2/` as written (optimizer state included) and
`logits.npz`: a fixed batch and the logits t5x's model computes on it from
the restored checkpoint (`t5x.checkpoints.load_t5x_checkpoint` then
`model._compute_logits`, float32).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
STEPS = 2

TASKS = '''
"""Token-id copy task held in memory (no vocabulary file, no download)."""
import numpy as np
import seqio
import tensorflow as tf

VOCABULARY = seqio.PassThroughVocabulary(32, eos_id=1)


def _dataset(split, shuffle_files=False, seed=None):
  del split, shuffle_files, seed
  rng = np.random.RandomState(0)
  tokens = rng.randint(2, 32, size=(32, 6)).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices({"inputs": tokens, "targets": tokens[:, :4]})


seqio.TaskRegistry.add(
    "t5x_fixture_ids",
    source=seqio.FunctionDataSource(_dataset, splits=("train", "validation")),
    preprocessors=[seqio.preprocessors.append_eos_after_trim],
    output_features={"inputs": seqio.Feature(VOCABULARY),
                     "targets": seqio.Feature(VOCABULARY)})
'''

# Token ids as they are: no vocabulary file.
VOCAB = """
from __gin__ import dynamic_registration
import seqio

VOCABULARY = @seqio.PassThroughVocabulary()
seqio.PassThroughVocabulary.size = 32
seqio.PassThroughVocabulary.eos_id = 1
"""

# t5x-only settings of both runs: data, legacy checkpoints.
RUN = """
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils

MIXTURE_OR_TASK_NAME = 't5x_fixture_ids'
MIXTURE_OR_TASK_MODULE = 't5x_fixture_tasks'
TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}
BATCH_SIZE = 8
USE_CACHED_TASKS = False
RANDOM_SEED = 0
NUM_MODEL_PARTITIONS = 1
train_script.train.use_orbax = False
train_script.train.train_eval_dataset_cfg = None
utils.SaveCheckpointConfig.period = %s
utils.SaveCheckpointConfig.keep = 1
""" % STEPS

# t5x's example T5.1.1 network with the dimensions of tiny_t5_t5x.gin.
T5_NETWORK = """
from __gin__ import dynamic_registration
from t5x.examples.t5 import network

DROPOUT_RATE = 0.0
network.T5Config:
  vocab_size = 32
  dtype = 'float32'
  emb_dim = 8
  num_heads = 2
  num_encoder_layers = 1
  num_decoder_layers = 1
  head_dim = 4
  mlp_dim = 8
"""

MODELS = {
    "t5x_moe": {
        "model": ["gin/models/tiny_moe.gin", "gin/t5x/moe_model.gin",
                  os.path.join(HERE, "tiny_moe_t5x.gin")],
        "run": ["t5x/contrib/moe/configs/runs/pretrain.gin"],
    },
    "t5x_t5": {
        "model": ["t5x/examples/t5/t5_1_1/base.gin", "t5_network.gin"],
        "run": ["t5x/configs/runs/pretrain.gin"],
    },
}


def _batch():
  rng = np.random.RandomState(1)
  encoder = rng.randint(2, 32, size=(2, 8)).astype(np.int32)
  encoder[1, 5:] = 0
  targets = rng.randint(2, 32, size=(2, 8)).astype(np.int32)
  targets[1, 6:] = 0
  decoder = np.zeros_like(targets)
  decoder[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": encoder, "decoder_input_tokens": decoder,
          "decoder_target_tokens": targets}


def _train(name, spec, work, t5x_root):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MOE_JAX_TUNING="static")
  env["PYTHONPATH"] = os.pathsep.join([work] + [p for p in [env.get("PYTHONPATH")] if p])
  env.pop("XLA_FLAGS", None)
  model_dir = os.path.join(work, name)
  command = [sys.executable, "-m", "t5x.train",
             f"--gin_search_paths={REPO},{t5x_root},{work}"]
  command += [f"--gin_file={f}" for f in spec["model"] + ["vocab.gin"] + spec["run"] + ["run.gin"]]
  command += [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}"]
  print(" ".join(command), flush=True)
  subprocess.run(command, env=env, check=True, cwd=work)
  return os.path.join(model_dir, f"checkpoint_{STEPS}")


def _logits(spec, checkpoint, work, t5x_root):
  """t5x's model on the fixed batch, from the checkpoint as t5x restores it."""
  import gin  # pylint: disable=g-import-not-at-top
  from t5x import checkpoints  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  for path in (REPO, t5x_root, work):
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(spec["model"] + ["vocab.gin"], [])
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  params = checkpoints.load_t5x_checkpoint(checkpoint)["target"]
  batch = _batch()
  return np.asarray(model._compute_logits(params, batch), np.float32), batch  # pylint: disable=protected-access


def main():
  import t5x  # pylint: disable=g-import-not-at-top
  t5x_root = os.path.dirname(os.path.dirname(os.path.abspath(t5x.__file__)))
  with tempfile.TemporaryDirectory() as work:
    with open(os.path.join(work, "t5x_fixture_tasks.py"), "w", encoding="utf-8") as f:
      f.write(textwrap.dedent(TASKS))
    for file_name, text in (("vocab.gin", VOCAB), ("run.gin", RUN)):
      with open(os.path.join(work, file_name), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(work, "t5_network.gin"), "w", encoding="utf-8") as f:
      f.write(T5_NETWORK)
    sys.path.insert(0, work)
    for name, spec in MODELS.items():
      checkpoint = _train(name, spec, work, t5x_root)
      logits, batch = _logits(spec, checkpoint, work, t5x_root)
      out = os.path.join(HERE, name)
      shutil.rmtree(out, ignore_errors=True)
      shutil.copytree(checkpoint, os.path.join(out, os.path.basename(checkpoint)))
      np.savez(os.path.join(out, "logits.npz"), logits=logits, **batch)
      print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  main()
