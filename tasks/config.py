"""Run-time settings of the registry: data root, vocabulary, lengths, caps and rates.

Every setting is read when a dataset is built, never at import, so a gin binding or an
environment variable set after `import moe_jax_tasks` still takes effect. Each function
is `gin.configurable`; environment variables are the fallback for users without gin.
"""

import os
from typing import Optional

import gin

from moe_jax_tasks import errors

DEFAULT_VOCAB = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
DEFAULT_VOCAB_EXTRA_IDS = 100

# The collection's sequence lengths and few-shot budget (inputs are pruned to fit).
SEQUENCE_LENGTH = {"inputs": 2048, "targets": 512}
FEW_SHOT_MAX_INPUT_TOKENS = 1920


@gin.configurable
def data_dir(path: Optional[str] = None) -> str:
  """The data root (local path or gs:// URL) holding niv2/, cot/, p3/, tfds/, eval/.

  Args:
    path: overrides the `FLAN_DATA_DIR` environment variable.

  Returns:
    The data root, without a trailing slash.

  Raises:
    errors.UsageError: (a ValueError) when neither the binding nor the environment
      variable is set.
  """
  path = path or os.environ.get("FLAN_DATA_DIR")
  if not path:
    raise errors.UsageError(
        "No Flan data root is configured. Set the environment variable "
        "FLAN_DATA_DIR=/path/or/gs://bucket/path, or bind "
        "`moe_jax_tasks.config.data_dir.path` in gin. Build a data root with "
        "`python -m moe_jax_tasks prepare --out DIR`."
    )
  return path.rstrip("/")


@gin.configurable
def vocabulary_spec(path: Optional[str] = None,
                    extra_ids: Optional[int] = None) -> tuple[str, int]:
  """The SentencePiece model (path, extra ids) every training and eval task uses.

  Args:
    path: model path (gs:// allowed); defaults to `FLAN_VOCAB`, then T5's 32k model.
    extra_ids: sentinel ids appended to the vocabulary; defaults to
      `FLAN_VOCAB_EXTRA_IDS`, then 100 for T5's model and 0 for any other model.

  Returns:
    (path, extra_ids).
  """
  path = path or os.environ.get("FLAN_VOCAB") or DEFAULT_VOCAB
  if extra_ids is None:
    env = os.environ.get("FLAN_VOCAB_EXTRA_IDS")
    if env is not None:
      extra_ids = int(env)
    else:
      extra_ids = DEFAULT_VOCAB_EXTRA_IDS if path == DEFAULT_VOCAB else 0
  return path, extra_ids


@gin.configurable
def skip_malformed(enabled: Optional[bool] = None) -> bool:
  """Whether malformed JSON/TSV records are skipped (and counted) instead of raising.

  Args:
    enabled: overrides the `FLAN_SKIP_MALFORMED` environment variable ("1" = skip).
  """
  if enabled is None:
    enabled = os.environ.get("FLAN_SKIP_MALFORMED", "0") not in ("", "0", "false")
  return bool(enabled)


@gin.configurable
def mixture_caps(flan2021: int = 30_000,
                 t0: int = 20_000,
                 niv2: int = 5_000,
                 cot: int = 100_000,
                 dialog: int = 200_000) -> dict[str, int]:
  """Per-task example caps of examples-proportional mixing, per sub-mixture.

  The input-inversion sub-mixtures of CoT and dialog reuse the CoT and dialog caps.
  """
  return {"flan2021": flan2021, "t0": t0, "niv2": niv2, "cot": cot,
          "dialog": dialog}


@gin.configurable
def flan2022_rates(flan2021: float = 0.4,
                   t0: float = 0.32,
                   niv2: float = 0.2,
                   cot: float = 0.05,
                   dialog: float = 0.03) -> dict[str, float]:
  """Top-level weights of the sub-mixtures inside `flan2022_submix`."""
  return {"flan2021": flan2021, "t0": t0, "niv2": niv2, "cot": cot,
          "dialog": dialog}


@gin.configurable
def input_inversion_rate(rate: float = 0.3) -> float:
  """Weight of the CoT / dialog input-inversion sub-mixture against the base (1.0)."""
  return rate


@gin.configurable
def format_rates(zero_shot: float = 0.5, with_options: float = 0.5) -> dict[str, float]:
  """How a sub-mixture splits between its format sub-mixtures.

  Args:
    zero_shot: share of zero-shot against few-shot.
    with_options: share of the options formats, for sources that have both
      (Flan 2021 and T0 are mixed 25% each over zs/fs x opt/noopt by default).

  Returns:
    A dict of the two shares.
  """
  return {"zero_shot": zero_shot, "with_options": with_options}
