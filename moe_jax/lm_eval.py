r"""lm-evaluation-harness adapter: any moe_jax model as the harness's `moe_jax` model.

  python -m moe_jax.lm_eval --model moe_jax \
      --model_args gin_file=OUT/model.gin,checkpoint=OUT --tasks mmlu,bbh --batch_size 32

`python -m moe_jax.lm_eval` is the harness's own `lm_eval` command line (every
flag and subcommand of the installed version) with this module imported, which
registers `moe_jax` (released harnesses up to 0.4.13 find models only in their
own registry or in modules already imported; the `lm_eval.models` entry point
serves harnesses with plugin discovery). In Python, import this module and call
`lm_eval.simple_evaluate(model="moe_jax", model_args={...}, tasks=[...])`, or
pass `MoeJaxLM(model=..., params=...)` as the model.

model_args (`--model_args k=v,k=v`, or JSON):
  gin_file          gin files defining MODEL, '+'-separated (or a list); e.g. a
                    `python -m moe_jax.convert` output's model.gin, or
                    gin/models/flan_switch_base.gin+my_vocabulary.gin
  checkpoint        a training MODEL_DIR (latest step), a step directory, or a
                    convert output (`moe_jax.checkpoints.find_checkpoint`)
  gin_bindings      ';'-separated bindings, e.g. "EVAL_EXPERT_CAPACITY_FACTOR=4.0"
  gin_search_paths  '+'-separated extra directories for gin files and includes
  vocabulary        overrides the model's vocabulary: 'byte', 'flan' (the Flan
                    registry's T5 SentencePiece, FLAN_VOCAB) or a SentencePiece
                    .model path (with `extra_ids`, default 0)
  batch_size        rows per call (default: the harness's --batch_size; 'auto' =
                    16); rounded up to a multiple of the mesh's batch shards
  max_length        encoder tokens; longer contexts keep their end (default 2048)
  max_decoder_length  longest continuation scored, and the rolling window (512)
  max_gen_toks      default generation length (256; requests may set their own)
  decoding          'greedy' (default: the harness asks for greedy decoding unless
                    do_sample) or 'model' (the gin's decode_fn and
                    default_decoder_params, e.g. beam search with `num_decodes`
                    beams, default 1)
  mesh_shape        e.g. "data=4;expert=2" (default: data over all devices)
  seed              PRNG seed of do_sample requests (default 0)

Conventions are those of the harness's Hugging Face seq2seq path on T5
(`--model hf` with an encoder-decoder), so scores compare:
  * loglikelihood: encoder = the context's tokens + EOS (a context's trailing
    whitespace moves to the continuation; an empty context is just EOS), decoder
    targets = the continuation's tokens, no EOS. `is_greedy`: every continuation
    token is the argmax of its logits.
  * loglikelihood_rolling: the text's tokens + EOS, scored as decoder targets in
    disjoint windows of `max_decoder_length` tokens, each token once; the
    encoder gets the harness's rolling context of the window, as its seq2seq
    path does (`lm_eval.utils.get_rolling_token_windows` with context_len=1,
    then `make_disjoint_window`): EOS for the first window, the one token before
    each full window, and for the last, partial window the earlier tokens that
    complete it to `max_decoder_length` + 1. The decoder restarts at every
    window, so these perplexities are mostly the decoder's over chunks of text.
  * generate_until: encoder = context + EOS; decoding stops at EOS or after
    `max_gen_toks` tokens; the text is cut before the first `until` string.
    `do_sample=True` samples (temperature, top_k, top_p).

Batching: requests are sorted by length, cut into batches of `batch_size` rows
(the last one padded), padded to power-of-two length buckets (at least 16) so
few shapes compile, and results are returned in request order. MoE layers
route with their eval capacity factor: with capacity-limited routing a token
may be dropped depending on its batch, as in t5x evaluation; bind a larger
EVAL_EXPERT_CAPACITY_FACTOR (or dropless dispatch) for batch-independent
scores.
"""

import copy
import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Checked first, so that the command line without the extra prints one line.
MISSING_HARNESS = ("the lm-evaluation-harness is not installed; install the extra: "
                   "pip install -e '.[lm-eval]' (or pip install 'lm-eval>=0.4.13,<0.5' "
                   "'torch==2.13.0')")
try:
  from lm_eval.api.model import LM  # pylint: disable=g-import-not-at-top
  from lm_eval.api.registry import register_model  # pylint: disable=g-import-not-at-top
  from lm_eval import utils as lm_eval_utils  # pylint: disable=g-import-not-at-top
except ImportError as error:
  if __name__ == "__main__":  # The command line: one line, exit status 2.
    print(f"python -m moe_jax.lm_eval: {MISSING_HARNESS}", file=sys.stderr)
    sys.exit(2)
  raise ImportError(MISSING_HARNESS) from error

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moe_jax import checkpoints
from moe_jax import config
from moe_jax import inputs
from moe_jax import partitioning
from moe_jax.models import decoding as decoding_lib
from moe_jax.training import evaluation
from moe_jax.training import trainer as trainer_lib

logger = logging.getLogger(__name__)

MODEL_NAME = "moe_jax"
DEFAULT_BATCH_SIZE = 16
# Padded lengths are powers of two from this one on (capped at the maximum).
MIN_BUCKET = 16
# Aliases of the generation length, in the harness's order of priority.
_MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# Harness settings that do not apply to a JAX model (devices come from the mesh).
_IGNORED_HARNESS_ARGS = ("device", "max_batch_size")


def split_arg(value: Any, separator: str) -> List[str]:
  """A model_args value as a list: a list as is, or a string split at `separator`."""
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [str(v).strip() for v in value if str(v).strip()]
  return [part.strip() for part in str(value).split(separator) if part.strip()]


def gin_files_arg(value: Any) -> List[str]:
  """`gin_file`: '+'-separated files (a path that itself exists is kept whole)."""
  if isinstance(value, str) and (os.path.isfile(value)
                                 or os.path.isfile(os.path.join(config.REPO_ROOT, value))):
    return [value]
  return split_arg(value, "+")


def mesh_shape_arg(value: Any) -> Optional[Dict[str, int]]:
  """`mesh_shape`: a dict, or 'data=4;expert=2' (',' also separates)."""
  if value is None or value == "":
    return None
  if isinstance(value, Mapping):
    return {str(k): int(v) for k, v in value.items()}
  return partitioning.parse_mesh_spec(str(value).replace(";", ","))


def length_bucket(length: int, cap: int) -> int:
  """The padded length for `length` tokens: a power of two >= MIN_BUCKET, at most `cap`."""
  bucket = MIN_BUCKET
  while bucket < length:
    bucket *= 2
  return max(min(bucket, cap), length)


def load_vocabulary(spec: str, extra_ids: int = 0) -> Any:
  """A seqio vocabulary from `vocabulary=`: 'byte', 'flan', or a SentencePiece path."""
  import seqio  # pylint: disable=g-import-not-at-top
  if spec == "byte":
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  if spec == "flan":
    from moe_jax_tasks import vocabulary  # pylint: disable=g-import-not-at-top
    return vocabulary.vocabulary()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"vocabulary={spec!r}: expected 'byte', 'flan' or the path of a "
                            "SentencePiece model file.")
  return seqio.SentencePieceVocabulary(spec, extra_ids=extra_ids)


def token_scores_and_greedy(model: Any, params: Any, batch: Mapping[str, jax.Array]
                            ) -> Tuple[jax.Array, jax.Array]:
  """Per-token target log-probabilities and whether each target is the argmax.

  The scores are `model.score_batch`'s `token_scores` (log-softmax of the
  logits at the target, times `decoder_loss_weights`), from one forward pass
  that also yields the argmax.

  Returns:
    `(token_scores <float32>[batch, length], greedy <bool>[batch, length])`;
    `greedy` is True where the weight is 0.
  """
  logits = model.compute_logits(params, batch)
  targets = batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  token_scores = token_scores * weights.astype(jnp.float32)
  greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
  return token_scores, greedy


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """One generate_until request's decoding, normalized (requests batch by it)."""

  until: Tuple[str, ...]
  max_gen_toks: int
  temperature: float = 0.0  # 0 = greedy.
  top_k: int = 0
  top_p: float = 0.0

  @property
  def sample(self) -> bool:
    return self.temperature > 0


def generation_settings(gen_kwargs: Mapping[str, Any], default_max_gen_toks: int,
                        warned: Optional[set] = None) -> GenerationSettings:
  """Normalizes the harness's generation kwargs (until, max_gen_toks, do_sample, ...).

  `until` may be a string or a list; the length may be given as `max_gen_toks`
  or its aliases; `do_sample` defaults to `temperature > 0`, and sampling
  without a temperature uses 1.0. Other keys are ignored with a warning.
  """
  kwargs = dict(gen_kwargs or {})
  until = kwargs.pop("until", None)
  if until is None:
    until = []
  elif isinstance(until, str):
    until = [until]
  elif not isinstance(until, (list, tuple)):
    raise ValueError(f"generate_until: 'until' must be a string or a list, got {until!r}.")
  lengths = [kwargs.pop(k) for k in _MAX_TOKENS_KEYS if k in kwargs]
  lengths = [v for v in lengths if v is not None]
  max_gen_toks = int(lengths[0]) if lengths else int(default_max_gen_toks)
  if max_gen_toks < 1:
    raise ValueError(f"generate_until: max_gen_toks must be >= 1, got {max_gen_toks}.")
  do_sample = kwargs.pop("do_sample", None)
  temperature = kwargs.pop("temperature", None)
  temperature = None if temperature is None else float(temperature)
  if do_sample is None:
    do_sample = bool(temperature)
  if not do_sample:
    temperature = 0.0
  elif temperature is None:
    temperature = 1.0
  top_k = int(kwargs.pop("top_k", 0) or 0) if do_sample else 0
  top_p = float(kwargs.pop("top_p", 0.0) or 0.0) if do_sample else 0.0
  kwargs.pop("top_k", None)
  kwargs.pop("top_p", None)
  if top_p >= 1.0:
    top_p = 0.0
  ignored = sorted(set(kwargs) - (warned if warned is not None else set()))
  if ignored:
    logger.warning("moe_jax: ignoring generation kwargs %s (supported: until, max_gen_toks, "
                   "do_sample, temperature, top_k, top_p).", ignored)
    if warned is not None:
      warned.update(ignored)
  return GenerationSettings(until=tuple(s for s in until if s), max_gen_toks=max_gen_toks,
                            temperature=float(temperature), top_k=top_k, top_p=top_p)


def cut_at_stop(text: str, until: Iterable[str]) -> str:
  """`text` up to the first occurrence of any non-empty `until` string."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def _batches(order: Sequence[int], batch_size: int) -> Iterable[List[int]]:
  for start in range(0, len(order), batch_size):
    yield list(order[start:start + batch_size])


class MoeJaxLM(LM):
  """A moe_jax `EncoderDecoderModel` behind the harness's `LM` interface.

  Build it from model_args (see the module docstring) or, in Python, from a
  model and its parameters: `MoeJaxLM(model=model, params=params, ...)`.
  """

  def __init__(self, gin_file: Any = None, checkpoint: Optional[str] = None,
               gin_bindings: Any = None, gin_search_paths: Any = None,
               vocabulary: Optional[str] = None, extra_ids: int = 0,
               batch_size: Any = None, max_length: int = 2048,
               max_decoder_length: int = 512, max_gen_toks: int = 256,
               decoding: str = "greedy", num_decodes: int = 1, mesh_shape: Any = None,
               seed: int = 0,
               model: Any = None, params: Any = None, **harness_args: Any):
    super().__init__()
    unknown = sorted(set(harness_args) - set(_IGNORED_HARNESS_ARGS))
    if unknown:
      raise ValueError(
          f"moe_jax: unknown model_args {unknown}; use gin_file, checkpoint, gin_bindings, "
          "gin_search_paths, vocabulary, extra_ids, batch_size, max_length, "
          "max_decoder_length, max_gen_toks, decoding, num_decodes, mesh_shape, seed.")
    if decoding not in ("greedy", "model"):
      raise ValueError(f"moe_jax: decoding must be 'greedy' or 'model', got {decoding!r}.")
    for name, value in (("max_length", max_length), ("max_decoder_length", max_decoder_length),
                        ("max_gen_toks", max_gen_toks)):
      if int(value) < 1:
        raise ValueError(f"moe_jax: {name} must be >= 1, got {value}.")

    if model is None:
      files = gin_files_arg(gin_file)
      if not files:
        raise ValueError("moe_jax: model_args need gin_file (the model's gin files, "
                         "'+'-separated) and checkpoint.")
      if not checkpoint:
        raise ValueError("moe_jax: model_args need checkpoint (a training MODEL_DIR, a step "
                         "directory or a `python -m moe_jax.convert` output).")
      model = config.load_model(files, split_arg(gin_bindings, ";"),
                                split_arg(gin_search_paths, "+"))
    elif params is None:
      raise ValueError("moe_jax: MoeJaxLM(model=...) needs params=.")
    if vocabulary:
      vocab = load_vocabulary(str(vocabulary), int(extra_ids))
      model.input_vocabulary = model.output_vocabulary = vocab
    if model.input_vocabulary is None or model.output_vocabulary is None:
      raise ValueError(
          "moe_jax: the model has no vocabulary, and the harness exchanges text. Bind one in "
          "gin (model.EncoderDecoderModel.input_vocabulary / output_vocabulary, e.g. "
          "`VOCABULARY = @seqio.SentencePieceVocabulary()` as a convert output's model.gin "
          "does) or pass vocabulary=byte|flan|/path/to/spiece.model in model_args.")
    self.model = model
    self.input_vocabulary = model.input_vocabulary
    self.output_vocabulary = model.output_vocabulary
    self.eos_id = int(model.eos_id)
    self.input_eos_id = int(getattr(model.input_vocabulary, "eos_id", None) or self.eos_id)
    self._max_length = int(max_length)
    self._max_decoder_length = int(max_decoder_length)
    self._max_gen_toks = int(max_gen_toks)
    self.decoding = decoding
    self.num_decodes = int(num_decodes)
    if self.num_decodes < 1:
      raise ValueError(f"moe_jax: num_decodes must be >= 1, got {num_decodes}.")
    self.seed = int(seed)
    self._sample_calls = 0
    self._warned: set = set()

    self.mesh = self._make_mesh(mesh_shape_arg(mesh_shape))
    shards = self.mesh.shape["data"] * self.mesh.shape["expert"]
    rows = self._batch_size_arg(batch_size)
    self._batch_size = -(-rows // shards) * shards
    if self._batch_size != rows:
      logger.info("moe_jax: batch_size %d rounded up to %d, a multiple of the mesh's %d batch "
                  "shards.", rows, self._batch_size, shards)
    shapes = {"encoder_input_tokens": (self._batch_size, MIN_BUCKET),
              "decoder_input_tokens": (self._batch_size, MIN_BUCKET)}
    self.placement = trainer_lib.Placement(
        model, self.mesh, partitioning.standard_logical_axis_rules(), shapes)
    if params is None:
      params = evaluation.load_params(self.placement, checkpoint)
    else:
      checkpoints.check_params_match_model(params, self.placement.abstract_params)
      params = jax.device_put(params, self.placement.param_shardings)
    self.params = params
    self._score_fn = jax.jit(functools.partial(token_scores_and_greedy, model))
    self._decode_fns: Dict[Any, Any] = {}

  # ---------------------------------------------------------------------------
  # Construction from the harness.
  # ---------------------------------------------------------------------------

  @classmethod
  def create_from_arg_obj(cls, arg_dict: Mapping[str, Any],
                          additional_config: Optional[Mapping[str, Any]] = None) -> "MoeJaxLM":
    """As the harness's, except that model_args win over its `--batch_size` etc."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**dict(arg_dict), **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: Optional[Mapping[str, Any]] = None
                             ) -> "MoeJaxLM":
    """`'gin_file=a.gin+b.gin,checkpoint=DIR,batch_size=8'` (the harness's parser)."""
    return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @staticmethod
  def _batch_size_arg(value: Any) -> int:
    if value is None or (isinstance(value, str) and value.strip().lower().startswith("auto")):
      if value is not None:
        logger.info("moe_jax: batch_size=%s: no automatic search; using %d.", value,
                    DEFAULT_BATCH_SIZE)
      return DEFAULT_BATCH_SIZE
    rows = int(value)
    if rows < 1:
      raise ValueError(f"moe_jax: batch_size must be >= 1, got {value}.")
    return rows

  @staticmethod
  def _make_mesh(shape: Optional[Dict[str, int]]) -> jax.sharding.Mesh:
    devices = jax.devices()
    if shape and "data" in shape and -1 not in shape.values():
      needed = math.prod(shape.values())
      if needed <= len(devices):  # A fixed shape may use the first devices only.
        devices = devices[:needed]
    return partitioning.mesh_from_shape(shape or {"data": -1}, devices=devices)

  # ---------------------------------------------------------------------------
  # Properties the harness (and callers) read.
  # ---------------------------------------------------------------------------

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_decoder_length(self) -> int:
    return self._max_decoder_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def eot_token_id(self) -> int:
    return self.eos_id

  # ---------------------------------------------------------------------------
  # Tokenization.
  # ---------------------------------------------------------------------------

  def tok_encode(self, text: str) -> List[int]:
    """Output-vocabulary token ids of `text`, no EOS."""
    return [int(t) for t in self.output_vocabulary.encode(text)]

  def tok_decode(self, ids: Sequence[int]) -> str:
    """Text of output token ids, up to the first EOS."""
    return self.output_vocabulary.decode([int(t) for t in ids])

  def encoder_tokens(self, context: str) -> List[int]:
    """The context's input-vocabulary ids + EOS, keeping the last `max_length`."""
    ids = [int(t) for t in self.input_vocabulary.encode(context)] + [self.input_eos_id]
    return ids[-self._max_length:]

  def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(encoder ids, decoder target ids) of a loglikelihood request.

    As the harness's seq2seq path: the context's trailing whitespace moves to
    the continuation; the two are tokenized separately; only the context gets
    EOS (an empty context is just EOS).
    """
    stripped = context.rstrip()
    if stripped != context:
      continuation = context[len(stripped):] + continuation
      context = stripped
    return self.encoder_tokens(context), self.tok_encode(continuation)

  # ---------------------------------------------------------------------------
  # Device calls.
  # ---------------------------------------------------------------------------

  def _call(self, fn, batch: Mapping[str, np.ndarray], *args) -> Any:
    with self.placement.context():
      arrays = inputs.to_global_arrays(dict(batch), self.mesh, whole_batch=True)
      out = fn(self.params, arrays, *args)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        out)

  def score_tokens(self, requests: Sequence[Tuple[Sequence[int], Sequence[int]]],
                   disable_tqdm: bool = True, desc: str = "moe_jax loglikelihood"
                   ) -> List[Tuple[float, bool]]:
    """`(sum of log p(target), is_greedy)` per `(encoder ids, target ids)`, in order.

    Requests are sorted by length, batched `batch_size` rows at a time (the
    last batch padded with empty rows) at power-of-two length buckets.
    """
    # Encoder inputs keep their last max_length tokens (contexts already do).
    requests = [(list(enc)[-self._max_length:], list(dec)) for enc, dec in requests]
    results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
    todo = []
    for index, (enc, dec) in enumerate(requests):
      if not dec:
        results[index] = (0.0, True)
        continue
      if not enc:
        raise ValueError("moe_jax: empty encoder input (contexts always carry EOS).")
      if len(dec) > self._max_decoder_length:
        raise ValueError(
            f"moe_jax: a continuation of {len(dec)} tokens exceeds max_decoder_length="
            f"{self._max_decoder_length}; raise it in model_args.")
      todo.append(index)
    todo.sort(key=lambda i: (-len(requests[i][0]), -len(requests[i][1]), i))
    batches = list(_batches(todo, self._batch_size))
    for rows in tqdm(batches, desc=desc, disable=disable_tqdm):
      enc_len = length_bucket(max(len(requests[i][0]) for i in rows), self._max_length)
      dec_len = length_bucket(max(len(requests[i][1]) for i in rows), self._max_decoder_length)
      batch = {
          "encoder_input_tokens": np.zeros((self._batch_size, enc_len), np.int32),
          "decoder_input_tokens": np.zeros((self._batch_size, dec_len), np.int32),
          "decoder_target_tokens": np.zeros((self._batch_size, dec_len), np.int32),
          "decoder_loss_weights": np.zeros((self._batch_size, dec_len), np.int32),
      }
      for row, index in enumerate(rows):
        enc, dec = requests[index]
        batch["encoder_input_tokens"][row, :len(enc)] = enc
        batch["decoder_target_tokens"][row, :len(dec)] = dec
        batch["decoder_input_tokens"][row, 1:len(dec)] = dec[:-1]  # BOS 0 first.
        batch["decoder_loss_weights"][row, :len(dec)] = 1
      token_scores, greedy = self._call(self._score_fn, batch)
      for row, index in enumerate(rows):
        length = len(requests[index][1])
        results[index] = (float(np.sum(token_scores[row, :length], dtype=np.float64)),
                          bool(np.all(greedy[row, :length])))
    return results  # type: ignore[return-value]

  def _decode_fn(self, settings: GenerationSettings):
    """The jit-compiled `predict_batch_with_aux` for these decoding settings."""
    key = (settings.temperature, settings.top_k, settings.top_p)
    if key not in self._decode_fns:
      model = copy.copy(self.model)
      decoder_params = None
      num_decodes = 1
      if settings.sample:
        model.decode_fn = decoding_lib.temperature_sample
        model.default_decoder_params = {}
        decoder_params = {"temperature": settings.temperature, "topk": settings.top_k,
                          "topp": settings.top_p}
      elif self.decoding == "greedy":
        model.decode_fn = decoding_lib.greedy
        model.default_decoder_params = {}
      else:
        num_decodes = self.num_decodes

      def predict(params, batch, rng):
        return model.predict_batch_with_aux(params, batch, rng=rng,
                                            decoder_params=decoder_params,
                                            num_decodes=num_decodes)[0]

      self._decode_fns[key] = jax.jit(predict)
    return self._decode_fns[key]

  def generate_tokens(self, contexts: Sequence[Sequence[int]], settings: GenerationSettings,
                      disable_tqdm: bool = True) -> List[List[int]]:
    """Decoded ids (EOS and after removed, at most `max_gen_toks`) per encoder input."""
    results: List[List[int]] = [[] for _ in contexts]
    order = sorted(range(len(contexts)), key=lambda i: (-len(contexts[i]), i))
    predict = self._decode_fn(settings)
    for rows in tqdm(list(_batches(order, self._batch_size)), desc="moe_jax generate_until",
                     disable=disable_tqdm):
      enc_len = length_bucket(max(len(contexts[i]) for i in rows), self._max_length)
      encoder = np.zeros((self._batch_size, enc_len), np.int32)
      for row in range(self._batch_size):
        # Padding rows repeat the first request, so that they end when it does.
        ids = contexts[rows[row] if row < len(rows) else rows[0]]
        encoder[row, :len(ids)] = ids
      batch = {"encoder_input_tokens": encoder,
               "decoder_input_tokens": np.zeros((self._batch_size, settings.max_gen_toks),
                                                np.int32)}
      rng = None
      if settings.sample:
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._sample_calls)
        self._sample_calls += 1
      decodes = self._call(predict, batch, rng)
      for row, index in enumerate(rows):
        ids = [int(t) for t in decodes[row, :settings.max_gen_toks]]
        if self.eos_id in ids:
          ids = ids[:ids.index(self.eos_id)]
        results[index] = ids
    return results

  # ---------------------------------------------------------------------------
  # The harness's requests.
  # ---------------------------------------------------------------------------

  def loglikelihood(self, requests: List[Any], disable_tqdm: bool = False
                    ) -> List[Tuple[float, bool]]:
    """`(log p(continuation | context), is_greedy)` per `(context, continuation)` request."""
    pairs = [self.encode_pair(*request.args) for request in requests]
    results = self.score_tokens(pairs, disable_tqdm=disable_tqdm)
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request.args, result)
    return results

  def rolling_windows(self, text: str) -> List[Tuple[List[int], List[int]]]:
    """`(encoder ids, target ids)` windows covering `text`'s tokens + EOS once each."""
    tokens = self.tok_encode(text) + [self.eos_id]
    return [lm_eval_utils.make_disjoint_window(window)
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.eos_id,
                max_seq_len=self._max_decoder_length, context_len=1)]

  def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False
                            ) -> List[float]:
    """Log-likelihood of each `(text,)` request's tokens + EOS (see the module docstring)."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      for window in self.rolling_windows(request.args[0]):
        windows.append(window)
        owners.append(index)
    scores = self.score_tokens(windows, disable_tqdm=disable_tqdm,
                               desc="moe_jax loglikelihood_rolling")
    totals = [0.0] * len(requests)
    for owner, (score, _) in zip(owners, scores):
      totals[owner] += score
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
    """Greedy (or sampled, with do_sample) continuations of `(context, gen_kwargs)` requests."""
    results: List[Optional[str]] = [None] * len(requests)
    groups: Dict[GenerationSettings, List[int]] = {}
    for index, request in enumerate(requests):
      _, gen_kwargs = request.args
      settings = generation_settings(gen_kwargs, self._max_gen_toks, self._warned)
      groups.setdefault(settings, []).append(index)
    for settings, indices in groups.items():
      contexts = [self.encoder_tokens(requests[i].args[0]) for i in indices]
      decodes = self.generate_tokens(contexts, settings, disable_tqdm=disable_tqdm)
      for index, ids in zip(indices, decodes):
        text = cut_at_stop(self.tok_decode(ids), settings.until)
        results[index] = text
        self.cache_hook.add_partial("generate_until", requests[index].args, text)
    return results  # type: ignore[return-value]

  def get_model_info(self) -> Dict[str, Any]:
    """What the harness records about the model in its results."""
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    return {"model_num_parameters": count, "moe_jax_batch_size": self._batch_size,
            "moe_jax_max_length": self._max_length,
            "moe_jax_max_decoder_length": self._max_decoder_length}


# Registered by the importable module only: `python -m moe_jax.lm_eval` runs this
# file as __main__, which imports the module and registers its class once.
if __name__ != "__main__":
  register_model(MODEL_NAME)(MoeJaxLM)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The harness's `lm_eval` command line with `--model moe_jax` registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  from moe_jax import lm_eval as _registered  # pylint: disable=g-import-not-at-top
  _registered.main()
