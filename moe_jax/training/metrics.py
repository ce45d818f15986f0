"""Where training metrics go: TensorBoard, `train_metrics.jsonl`, the console.

`MetricsLogger.log(step, metrics)` takes one flat dict per logged step:
scalars (`loss`, `learning_rate`, `tokens_per_s`, `step_time_ms`, `grad_norm`,
`experts/...` means over MoE layers) and per-layer expert metrics named
`experts/<layer>/<metric>` (e.g. `experts/encoder/layers_1/expert_fraction`,
a list with one share of the routed tokens per expert). It writes

  * `MODEL_DIR/train_metrics.jsonl`: the dict as one JSON object per line;
  * TensorBoard events under `MODEL_DIR/train/` (clu metric writers): every
    scalar, with each MoE layer's metrics in a card group of its own
    (`experts_<layer>/<metric>`), and the per-expert shares as a histogram;
  * one console line per logged step (step, loss, tokens/s, step time, ETA).

Only the primary process (process 0) writes; the others keep quiet.
"""

import json
import os
import sys
import time
from typing import IO, Any, Dict, Mapping, Optional

import numpy as np
from clu import metric_writers
from etils import epath

from moe_jax import paths

METRICS_FILE = "train_metrics.jsonl"
TENSORBOARD_SUBDIR = "train"
_EXPERTS = "experts/"


def _json_value(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def layer_tag(name: str) -> str:
  """TensorBoard tag of a metric: per-layer expert metrics get a group per layer.

  TensorBoard groups cards by the tag's first component, so
  `experts/encoder/layers_1/router_confidence` becomes
  `experts_encoder_layers_1/router_confidence`; other names stay as they are.
  """
  if not name.startswith(_EXPERTS) or name.count("/") < 2:
    return name
  layer, _, metric = name[len(_EXPERTS):].rpartition("/")
  return f"experts_{layer.replace('/', '_')}/{metric}"


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsLogger:
  """Writes each logged step's metrics to JSONL, TensorBoard and the console.

  Attributes:
    model_dir: the run's directory.
    total_steps: the run's final step (for the ETA).
  """

  def __init__(self, model_dir: str, total_steps: int, *, primary: bool = True,
               console: Optional[IO[str]] = None):
    self.model_dir = model_dir
    self.total_steps = total_steps
    self._primary = primary
    self._console = sys.stdout if console is None else console
    self._jsonl = None
    self._writer = None
    self._start: Optional[tuple] = None  # (wall time, step) of the first log
    if primary:
      epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
      self._jsonl = epath.Path(self.jsonl_path).open("a")
      self._writer = metric_writers.AsyncWriter(
          metric_writers.SummaryWriter(os.path.join(model_dir, TENSORBOARD_SUBDIR)))

  @property
  def jsonl_path(self) -> str:
    return os.path.join(self.model_dir, METRICS_FILE)

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one step's metrics (see the module docstring for the names)."""
    if not self._primary:
      return
    values = {name: _json_value(value) for name, value in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    scalars, histograms = {}, {}
    for name, value in values.items():
      if isinstance(value, list):
        histograms[layer_tag(name)] = np.asarray(value)
      else:
        scalars[layer_tag(name)] = value
    self._writer.write_scalars(step, scalars)
    if histograms:
      self._writer.write_histograms(step, histograms)
    self._console.write(self.progress_line(step, values) + "\n")
    self._console.flush()

  def progress_line(self, step: int, values: Mapping[str, Any]) -> str:
    """`step 120/400 | loss 3.214 | 5.2k tok/s | 180 ms/step | ETA 0:00:50`."""
    now = time.monotonic()
    if self._start is None:
      self._start = (now, step)
    parts = [f"step {step}/{self.total_steps}"]
    if "loss" in values:
      parts.append(f"loss {values['loss']:.4f}")
    if "tokens_per_s" in values:
      parts.append(f"{values['tokens_per_s'] / 1e3:.1f}k tok/s")
    if "step_time_ms" in values:
      parts.append(f"{values['step_time_ms']:.0f} ms/step")
    started, first_step = self._start
    if step > first_step:
      per_step = (now - started) / (step - first_step)
      parts.append(f"ETA {format_duration(per_step * max(self.total_steps - step, 0))}")
    return " | ".join(parts)

  def close(self) -> None:
    if self._primary:
      self._writer.close()
      self._jsonl.close()
      self._primary = False


def write_json(path: str, payload: Dict[str, Any]) -> None:
  """Writes JSON atomically (temporary file, then rename), locally or on gs://."""
  paths.write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True))
