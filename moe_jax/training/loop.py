"""The training run: what `python -m moe_jax.train` executes, configured by gin.

`train(...)` takes t5x's macros through gin (gin/runs/*.gin bind them):
MODEL_DIR, TRAIN_STEPS (absolute: an initial checkpoint's steps count),
BATCH_SIZE, TASK_FEATURE_LENGTHS, MIXTURE_OR_TASK_NAME, INITIAL_CHECKPOINT_PATH,
LEARNING_RATE, DROPOUT_RATE, RANDOM_SEED, USE_CACHED_TASKS, MESH_SHAPE.

A step's path: this host's batch (`moe_jax.inputs`) -> global arrays on the
mesh -> `Trainer.train_step` -> metrics every `log_period` steps
(`training.metrics`), a checkpoint every `checkpoint_period` steps with the
data position (`training.checkpoint_manager`), seqio evaluation every
`eval_period` steps (`training.evaluation`).

Rerunning with the same MODEL_DIR resumes from its latest checkpoint: same
parameters, optimizer state and next batch. SIGTERM (preemption) saves a
checkpoint and returns normally. A step with a non-finite loss stops the run
with an error naming the step; the last checkpoint stays the last good one.
"""

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from moe_jax import describe
from moe_jax import inputs
from moe_jax import partitioning
from moe_jax import paths
from moe_jax.training import checkpoint_manager
from moe_jax.training import evaluation
from moe_jax.training import metrics as metrics_lib
from moe_jax.training import optimizers
from moe_jax.training import trainer as trainer_lib

logger = logging.getLogger(__name__)
COMPILE_STATS_FILE = "compile_stats.json"


class NonFiniteLossError(FloatingPointError):
  """A step produced a NaN or infinite loss (or gradient)."""


@dataclasses.dataclass
class RunSummary:
  """What a finished (or preempted) run leaves behind.

  Attributes:
    step: the last step taken.
    model_dir: the run's directory.
    checkpoint_dir: the last checkpoint written.
    preempted: the run stopped on SIGTERM.
    last_metrics: the last logged metrics.
    eval_results: the last evaluation's results, if any.
  """

  step: int
  model_dir: str
  checkpoint_dir: Optional[str]
  preempted: bool
  last_metrics: Dict[str, Any]
  eval_results: Optional[Dict[str, Any]] = None


def _check_memory(figures: Mapping[str, Any], mesh, batch_size: int, lengths) -> None:
  """Refuses a step whose describe estimate exceeds a device's memory."""
  mesh_shape = dict(mesh.shape)
  estimate = figures["memory"]["total_bytes"]
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  stats = device.memory_stats()
  limit = (stats or {}).get("bytes_limit")
  if limit is None and device.platform == "cpu":
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count()
  if limit and estimate > limit:
    raise ValueError(
        f"The train step needs about {estimate / 2**30:.1f} GiB per device (parameters, "
        f"gradients, optimizer state, activations; describe's estimate on mesh "
        f"{mesh_shape}, batch {batch_size}, lengths {lengths}) but a {device.device_kind} "
        f"has {limit / 2**30:.1f} GiB. Shard more (a larger 'expert' or 'model' axis in "
        "MESH_SHAPE), rematerialize (REMAT_POLICY = 'full'), or lower BATCH_SIZE "
        "(NUM_MICROBATCHES accumulates gradients over smaller pieces); "
        "CHECK_MEMORY = False skips this check.")


def _log_compile_stats(compiled, figures, model_dir: str, primary: bool) -> Dict[str, Any]:
  """XLA's compiled memory and FLOPs beside describe's estimate, once per run."""
  stats: Dict[str, Any] = {"describe_estimate_bytes": figures["memory"]["total_bytes"]}
  memory = compiled.memory_analysis()
  if memory is not None:
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes"):
      stats[f"xla_{field}"] = int(getattr(memory, field, 0))
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if cost:
    stats["xla_flops_per_device"] = float(cost.get("flops", 0.0))
  if primary:
    metrics_lib.write_json(os.path.join(model_dir, COMPILE_STATS_FILE), stats)
    xla_bytes = sum(stats.get(f"xla_{f}", 0) for f in ("argument_size_in_bytes",
                                                       "temp_size_in_bytes"))
    print(f"compiled train step: XLA {xla_bytes / 2**30:.3f} GiB per device "
          f"(arguments + temporaries) vs describe's {stats['describe_estimate_bytes'] / 2**30:.3f} "
          f"GiB estimate; {stats.get('xla_flops_per_device', 0) / 1e9:.2f} GFLOPs per step "
          "per device", flush=True)
  return stats


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def _tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int(np.sum(batch["encoder_input_tokens"] > 0)
             + np.sum(batch["decoder_target_tokens"] > 0))


def train(
    *,
    model: Any,
    model_dir: str,
    train_dataset_cfg: inputs.DatasetConfig,
    total_steps: int,
    optimizer: optimizers.OptimizerFactory,
    infer_eval_dataset_cfg: Optional[inputs.DatasetConfig] = None,
    eval_period: Optional[int] = None,
    freeze: Sequence[str] = (),
    grad_clip_norm: Optional[float] = None,
    num_microbatches: int = 1,
    mesh_shape: Optional[Mapping[str, int]] = None,
    random_seed: int = 0,
    initial_checkpoint_path: Optional[str] = None,
    initial_checkpoint_reinitialize: Sequence[str] = (),
    upcycle: bool = False,
    checkpoint_period: int = 1000,
    keep_checkpoints: Optional[int] = None,
    async_checkpointing: bool = True,
    log_period: int = 100,
    profile_steps: Optional[Sequence[int]] = None,
    check_memory: bool = True,
) -> RunSummary:
  """Trains `model` (see the module docstring).

  Args:
    model: the `EncoderDecoderModel` (gin's MODEL).
    model_dir: where checkpoints, metrics and results go (MODEL_DIR).
    train_dataset_cfg: the training data (mixture, lengths, global batch).
    total_steps: the step to stop at (TRAIN_STEPS), counting an initial
      checkpoint's steps.
    optimizer: from `optimizers.adafactor(...)` / `optimizers.adamw(...)`.
    infer_eval_dataset_cfg: a task or mixture evaluated with seqio every
      `eval_period` steps and at the end (its batch size is the eval batch).
    eval_period: steps between evaluations (None: only at the end).
    freeze: parameter groups to keep fixed ('router', 'experts', 'moe',
      'non_moe'; FROZEN_PARAMS).
    grad_clip_norm: global gradient-norm clipping (None: off).
    num_microbatches: gradient accumulation within a step.
    mesh_shape: `{'data': D, 'expert': E, 'model': M}`, -1 = the rest
      (MESH_SHAPE; default: all devices on data).
    random_seed: seeds parameters, dropout and the data order (RANDOM_SEED).
    initial_checkpoint_path: start from these parameters when MODEL_DIR has
      no checkpoint yet (INITIAL_CHECKPOINT_PATH).
    initial_checkpoint_reinitialize: regexes of parameters to initialize
      afresh instead of reading them (e.g. ['.*/router/.*']).
    upcycle: the initial checkpoint is dense; copy its FFNs into every expert.
    checkpoint_period: steps between checkpoints.
    keep_checkpoints: how many to keep (None: all).
    async_checkpointing: write checkpoints in the background.
    log_period: steps between logged metrics.
    profile_steps: `[first, last)` steps traced with jax.profiler into
      MODEL_DIR/profile (PROFILE_STEPS).
    check_memory: refuse a step describe estimates will not fit on a device.

  Returns:
    A `RunSummary`.
  """
  if not model_dir:
    raise ValueError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\".")
  if total_steps < 1:
    raise ValueError(f"TRAIN_STEPS must be >= 1, got {total_steps}.")
  if profile_steps is not None and (len(profile_steps) != 2
                                    or not 0 <= profile_steps[0] < profile_steps[1]):
    raise ValueError(f"PROFILE_STEPS must be [first, last) with first < last, got "
                     f"{list(profile_steps)}.")
  primary = jax.process_index() == 0
  mesh = partitioning.mesh_from_shape(mesh_shape)
  rules = partitioning.standard_logical_axis_rules()
  data = inputs.TrainInputs(train_dataset_cfg, mesh, seed=random_seed)
  placement = trainer_lib.Placement(model, mesh, rules, data.global_shapes)
  trainer = trainer_lib.Trainer(
      placement, lambda axes: optimizers.build(optimizer, axes, freeze=freeze,
                                               grad_clip_norm=grad_clip_norm),
      num_microbatches=num_microbatches,
      learning_rate_fn=optimizers.learning_rate_fn(optimizer))
  lengths = (train_dataset_cfg.task_feature_lengths["inputs"],
             train_dataset_cfg.task_feature_lengths["targets"])
  figures = describe.describe(model, mesh=dict(mesh.shape), batch=train_dataset_cfg.batch_size,
                              lengths=lengths, optimizer=optimizers.kind(optimizer))
  if check_memory:
    _check_memory(figures, mesh, train_dataset_cfg.batch_size, lengths)

  manager = checkpoint_manager.CheckpointManager(
      model_dir, period=checkpoint_period, keep=keep_checkpoints,
      async_save=async_checkpointing, dataset_handler=inputs.DatasetCheckpointHandler(),
      dataset_args=inputs.checkpoint_args)
  seed_rng = jax.random.PRNGKey(random_seed)
  init_rng, dropout_rng = jax.random.split(seed_rng)
  resumed = manager.latest_step()
  if resumed is not None:
    state = manager.restore(trainer.abstract_state, data.iterator)
    if primary:
      print(f"Resuming from {manager.step_dir(resumed)}", flush=True)
  elif initial_checkpoint_path:
    state = checkpoint_manager.initial_state(
        trainer, initial_checkpoint_path, init_rng,
        reinitialize=initial_checkpoint_reinitialize, upcycle=upcycle)
    if primary:
      print(f"Initialized from {initial_checkpoint_path} (step {int(state.step)})", flush=True)
  else:
    state = trainer.init_state(init_rng)

  step = int(jax.device_get(state.step))
  if step >= total_steps:
    if primary:
      print(f"Nothing to do: the checkpoint is at step {step} >= TRAIN_STEPS={total_steps}.")
    manager.close()
    return RunSummary(step=step, model_dir=model_dir, checkpoint_dir=manager.step_dir(step)
                      if resumed is not None else None, preempted=False, last_metrics={})

  compiled = trainer.compile_train_step(dropout_rng)
  _log_compile_stats(compiled, figures, model_dir, primary)
  evaluator = None
  if infer_eval_dataset_cfg is not None:
    evaluator = evaluation.Evaluation(
        infer_eval_dataset_cfg.mixture_or_task_name,
        infer_eval_dataset_cfg.task_feature_lengths, model_dir,
        split=infer_eval_dataset_cfg.split, seed=random_seed,
        use_cached=infer_eval_dataset_cfg.use_cached)

  def evaluate(at_step: int) -> Optional[Dict[str, Any]]:
    if evaluator is None:
      return None
    functions = evaluation.ModelFunctions(
        model, state.params, infer_eval_dataset_cfg.batch_size, evaluator.model_lengths,
        lambda batch: inputs.to_global_arrays(batch, mesh, whole_batch=True), trainer.context)
    results = evaluator.run(functions, at_step)
    if primary and results:
      print(f"eval at step {at_step} ({evaluator.mixture_or_task_name}):\n"
            + evaluation.summary_table({**results["tasks"], **results["mixtures"]}),
            flush=True)
    return results

  log = metrics_lib.MetricsLogger(model_dir, total_steps, primary=primary)
  last_metrics: Dict[str, Any] = {}
  eval_results = None
  pending = None  # (step, metrics) of the previous step, checked one step late.
  window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
  profiling = False

  def check(step_metrics, at_step):
    if float(jax.device_get(step_metrics["finite"])) < 1.0:
      raise NonFiniteLossError(
          f"Step {at_step} produced a non-finite loss or gradient (loss "
          f"{float(jax.device_get(step_metrics['loss']))}); stopping. The last checkpoint "
          f"({manager.latest_step()}) holds the last good state. Lower LEARNING_RATE, "
          "clip gradients (grad_clip_norm) or check the data.")

  with _Preemption() as preemption:
    try:
      while step < total_steps:
        if profile_steps is not None and step == profile_steps[0]:
          jax.profiler.start_trace(os.path.join(model_dir, "profile"))
          profiling = True
        local_batch = next(data.iterator)
        batch = inputs.to_global_arrays(local_batch, mesh)
        state, step_metrics = compiled(state, batch, dropout_rng)
        step += 1
        window_tokens += _tokens(local_batch) * jax.process_count()
        window_steps += 1
        if pending is not None:
          check(*pending)
        pending = (step_metrics, step)
        if profiling and step == profile_steps[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
        if step % log_period == 0 or step == total_steps:
          check(*pending)
          elapsed = time.perf_counter() - window_start
          last_metrics = {k: np.asarray(v) for k, v in jax.device_get(step_metrics).items()
                          if k != "finite"}
          last_metrics["step_time_ms"] = 1e3 * elapsed / window_steps
          last_metrics["tokens_per_s"] = window_tokens / elapsed
          log.log(step, last_metrics)
          window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        if manager.should_save(step):
          check(*pending)
          manager.save(state, data.iterator)
        if evaluator is not None and eval_period and step % eval_period == 0:
          eval_results = evaluate(step)
        if preemption.requested:
          break
      if pending is not None:
        check(*pending)
      if manager.latest_step() != step:
        manager.save(state, data.iterator)
      manager.wait()
      if not preemption.requested and evaluator is not None and (
          not eval_period or step % eval_period):
        eval_results = evaluate(step)
    finally:
      if profiling:
        jax.profiler.stop_trace()
      log.close()
      manager.close()
  checkpoint_dir = manager.step_dir(step)
  if primary:
    print(("Preempted (SIGTERM) at" if preemption.requested else "Done at") + f" step {step}.")
    print(f"  checkpoint:   {checkpoint_dir}")
    shown_dir = paths.absolute(model_dir)
    print(f"  metrics:      {os.path.join(shown_dir, metrics_lib.METRICS_FILE)}")
    print(f"  TensorBoard:  tensorboard --logdir {shown_dir}")
    if eval_results:
      print(f"  eval results: {os.path.join(shown_dir, evaluation.RESULTS_FILE)}")
    sys.stdout.flush()
  return RunSummary(step=step, model_dir=model_dir, checkpoint_dir=checkpoint_dir,
                    preempted=preemption.requested, last_metrics=last_metrics,
                    eval_results=eval_results)
