r"""Describe a model gin: parameters, activated parameters, FLOPs and memory.

  python -m moe_jax.describe --gin_file gin/models/switch_base_128.gin
  python -m moe_jax.describe --gin_file gin/models/flan_st_32b.gin \
      --mesh data=8,expert=64,model=4 --batch 256 --lengths 2048,512
  python -m moe_jax.describe --gin_file gin/models/tiny_moe.gin --json

Parameter shapes come from `jax.eval_shape` of the model's initialization, so
even a 1.6T-parameter config is described in seconds without allocating it.

Definitions (all documented in the output):
  * total_params: every parameter.
  * activated_params: parameters one token uses. In a token-choice MoE layer
    a token uses k of the E experts (router k; dropped tokens ignored); with
    expert choice, on average `train_capacity_factor` experts. Embedding
    tables count once.
  * flops_per_token: forward FLOPs (2 per multiply-add) of the weight
    matmuls applied to one token, averaged over an encoder token and a
    decoder token (the decoder's includes the output projection). Attention
    score FLOPs depend on lengths and are reported separately with
    `--lengths` (`attention_flops_per_token`, same averaging, full
    non-causal context).
  * Memory with `--mesh` (per device, bytes): parameters (float32), gradients
    (float32, same sharding), optimizer state, and an activation estimate.
    Each parameter is sharded by its logical axes (`params_axes`) through
    `partitioning.standard_logical_axis_rules()`; a dimension that a mesh axis
    does not divide is an error. Optimizer state: 'adafactor' (t5x default:
    factored second moments `prod(shape[:-1]) + prod(shape[:-2])*shape[-1]`
    for rank >= 2, a full one otherwise, no momentum), 'adam' (2 full
    copies), 'none'. Activations (training, per device, batch sharded over
    `expert * data`, per-head / FFN widths divided by `model`), per layer and
    token in elements:
      attention: 4*d + 4*H*hd + 2*H*L_ctx     (norm, q/k/v/out, logits+probs)
      dense FFN: 2*d + (n_in + 1)*d_ff        (norm, projections, product)
      MoE FFN:   2*d + c*(2*d + (n_in + 1)*d_ff_e)   with c the expert rows per
                 token that the layer itself computes: experts * C / group_size
                 (C and groups from the layer's own rules, with the mesh's
                 expert-parallel degree), k for dropless (dispatch/combine
                 buffers and expert hidden)
    summed over layers, plus float32 logits (2 * vocab per decoder token). With
    a remat policy other than 'none' only each layer's input (d per token) is
    kept, plus one layer's full activations.
"""

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning

from moe_jax import cli
from moe_jax import config
from moe_jax import partitioning
from moe_jax.layers import routing
from moe_jax.models import transformer

OPTIMIZERS = ("adafactor", "adam", "none")


@dataclasses.dataclass
class LayerSummary:
  """Parameters of one encoder / decoder layer (or other top-level group)."""

  name: str
  kind: str
  params: int
  activated_params: int
  matmul_params: int          # activated params used as matmul weights


def abstract_variables(module: transformer.EncoderDecoder):
  """`params` and `params_axes` shapes of an unscanned copy of `module`."""
  module = module.clone(config=dataclasses.replace(module.config, scan_layers=False,
                                                   remat_policy="none"))
  tokens = jnp.ones((1, 8), jnp.int32)
  return jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                          enable_dropout=False))


def _flatten(tree) -> Dict[Tuple[str, ...], Any]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn_partitioning.AxisMetadata))[0]:
    flat[tuple(str(getattr(p, "key", p)) for p in path)] = leaf
  return flat


def _experts_per_token(layer: nn.Module) -> float:
  if isinstance(layer.router, routing.ExpertChoiceRouter):
    return float(layer.train_capacity_factor)
  return float(layer.num_selected_experts)


def summarize_layers(module: transformer.EncoderDecoder, params) -> List[LayerSummary]:
  """Per-group parameter counts: embeddings, each layer, norms, logits."""
  moe_layers = {
      "encoder": module.encoder_sparse_mlp() if module.encoder_sparse_mlp else None,
      "decoder": module.decoder_sparse_mlp() if module.decoder_sparse_mlp else None,
  }
  groups: Dict[str, LayerSummary] = {}
  for path, leaf in _flatten(params).items():
    size = int(np.prod(leaf.shape))
    if path[0] in ("encoder", "decoder") and path[1].startswith("layers_"):
      name = f"{path[0]}/{path[1]}"
    else:
      name = "/".join(path[:2]) if path[0] in ("encoder", "decoder") else path[0]
    group = groups.setdefault(name, LayerSummary(name, "dense", 0, 0, 0))
    group.params += size
    active = size
    is_expert = "expert" in path[2:]
    if is_expert:
      layer = moe_layers[path[0]]
      group.kind = f"moe E={layer.num_experts}"
      active = size * _experts_per_token(layer) / layer.num_experts
    group.activated_params += int(round(active))
    is_matmul = leaf.ndim >= 2 and path[-1] not in ("rel_embedding", "embedding")
    if is_matmul:
      group.matmul_params += int(round(active))
  if module.config.logits_via_embedding:
    # The tied embedding is also the output projection of decoder tokens.
    groups["token_embedder"].kind = "embedding (tied logits)"
  return sorted(groups.values(), key=_group_order)


def _group_order(group: LayerSummary):
  """Embeddings, then each stack's layers in order, then its other groups."""
  stack, _, rest = group.name.partition("/")
  if not rest:
    return (0, "", 0, "")
  index = int(rest[len("layers_"):]) if rest.startswith("layers_") else 10**6
  return (1 if stack == "encoder" else 2, stack, index, rest)


def describe(model, mesh: Optional[Dict[str, int]] = None, batch: Optional[int] = None,
             lengths: Optional[Tuple[int, int]] = None, optimizer: str = "adafactor",
             rules=None) -> Dict[str, Any]:
  """Computes the figures printed by the CLI (see the module docstring)."""
  module = model.module
  cfg = module.config
  variables = abstract_variables(module)
  params = variables["params"]
  layers = summarize_layers(module, params)
  total = sum(l.params for l in layers)
  activated = sum(l.activated_params for l in layers)
  encoder_matmul = sum(l.matmul_params for l in layers if l.name.startswith("encoder/"))
  decoder_matmul = sum(l.matmul_params for l in layers if l.name.startswith("decoder/"))
  if cfg.logits_via_embedding:
    decoder_matmul += cfg.vocab_size * cfg.emb_dim
  encoder_flops = 2 * encoder_matmul
  decoder_flops = 2 * decoder_matmul
  out: Dict[str, Any] = {
      "total_params": total,
      "activated_params": activated,
      "flops_per_token": (encoder_flops + decoder_flops) / 2,
      "encoder_flops_per_token": encoder_flops,
      "decoder_flops_per_token": decoder_flops,
      "layers": [dataclasses.asdict(l) for l in layers],
  }
  if lengths:
    enc_len, dec_len = lengths
    attn_width = cfg.num_heads * cfg.head_dim
    enc_attn = cfg.num_encoder_layers * 4 * enc_len * attn_width
    dec_attn = cfg.num_decoder_layers * 4 * (dec_len + enc_len) * attn_width
    out["attention_flops_per_token"] = (enc_attn + dec_attn) / 2
    out["forward_flops_per_sequence"] = (enc_len * (encoder_flops + enc_attn)
                                         + dec_len * (decoder_flops + dec_attn))
  if mesh:
    out["memory"] = memory_per_device(module, variables, mesh, batch, lengths, optimizer,
                                      rules or partitioning.standard_logical_axis_rules())
  return out


def _sharded_shape(name: str, shape, axes, mesh: Dict[str, int], rules) -> Tuple[int, ...]:
  spec = nn.logical_to_mesh_axes(axes, rules)
  local = []
  for dim, logical, mesh_axes in zip(shape, axes, tuple(spec) + (None,) * len(shape)):
    if mesh_axes is None:
      local.append(dim)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    ways = math.prod(mesh.get(a, 1) for a in mesh_axes)
    if dim % ways:
      raise ValueError(
          f"Parameter {name} {tuple(shape)}: its '{logical}' dimension ({dim}) is "
          f"sharded over mesh axes {mesh_axes} of total size {ways}, which does not "
          f"divide it. Choose a mesh whose {'x'.join(mesh_axes)} size divides {dim} "
          "(e.g. an expert axis no larger than, and dividing, the number of experts).")
    local.append(dim // ways)
  return tuple(local)


def memory_per_device(module, variables, mesh: Dict[str, int], batch: Optional[int],
                      lengths: Optional[Tuple[int, int]], optimizer: str,
                      rules) -> Dict[str, Any]:
  """Per-device memory in bytes (see the module docstring for the model)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}.")
  params = _flatten(variables["params"])
  axes = {k[:-1] + (k[-1][:-len("_axes")],): v.names
          for k, v in _flatten(variables["params_axes"]).items()}
  param_elems = optimizer_elems = 0
  for path, leaf in params.items():
    local = _sharded_shape("/".join(path), leaf.shape, axes[path], mesh, rules)
    n = math.prod(local)
    param_elems += n
    if optimizer == "adam":
      optimizer_elems += 2 * n
    elif optimizer == "adafactor":
      if len(local) >= 2:
        optimizer_elems += math.prod(local[:-1]) + math.prod(local[:-2]) * local[-1]
      else:
        optimizer_elems += n
  result = {
      "mesh": dict(mesh),
      "optimizer": optimizer,
      "params_bytes": 4 * param_elems,
      "grads_bytes": 4 * param_elems,
      "optimizer_bytes": 4 * optimizer_elems,
  }
  if batch and lengths:
    result["activation_bytes"] = _activation_bytes(module, mesh, batch, lengths)
  result["total_bytes"] = sum(v for k, v in result.items() if k.endswith("_bytes"))
  return result


def _routed_rows_per_token(layer, local_batch: int, length: int) -> float:
  """Expert rows a token occupies in `layer`'s buffers, as the layer computes them.

  Capacity dispatch fills `experts * C` slots per group of `group_size`
  tokens (C from the layer's own capacity rule); dropless keeps exactly k
  rows per token.
  """
  if layer.dispatch == "dropless":
    return float(layer.num_selected_experts)
  groups, group_size = layer.group_shape(local_batch, length)
  return layer.num_experts * layer.capacity(group_size, train=True) / group_size


def _activation_bytes(module, mesh, batch, lengths) -> int:
  cfg = module.config
  data_ways = mesh.get("data", 1) * mesh.get("expert", 1)
  if batch % data_ways:
    raise ValueError(
        f"Global batch {batch} must be divisible by data x expert = {data_ways} "
        "(the batch is sharded over both axes).")
  local_batch = batch // data_ways
  model_ways = mesh.get("model", 1)
  d = cfg.emb_dim
  heads = cfg.num_heads / model_ways
  width = heads * cfg.head_dim
  n_in = len(cfg.mlp_activations)
  dense_ffn = 2 * d + (n_in + 1) * cfg.mlp_dim / model_ways
  bytes_per = jnp.dtype(cfg.dtype).itemsize

  def sparse_ffn(factory, length):
    # Groups are formed per device, with the mesh's expert-parallel degree.
    layer = factory().clone(num_expert_partitions=mesh.get("expert", 1))
    hidden = (len(layer.activations) + 1) * layer.expert_mlp_dim / model_ways
    return 2 * d + _routed_rows_per_token(layer, local_batch, length) * (2 * d + hidden)

  def stack(name, factory, length, contexts):
    sparse_indices = cfg.sparse_layers(name)
    per_layer = []
    for i in range(getattr(cfg, f"num_{name}_layers")):
      attn = sum(4 * d + 4 * width + 2 * heads * ctx for ctx in contexts)
      ffn = sparse_ffn(factory, length) if i in sparse_indices else dense_ffn
      if i in sparse_indices and cfg.extra_mlp:
        ffn += dense_ffn
      per_layer.append(attn + ffn)
    return per_layer

  enc_len, dec_len = lengths
  enc = stack("encoder", module.encoder_sparse_mlp, enc_len, [enc_len])
  dec = stack("decoder", module.decoder_sparse_mlp, dec_len, [dec_len, enc_len])
  if cfg.remat_policy == "none":
    elems = enc_len * sum(enc) + dec_len * sum(dec)
  else:
    elems = (enc_len * cfg.num_encoder_layers * d + dec_len * cfg.num_decoder_layers * d
             + max(enc_len * max(enc), dec_len * max(dec)))
  logits_bytes = 4 * 2 * dec_len * cfg.vocab_size / model_ways
  return int(local_batch * (elems * bytes_per + logits_bytes))


def _human(n: float, unit: str = "") -> str:
  for scale, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{suffix}{unit}"
  return f"{n:.0f}{unit}"


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def format_report(figures: Dict[str, Any]) -> str:
  """Human-readable table of `describe`'s figures."""
  lines = [
      f"total params:       {figures['total_params']:,} ({_human(figures['total_params'])})",
      f"activated params:   {figures['activated_params']:,} "
      f"({_human(figures['activated_params'])})",
      f"FLOPs per token:    {_human(figures['flops_per_token'], 'FLOPs')} (weight matmuls, "
      f"mean of encoder {_human(figures['encoder_flops_per_token'])} and decoder "
      f"{_human(figures['decoder_flops_per_token'])})",
  ]
  if "attention_flops_per_token" in figures:
    lines.append(f"attention FLOPs/tok: {_human(figures['attention_flops_per_token'], 'FLOPs')}; "
                 f"forward FLOPs/sequence {_human(figures['forward_flops_per_sequence'])}")
  lines.append("")
  lines.append(f"{'group':<28}{'kind':<26}{'params':>14}{'activated':>14}")
  for layer in figures["layers"]:
    lines.append(f"{layer['name']:<28}{layer['kind']:<26}{layer['params']:>14,}"
                 f"{layer['activated_params']:>14,}")
  if "memory" in figures:
    mem = figures["memory"]
    lines.append("")
    lines.append(f"per-device memory on mesh {mem['mesh']} (optimizer {mem['optimizer']}):")
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes",
                "total_bytes"):
      if key in mem:
        lines.append(f"  {key[:-len('_bytes')]:<12}{_gib(mem[key]):>14}")
  return "\n".join(lines)


def _describe(args: argparse.Namespace) -> None:
  lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else None
  if lengths is not None and len(lengths) != 2:
    raise ValueError(f"--lengths takes ENCODER_LENGTH,DECODER_LENGTH, got {args.lengths!r}.")
  mesh = partitioning.parse_mesh_spec(args.mesh) if args.mesh else None
  model = config.load_model(args.gin_file, args.gin_bindings, args.gin_search_paths)
  rules = partitioning.standard_logical_axis_rules(
      parameter_partitioning_dims=args.parameter_partitioning_dims)
  figures = describe(model, mesh=mesh, batch=args.batch, lengths=lengths,
                     optimizer=args.optimizer, rules=rules)
  if args.json:
    figures = {k: v for k, v in figures.items() if k != "layers"}
    print(json.dumps(figures, sort_keys=True))
  else:
    print(format_report(figures))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moe_jax.describe",
      description="Parameter, FLOP and memory figures of a model gin.")
  cli.add_gin_flags(parser)
  parser.add_argument("--mesh", help="e.g. data=8,expert=16,model=1")
  parser.add_argument("--batch", type=int, help="global batch size (sequences)")
  parser.add_argument("--lengths", help="encoder,decoder lengths, e.g. 2048,512")
  parser.add_argument("--optimizer", default="adafactor", choices=OPTIMIZERS)
  parser.add_argument("--parameter_partitioning_dims", type=int, default=1, choices=(1, 2),
                      help="2 also shards parameters' embed axis over `data`")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  cli.add_output_flags(parser)
  return cli.run(_describe, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
