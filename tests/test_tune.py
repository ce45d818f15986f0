"""Measured choices (`moe_jax.tuning`), the MoE layer's measured 'auto', `moe_jax.tune`.

Timing asserts are relative with huge margins: an injected sleep of 50-200 ms
against a step of a few milliseconds at most.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import pytest

from moe_jax import tuning
from moe_jax.kernels import cpu_gmm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEM = {"name": "test problem", "rows": 8}
needs_cpu_kernels = pytest.mark.skipif(
    cpu_gmm.unavailable_reason() != "",
    reason=f"CPU grouped matmul kernels unavailable: {cpu_gmm.unavailable_reason()}")
# Built in the default cache; copied into the tests' private caches.
_KERNELS = "" if cpu_gmm.unavailable_reason() else cpu_gmm.build()


@pytest.fixture(autouse=True)
def _fresh_tuning(tmp_path, monkeypatch):
  """A private cache, measuring on, nothing remembered from other tests."""
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv(tuning.ENV_VAR, "measure")
  tuning.clear_memo()
  yield
  tuning.clear_memo()


def _step(seconds):
  return lambda: (lambda: time.sleep(seconds))


def _never_built():
  raise AssertionError("this candidate must not be measured")


@pytest.mark.parametrize("slow", ["a", "b"])
def test_a_slowed_candidate_is_not_chosen(slow):
  candidates = {name: _step(0.05 if name == slow else 0.0) for name in ("a", "b")}
  decision = tuning.choose(PROBLEM, candidates, static="a")
  assert decision.choice != slow
  assert decision.source == "measured"
  assert decision.times_ms[slow] > 40 > decision.times_ms[decision.choice]


def test_clearly_slower_candidate_stops_after_two_timed_runs():
  calls = {"slow": 0, "fast": 0}

  def counted(name, seconds):
    def step():
      calls[name] += 1
      time.sleep(seconds)
    return lambda: step

  times = tuning.measure({"slow": counted("slow", 0.05), "fast": counted("fast", 0.0)})
  assert calls == {"slow": 1 + 2, "fast": 1 + tuning.ROUNDS}  # Warm-up + timed runs.
  assert times["slow"] > times["fast"]


def test_static_setting_skips_measuring(monkeypatch):
  monkeypatch.setenv(tuning.ENV_VAR, "static")
  decision = tuning.choose(PROBLEM, {"a": _never_built, "b": _never_built}, static="b")
  assert (decision.choice, decision.source) == ("b", "static")
  assert not os.path.exists(tuning.cache_path())


def test_unknown_setting_is_an_actionable_error(monkeypatch):
  monkeypatch.setenv(tuning.ENV_VAR, "fast")
  with pytest.raises(ValueError, match="MOE_JAX_TUNING='fast'; set it to one of"):
    tuning.choose(PROBLEM, {"a": _never_built, "b": _never_built}, static="a")


def test_single_candidate_is_not_measured():
  assert tuning.choose(PROBLEM, {"a": _never_built}, static="a").source == "static"


def test_choice_is_reused_from_memo_and_from_disk():
  first = tuning.choose(PROBLEM, {"a": _step(0.05), "b": _step(0.0)}, static="a")
  never = {"a": _never_built, "b": _never_built}
  assert tuning.choose(PROBLEM, never, static="a") == first  # In-process memo.
  tuning.clear_memo()  # As a new process would start.
  again = tuning.choose(PROBLEM, never, static="a")
  assert (again.choice, again.source, dict(again.times_ms)) == (
      "b", "cache", dict(first.times_ms))


def test_cache_file_is_json_written_atomically():
  tuning.choose(PROBLEM, {"a": _step(0.0), "b": _step(0.02)}, static="b")
  with open(tuning.cache_path()) as f:
    data = json.load(f)
  (entry,) = data["entries"].values()
  assert entry["choice"] == "a" and entry["problem"] == PROBLEM
  assert entry["environment"] == tuning.environment()
  leftovers = [n for n in os.listdir(os.path.dirname(tuning.cache_path())) if n.endswith(".tmp")]
  assert not leftovers


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 99, "entries": {}}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(content, caplog):
  os.makedirs(os.path.dirname(tuning.cache_path()), exist_ok=True)
  with open(tuning.cache_path(), "w") as f:
    f.write(content)
  with caplog.at_level(logging.WARNING, logger="moe_jax.tuning"):
    decision = tuning.choose(PROBLEM, {"a": _step(0.05), "b": _step(0.0)}, static="a")
  assert decision.source == "measured" and decision.choice == "b"
  assert "ignoring" in caplog.text
  assert len(tuning.read_cache()) == 1


def test_key_covers_problem_and_blas_environment(monkeypatch):
  env = tuning.environment()
  key = tuning.cache_key(PROBLEM, env)
  assert tuning.cache_key(dict(PROBLEM), dict(env)) == key
  assert tuning.cache_key({**PROBLEM, "rows": 9}, env) != key
  for name in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    monkeypatch.setenv(name, "changed")
    assert tuning.cache_key(PROBLEM, tuning.environment()) != key
    monkeypatch.delenv(name)
  for field in ("backend", "device_kind", "device_count", "jaxlib", "kernel_build", "cpu_model"):
    assert field in env


def test_changed_environment_measures_again(monkeypatch):
  tuning.choose(PROBLEM, {"a": _step(0.05), "b": _step(0.0)}, static="a")
  monkeypatch.setenv("OPENBLAS_CORETYPE", "SomethingElse")
  decision = tuning.choose(PROBLEM, {"a": _step(0.0), "b": _step(0.05)}, static="a")
  assert (decision.choice, decision.source) == ("a", "measured")
  assert len(tuning.read_cache()) == 2


def test_failing_candidate_is_left_out(caplog):
  def broken():
    raise RuntimeError("out of memory")
  with caplog.at_level(logging.WARNING, logger="moe_jax.tuning"):
    decision = tuning.choose(PROBLEM, {"a": broken, "b": _step(0.0)}, static="a")
  assert decision.choice == "b" and "candidate a failed" in caplog.text


def test_measures_from_inside_a_jit_trace():
  # The MoE layer chooses while it is traced; candidates run concretely.
  def candidate(seconds):
    def build():
      f = jax.jit(lambda x: x * 2)
      x = jnp.ones(4)
      return lambda: (time.sleep(seconds), f(x))[1]
    return build

  @jax.jit
  def traced(x):
    decision = tuning.choose(PROBLEM, {"a": candidate(0.05), "b": candidate(0.0)}, static="a")
    return x + (1.0 if decision.choice == "b" else 0.0)

  assert float(traced(jnp.zeros(()))) == 1.0


def _env(tmp_path, **extra):
  """A single-device CPU environment (no fake devices), measuring on.

  The private cache gets a copy of the built kernels (nothing to compile).
  """
  if _KERNELS:
    shutil.copy(_KERNELS, tmp_path / os.path.basename(_KERNELS))
  env = dict(os.environ, JAX_PLATFORMS="cpu", MOE_JAX_CACHE_DIR=str(tmp_path),
             MOE_JAX_TUNING="measure", **extra)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  return env


def test_concurrent_processes_keep_every_entry(tmp_path):
  script = textwrap.dedent("""
      import sys, time
      from moe_jax import tuning
      step = lambda s: (lambda: (lambda: time.sleep(s)))
      tuning.choose({"name": sys.argv[1]}, {"a": step(0.02), "b": step(0.0)}, static="a")
  """)
  env = dict(os.environ, MOE_JAX_CACHE_DIR=str(tmp_path), MOE_JAX_TUNING="measure")
  processes = [subprocess.Popen([sys.executable, "-c", script, f"p{i}"], cwd=REPO, env=env)
               for i in range(3)]
  assert [p.wait(timeout=300) for p in processes] == [0, 0, 0]
  entries = tuning.read_cache()
  assert sorted(e["problem"]["name"] for e in entries.values()) == ["p0", "p1", "p2"]
  assert all(e["choice"] == "b" for e in entries.values())


_LAYER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import io_callback
    from moe_jax import tuning
    from moe_jax.layers import dispatch, moe, routing

    slow, implementation = sys.argv[1], sys.argv[2]
    original = dispatch.STRATEGIES[slow]

    def slowed(x, decision, experts, capacity):
      result = original(x, decision, experts, capacity)
      pause = io_callback(lambda: (time.sleep(0.2), np.float32(0))[1],
                          jax.ShapeDtypeStruct((), jnp.float32))
      return result.replace(output=result.output + pause)

    dispatch.STRATEGIES[slow] = slowed
    layer = moe.MoeLayer(num_experts=4, router=routing.TokensChooseRouter(num_selected_experts=2),
                         expert_mlp_dim=32, max_group_size=64,
                         grouped_matmul_implementation=implementation)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 16))
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)["params"]
    y = jax.jit(lambda p, x: layer.apply({"params": p}, x, enable_dropout=True))(params, x)
    print(json.dumps({"plan": layer.dispatch_plan(x.shape, x.dtype, train=True).name,
                      "decisions": [(d.choice, d.source) for d in tuning.decisions()]}))
""")


def _run_layer(tmp_path, slow, implementation="auto"):
  result = subprocess.run([sys.executable, "-c", _LAYER_SCRIPT, slow, implementation],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@needs_cpu_kernels
@pytest.mark.parametrize("slow, expected", [("sorted_rows", "sorted_buffers"),
                                            ("sorted_buffers", "sorted_rows/cpu_blas")])
def test_layer_auto_does_not_pick_a_slowed_strategy(tmp_path, slow, expected):
  out, log = _run_layer(tmp_path, slow)
  assert out["plan"] == expected
  assert out["decisions"] == [[expected, "measured"]]
  assert log.count("moe_jax.tuning: measured MoeLayer sorted E=4") == 1
  # A second process reads the choice from the cache, measuring nothing.
  out, log = _run_layer(tmp_path, slow)
  assert out["decisions"] == [[expected, "cache"]] and "measured" not in log


@needs_cpu_kernels
def test_layer_explicit_choice_is_never_overridden(tmp_path):
  out, log = _run_layer(tmp_path, "sorted_rows", implementation="cpu_blas")
  assert out == {"plan": "sorted_rows/cpu_blas", "decisions": []}
  assert "measured" not in log


def _tune(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "moe_jax.tune", *args], cwd=REPO,
                        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
                        check=False)


@needs_cpu_kernels
def test_tune_command_fills_the_cache(tmp_path):
  args = ["--gin_file", "gin/models/tiny_moe.gin", "--gin.ACTIVATION_DTYPE='float32'",
          "--batch", "2", "--lengths", "64,64"]
  first = _tune(tmp_path, *args, "--json")
  assert first.returncode == 0, first.stderr
  rows = [json.loads(line) for line in first.stdout.splitlines()]
  # Train and eval capacities; the encoder's and decoder's layers share a shape.
  assert len(rows) == 2 and {row["problem"]["train"] for row in rows} == {True, False}
  for row in rows:
    assert row["source"] == "measured"
    assert set(row["times_ms"]) == set(row["problem"]["candidates"]) == {
        "sorted_rows/cpu_blas", "sorted_buffers"}
    assert row["choice"] == min(row["times_ms"], key=row["times_ms"].get)
  second = _tune(tmp_path, *args)
  assert second.returncode == 0, second.stderr
  assert second.stdout.count("| cache |") == 2 and "| layer |" in second.stdout


def test_tune_command_errors_are_one_line(tmp_path):
  result = _tune(tmp_path, "--gin_file", "gin/models/tiny_moe.gin", "--batch", "2")
  assert result.returncode == 2
  assert result.stderr.strip() == ("python -m moe_jax.tune: give --lengths "
                                   "ENCODER_LENGTH,DECODER_LENGTH (the gin files bind no "
                                   "TASK_FEATURE_LENGTHS).")
