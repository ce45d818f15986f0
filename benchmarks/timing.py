"""Timing shared by the benchmarks: interleaved rounds, medians."""

import statistics
import time
from typing import Callable, Dict

import jax


def interleaved_medians_ms(fns: Dict[str, Callable[[], object]],
                           repeats: int) -> Dict[str, float]:
  """Median wall time (ms) of each function, timed in interleaved rounds.

  Each function is run once first (compilation, warm-up); then every round
  runs each once in turn, so drift in the machine's speed hits all alike.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: statistics.median(values) for name, values in times.items()}
