"""Measured choices: time the candidates once, cache the fastest on disk.

Where more than one implementation of the same computation can run (e.g. the
MoE layer's 'sorted' dispatch on a single-device CPU in float32: padded
capacity buffers through XLA, or exact rows on the CPU BLAS kernels), a static
rule can pick the slower one: how fast a BLAS runs depends on its build, the
CPU it detects (or is told, e.g. `OPENBLAS_CORETYPE`) and the load on the
machine. `choose` times jit-compiled candidates instead, once per problem and
environment, and remembers the fastest:

  * in this process (a memo), and
  * on disk, in `tuning.json` beside the kernel build cache
    (`$MOE_JAX_CACHE_DIR`, default `~/.cache/moe_jax`), for every later
    process. Writes hold a file lock and go through a temp file and
    `os.replace`; a corrupt file is ignored (with a warning) and rewritten.

An entry's key hashes the problem (the caller's shapes and settings) and the
environment (`environment()`: backend, device kind and count, jax/jaxlib and
kernel build versions, CPU model and count, and the BLAS/XLA variables that
change speed), so a changed environment measures again.

Cost: a measurement compiles every candidate and runs each 1 + `ROUNDS`
times, interleaved (a candidate over twice as slow as the best stops after
two timed runs): a few seconds for small layers, 15-40 s per layer shape for
the README benchmark's on 2 CPU cores. It runs on first use, which may be
inside someone's `jit` trace: the timing happens in a worker thread, whose
JAX trace state (thread-local) is clean; one warning line logs its cost. Fill the cache ahead of time with
`python -m moe_jax.tune`, or set `MOE_JAX_TUNING=static` to skip measuring and
use each caller's static rule (what a test suite should set: results must not
depend on timing, and timings must not hide measurements).

Nesting: a candidate may itself choose while it is built (a layer whose
grouped matmuls pick their kernel tiles when traced). Such an inner `choose`
runs in the measurement's worker thread while the outer one holds the locks
and waits for it; it measures (in a thread of its own) without taking them.

Preferences (`prefer`): a candidate whose name contains a preferred marker
(e.g. 'tokamax', a maintained kernel library) is chosen when it is within a
stated fraction of the fastest: near-ties go to it.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import jax
import jaxlib

from moe_jax.kernels import cpu_gmm

ENV_VAR = "MOE_JAX_TUNING"
MODES = ("measure", "static")
ROUNDS = 5
_CLEARLY_SLOWER = 2.0  # Candidates this much slower than the best stop early.
CACHE_FILE = "tuning.json"
_FORMAT_VERSION = 1
# Environment variables that change how fast the candidates run.
_SPEED_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                    "OMP_NUM_THREADS", "XLA_FLAGS")

# A candidate: builds (compiles, allocates) and returns a step to time.
Step = Callable[[], Any]
Builder = Callable[[], Step]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Decision:
  """One choice among candidates.

  Attributes:
    problem: the caller's description of the computation (shapes, settings).
    choice: the chosen candidate.
    times_ms: median milliseconds per candidate (empty for a static choice).
    source: 'measured' (here, now), 'cache' (an earlier measurement) or
      'static' (the caller's rule; measuring is off).
  """

  problem: Mapping[str, Any]
  choice: str
  times_ms: Mapping[str, float]
  source: str


_memo: Dict[str, Decision] = {}     # cache key -> measured or cached decision
_history: Dict[str, Decision] = {}  # problem -> latest decision, for decisions()
_memo_lock = threading.RLock()
_thread = threading.local()          # .measuring: this thread builds/times candidates
_preferences: Dict[str, float] = {}  # name marker -> tolerance (see `prefer`)


def mode() -> str:
  """'measure' (default) or 'static', from `$MOE_JAX_TUNING`."""
  value = os.environ.get(ENV_VAR, "measure") or "measure"
  if value not in MODES:
    raise ValueError(f"{ENV_VAR}={value!r}; set it to one of {MODES} (or unset it).")
  return value


def cache_path() -> str:
  return os.path.join(cpu_gmm.cache_dir(), CACHE_FILE)


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _cpu_model() -> str:
  """The CPU's model name (CPU devices all report the device kind 'cpu')."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  return platform.processor()


def _kernel_build() -> str:
  try:
    return cpu_gmm.build_key()
  except (ImportError, OSError):
    return ""


def environment() -> Dict[str, Any]:
  """What, besides the problem, decides which candidate is fastest here."""
  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "kernel_build": _kernel_build(),
      "cpu_model": _cpu_model(),
      "cpu_count": _cpu_count(),
      **{name: os.environ.get(name, "") for name in _SPEED_VARIABLES},
  }


def cache_key(problem: Mapping[str, Any], env: Mapping[str, Any]) -> str:
  text = json.dumps({"problem": problem, "environment": env}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def decisions() -> List[Decision]:
  """The choices made in this process, in order (for `moe_jax.tune`)."""
  with _memo_lock:
    return list(_history.values())


def clear_memo() -> None:
  """Forgets this process's choices (the disk cache stays)."""
  with _memo_lock:
    _memo.clear()
    _history.clear()


def prefer(marker: str, within: float) -> None:
  """Near-ties go to candidates whose name contains `marker`.

  A measured candidate with `marker` in its name is chosen over a faster one
  when its time is at most `(1 + within)` times the fastest (the first such
  candidate, in the caller's order, if several).
  """
  if within < 0:
    raise ValueError(f"within must be >= 0, got {within}.")
  _preferences[marker] = within


def _inside_measurement() -> bool:
  return getattr(_thread, "measuring", False)


def _record(decision: Decision) -> Decision:
  key = json.dumps(decision.problem, sort_keys=True, default=str)
  if _inside_measurement():  # The outer measurement holds the lock (see choose).
    _history[key] = decision
    return decision
  with _memo_lock:
    _history[key] = decision
  return decision


def _pick(times: Mapping[str, float]) -> str:
  """The fastest candidate, or a preferred one within its tolerance."""
  best = min(times, key=times.get)
  for name, ms in times.items():
    for marker, within in _preferences.items():
      if marker in name and ms <= (1.0 + within) * times[best]:
        return name
  return best


def measure(candidates: Mapping[str, Builder], rounds: int = ROUNDS) -> Dict[str, float]:
  """Median wall time (ms) of each candidate's step.

  Runs in a worker thread, so it works while the caller is tracing (JAX's
  trace state is thread-local). Every step is built, run once to compile and
  warm up, then timed in up to `rounds` interleaved rounds (machine drift
  hits all candidates alike); from the second round on, a candidate whose
  median is over `_CLEARLY_SLOWER` times the best is not timed again. A candidate that fails to build or
  run is left out with a warning.
  """
  def work():
    _thread.measuring = True  # Nested choices skip the locks (see choose).
    steps = {}
    for name, build in candidates.items():
      try:
        step = build()
        jax.block_until_ready(step())
      except Exception as error:  # pylint: disable=broad-except
        logger.warning("moe_jax.tuning: candidate %s failed, left out: %s: %s",
                       name, type(error).__name__, error)
        continue
      steps[name] = step
    times = {name: [] for name in steps}
    racing = dict(steps)
    for round_index in range(rounds):
      for name, step in racing.items():
        start = time.perf_counter()
        jax.block_until_ready(step())
        times[name].append((time.perf_counter() - start) * 1e3)
      if round_index >= 1:  # Two samples each: one hiccup does not decide.
        best = min(statistics.median(times[name]) for name in racing)
        racing = {name: step for name, step in racing.items()
                  if statistics.median(times[name]) <= _CLEARLY_SLOWER * best}
    return {name: statistics.median(values) for name, values in times.items()}

  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moe_jax_tuning") as pool:
    return pool.submit(work).result()


@contextlib.contextmanager
def _cache_lock():
  """Holds the cache's file lock: one writer and one measurement at a time.

  Without a usable lock (no fcntl, an unwritable directory) it warns and goes
  on unlocked: the choice is still made, and kept in this process.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
    os.makedirs(cpu_gmm.cache_dir(), exist_ok=True)
    lock = open(cache_path() + ".lock", "w")
  except (ImportError, OSError) as error:
    logger.warning("moe_jax.tuning: cannot lock the cache %s (%s); going on without.",
                   cache_path(), error)
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def read_cache() -> Dict[str, Any]:
  """The cache's entries ({} when absent, unreadable or corrupt)."""
  path = cache_path()
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as error:
    logger.warning("moe_jax.tuning: ignoring unreadable cache %s (%s); measuring again.",
                   path, error)
    return {}
  entries = data.get("entries") if isinstance(data, dict) else None
  if not isinstance(entries, dict) or data.get("version") != _FORMAT_VERSION:
    logger.warning("moe_jax.tuning: ignoring cache %s with an unknown layout; measuring "
                   "again.", path)
    return {}
  return entries


def _write_cache(key: str, entry: Mapping[str, Any]) -> None:
  """Adds one entry: re-read, temp file, atomic rename (caller holds the lock)."""
  entries = read_cache()
  entries[key] = entry
  path = cache_path()
  temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(temporary, "w") as f:
    json.dump({"version": _FORMAT_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
  os.replace(temporary, path)


def _cached_decision(entry: Any, problem, candidates) -> Optional[Decision]:
  if (isinstance(entry, dict) and entry.get("choice") in candidates
      and isinstance(entry.get("times_ms"), dict)):
    return Decision(problem, entry["choice"], entry["times_ms"], "cache")
  return None


def choose(problem: Mapping[str, Any], candidates: Mapping[str, Builder],
           static: str) -> Decision:
  """The fastest candidate for `problem` here: memo, disk cache, or measured.

  Args:
    problem: JSON-serializable description of the computation; with the
      environment, the cache key. Include everything that changes which
      candidate wins (shapes, dtypes, settings).
    candidates: name -> builder of a step to time (see `measure`).
    static: the caller's static rule, used with `MOE_JAX_TUNING=static`, and
      when measuring fails.

  Returns:
    The decision; `decision.choice` is a key of `candidates`.
  """
  if static not in candidates:
    raise ValueError(f"static choice {static!r} is not a candidate ({sorted(candidates)}).")
  if len(candidates) == 1 or mode() == "static":
    return _record(Decision(problem, static, {}, "static"))
  key = cache_key(problem, environment())
  if _inside_measurement():
    # Called while an outer measurement of this process builds a candidate:
    # it holds both locks and waits for this thread, so taking them here
    # would deadlock; nothing else can take them meanwhile.
    return _record(_decide(key, problem, candidates, static))
  with _memo_lock:  # One measurement at a time in this process ...
    if key in _memo:
      return _record(_memo[key])
    with _cache_lock():  # ... and across processes.
      return _record(_decide(key, problem, candidates, static))


def _decide(key: str, problem, candidates, static) -> Decision:
  """Memo, disk cache or a measurement (the caller holds the locks)."""
  if key in _memo:
    return _memo[key]
  decision = _cached_decision(read_cache().get(key), problem, candidates)
  if decision is None:
    decision = _measure(problem, candidates, static)
    if decision.source == "measured":
      _store(key, decision)
  _memo[key] = decision
  return decision


def _measure(problem, candidates, static) -> Decision:
  start = time.perf_counter()
  times = measure(candidates)
  if not times:
    logger.warning("moe_jax.tuning: no candidate ran; using the static choice %s.", static)
    return Decision(problem, static, {}, "static")
  choice = _pick(times)
  logger.warning(
      "moe_jax.tuning: measured %s in %.1f s: %s -> %s (cached in %s; %s=static skips "
      "measuring).", problem.get("name", "a problem"), time.perf_counter() - start,
      ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()), choice,
      cache_path(), ENV_VAR)
  return Decision(problem, choice, times, "measured")


def _store(key: str, decision: Decision) -> None:
  try:
    _write_cache(key, {"choice": decision.choice, "times_ms": dict(decision.times_ms),
                       "problem": dict(decision.problem), "environment": environment(),
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
  except OSError as error:
    logger.warning("moe_jax.tuning: could not write the cache %s (%s); the choice lasts "
                   "this process only.", cache_path(), error)
