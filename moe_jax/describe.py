r"""Describe a model gin: parameters, activated parameters, FLOPs and memory.

  python -m moe_jax.describe --gin_file gin/models/switch_base_128.gin
  python -m moe_jax.describe --gin_file gin/models/flan_st_32b.gin \
      --mesh data=8,expert=64,model=4 --batch 256 --lengths 2048,512
  python -m moe_jax.describe --gin_file gin/models/tiny_moe.gin --json
  python -m moe_jax.describe --gin_file gin/models/flan_st_32b.gin \
      --batch 32 --lengths 2048,512 --accelerator v4 --chips 256 --mfu 0.4 --plan

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
                 (C and groups from the layer's own rules for the global batch
                 under the mesh: the group count a multiple of data x expert),
                 k for dropless (dispatch/combine buffers and expert hidden)
    summed over layers, plus float32 logits (2 * vocab per decoder token). With
    a remat policy other than 'none' only each layer's input (d per token) is
    kept, plus one layer's full activations.
  * Step estimate with `--accelerator {v4,v5p,v5e,v6e,h100,h200,a100}` (peak
    dense bf16 FLOP/s and HBM per chip in `ACCELERATORS`, sources there),
    `--mfu` (default 0.4) and `--mesh`, or `--plan --chips N` to search the
    mesh (`plan_mesh`: data*expert*model = N, expert dividing the experts,
    model dividing heads and MLP dims, batch divisible by data*expert, remat
    'none' / 'full' and parameter partitioning 1 / 2 tried; the fastest step
    that fits `--memory_fraction` (0.9) of HBM wins, ties broken by fewer
    bytes communicated). Needs `--batch` and `--lengths`. Figures:
      model FLOPs/step = 3 * forward_flops_per_sequence * batch (activated
        params + attention, as above; capacity padding not counted);
        executed = 4 * forward with a remat policy other than 'none';
      step time = executed FLOPs / (chips * peak * mfu);
      tokens/step = batch * (encoder + decoder length); tokens/day =
        tokens/step * 86400 / step time;
      expert all-to-all bytes per chip and step = sum over MoE layers of
        4 * T_dev * r * d_model * bytes (dispatch + combine, forward +
        backward; 6 with remat) when expert > 1, T_dev = batch / (data *
        expert) * length, r the layer's buffer rows per token (E * C / S:
        k * cf when capacity scales with k, cf under the flaxformer rule);
      tensor-parallel and gradient-sync bytes: ring all-reduce estimates
        (see `tensor_parallel_bytes`, `gradient_sync_bytes`).
    `decoder_only_flops_per_token` and `throughput_at` put decoder-only
    anchors (MaxText's Mixtral 8x7B) on the same scale.
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


def _mesh_axes(axes, rules) -> Tuple[Tuple[str, ...], ...]:
  """Mesh axes (a tuple, possibly empty) of each dimension named by `axes`."""
  spec = tuple(nn.logical_to_mesh_axes(axes, rules)) + (None,) * len(axes)
  out = []
  for mesh_axes in spec[:len(axes)]:
    if mesh_axes is None:
      out.append(())
    else:
      out.append((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
  return tuple(out)


def _local_shape(name: str, shape, axes, dim_mesh_axes, mesh: Dict[str, int]) -> Tuple[int, ...]:
  local = []
  for dim, logical, mesh_axes in zip(shape, axes, dim_mesh_axes):
    if not mesh_axes:
      local.append(dim)
      continue
    ways = math.prod(mesh.get(a, 1) for a in mesh_axes)
    if dim % ways:
      raise ValueError(
          f"Parameter {name} {tuple(shape)}: its '{logical}' dimension ({dim}) is "
          f"sharded over mesh axes {mesh_axes} of total size {ways}, which does not "
          f"divide it. Choose a mesh whose {'x'.join(mesh_axes)} size divides {dim} "
          "(e.g. an expert axis no larger than, and dividing, the number of experts).")
    local.append(dim // ways)
  return tuple(local)


def _param_specs(variables, rules) -> List[Tuple[str, Tuple[int, ...], Tuple[str, ...], Any]]:
  """(name, shape, logical axes, mesh axes per dimension) of every parameter."""
  axes = {k[:-1] + (k[-1][:-len("_axes")],): v.names
          for k, v in _flatten(variables["params_axes"]).items()}
  specs = []
  for path, leaf in _flatten(variables["params"]).items():
    names = tuple(axes[path])
    specs.append(("/".join(path), tuple(leaf.shape), names, _mesh_axes(names, rules)))
  return specs


def memory_per_device(module, variables, mesh: Dict[str, int], batch: Optional[int],
                      lengths: Optional[Tuple[int, int]], optimizer: str,
                      rules, specs=None) -> Dict[str, Any]:
  """Per-device memory in bytes (see the module docstring for the model)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}.")
  param_elems = optimizer_elems = 0
  for name, shape, names, dim_mesh_axes in (specs or _param_specs(variables, rules)):
    local = _local_shape(name, shape, names, dim_mesh_axes, mesh)
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


def _routed_rows_per_token(layer, mesh: Dict[str, int], batch: int, length: int) -> float:
  """Expert rows a token occupies in `layer`'s buffers, as the layer computes them.

  Capacity dispatch fills `experts * C` slots per group of `group_size`
  tokens (C from the layer's own capacity rule); dropless keeps exactly k
  rows per token. Groups come from the layer's own rule for the global
  `[batch, length]` batch under `mesh` (the group count a multiple of
  data x expert), as when the layer is traced under that mesh.
  """
  if layer.dispatch == "dropless":
    return float(layer.num_selected_experts)
  sizes = tuple(mesh.get(a, 1) for a in partitioning.MESH_AXES)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(sizes, partitioning.MESH_AXES)):
    groups, group_size = layer.group_shape(batch, length)
  return layer.num_experts * layer.capacity(group_size, train=True) / group_size


def _sparse_layer(factory, mesh: Dict[str, int]):
  """One MoE layer of a stack, with the mesh's expert-parallel degree."""
  return factory().clone(num_expert_partitions=mesh.get("expert", 1))


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
    layer = _sparse_layer(factory, mesh)
    hidden = (len(layer.activations) + 1) * layer.expert_mlp_dim / model_ways
    return 2 * d + _routed_rows_per_token(layer, mesh, batch, length) * (2 * d + hidden)

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


# ---------------------------------------------------------------------------
# Accelerators, step time, communication and the mesh plan.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip: dense bf16 peak and HBM (the vendor's figures, see ACCELERATORS)."""

  name: str
  peak_flops: float   # dense (no sparsity) bf16 matmul FLOP/s per chip
  hbm_bytes: int      # HBM per chip, as the vendor states it
  description: str


ACCELERATORS: Dict[str, Accelerator] = {a.name: a for a in (
    # Cloud TPU docs, "TPU v4": 275 TFLOPS (bf16) per chip, HBM2 32 GiB.
    Accelerator("v4", 275e12, 32 * 2**30, "TPU v4"),
    # Cloud TPU docs, "TPU v5p": 459 TFLOPS (bf16) per chip, HBM2e 95 GB (MaxText's
    # Mixtral 8x7B: 251.94 TFLOP/s per chip = 54.89% MFU, the same peak).
    Accelerator("v5p", 459e12, 95 * 10**9, "TPU v5p"),
    # Cloud TPU docs, "TPU v5e": 197 TFLOPS (bf16) per chip, HBM 16 GB.
    Accelerator("v5e", 197e12, 16 * 10**9, "TPU v5e"),
    # Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOPS (bf16) per chip, HBM 32 GB.
    Accelerator("v6e", 918e12, 32 * 10**9, "TPU v6e (Trillium)"),
    # NVIDIA H100 SXM5 datasheet: BF16 Tensor Core 1,979 TFLOPS *with 2:4
    # sparsity*, 989 dense; 80 GB HBM3.
    Accelerator("h100", 989e12, 80 * 10**9, "NVIDIA H100 SXM 80GB"),
    # NVIDIA H200 SXM datasheet: the H100's compute (BF16 1,979 TFLOPS with
    # sparsity, 989 dense), 141 GB HBM3e.
    Accelerator("h200", 989e12, 141 * 10**9, "NVIDIA H200 SXM 141GB"),
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 sparse);
    # the 80 GB HBM2e SXM4 part.
    Accelerator("a100", 312e12, 80 * 10**9, "NVIDIA A100 SXM 80GB"),
)}
DEFAULT_MFU = 0.4
DEFAULT_MEMORY_FRACTION = 0.9
PLAN_REMAT_POLICIES = ("none", "full")
SECONDS_PER_DAY = 86400


def accelerator(name: str) -> Accelerator:
  try:
    return ACCELERATORS[name.lower()]
  except KeyError:
    raise ValueError(f"Unknown accelerator {name!r}: use one of "
                     f"{', '.join(ACCELERATORS)}.") from None


def _recompute_passes(remat_policy: str) -> int:
  """Extra forward passes a remat policy executes (0 or 1; see the docstring)."""
  return 0 if remat_policy == "none" else 1


def step_time_seconds(flops_per_step: float, chips: int, peak_flops: float,
                      mfu: float) -> float:
  """Seconds per step: `flops_per_step / (chips * peak_flops * mfu)`."""
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu must lie in (0, 1], got {mfu}.")
  if chips < 1:
    raise ValueError(f"--chips must be >= 1, got {chips}.")
  return flops_per_step / (chips * peak_flops * mfu)


def _moe_layers(module, mesh: Dict[str, int]):
  """(stack, layer, number of sparse layers) of each stack that has MoE layers."""
  cfg = module.config
  out = []
  for stack in ("encoder", "decoder"):
    factory = getattr(module, f"{stack}_sparse_mlp")
    count = len(cfg.sparse_layers(stack))
    if factory is not None and count:
      out.append((stack, _sparse_layer(factory, mesh), count))
  return out


def all_to_all_bytes(module, mesh: Dict[str, int], batch: int, lengths: Tuple[int, int],
                     remat_policy: str = "none") -> int:
  """Expert all-to-all bytes one chip exchanges per training step.

  For each MoE layer, when the mesh's `expert` axis is > 1:
    (2 + 2 + 2 * recompute) * T_dev * r * d_model * bytes
  dispatch and combine, forward and backward (4x; 6x when a remat policy
  recomputes the forward pass), with T_dev = (batch / (data * expert)) *
  the stack's length the tokens on one chip, r the expert-buffer rows per
  token of the layer (`E * C / group_size` from its capacity rule: k * cf
  when capacity scales with k, cf under the flaxformer rule
  C = round(cf * S / E) that the ST-MoE and Switch configs use, k for
  dropless), bytes the activation dtype's size. The whole buffer is counted;
  (expert - 1) / expert of it leaves the chip.
  """
  if mesh.get("expert", 1) <= 1:
    return 0
  cfg = module.config
  local_batch = batch // (mesh.get("data", 1) * mesh.get("expert", 1))
  passes = 2 * (2 + _recompute_passes(remat_policy))
  bytes_per = jnp.dtype(cfg.dtype).itemsize
  total = 0.0
  for stack, layer, count in _moe_layers(module, mesh):
    length = lengths[0] if stack == "encoder" else lengths[1]
    rows = _routed_rows_per_token(layer, mesh, batch, length)
    total += count * passes * local_batch * length * rows * cfg.emb_dim * bytes_per
  return int(round(total))


def tensor_parallel_bytes(module, mesh: Dict[str, int], batch: int,
                          lengths: Tuple[int, int], remat_policy: str = "none") -> int:
  """Bytes one chip moves in `model`-axis all-reduces per step (ring estimate).

  Each attention (self, cross) and FFN block (dense, extra, expert) ends in a
  matmul whose contraction is sharded over `model`: its output is all-reduced
  in the forward pass (and again when recomputed) and its input gradient in
  the backward pass, each `2 (m - 1) / m * rows * d_model * bytes` per chip,
  rows = T_dev (times the expert-buffer rows per token r for expert FFNs).
  """
  model_ways = mesh.get("model", 1)
  if model_ways <= 1:
    return 0
  cfg = module.config
  local_batch = batch // (mesh.get("data", 1) * mesh.get("expert", 1))
  bytes_per = jnp.dtype(cfg.dtype).itemsize
  ring = 2 * (model_ways - 1) / model_ways
  passes = 2 + _recompute_passes(remat_policy)
  rows = 0.0
  moe = {stack: (layer, count) for stack, layer, count in _moe_layers(module, mesh)}
  for stack, length, attentions in (("encoder", lengths[0], 1), ("decoder", lengths[1], 2)):
    layers = getattr(cfg, f"num_{stack}_layers")
    sparse = len(cfg.sparse_layers(stack))
    blocks = layers * attentions + (layers - sparse)
    if sparse:
      layer, _ = moe[stack]
      blocks += sparse * _routed_rows_per_token(layer, mesh, batch, length)
      if cfg.extra_mlp:
        blocks += sparse
    rows += local_batch * length * blocks
  return int(round(passes * ring * rows * cfg.emb_dim * bytes_per))


def gradient_sync_bytes(specs, mesh: Dict[str, int], remat_policy: str = "none") -> int:
  """Bytes one chip moves per step to combine gradients (float32, ring estimates).

  The batch is sharded over data x expert, so a parameter's gradient is
  summed over those of the two axes that do not shard the parameter:
  all-reduce `2 (r - 1) / r * local * 4` with r their size. A parameter
  sharded over `data` (2-D parameter partitioning) is all-gathered before
  each forward / backward (/ recomputed forward) use and its gradient
  reduce-scattered: `(passes + 1) * (d - 1) * local * 4`.
  """
  passes = 2 + _recompute_passes(remat_policy)
  total = 0.0
  for name, shape, names, dim_mesh_axes in specs:
    local = math.prod(_local_shape(name, shape, names, dim_mesh_axes, mesh))
    used = {a for axes in dim_mesh_axes for a in axes}
    replicas = math.prod(mesh.get(a, 1) for a in ("data", "expert") if a not in used)
    total += 2 * (replicas - 1) / replicas * local * 4
    if "data" in used:
      total += (passes + 1) * (mesh.get("data", 1) - 1) * local * 4
  return int(round(total))


def _capacity_flops(module, mesh: Dict[str, int], batch: int,
                    lengths: Tuple[int, int]) -> Tuple[float, Dict[str, float]]:
  """Forward expert-FFN FLOPs per step the capacity buffers add over k rows per token.

  Returns (extra forward FLOPs, expert-buffer rows per token of each MoE stack):
  each MoE layer runs its expert FFNs over r = E * C / group_size rows per
  token instead of the k that `flops_per_token` counts (negative when the
  capacity rule keeps fewer than k, e.g. top-2 at C = round(1.25 * S / E)).
  """
  extra = 0.0
  rows_per_token = {}
  for stack, layer, count in _moe_layers(module, mesh):
    length = lengths[0] if stack == "encoder" else lengths[1]
    rows = _routed_rows_per_token(layer, mesh, batch, length)
    rows_per_token[stack] = rows
    per_row = 2 * (len(layer.activations) + 1) * module.config.emb_dim * layer.expert_mlp_dim
    extra += count * (rows - _experts_per_token(layer)) * per_row * batch * length
  return extra, rows_per_token


def step_estimate(module, variables, figures: Dict[str, Any], mesh: Dict[str, int],
                  batch: int, lengths: Tuple[int, int], chip: Accelerator, mfu: float,
                  optimizer: str, rules, remat_policy: Optional[str] = None,
                  parameter_partitioning_dims: int = 1,
                  memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                  specs=None) -> Dict[str, Any]:
  """Memory, step time, throughput and communication of one training step on `mesh`.

  `mfu` is the fraction of the chips' peak achieved on the FLOPs executed.
  Model FLOPs per step are 3 x forward (`forward_flops_per_sequence` x batch:
  activated parameters + attention, capacity padding not counted, as
  MaxText counts MFU); a remat policy other than 'none' also executes the
  forward pass again (+1 x forward), so its step is 4/3 as long at the same
  `mfu` and its model-FLOPs utilization is 3/4 of it. `capacity_flops_per_step`
  (informational, not in the step time) is the 3 x forward with each MoE
  layer's expert FFNs over its capacity buffer (r rows per token, see
  `_capacity_flops`) instead of k rows.
  """
  remat_policy = module.config.remat_policy if remat_policy is None else remat_policy
  module = module.clone(config=dataclasses.replace(module.config, remat_policy=remat_policy))
  chips = math.prod(mesh.get(a, 1) for a in partitioning.MESH_AXES)
  specs = specs if specs is not None else _param_specs(variables, rules)
  memory = memory_per_device(module, variables, mesh, batch, lengths, optimizer, rules,
                             specs=specs)
  forward = figures["forward_flops_per_sequence"] * batch
  model_flops = 3 * forward
  executed = (3 + _recompute_passes(remat_policy)) * forward
  seconds = step_time_seconds(executed, chips, chip.peak_flops, mfu)
  capacity_extra, rows_per_token = _capacity_flops(module, mesh, batch, lengths)
  tokens = batch * (lengths[0] + lengths[1])
  usable = int(chip.hbm_bytes * memory_fraction)
  comms = {
      "all_to_all_bytes_per_chip": all_to_all_bytes(module, mesh, batch, lengths,
                                                    remat_policy),
      "tensor_parallel_bytes_per_chip": tensor_parallel_bytes(module, mesh, batch, lengths,
                                                              remat_policy),
      "gradient_sync_bytes_per_chip": gradient_sync_bytes(specs, mesh, remat_policy),
  }
  return {
      "accelerator": chip.name,
      "chips": chips,
      "peak_flops_per_chip": chip.peak_flops,
      "hbm_bytes_per_chip": chip.hbm_bytes,
      "usable_bytes_per_chip": usable,
      "mfu": mfu,
      "mesh": dict(mesh),
      "remat_policy": remat_policy,
      "parameter_partitioning_dims": parameter_partitioning_dims,
      "optimizer": optimizer,
      "batch": batch,
      "lengths": list(lengths),
      "memory": memory,
      "fits": memory["total_bytes"] <= usable,
      "model_flops_per_step": model_flops,
      "executed_flops_per_step": executed,
      "model_flops_utilization": mfu * model_flops / executed,
      "expert_rows_per_token": rows_per_token,
      "capacity_flops_per_step": model_flops + 3 * capacity_extra,
      "step_time_s": seconds,
      "flops_per_second_per_chip": executed / seconds / chips,
      "tokens_per_step": tokens,
      "target_tokens_per_step": batch * lengths[1],
      "tokens_per_second": tokens / seconds,
      "tokens_per_day": tokens * SECONDS_PER_DAY / seconds,
      "target_tokens_per_day": batch * lengths[1] * SECONDS_PER_DAY / seconds,
      **comms,
      "communication_bytes_per_chip": sum(comms.values()),
  }


def _divisors(n: int) -> List[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def mesh_constraints(module, mesh: Dict[str, int], batch: int) -> Optional[str]:
  """Why `mesh` cannot run `module` with global batch `batch` (None if it can)."""
  cfg = module.config
  data, expert, model = (mesh.get(a, 1) for a in partitioning.MESH_AXES)
  layers = _moe_layers(module, mesh)
  if not layers and expert > 1:
    return "expert > 1 without MoE layers"
  for stack, layer, _ in layers:
    if layer.num_experts % expert:
      return f"expert={expert} does not divide the {stack}'s {layer.num_experts} experts"
    if layer.expert_mlp_dim % model:
      return f"model={model} does not divide the expert MLP dim {layer.expert_mlp_dim}"
  if cfg.num_heads % model:
    return f"model={model} does not divide the {cfg.num_heads} heads"
  if cfg.mlp_dim % model:
    return f"model={model} does not divide the MLP dim {cfg.mlp_dim}"
  if batch % (data * expert):
    return f"batch {batch} is not divisible by data x expert = {data * expert}"
  return None


def plan_mesh(model, chips: int, chip: Accelerator, batch: int, lengths: Tuple[int, int],
              mfu: float = DEFAULT_MFU, optimizer: str = "adafactor",
              remat_policies: Sequence[str] = PLAN_REMAT_POLICIES,
              parameter_partitioning_dims: Sequence[int] = (1, 2),
              memory_fraction: float = DEFAULT_MEMORY_FRACTION,
              figures: Optional[Dict[str, Any]] = None,
              variables=None) -> Dict[str, Any]:
  """The fastest (data, expert, model) mesh of `chips` chips that fits memory.

  Searches every data x expert x model = chips with expert dividing the
  number of experts (1 for dense models), model dividing the heads and the
  MLP / expert MLP dims (and every sharded parameter dimension), and batch
  divisible by data x expert; for each, every remat policy in
  `remat_policies` and parameter partitioning in
  `parameter_partitioning_dims`. Fitting means the per-chip memory model
  (params + grads + optimizer + activations) is at most `memory_fraction` of
  the chip's HBM. Candidates are ranked by step time (remat costs a
  recomputed forward pass), then by the communication bytes per chip
  (all-to-all + tensor-parallel + gradient sync: at equal FLOPs the mesh that
  moves less), then by memory.

  Returns:
    {'best': step_estimate(...) of the winner, 'considered': meshes that
    satisfy the divisibility rules, 'evaluated': (mesh, remat, partitioning)
    combinations, 'fitting': how many fit, 'alternatives': the next fitting
    ones (at most 5)}.

  Raises:
    ValueError: no mesh satisfies the divisibility rules, or none fits (the
      message names the smallest one and what it needs).
  """
  module = model.module
  if figures is None or "forward_flops_per_sequence" not in figures:
    figures = describe(model, lengths=lengths)
  variables = variables if variables is not None else abstract_variables(module)
  rejected = set()
  meshes = []
  for expert in _divisors(chips):
    for model_ways in _divisors(chips // expert):
      mesh = {"data": chips // (expert * model_ways), "expert": expert, "model": model_ways}
      why = mesh_constraints(module, mesh, batch)
      if why is None:
        meshes.append(mesh)
      else:
        rejected.add(why)
  if not meshes:
    reasons = "; ".join(sorted(rejected)[:4])
    raise ValueError(
        f"No (data, expert, model) mesh of {chips} chips can run this model with batch "
        f"{batch}: every factorization breaks a rule ({reasons}). Use a batch divisible "
        "by more chips, or a chip count that the experts / heads divide.")
  candidates = []
  errors = []
  for dims in parameter_partitioning_dims:
    rules = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=dims)
    specs = _param_specs(variables, rules)
    for mesh in meshes:
      if dims == 2 and mesh["data"] == 1 and 1 in parameter_partitioning_dims:
        continue  # Without a data axis, 2-D parameter partitioning is 1-D.
      for remat in remat_policies:
        try:
          candidates.append(step_estimate(
              module, variables, figures, mesh, batch, lengths, chip, mfu, optimizer, rules,
              remat_policy=remat, parameter_partitioning_dims=dims,
              memory_fraction=memory_fraction, specs=specs))
        except ValueError as error:  # A parameter dimension the mesh does not divide.
          errors.append(str(error))
  if not candidates:
    raise ValueError(f"No mesh of {chips} chips shards every parameter: {errors[0]}")
  fitting = sorted((c for c in candidates if c["fits"]), key=_plan_rank)
  if not fitting:
    smallest = min(candidates, key=lambda c: c["memory"]["total_bytes"])
    raise ValueError(
        f"Nothing fits: no mesh of {chips} x {chip.name} (usable "
        f"{_gib(smallest['usable_bytes_per_chip'])} per chip = {memory_fraction:.0%} of "
        f"{_gib(chip.hbm_bytes)}) holds batch {batch} at lengths {lengths[0]},{lengths[1]}; "
        f"the smallest, {_mesh_text(smallest['mesh'])} with remat "
        f"{smallest['remat_policy']} and parameter_partitioning_dims "
        f"{smallest['parameter_partitioning_dims']}, needs "
        f"{_gib(smallest['memory']['total_bytes'])} per chip. Use more chips, a smaller "
        "batch or shorter lengths, or a chip with more memory.")
  return {
      "best": fitting[0],
      "considered": len(meshes),
      "evaluated": len(candidates),
      "fitting": len(fitting),
      "alternatives": [_plan_summary(c) for c in fitting[1:6]],
  }


def _plan_rank(candidate: Dict[str, Any]):
  return (float(f"{candidate['step_time_s']:.9g}"), candidate["communication_bytes_per_chip"],
          candidate["memory"]["total_bytes"],
          tuple(candidate["mesh"][a] for a in ("model", "data", "expert")))


def _plan_summary(candidate: Dict[str, Any]) -> Dict[str, Any]:
  keys = ("mesh", "remat_policy", "parameter_partitioning_dims", "step_time_s",
          "communication_bytes_per_chip", "all_to_all_bytes_per_chip")
  out = {k: candidate[k] for k in keys}
  out["total_bytes"] = candidate["memory"]["total_bytes"]
  return out


def decoder_only_flops_per_token(num_layers: int, emb_dim: int, num_heads: int,
                                 num_kv_heads: int, head_dim: int, mlp_dim: int,
                                 vocab_size: int, seq_len: int, num_experts: int = 1,
                                 num_experts_per_token: int = 1, num_mlp_matmuls: int = 3,
                                 causal_attention: bool = False) -> float:
  """Training FLOPs per token (3 x forward) of a decoder-only (Mixtral-like) model.

  MaxText's accounting (`calculate_tflops_training_per_device`), per token:
  FFN `2 * d * d_ff * n_matmuls * k` + router `2 * d * E`, q/k/v
  `2 * d * (H + 2 * H_kv) * hd`, output projection `2 * d * H * hd`, per layer;
  logits `2 * d * vocab`; attention `4 * seq * H * hd` per layer (halved with
  `causal_attention`, as MaxText does since 2025; its 2024 Mixtral figures
  counted it in full). All times 3 for forward + backward.
  """
  ffn = 2 * emb_dim * mlp_dim * num_mlp_matmuls * num_experts_per_token
  if num_experts > 1:
    ffn += 2 * emb_dim * num_experts
  qkv = 2 * emb_dim * (num_heads + 2 * num_kv_heads) * head_dim
  projection = 2 * emb_dim * num_heads * head_dim
  attention = 4 * seq_len * num_heads * head_dim / (2 if causal_attention else 1)
  forward = num_layers * (ffn + qkv + projection + attention) + 2 * emb_dim * vocab_size
  return 3 * forward


# Mixtral 8x7B (Mistral AI's config.json, as MaxText's mixtral-8x7b.yml).
MIXTRAL_8X7B = dict(num_layers=32, emb_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                    mlp_dim=14336, vocab_size=32000, num_experts=8, num_experts_per_token=2)


def throughput_at(flops_per_token: float, chip: Accelerator, chips: int,
                  mfu: float) -> Dict[str, float]:
  """Per-chip FLOP/s and tokens/s at `mfu` for a model of `flops_per_token`."""
  flops_per_second = chip.peak_flops * mfu
  return {"flops_per_second_per_chip": flops_per_second,
          "tokens_per_second_per_chip": flops_per_second / flops_per_token,
          "tokens_per_day": flops_per_second * chips * SECONDS_PER_DAY / flops_per_token}


def _mesh_text(mesh: Dict[str, int]) -> str:
  return ",".join(f"{a}={mesh.get(a, 1)}" for a in partitioning.MESH_AXES)


def _sci(n: float) -> str:
  mantissa, exponent = f"{n:.4e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _seconds(s: float) -> str:
  if s < 1e-3:
    return f"{s * 1e6:.1f} us"
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.3f} s"


def format_estimate(estimate: Dict[str, Any], plan: Optional[Dict[str, Any]] = None) -> str:
  """Human-readable step estimate (and plan search) lines."""
  e = estimate
  chip = ACCELERATORS[e["accelerator"]]
  mem = e["memory"]
  head = "plan" if plan else "estimate"
  lines = [
      f"{head}: {e['chips']} x {chip.description} (peak {e['peak_flops_per_chip'] / 1e12:.0f} "
      f"TFLOP/s bf16, HBM {_gib(e['hbm_bytes_per_chip'])}, usable "
      f"{_gib(e['usable_bytes_per_chip'])}), MFU {e['mfu']:.3g}, batch {e['batch']} x "
      f"({e['lengths'][0]} + {e['lengths'][1]}) tokens, optimizer {e['optimizer']}",
  ]
  if plan:
    lines.append(f"  searched:             {plan['considered']} mesh"
                 f"{'es' * (plan['considered'] != 1)} x remat x parameter partitioning = "
                 f"{plan['evaluated']} candidates, {plan['fitting']} fit")
  lines += [
      f"  mesh:                 {_mesh_text(e['mesh'])} (remat {e['remat_policy']}, "
      f"parameter_partitioning_dims {e['parameter_partitioning_dims']})",
      "  per-chip memory:      " + ", ".join(
          f"{k[:-len('_bytes')]} {_gib(mem[k])}"
          for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes")
          if k in mem),
      f"                        total {_gib(mem['total_bytes'])} of "
      f"{_gib(e['usable_bytes_per_chip'])} usable: "
      + ("fits" if e["fits"] else "DOES NOT FIT"),
      f"  step FLOPs:           {_sci(e['model_flops_per_step'])} model (3 x forward)"
      + (f", {_sci(e['executed_flops_per_step'])} executed with remat "
         f"(MFU {e['model_flops_utilization']:.3g})"
         if e["executed_flops_per_step"] != e["model_flops_per_step"] else ""),
      f"  step time:            {_seconds(e['step_time_s'])} = "
      f"{_sci(e['executed_flops_per_step'])} / ({e['chips']} chip{'s' * (e['chips'] != 1)} x "
      f"{e['peak_flops_per_chip'] / 1e12:.0f}T x {e['mfu']:.3g}); "
      f"{e['flops_per_second_per_chip'] / 1e12:.1f} TFLOP/s per chip",
      f"  tokens:               {e['tokens_per_step']:,} per step "
      f"({e['target_tokens_per_step']:,} targets); {_human(e['tokens_per_second'])}/s; "
      f"{_human(e['tokens_per_day'])}/day ({_human(e['target_tokens_per_day'])} targets/day)",
      f"  all-to-all per chip:  {e['all_to_all_bytes_per_chip'] / 1e9:.3f} GB per step "
      "(dispatch + combine, forward + backward)",
  ]
  if e["expert_rows_per_token"]:
    lines.append(
        "  expert buffers:       rows per token " + ", ".join(
            f"{k} {v:.3g}" for k, v in e["expert_rows_per_token"].items())
        + f"; step FLOPs with expert FFNs over them: {_sci(e['capacity_flops_per_step'])} "
        f"({e['capacity_flops_per_step'] / e['model_flops_per_step'] - 1:+.1%} vs model)")
  lines += [
      f"  other comms per chip: tensor-parallel {e['tensor_parallel_bytes_per_chip'] / 1e9:.3f}"
      f" GB, gradient sync {e['gradient_sync_bytes_per_chip'] / 1e9:.3f} GB per step",
  ]
  if plan and plan["alternatives"]:
    lines.append("  next best:")
    for alt in plan["alternatives"]:
      lines.append(
          f"    {_mesh_text(alt['mesh']):<28} remat {alt['remat_policy']:<5} dims "
          f"{alt['parameter_partitioning_dims']}  step {_seconds(alt['step_time_s']):>10}  "
          f"memory {_gib(alt['total_bytes']):>10}  comms "
          f"{alt['communication_bytes_per_chip'] / 1e9:8.3f} GB")
  return "\n".join(lines)


def _human(n: float, unit: str = "") -> str:
  for scale, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{suffix}{unit}"
  return f"{n:.0f}{unit}"


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def format_report(figures: Dict[str, Any], layers: bool = True) -> str:
  """Human-readable table of `describe`'s figures (`layers`: the per-group table)."""
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
  if layers:
    lines.append("")
    lines.append(f"{'group':<28}{'kind':<26}{'params':>14}{'activated':>14}")
    for layer in figures["layers"]:
      lines.append(f"{layer['name']:<28}{layer['kind']:<26}{layer['params']:>14,}"
                   f"{layer['activated_params']:>14,}")
  if "memory" in figures and "estimate" not in figures:
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
  estimating = args.plan or args.accelerator is not None
  if estimating:
    if args.accelerator is None:
      raise ValueError("--plan needs --accelerator (one of "
                       f"{', '.join(ACCELERATORS)}) and --chips.")
    chip = accelerator(args.accelerator)
    if not (args.batch and lengths):
      raise ValueError("--accelerator / --plan need --batch and --lengths (the step they "
                       "estimate).")
    if args.plan and mesh:
      raise ValueError("Give either --plan (search a mesh) or --mesh, not both.")
    if args.plan and not args.chips:
      raise ValueError("--plan needs --chips (the number of chips to plan for).")
    if not args.plan and not mesh:
      raise ValueError("--accelerator needs --mesh (or --plan with --chips).")
    if mesh and args.chips and math.prod(mesh.values()) != args.chips:
      raise ValueError(f"--mesh {args.mesh} has {math.prod(mesh.values())} devices but "
                       f"--chips is {args.chips}.")
    if not 0 < args.memory_fraction <= 1:
      raise ValueError(f"--memory_fraction must lie in (0, 1], got {args.memory_fraction}.")
  elif args.chips or args.remat:
    raise ValueError("--chips and --remat go with --accelerator (and --plan or --mesh).")
  model = config.load_model(args.gin_file, args.gin_bindings, args.gin_search_paths)
  dims = args.parameter_partitioning_dims
  rules = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=dims or 1)
  # With an estimate, its own memory (for its remat policy) replaces describe's.
  figures = describe(model, mesh=None if estimating else mesh, batch=args.batch,
                     lengths=lengths, optimizer=args.optimizer, rules=rules)
  plan = None
  if args.plan:
    plan = plan_mesh(model, args.chips, chip, args.batch, lengths, mfu=args.mfu,
                     optimizer=args.optimizer,
                     remat_policies=(args.remat,) if args.remat else PLAN_REMAT_POLICIES,
                     parameter_partitioning_dims=(dims,) if dims else (1, 2),
                     memory_fraction=args.memory_fraction, figures=figures)
    figures["estimate"] = plan["best"]
    figures["memory"] = plan["best"]["memory"]
    figures["plan"] = {k: v for k, v in plan.items() if k != "best"}
  elif estimating:
    figures["estimate"] = step_estimate(
        model.module, abstract_variables(model.module), figures, mesh, args.batch, lengths,
        chip, args.mfu, args.optimizer, rules, remat_policy=args.remat,
        parameter_partitioning_dims=dims or 1, memory_fraction=args.memory_fraction)
    figures["memory"] = figures["estimate"]["memory"]
  if args.json:
    figures = {k: v for k, v in figures.items() if k != "layers"}
    print(json.dumps(figures, sort_keys=True))
  else:
    # With an estimate, the per-group table is left out (describe without
    # --accelerator prints it) and the memory is the estimate's.
    print(format_report(figures, layers="estimate" not in figures))
    if "estimate" in figures:
      print()
      print(format_estimate(figures["estimate"], plan))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moe_jax.describe",
      description="Parameter, FLOP and memory figures of a model gin.")
  cli.add_gin_flags(parser)
  parser.add_argument("--mesh", help="e.g. data=8,expert=16,model=1")
  parser.add_argument("--batch", type=int, help="global batch size (sequences)")
  parser.add_argument("--lengths", help="encoder,decoder lengths, e.g. 2048,512")
  parser.add_argument("--optimizer", default="adafactor", choices=OPTIMIZERS)
  parser.add_argument("--parameter_partitioning_dims", type=int, default=None, choices=(1, 2),
                      help="2 also shards parameters' embed axis over `data` (default 1; "
                      "--plan tries both unless this is given)")
  parser.add_argument("--accelerator", type=str.lower, choices=sorted(ACCELERATORS),
                      help="estimate the training step on this chip (with --mesh or --plan)")
  parser.add_argument("--chips", type=int,
                      help="number of chips (TPU v4-512 / v5p-1024 are 256 / 512 chips)")
  parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                      help="fraction of peak bf16 FLOP/s achieved (default %(default)s)")
  parser.add_argument("--plan", action="store_true",
                      help="search the fastest (data, expert, model) mesh that fits memory")
  parser.add_argument("--remat", choices=sorted(transformer.REMAT_POLICIES),
                      help="remat policy for the estimate (default: the config's; --plan "
                      "tries 'none' and 'full')")
  parser.add_argument("--memory_fraction", type=float, default=DEFAULT_MEMORY_FRACTION,
                      help="usable share of HBM for the fit test (default %(default)s)")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  cli.add_output_flags(parser)
  return cli.run(_describe, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
