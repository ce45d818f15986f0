"""StrategyQA with chain of thought, scored on the yes/no after "the answer is".

Files: eval/strategyqa/dev.json ([{"question", "answer": true|false, ...}]) and the
exemplars: eval/strategyqa/cot_prompt.txt if supplied, else the first 6 questions of
eval/strategyqa/train.json with their "facts" as the reasoning.
"""

import functools
import json
import os
from typing import Callable, Iterator

from moe_jax_tasks import sources
from moe_jax_tasks.evals import common
from moe_jax_tasks.evals import metrics
from moe_jax_tasks.evals import postprocessors

NUM_EXEMPLARS = 6


def _load(task: str, path: str) -> list:
  try:
    return json.loads(common.read_text(task, path, "Get StrategyQA from "
                                       "allenai/strategyqa or `prepare`."))
  except json.JSONDecodeError as e:
    raise sources.MalformedDataError(f"Task {task!r}: {path} is not JSON ({e}).")


def _yes_no(value: bool) -> str:
  return "yes" if value else "no"


def exemplar_prompt(task: str, directory: str) -> str:
  prompt_file = os.path.join(directory, "cot_prompt.txt")
  if common.optional_exists(prompt_file):
    return common.read_prompt_file(task, prompt_file, "")
  shots = []
  for item in _load(task, os.path.join(directory, "train.json"))[:NUM_EXEMPLARS]:
    reasoning = " ".join(item.get("facts") or [])
    shots.append(f"Q: {item['question']}\nA: {reasoning} So the answer is "
                 f"{_yes_no(item['answer'])}.")
  return "\n\n".join(shots)


def parse(task: str, path: str, malformed: sources.MalformedRecords, *,
          vocabulary) -> Iterator[dict]:
  exemplars = exemplar_prompt(task, os.path.dirname(path))
  for number, item in enumerate(_load(task, path), start=1):
    if not isinstance(item, dict) or not isinstance(item.get("answer"), bool):
      malformed.report(task, path, f"item {number}",
                       "needs 'question' and a boolean 'answer'")
      continue
    yield {"inputs": common.fit_exemplars([exemplars], f"Q: {item['question']}\nA:",
                                          "", "\n\n", vocabulary),
           "targets": _yes_no(item["answer"])}


def register(*, prefix: str = "", root: Callable[[], str] = common.eval_root,
             vocabulary=common.vocabulary_lib.FLAN_VOCABULARY) -> list[str]:
  """Registers `{prefix}strategyqa:cot` (split "validation")."""
  name = f"{prefix}strategyqa:cot"
  return [common.register(
      name, common.prompt_source(name, {"validation": "strategyqa/dev.json"},
                                 functools.partial(parse, vocabulary=vocabulary),
                                 root=root),
      postprocessors.yes_no, [metrics.accuracy], vocabulary)]
