"""Imports Hugging Face T5 / Flan-T5 / mT5 / Switch Transformers checkpoints.

A Hugging Face model directory (`config.json` plus `model.safetensors`, a
sharded `model.safetensors.index.json`, or `pytorch_model.bin`) becomes

  OUT/checkpoint/   an orbax checkpoint of `{'params': ...}` in the canonical
                    moe_jax parameter tree (t5x / flaxformer names), float32;
  OUT/model.gin     gin bindings that build the matching `EncoderDecoder` and
                    model (and the vocabulary, when the directory has one);
  OUT/spiece.model  the SentencePiece vocabulary, when present.

What maps to what (torch `Linear` weights are `[out, in]`, ours `[in, out]`):

  shared.weight                                   token_embedder/embedding
  {s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                  {s}/relpos_bias/rel_embedding (transposed)
  {s}.block.{i}.layer.0.SelfAttention.{q,k,v,o}   attention/{query,key,value,out}/kernel
  decoder ... layer.1.EncDecAttention.{q,k,v,o}   encoder_decoder_attention/...
  ... DenseReluDense.{wi,wi_0,wi_1,wo} / mlp.{wi,wo}   mlp/{wi,wi_0,wi_1,wo}
  ... mlp.router.classifier.weight                mlp/router/w
  ... mlp.experts.expert_{e}.{wi,wo}              mlp/expert/{wi,wo} (stacked on axis 0)
  {s}.final_layer_norm.weight                     encoder/encoder_norm, decoder/decoder_norm
  lm_head.weight                                  decoder/logits_dense/kernel (untied only)

Tied output embeddings with T5's `d_model**-0.5` logit scaling (T5 v1.0,
Switch) stay tied; every other combination (Flan-T5's untied head, or an
unscaled tied head as transformers 5 saves T5 v1.1) becomes an untied
`logits_dense` kernel with the scale folded in, which computes the same logits.

Routing of converted Switch models reproduces transformers'
`SwitchTransformersTop1Router`: top-1 in float32, raw top-1 probability as the
gate, each sequence its own routing group, and a fixed per-expert capacity
(`expert_capacity` in config.json) filled in token order.
"""

import dataclasses
import enum
import json
import os
import shutil
import struct
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from moe_jax import checkpoints
from moe_jax import config as config_lib
from moe_jax.models import transformer

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
SPIECE_FILE = "spiece.model"
GIN_FILE = "model.gin"

# model_type -> the family whose layer names it uses.
SUPPORTED_MODEL_TYPES = {"t5": "t5", "mt5": "t5", "switch_transformers": "switch"}

# transformers activation names -> moe_jax.layers.dense activation names.
_ACTIVATIONS = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "gelu": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# Tensors that transformers itself ignores when loading: some early T5
# checkpoints carry a relative bias on cross-attention that no code path uses.
_IGNORED_SUFFIXES = ("EncDecAttention.relative_attention_bias.weight",)


@dataclasses.dataclass(frozen=True)
class HfArchitecture:
  """What a Hugging Face checkpoint is, in moe_jax terms.

  Attributes:
    model_type: config.json `model_type` ('t5', 'mt5', 'switch_transformers').
    config: the moe_jax `TransformerConfig` that computes the same function
      (float32; sparse layer counts and layouts included).
    scale_logits: whether the checkpoint scales decoder outputs by
      `d_model**-0.5` before the output projection (folded into the untied
      kernel when `config.logits_via_embedding` is False).
    num_experts: experts per sparse layer (0: dense model).
    expert_capacity: fixed per-sequence capacity of each expert (Switch).
    router_jitter_noise: Switch's training-time router input jitter.
  """

  model_type: str
  config: transformer.TransformerConfig
  scale_logits: bool
  num_experts: int = 0
  expert_capacity: Optional[int] = None
  router_jitter_noise: float = 0.0

  def __getattr__(self, name: str) -> Any:
    # The transformer hyperparameters read as the architecture's own
    # (`arch.emb_dim`); `config` itself is looked up normally.
    if name == "config":
      raise AttributeError(name)
    return getattr(self.config, name)

  @property
  def family(self) -> str:
    return SUPPORTED_MODEL_TYPES[self.model_type]

  @property
  def encoder_sparse_layers(self) -> Tuple[int, ...]:
    return self.config.sparse_layers("encoder")

  @property
  def decoder_sparse_layers(self) -> Tuple[int, ...]:
    return self.config.sparse_layers("decoder")


# ---------------------------------------------------------------------------
# Reading a Hugging Face directory.
# ---------------------------------------------------------------------------


def read_config(model_dir: str) -> Dict[str, Any]:
  """Reads `config.json` and checks that the model type is supported."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {model_dir!r}: pass the directory written by "
        "transformers' `save_pretrained` (or a downloaded model snapshot).")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  model_type = config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"Unsupported architecture in {path}: model_type={model_type!r}, "
        f"architectures={config.get('architectures')}. Supported model types: "
        f"{sorted(SUPPORTED_MODEL_TYPES)} (T5ForConditionalGeneration, "
        "MT5ForConditionalGeneration, SwitchTransformersForConditionalGeneration).")
  if not config.get("is_encoder_decoder", True):
    raise ValueError(f"{path} describes an encoder-only model; moe_jax imports "
                     "encoder-decoder checkpoints (…ForConditionalGeneration).")
  return config


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads one `.safetensors` file into numpy arrays (memory-mapped).

  The format is an 8-byte little-endian header size, a JSON header of
  `{name: {dtype, shape, data_offsets}}`, then the raw tensor bytes. Reading it
  directly keeps bfloat16 / float8 checkpoints loadable without torch.
  """
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"Tensor {name!r} in {path} has unsupported dtype {info['dtype']}.")
    begin, end = info["data_offsets"]
    tensors[name] = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(
        info["shape"])
  return tensors


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"{path} is a PyTorch pickle and reading it needs torch, which is not "
        "installed: `pip install torch`, or convert the checkpoint to safetensors "
        "(`model.save_pretrained(dir, safe_serialization=True)`).") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {name: t.detach().to(torch.float32).numpy() for name, t in state.items()}


def read_weights(model_dir: str) -> Dict[str, np.ndarray]:
  """Reads every tensor of a Hugging Face model directory.

  Looks for, in order: model.safetensors, model.safetensors.index.json
  (shards), pytorch_model.bin, pytorch_model.bin.index.json.

  Returns:
    {tensor name: numpy array in the stored dtype}.
  """
  def sharded(index_file, reader):
    with open(os.path.join(model_dir, index_file), encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(model_dir, shard)
      if not os.path.isfile(shard_path):
        raise FileNotFoundError(f"{index_file} lists shard {shard!r}, which is "
                                f"missing from {model_dir!r}.")
      tensors.update(reader(shard_path))
    return tensors

  if os.path.isfile(os.path.join(model_dir, SAFETENSORS_FILE)):
    return read_safetensors(os.path.join(model_dir, SAFETENSORS_FILE))
  if os.path.isfile(os.path.join(model_dir, SAFETENSORS_INDEX_FILE)):
    return sharded(SAFETENSORS_INDEX_FILE, read_safetensors)
  if os.path.isfile(os.path.join(model_dir, TORCH_FILE)):
    return _read_torch(os.path.join(model_dir, TORCH_FILE))
  if os.path.isfile(os.path.join(model_dir, TORCH_INDEX_FILE)):
    return sharded(TORCH_INDEX_FILE, _read_torch)
  raise FileNotFoundError(
      f"No weights in {model_dir!r}: expected {SAFETENSORS_FILE}, "
      f"{SAFETENSORS_INDEX_FILE}, {TORCH_FILE} or {TORCH_INDEX_FILE}. Download the "
      "weight files too (not only config.json).")


# ---------------------------------------------------------------------------
# config.json -> HfArchitecture.
# ---------------------------------------------------------------------------


def _activation(hf_name: str, config_path: str) -> str:
  if hf_name not in _ACTIVATIONS:
    raise ValueError(
        f"Activation {hf_name!r} ({config_path}) has no moe_jax equivalent; "
        f"supported: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[hf_name]


def _require(config: Mapping[str, Any], key: str) -> int:
  if config.get(key) is None:
    raise ValueError(f"config.json lacks {key!r}, which the conversion needs; the "
                     "file is truncated or not a transformers config.")
  return int(config[key])


def _sparse_layers(weights: Mapping[str, np.ndarray], stack: str, num_layers: int,
                   ffn_sublayer: int) -> Tuple[int, ...]:
  return tuple(
      i for i in range(num_layers)
      if f"{stack}.block.{i}.layer.{ffn_sublayer}.mlp.router.classifier.weight" in weights)


def transformers_sparse_layers(config: Mapping[str, Any], stack: str,
                               num_layers: int) -> Tuple[int, ...]:
  """The layers transformers builds sparse in a SwitchTransformers stack.

  transformers decides from `{stack}_sparse_step` (written to config.json by
  transformers 5; derived from `num_sparse_{stack}_layers` when absent, as
  `num_layers // count`, or `num_layers` for a count of 0): layer i is sparse
  iff `step > 0 and (i % step == 1 or step == 1)`.
  """
  step = config.get(f"{stack}_sparse_step")
  if step is None:
    count = _require(config, f"num_sparse_{stack}_layers")
    step = num_layers // count if count > 0 else num_layers
  step = int(step)
  return tuple(i for i in range(num_layers) if step > 0 and (step == 1 or i % step == 1))


def architecture_from_config(config: Mapping[str, Any],
                             weights: Mapping[str, np.ndarray]) -> HfArchitecture:
  """Derives the architecture from config.json and the tensors present.

  Sparse layers are read from the weights (which layers have a router), and
  checked against the layers transformers builds sparse from config.json
  (`transformers_sparse_layers`).

  Raises:
    ValueError: for settings moe_jax cannot reproduce exactly.
  """
  model_type = config["model_type"]
  family = SUPPORTED_MODEL_TYPES[model_type]
  num_layers = _require(config, "num_layers")
  num_decoder_layers = int(config.get("num_decoder_layers") or num_layers)
  eps = float(config.get("layer_norm_epsilon", 1e-6))
  if abs(eps - 1e-6) > 1e-12:
    raise ValueError(f"layer_norm_epsilon={eps} in config.json; moe_jax's RMSNorm "
                     "uses T5's 1e-6.")
  for key in ("decoder_start_token_id", "pad_token_id"):
    if config.get(key, 0) not in (0, None):
      raise ValueError(
          f"config.json sets {key}={config[key]}; moe_jax (like t5x) starts "
          "decoding from id 0 and pads with id 0.")

  if family == "t5":
    proj = config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
      raise ValueError(f"feed_forward_proj={proj!r} in config.json is neither "
                       "'ACT' nor 'gated-ACT'.")
    # transformers maps the historical 'gated-gelu' to the tanh approximation.
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    activation = _activation(act, "feed_forward_proj")
    activations = (activation, "linear") if gated else (activation,)
    # transformers 5 saves `scale_decoder_outputs`; older configs encode the same
    # switch as tie_word_embeddings (False for T5 v1.1 / Flan-T5).
    scale = config.get("scale_decoder_outputs",
                       config.get("tie_word_embeddings", True) is not False)
  else:
    activations = (_activation(config.get("dense_act_fn", "relu"), "dense_act_fn"),)
    scale = config.get("tie_word_embeddings", True) is not False

  head = weights.get("lm_head.weight")
  shared = weights.get("shared.weight")
  if shared is None:
    raise ValueError("The checkpoint has no 'shared.weight' (token embeddings).")
  head_is_shared = head is None or (
      head.shape == shared.shape and np.array_equal(head, shared))
  logits_via_embedding = bool(scale and head_is_shared)

  num_experts = 0
  expert_capacity = None
  sparse = {"encoder": (), "decoder": ()}
  jitter = 0.0
  if family == "switch":
    if config.get("router_bias", False):
      raise ValueError("router_bias=True in config.json: moe_jax routers have no "
                       "bias (no released Switch checkpoint uses one).")
    num_experts = _require(config, "num_experts")
    expert_capacity = _require(config, "expert_capacity")
    jitter = float(config.get("router_jitter_noise", 0.0))
    for stack, n, ffn_sublayer in (("encoder", num_layers, 1),
                                   ("decoder", num_decoder_layers, 2)):
      found = _sparse_layers(weights, stack, n, ffn_sublayer)
      expected = transformers_sparse_layers(config, stack, n)
      if found != expected:
        keys = [k for k in (f"num_sparse_{stack}_layers", f"{stack}_sparse_step")
                if k in config]
        settings = ", ".join(f"{k}={config[k]}" for k in keys)
        raise ValueError(
            f"The checkpoint's {stack} has routers in layers {list(found)}, but "
            f"config.json ({settings}) makes transformers build layers "
            f"{list(expected)} sparse; the weights and config.json do not belong "
            "together.")
      sparse[stack] = found

  (num_encoder_sparse, encoder_layout), (num_decoder_sparse, decoder_layout) = (
      sparse_layout(sparse["encoder"], num_layers),
      sparse_layout(sparse["decoder"], num_decoder_layers))
  return HfArchitecture(
      model_type=model_type,
      config=transformer.TransformerConfig(
          vocab_size=int(shared.shape[0]),
          emb_dim=_require(config, "d_model"),
          num_heads=_require(config, "num_heads"),
          head_dim=_require(config, "d_kv"),
          mlp_dim=_require(config, "d_ff"),
          num_encoder_layers=num_layers,
          num_decoder_layers=num_decoder_layers,
          mlp_activations=activations,
          dropout_rate=float(config.get("dropout_rate", 0.1)),
          logits_via_embedding=logits_via_embedding,
          relative_attention_num_buckets=int(
              config.get("relative_attention_num_buckets", 32)),
          relative_attention_max_distance=int(
              config.get("relative_attention_max_distance", 128)),
          num_encoder_sparse_layers=num_encoder_sparse,
          encoder_sparse_layout=encoder_layout,
          num_decoder_sparse_layers=num_decoder_sparse,
          decoder_sparse_layout=decoder_layout),
      scale_logits=bool(scale),
      num_experts=num_experts,
      expert_capacity=expert_capacity,
      router_jitter_noise=jitter,
  )


def sparse_layout(layers: Sequence[int], num_layers: int) -> Tuple[int, str]:
  """Finds `(num_sparse_layers, layout)` that places sparse layers at `layers`.

  Raises:
    ValueError: when no `transformer.LayerLayout` reproduces the placement.
  """
  layers = tuple(layers)
  if not layers:
    return 0, transformer.LayerLayout.MIXED.value
  for layout in transformer.LayerLayout:
    try:
      if transformer.sparse_layer_indices(num_layers, len(layers), layout) == layers:
        return len(layers), layout.value
    except ValueError:
      continue
  raise ValueError(
      f"Sparse layers {list(layers)} of a {num_layers}-layer stack match no moe_jax "
      f"layout ({', '.join(l.name for l in transformer.LayerLayout)}).")


# ---------------------------------------------------------------------------
# Tensors -> the canonical parameter tree.
# ---------------------------------------------------------------------------


class _Tensors:
  """Hands out named checkpoint tensors as float32 and remembers which were used."""

  def __init__(self, weights: Mapping[str, np.ndarray]):
    self._weights = weights
    self._used = set()

  def __contains__(self, name: str) -> bool:
    return name in self._weights

  def take(self, name: str, shape: Tuple[int, ...], target: str) -> np.ndarray:
    if name not in self._weights:
      raise ValueError(f"The checkpoint lacks {name!r} (needed for {target}).")
    value = self._weights[name]
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
          f"Shape mismatch for {target}: checkpoint tensor {name!r} has shape "
          f"{tuple(value.shape)}, config.json implies {tuple(shape)}.")
    self._used.add(name)
    return np.asarray(value, dtype=np.float32)

  def mark_used(self, name: str) -> None:
    self._used.add(name)

  def unused(self) -> List[str]:
    return sorted(n for n in self._weights
                  if n not in self._used and not n.endswith(_IGNORED_SUFFIXES))


def _attention(t: _Tensors, prefix: str, arch: HfArchitecture, target: str) -> Dict:
  d, h, k = arch.config.emb_dim, arch.config.num_heads, arch.config.head_dim
  out = {}
  for hf_name, name in (("q", "query"), ("k", "key"), ("v", "value")):
    w = t.take(f"{prefix}.{hf_name}.weight", (h * k, d), f"{target}/{name}/kernel")
    out[name] = {"kernel": w.T.reshape(d, h, k)}
  w = t.take(f"{prefix}.o.weight", (d, h * k), f"{target}/out/kernel")
  out["out"] = {"kernel": w.T.reshape(h, k, d)}
  return out


def _dense_mlp(t: _Tensors, prefix: str, arch: HfArchitecture, target: str) -> Dict:
  d, f = arch.config.emb_dim, arch.config.mlp_dim
  inner = "DenseReluDense" if arch.family == "t5" else "mlp"
  activations = arch.config.mlp_activations
  names = ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]
  out = {n: t.take(f"{prefix}.{inner}.{n}.weight", (f, d), f"{target}/{n}").T for n in names}
  out["wo"] = t.take(f"{prefix}.{inner}.wo.weight", (d, f), f"{target}/wo").T
  return out


def _sparse_mlp(t: _Tensors, prefix: str, arch: HfArchitecture, target: str) -> Dict:
  d, f, e = arch.config.emb_dim, arch.config.mlp_dim, arch.num_experts
  router = t.take(f"{prefix}.mlp.router.classifier.weight", (e, d), f"{target}/router/w")
  wi = [t.take(f"{prefix}.mlp.experts.expert_{i}.wi.weight", (f, d),
               f"{target}/expert/wi[{i}]").T for i in range(e)]
  wo = [t.take(f"{prefix}.mlp.experts.expert_{i}.wo.weight", (d, f),
               f"{target}/expert/wo[{i}]").T for i in range(e)]
  return {"router": {"w": router.T},
          "expert": {"wi": np.stack(wi), "wo": np.stack(wo)}}


def _stack(t: _Tensors, arch: HfArchitecture, stack: str) -> Dict:
  cfg = arch.config
  decoder = stack == "decoder"
  num_layers = cfg.num_decoder_layers if decoder else cfg.num_encoder_layers
  sparse = cfg.sparse_layers(stack)
  h, b = cfg.num_heads, cfg.relative_attention_num_buckets
  rel = t.take(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
               (b, h), f"{stack}/relpos_bias/rel_embedding")
  params = {"relpos_bias": {"rel_embedding": rel.T}}
  d = (cfg.emb_dim,)
  for i in range(num_layers):
    p = f"{stack}.block.{i}.layer"
    ours = f"{stack}/layers_{i}"
    layer = {}
    if decoder:
      layer["pre_self_attention_layer_norm"] = {
          "scale": t.take(f"{p}.0.layer_norm.weight", d, f"{ours}/pre_self_attention_layer_norm")}
      layer["self_attention"] = _attention(t, f"{p}.0.SelfAttention", arch,
                                           f"{ours}/self_attention")
      layer["pre_cross_attention_layer_norm"] = {
          "scale": t.take(f"{p}.1.layer_norm.weight", d, f"{ours}/pre_cross_attention_layer_norm")}
      layer["encoder_decoder_attention"] = _attention(
          t, f"{p}.1.EncDecAttention", arch, f"{ours}/encoder_decoder_attention")
      ffn = 2
    else:
      layer["pre_attention_layer_norm"] = {
          "scale": t.take(f"{p}.0.layer_norm.weight", d, f"{ours}/pre_attention_layer_norm")}
      layer["attention"] = _attention(t, f"{p}.0.SelfAttention", arch, f"{ours}/attention")
      ffn = 1
    layer["pre_mlp_layer_norm"] = {
        "scale": t.take(f"{p}.{ffn}.layer_norm.weight", d, f"{ours}/pre_mlp_layer_norm")}
    mlp = _sparse_mlp if i in sparse else _dense_mlp
    layer["mlp"] = mlp(t, f"{p}.{ffn}", arch, f"{ours}/mlp")
    params[f"layers_{i}"] = layer
  norm = "decoder_norm" if decoder else "encoder_norm"
  params[norm] = {"scale": t.take(f"{stack}.final_layer_norm.weight", d, f"{stack}/{norm}")}
  return params


def convert_weights(arch: HfArchitecture,
                    weights: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """Maps checkpoint tensors onto the canonical moe_jax parameter tree.

  Args:
    arch: from `architecture_from_config`.
    weights: from `read_weights`.

  Returns:
    Nested dict of float32 numpy arrays (the `params` collection).

  Raises:
    ValueError: for a missing tensor, a shape mismatch (naming the parameter),
      or checkpoint tensors that nothing consumes.
  """
  t = _Tensors(weights)
  cfg = arch.config
  shape = (cfg.vocab_size, cfg.emb_dim)
  embedding = t.take("shared.weight", shape, "token_embedder/embedding")
  for stack in ("encoder", "decoder"):
    name = f"{stack}.embed_tokens.weight"
    if name in t:
      # Saved copies of the shared table; a different table is not T5.
      if not np.array_equal(np.asarray(weights[name], np.float32), embedding):
        raise ValueError(f"{name!r} differs from 'shared.weight'; moe_jax shares one "
                         "token embedding between encoder and decoder, like T5.")
      t.mark_used(name)
  params = {
      "token_embedder": {"embedding": embedding},
      "encoder": _stack(t, arch, "encoder"),
      "decoder": _stack(t, arch, "decoder"),
  }
  if "lm_head.weight" in t:
    head = t.take("lm_head.weight", shape, "decoder/logits_dense/kernel")
  else:
    head = embedding
  if not cfg.logits_via_embedding:
    scale = cfg.emb_dim**-0.5 if arch.scale_logits else 1.0
    params["decoder"]["logits_dense"] = {"kernel": (head.T * scale).astype(np.float32)}
  leftovers = t.unused()
  if leftovers:
    raise ValueError(
        f"{len(leftovers)} checkpoint tensors have no place in the moe_jax model, "
        f"e.g. {leftovers[:5]}; the checkpoint does not match config.json's "
        "architecture, or uses a variant moe_jax does not support.")
  return params


# ---------------------------------------------------------------------------
# model.gin.
# ---------------------------------------------------------------------------


def _gin_value(value: Any) -> str:
  if isinstance(value, enum.Enum):
    return repr(value.value)
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, (tuple, list)):
    inner = ", ".join(_gin_value(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  if isinstance(value, (type, np.dtype)):
    return repr(np.dtype(value).name)
  return repr(value)


def _config_block(config: transformer.TransformerConfig) -> List[str]:
  """`TransformerConfig` bindings; the dropout rate stays a macro to override."""
  lines = ["transformer.TransformerConfig:"]
  for field in dataclasses.fields(config):
    value = ("%DROPOUT_RATE" if field.name == "dropout_rate"
             else _gin_value(getattr(config, field.name)))
    lines.append(f"  {field.name} = {value}")
  return lines


def _moe_block(arch: HfArchitecture, scope: str) -> List[str]:
  """Bindings of one stack's MoeLayer that reproduce transformers' Switch router."""
  return [
      f"{scope}/moe.MoeLayer:",
      "  num_experts = %NUM_EXPERTS",
      f"  router = @{scope}/routing.TokensChooseRouter()",
      f"  expert_mlp_dim = {arch.config.mlp_dim}",
      f"  activations = {_gin_value(arch.config.mlp_activations)}",
      "  expert_dropout_rate = %EXPERT_DROPOUT_RATE",
      "  # transformers routes each sequence as one group with a fixed capacity.",
      "  group_by_sequence = True",
      "  expert_capacity = %EXPERT_CAPACITY",
      f"{scope}/routing.TokensChooseRouter:",
      "  num_selected_experts = 1",
      "  batch_prioritized_routing = False",
      "  jitter_noise = %ROUTER_JITTER_NOISE",
      "  ignore_padding_tokens = False",
  ]


def model_gin(arch: HfArchitecture, *, source: str, eos_id: int,
              vocabulary_file: Optional[str] = None, extra_ids: int = 0) -> str:
  """gin bindings that build the moe_jax model matching `arch`.

  Args:
    arch: the converted architecture.
    source: where the checkpoint came from (for the header comment).
    eos_id: end-of-sequence id for decoding.
    vocabulary_file: absolute path of a SentencePiece model, or None (then
      `VOCABULARY = None` and only token ids can be scored or decoded).
    extra_ids: sentinel ids appended to the SentencePiece vocabulary.

  Returns:
    The text of model.gin.
  """
  cfg = arch.config
  sparse_stacks = [s for s in ("encoder", "decoder") if cfg.sparse_layers(s)]
  lines = [
      f"# {arch.model_type} checkpoint imported from {source}",
      "# by `python -m moe_jax.convert hf`. Builds MODEL (an",
      "# EncoderDecoderModel around ARCHITECTURE) with the converted shapes.",
      "#",
      "# Commonly overridden options:",
      "# - DROPOUT_RATE (and EXPERT_DROPOUT_RATE for sparse models)",
      "# - VOCABULARY",
      "",
      "from __gin__ import dynamic_registration",
      "",
  ]
  if vocabulary_file:
    lines.append("import seqio")
  if arch.num_experts:
    lines += ["from moe_jax.layers import moe", "from moe_jax.layers import routing"]
  lines += ["from moe_jax.models import model", "from moe_jax.models import transformer", ""]
  lines.append(f"DROPOUT_RATE = {cfg.dropout_rate!r}")
  if arch.num_experts:
    lines += [
        f"NUM_EXPERTS = {arch.num_experts}",
        f"EXPERT_CAPACITY = {arch.expert_capacity}",
        "EXPERT_DROPOUT_RATE = %DROPOUT_RATE",
        f"ROUTER_JITTER_NOISE = {arch.router_jitter_noise!r}",
    ]
  lines.append("")
  if vocabulary_file:
    lines += [
        "VOCABULARY = @seqio.SentencePieceVocabulary()",
        "seqio.SentencePieceVocabulary:",
        f"  sentencepiece_model_file = {vocabulary_file!r}",
        f"  extra_ids = {extra_ids}",
    ]
  else:
    lines.append("VOCABULARY = None  # the checkpoint came without spiece.model")
  lines += [
      "",
      "MODEL = @model.EncoderDecoderModel()",
      "model.EncoderDecoderModel:",
      "  module = %ARCHITECTURE",
      "  input_vocabulary = %VOCABULARY",
      "  output_vocabulary = %VOCABULARY",
      f"  eos_id = {eos_id}",
      "",
      "ARCHITECTURE = @transformer.EncoderDecoder()",
      "transformer.EncoderDecoder.config = @transformer.TransformerConfig()",
  ]
  lines += [f"transformer.EncoderDecoder.{stack}_sparse_mlp = @{stack}/moe.MoeLayer"
            for stack in sparse_stacks]
  lines += [""] + _config_block(cfg)
  for stack in sparse_stacks:
    lines += [f"# {stack} MoE layers: {list(cfg.sparse_layers(stack))}"]
    lines += _moe_block(arch, stack)
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Checking against the model, writing outputs.
# ---------------------------------------------------------------------------


def _extra_ids(model_dir: str) -> int:
  path = os.path.join(model_dir, "tokenizer_config.json")
  if not os.path.isfile(path):
    return 0
  with open(path, encoding="utf-8") as f:
    tokenizer_config = json.load(f)
  if "extra_ids" in tokenizer_config:
    return int(tokenizer_config["extra_ids"])
  special = tokenizer_config.get("additional_special_tokens") or []
  return sum(1 for token in special if str(token).startswith("<extra_id_"))


@dataclasses.dataclass(frozen=True)
class ConversionResult:
  """Where `convert` wrote its outputs.

  Attributes:
    architecture: what was converted.
    checkpoint_dir: the orbax checkpoint of `{'params': ...}`.
    gin_file: model.gin.
    vocabulary_file: the copied spiece.model, or None.
    num_parameters: total number of converted parameters.
  """

  architecture: HfArchitecture
  checkpoint_dir: str
  gin_file: str
  vocabulary_file: Optional[str]
  num_parameters: int


def convert(model_dir: str, out_dir: str) -> ConversionResult:
  """Converts a Hugging Face model directory into a moe_jax checkpoint + model.gin.

  Args:
    model_dir: directory with config.json and the weights.
    out_dir: new or empty output directory.

  Returns:
    A `ConversionResult` with the paths written.
  """
  config = read_config(model_dir)
  weights = read_weights(model_dir)
  arch = architecture_from_config(config, weights)
  params = convert_weights(arch, weights)
  eos = config.get("eos_token_id", 1)
  gin_kwargs = dict(source=os.path.abspath(model_dir),
                    eos_id=int(eos[0] if isinstance(eos, list) else eos))

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"Output directory {out_dir!r} is not empty; choose a new one.")
  # Check against the model before writing anything (the vocabulary does not
  # change parameter shapes, so it is left out of this check).
  with tempfile.TemporaryDirectory() as tmp:
    check_file = os.path.join(tmp, GIN_FILE)
    with open(check_file, "w", encoding="utf-8") as f:
      f.write(model_gin(arch, **gin_kwargs))
    checkpoints.check_params_match_model(
        params, checkpoints.param_shapes(config_lib.load_model([check_file])))

  os.makedirs(out_dir, exist_ok=True)
  vocabulary_file = None
  if os.path.isfile(os.path.join(model_dir, SPIECE_FILE)):
    vocabulary_file = os.path.join(out_dir, SPIECE_FILE)
    shutil.copyfile(os.path.join(model_dir, SPIECE_FILE), vocabulary_file)
  gin_file = os.path.join(out_dir, GIN_FILE)
  with open(gin_file, "w", encoding="utf-8") as f:
    f.write(model_gin(arch, vocabulary_file=vocabulary_file,
                      extra_ids=_extra_ids(model_dir), **gin_kwargs))
  checkpoint_dir = os.path.join(out_dir, checkpoints.CONVERTED_SUBDIR)
  checkpoints.save_params(params, checkpoint_dir)
  return ConversionResult(
      architecture=arch, checkpoint_dir=checkpoint_dir, gin_file=gin_file,
      vocabulary_file=vocabulary_file,
      num_parameters=sum(int(np.prod(v.shape)) for v in checkpoints.flatten(params).values()))
