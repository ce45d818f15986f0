r"""Measure the MoE layers' strategies for a model config; fill the cache.

  python -m moe_jax.tune --gin_file gin/models/tiny_moe.gin \
      --gin.ACTIVATION_DTYPE="'float32'" --batch 8 --lengths 512,128
  python -m moe_jax.tune --gin_file gin/models/flan_switch_base.gin \
      --gin_file gin/t5x/finetune_flan.gin --json

Traces the model's training loss (`loss_fn` with a dropout key: the train
capacity) and evaluation loss (without: the eval capacity) on a batch of
`--batch` sequences of `--lengths` tokens, abstractly (`jax.eval_shape`: no
parameters are allocated for the model), with measuring forced on
(`MOE_JAX_TUNING=measure`). Every MoE layer shape is visited; where several
strategies can run (see `moe_jax.layers.dispatch.candidates`) they are timed
and the fastest is cached on disk (`moe_jax.tuning`), so later processes on
this machine start with the choice made. Prints one row per layer shape:
the candidates' times (ms, forward+backward of the layer), the choice, and
whether it was measured now or read from the cache. Decoding shapes
(`predict_batch`) are measured on first use.

Defaults for `--batch` / `--lengths` come from the gin macros `BATCH_SIZE` /
`TASK_FEATURE_LENGTHS` when the gin files bind them (t5x run files do).
"""

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from moe_jax import cli
from moe_jax import config
from moe_jax import tuning


def _lengths(args) -> Tuple[int, int]:
  if args.lengths:
    lengths = tuple(int(v) for v in args.lengths.split(","))
    if len(lengths) != 2 or min(lengths) < 1:
      raise ValueError(f"--lengths takes ENCODER_LENGTH,DECODER_LENGTH, got {args.lengths!r}.")
    return lengths
  try:
    features = config.query("TASK_FEATURE_LENGTHS")
  except config.GinError:
    raise ValueError("give --lengths ENCODER_LENGTH,DECODER_LENGTH (the gin files bind no "
                     "TASK_FEATURE_LENGTHS).") from None
  return int(features["inputs"]), int(features["targets"])


def _batch_size(args) -> int:
  if args.batch is not None:
    if args.batch < 1:
      raise ValueError(f"--batch must be >= 1, got {args.batch}.")
    return args.batch
  try:
    return int(config.query("BATCH_SIZE"))
  except config.GinError:
    raise ValueError("give --batch (the gin files bind no BATCH_SIZE).") from None


def trace_model(model, batch_size: int, lengths: Tuple[int, int]) -> None:
  """Traces the training and evaluation loss once (MoE layers choose there)."""
  encoder_length, decoder_length = lengths
  batch = {
      "encoder_input_tokens": jax.ShapeDtypeStruct((batch_size, encoder_length), jnp.int32),
      "decoder_input_tokens": jax.ShapeDtypeStruct((batch_size, decoder_length), jnp.int32),
      "decoder_target_tokens": jax.ShapeDtypeStruct((batch_size, decoder_length), jnp.int32),
  }
  shapes = {name: value.shape for name, value in batch.items()}
  variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  params = variables["params"]
  jax.eval_shape(lambda p, b: model.loss_fn(p, b, jax.random.PRNGKey(0)), params, batch)
  jax.eval_shape(lambda p, b: model.loss_fn(p, b, None), params, batch)


def format_table(decisions: Sequence[tuning.Decision]) -> str:
  lines = ["| layer | train | candidates (ms) | choice | source |", "|---|---|---|---|---|"]
  for decision in decisions:
    problem = decision.problem
    times = ", ".join(
        f"{name} {decision.times_ms[name]:.2f}" if name in decision.times_ms else name
        for name in problem.get("candidates", [decision.choice]))
    lines.append(f"| {problem.get('name', '')} | {problem.get('train', '')} | {times} | "
                 f"{decision.choice} | {decision.source} |")
  return "\n".join(lines)


def _tune(args: argparse.Namespace) -> None:
  os.environ[tuning.ENV_VAR] = "measure"  # This command exists to measure.
  model = config.load_model(args.gin_file, args.gin_bindings, args.gin_search_paths)
  trace_model(model, _batch_size(args), _lengths(args))
  decisions: List[tuning.Decision] = tuning.decisions()
  if args.json:
    for decision in decisions:
      print(json.dumps({"problem": dict(decision.problem), "choice": decision.choice,
                        "times_ms": dict(decision.times_ms), "source": decision.source},
                       sort_keys=True))
  else:
    print(format_table(decisions))
    print(f"\ncache: {tuning.cache_path()} (delete it to measure again)")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moe_jax.tune", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_gin_flags(parser)
  parser.add_argument("--batch", type=int, help="sequences per batch (default: BATCH_SIZE)")
  parser.add_argument("--lengths", help="ENCODER_LENGTH,DECODER_LENGTH (default: "
                      "TASK_FEATURE_LENGTHS)")
  parser.add_argument("--json", action="store_true", help="one JSON line per layer shape")
  cli.add_output_flags(parser)
  return cli.run(_tune, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
