"""Metrics of the held-out suite, and the paper's normalized average."""

import collections
import re
import string
from typing import Mapping, Sequence


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Percentage of exact matches (after the task's postprocessor)."""
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}


def exact_match(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Percentage of predictions equal to the target (BBH)."""
  return {"exact_match": accuracy(targets, predictions)["accuracy"]}


def rank_classification_accuracy(targets: Sequence[tuple[int, bool]],
                                 scores: Sequence[float]) -> dict[str, float]:
  """Accuracy of choosing, per question, the highest-scoring option.

  Args:
    targets: (question id, is_correct) per scored option.
    scores: the model's log-likelihood of each option.

  Returns:
    {"accuracy": percentage of questions whose best option is correct}.
  """
  best = {}
  for (question, correct), score in zip(targets, scores):
    if question not in best or score > best[question][0]:
      best[question] = (score, correct)
  if not best:
    return {"accuracy": 0.0}
  return {"accuracy": 100.0 * sum(c for _, c in best.values()) / len(best)}


def _normalize_answer(text: str) -> str:
  """SQuAD normalization: lowercase, no punctuation, no articles, single spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _f1(gold: str, prediction: str) -> float:
  gold_tokens = _normalize_answer(gold).split()
  predicted = _normalize_answer(prediction).split()
  common = collections.Counter(gold_tokens) & collections.Counter(predicted)
  overlap = sum(common.values())
  if not gold_tokens or not predicted:
    return float(gold_tokens == predicted)
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(predicted), overlap / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]],
          predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD-style exact match and F1, best over each example's gold answers."""
  if not targets:
    return {"em": 0.0, "f1": 0.0}
  em = f1 = 0.0
  for golds, prediction in zip(targets, predictions):
    em += max(float(_normalize_answer(g) == _normalize_answer(prediction))
              for g in golds)
    f1 += max(_f1(g, prediction) for g in golds)
  return {"em": 100.0 * em / len(targets), "f1": 100.0 * f1 / len(targets)}


# Chance level of each headline score, in percent: four-way choice for MMLU; the
# other benchmarks are generative and are treated as 0 unless the caller says so.
RANDOM_BASELINES = {"mmlu_direct": 25.0, "mmlu_cot": 25.0, "bbh_direct": 0.0,
                    "bbh_cot": 0.0, "tydiqa_direct": 0.0, "mgsm_cot": 0.0}


def normalized_average(scores: Mapping[str, float],
                       baselines: Mapping[str, float] = RANDOM_BASELINES) -> float:
  """Macro-average of scores rescaled so chance is 0 and perfect is 100.

  The Flan-PaLM paper's "normalized average" averages MMLU-Direct, MMLU-CoT,
  BBH-Direct, BBH-CoT, TyDiQA-Direct and MGSM-CoT this way.

  Args:
    scores: benchmark -> score in percent; keys must be in `baselines`.
    baselines: benchmark -> chance score in percent.

  Raises:
    KeyError: naming a benchmark that has no baseline.
  """
  if not scores:
    raise ValueError("normalized_average needs at least one score.")
  total = 0.0
  for name, score in scores.items():
    if name not in baselines:
      raise KeyError(f"No chance baseline for {name!r}; known: {sorted(baselines)}")
    chance = baselines[name]
    total += 100.0 * (score - chance) / (100.0 - chance)
  return total / len(scores)
