"""BIG-Bench Hard (27 subtasks): 3-shot direct and 3-shot CoT, exact match.

Files (suzgunmirac/BIG-Bench-Hard layout):
  eval/bbh/<subtask>.json              {"examples": [{"input", "target"}, ...]}
  eval/bbh/cot-prompts/<subtask>.txt   task description + three "Q: ...\nA: ..."
                                       CoT exemplars ending "So the answer is X."
The direct prompt is derived from the same file: each exemplar's answer is cut to
the text after "the answer is".
"""

import functools
import json
import os
import re
from typing import Callable, Iterator

import seqio

from moe_jax_tasks import sources
from moe_jax_tasks.evals import common
from moe_jax_tasks.evals import metrics
from moe_jax_tasks.evals import postprocessors

COT_QUERY_SUFFIX = "A: Let's think step by step."


def split_prompt(text: str) -> tuple[str, list[tuple[str, str]]]:
  """(description, [(question, answer), ...]) of a BBH CoT prompt file."""
  blocks = re.split(r"\n\s*\n(?=Q: )", "\n" + text.strip() + "\n")
  description = "" if blocks[0].lstrip().startswith("Q: ") else blocks.pop(0).strip()
  exemplars = []
  for block in blocks:
    question, sep, answer = block.strip().partition("\nA: ")
    if not sep:
      raise sources.MalformedDataError(
          f"BBH prompt block without an 'A: ' line: {block[:80]!r}")
    exemplars.append((question[len("Q: "):].strip(), answer.strip()))
  return description, exemplars


def _examples(task: str, path: str) -> list[dict]:
  text = common.read_text(task, path, "Get bbh/<subtask>.json from BIG-Bench-Hard.")
  try:
    examples = json.loads(text)["examples"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise sources.MalformedDataError(
        f"Task {task!r}: {path} is not a BBH file with an 'examples' list ({e}).")
  return examples


def parse(task: str, path: str, malformed: sources.MalformedRecords, *,
          subtask: str, cot: bool, vocabulary: seqio.Vocabulary) -> Iterator[dict]:
  prompt_path = os.path.join(os.path.dirname(path), "cot-prompts", f"{subtask}.txt")
  description, exemplars = split_prompt(common.read_prompt_file(
      task, prompt_path, "Get cot-prompts/<subtask>.txt from BIG-Bench-Hard."))
  if cot:
    shots = [f"Q: {q}\nA: {a}" for q, a in exemplars]
  else:
    shots = [f"Q: {q}\nA: {postprocessors.after_answer_marker(a)}"
             for q, a in exemplars]
  header = description + "\n\n" if description else ""
  for number, example in enumerate(_examples(task, path), start=1):
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
      malformed.report(task, path, f"example {number}", "needs 'input', 'target'")
      continue
    query = f"Q: {example['input']}\n" + (COT_QUERY_SUFFIX if cot else "A:")
    yield {"inputs": common.fit_exemplars(shots, query, header, "\n\n", vocabulary),
           "targets": str(example["target"])}


def register(subtasks, *, prefix: str = "", root: Callable[[], str] = common.eval_root,
             vocabulary=common.vocabulary_lib.FLAN_VOCABULARY) -> dict[str, list]:
  """Registers `{prefix}bbh:<subtask>:3shot_direct` / `:3shot_cot` tasks."""
  names = {"direct": [], "cot": []}
  for subtask in subtasks:
    for style, cot in (("direct", False), ("cot", True)):
      name = f"{prefix}bbh:{subtask}:3shot_{style}"
      names[style].append(common.register(
          name, common.prompt_source(
              name, {"test": f"bbh/{subtask}.json"},
              functools.partial(parse, subtask=subtask, cot=cot,
                                vocabulary=vocabulary), root=root),
          postprocessors.bbh_answer, [metrics.exact_match], vocabulary))
  return names
