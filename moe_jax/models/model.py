"""`EncoderDecoderModel`: loss, prediction and scoring around an `EncoderDecoder`.

The API mirrors t5x's `EncoderDecoderModel` / `MoeEncoderDecoderModel`
(`loss_fn`, `eval_fn`, `predict_batch(_with_aux)`, `score_batch`,
`get_initial_variables`), so t5x users find familiar names and batches:

  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens
  [, decoder_loss_weights, encoder_segment_ids, decoder_segment_ids,
     encoder_positions, decoder_positions]      all <int>[batch, length]

Metrics are plain float32 scalars (a dict), already normalized for the
batch, so they can be logged or wrapped in clu metrics by the trainer;
`weight_sum` (the number of target tokens that count) allows weighted
averaging across steps.
"""

import functools
from typing import Any, Callable, Dict, Mapping, MutableMapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from moe_jax.layers import moe
from moe_jax.models import decoding
from moe_jax.models import transformer

PyTree = Any
Batch = Mapping[str, jax.Array]

LOSS_NORMALIZING_FACTORS = ("NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS",
                            "AVERAGE_PER_SEQUENCE")


def cross_entropy_with_logits(
    logits: jax.Array,
    targets: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy with label smoothing and the output z-loss.

  With smoothing `s` over `V` classes the target distribution puts `1 - s` on
  the label and `s / (V - 1)` on every other class; the loss subtracts that
  distribution's entropy, so a perfect prediction scores 0. The z-loss
  `z_loss * logsumexp(logits)^2` (PaLM / T5X) keeps the softmax normalizer
  near 1.

  Args:
    logits: `<float>[..., vocab]`.
    targets: `<int>[...]` label ids.
    label_smoothing: `s` in [0, 1).
    z_loss: coefficient of the z-loss.

  Returns:
    `(loss, z_loss_part)`, both `<float32>[...]`; `loss` includes the z-loss.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  label_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    others_log_prob = jnp.sum(log_probs, axis=-1) - label_log_prob
    loss = -(confidence * label_log_prob + low * others_log_prob)
    # Entropy of the smoothed target distribution.
    loss -= -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  else:
    loss = -label_log_prob
  z_part = z_loss * jnp.square(log_z)
  return loss + z_part, z_part


def loss_normalizing_weights(
    weights: jax.Array,
    loss_normalizing_factor: Union[None, float, int, str],
    segment_ids: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Per-token weights and the divisor for a t5x-style loss normalizing factor.

  Args:
    weights: `<float>[batch, length]` loss weights (0 for padding).
    loss_normalizing_factor: None (sum of token losses), a number (divide by
      it), 'NUM_REAL_TARGET_TOKENS' (sum of weights), 'NUM_TOTAL_TARGET_TOKENS'
      (batch * length), or 'AVERAGE_PER_SEQUENCE' (each target sequence,
      packed segments included, gets equal total weight; divide by their count).
    segment_ids: `<int>[batch, length]` packing segments (for
      'AVERAGE_PER_SEQUENCE').

  Returns:
    `(weights, divisor)`.
  """
  weights = weights.astype(jnp.float32)
  if loss_normalizing_factor is None:
    return weights, jnp.array(1.0, jnp.float32)
  if isinstance(loss_normalizing_factor, (int, float)):
    return weights, jnp.array(loss_normalizing_factor, jnp.float32)
  factor = str(loss_normalizing_factor).upper()
  if factor == "NUM_REAL_TARGET_TOKENS":
    return weights, jnp.sum(weights)
  if factor == "NUM_TOTAL_TARGET_TOKENS":
    return weights, jnp.array(weights.size, jnp.float32)
  if factor == "AVERAGE_PER_SEQUENCE":
    batch, length = weights.shape
    if segment_ids is None:
      segment_ids = (weights > 0).astype(jnp.int32)
    # One bucket per (row, segment id); segment ids lie in [0, length].
    bucket = jnp.arange(batch)[:, None] * (length + 1) + segment_ids
    per_sequence = jax.ops.segment_sum(weights.ravel(), bucket.ravel(),
                                       num_segments=batch * (length + 1))
    denominator = per_sequence[bucket]
    scaled = jnp.where(denominator > 0, weights / jnp.maximum(denominator, 1e-9), 0.0)
    return scaled, jnp.maximum(jnp.sum(per_sequence > 0).astype(jnp.float32), 1.0)
  raise ValueError(
      f"Unknown loss_normalizing_factor {loss_normalizing_factor!r}: use None, a "
      f"number, or one of {LOSS_NORMALIZING_FACTORS}.")


def per_layer_expert_metrics(intermediates: Mapping[str, Any],
                             config: Any = None) -> Dict[str, jax.Array]:
  """Each MoE layer's sown metrics, named `experts/<stack>/layers_<i>/<metric>`.

  Metrics are the layer's own (losses unscaled): `auxiliary_loss`,
  `router_z_loss`, `fraction_tokens_left_behind` (dropped tokens),
  `expert_usage`, `router_confidence` and `expert_fraction` (`[experts]`
  shares of the routed assignments). Under `nn.scan` a stack's MoE layers
  are stacked along a leading axis in layer order; `config` (a
  `TransformerConfig`) names them by their layer index.
  """
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
    metric = next((k for k in reversed(keys) if k in moe.MOE_METRICS), None)
    if metric is None or "mlp" not in keys:
      continue
    layer = keys[:keys.index("mlp")]
    if "layers" not in layer:  # Unscanned: the path names the layer.
      out[f"experts/{'/'.join(layer)}/{metric}"] = value
      continue
    stack = layer[0]
    sparse = config.sparse_layers(stack) if config is not None else range(value.shape[0])
    for k, index in enumerate(sparse):
      out[f"experts/{stack}/layers_{index}/{metric}"] = value[k]
  return out


class EncoderDecoderModel:
  """Trains, evaluates, decodes and scores an `EncoderDecoder` module.

  Attributes:
    module: the `transformer.EncoderDecoder` (any module with t5x's
      encoder-decoder signatures works).
    input_vocabulary / output_vocabulary: optional seqio vocabularies (kept
      for t5x-style run configs; the EOS id comes from `output_vocabulary`
      unless `eos_id` is given).
    decode_fn: `decoding.beam_search` (default), `decoding.temperature_sample`
      or `decoding.greedy`, or any t5x-compatible decode function.
    label_smoothing: target label smoothing.
    z_loss: output-logit z-loss coefficient (t5x runs use 1e-4).
    loss_normalizing_factor: see `loss_normalizing_weights`.
    aux_loss_factor: weight of the mean MoE load-balancing loss.
    router_z_loss_factor: weight of the mean router z-loss.
    eos_id: end-of-sequence id for decoding (default: the output
      vocabulary's, else 1 as in T5).
    default_decoder_params: keyword arguments always passed to `decode_fn`
      (e.g. `{'alpha': 0.6}` or `{'temperature': 0.7, 'topk': 40}`).
  """

  def __init__(
      self,
      module: transformer.EncoderDecoder,
      input_vocabulary: Any = None,
      output_vocabulary: Any = None,
      decode_fn: Callable[..., Tuple[jax.Array, jax.Array]] = decoding.beam_search,
      label_smoothing: float = 0.0,
      z_loss: float = 1e-4,
      loss_normalizing_factor: Union[None, float, int, str] = None,
      aux_loss_factor: float = 0.0,
      router_z_loss_factor: float = 0.0,
      eos_id: Optional[int] = None,
      default_decoder_params: Optional[Mapping[str, Any]] = None,
  ):
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
    # Validates the string early rather than at the first step.
    loss_normalizing_weights(jnp.ones((1, 1)), loss_normalizing_factor)
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.decode_fn = decode_fn
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.loss_normalizing_factor = loss_normalizing_factor
    self.aux_loss_factor = aux_loss_factor
    self.router_z_loss_factor = router_z_loss_factor
    if eos_id is None:
      eos_id = getattr(output_vocabulary, "eos_id", None)
    self.eos_id = 1 if eos_id is None else eos_id
    self.default_decoder_params = dict(default_decoder_params or {})

  # -------------------------------------------------------------------------
  # Initialization and forward pass.
  # -------------------------------------------------------------------------

  def get_initial_variables(
      self,
      rng: jax.Array,
      input_shapes: Mapping[str, Tuple[int, ...]],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> PyTree:
    """Initializes `params` and `params_axes` from feature shapes (t5x API).

    Args:
      rng: PRNG key for parameter initialization.
      input_shapes: shapes of at least `encoder_input_tokens` and
        `decoder_input_tokens`; segment ids / positions are used if present.
      input_types: optional dtypes per feature (default int32).

    Returns:
      The variable collections of `module.init`.
    """
    input_types = dict(input_types or {})

    def dummy(name):
      if name not in input_shapes:
        return None
      return jnp.ones(input_shapes[name], input_types.get(name, jnp.int32))

    decoder_tokens = dummy("decoder_input_tokens")
    return self.module.init(
        {"params": rng}, dummy("encoder_input_tokens"), decoder_tokens, decoder_tokens,
        encoder_segment_ids=dummy("encoder_segment_ids"),
        decoder_segment_ids=dummy("decoder_segment_ids"),
        encoder_positions=dummy("encoder_positions"),
        decoder_positions=dummy("decoder_positions"),
        enable_dropout=False, decode=False)

  def compute_logits(
      self,
      params: PyTree,
      batch: Batch,
      dropout_rng: Optional[jax.Array] = None,
      mutable: Union[bool, Tuple[str, ...]] = False,
  ):
    """Forward pass; dropout (and router noise) is on iff `dropout_rng` is given.

    Returns:
      `<float32>[batch, length, vocab]` logits, plus the mutated collections
      when `mutable` is set.
    """
    rngs = None
    if dropout_rng is not None:
      dropout, jitter, gating = jax.random.split(dropout_rng, 3)
      rngs = {"dropout": dropout, "jitter": jitter, "gating": gating}
    return self.module.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        enable_dropout=rngs is not None,
        decode=False,
        rngs=rngs,
        mutable=mutable)

  # -------------------------------------------------------------------------
  # Training and evaluation.
  # -------------------------------------------------------------------------

  def loss_fn(
      self,
      params: PyTree,
      batch: Batch,
      dropout_rng: Optional[jax.Array],
  ) -> Tuple[jax.Array, Mapping[str, jax.Array]]:
    """Token cross-entropy (+ z-loss) plus the weighted MoE auxiliary losses.

    `loss = CE / normalizer + aux_loss_factor * mean_layers(balance loss)
            + router_z_loss_factor * mean_layers(router z-loss)`.

    Args:
      params: model parameters.
      batch: features (see module docstring); `decoder_loss_weights` defaults
        to `decoder_target_tokens > 0`.
      dropout_rng: PRNG key for dropout / router noise, or None (eval mode).

    Returns:
      `(loss, metrics)`: metrics `loss`, `cross_ent_loss`, `z_loss`,
      `accuracy`, `weight_sum`, and for MoE models `experts/auxiliary_loss`,
      `experts/router_z_loss` (both already multiplied by their factor),
      `experts/fraction_tokens_left_behind`, `experts/expert_usage`,
      `experts/router_confidence`, `experts/max_expert_fraction`, and per
      MoE layer `experts/<stack>/layers_<i>/<metric>` (see
      `per_layer_expert_metrics`).
    """
    logits, state = self.compute_logits(params, batch, dropout_rng,
                                        mutable=("intermediates",))
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = targets > 0
    raw_weights = weights.astype(jnp.float32)
    token_weights, divisor = loss_normalizing_weights(
        raw_weights, self.loss_normalizing_factor, batch.get("decoder_segment_ids"))
    token_loss, token_z_loss = cross_entropy_with_logits(
        logits, targets, label_smoothing=self.label_smoothing, z_loss=self.z_loss)
    loss = jnp.sum(token_loss * token_weights) / divisor
    z_loss = jnp.sum(token_z_loss * token_weights) / divisor
    weight_sum = jnp.sum(raw_weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "cross_ent_loss": loss - z_loss,
        "z_loss": z_loss,
        "accuracy": jnp.sum(correct * raw_weights) / jnp.maximum(weight_sum, 1.0),
        "weight_sum": weight_sum,
    }
    expert_metrics = moe.collect_moe_metrics(state.get("intermediates", {}))
    if expert_metrics:
      aux = self.aux_loss_factor * expert_metrics["auxiliary_loss"]
      router_z = self.router_z_loss_factor * expert_metrics["router_z_loss"]
      loss = loss + aux + router_z
      metrics["experts/auxiliary_loss"] = aux
      metrics["experts/router_z_loss"] = router_z
      for name in ("fraction_tokens_left_behind", "expert_usage", "router_confidence"):
        metrics[f"experts/{name}"] = expert_metrics[name]
      if "expert_fraction" in expert_metrics:
        metrics["experts/max_expert_fraction"] = jnp.max(expert_metrics["expert_fraction"])
      metrics.update(per_layer_expert_metrics(state["intermediates"],
                                              getattr(self.module, "config", None)))
    metrics["loss"] = loss
    return loss, metrics

  def eval_fn(self, params: PyTree, batch: Batch) -> Tuple[jax.Array, Mapping[str, jax.Array]]:
    """`loss_fn` without dropout (eval capacity factor in MoE layers)."""
    return self.loss_fn(params, batch, dropout_rng=None)

  def score_batch(
      self,
      params: PyTree,
      batch: Batch,
      return_intermediates: bool = False,
  ):
    """Per-example log-likelihood of the targets, for rank classification.

    Returns:
      `<float32>[batch]` sum over target tokens of `log p(token)` (times
      `decoder_loss_weights`, default `targets > 0`); with
      `return_intermediates`, also `{'token_scores': [batch, length],
      'intermediates': the sown collection}`.
    """
    logits, state = self.compute_logits(params, batch, mutable=("intermediates",))
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = targets > 0
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    token_scores = token_scores * weights.astype(jnp.float32)
    scores = jnp.sum(token_scores, axis=-1)
    if return_intermediates:
      return scores, {"token_scores": token_scores,
                      "intermediates": state.get("intermediates", {})}
    return scores

  # -------------------------------------------------------------------------
  # Decoding.
  # -------------------------------------------------------------------------

  def initial_cache(self, params: PyTree, encoded: jax.Array,
                    encoder_input_tokens: jax.Array, decode_length: int) -> PyTree:
    """An empty decode cache for `batch` rows and `decode_length` positions.

    The cache's shapes come from tracing the decoder once in decode mode
    (`jax.eval_shape`, no computation); its initial values are all zeros.
    """
    batch = encoder_input_tokens.shape[0]
    dummy = jnp.ones((batch, decode_length), jnp.int32)
    _, shapes = jax.eval_shape(
        functools.partial(self.module.apply, mutable=["cache"], method=self.module.decode,
                          enable_dropout=False, decode=True),
        {"params": params}, encoded, encoder_input_tokens, dummy, dummy)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

  def _tokens_to_logits(self, state: decoding.DecodingState, params: PyTree,
                        encoded: jax.Array, encoder_input_tokens: jax.Array,
                        max_decode_length: int):
    logits, variables = self.module.apply(
        {"params": params, "cache": state.cache}, encoded, encoder_input_tokens,
        state.cur_token, state.cur_token, enable_dropout=False, decode=True,
        max_decode_length=max_decode_length, mutable=["cache"],
        method=self.module.decode)
    # [rows, 1, vocab] -> [rows, vocab]
    return logits[:, 0], variables["cache"]

  def predict_batch_with_aux(
      self,
      params: PyTree,
      batch: Batch,
      rng: Optional[jax.Array] = None,
      decoder_params: Optional[MutableMapping[str, Any]] = None,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
      prompt_with_targets: bool = False,
  ) -> Tuple[jax.Array, Mapping[str, jax.Array]]:
    """Decodes with the KV cache using `decode_fn`.

    Args:
      params: model parameters.
      batch: needs `encoder_input_tokens` and `decoder_input_tokens` (the
        latter only for the decode length, or as a prompt).
      rng: PRNG key for sampling decode functions.
      decoder_params: extra keyword arguments for `decode_fn` (override
        `default_decoder_params`), e.g. `{'alpha': 0.8}`.
      return_all_decodes: return every beam / sample, not just the best.
      num_decodes: beam size, or number of samples.
      prompt_with_targets: force `decoder_input_tokens` (EOS removed) as a
        prefix of the outputs.

    Returns:
      `(decodes, {'scores': scores})`: `<int32>[batch, length]` and
      `[batch]`, or `[batch, num_decodes, length]` and `[batch, num_decodes]`
      (best last) with `return_all_decodes`.
    """
    encoder_input_tokens = batch["encoder_input_tokens"]
    decoder_input_tokens = batch["decoder_input_tokens"]
    decode_length = decoder_input_tokens.shape[1]
    if prompt_with_targets:
      prompt = jnp.where(decoder_input_tokens == self.eos_id, 0, decoder_input_tokens)
    else:
      prompt = jnp.zeros_like(decoder_input_tokens)
    encoded = self.module.apply({"params": params}, encoder_input_tokens,
                                enable_dropout=False, method=self.module.encode)
    cache = self.initial_cache(params, encoded, encoder_input_tokens, decode_length)
    tokens_to_logits = functools.partial(
        self._tokens_to_logits, params=params,
        encoded=decoding.repeat_rows(encoded, num_decodes),
        encoder_input_tokens=decoding.repeat_rows(encoder_input_tokens, num_decodes),
        max_decode_length=decode_length)
    kwargs = dict(self.default_decoder_params, **(decoder_params or {}))
    if rng is not None:
      kwargs["decode_rng"] = rng
    kwargs.setdefault("eos_id", self.eos_id)
    decodes, scores = self.decode_fn(
        inputs=prompt, cache=cache, tokens_to_logits=tokens_to_logits,
        num_decodes=num_decodes, cache_offset=1 if self.module.scan_layers else 0,
        **kwargs)
    if return_all_decodes:
      return decodes, {"scores": scores}
    return decodes[:, -1], {"scores": scores[:, -1]}

  def predict_batch(self, params: PyTree, batch: Batch,
                    rng: Optional[jax.Array] = None) -> jax.Array:
    """The best decode per example, `<int32>[batch, length]`."""
    return self.predict_batch_with_aux(params, batch, rng=rng)[0]
