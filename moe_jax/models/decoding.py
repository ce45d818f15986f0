"""Autoregressive decoding over a flax attention cache: sampling and beam search.

Both decoders follow the interface of t5x's `decode_fn` so that either can be
passed to our `EncoderDecoderModel` or to t5x's own:

  decodes, scores = decode_fn(inputs=..., cache=..., tokens_to_logits=...,
                              eos_id=..., num_decodes=..., cache_offset=...)

  * `inputs` `<int>[batch, length]` is aligned with the decoder *inputs*
    (position 0 is the BOS 0). A non-zero `inputs[:, i + 1]` forces the token
    emitted at step `i` (a prompt); zeros are generated.
  * `cache` is the cache collection for `batch` rows; decoders repeat it for
    each of the `num_decodes` rows per example.
  * `tokens_to_logits(DecodingState) -> (logits [rows, vocab], new_cache)`
    runs the decoder on one position per row.
  * `cache_offset` is the axis of the batch in cache arrays (1 when layers are
    scanned, whose cache has a leading layer axis).
  * Returned decodes are `<int32>[batch, num_decodes, length]` (no BOS) and
    scores `[batch, num_decodes]`, sorted by *increasing* score: the best
    decode is `[:, -1]`, as t5x expects.

Everything runs inside `lax.while_loop`, so decoding jit-compiles as a whole.
"""

from typing import Any, Callable, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax import types

PyTree = Any
# Log-probability of impossible continuations (finite, so arithmetic stays
# NaN-free).
NEG_INF = -1.0e7


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` sees at each step.

  Attributes:
    cur_index: `<int32>[]` step, i.e. the position of `cur_token`.
    sequences: `<int32>[rows, length + 1]` tokens so far (BOS first).
    cur_token: `<int32>[rows, 1]` the token to feed.
    cache: the attention cache for `rows` rows.
  """

  cur_index: types.Array
  sequences: types.Array
  cur_token: types.Array
  cache: PyTree


TokensToLogits = Callable[[DecodingState], Tuple[types.Array, PyTree]]


# ---------------------------------------------------------------------------
# Cache helpers: the batch axis of every cache leaf except `cache_index`.
# ---------------------------------------------------------------------------


def cache_map(fn: Callable[[types.Array], types.Array], cache: PyTree) -> PyTree:
  """Applies `fn` to every cache array that has a batch axis."""

  def apply(path, leaf):
    name = getattr(path[-1], "key", None)
    return leaf if name == "cache_index" else fn(leaf)

  return jax.tree_util.tree_map_with_path(apply, cache)


def repeat_rows(x: types.Array, times: int, axis: int = 0) -> types.Array:
  """`[..., batch, ...] -> [..., batch * times, ...]`, each row repeated in place."""
  return jnp.repeat(x, times, axis=axis)


def _gather_rows(x: types.Array, rows: types.Array, axis: int) -> types.Array:
  return jnp.take(x, rows, axis=axis)


def brevity_penalty(alpha: float, length: types.Array) -> types.Array:
  """GNMT / t5x length normalization `((5 + length) / 6) ** alpha`."""
  return jnp.power((5.0 + length) / 6.0, alpha)


def _forced_tokens(inputs: types.Array) -> types.Array:
  """Token forced at each step (0 = free): `inputs` shifted left by one."""
  return jnp.pad(inputs[:, 1:], ((0, 0), (0, 1)))


# ---------------------------------------------------------------------------
# Sampling (greedy when temperature == 0).
# ---------------------------------------------------------------------------


def _filter_logits(logits: types.Array, topk: int, topp: float) -> types.Array:
  """Keeps the `topk` largest logits and/or the top-p nucleus; others NEG_INF."""
  if topk:
    kth = jax.lax.top_k(logits, topk)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if topp:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each sorted entry; keep entries
    # entered before the mass reached topp (the top-1 always stays).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = mass_before < topp
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def temperature_sample(
    inputs: types.Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    decode_rng: Optional[types.PRNGKey] = None,
    num_decodes: int = 1,
    temperature: float = 1.0,
    topk: int = 0,
    topp: float = 0.0,
    max_decode_len: Optional[int] = None,
    cache_offset: int = 0,
) -> Tuple[types.Array, types.Array]:
  """Samples `num_decodes` continuations per example (greedy at temperature 0).

  Args:
    inputs: `<int>[batch, length]` prompt in decoder-input alignment (see the
      module docstring); all zeros for free decoding.
    cache: attention cache for `batch` rows.
    tokens_to_logits: one decoding step.
    eos_id: end-of-sequence id; a row stops after emitting it (then pads 0).
    decode_rng: PRNG key (required unless `temperature == 0`).
    num_decodes: samples per example.
    temperature: softmax temperature; 0 picks the argmax.
    topk: sample among the k most likely tokens only (0 = off).
    topp: nucleus sampling mass (0 = off).
    max_decode_len: steps to run (default `inputs.shape[1]`).
    cache_offset: batch axis of the cache arrays.

  Returns:
    `(decodes <int32>[batch, num_decodes, length], log_probs [batch, num_decodes])`
    where `log_probs` sums the model's (temperature-free) log-probabilities of
    the generated, non-forced tokens; sorted by increasing log-probability.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if temperature > 0 and decode_rng is None:
    raise ValueError("Sampling with temperature > 0 needs decode_rng.")
  batch, length = inputs.shape
  max_decode_len = length if max_decode_len is None else max_decode_len
  rows = batch * num_decodes
  forced = repeat_rows(_forced_tokens(inputs), num_decodes)[:, :max_decode_len]
  forced = jnp.pad(forced, ((0, 0), (0, max_decode_len - forced.shape[1])))
  cache = cache_map(lambda x: repeat_rows(x, num_decodes, cache_offset), cache)
  rng = jax.random.PRNGKey(0) if decode_rng is None else decode_rng

  def cond(carry):
    step, _, _, ended, _, _ = carry
    return (step < max_decode_len) & ~jnp.all(ended)

  def body(carry):
    step, sequences, log_probs, ended, cache, rng = carry
    token = jax.lax.dynamic_slice_in_dim(sequences, step, 1, axis=1)
    logits, cache = tokens_to_logits(DecodingState(step, sequences, token, cache))
    logits = logits.astype(jnp.float32)
    model_log_probs = jax.nn.log_softmax(logits)
    rng, step_rng = jax.random.split(rng)
    if temperature == 0:
      sampled = jnp.argmax(logits, axis=-1)
    else:
      sampled = jax.random.categorical(
          step_rng, _filter_logits(logits / temperature, topk, topp))
    forced_now = forced[:, step]
    is_forced = forced_now > 0
    next_token = jnp.where(is_forced, forced_now, sampled).astype(jnp.int32)
    next_token = jnp.where(ended, 0, next_token)
    token_log_prob = jnp.take_along_axis(model_log_probs, next_token[:, None], -1)[:, 0]
    log_probs = log_probs + jnp.where(ended | is_forced, 0.0, token_log_prob)
    ended = ended | ((next_token == eos_id) & ~is_forced)
    sequences = jax.lax.dynamic_update_slice_in_dim(
        sequences, next_token[:, None], step + 1, axis=1)
    return step + 1, sequences, log_probs, ended, cache, rng

  init = (jnp.array(0, jnp.int32), jnp.zeros((rows, max_decode_len + 1), jnp.int32),
          jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), bool), cache, rng)
  _, sequences, log_probs, _, _, _ = jax.lax.while_loop(cond, body, init)
  decodes = sequences[:, 1:].reshape(batch, num_decodes, max_decode_len)
  log_probs = log_probs.reshape(batch, num_decodes)
  order = jnp.argsort(log_probs, axis=-1)
  return (jnp.take_along_axis(decodes, order[..., None], axis=1),
          jnp.take_along_axis(log_probs, order, axis=1))


def greedy(inputs, cache, tokens_to_logits, eos_id, decode_rng=None, num_decodes=1,
           max_decode_len=None, cache_offset=0):
  """Greedy decoding: `temperature_sample` at temperature 0."""
  del decode_rng
  return temperature_sample(inputs, cache, tokens_to_logits, eos_id, None,
                            num_decodes=num_decodes, temperature=0.0,
                            max_decode_len=max_decode_len, cache_offset=cache_offset)


# ---------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class _BeamState:
  step: types.Array              # [] position of the token fed next
  live_seqs: types.Array         # [batch, beams, length + 1]
  live_log_probs: types.Array    # [batch, beams] raw sums of log-probs
  finished_seqs: types.Array     # [batch, beams, length + 1]
  finished_scores: types.Array   # [batch, beams] length-normalized
  finished_flags: types.Array    # [batch, beams]
  cache: PyTree                  # rows = batch * beams


def beam_search(
    inputs: types.Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    num_decodes: int = 4,
    alpha: float = 0.6,
    max_decode_len: Optional[int] = None,
    decode_rng: Optional[types.PRNGKey] = None,
    cache_offset: int = 0,
) -> Tuple[types.Array, types.Array]:
  """Beam search with the length penalty `((5 + len) / 6) ** alpha`.

  Each step expands every live beam by every token, keeps the `2 * beams`
  best extensions (so that `beams` non-finished ones always remain), moves
  those ending in EOS to the finished set with score
  `log_prob / brevity_penalty(alpha, length)` (length counts the EOS), and
  keeps the best `beams` others alive. The search stops at `max_decode_len`
  or when no live beam can still beat the worst finished one (live scores
  can only fall, and are bounded by dividing by the largest penalty).

  Args:
    inputs: `<int>[batch, length]` prompt in decoder-input alignment; zeros
      for free decoding. Forced tokens add no log-probability.
    cache: attention cache for `batch` rows.
    tokens_to_logits: one decoding step.
    eos_id: end-of-sequence id.
    num_decodes: beam size.
    alpha: length-penalty exponent (0 = raw log-probability).
    max_decode_len: maximum output length (default `inputs.shape[1]`).
    decode_rng: unused (beam search is deterministic).
    cache_offset: batch axis of the cache arrays.

  Returns:
    `(decodes <int32>[batch, beams, length], scores [batch, beams])`, best
    last. Examples where no beam finished return their live beams, scored
    with the penalty at `max_decode_len`.
  """
  del decode_rng
  batch, length = inputs.shape
  beams = num_decodes
  max_decode_len = length if max_decode_len is None else max_decode_len
  forced = _forced_tokens(inputs)[:, :max_decode_len]
  forced = jnp.pad(forced, ((0, 0), (0, max_decode_len - forced.shape[1])))
  max_penalty = brevity_penalty(alpha, float(max_decode_len))

  def flat(x, offset=0):  # [.., batch, beams, ..] -> [.., batch * beams, ..]
    return x.reshape(x.shape[:offset] + (-1,) + x.shape[offset + 2:])

  def unflat(x, offset=0):
    return x.reshape(x.shape[:offset] + (batch, beams) + x.shape[offset + 1:])

  # Only beam 0 is live initially, so the first step does not pick duplicates.
  init = _BeamState(
      step=jnp.array(0, jnp.int32),
      live_seqs=jnp.zeros((batch, beams, max_decode_len + 1), jnp.int32),
      live_log_probs=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1)), (batch, 1)),
      finished_seqs=jnp.zeros((batch, beams, max_decode_len + 1), jnp.int32),
      finished_scores=jnp.full((batch, beams), NEG_INF),
      finished_flags=jnp.zeros((batch, beams), bool),
      cache=cache_map(lambda x: repeat_rows(x, beams, cache_offset), cache))

  def cond(state: _BeamState):
    best_possible = state.live_log_probs[:, 0] / max_penalty  # beams sorted best-first
    worst_finished = jnp.where(state.finished_flags[:, -1], state.finished_scores[:, -1],
                               NEG_INF)
    can_improve = jnp.any(best_possible > worst_finished)
    return (state.step < max_decode_len) & can_improve

  def body(state: _BeamState):
    step = state.step
    token = jax.lax.dynamic_slice_in_dim(flat(state.live_seqs), step, 1, axis=1)
    logits, new_cache = tokens_to_logits(
        DecodingState(step, flat(state.live_seqs), token, state.cache))
    # [batch * beams, vocab] -> [batch, beams, vocab]
    log_probs = jax.nn.log_softmax(unflat(logits.astype(jnp.float32)))
    vocab = log_probs.shape[-1]
    forced_now = forced[:, step]
    is_forced = (forced_now > 0)[:, None, None]
    forced_only = jnp.where(
        jnp.arange(vocab) == forced_now[:, None, None], 0.0, NEG_INF)
    log_probs = jnp.where(is_forced, forced_only, log_probs)
    candidates = state.live_log_probs[:, :, None] + log_probs
    # [batch, beams * vocab] -> best 2 * beams extensions.
    top_log_probs, top_flat = jax.lax.top_k(candidates.reshape(batch, -1), 2 * beams)
    origin = top_flat // vocab
    new_token = (top_flat % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(state.live_seqs, origin[..., None], axis=1)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(
        top_seqs, new_token[..., None], step + 1, axis=2)
    ends = (new_token == eos_id) & ~is_forced[:, :, 0]

    # Live set: the best non-finished extensions.
    alive_log_probs = jnp.where(ends, NEG_INF, top_log_probs)
    live_log_probs, keep = jax.lax.top_k(alive_log_probs, beams)
    live_seqs = jnp.take_along_axis(top_seqs, keep[..., None], axis=1)
    live_origin = jnp.take_along_axis(origin, keep, axis=1)
    # Row of the parent beam in the flattened cache.
    parent_rows = (jnp.arange(batch)[:, None] * beams + live_origin).reshape(-1)
    cache = cache_map(lambda x: _gather_rows(x, parent_rows, cache_offset), new_cache)

    # Finished set: merge new EOS extensions, keep the best scores.
    new_scores = jnp.where(ends, top_log_probs / brevity_penalty(alpha, step + 1.0),
                           NEG_INF)
    all_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([state.finished_seqs, top_seqs], axis=1)
    all_flags = jnp.concatenate([state.finished_flags, ends], axis=1)
    finished_scores, best = jax.lax.top_k(all_scores, beams)
    return _BeamState(
        step=step + 1,
        live_seqs=live_seqs,
        live_log_probs=live_log_probs,
        finished_seqs=jnp.take_along_axis(all_seqs, best[..., None], axis=1),
        finished_scores=finished_scores,
        finished_flags=jnp.take_along_axis(all_flags, best, axis=1),
        cache=cache)

  final = jax.lax.while_loop(cond, body, init)
  any_finished = final.finished_flags[:, :1]
  seqs = jnp.where(any_finished[..., None], final.finished_seqs, final.live_seqs)
  scores = jnp.where(any_finished, final.finished_scores,
                     final.live_log_probs / max_penalty)
  # Best first -> best last.
  return seqs[:, ::-1, 1:], scores[:, ::-1]

