"""MMLU (57 subjects): 5-shot direct by rank classification, and 5-shot CoT.

Files (hendrycks/test layout, CSV rows `question,A,B,C,D,answer`, no header):
  eval/mmlu/dev/<subject>_dev.csv     the exemplars (first 5 rows)
  eval/mmlu/val/<subject>_val.csv     split "validation" (the paper's MMLU numbers)
  eval/mmlu/test/<subject>_test.csv   split "test"
  eval/mmlu/cot_prompts/<subject>.txt CoT exemplars, supplied by the user (e.g. the
                                      Flan CoT prompts), prepended verbatim
Direct prompts end in "Answer:"; the task yields one row per option (targets A-D)
and is scored by the model's log-likelihood of each letter. CoT prompts end in
"A: Let's think step by step."; the letter after "the answer is" is compared.
"""

import csv
import functools
import io
import os
from typing import Callable, Iterator

import gin
import seqio
import tensorflow as tf

from moe_jax_tasks import sources
from moe_jax_tasks.evals import common
from moe_jax_tasks.evals import metrics
from moe_jax_tasks.evals import postprocessors

LETTERS = "ABCD"
SPLIT_FILES = {"validation": ("val", "val"), "test": ("test", "test")}
COT_QUERY_SUFFIX = "A: Let's think step by step."
ROW_SIGNATURE = {**common.PROMPT_SIGNATURE, "idx": tf.TensorSpec((), tf.int64),
                 "is_correct": tf.TensorSpec((), tf.bool)}


@gin.configurable
def mmlu_header(subject: str,
                pattern: str = "Multiple choice questions about {subject}, with "
                "their answers.\n\n") -> str:
  """The line opening every MMLU prompt (bind `pattern` to change the wording)."""
  return pattern.format(subject=subject.replace("_", " "))


def read_rows(task: str, path: str, malformed: sources.MalformedRecords
              ) -> list[tuple[str, list[str], str]]:
  """(question, four choices, answer letter) rows of an MMLU CSV file."""
  text = common.read_text(task, path, "Get the MMLU CSVs (hendrycks/test data/) or "
                          "run `python -m moe_jax_tasks prepare`.")
  rows = []
  for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
    if len(row) != 6 or row[5].strip() not in LETTERS:
      malformed.report(task, path, f"row {number}",
                       "expected question,A,B,C,D,answer with answer in A-D")
      continue
    rows.append((row[0].strip(), [c.strip() for c in row[1:5]], row[5].strip()))
  return rows


def _direct_block(question, choices, answer=None):
  lines = [question] + [f"{l}. {c}" for l, c in zip(LETTERS, choices)]
  return "\n".join(lines) + ("\nAnswer:" if answer is None else f"\nAnswer: {answer}")


def _cot_query(question, choices):
  options = " ".join(f"({l}) {c}" for l, c in zip(LETTERS, choices))
  return f"Q: {question}\n{options}\n{COT_QUERY_SUFFIX}"


def _dev_path(path: str, subject: str) -> str:
  return os.path.join(os.path.dirname(os.path.dirname(path)), "dev",
                      f"{subject}_dev.csv")


def parse_direct(task: str, path: str, malformed: sources.MalformedRecords, *,
                 subject: str, vocabulary: seqio.Vocabulary,
                 shots: int = 5) -> Iterator[dict]:
  exemplars = [_direct_block(q, c, a) for q, c, a in read_rows(
      task, _dev_path(path, subject), malformed)[:shots]]
  for index, (question, choices, answer) in enumerate(read_rows(task, path,
                                                                malformed)):
    prompt = common.fit_exemplars(exemplars, _direct_block(question, choices),
                                  mmlu_header(subject), "\n\n", vocabulary)
    for letter in LETTERS:
      yield {"inputs": prompt, "targets": letter, "idx": index,
             "is_correct": letter == answer}


def parse_cot(task: str, path: str, malformed: sources.MalformedRecords, *,
              subject: str, vocabulary: seqio.Vocabulary) -> Iterator[dict]:
  prompt_path = os.path.join(os.path.dirname(os.path.dirname(path)), "cot_prompts",
                             f"{subject}.txt")
  exemplars = common.read_prompt_file(
      task, prompt_path, "Supply the 5 CoT exemplars of this subject as a text "
      "file (format: 'Q: ...\\n(A) ... (D) ...\\nA: Let's think step by step. ... "
      "The answer is (X).' blocks).")
  for question, choices, answer in read_rows(task, path, malformed):
    prompt = common.fit_exemplars([exemplars], _cot_query(question, choices),
                                  mmlu_header(subject), "\n\n", vocabulary)
    yield {"inputs": prompt, "targets": answer}


def register(subjects, *, prefix: str = "", root: Callable[[], str] = common.eval_root,
             vocabulary=common.vocabulary_lib.FLAN_VOCABULARY) -> dict[str, list]:
  """Registers `{prefix}mmlu:<subject>:5shot_direct` / `:5shot_cot` tasks."""
  names = {"direct": [], "cot": []}
  for subject in subjects:
    files = {split: f"mmlu/{folder}/{subject}_{stem}.csv"
             for split, (folder, stem) in SPLIT_FILES.items()}
    direct = f"{prefix}mmlu:{subject}:5shot_direct"
    names["direct"].append(common.register(
        direct, common.prompt_source(
            direct, files, functools.partial(parse_direct, subject=subject,
                                             vocabulary=vocabulary),
            root=root, signature=ROW_SIGNATURE),
        postprocessors.rank_classification,
        [metrics.rank_classification_accuracy], vocabulary))
    cot = f"{prefix}mmlu:{subject}:5shot_cot"
    names["cot"].append(common.register(
        cot, common.prompt_source(
            cot, files, functools.partial(parse_cot, subject=subject,
                                          vocabulary=vocabulary), root=root),
        postprocessors.choice_letter, [metrics.accuracy], vocabulary))
  return names
