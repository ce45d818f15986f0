"""Benchmark: MoE layer forward+backward against its physical limits.

For every (experts, top-k, dispatch) configuration this times, in one process:
  * `moe_ms`: jit-compiled forward+backward of `MoeLayer` (gradients w.r.t.
    parameters and inputs of sum(outputs) + auxiliary losses);
  * `expert_bound_ms`: the same experts on a perfectly balanced
    `[E, k*T/E, d_model]` input, no routing and no padding: the floor of any
    MoE layer of this configuration on this machine;
  * `dense_equiv_ms`: a dense gated-GELU FFN with d_ff = k * d_ff on the same
    T tokens (same activated FLOPs).
The three are compiled and warmed up first, then timed in interleaved rounds
(layer, bound, dense, layer, ...), so that drift in the machine's speed hits
all of them alike; each time is the median of `--repeats` rounds. Prints a
table, and with `--json` one JSON line per configuration. Times are reported
in ms to the microsecond, and the ratios are computed from the reported times.

`strategy` is what the layer ran (`moe_jax.layers.dispatch`). Where the
layer's 'auto' settings leave several strategies, the layer measures them
once (`moe_jax.tuning`, cached on disk); that happens before anything here is
timed. `--grouped_matmul_implementation xla` forces the padded buffers of
'sorted' (XLA's batched matmuls), `cpu_blas` the exact rows on the CPU BLAS
kernels.

  python benchmarks/moe_layer.py --tokens 4096 --d_model 512 --d_ff 2048 \
      --experts 8,32,128 --topk 2 --capacity_factor 1.25 \
      --capacity_scales_with_k --group_size 1024 \
      --dispatch einsum,sorted,dropless --json
"""

import argparse
import json
import os
import sys
from typing import Callable, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import interleaved_medians_ms  # noqa: E402
from moe_jax.layers import dense  # noqa: E402
from moe_jax.layers import grouped_matmul  # noqa: E402
from moe_jax.layers import moe  # noqa: E402
from moe_jax.layers import routing  # noqa: E402

ROUTERS = {
    "tokens_choose": lambda k: routing.TokensChooseRouter(num_selected_experts=k),
    "gshard": lambda k: routing.GShardTop2Router(second_expert_policy="random"),
    "expert_choice": lambda k: routing.ExpertChoiceRouter(),
}
SEQUENCE_LENGTH = 512


def _grad_step(module, variables, x, **apply_kwargs) -> Callable[[], object]:
  """jit(value_and_grad) of sum(outputs) + aux losses w.r.t. params and inputs."""
  def loss(params, x):
    y, state = module.apply({"params": params}, x,
                            rngs={"dropout": jax.random.PRNGKey(0),
                                  "gating": jax.random.PRNGKey(1)},
                            mutable=["intermediates"], **apply_kwargs)
    metrics = moe.collect_moe_metrics(state.get("intermediates", {}))
    return jnp.sum(y) + sum(metrics.get(name, 0.0)
                            for name in ("auxiliary_loss", "router_z_loss"))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  params = variables["params"]
  return lambda: step(params, x)


def expert_bound_step(args, num_experts: int, k: int) -> Callable[[], object]:
  """Balanced batched experts: `[E, k*T/E, d_model]`, no routing, no padding."""
  experts = moe.Experts(num_experts=num_experts, mlp_dim=args.d_ff, dtype=args.dtype)
  x = jax.random.normal(jax.random.PRNGKey(0),
                        (num_experts, k * args.tokens // num_experts, args.d_model),
                        args.dtype)
  params = experts.init(jax.random.PRNGKey(1), args.d_model)["params"]

  def loss(params, x):
    weights = experts.apply({"params": params}, args.d_model)
    return jnp.sum(moe.apply_experts(weights, x, experts.activations))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda: step(params, x)


def dense_equiv_step(args, k: int) -> Callable[[], object]:
  """Dense gated-GELU FFN with d_ff = k * d_ff on the same tokens."""
  block = dense.MlpBlock(intermediate_dim=k * args.d_ff, dtype=args.dtype)
  x = _tokens(args)
  return _grad_step(block, block.init(jax.random.PRNGKey(1), x), x)


def _tokens(args) -> jax.Array:
  return jax.random.normal(
      jax.random.PRNGKey(0), (args.tokens // SEQUENCE_LENGTH, SEQUENCE_LENGTH, args.d_model),
      args.dtype)


def run_config(args, num_experts: int, k: int, dispatch_mode: str) -> Dict:
  layer = moe.MoeLayer(
      num_experts=num_experts, router=ROUTERS[args.router](k),
      expert_mlp_dim=args.d_ff, max_group_size=args.group_size,
      train_capacity_factor=args.capacity_factor,
      capacity_scales_with_k=args.capacity_scales_with_k,
      dispatch=dispatch_mode, dropless_backend=args.dropless_backend,
      grouped_matmul_implementation=args.grouped_matmul_implementation, dtype=args.dtype)
  x = _tokens(args)
  # Resolved (and, if it must be, measured) before anything is timed.
  strategy = layer.dispatch_plan(x.shape, x.dtype, train=True).name
  variables = jax.jit(lambda key, x: layer.init(key, x, enable_dropout=True))(
      jax.random.PRNGKey(1), x)
  _, state = jax.jit(lambda v, x: layer.apply(
      v, x, enable_dropout=True, mutable=["intermediates"],
      rngs={"gating": jax.random.PRNGKey(1)}))(variables, x)
  metrics = moe.collect_moe_metrics(state["intermediates"])
  times = interleaved_medians_ms({
      "moe": _grad_step(layer, variables, x, enable_dropout=True),
      "bound": expert_bound_step(args, num_experts, k),
      "dense": dense_equiv_step(args, k),
  }, args.repeats)
  groups, group_size = layer.group_shape(*x.shape[:2])
  capacity = (None if dispatch_mode == "dropless"
              else layer.capacity(group_size, train=True))
  # The ratios come from the reported (rounded) times, so they agree.
  moe_ms, bound_ms, dense_ms = (round(times[name], 3) for name in ("moe", "bound", "dense"))
  return {
      "dispatch": dispatch_mode,
      "strategy": strategy,
      "dropless_backend": args.dropless_backend,
      "grouped_matmul_implementation": args.grouped_matmul_implementation,
      "router": args.router,
      "experts": num_experts,
      "topk": k,
      "group_size": group_size,
      "groups": groups,
      "tokens": args.tokens,
      "expert_capacity": capacity,
      "moe_ms": moe_ms,
      "expert_bound_ms": bound_ms,
      "dense_equiv_ms": dense_ms,
      "bound_ratio": _significant(moe_ms / bound_ms),
      "dense_ratio": _significant(moe_ms / dense_ms),
      "tokens_per_s": round(args.tokens / (moe_ms / 1e3), 1),
      "fraction_dropped": round(float(metrics["fraction_tokens_left_behind"]), 4),
      "dtype": jnp.dtype(args.dtype).name,
      "backend": jax.default_backend(),
  }


def _significant(value: float, digits: int = 4) -> float:
  """`value` to `digits` significant digits (ratios of sub-ms times included)."""
  return float(f"{value:.{digits}g}")


def format_table(rows: List[Dict]) -> str:
  columns = ["dispatch", "strategy", "experts", "topk", "group_size",
             "expert_capacity", "moe_ms", "expert_bound_ms", "dense_equiv_ms", "bound_ratio",
             "dense_ratio", "tokens_per_s", "fraction_dropped"]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
  return "\n".join(lines)


def _int_list(text: str) -> List[int]:
  return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--experts", type=_int_list, default=[8, 32, 128])
  parser.add_argument("--topk", type=_int_list, default=[1, 2])
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--capacity_scales_with_k", action="store_true")
  parser.add_argument("--group_size", type=int, default=1024)
  parser.add_argument("--dispatch", type=lambda s: s.split(","),
                      default=["einsum", "sorted", "dropless"])
  parser.add_argument("--dropless_backend", choices=moe.DROPLESS_BACKENDS, default="auto")
  parser.add_argument("--grouped_matmul_implementation",
                      choices=grouped_matmul.IMPLEMENTATIONS, default="auto")
  parser.add_argument("--router", choices=sorted(ROUTERS), default="tokens_choose")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", action="store_true", help="print one JSON line per config")
  args = parser.parse_args(argv)
  if args.repeats < 5:
    parser.error("--repeats must be >= 5 (the median of at least five runs)")
  if args.tokens % SEQUENCE_LENGTH:
    parser.error(f"--tokens must be a multiple of {SEQUENCE_LENGTH}")
  args.dtype = jnp.dtype(args.dtype)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  rows = []
  for num_experts in args.experts:
    for k in args.topk:
      if args.router == "gshard" and k != 2:
        continue
      for dispatch_mode in args.dispatch:
        if args.router == "expert_choice" and dispatch_mode == "dropless":
          continue
        row = run_config(args, num_experts, k, dispatch_mode)
        rows.append(row)
        if args.json:
          print(json.dumps(row), flush=True)
  print(format_table(rows))


if __name__ == "__main__":
  main()
