"""`moe_jax.report`: the figures and HTML page of one run or several."""

import base64
import json
import os
import shutil
import subprocess
import sys

from matplotlib import image as mpl_image
import pytest

from moe_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("encoder/layers_1", "decoder/layers_1")
EXPERTS = 4
# The toy run evaluates `toy_copy` at its end, through the training loop.
TOY_EVAL_GIN = """from __gin__ import dynamic_registration
from moe_jax import inputs
INFER_EVAL_DATASET_CFG = @infer_eval/inputs.DatasetConfig()
infer_eval/inputs.DatasetConfig:
  mixture_or_task_name = 'toy_copy'
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'validation'
  batch_size = 8
  shuffle = False
  pack = False
  module = %MIXTURE_OR_TASK_MODULE
"""


def _row(step, moe=True):
  """One logged step shaped like `MetricsLogger`'s lines (values made up, all distinct)."""
  row = {"step": step, "loss": 6.0 - 0.1 * step, "cross_ent_loss": 5.9 - 0.1 * step,
         "accuracy": 0.01 * step, "learning_rate": 1e-2, "tokens_per_s": 1000.0 + step,
         "step_time_ms": 100.0, "grad_norm": 1.0 / step, "z_loss": 1e-3}
  if moe:
    row.update({"experts/auxiliary_loss": 0.02, "experts/router_z_loss": 0.004,
                "experts/fraction_tokens_left_behind": 0.01, "experts/expert_usage": 0.8,
                "experts/router_confidence": 0.3, "experts/max_expert_fraction": 0.4})
    for i, layer in enumerate(LAYERS):
      prefix = f"experts/{layer}/"
      skew = 0.05 * ((step + i) % 3)
      row.update({prefix + "auxiliary_loss": 2.0 + skew, prefix + "router_z_loss": 4.0 - skew,
                  prefix + "fraction_tokens_left_behind": skew / 10,
                  prefix + "expert_usage": 0.8, prefix + "router_confidence": 0.3 + skew,
                  prefix + "expert_fraction": [0.25 + skew, 0.25 - skew, 0.25, 0.25]})
  return row


def _write_run(model_dir, steps, moe=True, evaluations=()):
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, report.METRICS_FILE), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(_row(step, moe)) + "\n" for step in steps)
  if evaluations:
    with open(os.path.join(model_dir, report.RESULTS_FILE), "w", encoding="utf-8") as f:
      json.dump({"evaluations": list(evaluations), "latest": evaluations[-1]}, f)
  return str(model_dir)


def _evaluation(step, score):
  return {"step": step,
          "tasks": {"task_a": {"accuracy": score}, "task_b": {"exact_match": score / 2,
                                                               "rouge1": score / 3}},
          "mixtures": {"suite": {"average": 0.75 * score, "num_tasks": 2}}}


@pytest.fixture
def moe_run(tmp_path):
  return _write_run(tmp_path / "moe", range(1, 11),
                    evaluations=[_evaluation(5, 40.0), _evaluation(10, 60.0)])


@pytest.fixture
def dense_run(tmp_path):
  return _write_run(tmp_path / "dense", range(2, 11, 2), moe=False)


def _read_html(page):
  with open(page, encoding="utf-8") as f:
    return f.read()


def _assert_figures(page, names):
  """Exactly `names` were written beside the page, decode as PNGs, and are embedded."""
  out_dir = os.path.dirname(page)
  assert sorted(n for n in os.listdir(out_dir) if n.endswith(".png")) == sorted(names)
  text = _read_html(page)
  for name in names:
    path = os.path.join(out_dir, name)
    with open(path, "rb") as f:
      data = f.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
    height, width, _ = mpl_image.imread(path).shape
    assert height > 100 and width > 100, name
    assert f'id="{name}"' in text
    assert f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" in text, name
  assert text.count("<img ") == len(names)
  assert "http://" not in text and "https://" not in text  # Views offline.


def test_a_real_toy_run_with_eval(tmp_path, capsys):
  # Imported here: the training modules load JAX and TensorFlow, which the rest does not need.
  from moe_jax.training import evaluation  # pylint: disable=g-import-not-at-top
  from moe_jax.training import metrics  # pylint: disable=g-import-not-at-top
  from tests.training import conftest  # pylint: disable=g-import-not-at-top
  assert (report.METRICS_FILE, report.RESULTS_FILE) == (metrics.METRICS_FILE,
                                                        evaluation.RESULTS_FILE)
  eval_gin = tmp_path / "eval.gin"
  eval_gin.write_text(TOY_EVAL_GIN)
  model_dir = tmp_path / "run"
  conftest.train_toy(model_dir, gin_files=(conftest.TOY_RUN, str(eval_gin)), TRAIN_STEPS=3)
  capsys.readouterr()
  # --verbose: leave this test process's logging settings as they are.
  assert report.main([str(model_dir), "--verbose"]) == 0
  page = os.path.join(model_dir, "report", "report.html")
  assert capsys.readouterr().out.strip() == (
      f"Wrote {page} (eval.png, expert_usage.png, routing.png, training.png beside it)")
  _assert_figures(page, report.FIGURES)
  text = _read_html(page)
  assert "toy_copy: exact_match" in text and "<td>3</td>" in text  # Eval table; last step.


def test_resumed_run_keeps_the_last_value_per_step(tmp_path):
  model_dir = _write_run(tmp_path / "run", range(1, 7))
  relogged = dict(_row(5), loss=0.5)
  with open(os.path.join(model_dir, report.METRICS_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(relogged) + "\n" + json.dumps(_row(6)) + "\n" + '{"step": 7, "lo')
  run = report.read_run(model_dir)
  steps, losses = run.series("loss")
  assert steps.tolist() == [1, 2, 3, 4, 5, 6]  # The cut last line (a killed run) is skipped.
  assert losses[4] == 0.5
  assert run.moe_layers == list(LAYERS) and run.num_experts == EXPERTS


def test_one_moe_run_draws_every_figure(moe_run):
  page = report.write_report([moe_run])
  _assert_figures(page, report.FIGURES)
  text = _read_html(page)
  assert "suite average 45 (step 10)" in text  # The latest evaluation's headline.
  assert "2 x 4 experts" in text


def test_a_dense_run_has_no_expert_figures(dense_run):
  out_dir = os.path.join(dense_run, "report")
  os.makedirs(out_dir)
  stale = os.path.join(out_dir, report.EXPERT_USAGE_PNG)
  with open(stale, "wb") as f:  # From an earlier report into the same directory.
    f.write(b"old")
  page = report.write_report([dense_run])
  _assert_figures(page, [report.TRAINING_PNG])
  text = _read_html(page)
  assert "No MoE layers (no experts/* metrics) in: dense; expert figures omitted." in text
  assert "No eval_results.json in: dense." in text and "none (dense)" in text


def test_two_runs_side_by_side(tmp_path, moe_run, dense_run):
  other = _write_run(tmp_path / "b" / "moe", range(1, 6), evaluations=[_evaluation(5, 30.0)])
  page = report.write_report([moe_run, other, dense_run], str(tmp_path / "compare"))
  _assert_figures(page, report.FIGURES)
  text = _read_html(page)
  # Names tell the runs apart: the clashing two get their parent directory.
  assert f"run report: {tmp_path.name}/moe vs b/moe vs dense</h1>" in text
  # Eval table: a column per evaluated run, a row per task metric and mixture.
  assert f"<th>{tmp_path.name}/moe (step 10)</th><th>b/moe (step 5)</th>" in text
  assert "<td>task_b: rouge1</td><td>20</td><td>10</td>" in text
  assert "<td>suite: average</td><td>45</td><td>22.5</td>" in text
  assert "No MoE layers (no experts/* metrics) in: dense." in text


def test_names_label_the_runs(tmp_path, moe_run, dense_run):
  out_dir = str(tmp_path / "out")
  assert report.main([moe_run, dense_run, "--out", out_dir, "--names", "router A,dense",
                      "--verbose"]) == 0
  assert "run report: router A vs dense</h1>" in _read_html(os.path.join(out_dir, "report.html"))
  with pytest.raises(ValueError, match="1 names for 2 runs"):
    report.write_report([moe_run, dense_run], out_dir, names=["a"])
  with pytest.raises(ValueError, match="A MODEL_DIR is given twice"):
    report.write_report([moe_run, moe_run], out_dir)


def test_several_runs_need_an_output_directory(moe_run, dense_run, capsys):
  assert report.main([moe_run, dense_run, "--verbose"]) == 2
  assert capsys.readouterr().err.strip() == (
      "python -m moe_jax.report: Several runs need --out DIR: where the comparison goes.")


def test_a_directory_without_metrics_is_a_one_line_error(tmp_path):
  result = subprocess.run([sys.executable, "-m", "moe_jax.report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"python -m moe_jax.report: No train_metrics.jsonl in {str(tmp_path)!r}: it is written "
      "by training (python -m moe_jax.train --gin.MODEL_DIR=...) at its first logged step.")


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of the page: records script errors and how many images decoded.
PROBE = """<script>
window.addEventListener("error", e => { document.body.dataset.errors = e.message; });
window.addEventListener("load", () => {
  document.body.dataset.decoded = [...document.images].filter(i => i.naturalWidth > 0).length;
});
</script>"""


@pytest.mark.skipif(BROWSER is None, reason="no chromium (or chromium-browser) on PATH")
def test_the_page_opens_in_a_headless_browser(tmp_path, moe_run):
  page = report.write_report([moe_run], str(tmp_path / "out"))
  probe = tmp_path / "probe.html"
  probe.write_text(_read_html(page).replace("</body>", PROBE + "</body>"), encoding="utf-8")
  result = subprocess.run(
      [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
       f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
       "--dump-dom", probe.as_uri()],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert f'data-decoded="{len(report.FIGURES)}"' in result.stdout, result.stdout[-2000:]
  assert "data-errors" not in result.stdout
