"""benchmarks/gpu_suite.{sh,py}: the one-call GPU suite, proven end to end on the CPU.

`--cpu_smoke` runs every stage that can run on a CPU on tiny shapes (the
GPU-only ones have the GPU run's exact arguments parsed by their scripts), so
a broken stage is found here, not in scarce GPU time.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu_suite

REPO = pathlib.Path(__file__).resolve().parents[2]


def _records(out):
  with open(out / "results.jsonl") as f:
    return [json.loads(line) for line in f]


def test_cpu_smoke_runs_every_stage_end_to_end(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("OUT", None)
  result = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--cpu_smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  records = _records(out)
  status = {r["stage"]: r["state"] for r in records if r["record"] == "status"}
  gpu_only = {s.name for s in gpu_suite.stages(smoke=True) if s.gpu_only}
  assert status == {s.name: "not_run" if s.name in gpu_only else "ok"
                    for s in gpu_suite.stages(smoke=True)}
  # Every GPU stage's exact command line was parsed by its script.
  checks = {r["stage"]: r["state"] for r in records if r["record"] == "check"}
  assert checks == {s.name: "checked" for s in gpu_suite.stages(smoke=False)}
  env_line, = [r for r in records if r["record"] == "env"]
  assert env_line["backend"] == "cpu" and env_line["matmul_bf16"]["tflops"] >= 0
  rows = [r for r in records if r["stage"] == "layer_auto" and r["record"] == "row"]
  assert {r["dispatch"] for r in rows} == {"sorted", "dropless"}
  profiles = [r for r in records if r["record"] == "profile"]
  assert [p["what"].split()[0] for p in profiles] == ["train", "moe"]
  for profile in profiles:
    assert profile["events"] > 0 and profile["matched_hlo"] > 0.5 and profile["top3"]
  summary = (out / "summary.md").read_text()
  for heading in ("## MoE layer", "## Profile: train step", "## Stages"):
    assert heading in summary
  assert summary in result.stdout  # Printed last: the device tool returns the end.
  assert len(list(out.iterdir())) <= 8  # The device tool returns at most 8 files.
  # The saved train profile summarizes again offline.
  assert gpu_suite.main(["trace", str(out / "train_profile.xplane.pb"),
                         str(out / "train_step.hlo.txt.gz"), "--steps", "2"]) == 0


def test_stages_have_distinct_names_and_fit_the_device_call():
  for smoke in (False, True):
    names = [s.name for s in gpu_suite.stages(smoke)]
    assert len(names) == len(set(names))
  assert gpu_suite.DEFAULT_BUDGET_S + 30 < 600  # One call: 600 s at most.
  gpu = {s.name: s for s in gpu_suite.stages(smoke=False)}
  assert gpu["layer_auto"].argv[:1] == ("benchmarks/moe_layer.py",)
  assert "--grouped_matmul_implementation" not in gpu["layer_auto"].argv  # 'auto'
  assert ("MOE_JAX_TUNING", "static") in gpu["forced_mosaic_default_tiles"].env
  assert ("JAX_PLATFORMS", "cuda") in gpu["tests"].env


def test_a_stuck_stage_is_killed_at_its_limit_and_the_budget_skips(tmp_path):
  suite = gpu_suite.Suite(str(tmp_path / "out"), str(tmp_path), budget_s=8, smoke=False,
                          min_stage_s=1, reserve_s=0)
  stuck = gpu_suite.Stage("stuck", ("-c", "import time\nprint('{\"a\": 1}', flush=True)\n"
                                          "time.sleep(60)"), cap_s=2)
  status = suite.run(stuck)
  assert status["state"] == "timed_out" and status["seconds"] < 10
  suite.deadline = 0  # No budget left.
  assert suite.run(gpu_suite.Stage("late", ("-c", "pass"), cap_s=5))["state"] == "skipped"
  suite.results.close()
  records = _records(tmp_path / "out")
  assert {"stage": "stuck", "record": "row", "a": 1} in records


HLO = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%fused_computation.1 (param_0: f32[8,4], param_1: f32[4,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %fusion.1 = f32[8,4]{1,0} fusion(%p, %p), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(step)/transpose(jvp(EncoderDecoder))/encoder/layers_3/attention/query/dot_general"}
  %custom-call.2 = (f32[8,4]{1,0}, s8[16]{0}) custom-call(%fusion.1), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step)/jvp(MoeLayer)/pallas_call"}
  %sort.3 = f32[8,4]{1,0} sort(%p), dimensions={0}, metadata={op_name="jit(step)/jvp(MoeLayer)/sort;jit(step)/jvp(MoeLayer)/loss"}
  ROOT %add.4 = f32[8,4]{1,0} add(%p, %p), metadata={op_name="jit(loss)/jvp(MoeLayer)/mul"}
}
"""


def test_hlo_parsing_and_cost_categories():
  ops = gpu_suite.hlo_instructions(HLO)
  assert ops["fusion.1"]["ops"] == ["dot", "fusion", "parameter"]
  assert ops["custom-call.2"]["target"] == "mosaic_gpu_v2"
  category = {name: gpu_suite.classify(name, ops.get(name)) for name in
              ("fusion.1", "custom-call.2", "sort.3", "add.4", "cublas-gemm.7")}
  assert category == {"fusion.1": "attention matmuls",
                      "custom-call.2": "expert grouped-matmul kernels",
                      "sort.3": "dispatch/combine (sort, gather, scatter)",
                      "add.4": "other elementwise/fusions",  # not 'loss': jit(loss) is a wrapper
                      "cublas-gemm.7": "other matmuls (dense FFN, router)"}
  assert gpu_suite.scope_of(ops["fusion.1"]["op_name"]) == \
      "encoder/layers_*/attention/query (bwd)"
  assert gpu_suite.scope_of("") == "(no op_name)"


def test_summary_tables_and_floors(tmp_path):
  records = [
      {"stage": "layer_auto", "record": "row", "dispatch": "dropless", "strategy":
       "ragged/tokamax", "experts": 8, "tokens": 4096, "moe_ms": 1.0, "expert_bound_ms": 0.85,
       "bound_ratio": 1.176, "dense_ratio": 1.5, "tokens_per_s": 4.1e6},
      {"stage": "layer_large", "record": "row", "dispatch": "dropless", "strategy":
       "ragged/mosaic_gpu", "experts": 64, "tokens": 32768, "moe_ms": 14.0,
       "expert_bound_ms": 10.0, "bound_ratio": 1.4, "dense_ratio": 1.6, "tokens_per_s": 2.3e6},
      {"stage": "train", "record": "row", "model": "moe", "step_ms": 100.0, "tokens_per_s": 4e5,
       "mfu": 0.41, "achieved_tflops": 405.0, "device_peak_bytes": 2**34, "compile_s": 30.0,
       "ratio_to_dense": 1.2},
      {"stage": "train", "record": "status", "state": "ok", "seconds": 80.0, "rc": 0},
  ]
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (tmp_path / "tuning.json").write_text(json.dumps({"version": 1, "entries": {"k": {
      "choice": "ragged/tokamax", "times_ms": {"ragged/mosaic_gpu": 1.01, "ragged/tokamax": 1.02},
      "problem": {"layer": "MoeLayer", "name": "MoeLayer dropless E=8", "train": True}}}}))
  text = gpu_suite.summarize(str(tmp_path))
  assert "| meets 1.25 |" in text and "| MISSES 1.35 |" in text
  assert "ragged/mosaic_gpu 1.010, ragged/tokamax 1.020 | ragged/tokamax |" in text
  assert "| moe | 100.0 | 400000.0 | 0.41 | 405.0 | 16.0 | 30.0 | 1.2 |" in text
  assert "| train | ok | 80.0 |" in text


@pytest.mark.parametrize("argv", [["run", "--list"], ["run", "--list", "--cpu_smoke"]])
def test_list(capsys, argv):
  assert gpu_suite.main(argv) == 0
  out = capsys.readouterr().out
  assert "layer_auto" in out and "benchmarks/moe_layer.py" in out
