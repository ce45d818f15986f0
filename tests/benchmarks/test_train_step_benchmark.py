"""Tests for benchmarks/train_step.py: the CLI contract on a tiny config."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
_spec = importlib.util.spec_from_file_location("train_step_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

TINY = ["--d_model", "32", "--d_ff", "64", "--heads", "2", "--experts", "4", "--layers", "1",
        "--batch", "8", "--lengths", "16,8", "--vocab", "64", "--repeats", "3"]


def test_json_lines_and_table(capsys):
  benchmark.main(TINY + ["--json", "--peak_tflops", "1.0"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["model"] for r in rows] == ["moe", "dense_equal"]
  moe, dense = rows
  for row in rows:
    assert {"config", "step_ms", "tokens_per_s", "compile_s", "flops_per_step", "mfu"} <= set(row)
    assert row["tokens_per_s"] == pytest.approx(8 * 24 / (row["step_ms"] / 1e3), rel=1e-3)
  # Same activated FLOPs per token: only the router and the gathers differ.
  assert moe["flops_per_step"] == pytest.approx(dense["flops_per_step"], rel=0.02)
  assert moe["ratio_to_dense"] == pytest.approx(moe["step_ms"] / dense["step_ms"], rel=1e-3)
  benchmark.main(TINY)
  assert capsys.readouterr().out.startswith("| model | step_ms |")


def test_rejects_a_dense_gin_model():
  with pytest.raises(ValueError, match="builds a dense model"):
    benchmark.main(["--gin_file", "gin/models/tiny.gin", "--batch", "8", "--lengths", "16,8",
                    "--repeats", "3"])
