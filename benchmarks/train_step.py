"""Benchmark: the jit-compiled train step of an MoE model against its dense equal.

Times, in one process and interleaved round by round, the full train step of
`moe_jax.training.trainer.Trainer` (forward, backward, Adafactor update) for
  * `moe`: a T5-style encoder-decoder whose FFNs in every `--sparse_every`-th
    layer are MoE layers (E experts, top-k, width d_ff each);
  * `dense_equal`: the same model with dense FFNs of width k x d_ff there, the
    same activated FLOPs per token.
Each line reports the median step time over `--repeats` rounds after warm-up,
tokens/s (input + target tokens), compile time, memory (XLA's arguments +
temporaries of the compiled step; on accelerators also the device's peak),
model FLOPs per step (3 x the forward FLOPs of the activated parameters plus
attention, from `moe_jax.describe`) and, given the chip's peak, MFU. The MoE
line adds `ratio_to_dense` = MoE step_ms / dense step_ms, same run.

  python benchmarks/train_step.py                       # the CPU floor config, a table
  python benchmarks/train_step.py --json                # one JSON line per model
  python benchmarks/train_step.py --gin_file gin/models/flan_st_base.gin \
      --batch 64 --lengths 512,128 --dtype bfloat16 --peak_tflops 989   # on a GPU
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import interleaved_medians_ms  # noqa: E402
from moe_jax import config  # noqa: E402
from moe_jax import describe  # noqa: E402
from moe_jax import partitioning  # noqa: E402
from moe_jax.layers import moe  # noqa: E402
from moe_jax.layers import routing  # noqa: E402
from moe_jax.models import model as model_lib  # noqa: E402
from moe_jax.models import transformer  # noqa: E402
from moe_jax.training import optimizers  # noqa: E402
from moe_jax.training import trainer as trainer_lib  # noqa: E402


def built_models(args) -> Dict[str, model_lib.EncoderDecoderModel]:
  """{'moe': ..., 'dense_equal': ...} from the flags (see the module docstring)."""
  base = dict(vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
              head_dim=args.d_model // args.heads, mlp_dim=args.d_ff,
              num_encoder_layers=args.layers, num_decoder_layers=args.layers,
              dtype=args.dtype)
  sparse = args.layers // args.sparse_every
  factory = functools.partial(
      moe.MoeLayer, num_experts=args.experts, expert_mlp_dim=args.d_ff,
      router=routing.TokensChooseRouter(num_selected_experts=args.topk),
      max_group_size=args.group_size, train_capacity_factor=args.capacity_factor,
      capacity_scales_with_k=True, dtype=args.dtype)
  moe_module = transformer.EncoderDecoder(
      config=transformer.TransformerConfig(
          **base, num_encoder_sparse_layers=sparse, num_decoder_sparse_layers=sparse),
      encoder_sparse_mlp=factory, decoder_sparse_mlp=factory)
  # The dense model needs k x d_ff in the sparse layers' places only; with
  # every layer sparse that is all of them.
  if args.sparse_every != 1:
    raise ValueError("--sparse_every other than 1 needs per-layer FFN widths; "
                     "use --gin_file for such models.")
  dense_module = transformer.EncoderDecoder(config=transformer.TransformerConfig(
      **dict(base, mlp_dim=args.topk * args.d_ff)))
  return {"moe": model_lib.EncoderDecoderModel(moe_module),
          "dense_equal": model_lib.EncoderDecoderModel(dense_module)}


def gin_models(args) -> Dict[str, model_lib.EncoderDecoderModel]:
  """The gin model and its dense equal (every sparse layer's FFN k x d_ff wide)."""
  sparse = config.load_model(args.gin_file, args.gin_bindings)
  module = sparse.module
  layer = module.encoder_sparse_mlp() if module.encoder_sparse_mlp else None
  if layer is None:
    raise ValueError(f"{args.gin_file} builds a dense model; give an MoE model.")
  cfg = module.config
  if cfg.sparse_layers("encoder") != tuple(range(cfg.num_encoder_layers)):
    raise ValueError("The dense equal of a model with dense and sparse layers mixed needs "
                     "per-layer FFN widths; the benchmark compares models whose every "
                     "layer is sparse (set NUM_*_SPARSE_LAYERS to the layer counts).")
  dense_cfg = dataclasses.replace(
      cfg, mlp_dim=layer.num_selected_experts * layer.expert_mlp_dim,
      num_encoder_sparse_layers=0, num_decoder_sparse_layers=0, extra_mlp=False)
  dense = model_lib.EncoderDecoderModel(transformer.EncoderDecoder(config=dense_cfg))
  return {"moe": sparse, "dense_equal": dense}


def _batch(shapes, vocab: int) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  batch = {name: rng.integers(2, vocab, size=shape).astype(np.int32)
           for name, shape in shapes.items()}
  batch["decoder_input_tokens"][:, 0] = 0
  return batch


class StepTimer:
  """A model's compiled train step on a mesh of all devices, ready to time."""

  def __init__(self, model, batch_size: int, lengths, vocab: int):
    shapes = {"encoder_input_tokens": (batch_size, lengths[0]),
              "decoder_input_tokens": (batch_size, lengths[1]),
              "decoder_target_tokens": (batch_size, lengths[1])}
    mesh = partitioning.mesh_from_shape(None)
    placement = trainer_lib.Placement(model, mesh, partitioning.standard_logical_axis_rules(),
                                      shapes)
    factory = optimizers.adafactor(1e-3)
    self.trainer = trainer_lib.Trainer(placement, lambda axes: optimizers.build(factory, axes))
    self.model = model
    self.tokens = batch_size * (lengths[0] + lengths[1])
    self.lengths = lengths
    self.batch_size = batch_size
    rng = jax.random.PRNGKey(0)
    # Tracing once first settles the MoE layers' measured strategy choices
    # (moe_jax.tuning), so that compile_s is compilation alone.
    abstract_batch = {n: jax.ShapeDtypeStruct(s, jnp.int32) for n, s in shapes.items()}
    with placement.context():
      jax.eval_shape(model.loss_fn, placement.abstract_params, abstract_batch, rng)
    start = time.perf_counter()
    self.compiled = self.trainer.compile_train_step(rng)
    self.compile_s = time.perf_counter() - start
    self.state = self.trainer.init_state(rng)
    self.batch = jax.device_put(_batch(shapes, vocab), placement.batch_sharding)
    self.rng = rng

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    return metrics["loss"]

  def memory(self) -> Dict[str, int]:
    analysis = self.compiled.memory_analysis()
    out = {"xla_memory_bytes": int(analysis.argument_size_in_bytes
                                   + analysis.temp_size_in_bytes)} if analysis else {}
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out

  def flops_per_step(self) -> float:
    figures = describe.describe(self.model, lengths=tuple(self.lengths))
    return 3.0 * self.batch_size * figures["forward_flops_per_sequence"]


def run(args) -> List[Dict]:
  models = gin_models(args) if args.gin_file else built_models(args)
  timers = {name: StepTimer(m, args.batch, args.lengths, args.vocab)
            for name, m in models.items()}
  times = interleaved_medians_ms(timers, args.repeats)
  rows = []
  for name, timer in timers.items():
    step_ms = round(times[name], 3)
    flops = timer.flops_per_step()
    row = {
        "model": name,
        "config": args.config_name,
        "step_ms": step_ms,
        "tokens_per_s": round(timer.tokens / (step_ms / 1e3), 1),
        "compile_s": round(timer.compile_s, 2),
        "flops_per_step": flops,
        "achieved_tflops": round(flops / (step_ms / 1e3) / 1e12, 4),
        **timer.memory(),
        "dtype": jnp.dtype(args.dtype).name,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }
    if args.peak_tflops:
      row["mfu"] = round(flops / (step_ms / 1e3) / (args.peak_tflops * 1e12
                                                     * jax.device_count()), 4)
    rows.append(row)
  moe_row, dense_row = rows
  moe_row["ratio_to_dense"] = round(moe_row["step_ms"] / dense_row["step_ms"], 4)
  return rows


def format_table(rows: List[Dict]) -> str:
  columns = ["model", "step_ms", "tokens_per_s", "compile_s", "xla_memory_bytes",
             "achieved_tflops", "ratio_to_dense"]
  if any("mfu" in r for r in rows):
    columns.append("mfu")
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append",
                      help="an MoE model gin instead of the flags below (repeatable)")
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=2048, help="each expert's width")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--topk", type=int, default=2)
  parser.add_argument("--layers", type=int, default=2, help="per stack")
  parser.add_argument("--sparse_every", type=int, default=1)
  parser.add_argument("--group_size", type=int, default=1024)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--vocab", type=int, default=32128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--lengths", default="512,512", help="encoder,decoder lengths")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float,
                      help="the chip's dense peak (TFLOP/s) in --dtype, for MFU")
  parser.add_argument("--json", action="store_true", help="print one JSON line per model")
  args = parser.parse_args(argv)
  if args.repeats < 3:
    parser.error("--repeats must be >= 3")
  args.lengths = tuple(int(x) for x in args.lengths.split(","))
  if len(args.lengths) != 2:
    parser.error("--lengths takes ENCODER,DECODER")
  args.dtype = jnp.dtype(args.dtype)
  args.config_name = (",".join(args.gin_file) if args.gin_file else
                      f"d_model={args.d_model} d_ff={args.d_ff} E={args.experts} "
                      f"k={args.topk} layers={args.layers}+{args.layers} vocab={args.vocab} "
                      f"batch={args.batch}x{args.lengths[0]}+{args.lengths[1]}")
  return args


def main(argv: Optional[List[str]] = None) -> None:
  args = parse_args(argv)
  rows = run(args)
  if args.json:
    for row in rows:
      print(json.dumps(row), flush=True)
  else:
    print(format_table(rows))


if __name__ == "__main__":
  main()
