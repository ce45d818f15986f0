"""Hugging Face T5 / Flan-T5 / mT5 / Switch Transformers checkpoints, in and out.

Import (`python -m moe_jax.convert hf`): a Hugging Face model directory
(`config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`) becomes

  OUT/checkpoint/   an orbax checkpoint of `{'params': ...}` in the canonical
                    moe_jax parameter tree (t5x / flaxformer names), float32;
  OUT/model.gin     gin bindings that build the matching `EncoderDecoder` and
                    model (and the vocabulary, when the directory has one);
  OUT/spiece.model  the SentencePiece vocabulary, when present.

Export (`python -m moe_jax.convert to_hf`, `export`): a gin-built model and
its checkpoint become `config.json` + `model.safetensors` (+ `spiece.model`
and tokenizer files) that transformers' `from_pretrained` loads: dense models
as T5, sparse ones as SwitchTransformers (see `plan_export` for what
transformers can and cannot express).

What maps to what (`correspondences`, used in both directions; torch
`Linear` weights are `[out, in]`, ours `[in, out]`):

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
Exported, a tied model is `tie_word_embeddings: true` (scaled, tied) and an
untied one an unscaled `lm_head.weight` (`tie_word_embeddings: false`).

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
    "gelu_python": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
}
# The other direction: the first transformers name of each moe_jax activation.
_HF_ACTIVATIONS = {}
for _hf_name, _ours in _ACTIVATIONS.items():
  _HF_ACTIVATIONS.setdefault(_ours, _hf_name)

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


@dataclasses.dataclass(frozen=True)
class Correspondence:
  """One moe_jax parameter and the Hugging Face tensor(s) that hold it.

  The one mapping between the two layouts: importing reads `hf` into `ours`
  (`to_ours`), exporting writes `ours` into `hf` (`to_hf`).

  Attributes:
    ours: '/'-joined path in the moe_jax parameter tree.
    hf: the Hugging Face tensor name, or one name per expert when `ours`
      stacks experts on its axis 0.
    shape: our shape (with the expert axis, if any).
    in_axes: for a torch `Linear` weight (`[out, in]`): how many leading axes
      of our (per-expert) shape make up `in`; ours is then the transpose,
      reshaped. None: the same layout on both sides (embeddings, norms).
    stacked: `ours` stacks one tensor per expert (`hf`) on its axis 0.
  """

  ours: str
  hf: Tuple[str, ...]
  shape: Tuple[int, ...]
  in_axes: Optional[int] = None
  stacked: bool = False

  @property
  def _per_tensor_shape(self) -> Tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape

  @property
  def hf_shape(self) -> Tuple[int, ...]:
    """The shape of each Hugging Face tensor."""
    shape = self._per_tensor_shape
    if self.in_axes is None:
      return shape
    return (int(np.prod(shape[self.in_axes:])), int(np.prod(shape[:self.in_axes])))

  def to_ours(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
    """Hugging Face tensors (float32, `hf_shape`) -> our array."""
    shape = self._per_tensor_shape
    parts = [t if self.in_axes is None else t.T.reshape(shape) for t in tensors]
    return np.stack(parts) if self.stacked else parts[0]

  def to_hf(self, value: np.ndarray) -> List[np.ndarray]:
    """Our array -> the Hugging Face tensors, in the order of `hf`."""
    value = np.asarray(value, np.float32)
    parts = list(value) if self.stacked else [value]
    if self.in_axes is not None:
      parts = [p.reshape(self.hf_shape[::-1]).T for p in parts]
    return [np.ascontiguousarray(p) for p in parts]


def _linear(ours: str, hf: str, shape: Tuple[int, ...], in_axes: int = 1) -> Correspondence:
  return Correspondence(ours, (hf,), tuple(shape), in_axes)


def _attention_map(hf_prefix: str, ours: str, cfg: transformer.TransformerConfig
                   ) -> List[Correspondence]:
  d, h, k = cfg.emb_dim, cfg.num_heads, cfg.head_dim
  out = [_linear(f"{ours}/{name}/kernel", f"{hf_prefix}.{hf_name}.weight", (d, h, k))
         for hf_name, name in (("q", "query"), ("k", "key"), ("v", "value"))]
  out.append(_linear(f"{ours}/out/kernel", f"{hf_prefix}.o.weight", (h, k, d), in_axes=2))
  return out


def _mlp_map(hf_prefix: str, ours: str, arch: HfArchitecture, sparse: bool
             ) -> List[Correspondence]:
  cfg = arch.config
  d, f = cfg.emb_dim, cfg.mlp_dim
  activations = cfg.mlp_activations
  names = ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]
  if not sparse:
    inner = "DenseReluDense" if arch.family == "t5" else "mlp"
    out = [_linear(f"{ours}/{n}", f"{hf_prefix}.{inner}.{n}.weight", (d, f)) for n in names]
    return out + [_linear(f"{ours}/wo", f"{hf_prefix}.{inner}.wo.weight", (f, d))]
  e = arch.num_experts
  experts = [f"{hf_prefix}.mlp.experts.expert_{i}" for i in range(e)]
  out = [_linear(f"{ours}/router/w", f"{hf_prefix}.mlp.router.classifier.weight", (d, e))]
  out += [Correspondence(f"{ours}/expert/{n}", tuple(f"{x}.{n}.weight" for x in experts),
                         (e, d, f), 1, stacked=True) for n in names]
  out.append(Correspondence(f"{ours}/expert/wo", tuple(f"{x}.wo.weight" for x in experts),
                            (e, f, d), 1, stacked=True))
  return out


def correspondences(arch: HfArchitecture) -> List[Correspondence]:
  """Every moe_jax parameter of `arch` and where Hugging Face keeps it.

  The output projection is not listed: an untied `decoder/logits_dense/kernel`
  is `lm_head.weight` transposed, with T5's logit scale folded in on import
  (see `convert_weights` and `export_tensors`).
  """
  cfg = arch.config
  h, b, d = cfg.num_heads, cfg.relative_attention_num_buckets, (cfg.emb_dim,)
  out = [Correspondence("token_embedder/embedding", ("shared.weight",),
                        (cfg.vocab_size, cfg.emb_dim))]
  for stack in ("encoder", "decoder"):
    decoder = stack == "decoder"
    out.append(_linear(
        f"{stack}/relpos_bias/rel_embedding",
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (h, b)))
    sparse = cfg.sparse_layers(stack)
    for i in range(cfg.num_decoder_layers if decoder else cfg.num_encoder_layers):
      p, ours = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"

      def norm(name, sublayer, ours=ours, p=p):
        return Correspondence(f"{ours}/{name}/scale", (f"{p}.{sublayer}.layer_norm.weight",), d)

      if decoder:
        out.append(norm("pre_self_attention_layer_norm", 0))
        out += _attention_map(f"{p}.0.SelfAttention", f"{ours}/self_attention", cfg)
        out.append(norm("pre_cross_attention_layer_norm", 1))
        out += _attention_map(f"{p}.1.EncDecAttention", f"{ours}/encoder_decoder_attention",
                              cfg)
      else:
        out.append(norm("pre_attention_layer_norm", 0))
        out += _attention_map(f"{p}.0.SelfAttention", f"{ours}/attention", cfg)
      ffn = 2 if decoder else 1
      out.append(norm("pre_mlp_layer_norm", ffn))
      out += _mlp_map(f"{p}.{ffn}", f"{ours}/mlp", arch, i in sparse)
    final = "decoder_norm" if decoder else "encoder_norm"
    out.append(Correspondence(f"{stack}/{final}/scale", (f"{stack}.final_layer_norm.weight",),
                              d))
  return out


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
  flat = {}
  for c in correspondences(arch):
    targets = [f"{c.ours}[{i}]" for i in range(len(c.hf))] if c.stacked else [c.ours]
    flat[c.ours] = c.to_ours([t.take(name, c.hf_shape, target)
                              for name, target in zip(c.hf, targets)])
  embedding = flat["token_embedder/embedding"]
  for stack in ("encoder", "decoder"):
    name = f"{stack}.embed_tokens.weight"
    if name in t:
      # Saved copies of the shared table; a different table is not T5.
      if not np.array_equal(np.asarray(weights[name], np.float32), embedding):
        raise ValueError(f"{name!r} differs from 'shared.weight'; moe_jax shares one "
                         "token embedding between encoder and decoder, like T5.")
      t.mark_used(name)
  if "lm_head.weight" in t:
    head = t.take("lm_head.weight", embedding.shape, "decoder/logits_dense/kernel")
  else:
    head = embedding
  if not cfg.logits_via_embedding:
    scale = cfg.emb_dim**-0.5 if arch.scale_logits else 1.0
    flat["decoder/logits_dense/kernel"] = (head.T * scale).astype(np.float32)
  leftovers = t.unused()
  if leftovers:
    raise ValueError(
        f"{len(leftovers)} checkpoint tensors have no place in the moe_jax model, "
        f"e.g. {leftovers[:5]}; the checkpoint does not match config.json's "
        "architecture, or uses a variant moe_jax does not support.")
  return checkpoints.unflatten(flat)


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


# ---------------------------------------------------------------------------
# Export: a moe_jax model (gin) and checkpoint -> a transformers directory.
# ---------------------------------------------------------------------------

# The fixed capacity written for dropless MoE layers: no sequence reaches it,
# so transformers keeps every token, as moe_jax does.
DROPLESS_CAPACITY = 2**31 - 1
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_STACKS = ("encoder", "decoder")
_ARCHITECTURES = {"t5": "T5ForConditionalGeneration",
                  "switch_transformers": "SwitchTransformersForConditionalGeneration"}


def _hf_activation(name: Any, *, gated: bool) -> Optional[str]:
  hf_name = _HF_ACTIVATIONS.get(name) if isinstance(name, str) else None
  if hf_name == "gelu" and gated:
    # transformers reads 'gated-gelu' as the tanh GELU; the exact one is 'gelu_python'.
    return "gelu_python"
  return hf_name


def _feed_forward_proj(activations: Sequence[Any]) -> Optional[str]:
  """T5's `feed_forward_proj` for moe_jax FFN activations, or None."""
  if len(activations) == 1:
    return _hf_activation(activations[0], gated=False)
  if len(activations) == 2 and activations[1] == "linear":
    act = _hf_activation(activations[0], gated=True)
    if act is not None:
      return "gated-gelu" if act == "gelu_new" else f"gated-{act}"
  return None


def _sparse_step(stack: str, layers: Sequence[int], num_layers: int) -> Optional[int]:
  """The `{stack}_sparse_step` for which transformers builds exactly `layers` sparse."""
  layers = tuple(layers)
  # Prefer the step transformers 4 derives from the count alone.
  derived = num_layers // len(layers) if layers else 0
  for step in [derived] + list(range(num_layers + 1)):
    if transformers_sparse_layers({f"{stack}_sparse_step": step}, stack, num_layers) == layers:
      return step
  return None


@dataclasses.dataclass(frozen=True)
class ExportPlan:
  """How a moe_jax model becomes a transformers model.

  Attributes:
    architecture: the transformers model, in moe_jax terms.
    approximations: what changes, one line each (empty: exact); exporting
      with any needs `approximate=True`.
    notes: training-only differences (inference is unaffected).
    eos_id: end-of-sequence id.
    router_aux_loss_coef: the model's load-balancing loss weight.
    router_z_loss_coef: the model's router z-loss weight.
  """

  architecture: HfArchitecture
  approximations: Tuple[str, ...] = ()
  notes: Tuple[str, ...] = ()
  eos_id: int = 1
  router_aux_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0


def _per_stack_lines(changes: Mapping[str, Sequence[str]]) -> List[str]:
  """{stack: [change]} -> one line per change, naming the stacks it applies to."""
  order: Dict[str, List[str]] = {}
  for stack in _STACKS:
    for text in changes.get(stack, ()):
      order.setdefault(text, []).append(stack)
  return [f"{' and '.join(stacks)}: {text}" for text, stacks in order.items()]


def _routing(layer: Any, stack: str, expert_capacity: Optional[int],
             blockers: List[str], changes: List[str]) -> int:
  """Checks one stack's MoE routing; returns the fixed capacity to write."""
  from moe_jax.layers import routing  # pylint: disable=g-import-not-at-top
  router = layer.router
  expert_choice = isinstance(router, routing.ExpertChoiceRouter)
  if expert_choice:
    changes.append("expert-choice routing (each expert takes its best tokens) becomes "
                   "token-choice top-1 (each token goes to its most probable expert)")
  elif isinstance(router, routing.GShardTop2Router):
    changes.append("GShard top-2 routing (two experts per token, renormalized gates) "
                   "becomes top-1 (the most probable expert, gated by its probability)")
  elif isinstance(router, routing.TokensChooseRouter):
    if layer.num_selected_experts != 1:
      changes.append(f"top-{layer.num_selected_experts} routing becomes top-1 (the most "
                     "probable expert only, gated by its probability)")
  else:
    blockers.append(f"the {stack} router is a {type(router).__name__}, which has no "
                    "transformers counterpart")
    return 0
  if layer.dispatch == "dropless" and not expert_choice:
    if expert_capacity is not None:
      changes.append(f"dropless routing becomes a fixed capacity of {expert_capacity} "
                     "tokens per expert and sequence (--expert_capacity)")
      return expert_capacity
    return DROPLESS_CAPACITY
  if getattr(router, "batch_prioritized_routing", False):
    changes.append("batch-prioritized routing (the most confident tokens take capacity "
                   "first) becomes position order")
  if router.ignore_padding_tokens:
    changes.append("padding tokens are routed and take expert capacity (moe_jax leaves "
                   "them out)")
  if layer.group_by_sequence and layer.expert_capacity is not None and not expert_choice:
    if expert_capacity is not None and expert_capacity != layer.expert_capacity:
      changes.append(f"the fixed capacity of {layer.expert_capacity} tokens per expert "
                     f"and sequence becomes {expert_capacity} (--expert_capacity)")
      return expert_capacity
    return layer.expert_capacity
  # Grouped routing or a capacity factor: one fixed capacity per sequence.
  if layer.group_by_sequence:
    groups = "one routing group per sequence"
  elif layer.num_groups is not None:
    groups = f"{layer.num_groups} routing groups per batch"
  else:
    groups = f"routing groups of up to {layer.max_group_size} tokens"
  if layer.expert_capacity is not None:
    capacity = f"a fixed capacity of {layer.expert_capacity}"
    default = layer.expert_capacity
  else:
    scaled = " x k" if layer.capacity_scales_with_k else ""
    capacity = (f"capacity factor {layer.eval_capacity_factor}{scaled} (eval; "
                f"{layer.train_capacity_factor} in training; at least "
                f"{layer.min_expert_capacity})")
    default = layer.capacity(layer.max_group_size, train=False)
  chosen = default if expert_capacity is None else expert_capacity
  how = ("--expert_capacity" if expert_capacity is not None
         else "a full routing group's eval capacity; set --expert_capacity to change it")
  changes.append(f"{groups} with {capacity} become one group per sequence with a fixed "
                 f"capacity of {chosen} tokens per expert ({how})")
  return chosen


def plan_export(model: Any, *, expert_capacity: Optional[int] = None) -> ExportPlan:
  """Decides how the gin-built `model` maps onto transformers.

  Dense models become T5 (`T5ForConditionalGeneration`); sparse ones
  SwitchTransformers, which routes top-1 in float32 with the raw top-1
  probability as the gate, one routing group per sequence and one fixed
  per-expert capacity. Other routing is an approximation (listed); a model
  whose parameters transformers has no place for is refused.

  Args:
    model: an `EncoderDecoderModel` (from `config.load_model`).
    expert_capacity: the fixed capacity to write instead of the derived one.

  Raises:
    ValueError: naming everything transformers cannot represent.
  """
  from moe_jax.layers import moe  # pylint: disable=g-import-not-at-top
  module = getattr(model, "module", None)
  cfg = getattr(module, "config", None)
  if not isinstance(cfg, transformer.TransformerConfig):
    raise ValueError("Only moe_jax EncoderDecoder models (transformer.EncoderDecoder with "
                     f"a TransformerConfig) can be exported, got {type(module).__name__}.")
  if expert_capacity is not None and expert_capacity < 1:
    raise ValueError(f"--expert_capacity must be >= 1, got {expert_capacity}.")
  common = dict(eos_id=int(getattr(model, "eos_id", 1)),
                router_aux_loss_coef=float(getattr(model, "aux_loss_factor", 0.0)),
                router_z_loss_coef=float(getattr(model, "router_z_loss_factor", 0.0)))
  sparse_stacks = [s for s in _STACKS if cfg.sparse_layers(s)]
  if not sparse_stacks:
    if _feed_forward_proj(cfg.mlp_activations) is None:
      raise ValueError(
          f"transformers cannot represent this model: FFN activations "
          f"{tuple(cfg.mlp_activations)} (T5's feed_forward_proj is 'ACT' or 'gated-ACT', "
          f"with ACT one of {sorted(_HF_ACTIVATIONS)}).")
    return ExportPlan(HfArchitecture("t5", cfg, scale_logits=cfg.logits_via_embedding),
                      **common)

  blockers: List[str] = []
  changes: Dict[str, List[str]] = {}
  notes: List[str] = []
  if cfg.extra_mlp:
    blockers.append("ST-MoE's extra dense FFN after each sparse FFN (extra_mlp) has no "
                    "place in SwitchTransformers")
  if len(cfg.mlp_activations) != 1 or _hf_activation(cfg.mlp_activations[0],
                                                     gated=False) is None:
    blockers.append(f"FFN activations {tuple(cfg.mlp_activations)}: SwitchTransformers "
                    "FFNs and experts are wi -> ACT -> wo, with ACT one of "
                    f"{sorted(_HF_ACTIVATIONS)}")
  for stack in _STACKS:
    num_layers = getattr(cfg, f"num_{stack}_layers")
    if _sparse_step(stack, cfg.sparse_layers(stack), num_layers) is None:
      blockers.append(
          f"{stack} sparse layers {list(cfg.sparse_layers(stack))}: transformers makes "
          "layer i sparse iff i % step == 1 (or step == 1), and no step gives these")
  layers, capacities, jitter = {}, {}, {}
  for stack in sparse_stacks:
    factory = getattr(module, f"{stack}_sparse_mlp")
    layer = factory() if factory is not None else None
    if not isinstance(layer, moe.MoeLayer):
      blockers.append(f"the {stack} sparse FFN is a {type(layer).__name__}, not moe_jax's "
                      "MoeLayer")
      continue
    layers[stack] = layer
    if tuple(layer.activations) != tuple(cfg.mlp_activations):
      blockers.append(f"{stack} expert activations {tuple(layer.activations)} differ from "
                      f"the dense FFN's {tuple(cfg.mlp_activations)} (SwitchTransformers "
                      "has one dense_act_fn)")
    if layer.expert_mlp_dim != cfg.mlp_dim:
      blockers.append(f"{stack} experts are {layer.expert_mlp_dim} wide, the dense FFN "
                      f"{cfg.mlp_dim} (SwitchTransformers has one d_ff)")
    if layer.use_bias:
      blockers.append(f"{stack} expert biases (SwitchTransformers experts have none)")
    capacities[stack] = _routing(layer, stack, expert_capacity, blockers,
                                 changes.setdefault(stack, []))
    jitter[stack] = float(layer.router.jitter_noise)
    if layer.expert_dropout_rate != cfg.dropout_rate:
      notes.append(f"{stack} expert dropout {layer.expert_dropout_rate} becomes the "
                   f"dropout rate {cfg.dropout_rate} (training only)")
  num_experts = {layer.num_experts for layer in layers.values()}
  if len(num_experts) > 1:
    blockers.append(f"the stacks have different numbers of experts "
                    f"({', '.join(f'{s}: {l.num_experts}' for s, l in layers.items())}); "
                    "SwitchTransformers has one num_experts")
  if blockers:
    raise ValueError(f"transformers cannot represent this model: {'; '.join(blockers)}.")
  lines = _per_stack_lines(changes)
  capacity = max(capacities.values())
  if len(set(capacities.values())) > 1:
    lines.append(f"the capacities {', '.join(f'{c} ({s})' for s, c in capacities.items())} "
                 f"become {capacity} (SwitchTransformers has one expert_capacity)")
  if len(set(jitter.values())) > 1:
    notes.append(f"router jitter {', '.join(f'{j} ({s})' for s, j in jitter.items())} "
                 f"becomes {max(jitter.values())} (training only)")
  arch = HfArchitecture("switch_transformers", cfg, scale_logits=cfg.logits_via_embedding,
                        num_experts=num_experts.pop(), expert_capacity=capacity,
                        router_jitter_noise=max(jitter.values()))
  return ExportPlan(arch, tuple(lines), tuple(notes), **common)


def hf_config(plan: ExportPlan) -> Dict[str, Any]:
  """config.json for `plan` (the inverse of `architecture_from_config`).

  Tied embeddings mean T5's scaled, tied output layer; untied ones an
  unscaled `lm_head` (`tie_word_embeddings: false`, which transformers 5 also
  records as `scale_decoder_outputs: false`).
  """
  arch = plan.architecture
  cfg = arch.config
  config = {
      "architectures": [_ARCHITECTURES[arch.model_type]],
      "model_type": arch.model_type,
      "vocab_size": cfg.vocab_size,
      "d_model": cfg.emb_dim,
      "d_kv": cfg.head_dim,
      "d_ff": cfg.mlp_dim,
      "num_layers": cfg.num_encoder_layers,
      "num_decoder_layers": cfg.num_decoder_layers,
      "num_heads": cfg.num_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate,
      "layer_norm_epsilon": 1e-6,
      "initializer_factor": 1.0,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": 0,
      "eos_token_id": plan.eos_id,
      "decoder_start_token_id": 0,
      "tie_word_embeddings": bool(cfg.logits_via_embedding),
  }
  if arch.model_type == "t5":
    config["feed_forward_proj"] = _feed_forward_proj(cfg.mlp_activations)
    config["scale_decoder_outputs"] = bool(cfg.logits_via_embedding)
    return config
  config.update({
      "dense_act_fn": _hf_activation(cfg.mlp_activations[0], gated=False),
      "num_experts": arch.num_experts,
      "expert_capacity": arch.expert_capacity,
      "router_bias": False,
      "router_jitter_noise": arch.router_jitter_noise,
      "router_dtype": "float32",
      "router_ignore_padding_tokens": False,
      "router_aux_loss_coef": plan.router_aux_loss_coef,
      "router_z_loss_coef": plan.router_z_loss_coef,
  })
  for stack in _STACKS:
    layers = cfg.sparse_layers(stack)
    config[f"num_sparse_{stack}_layers"] = len(layers)
    config[f"{stack}_sparse_step"] = _sparse_step(stack, layers,
                                                  getattr(cfg, f"num_{stack}_layers"))
  return config


def unscan_params(params: Mapping[str, Any],
                  cfg: transformer.TransformerConfig) -> Dict[str, Any]:
  """Parameters of a `scan_layers` model as per-layer `layers_<i>` subtrees.

  Scanned stacks keep `{stack}/layers/...` with a leading layer axis (or, for
  MIXED layouts, `{stack}/layers/subblock_<j>/...` with one entry per block
  of `num_layers / num_sparse_layers` layers).
  """
  if not cfg.scan_layers:
    return dict(params)
  out = {}
  for name, value in checkpoints.flatten(params).items():
    stack, _, rest = name.partition("/")
    if not rest.startswith("layers/"):
      out[name] = value
      continue
    rest = rest[len("layers/"):]
    num_layers = getattr(cfg, f"num_{stack}_layers")
    num_sparse = len(cfg.sparse_layers(stack))
    period = num_layers // num_sparse if 0 < num_sparse < num_layers else 1
    if period == 1:
      for i in range(num_layers):
        out[f"{stack}/layers_{i}/{rest}"] = value[i]
    else:
      sub, _, rest = rest.partition("/")
      j = int(sub[len("subblock_"):])
      for block in range(num_layers // period):
        out[f"{stack}/layers_{block * period + j}/{rest}"] = value[block]
  return checkpoints.unflatten(out)


def export_tensors(arch: HfArchitecture, params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The moe_jax parameter tree as transformers tensors (float32, `[out, in]`)."""
  flat = {name: np.asarray(value, np.float32)
          for name, value in checkpoints.flatten(unscan_params(params, arch.config)).items()}
  tensors, used = {}, set()
  for c in correspondences(arch):
    if c.ours not in flat:
      raise ValueError(f"The checkpoint lacks {c.ours!r}, which transformers needs.")
    value = flat[c.ours]
    if tuple(value.shape) != c.shape:
      raise ValueError(f"Shape mismatch for {c.ours}: the checkpoint has "
                       f"{tuple(value.shape)}, the model {c.shape}.")
    tensors.update(zip(c.hf, c.to_hf(value)))
    used.add(c.ours)
  if not arch.config.logits_via_embedding:
    tensors["lm_head.weight"] = np.ascontiguousarray(flat["decoder/logits_dense/kernel"].T)
    used.add("decoder/logits_dense/kernel")
    if arch.family == "switch":
      # SwitchTransformers ties the stacks' embeddings to `shared` only with
      # tie_word_embeddings; untied, it loads (and saves) its own copies.
      for stack in _STACKS:
        tensors[f"{stack}.embed_tokens.weight"] = tensors["shared.weight"]
  leftovers = sorted(set(flat) - used)
  if leftovers:
    raise ValueError(f"{len(leftovers)} parameters have no place in the transformers model, "
                     f"e.g. {leftovers[:5]}.")
  return tensors


def _export_vocabulary(vocabulary: Any, out_dir: str) -> List[str]:
  """spiece.model + tokenizer files for a SentencePiece vocabulary (else nothing)."""
  model_file = getattr(vocabulary, "sentencepiece_model_file", None)
  if not model_file:
    return []
  destination = os.path.join(out_dir, SPIECE_FILE)
  if "://" in str(model_file):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.io.gfile.copy(model_file, destination)
  else:
    shutil.copyfile(model_file, destination)
  import sentencepiece  # pylint: disable=g-import-not-at-top
  processor = sentencepiece.SentencePieceProcessor(model_file=destination)
  special = {}
  for key, token_id in (("eos_token", processor.eos_id()), ("unk_token", processor.unk_id()),
                        ("pad_token", processor.pad_id())):
    if 0 <= token_id < processor.get_piece_size():
      special[key] = processor.id_to_piece(token_id)
  extra_ids = int(getattr(vocabulary, "extra_ids", 0) or 0)
  special["additional_special_tokens"] = [f"<extra_id_{i}>" for i in range(extra_ids)]
  files = {TOKENIZER_CONFIG_FILE: {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids,
                                   **special},
           SPECIAL_TOKENS_FILE: special}
  for name, content in files.items():
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2)
  return [destination] + [os.path.join(out_dir, name) for name in files]


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export` wrote.

  Attributes:
    plan: the architecture, approximations and notes.
    output_dir: the transformers directory.
    files: the files written.
    num_parameters: total number of exported parameters.
  """

  plan: ExportPlan
  output_dir: str
  files: Tuple[str, ...]
  num_parameters: int


def export(gin_files: Sequence[str], checkpoint: str, out_dir: str, *,
           gin_bindings: Sequence[str] = (), gin_search_paths: Sequence[str] = (),
           approximate: bool = False, expert_capacity: Optional[int] = None) -> ExportResult:
  """Writes a transformers directory (config.json, model.safetensors, tokenizer).

  Args:
    gin_files: gin files that build the model (`MODEL`).
    checkpoint: its parameters (anything `checkpoints.find_checkpoint`
      accepts, t5x checkpoints included).
    out_dir: new or empty output directory.
    gin_bindings: extra gin bindings.
    gin_search_paths: where gin includes are looked up.
    approximate: export even when transformers computes something else
      (the changes are in the result's `plan.approximations`).
    expert_capacity: the fixed per-sequence expert capacity to write.

  Returns:
    An `ExportResult`.

  Raises:
    ValueError: for a model transformers cannot represent, or (without
      `approximate`) cannot reproduce exactly; for parameters that do not
      fit the gin model.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"Output directory {out_dir!r} is not empty; choose a new one.")
  model = config_lib.load_model(gin_files, gin_bindings, gin_search_paths)
  plan = plan_export(model, expert_capacity=expert_capacity)
  if plan.approximations and not approximate:
    raise ValueError(
        "transformers' SwitchTransformers cannot compute this model exactly: "
        f"{'; '.join(plan.approximations)}. Pass --approximate to export it with these "
        "changes.")
  checkpoints.check_params_match_model(checkpoints.stored_params(checkpoint),
                                       checkpoints.param_shapes(model))
  tensors = export_tensors(plan.architecture, checkpoints.restore_params(checkpoint))
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("Writing model.safetensors needs the `safetensors` package: "
                      "pip install -e \".[hf]\" (or pip install safetensors).") from None
  os.makedirs(out_dir, exist_ok=True)
  files = [os.path.join(out_dir, CONFIG_FILE), os.path.join(out_dir, SAFETENSORS_FILE)]
  with open(files[0], "w", encoding="utf-8") as f:
    json.dump(hf_config(plan), f, indent=2)
  safetensors_numpy.save_file(tensors, files[1], metadata={"format": "pt"})
  files += _export_vocabulary(getattr(model, "output_vocabulary", None), out_dir)
  return ExportResult(plan=plan, output_dir=out_dir, files=tuple(files),
                      num_parameters=sum(int(t.size) for t in tensors.values()))
