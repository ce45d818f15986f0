"""T5-style encoder-decoder Transformer with optional Mixture-of-Experts layers.

The dense model is T5 / T5.1.1 (Raffel et al. 2020, https://arxiv.org/abs/1910.10683):
pre-norm RMSNorm sublayers, no biases, relative position biases shared by the
layers of a stack (bidirectional in the encoder, causal in the decoder), a
(gated) FFN, and input/output embeddings that are tied (logits scaled by
`1/sqrt(emb_dim)`) or untied.

Sparse models replace the FFN of some layers by an MoE layer (Switch,
https://arxiv.org/abs/2101.03961; GShard, https://arxiv.org/abs/2006.16668;
Expert Choice, https://arxiv.org/abs/2202.09368; ST-MoE,
https://arxiv.org/abs/2202.08906). Which layers are sparse is chosen per stack by
a count and a `LayerLayout`; ST-MoE's dense FFN after each sparse FFN is the
`extra_mlp` option.

MoE layers are passed as *factories*: any callable that accepts `name=` and
returns a module called as `layer(x, enable_dropout=..., padding_mask=...)`,
e.g. `functools.partial(moe.MoeLayer, num_experts=8, ...)` in Python or
`@moe.MoeLayer` (a gin-configured class, uncalled) in gin. The encoder and
decoder take separate factories, so they can route differently (Expert Choice
in the encoder with top-2 in the decoder, BPR only in the encoder).

MoeLayer adopts the router it is given as its own `mlp/router` child (a copy
per sparse layer), so a factory may build the router on each call (gin does so
for `router = @routing.TokensChooseRouter()`, see
gin/models/architectures/moe.gin) or share one instance; every sparse layer
gets its own router weights either way.

Every hyperparameter lives in one frozen `TransformerConfig` (the pattern of
t5x's `T5Config`), passed down from `EncoderDecoder` to the stacks and layers;
modules only add what is not a hyperparameter (the shared embedding, the MoE
layer factories).

Modules here carry no gin dependency: gin files refer to them directly
(`from __gin__ import dynamic_registration`).
"""

import dataclasses
import enum
import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning

from moe_jax import partitioning
from moe_jax import types
from moe_jax.layers import attention
from moe_jax.layers import dense

MlpFactory = Callable[..., nn.Module]

# Variable collections that get a leading layer axis under `nn.scan`.
_SCANNED_COLLECTIONS = ("params", "cache", "intermediates")
# RNG streams drawn independently per scanned layer.
_SCANNED_RNGS = ("params", "dropout", "jitter", "gating")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
}


class LayerLayout(str, enum.Enum):
  """Where a stack's sparse layers go (the reference's `moe_enums.LayerLayout`).

  With `num_layers` layers of which `num_sparse` are sparse (0-based indices):
    BOTTOM: the first `num_sparse` layers.
    MIDDLE: the `num_sparse` central layers,
      `num_layers - num_sparse <= 2 * i < num_layers + num_sparse`.
    MIXED: every `k = num_layers // num_sparse`-th layer, the last of each run
      of `k` (`i % k == k - 1`); "MoE every k-th layer". Needs
      `num_layers % num_sparse == 0`.
    TOP: the last `num_sparse` layers.
  """

  BOTTOM = "bottom"
  MIDDLE = "middle"
  MIXED = "mixed"
  TOP = "top"


def sparse_layer_indices(
    num_layers: int,
    num_sparse_layers: int,
    layout: Union[LayerLayout, str],
) -> Tuple[int, ...]:
  """The 0-based indices of the sparse layers of a stack.

  Args:
    num_layers: layers in the stack.
    num_sparse_layers: how many of them are sparse (0 = dense stack).
    layout: a `LayerLayout` or its name (case-insensitive).

  Returns:
    Sorted layer indices.

  Raises:
    ValueError: for an unknown layout, a count outside `[0, num_layers]`, or
      a MIXED count that does not divide the number of layers.
  """
  layout = _as_layout(layout)
  if not 0 <= num_sparse_layers <= num_layers:
    raise ValueError(
        f"num_sparse_layers={num_sparse_layers} must lie in [0, {num_layers}] "
        f"for a stack of {num_layers} layers.")
  if num_sparse_layers == 0:
    return ()
  if layout == LayerLayout.BOTTOM:
    return tuple(range(num_sparse_layers))
  if layout == LayerLayout.TOP:
    return tuple(range(num_layers - num_sparse_layers, num_layers))
  if layout == LayerLayout.MIDDLE:
    return tuple(i for i in range(num_layers)
                 if num_layers - num_sparse_layers <= 2 * i < num_layers + num_sparse_layers)
  if num_layers % num_sparse_layers:
    divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
    raise ValueError(
        f"MIXED layout places a sparse layer every num_layers/num_sparse_layers "
        f"layers, so num_sparse_layers={num_sparse_layers} must divide "
        f"num_layers={num_layers}; use one of {divisors} or another layout "
        f"({', '.join(l.name for l in LayerLayout)}).")
  period = num_layers // num_sparse_layers
  return tuple(i for i in range(num_layers) if i % period == period - 1)


def _as_layout(layout: Union[LayerLayout, str]) -> LayerLayout:
  if isinstance(layout, LayerLayout):
    return layout
  try:
    return LayerLayout(str(layout).lower())
  except ValueError:
    raise ValueError(
        f"Unknown sparse layout {layout!r}: use one of "
        f"{[l.name for l in LayerLayout]} (transformer.LayerLayout).") from None


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of a T5-style encoder-decoder, dense or sparse.

  One frozen object passed down to every module (t5x's `T5Config` pattern);
  gin builds it (`transformer.TransformerConfig.emb_dim = %EMBED_DIM`) and the
  Hugging Face converter emits it. Which modules the sparse layers are is not
  a hyperparameter: `EncoderDecoder` takes the MoE layer factories.

  Attributes:
    vocab_size: vocabulary size (T5: 32128).
    emb_dim: model width `d_model`.
    num_heads: attention heads.
    head_dim: per-head width (`num_heads * head_dim` need not equal emb_dim).
    mlp_dim: dense FFN hidden width `d_ff`.
    num_encoder_layers: encoder depth.
    num_decoder_layers: decoder depth.
    mlp_activations: dense FFN activations; ('gelu', 'linear') is T5.1.1's
      gated GELU, ('relu',) the T5 / Switch FFN.
    dropout_rate: T5 dropout (embeddings, sublayers, final norms, attention
      weights and the dense FFN's hidden activations).
    logits_via_embedding: tie the output projection to the token embedding
      (logits scaled by `1/sqrt(emb_dim)`, as T5); else an untied
      `logits_dense` kernel.
    dtype: activation dtype (e.g. 'bfloat16'); parameters stay float32.
    float32_attention_logits: attention softmax in float32 under bf16.
    one_hot_embedding: embed by one-hot matmul (TPU / sharding friendly).
    relative_attention_num_buckets: relative position buckets (32).
    relative_attention_max_distance: relative position max distance (128).
    num_encoder_sparse_layers: sparse encoder layers (0 = dense encoder).
    encoder_sparse_layout: their placement (`LayerLayout` or its name).
    num_decoder_sparse_layers: sparse decoder layers.
    decoder_sparse_layout: their placement.
    extra_mlp: ST-MoE's dense FFN after every sparse FFN, in both stacks.
    scan_layers: `nn.scan` over layers (params gain a leading `layers` axis;
      MIXED layouts scan blocks of `num_layers / num_sparse_layers`).
    remat_policy: 'none', 'full', 'minimal' or 'save_dots'.
  """

  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  mlp_activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  dtype: types.DType = jnp.float32
  float32_attention_logits: bool = False
  one_hot_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  num_encoder_sparse_layers: int = 0
  encoder_sparse_layout: Union[LayerLayout, str] = LayerLayout.MIXED
  num_decoder_sparse_layers: int = 0
  decoder_sparse_layout: Union[LayerLayout, str] = LayerLayout.MIXED
  extra_mlp: bool = False
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    # Tuples keep the config hashable when gin or a caller passes lists.
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "num_encoder_layers", "num_decoder_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"TransformerConfig.{name} must be a positive integer, got "
                         f"{value!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"TransformerConfig.dropout_rate must lie in [0, 1), got "
                       f"{self.dropout_rate}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat_policy {self.remat_policy!r}: use one of "
                       f"{sorted(REMAT_POLICIES)}.")
    for stack in ("encoder", "decoder"):
      layout = _as_layout(getattr(self, f"{stack}_sparse_layout"))
      object.__setattr__(self, f"{stack}_sparse_layout", layout)
      # Validates the count against the depth and the layout.
      sparse_layer_indices(getattr(self, f"num_{stack}_layers"),
                           getattr(self, f"num_{stack}_sparse_layers"), layout)

  def sparse_layers(self, stack: str) -> Tuple[int, ...]:
    """Indices of the sparse layers of 'encoder' or 'decoder'."""
    return sparse_layer_indices(getattr(self, f"num_{stack}_layers"),
                                getattr(self, f"num_{stack}_sparse_layers"),
                                getattr(self, f"{stack}_sparse_layout"))


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------


def _add_residual(x, y, dropout_rate: float, enable_dropout: bool):
  """`x + dropout(y)`, T5's residual with dropout shared over the length axis.

  Called inside a compact method, so the dropout belongs to that module.
  """
  y = nn.Dropout(rate=dropout_rate, broadcast_dims=(-2,))(
      y, deterministic=not enable_dropout)
  return x + y.astype(x.dtype)


def _attention(config: TransformerConfig, name: str) -> nn.Module:
  return attention.MultiHeadDotProductAttention(
      num_heads=config.num_heads, head_dim=config.head_dim, dtype=config.dtype,
      dropout_rate=config.dropout_rate,
      float32_logits=config.float32_attention_logits, name=name)


def dense_mlp(config: TransformerConfig, **kwargs) -> nn.Module:
  """The dense FFN of `config` (T5 `MlpBlock`)."""
  return dense.MlpBlock(
      intermediate_dim=config.mlp_dim, activations=config.mlp_activations,
      intermediate_dropout_rate=config.dropout_rate, dtype=config.dtype, **kwargs)


class EncoderLayer(nn.Module):
  """One encoder layer: self-attention, then a dense or sparse FFN.

  Attributes:
    config: the model's hyperparameters.
    sparse_mlp: factory of this layer's MoE layer (`name=` is passed), or
      None for a dense FFN.
    scanned: return `(output, None)`, the carry protocol of `nn.scan`.
  """

  config: TransformerConfig
  sparse_mlp: Optional[MlpFactory] = None
  scanned: bool = False

  @nn.compact
  def __call__(self, x, attention_bias, attention_mask, padding_mask,
               enable_dropout: bool = False):
    """Applies the layer.

    Args:
      x: `[batch, length, embed]`.
      attention_bias: `[1, heads, length, length]` relative position bias.
      attention_mask: `[batch, 1, length, length]`.
      padding_mask: `<bool>[batch, length]` True for real tokens (for MoE routing).
      enable_dropout: training mode.

    Returns:
      `[batch, length, embed]` (with `None` as a second output if `scanned`).
    """
    cfg = self.config
    residual = functools.partial(_add_residual, dropout_rate=cfg.dropout_rate)
    x = partitioning.with_sharding_constraint(x, ("batch", "length", "embed"))
    h = dense.RMSNorm(dtype=cfg.dtype, name="pre_attention_layer_norm")(x)
    h = _attention(cfg, "attention")(h, h, attention_mask, attention_bias,
                                     enable_dropout=enable_dropout)
    x = residual(x, h, enable_dropout=enable_dropout)
    x = _apply_ffns(self, x, padding_mask, enable_dropout, residual)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """One decoder layer: causal self-attention, cross-attention, FFN.

  Attributes:
    config: the model's hyperparameters.
    sparse_mlp: factory of this layer's MoE layer, or None (dense FFN).
    scanned: return `(output, None)`, the carry protocol of `nn.scan`.
  """

  config: TransformerConfig
  sparse_mlp: Optional[MlpFactory] = None
  scanned: bool = False

  @nn.compact
  def __call__(self, y, encoded, self_attention_bias, self_attention_mask,
               cross_attention_mask, padding_mask, enable_dropout: bool = False,
               decode: bool = False):
    """Applies the layer.

    Args:
      y: `[batch, length, embed]` decoder activations (length 1 when decoding
        with a filled cache).
      encoded: `[batch, encoder_length, embed]` encoder outputs.
      self_attention_bias: `[1, heads, L, L]`, L the (max decode) length.
      self_attention_mask: `[batch, 1, length, length]` or None when decoding.
      cross_attention_mask: `[batch, 1, length, encoder_length]`.
      padding_mask: `<bool>[batch, length]` True for real tokens, or None.
      enable_dropout: training mode.
      decode: use the autoregressive cache.

    Returns:
      `[batch, length, embed]` (with `None` as a second output if `scanned`).
    """
    cfg = self.config
    residual = functools.partial(_add_residual, dropout_rate=cfg.dropout_rate)
    y = partitioning.with_sharding_constraint(y, ("batch", "length", "embed"))
    h = dense.RMSNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(y)
    h = _attention(cfg, "self_attention")(
        h, h, self_attention_mask, self_attention_bias,
        enable_dropout=enable_dropout, decode=decode)
    y = residual(y, h, enable_dropout=enable_dropout)
    h = dense.RMSNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(y)
    h = _attention(cfg, "encoder_decoder_attention")(
        h, encoded, cross_attention_mask, enable_dropout=enable_dropout)
    y = residual(y, h, enable_dropout=enable_dropout)
    y = _apply_ffns(self, y, padding_mask, enable_dropout, residual)
    return (y, None) if self.scanned else y


def _apply_ffns(layer, x, padding_mask, enable_dropout, residual):
  """The FFN sublayer (dense or sparse) and, if configured, ST-MoE's extra FFN."""
  cfg = layer.config
  h = dense.RMSNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
  if layer.sparse_mlp is not None:
    h = layer.sparse_mlp(name="mlp")(h, enable_dropout=enable_dropout,
                                     padding_mask=padding_mask)
  else:
    h = dense_mlp(cfg, name="mlp")(h, enable_dropout=enable_dropout)
  x = residual(x, h, enable_dropout=enable_dropout)
  if layer.sparse_mlp is not None and cfg.extra_mlp:
    h = dense.RMSNorm(dtype=cfg.dtype, name="pre_extra_mlp_layer_norm")(x)
    h = dense_mlp(cfg, name="extra_mlp")(h, enable_dropout=enable_dropout)
    x = residual(x, h, enable_dropout=enable_dropout)
  return x


class _LayerBlock(nn.Module):
  """A run of layers scanned as one unit (MIXED layouts under `nn.scan`).

  Attributes:
    layers: the layer constructors of one period, e.g. `[dense, dense, sparse]`
      for a sparse layer every 3rd layer; their parameters appear as
      `subblock_{j}`.
  """

  layers: Sequence[Callable[..., nn.Module]]

  @nn.compact
  def __call__(self, x, *args):
    for j, make_layer in enumerate(self.layers):
      x = make_layer(name=f"subblock_{j}")(x, *args)
    return x, None


def _run_layers(stack: str, config: TransformerConfig, sparse_mlp: Optional[MlpFactory],
                layer_cls, x, *args):
  """Applies a stack's layers (called from the stack's compact method).

  Args:
    stack: 'encoder' or 'decoder'.
    config: the model's hyperparameters.
    sparse_mlp: the stack's MoE layer factory (None for a dense stack).
    layer_cls: `EncoderLayer` or `DecoderLayer`.
    x: `[batch, length, embed]`.
    *args: the layer's other arguments, broadcast to every layer; the trailing
      Python bools (enable_dropout, decode) are static under remat.

  Returns:
    `[batch, length, embed]`.
  """
  sparse_indices = config.sparse_layers(stack)
  num_layers = getattr(config, f"num_{stack}_layers")
  if sparse_indices and sparse_mlp is None:
    raise ValueError(
        f"The {stack} has num_{stack}_sparse_layers={len(sparse_indices)} but no "
        f"sparse_mlp factory: bind EncoderDecoder.{stack}_sparse_mlp (e.g. "
        f"@{stack}/moe.MoeLayer) or set num_{stack}_sparse_layers=0.")
  if config.scan_layers and sparse_indices and len(sparse_indices) != num_layers:
    period = num_layers // len(sparse_indices)
    if sparse_indices != tuple(range(period - 1, num_layers, period)):
      raise ValueError(
          f"scan_layers=True needs a periodic sparse layout (MIXED, or all / no "
          f"layers sparse); got {stack} sparse layers {list(sparse_indices)} from "
          f"{getattr(config, f'{stack}_sparse_layout').name}. Use MIXED or "
          "scan_layers=False.")

  def layer_kwargs(index: int) -> dict:
    return dict(config=config, sparse_mlp=sparse_mlp if index in sparse_indices else None)

  # Argument 0 is the module itself, 1 is `x`.
  num_static = 1 if layer_cls is EncoderLayer else 2
  first_static = 2 + len(args) - num_static
  static_argnums = tuple(range(first_static, first_static + num_static))

  def maybe_remat(cls):
    if config.remat_policy == "none":
      return cls
    return nn.remat(cls, policy=REMAT_POLICIES[config.remat_policy],
                    static_argnums=static_argnums, prevent_cse=not config.scan_layers)

  if not config.scan_layers:
    layer = maybe_remat(layer_cls)
    for i in range(num_layers):
      x = layer(**layer_kwargs(i), name=f"layers_{i}")(x, *args)
    return x

  period = (num_layers // len(sparse_indices)
            if 0 < len(sparse_indices) < num_layers else 1)
  if period == 1:
    unit = maybe_remat(layer_cls)
    unit_kwargs = dict(layer_kwargs(0), scanned=True)
  else:
    # Under scan static argnums shift by the block wrapper; remat each layer.
    unit = _LayerBlock
    unit_kwargs = dict(layers=[
        functools.partial(maybe_remat(layer_cls), **layer_kwargs(j)) for j in range(period)])
  scanned = nn_partitioning.scan_with_axes(
      unit,
      variable_axes={c: 0 for c in _SCANNED_COLLECTIONS},
      split_rngs={r: True for r in _SCANNED_RNGS},
      in_axes=(nn.broadcast,) * len(args),
      length=num_layers // period,
      axis_name="layers")
  x, _ = scanned(**unit_kwargs, name="layers")(x, *args)
  return x


class Encoder(nn.Module):
  """The encoder stack: embeddings in, normalized hidden states out.

  Attributes:
    config: the model's hyperparameters.
    shared_embedding: the token `dense.Embed`, owned by `EncoderDecoder`.
    sparse_mlp: factory of the encoder's MoE layers (None: dense encoder).
  """

  config: TransformerConfig
  shared_embedding: nn.Module
  sparse_mlp: Optional[MlpFactory] = None

  @nn.compact
  def __call__(self, encoder_input_tokens, attention_mask, *, enable_dropout: bool = False):
    """Encodes `<int>[batch, length]` tokens to `[batch, length, embed]`."""
    cfg = self.config
    length = encoder_input_tokens.shape[-1]
    relpos = _relative_position_biases(cfg)
    bias = relpos(length, length, bidirectional=True)
    padding_mask = encoder_input_tokens > 0
    dropout = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))
    # [batch, length] -> [batch, length, embed]
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32)).astype(cfg.dtype)
    x = dropout(x, deterministic=not enable_dropout)
    x = _run_layers("encoder", cfg, self.sparse_mlp, EncoderLayer, x, bias,
                    attention_mask, padding_mask, enable_dropout)
    x = dense.RMSNorm(dtype=cfg.dtype, name="encoder_norm")(x)
    return dropout(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
  """The decoder stack: embeddings and encoder outputs in, logits out.

  Attributes:
    config: the model's hyperparameters.
    shared_embedding: the token `dense.Embed`, owned by `EncoderDecoder`.
    sparse_mlp: factory of the decoder's MoE layers (None: dense decoder).
  """

  config: TransformerConfig
  shared_embedding: nn.Module
  sparse_mlp: Optional[MlpFactory] = None

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, self_attention_mask,
               cross_attention_mask, padding_mask, *, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None):
    """Computes `<float32>[batch, length, vocab]` next-token logits.

    With `decode=True` the self-attention bias covers `max_decode_length`
    positions (each cached step reads its row); without it, the input length.
    """
    cfg = self.config
    length = (max_decode_length if decode and max_decode_length
              else decoder_input_tokens.shape[-1])
    relpos = _relative_position_biases(cfg)
    bias = relpos(length, length, bidirectional=False)
    dropout = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))
    # [batch, length] -> [batch, length, embed]
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32)).astype(cfg.dtype)
    y = dropout(y, deterministic=not enable_dropout)
    y = _run_layers("decoder", cfg, self.sparse_mlp, DecoderLayer, y, encoded, bias,
                    self_attention_mask, cross_attention_mask, padding_mask,
                    enable_dropout, decode)
    y = dense.RMSNorm(dtype=cfg.dtype, name="decoder_norm")(y)
    y = dropout(y, deterministic=not enable_dropout)
    # Logits in float32 for a stable softmax.
    y = y.astype(jnp.float32)
    if cfg.logits_via_embedding:
      # [batch, length, embed] x [vocab, embed] -> [batch, length, vocab]
      logits = jnp.einsum("bld,vd->blv", y, self.shared_embedding.embedding)
      logits = logits / np.sqrt(y.shape[-1])
    else:
      kernel = _LogitsDense(cfg.vocab_size, name="logits_dense")(y.shape[-1])
      # [batch, length, embed] x [embed, vocab] -> [batch, length, vocab]
      logits = jnp.einsum("bld,dv->blv", y, kernel)
    return partitioning.with_sharding_constraint(logits, ("batch", "length", "vocab"))


def _relative_position_biases(config: TransformerConfig) -> nn.Module:
  return attention.RelativePositionBiases(
      num_heads=config.num_heads, num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance, dtype=config.dtype,
      name="relpos_bias")


class _LogitsDense(nn.Module):
  """Holds the untied output projection `kernel` `[embed, vocab]`."""

  vocab_size: int

  @nn.compact
  def __call__(self, emb_dim: int) -> types.Array:
    return partitioning.param_with_axes(
        "kernel", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
        (emb_dim, self.vocab_size), jnp.float32, axes=("embed", "vocab"))


class EncoderDecoder(nn.Module):
  """T5-style encoder-decoder, dense or sparse; drivable by t5x unchanged.

  `__call__`, `encode` and `decode` have the signatures t5x's
  `EncoderDecoderModel` calls; the decode cache lives in the `cache`
  collection and parameters emit `params_axes` (see `moe_jax.partitioning`).

  Attributes:
    config: every hyperparameter (`TransformerConfig`).
    encoder_sparse_mlp: factory of the encoder's MoE layers (any callable
      taking `name=`, e.g. `@encoder/moe.MoeLayer` in gin); needed when
      `config.num_encoder_sparse_layers > 0`.
    decoder_sparse_mlp: the same for the decoder.
  """

  config: TransformerConfig
  encoder_sparse_mlp: Optional[MlpFactory] = None
  decoder_sparse_mlp: Optional[MlpFactory] = None

  @property
  def scan_layers(self) -> bool:
    """t5x reads this to find the layer axis of the decode cache."""
    return self.config.scan_layers

  def setup(self):
    if not isinstance(self.config, TransformerConfig):
      raise ValueError(
          f"EncoderDecoder.config must be a transformer.TransformerConfig, got "
          f"{type(self.config).__name__}; in gin bind "
          "`transformer.EncoderDecoder.config = @transformer.TransformerConfig()`.")
    cfg = self.config
    self.token_embedder = dense.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=cfg.dtype,
        one_hot=cfg.one_hot_embedding)
    self.encoder = Encoder(config=cfg, shared_embedding=self.token_embedder,
                           sparse_mlp=self.encoder_sparse_mlp)
    self.decoder = Decoder(config=cfg, shared_embedding=self.token_embedder,
                           sparse_mlp=self.decoder_sparse_mlp)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             encoder_positions=None, *, enable_dropout: bool = True):
    """Runs the encoder.

    Args:
      encoder_input_tokens: `<int>[batch, length]`, 0 = padding.
      encoder_segment_ids: optional `<int>[batch, length]` packing segments;
        tokens attend only within their segment.
      encoder_positions: accepted for t5x compatibility and unused: relative
        position biases only need in-segment distances, which equal index
        distances because packed segments are contiguous.
      enable_dropout: training mode.

    Returns:
      `[batch, length, emb_dim]` encoder outputs.
    """
    del encoder_positions
    if encoder_input_tokens.ndim != 2:
      raise ValueError("encoder_input_tokens must be [batch, length], got shape "
                       f"{encoder_input_tokens.shape}.")
    real = encoder_input_tokens > 0
    dtype = self.config.dtype
    mask = attention.make_attention_mask(real, real, dtype=dtype)
    if encoder_segment_ids is not None:
      mask = attention.combine_masks(
          mask, attention.make_attention_mask(
              encoder_segment_ids, encoder_segment_ids, jnp.equal, dtype),
          dtype=dtype)
    return self.encoder(encoder_input_tokens, mask, enable_dropout=enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens, encoder_segment_ids=None, decoder_segment_ids=None,
             decoder_positions=None, *, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None):
    """Runs the decoder on encoder outputs.

    Args:
      encoded: `[batch, encoder_length, emb_dim]` from `encode`.
      encoder_input_tokens: `<int>[batch, encoder_length]` (padding mask only).
      decoder_input_tokens: `<int>[batch, length]` shifted-right targets (one
        position per call when decoding with a filled cache).
      decoder_target_tokens: `<int>[batch, length]`; 0 marks padding (masks only).
      encoder_segment_ids: optional packing segments of the inputs.
      decoder_segment_ids: optional packing segments of the targets.
      decoder_positions: accepted for t5x compatibility and unused (see
        `encode`).
      enable_dropout: training mode.
      decode: autoregressive decoding with the `cache` collection.
      max_decode_length: full target length when decoding (sizes the position
        bias the cached steps index into).

    Returns:
      `<float32>[batch, length, vocab]` logits.
    """
    del decoder_positions
    dtype = self.config.dtype
    if decode:
      if encoder_segment_ids is not None or decoder_segment_ids is not None:
        raise ValueError("Packed inputs (segment ids) cannot be used with decode=True; "
                         "decode unpacked examples.")
      # The cache hides future positions; targets carry no padding here.
      self_mask = None
      padding_mask = None
      cross_mask = attention.make_attention_mask(
          jnp.ones_like(decoder_input_tokens, dtype=bool), encoder_input_tokens > 0,
          dtype=dtype)
    else:
      self_mask = attention.make_decoder_mask(
          decoder_target_tokens, decoder_segment_ids, dtype=dtype)
      padding_mask = decoder_target_tokens > 0
      cross_mask = attention.make_attention_mask(
          decoder_target_tokens > 0, encoder_input_tokens > 0, dtype=dtype)
      if encoder_segment_ids is not None:
        cross_mask = attention.combine_masks(
            cross_mask, attention.make_attention_mask(
                decoder_segment_ids, encoder_segment_ids, jnp.equal, dtype),
            dtype=dtype)
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask, padding_mask,
                        enable_dropout=enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None):
    """Encodes the inputs and returns `<float32>[batch, length, vocab]` logits.

    `decoder_input_tokens` are the targets shifted right (for packed data,
    each segment starts with 0). With `decode=True` on full-length inputs and
    a mutable, empty `cache`, this call sizes and creates the decode cache.
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)
