"""The GPU measurement suite (issue 12): every measurement in one call, JSON out.

`benchmarks/gpu_suite.sh` (the entry point: installs carried wheels, sets the
environment, caps the whole run with `timeout`) runs `python
benchmarks/gpu_suite.py run`, which runs the stages below in order, each in
its own process (a process group) under its own time limit, within one
overall budget: a stage starts only if enough of the budget is left, and is
given at most what is left. Its stdout and stderr go to `suite.log`; every
JSON line it prints goes to `results.jsonl`, tagged with the stage's name,
followed by one status line per stage. Last, `summary.md` (printed too: the
device tool returns the end of the output).

Stages (in order of priority; `--list` prints them with their commands):
  env              device, driver, versions; a bf16 matmul and a copy, timed
                   (the chip's measured ceilings)
  tests            tests/layers/test_grouped_matmul.py (the Hopper-only tests
                   compare Mosaic and tokamax with a float32 reference)
  layer_auto       benchmarks/moe_layer.py, the README's GPU command (bf16,
                   E = 8, 32, 128; sorted and dropless): the measured 'auto'
  layer_large      the larger shape (32768 tokens, d_model 1024, d_ff 4096,
                   group 4096; E = 8, 64), measured 'auto'
  train            benchmarks/train_step.py, a Flan-MoE-Base-size model (12+12
                   layers, d_model 768, E = 16 top-2 experts of 2048 in every
                   FFN) and its dense equal, bf16, MFU against 989 TFLOP/s
  profile          a jax.profiler trace of 3 train steps and of 5 steps of the
                   E = 128 dropless layer, summarized offline (XLA ops on the
                   device, attributed through the compiled HLO's op_name
                   metadata): top ops, top cost categories and scopes
  forced_*         the layer with each candidate forced: Mosaic at measured
                   tiles, Mosaic at the default tiles, tokamax, padded buffers
                   + overflow, XLA's dense ragged_dot; then the larger shape
                   with Mosaic and tokamax forced
  (summary)        summary.md from results.jsonl and the tuning cache

Files under `--out` (the device tool's $OUT; at most 8 files come back):
results.jsonl, suite.log, summary.md, tuning.json (the measured choices:
each candidate's time, per shape), and, when under 15 MB, the train profile
(train_profile.xplane.pb, train_step.hlo.txt.gz: `gpu_suite.py trace` reads
them again offline).

`--cpu_smoke`: the same stages on tiny shapes on the CPU (the GPU-only ones
have their arguments checked by their parsers instead), so that CI proves the
suite end to end (tests/benchmarks/test_gpu_suite.py).

Subcommands `env` and `profile` are stages; `summarize` rebuilds summary.md;
`trace` summarizes a saved profile again.

Wheels (the device machine has jax, flax, optax, jaxtyping, absl but no
network): tokamax and what it needs that the machine lacks, and gin-config
(moe_jax.config), for Python 3.12 x86-64, downloaded once into .whl/ (ignored
by git; carried with the call: `carry: [".whl"]`):

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
      tokamax==0.0.12 qwix==0.1.8 einshape==1.0 typeguard==2.13.3 \
      immutabledict==4.3.1 tensorboardX==2.6.5 pydantic==2.14.4 \
      pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      typing-extensions==4.16.0 gin-config==0.5.0

(3.7 MB.) gpu_suite.sh installs them with `pip install --no-index --no-deps
--target /tmp/site` and puts /tmp/site first on PYTHONPATH.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Where the suite stops starting stages: the device tool allows 600 s per
# command, and a session 900 s of device time, the machine's start (1-2 min)
# and idle time included: 500 s leaves a margin, not a second full run.
DEFAULT_BUDGET_S = 500
SMOKE_BUDGET_S = 150
MIN_STAGE_S = 20        # A stage needs at least this much of the budget left.
RESERVE_S = 8           # Kept for the summary.
H200_BF16_PEAK_TFLOPS = 989.0  # Dense bf16, datasheet (H100 SXM: the same).
XPLANE_LIMIT_BYTES = 15 * 2**20

# --- the shapes -------------------------------------------------------------
_COMMON = ["--topk", "2", "--capacity_factor", "1.25", "--capacity_scales_with_k",
           "--dtype", "bfloat16", "--json"]
SMALL = ["--tokens", "4096", "--d_model", "512", "--d_ff", "2048", "--experts", "8,32,128",
         "--group_size", "1024", "--repeats", "20"] + _COMMON
LARGE = ["--tokens", "32768", "--d_model", "1024", "--d_ff", "4096", "--experts", "8,64",
         "--group_size", "4096", "--repeats", "10"] + _COMMON
TRAIN = ["--d_model", "768", "--d_ff", "2048", "--heads", "12", "--experts", "16", "--topk",
         "2", "--layers", "12", "--group_size", "4096", "--capacity_factor", "1.25",
         "--vocab", "32128", "--batch", "64", "--lengths", "512,128", "--dtype", "bfloat16",
         "--repeats", "10", "--peak_tflops", str(H200_BF16_PEAK_TFLOPS), "--json"]
# The layer whose profile is summarized: the worst GPU ratio so far (README).
PROFILE_LAYER = ["--tokens", "4096", "--d_model", "512", "--d_ff", "2048", "--experts",
                 "128", "--topk", "2", "--capacity_factor", "1.25",
                 "--capacity_scales_with_k", "--group_size", "1024", "--dispatch",
                 "dropless", "--dtype", "bfloat16", "--repeats", "5"]

SMOKE_SMALL = ["--tokens", "512", "--d_model", "32", "--d_ff", "64", "--experts", "4",
               "--group_size", "256", "--repeats", "5", "--topk", "2",
               "--capacity_factor", "1.25", "--capacity_scales_with_k", "--dtype",
               "bfloat16", "--json"]
SMOKE_TRAIN = ["--d_model", "32", "--d_ff", "64", "--heads", "2", "--experts", "4", "--topk",
               "2", "--layers", "1", "--group_size", "64", "--vocab", "128", "--batch", "2",
               "--lengths", "32,16", "--dtype", "bfloat16", "--repeats", "3",
               "--peak_tflops", "1", "--json"]
SMOKE_PROFILE_LAYER = ["--tokens", "512", "--d_model", "32", "--d_ff", "64", "--experts",
                       "4", "--topk", "2", "--group_size", "256", "--dispatch", "dropless",
                       "--dtype", "bfloat16", "--repeats", "5"]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of the suite: a Python script and its arguments.

  Attributes:
    name: the tag of its JSON lines.
    argv: script path (relative to the repository) and arguments.
    cap_s: its own time limit.
    env: extra environment variables.
    gpu_only: in --cpu_smoke, only its arguments are checked.
    jax_cache: use the persistent compilation cache (shared by the train
      and profile stages: the profile's compilation is a cache hit).
  """

  name: str
  argv: Tuple[str, ...]
  cap_s: int
  env: Tuple[Tuple[str, str], ...] = ()
  gpu_only: bool = False
  jax_cache: bool = False


def _layer(name, shape, cap_s, *extra, env=(), gpu_only=False) -> Stage:
  return Stage(name, ("benchmarks/moe_layer.py",) + tuple(shape) + tuple(extra), cap_s,
               env=tuple(env), gpu_only=gpu_only)


def stages(smoke: bool) -> List[Stage]:
  """The suite's stages, in order of priority."""
  small, large = (SMOKE_SMALL, SMOKE_SMALL) if smoke else (SMALL, LARGE)
  train = SMOKE_TRAIN if smoke else TRAIN
  profile_layer = SMOKE_PROFILE_LAYER if smoke else PROFILE_LAYER
  sorted_dropless = ("--dispatch", "sorted,dropless")
  # The nested-measurement test repeats what layer_auto does: left to it.
  tests = (("-m", "pytest", "--collect-only", "-q") if smoke else
           ("-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-k",
            "not layer_auto_measures_tiles"))
  steps = "2" if smoke else "3"
  return [
      Stage("env", ("benchmarks/gpu_suite.py", "env") + (("--small",) if smoke else ()), 60),
      # tests/conftest.py sets JAX_PLATFORMS=cpu unless it is set: the GPU here.
      Stage("tests", tests + ("tests/layers/test_grouped_matmul.py",), 100,
            env=() if smoke else (("JAX_PLATFORMS", "cuda"),)),
      _layer("layer_auto", small, 200, *sorted_dropless),
      # In --cpu_smoke the profile stage builds (and times) the train step.
      Stage("train", ("benchmarks/train_step.py",) + tuple(train), 240, jax_cache=True,
            gpu_only=smoke),
      Stage("profile", ("benchmarks/gpu_suite.py", "profile", "--steps", steps,
                        "--train_args=" + " ".join(train),
                        "--layer_args=" + " ".join(profile_layer)), 150, jax_cache=True),
      _layer("layer_large", large, 160, *sorted_dropless, gpu_only=True),
      _layer("forced_mosaic", small, 100, *sorted_dropless, "--dropless_backend", "ragged",
             "--grouped_matmul_implementation", "mosaic_gpu", gpu_only=True),
      _layer("forced_tokamax", small, 100, *sorted_dropless, "--dropless_backend", "ragged",
             "--grouped_matmul_implementation", "tokamax", gpu_only=True),
      _layer("forced_mosaic_default_tiles", small, 90, "--dispatch", "dropless",
             "--dropless_backend", "ragged", "--grouped_matmul_implementation", "mosaic_gpu",
             env=(("MOE_JAX_TUNING", "static"),), gpu_only=True),
      _layer("forced_buffers_overflow", small, 90, *sorted_dropless, "--dropless_backend",
             "overflow", "--grouped_matmul_implementation", "xla", gpu_only=smoke),
      _layer("large_forced_mosaic", large, 100, "--dispatch", "dropless",
             "--dropless_backend", "ragged", "--grouped_matmul_implementation", "mosaic_gpu",
             gpu_only=True),
      _layer("large_forced_tokamax", large, 100, "--dispatch", "dropless",
             "--dropless_backend", "ragged", "--grouped_matmul_implementation", "tokamax",
             gpu_only=True),
      _layer("forced_xla_ragged", small, 80, "--dispatch", "dropless", "--dropless_backend",
             "ragged", "--grouped_matmul_implementation", "xla", gpu_only=True),
  ]


# --- running the stages -----------------------------------------------------
class Suite:
  """Runs stages within a budget; collects their JSON lines."""

  def __init__(self, out: str, work: str, budget_s: float, smoke: bool,
               min_stage_s: float = MIN_STAGE_S, reserve_s: float = RESERVE_S):
    self.out, self.work, self.smoke = out, work, smoke
    self.min_stage_s, self.reserve_s = min_stage_s, reserve_s
    self.deadline = time.monotonic() + budget_s
    os.makedirs(out, exist_ok=True)
    self.results = open(os.path.join(out, "results.jsonl"), "a", buffering=1)
    self.log = open(os.path.join(out, "suite.log"), "a", buffering=1)

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def emit(self, record: Dict) -> None:
    self.results.write(json.dumps(record, sort_keys=True, default=str) + "\n")

  def environment(self, stage: Stage) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p),
        "MOE_JAX_CACHE_DIR": os.path.join(self.work, "moe_jax_cache"),  # tuning.json
        "MOE_JAX_TUNING": "static" if self.smoke else "measure",
        "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "1"),
    })
    if self.smoke:
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                  if "xla_force_host_platform_device_count" not in f)
    if stage.jax_cache:
      env.update({"JAX_COMPILATION_CACHE_DIR": os.path.join(self.work, "jax_cache"),
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})
    if stage.name == "profile":
      env["GPU_SUITE_OUT"] = self.out
      env["GPU_SUITE_WORK"] = self.work
    env.update(dict(stage.env))
    return env

  def run(self, stage: Stage) -> Dict:
    """Runs one stage (or skips it); returns its status record."""
    status = {"stage": stage.name, "record": "status", "command": " ".join(stage.argv)}
    if self.smoke and stage.gpu_only:
      status.update(state="not_run", reason="GPU only (--cpu_smoke checks its arguments)")
      self.emit(status)
      return status
    limit = min(stage.cap_s, self.left() - self.reserve_s)
    if limit < self.min_stage_s:
      status.update(state="skipped", reason=f"budget: {self.left():.0f} s left")
      self.emit(status)
      return status
    self.log.write(f"\n===== {stage.name} (limit {limit:.0f} s): "
                   f"{' '.join(stage.argv)}\n")
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable] + list(stage.argv), cwd=REPO, env=self.environment(stage),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True)
    reader = threading.Thread(target=self._read, args=(stage, process.stdout), daemon=True)
    reader.start()
    try:
      returncode = process.wait(timeout=limit)
      timed_out = False
    except subprocess.TimeoutExpired:
      timed_out = True
      _kill_group(process)
      returncode = process.wait()
    reader.join(timeout=10)
    status.update(state="timed_out" if timed_out else ("ok" if returncode == 0 else "failed"),
                  rc=returncode, seconds=round(time.monotonic() - start, 1),
                  limit_s=round(limit))
    self.emit(status)
    self.log.write(f"===== {stage.name}: {status['state']} in {status['seconds']} s\n")
    return status

  def _read(self, stage: Stage, stream) -> None:
    for line in stream:
      self.log.write(line)
      text = line.strip()
      if text.startswith("{") and text.endswith("}"):
        try:
          record = json.loads(text)
        except ValueError:
          continue
        if isinstance(record, dict):
          self.emit({"stage": stage.name, "record": record.pop("record", "row"), **record})
      elif stage.name == "tests" and re.search(r"\d+ (passed|failed|skipped|error|tests? "
                                               r"collected)", text):
        self.emit({"stage": "tests", "record": "pytest", "summary": text.strip("= ")})

  def finish(self) -> str:
    cache = os.path.join(self.work, "moe_jax_cache", "tuning.json")
    if os.path.exists(cache):
      shutil.copy(cache, os.path.join(self.out, "tuning.json"))
    self.results.close()
    self.log.close()
    summary = summarize(self.out)
    with open(os.path.join(self.out, "summary.md"), "w") as f:
      f.write(summary)
    return summary


def _kill_group(process: subprocess.Popen) -> None:
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(process.pid, sig)
    except ProcessLookupError:
      return
    try:
      process.wait(timeout=5)
      return
    except subprocess.TimeoutExpired:
      continue


def check_arguments(stage: Stage) -> Dict:
  """Parses a stage's arguments with its script's parser (no run)."""
  script, argv = stage.argv[0], list(stage.argv[1:])
  if script == "-m":
    return {"state": "checked"}
  try:
    if script == "benchmarks/moe_layer.py":
      from benchmarks import moe_layer  # pylint: disable=g-import-not-at-top
      moe_layer.parse_args(argv)
    elif script == "benchmarks/train_step.py":
      from benchmarks import train_step  # pylint: disable=g-import-not-at-top
      train_step.parse_args(argv)
    else:
      parse_args(argv)
  except SystemExit as error:
    return {"state": "bad_arguments", "rc": error.code}
  return {"state": "checked"}


def run_suite(args) -> int:
  smoke = args.cpu_smoke
  out = args.out or os.environ.get("OUT") or os.path.join(tempfile.gettempdir(),
                                                          "gpu_suite_out")
  # On the device machine the work folder (the tuning cache: measured choices
  # and tiles; the compilation cache) outlives a call, so a second call on the
  # still-warm machine (`--only ...`) reuses what the first measured.
  work = args.work or (tempfile.mkdtemp(prefix="gpu_suite_") if smoke else
                       os.path.join(tempfile.gettempdir(), "gpu_suite_work"))
  os.makedirs(work, exist_ok=True)
  budget = args.budget or (SMOKE_BUDGET_S if smoke else DEFAULT_BUDGET_S)
  suite = Suite(out, work, budget, smoke)
  chosen = stages(smoke)
  if args.only:
    wanted = set(args.only.split(","))
    chosen = [s for s in chosen if s.name in wanted]
  print(f"gpu_suite: {len(chosen)} stages, budget {budget} s, out {out}", flush=True)
  states = []
  if smoke:  # The GPU run's exact arguments, parsed by their scripts.
    for stage in stages(smoke=False):
      check = {"stage": stage.name, "record": "check", **check_arguments(stage)}
      suite.emit(check)
      states.append(check["state"])
  for stage in chosen:
    status = suite.run(stage)
    states.append(status["state"])
    print(f"gpu_suite: {stage.name}: {status['state']} "
          f"({status.get('seconds', 0)} s; {suite.left():.0f} s of the budget left)",
          flush=True)
  summary = suite.finish()
  if smoke and not args.work:
    shutil.rmtree(work, ignore_errors=True)
  print(summary, flush=True)
  bad = [s for s in states if s in ("failed", "bad_arguments")]
  return 1 if bad else 0


# --- env ----------------------------------------------------------------------
def _version(module: str) -> str:
  try:
    import importlib.metadata  # pylint: disable=g-import-not-at-top
    return importlib.metadata.version(module)
  except Exception:  # pylint: disable=broad-except
    return ""


def _nvidia_smi() -> Dict[str, str]:
  if not shutil.which("nvidia-smi"):
    return {}
  query = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit"
  try:
    result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=20, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return {}
  values = [v.strip() for v in result.stdout.splitlines()[0].split(",")] \
      if result.stdout.strip() else []
  return dict(zip(query.split(","), values))


def _timed(fn, *args, reps: int) -> float:
  """Seconds per call (after a warm-up), `reps` calls in flight."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  outs = [fn(*args) for _ in range(reps)]
  jax.block_until_ready(outs)
  return (time.perf_counter() - start) / reps


def env_report(small: bool) -> Dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import grouped_matmul  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  report = {
      "record": "env", "python": sys.version.split()[0], "backend": jax.default_backend(),
      "device_kind": device.device_kind, "device_count": jax.device_count(),
      "compute_capability": str(getattr(device, "compute_capability", "")),
      "versions": {name: _version(name) for name in (
          "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
          "tokamax", "qwix", "pydantic", "numpy")},
      "nvidia_smi": _nvidia_smi(),
      "tokamax_bf16_512x2048": grouped_matmul.tokamax_unsupported_reason(
          jnp.bfloat16, 512, 2048) or "available",
      "mosaic_gpu_bf16_512x2048": grouped_matmul.mosaic_gpu_unsupported_reason(
          jnp.bfloat16, 512, 2048) or "available",
  }
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    report["memory_bytes_limit"] = int(stats["bytes_limit"])
  n = 512 if small else 8192
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in (0, 1))
  matmul = jax.jit(jnp.matmul)
  seconds = _timed(matmul, a, b, reps=3 if small else 20)
  report["matmul_bf16"] = {"n": n, "ms": round(seconds * 1e3, 4),
                           "tflops": round(2 * n**3 / seconds / 1e12, 1)}
  elements = 2**20 if small else 2**30  # bf16: 2 GiB on a GPU
  x = jnp.ones((elements,), jnp.bfloat16)
  seconds = _timed(jax.jit(lambda x: x + 1), x, reps=3 if small else 10)
  report["copy_bf16"] = {"bytes_moved": 4 * elements,
                         "tb_per_s": round(4 * elements / seconds / 1e12, 3)}
  return report


# --- profile ------------------------------------------------------------------
def hlo_instructions(hlo_text: str) -> Dict[str, Dict]:
  """Instruction name -> {'opcode', 'op_name', 'target', 'ops'} of compiled HLO.

  `ops` are the opcodes inside a fusion (its called computations,
  recursively), so a fusion around a dot counts as a matmul.
  """
  computations: Dict[str, List[Tuple[str, str, str]]] = {}
  instructions: Dict[str, Dict] = {}
  current = None
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\S+|\([^=]*?\))\s+"
                       r"([\w\-]+)\(")
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      computations[current] = []
      continue
    match = pattern.match(line)
    if not match or current is None:
      continue
    name, opcode = match.groups()
    calls = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    computations[current].append((opcode, ",".join(calls), ""))
    instructions[name] = {"opcode": opcode, "calls": calls,
                          "target": target.group(1) if target else "",
                          "op_name": op_name.group(1) if op_name else ""}

  def ops_of(computation: str, seen=None) -> set:
    seen = set() if seen is None else seen
    if computation in seen or computation not in computations:
      return set()
    seen.add(computation)
    found = set()
    for opcode, calls, _ in computations[computation]:
      found.add(opcode)
      for callee in filter(None, calls.split(",")):
        found |= ops_of(callee, seen)
    return found

  for info in instructions.values():
    ops = {info["opcode"]}
    for callee in info["calls"]:
      ops |= ops_of(callee)
    info["ops"] = sorted(ops)
  return instructions


_GROUPED_MARKERS = ("mosaic", "tokamax", "ragged", "pallas", "gmm", "cpu_grouped",
                    "weight_gradient")
_MATMUL_MARKERS = ("gemm", "cublas", "matmul", "dot", "cutlass")
_DISPATCH_MARKERS = ("sort", "gather", "scatter", "permute", "take_along_axis",
                     "searchsorted", "cumsum", "dynamic-slice", "dynamic_slice",
                     "dynamic-update-slice", "row_layout", "select-and-scatter")
_OPTIMIZER_MARKERS = ("adafactor", "optax", "optimizer", "scale_by", "apply_updates",
                      "update")
_COLLECTIVE_MARKERS = ("all-reduce", "all-to-all", "all-gather", "reduce-scatter",
                       "collective-permute")


_EXPERT_EINSUMS = ("eti,eio->eto", "nbi,nio->nbo")  # moe.apply_experts' batched matmuls


def _path(op_name: str) -> str:
  """An op_name without its transformation wrappers ('jit(f)', 'jvp(M)', ...)."""
  first = op_name.split(";")[0]  # Fused ops may list several.
  return "/".join(p for p in first.split("/") if p and not re.match(r"^[\w.]+\(.*\)$", p))


def classify(name: str, info: Optional[Dict]) -> str:
  """A cost category for one device op (its HLO instruction, if known)."""
  info = info or {}
  path = _path(info.get("op_name", "")).lower()
  text = " ".join([name.lower(), info.get("target", "").lower(), path,
                   " ".join(info.get("ops", []))])
  matmul = any(m in text for m in _MATMUL_MARKERS)
  if any(m in text for m in _COLLECTIVE_MARKERS):
    return "collectives"
  if any(m in text for m in _GROUPED_MARKERS):
    return "expert grouped-matmul kernels"
  if matmul and ("expert" in path or any(e in path for e in _EXPERT_EINSUMS)):
    return "expert matmuls (batched)"
  if matmul and "attention" in path:
    return "attention matmuls"
  if matmul and ("logits" in path or "embed" in path):
    return "embedding/logits matmuls"
  if matmul:
    return "other matmuls (dense FFN, router)"
  if "router" in path:
    return "router"
  if any(m in text for m in _DISPATCH_MARKERS):
    return "dispatch/combine (sort, gather, scatter)"
  if any(m in path for m in _OPTIMIZER_MARKERS):
    return "optimizer update"
  if "attention" in path:
    return "attention (softmax, masks)"
  if any(m in path for m in ("loss", "cross_entropy", "log_softmax")):
    return "loss"
  return "other elementwise/fusions"


def scope_of(op_name: str, depth: int = 4) -> str:
  """'encoder/layers_*/mlp (bwd)' from an op_name metadata path."""
  if not op_name:
    return "(no op_name)"
  backward = "transpose(" in op_name
  parts = _path(op_name).split("/")[:-1]  # Drop the primitive.
  parts = [re.sub(r"_\d+$", "_*", p) for p in parts]
  scope = "/".join(parts[:depth]) or "(top level)"
  return scope + (" (bwd)" if backward else "")


_NOT_OP_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Source code", "Framework Ops",
                 "Framework Name Scope", "Launch Stats", "Host Threads")


def device_op_events(profile) -> Tuple[List[Tuple[str, float]], str]:
  """(op name, duration ns) of every op the device ran; and where they came from.

  GPU/TPU: the device plane's 'XLA Ops' line (else its stream lines, each
  kernel named by its 'hlo_op' stat). CPU: the host threads that run XLA's
  thunks.
  """
  def op(event) -> str:
    stats = dict(getattr(event, "stats", ()) or ())
    name = str(stats.get("hlo_op", "") or event.name)
    return name.lstrip("%").split(" ")[0]

  planes = list(profile.planes)
  devices = [p for p in planes if re.match(r"^/device:(GPU|TPU)", p.name)]
  events: List[Tuple[str, float]] = []
  if devices:
    sources = set()
    for plane in devices:
      lines = list(plane.lines)
      chosen = ([l for l in lines if l.name == "XLA Ops"]
                or [l for l in lines if l.name.startswith("Stream")]
                or [l for l in lines if l.name not in _NOT_OP_LINES])
      sources |= {l.name for l in chosen}
      for line in chosen:
        events += [(op(e), float(e.duration_ns)) for e in line.events]
    return events, "device lines: " + ", ".join(sorted(sources))
  skip = re.compile(r"^(end: |ThunkExecutor|ThreadpoolListener|\$)")
  for plane in planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if line.name.startswith("tf_XLA") and "Eigen" not in line.name:
        events += [(op(e), float(e.duration_ns)) for e in line.events
                   if not skip.match(e.name)]
  return events, "host:XLA thunks"


def summarize_trace(xplane: str, hlo_text: str, steps: int, top: int = 10) -> Dict:
  """Per-step device time by op, category and scope from one xplane file."""
  import jax  # pylint: disable=g-import-not-at-top
  profile = jax.profiler.ProfileData.from_file(xplane)
  events, source = device_op_events(profile)
  instructions = hlo_instructions(hlo_text)
  total = sum(d for _, d in events) or 1.0
  by_op, by_category, by_scope = (collections.Counter() for _ in range(3))
  counts = collections.Counter()
  for name, duration in events:
    info = instructions.get(name)
    by_op[name] += duration
    counts[name] += 1
    by_category[classify(name, info)] += duration
    by_scope[scope_of((info or {}).get("op_name", ""))] += duration

  def rows(counter, extra=None):
    out = []
    for key, ns in counter.most_common(top):
      row = {"name": key, "ms_per_step": round(ns / steps / 1e6, 4),
             "share": round(ns / total, 4)}
      if extra:
        row.update(extra(key))
      out.append(row)
    return out

  def op_details(name):
    info = instructions.get(name, {})
    return {"calls_per_step": counts[name] / steps, "category": classify(name, info),
            "op_name": info.get("op_name", "")[:160], "target": info.get("target", "")}

  categories = rows(by_category)
  return {
      "source": source, "events": len(events), "steps": steps,
      "device_ms_per_step": round(total / steps / 1e6, 4),
      "matched_hlo": round(sum(d for n, d in events if n in instructions) / total, 4),
      "top3": [f"{c['name']}: {c['share'] * 100:.1f}% ({c['ms_per_step']} ms/step)"
               for c in categories[:3]],
      "categories": categories, "scopes": rows(by_scope), "ops": rows(by_op, op_details),
  }


def _trace(step, steps: int, logdir: str) -> str:
  """Runs `step` `steps` times under jax.profiler.trace; the xplane file."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(step())
  with jax.profiler.trace(logdir):
    for _ in range(steps):
      jax.block_until_ready(step())
  files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {logdir}")
  return files[-1]


def profile_train(train_argv: Sequence[str], steps: int,
                  logdir: str) -> Tuple[Dict, str, str]:
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  args = train_step.parse_args(list(train_argv))
  models = train_step.gin_models(args) if args.gin_file else train_step.built_models(args)
  timer = train_step.StepTimer(models["moe"], args.batch, args.lengths, args.vocab)
  xplane = _trace(timer, steps, logdir)
  hlo_text = timer.compiled.as_text()
  summary = summarize_trace(xplane, hlo_text, steps)
  summary.update(record="profile", what="train step (moe)", config=args.config_name)
  return summary, xplane, hlo_text


def profile_layer(layer_argv: Sequence[str], steps: int, logdir: str) -> Dict:
  """The layer of `benchmarks/moe_layer.py` (one config), forward+backward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import moe_layer  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import moe  # pylint: disable=g-import-not-at-top
  args = moe_layer.parse_args(list(layer_argv))
  (num_experts,), (k,), (dispatch_mode,) = args.experts, args.topk, args.dispatch
  layer = moe.MoeLayer(
      num_experts=num_experts, router=moe_layer.ROUTERS[args.router](k),
      expert_mlp_dim=args.d_ff, max_group_size=args.group_size,
      train_capacity_factor=args.capacity_factor,
      capacity_scales_with_k=args.capacity_scales_with_k,
      dispatch=dispatch_mode, dropless_backend=args.dropless_backend,
      grouped_matmul_implementation=args.grouped_matmul_implementation, dtype=args.dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.tokens // moe_layer.SEQUENCE_LENGTH,
                                                moe_layer.SEQUENCE_LENGTH, args.d_model),
                        args.dtype)
  plan = layer.dispatch_plan(x.shape, x.dtype, train=True).name
  params = jax.jit(lambda key, x: layer.init(key, x, enable_dropout=True))(
      jax.random.PRNGKey(1), x)["params"]

  def loss(params, x):
    y, state = layer.apply({"params": params}, x, enable_dropout=True,
                           rngs={"dropout": jax.random.PRNGKey(0),
                                 "gating": jax.random.PRNGKey(1)},
                           mutable=["intermediates"])
    metrics = moe.collect_moe_metrics(state["intermediates"])
    return jnp.sum(y) + metrics["auxiliary_loss"] + metrics["router_z_loss"]

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  xplane = _trace(lambda: compiled(params, x), steps, logdir)
  summary = summarize_trace(xplane, compiled.as_text(), steps)
  summary.update(record="profile", what=f"moe layer {dispatch_mode} E={num_experts} "
                 f"({plan})", strategy=plan)
  return summary


def run_profile(args) -> int:
  work = os.environ.get("GPU_SUITE_WORK") or tempfile.mkdtemp(prefix="gpu_suite_profile_")
  out = os.environ.get("GPU_SUITE_OUT")
  failures = 0
  for what, run in (("train", lambda d: profile_train(args.train_args.split(), args.steps, d)),
                    ("layer", lambda d: profile_layer(args.layer_args.split(), 5, d))):
    if not getattr(args, f"{what}_args"):
      continue
    logdir = os.path.join(work, f"trace_{what}")
    try:
      result = run(logdir)
    except Exception as error:  # pylint: disable=broad-except
      failures += 1
      print(json.dumps({"record": "profile_error", "what": what,
                        "error": f"{type(error).__name__}: {error}"[:2000]}), flush=True)
      continue
    if what == "train":
      result, xplane, hlo_text = result
      if out and os.path.getsize(xplane) <= XPLANE_LIMIT_BYTES:
        shutil.copy(xplane, os.path.join(out, "train_profile.xplane.pb"))
        with gzip.open(os.path.join(out, "train_step.hlo.txt.gz"), "wt") as f:
          f.write(hlo_text)
    print(json.dumps(result), flush=True)
  return 1 if failures else 0


# --- summary --------------------------------------------------------------------
# Floors of issue 12 (bound_ratio) by dispatch and shape (token count).
FLOORS = {("dropless", 4096): 1.25, ("sorted", 4096): 1.15, ("dropless", 32768): 1.35}


def _read_results(out: str) -> List[Dict]:
  path = os.path.join(out, "results.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _table(columns: Sequence[str], rows: Iterable[Sequence]) -> List[str]:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
  return lines


def summarize(out: str) -> str:
  """summary.md: environment, layer tables, auto choices, train, profile, stages."""
  results = _read_results(out)
  lines = ["# GPU suite summary", ""]
  for env in (r for r in results if r.get("record") == "env"):
    smi = env.get("nvidia_smi", {})
    lines += [f"- device: {env.get('device_kind')} x{env.get('device_count')} "
              f"(cc {env.get('compute_capability')}; driver {smi.get('driver_version', '?')})"
              f", python {env.get('python')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()
                                         if v),
              f"- measured: bf16 matmul {env.get('matmul_bf16', {}).get('tflops')} TFLOP/s "
              f"(n={env.get('matmul_bf16', {}).get('n')}), copy "
              f"{env.get('copy_bf16', {}).get('tb_per_s')} TB/s",
              f"- tokamax: {env.get('tokamax_bf16_512x2048')}; mosaic_gpu: "
              f"{env.get('mosaic_gpu_bf16_512x2048')}", ""]
  tests = [r["summary"] for r in results if r.get("record") == "pytest"]
  if tests:
    lines += [f"- tests: {tests[-1]}", ""]
  layer_rows = [r for r in results if r.get("record") == "row" and "bound_ratio" in r]
  if layer_rows:
    lines += ["## MoE layer (fwd+bwd, bf16)", ""]
    rows = []
    for r in layer_rows:
      floor = FLOORS.get((r.get("dispatch"), r.get("tokens")))
      verdict = "" if floor is None else ("meets" if r["bound_ratio"] <= floor
                                          else "MISSES") + f" {floor}"
      rows.append([r["stage"], r.get("dispatch"), r.get("strategy"), r.get("experts"),
                   r.get("tokens"), r.get("moe_ms"), r.get("expert_bound_ms"),
                   r.get("bound_ratio"), r.get("dense_ratio"), r.get("tokens_per_s"),
                   verdict])
    lines += _table(["stage", "dispatch", "strategy", "E", "tokens", "moe_ms", "bound_ms",
                     "bound_ratio", "dense_ratio", "tokens/s", "floor"], rows) + [""]
  tuning_path = os.path.join(out, "tuning.json")
  if os.path.exists(tuning_path):
    try:
      with open(tuning_path) as f:
        entries = json.load(f).get("entries", {})
    except (OSError, ValueError):
      entries = {}
    layer = [e for e in entries.values() if e.get("problem", {}).get("layer") == "MoeLayer"]
    tiles = [e for e in entries.values()
             if e.get("problem", {}).get("op") == "grouped_matmul.mosaic_gpu_tiles"]
    if layer:
      lines += ["## Measured 'auto' choices (moe_jax.tuning; ms of the layer's fwd+bwd)", ""]
      lines += _table(["layer", "train", "candidates (ms)", "choice"], [
          [e["problem"].get("name"), e["problem"].get("train"),
           ", ".join(f"{k} {v:.3f}" for k, v in e["times_ms"].items()), e["choice"]]
          for e in layer]) + [""]
    if tiles:
      lines += ["## Mosaic GPU tiles (ms per step of one product, several reps)", ""]
      lines += _table(["product", "candidates (ms)", "choice"], [
          [e["problem"].get("name"), ", ".join(f"{k} {v:.3f}" for k, v in
                                               e["times_ms"].items()), e["choice"]]
          for e in tiles]) + [""]
  train = [r for r in results if r.get("stage") == "train" and "step_ms" in r]
  if train:
    lines += ["## Train step", ""]
    lines += _table(["model", "step_ms", "tokens/s", "mfu", "achieved TFLOP/s",
                     "device_peak_GiB", "compile_s", "ratio_to_dense"], [
        [r.get("model"), r.get("step_ms"), r.get("tokens_per_s"), r.get("mfu"),
         r.get("achieved_tflops"),
         round(r["device_peak_bytes"] / 2**30, 2) if "device_peak_bytes" in r else "",
         r.get("compile_s"), r.get("ratio_to_dense", "")] for r in train]) + [""]
  for profile in (r for r in results if r.get("record") == "profile"):
    lines += [f"## Profile: {profile.get('what')}", "",
              f"device time {profile.get('device_ms_per_step')} ms/step "
              f"({profile.get('source')}; {profile.get('matched_hlo', 0) * 100:.0f}% of it "
              "matched to HLO); top three costs:", ""]
    lines += [f"{i + 1}. {t}" for i, t in enumerate(profile.get("top3", []))] + [""]
    lines += _table(["top ops", "ms/step", "share", "category", "op_name"], [
        [o["name"], o["ms_per_step"], o["share"], o.get("category"), o.get("op_name", "")[:90]]
        for o in profile.get("ops", [])[:8]]) + [""]
  for error in (r for r in results if r.get("record") == "profile_error"):
    lines += [f"- profile {error.get('what')} failed: {error.get('error', '')[:300]}"]
  statuses = [r for r in results if r.get("record") == "status"]
  if statuses:
    lines += ["## Stages", ""]
    lines += _table(["stage", "state", "seconds", "limit_s", "rc"], [
        [s["stage"], s.get("state"), s.get("seconds", ""), s.get("limit_s", ""),
         s.get("rc", "")] for s in statuses])
  return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="run the stages (what gpu_suite.sh does)")
  run.add_argument("--cpu_smoke", action="store_true",
                   help="tiny shapes on the CPU; GPU-only stages: arguments checked")
  run.add_argument("--budget", type=float, help="seconds; default 500 (smoke 150)")
  run.add_argument("--out", help="output folder (default $OUT, else a temp folder)")
  run.add_argument("--only", help="comma-separated stage names")
  run.add_argument("--work", help="caches (default /tmp/gpu_suite_work; smoke: a temp folder)")
  run.add_argument("--list", action="store_true", help="print the stages and exit")
  env = commands.add_parser("env", help="stage: device, versions, measured ceilings")
  env.add_argument("--small", action="store_true", help="tiny calibration (CPU smoke)")
  profile = commands.add_parser("profile", help="stage: traces, summarized")
  profile.add_argument("--steps", type=int, default=3)
  profile.add_argument("--train_args", default="", help="benchmarks/train_step.py args")
  profile.add_argument("--layer_args", default="", help="benchmarks/moe_layer.py args")
  summary = commands.add_parser("summarize", help="rebuild summary.md of an output folder")
  summary.add_argument("out")
  trace = commands.add_parser("trace", help="summarize a saved profile again (offline)")
  trace.add_argument("xplane", help="train_profile.xplane.pb")
  trace.add_argument("hlo", help="train_step.hlo.txt.gz")
  trace.add_argument("--steps", type=int, default=3)
  trace.add_argument("--top", type=int, default=20)
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.command == "run":
    if args.list:
      for stage in stages(args.cpu_smoke):
        print(f"{stage.name:28s} {stage.cap_s:4d} s  "
              f"{'(GPU only) ' if stage.gpu_only else ''}"
              f"{' '.join(f'{k}={v}' for k, v in stage.env)} python {' '.join(stage.argv)}")
      return 0
    return run_suite(args)
  if args.command == "env":
    print(json.dumps(env_report(args.small)), flush=True)
    return 0
  if args.command == "profile":
    return run_profile(args)
  if args.command == "trace":
    with gzip.open(args.hlo, "rt") as f:
      print(json.dumps(summarize_trace(args.xplane, f.read(), args.steps, args.top), indent=1))
    return 0
  text = summarize(args.out)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
