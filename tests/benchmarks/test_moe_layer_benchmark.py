"""Tests for benchmarks/moe_layer.py: the CLI contract on a tiny config."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"
_spec = importlib.util.spec_from_file_location("moe_layer_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

KEYS = {"dispatch", "router", "experts", "topk", "group_size", "tokens", "expert_capacity",
        "moe_ms", "expert_bound_ms", "dense_equiv_ms", "bound_ratio", "tokens_per_s"}


def test_json_lines_and_table(capsys):
  benchmark.main(["--tokens", "1024", "--d_model", "16", "--d_ff", "32", "--experts", "4",
                  "--topk", "2", "--group_size", "1024", "--capacity_scales_with_k",
                  "--dispatch", "einsum,sorted,dropless", "--json"])
  lines = capsys.readouterr().out.splitlines()
  rows = [json.loads(line) for line in lines if line.startswith("{")]
  assert len(rows) == 3
  for row in rows:
    assert KEYS <= set(row)
    # On one device the group size is exactly what was asked for.
    assert row["group_size"] == 1024
    assert row["bound_ratio"] == pytest.approx(row["moe_ms"] / row["expert_bound_ms"], rel=0.01)
    # Ratios come from the reported times (4 significant digits, even sub-ms).
    assert row["bound_ratio"] == float(f"{row['moe_ms'] / row['expert_bound_ms']:.4g}")
    # What ran; the suite's 8 fake devices leave one strategy per mode.
    assert row["strategy"] == {"einsum": "einsum", "sorted": "sorted_buffers",
                               "dropless": "overflow"}[row["dispatch"]]
    if row["dispatch"] != "dropless":
      # round(1.25 * k * 1024 / 4)
      assert row["expert_capacity"] == round(1.25 * row["topk"] * 1024 / 4)
  assert any(line.startswith("| dispatch |") for line in lines)


def test_rejects_fewer_than_five_repeats():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--repeats", "3"])
