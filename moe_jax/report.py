r"""Draws a training run (or several side by side) as PNGs and one HTML page.

  python -m moe_jax.report MODEL_DIR                   # -> MODEL_DIR/report/
  python -m moe_jax.report runs/dense runs/moe --out runs/compare --names dense,moe

It reads what a run wrote: `train_metrics.jsonl` (`moe_jax.training.metrics`;
the TensorBoard events under MODEL_DIR/train/ hold the same values, so they
are not read) and, if present, `eval_results.json`
(`moe_jax.training.evaluation`). A resumed run re-logs steps; the last value
logged for a step wins. The figures:

  * training.png: loss, cross-entropy, token accuracy, learning rate,
    tokens/s and gradient norm over steps;
  * expert_usage.png: per MoE layer, each expert's share of the routed
    tokens over steps (a heat map; one row of panels per run);
  * routing.png: router confidence, dropped-token fraction, auxiliary
    (load-balancing) loss and router z-loss over steps, per MoE layer
    (with several runs: each run's mean over its layers);
  * eval.png: the latest evaluation's metrics per task, and per mixture the
    average of its tasks' headline metrics.

Expert figures need MoE layers and eval.png an evaluation; a figure no run
has data for is left out and the page says why. `report.html` embeds every
PNG (base64), so it opens anywhere without the PNGs or a network, and
tabulates the runs (steps, final loss, tokens/s, eval headline) and their
eval results side by side.
"""

import argparse
import base64
import dataclasses
import html
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import figure as mpl_figure

from moe_jax import cli

# The training modules' names for these, not imported from them: they load JAX,
# TensorFlow and seqio, which reading JSON does not need (tests check they agree).
METRICS_FILE = "train_metrics.jsonl"
RESULTS_FILE = "eval_results.json"
REPORT_SUBDIR = "report"
HTML_FILE = "report.html"
TRAINING_PNG = "training.png"
EXPERT_USAGE_PNG = "expert_usage.png"
ROUTING_PNG = "routing.png"
EVAL_PNG = "eval.png"
FIGURES = (TRAINING_PNG, EXPERT_USAGE_PNG, ROUTING_PNG, EVAL_PNG)

_CAPTIONS = {
    TRAINING_PNG: "Training curves: loss, cross-entropy, token accuracy, learning rate, "
                  "throughput and gradient norm per logged step.",
    EXPERT_USAGE_PNG: "Expert usage per MoE layer: each expert's share of the routed tokens "
                      "(top-k assignments) over training; a balanced router sits at 1/experts.",
    ROUTING_PNG: "Routing: mean top-1 router probability, share of tokens dropped for "
                 "capacity, and the layers' own (unscaled) load-balancing and router z-losses.",
    EVAL_PNG: "Latest evaluation: every metric per task, and per mixture the average of its "
              "tasks' headline metrics.",
}
_TRAINING_PANELS = (("loss", "loss (total)"), ("cross_ent_loss", "cross-entropy loss"),
                    ("accuracy", "token accuracy"), ("learning_rate", "learning rate"),
                    ("tokens_per_s", "tokens / s"), ("grad_norm", "gradient norm"))
_ROUTING_PANELS = (("router_confidence", "router confidence (top-1 probability)"),
                   ("fraction_tokens_left_behind", "dropped-token fraction"),
                   ("auxiliary_loss", "auxiliary (load-balancing) loss"),
                   ("router_z_loss", "router z-loss"))
_EXPERTS = "experts/"
_STACK_ORDER = ("encoder", "decoder")
_DPI = 100


@dataclasses.dataclass
class Run:
  """One run's logged metrics and evaluations.

  Attributes:
    name: its label in figures and tables.
    model_dir: its MODEL_DIR.
    rows: one dict per logged step (the last logged for that step), by step.
    evaluations: eval_results.json's `evaluations` (empty without one).
    color: its colour in every figure (runs keep theirs where some are left out).
  """

  name: str
  model_dir: str
  rows: List[Dict[str, Any]]
  evaluations: List[Dict[str, Any]]
  color: str = "C0"

  def series(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that logged `key`."""
    rows = [row for row in self.rows if key in row]
    return (np.array([row["step"] for row in rows]),
            np.array([row[key] for row in rows], dtype=np.float64))

  @property
  def moe_layers(self) -> List[str]:
    """Its MoE layers (`encoder/layers_1`, ...), encoder first, in layer order."""
    names = {key[len(_EXPERTS):].rpartition("/")[0] for key in self.rows[-1]
             if key.startswith(_EXPERTS) and key.count("/") >= 2}
    return sorted(names, key=_layer_order)

  @property
  def num_experts(self) -> Optional[int]:
    layers = self.moe_layers
    return len(self.rows[-1][f"{_EXPERTS}{layers[0]}/expert_fraction"]) if layers else None

  @property
  def latest_eval(self) -> Optional[Dict[str, Any]]:
    return self.evaluations[-1] if self.evaluations else None


def _layer_order(layer: str) -> Tuple[int, str, int]:
  stack = layer.split("/")[0]
  index = re.search(r"(\d+)$", layer)
  return (_STACK_ORDER.index(stack) if stack in _STACK_ORDER else len(_STACK_ORDER), stack,
          int(index.group(1)) if index else -1)


def read_rows(path: str) -> List[Dict[str, Any]]:
  """train_metrics.jsonl's rows, one per step (the last logged), by step."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  by_step: Dict[int, Dict[str, Any]] = {}
  for number, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      if number == len(lines):  # A run killed while writing its last line.
        break
      raise ValueError(f"{path}:{number} is not a JSON object: {error}") from error
    by_step[int(row["step"])] = row
  return [by_step[step] for step in sorted(by_step)]


def read_run(model_dir: str, name: Optional[str] = None) -> Run:
  """A run from its MODEL_DIR (see the module docstring for what is read)."""
  path = os.path.join(model_dir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No {METRICS_FILE} in {model_dir!r}: it is written by training "
        f"(python -m moe_jax.train --gin.MODEL_DIR=...) at its first logged step.")
  rows = read_rows(path)
  if not rows:
    raise ValueError(f"{path} has no logged step yet.")
  evaluations = []
  results = os.path.join(model_dir, RESULTS_FILE)
  if os.path.isfile(results):
    with open(results, encoding="utf-8") as f:
      evaluations = sorted(json.load(f)["evaluations"], key=lambda e: e["step"])
  return Run(name=name or os.path.basename(os.path.abspath(model_dir)),
             model_dir=model_dir, rows=rows, evaluations=evaluations)


def default_names(model_dirs: Sequence[str]) -> List[str]:
  """Directory names, lengthened to trailing paths (`a/run`, `b/run`) where they clash."""
  parts = [os.path.abspath(d).split(os.sep) for d in model_dirs]
  depths = [1] * len(parts)
  while True:
    names = ["/".join(p[-depth:]) for p, depth in zip(parts, depths)]
    clashes = [i for i, name in enumerate(names) if names.count(name) > 1]
    if not clashes:
      return names
    if any(depths[i] >= len(parts[i]) for i in clashes):
      raise ValueError(f"A MODEL_DIR is given twice: {list(model_dirs)}.")
    for i in clashes:
      depths[i] += 1


def _new_figure(rows: int, cols: int, width: float, height: float) -> mpl_figure.Figure:
  # A bare Figure renders with Agg on savefig: no pyplot state, no global backend switch.
  return mpl_figure.Figure(figsize=(width * cols, height * rows), dpi=_DPI,
                           layout="constrained")


def _save(fig: mpl_figure.Figure, out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, name)
  fig.savefig(path)
  return path


def _plot_series(ax, steps: np.ndarray, values: np.ndarray, **style) -> None:
  # Markers keep a run with one or a few logged steps visible.
  ax.plot(steps, values, marker="." if len(steps) < 50 else None, **style)


def plot_training(runs: Sequence[Run], out_dir: str) -> str:
  """training.png: the training curves of every run overlaid; returns its path."""
  panels = [(key, title) for key, title in _TRAINING_PANELS
            if any(key in row for run in runs for row in run.rows)]
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig = _new_figure(rows, cols, 4.2, 3.0)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (key, title) in zip(axes, panels):
    for run in runs:
      steps, values = run.series(key)
      if len(steps):
        _plot_series(ax, steps, values, color=run.color, label=run.name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in axes[len(panels):]:
    ax.set_axis_off()
  if len(runs) > 1:
    axes[0].legend()
  return _save(fig, out_dir, TRAINING_PNG)


def _step_edges(steps: np.ndarray) -> np.ndarray:
  """Cell edges around each logged step (midpoints; steps may be uneven after a resume)."""
  if len(steps) == 1:
    return np.array([steps[0] - 0.5, steps[0] + 0.5])
  middles = (steps[1:] + steps[:-1]) / 2
  return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def plot_expert_usage(runs: Sequence[Run], out_dir: str) -> str:
  """expert_usage.png: a step x expert heat map per (run, MoE layer); returns its path.

  One run's layers wrap in rows of up to four panels; several runs get a row
  each, with a column per layer any of them has.
  """
  if len(runs) == 1:
    layers = runs[0].moe_layers
    cols = min(4, len(layers))
    cells = [(runs[0], layer, divmod(i, cols)) for i, layer in enumerate(layers)]
    rows = -(-len(layers) // cols)
  else:
    layers = sorted({layer for run in runs for layer in run.moe_layers}, key=_layer_order)
    cols, rows = len(layers), len(runs)
    cells = [(run, layer, (r, layers.index(layer)))
             for r, run in enumerate(runs) for layer in run.moe_layers]
  shares = {(run.name, layer): run.series(f"{_EXPERTS}{layer}/expert_fraction")
            for run, layer, _ in cells}
  top = max(float(np.max(values)) for _, values in shares.values())
  fig = _new_figure(rows, cols, 3.6, 2.8)
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for run, layer, (r, c) in cells:
    steps, values = shares[(run.name, layer)]
    ax = axes[r, c]
    ax.set_axis_on()
    image = ax.pcolormesh(_step_edges(steps), np.arange(values.shape[1] + 1) - 0.5, values.T,
                          cmap="viridis", vmin=0.0, vmax=top)
    ax.set_title(layer if len(runs) == 1 else f"{run.name}: {layer}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
  scale = fig.colorbar(image, ax=axes, label="share of routed tokens")
  experts = sorted({run.num_experts for run in runs})
  for count in experts:  # Where a balanced router would put every expert.
    scale.ax.axhline(1 / count, color="white", linewidth=2)
  fig.suptitle("expert usage; balanced: "
               + ", ".join(f"1/{count} = {1 / count:.3g}" for count in experts)
               + " (white line on the scale)", fontsize=10)
  return _save(fig, out_dir, EXPERT_USAGE_PNG)


def _layer_series(runs: Sequence[Run], metric: str):
  """(label, color, steps, values): each layer of one run, else each run's mean over layers."""
  if len(runs) == 1:
    for i, layer in enumerate(runs[0].moe_layers):
      steps, values = runs[0].series(f"{_EXPERTS}{layer}/{metric}")
      yield layer, f"C{i % 10}", steps, values
    return
  for run in runs:
    keys = [f"{_EXPERTS}{layer}/{metric}" for layer in run.moe_layers]
    rows = [row for row in run.rows if all(key in row for key in keys)]
    yield (run.name, run.color, np.array([row["step"] for row in rows]),
           np.array([np.mean([row[key] for key in keys]) for row in rows]))


def plot_routing(runs: Sequence[Run], out_dir: str) -> str:
  """routing.png: router confidence, drops, aux and router z-loss; returns its path."""
  fig = _new_figure(2, 2, 4.6, 3.0)
  axes = fig.subplots(2, 2).ravel()
  for ax, (metric, title) in zip(axes, _ROUTING_PANELS):
    for label, color, steps, values in _layer_series(runs, metric):
      _plot_series(ax, steps, values, color=color, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if len(runs) > 1:
    fig.suptitle("each run's mean over its MoE layers", fontsize=10)
  return _save(fig, out_dir, ROUTING_PNG)


EvalRow = Tuple[str, str, str]  # ('tasks' or 'mixtures', name, metric)


def _eval_rows(runs: Sequence[Run]) -> List[EvalRow]:
  """The eval figure's and table's rows: every task's metrics, then every mixture's average."""
  rows = set()
  for run in runs:
    latest = run.latest_eval or {}
    rows |= {("tasks", task, metric)
             for task, metrics in latest.get("tasks", {}).items() for metric in metrics}
    rows |= {("mixtures", mixture, "average") for mixture in latest.get("mixtures", {})}
  return sorted(rows, key=lambda row: (row[0] != "tasks", row[1], row[2]))


def _eval_value(run: Run, row: EvalRow) -> Optional[float]:
  kind, name, metric = row
  return (run.latest_eval or {}).get(kind, {}).get(name, {}).get(metric)


def _eval_label(row: EvalRow) -> str:
  return f"{row[1]}: {row[2]}"


def plot_eval(runs: Sequence[Run], out_dir: str) -> str:
  """eval.png: latest eval metrics per task and mixture, runs side by side; returns its path."""
  rows = _eval_rows(runs)
  groups = [(kind, [row for row in rows if row[0] == kind]) for kind in ("tasks", "mixtures")]
  groups = [(kind, group) for kind, group in groups if group]
  bar = 0.8 / len(runs)
  height = sum(0.25 * len(runs) * len(group) + 0.9 for _, group in groups)
  fig = mpl_figure.Figure(figsize=(9.0, 0.6 + height), dpi=_DPI, layout="constrained")
  # One x scale: a mixture's average is in its tasks' units.
  axes = fig.subplots(len(groups), 1, squeeze=False, sharex=True,
                      height_ratios=[len(group) for _, group in groups]).ravel()
  for ax, (kind, group) in zip(axes, groups):
    for i, run in enumerate(runs):
      kept = [(position - 0.4 + bar * (i + 0.5), value)
              for position, row in enumerate(group)
              if (value := _eval_value(run, row)) is not None]
      bars = ax.barh([p for p, _ in kept], [v for _, v in kept], height=bar,
                     color=run.color, label=f"{run.name} (step {run.latest_eval['step']})")
      ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
    ax.set_yticks(np.arange(len(group)), [_eval_label(row) for row in group], fontsize=8)
    ax.invert_yaxis()  # First row on top, as in the table.
    ax.set_title(kind)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.12)
    ax.tick_params(labelbottom=True)
  axes[0].legend(fontsize=8)
  return _save(fig, out_dir, EVAL_PNG)


def _format(value: Optional[float]) -> str:
  return "—" if value is None else f"{value:.4g}"


def eval_headline(run: Run) -> str:
  """The latest evaluation in a few words: mixture averages, else a single task's metrics."""
  latest = run.latest_eval
  if latest is None:
    return "—"
  if latest.get("mixtures"):
    parts = [f"{name} average {_format(m['average'])}" for name, m in latest["mixtures"].items()]
  else:
    parts = [f"{task} {metric} {_format(value)}" for task, metrics in latest["tasks"].items()
             for metric, value in metrics.items()]
  return f"{'; '.join(parts)} (step {latest['step']})"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                 for row in body)
  return f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>"


def runs_table(runs: Sequence[Run]) -> str:
  """HTML table: per run its directory, steps, final loss, throughput, experts, eval."""
  body = []
  for run in runs:
    last = run.rows[-1]
    _, throughput = run.series("tokens_per_s")
    layers = run.moe_layers
    body.append([
        run.name, os.path.abspath(run.model_dir), str(last["step"]), _format(last.get("loss")),
        _format(float(np.median(throughput))) if len(throughput) else "—",
        f"{len(layers)} x {run.num_experts} experts" if layers else "none (dense)",
        eval_headline(run)])
  return _table(["run", "MODEL_DIR", "last step", "final loss", "tokens/s (median)",
                 "MoE layers", "eval"], body)


def eval_table(runs: Sequence[Run]) -> str:
  """HTML table: the latest eval metric per task and mixture (rows) per run (columns)."""
  return _table(["task / mixture: metric"]
                + [f"{run.name} (step {run.latest_eval['step']})" for run in runs],
                [[_eval_label(row)] + [_format(_eval_value(run, row)) for run in runs]
                 for row in _eval_rows(runs)])


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 2em 0; }
img { max-width: 100%; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


def _figure_html(path: str) -> str:
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  name = os.path.basename(path)
  return (f'<figure id="{name}"><img src="data:image/png;base64,{data}" alt="{name}">'
          f"<figcaption><b>{name}</b>: {html.escape(_CAPTIONS[name])}</figcaption></figure>")


def render_html(runs: Sequence[Run], figures: Sequence[str], notes: Sequence[str]) -> str:
  """The self-contained page: the runs' table, notes, the eval table, every figure embedded."""
  title = "moe-jax run report: " + " vs ".join(run.name for run in runs)
  parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", runs_table(runs)]
  parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
  evaluated = [run for run in runs if run.latest_eval]
  if evaluated:
    parts += ["<h2>Evaluation</h2>", eval_table(evaluated)]
  parts += ["<h2>Figures</h2>"] + [_figure_html(path) for path in figures]
  parts.append("</body></html>\n")
  return "\n".join(parts)


def write_report(model_dirs: Sequence[str], out_dir: Optional[str] = None,
                 names: Optional[Sequence[str]] = None) -> str:
  """Reads the runs, writes the PNGs and report.html into `out_dir`; returns the page's path.

  Args:
    model_dirs: one or more MODEL_DIRs.
    out_dir: where to write (default for one run: MODEL_DIR/report).
    names: the runs' labels (default: their directories' names).
  """
  if out_dir is None:
    if len(model_dirs) != 1:
      raise ValueError("Several runs need --out DIR: where the comparison goes.")
    out_dir = os.path.join(model_dirs[0], REPORT_SUBDIR)
  names = list(names) if names else default_names(model_dirs)
  if len(names) != len(model_dirs):
    raise ValueError(f"{len(names)} names for {len(model_dirs)} runs: give one per MODEL_DIR.")
  runs = [read_run(d, n) for d, n in zip(model_dirs, names)]
  for i, run in enumerate(runs):
    run.color = f"C{i % 10}"
  os.makedirs(out_dir, exist_ok=True)
  figures, notes = [plot_training(runs, out_dir)], []
  moe_runs = [run for run in runs if run.moe_layers]
  dense = [run.name for run in runs if not run.moe_layers]
  if dense:
    notes.append(f"No MoE layers (no experts/* metrics) in: {', '.join(dense)}"
                 + ("; expert figures omitted." if not moe_runs else "."))
  if moe_runs:
    figures += [plot_expert_usage(moe_runs, out_dir), plot_routing(moe_runs, out_dir)]
  unevaluated = [run.name for run in runs if not run.latest_eval]
  if unevaluated:
    notes.append(f"No {RESULTS_FILE} in: {', '.join(unevaluated)}.")
  if len(unevaluated) < len(runs):
    figures.append(plot_eval([run for run in runs if run.latest_eval], out_dir))
  for name in set(FIGURES) - {os.path.basename(p) for p in figures}:
    # A figure left from an earlier report of other runs would look current.
    stale = os.path.join(out_dir, name)
    if os.path.exists(stale):
      os.remove(stale)
  page = os.path.join(out_dir, HTML_FILE)
  with open(page, "w", encoding="utf-8") as f:
    f.write(render_html(runs, figures, notes))
  return page


def _report(args: argparse.Namespace) -> None:
  names = args.names.split(",") if args.names else None
  page = write_report(args.model_dirs, args.out, names)
  out_dir = os.path.dirname(os.path.abspath(page))
  figures = sorted(name for name in os.listdir(out_dir) if name in FIGURES)
  print(f"Wrote {os.path.abspath(page)} ({', '.join(figures)} beside it)")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.report",
                                   description=__doc__.split("\n\n")[0].strip())
  parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                      help="a training run's directory (several: compared side by side)")
  parser.add_argument("--out", metavar="DIR", help="output directory (default with one run: MODEL_DIR/report; "
                      "required with several)")
  parser.add_argument("--names", metavar="A,B", help="comma-separated run labels (default: directory names)")
  cli.add_output_flags(parser)
  return cli.run(_report, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
