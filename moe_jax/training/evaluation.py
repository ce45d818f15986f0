"""seqio evaluation of a model: decoding or scoring, metrics, eval_results.json.

`Evaluation` wraps a `seqio.Evaluator` for a task or mixture. seqio decides,
per task and metric, what the model must produce: predictions (generative
tasks, decoded with the model's `predict_batch`) or scores (rank
classification such as MMLU direct, from `score_batch`). Every process
reads the whole eval set; batches are placed on the mesh like training
batches, each process contributing the rows it holds.

Results go to `MODEL_DIR/eval_results.json` (every evaluation so far, per
task, plus per-mixture means), TensorBoard (seqio's logger, under
`MODEL_DIR/inference_eval/`), and a printed summary table.
"""

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from moe_jax import checkpoints
from moe_jax import inputs
from moe_jax import partitioning
from moe_jax import paths
from moe_jax.training import metrics as metrics_lib
from moe_jax.training import trainer as trainer_lib

RESULTS_FILE = "eval_results.json"
EVAL_SUBDIR = "inference_eval"
PyTree = Any


def batched(examples: Iterable[Tuple[int, Mapping[str, np.ndarray]]], batch_size: int,
            lengths: Mapping[str, int]):
  """Groups `(index, features)` into full batches, padding the last with zeros.

  A feature a row lacks stays zero (e.g. `decoder_input_tokens` when only
  its length matters, for decoding).

  Yields:
    `(indices, batch)`: the real rows' indices, and features padded to
    `[batch_size, lengths[feature]]` (one compiled shape for every batch).
  """
  indices: List[int] = []
  rows: List[Mapping[str, np.ndarray]] = []

  def emit():
    batch = {}
    for name, length in lengths.items():
      array = np.zeros((batch_size, length), np.int32)
      for r, row in enumerate(rows):
        if name in row:
          value = np.asarray(row[name])[:length]
          array[r, :len(value)] = value
      batch[name] = array
    return list(indices), batch

  for index, features in examples:
    indices.append(int(index))
    rows.append(features)
    if len(rows) == batch_size:
      yield emit()
      indices, rows = [], []
  if rows:
    yield emit()


def _numpy_examples(dataset: tf.data.Dataset):
  for index, features in dataset.as_numpy_iterator():
    yield index, features


class ModelFunctions:
  """Batched, jit-compiled prediction and scoring over seqio's enumerated datasets.

  Attributes:
    model: an `EncoderDecoderModel`.
    params: its parameters (already placed on the mesh).
    batch_size: global rows per call (a multiple of the batch shards).
    lengths: feature lengths, e.g. `{'encoder_input_tokens': 2048,
      'decoder_input_tokens': 512, ...}`.
    to_device: puts a full batch (every process holds all of it) on the mesh.
    context: the mesh / axis-rules context the model is traced under.
  """

  def __init__(self, model: Any, params: PyTree, batch_size: int,
               lengths: Mapping[str, int], to_device: Callable[[Dict], Dict],
               context: Callable[[], Any]):
    self.model = model
    self.params = params
    self.batch_size = batch_size
    self.lengths = dict(lengths)
    self._to_device = to_device
    self._context = context
    self._predict = jax.jit(model.predict_batch)
    self._score = jax.jit(model.score_batch)

  def _run(self, fn, examples) -> List[Tuple[int, np.ndarray]]:
    out = []
    for indices, batch in batched(examples, self.batch_size, self.lengths):
      with self._context():
        result = fn(self.params, self._to_device(batch))
      result = np.asarray(multihost_utils.process_allgather(
          result, tiled=True))
      out.extend(zip(indices, result[:len(indices)]))
    return out

  def predict_examples(self, examples: Iterable[Tuple[int, Mapping[str, np.ndarray]]]
                       ) -> List[Tuple[int, List[int]]]:
    """Decoded token ids of `(index, features)` examples, padded to the decode
    length (vocabularies' `decode` stops at EOS)."""
    return [(i, [int(t) for t in tokens]) for i, tokens in self._run(self._predict, examples)]

  def predict(self, dataset: tf.data.Dataset) -> List[Tuple[int, List[int]]]:
    """seqio `predict_fn` over an enumerated dataset."""
    return self.predict_examples(_numpy_examples(dataset))

  def score(self, dataset: tf.data.Dataset) -> List[Tuple[int, float]]:
    """seqio `score_fn`: target log-likelihood per example index."""
    return [(i, float(score))
            for i, score in self._run(self._score, _numpy_examples(dataset))]


def mixture_average(results: Mapping[str, Mapping[str, float]],
                    mixtures: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, float]]:
  """Per mixture, `average`: the mean over its tasks of each task's first metric.

  A task's first metric is its headline score (accuracy, exact match, ...),
  so mixtures of differently scored tasks still get one number.
  """
  out = {}
  for mixture, tasks in mixtures.items():
    headline = [next(iter(results[t].values())) for t in tasks if results.get(t)]
    if headline:
      out[mixture] = {"average": float(np.mean(headline)), "num_tasks": len(headline)}
  return out


def summary_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """One line per task (or mixture) with its metrics."""
  width = max((len(name) for name in results), default=4)
  lines = []
  for name in sorted(results):
    values = ", ".join(f"{metric} {value:.4g}" for metric, value in sorted(results[name].items()))
    lines.append(f"  {name:<{width}}  {values}")
  return "\n".join(lines)


class Evaluation:
  """Periodic or one-off seqio evaluation of a task or mixture.

  Attributes:
    mixture_or_task_name: what to evaluate.
    task_feature_lengths: e.g. `{'inputs': 512, 'targets': 64}` (hard limits).
    model_dir: where eval_results.json and seqio's logs go.
    split: the eval split.
    seed: seqio's seed (few-shot sources draw exemplars with it).
    use_cached: read seqio's cached datasets.
  """

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               model_dir: str, *, split: str = "validation", seed: Optional[int] = 42,
               use_cached: bool = False):
    self.mixture_or_task_name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.model_dir = model_dir
    self.evaluator = seqio.Evaluator(
        mixture_or_task_name=mixture_or_task_name,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split=split, use_cached=use_cached, seed=seed,
        sequence_length=self.task_feature_lengths,
        logger_cls=[seqio.TensorBoardLogger, seqio.JSONLogger],
        log_dir=os.path.join(model_dir, EVAL_SUBDIR),
        # Metrics run on the host while the accelerator keeps training.
        async_compute_metrics=False)
    if not self.evaluator.eval_tasks:
      raise ValueError(
          f"{mixture_or_task_name!r} has no task with a {split!r} split and metrics to "
          "evaluate; choose an eval mixture (e.g. 'flan_sample_eval').")
    tasks = [t.name for t in self.evaluator.eval_tasks]
    # A single task is its own result; mixtures also get an average.
    self.mixtures = {mixture_or_task_name: tasks} if tasks != [mixture_or_task_name] else {}

  @property
  def model_lengths(self) -> Dict[str, int]:
    """Model feature lengths of the unpacked encoder-decoder converter."""
    return {"encoder_input_tokens": self.task_feature_lengths["inputs"],
            "decoder_input_tokens": self.task_feature_lengths["targets"],
            "decoder_target_tokens": self.task_feature_lengths["targets"],
            "decoder_loss_weights": self.task_feature_lengths["targets"]}

  def run(self, functions: ModelFunctions, step: int) -> Dict[str, Any]:
    """Evaluates, appends to eval_results.json, and returns this step's results."""
    all_metrics, _ = self.evaluator.evaluate(
        compute_metrics=jax.process_index() == 0, step=step,
        predict_fn=functions.predict, score_fn=functions.score)
    task_metrics = all_metrics.result()
    if task_metrics is None:  # Not the primary process.
      return {}
    tasks = {task: {name: float(value) for name, value in values.items()}
             for task, values in task_metrics.items()}
    entry = {"step": int(step), "tasks": tasks,
             "mixtures": mixture_average(tasks, self.mixtures)}
    path = os.path.join(self.model_dir, RESULTS_FILE)
    history = []
    if epath.Path(path).exists():
      history = [e for e in json.loads(epath.Path(path).read_text())["evaluations"]
                 if e["step"] != step]
    metrics_lib.write_json(path, {"evaluations": history + [entry], "latest": entry})
    return entry



def load_params(placement: Any, checkpoint_path: str) -> PyTree:
  """The parameters under `checkpoint_path`, placed as `placement` says.

  Raises:
    ValueError: naming the first parameter that is missing or misshapen (a
      checkpoint of another architecture).
  """
  checkpoints.check_params_match_model(checkpoints.stored_params(checkpoint_path),
                                       placement.abstract_params)
  return checkpoints.restore_params(checkpoint_path, placement.abstract_params)


def default_output_dir(checkpoint_path: str) -> str:
  """A run's MODEL_DIR for its checkpoints, else the checkpoint directory itself."""
  path = paths.absolute(checkpoint_path).rstrip("/")
  if checkpoints.latest_step(path) is not None:
    return path
  parent = os.path.dirname(path)
  return parent if checkpoints.latest_step(parent) is not None else path


def evaluate(*, model: Any, dataset_cfg: Any, checkpoint_path: str,
             output_dir: Optional[str] = None, mesh_shape: Optional[Mapping[str, int]] = None,
             random_seed: Optional[int] = 42) -> Dict[str, Any]:
  """Evaluates one checkpoint (what `python -m moe_jax.eval` runs).

  Args:
    model: the `EncoderDecoderModel` (gin's MODEL).
    dataset_cfg: an `inputs.DatasetConfig`: the task or mixture, its split,
      feature lengths and the eval batch size.
    checkpoint_path: parameters (`checkpoints.find_checkpoint`; CHECKPOINT_PATH).
    output_dir: where eval_results.json goes (default: the checkpoint's
      MODEL_DIR; EVAL_OUTPUT_DIR).
    mesh_shape: MESH_SHAPE.
    random_seed: seqio's seed.

  Returns:
    The results of this evaluation (per task and mixture).
  """
  output_dir = output_dir or default_output_dir(checkpoint_path)
  evaluator = Evaluation(dataset_cfg.mixture_or_task_name, dataset_cfg.task_feature_lengths,
                         output_dir, split=dataset_cfg.split, seed=random_seed,
                         use_cached=dataset_cfg.use_cached)
  mesh = partitioning.mesh_from_shape(mesh_shape)
  shapes = {name: (dataset_cfg.batch_size, length)
            for name, length in evaluator.model_lengths.items()}
  placement = trainer_lib.Placement(model, mesh, partitioning.standard_logical_axis_rules(),
                                    shapes)
  params = load_params(placement, checkpoint_path)
  functions = ModelFunctions(model, params, dataset_cfg.batch_size, evaluator.model_lengths,
                             lambda batch: inputs.to_global_arrays(batch, mesh,
                                                                   whole_batch=True),
                             placement.context)
  step = checkpoints.step_of(checkpoints.find_checkpoint(checkpoint_path)[0])
  results = evaluator.run(functions, step)
  if results:
    print(f"{dataset_cfg.mixture_or_task_name} at step {step}:\n"
          + summary_table({**results["tasks"], **results["mixtures"]}))
    print(f"Wrote {os.path.join(output_dir, RESULTS_FILE)} and TensorBoard logs under "
          f"{os.path.join(output_dir, EVAL_SUBDIR)}")
  return results
