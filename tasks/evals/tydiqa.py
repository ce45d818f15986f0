"""TyDiQA GoldP, 1-shot direct, SQuAD-style exact match and F1 per language.

Files (SQuAD format, question ids prefixed by the language name, e.g.
"arabic-..."): eval/tydiqa/tydiqa-goldp-v1.1-dev.json (evaluated) and
eval/tydiqa/tydiqa-goldp-v1.1-train.json (the one exemplar: the first question of
the same language).
"""

import functools
import json
import os
from typing import Callable, Iterator

import tensorflow as tf

from moe_jax_tasks import sources
from moe_jax_tasks.evals import common
from moe_jax_tasks.evals import metrics
from moe_jax_tasks.evals import postprocessors

LANGUAGE_NAMES = {"ar": "arabic", "bn": "bengali", "fi": "finnish",
                  "id": "indonesian", "ko": "korean", "ru": "russian",
                  "sw": "swahili", "te": "telugu", "en": "english"}
SIGNATURE = {**common.PROMPT_SIGNATURE,
             "answers": tf.TensorSpec((None,), tf.string)}


def questions(task: str, path: str, language: str,
              malformed: sources.MalformedRecords) -> Iterator[tuple]:
  """(context, question, answers) of one language in a SQuAD-format file."""
  try:
    data = json.loads(common.read_text(task, path, "Get TyDiQA GoldP v1.1."))["data"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise sources.MalformedDataError(f"Task {task!r}: {path} is not SQuAD JSON ({e}).")
  prefix = LANGUAGE_NAMES[language] + "-"
  for article in data:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        if qa["id"].startswith(prefix):
          answers = [a["text"] for a in qa["answers"]]
          if not answers:
            malformed.report(task, path, qa["id"], "question without an answer")
            continue
          yield paragraph["context"], qa["question"], answers


def _block(context: str, question: str) -> str:
  return f"{context}\n\nQ: {question}\nA:"


def parse(task: str, path: str, malformed: sources.MalformedRecords, *,
          language: str, vocabulary) -> Iterator[dict]:
  train = os.path.join(os.path.dirname(path), "tydiqa-goldp-v1.1-train.json")
  shot = next(questions(task, train, language, malformed), None)
  if shot is None:
    raise sources.EmptyTaskError(f"Task {task!r}: {train} has no {language} "
                                 "question for the exemplar.")
  exemplar = f"{_block(shot[0], shot[1])} {shot[2][0]}"
  for context, question, answers in questions(task, path, language, malformed):
    yield {"inputs": common.fit_exemplars([exemplar], _block(context, question), "",
                                          "\n\n", vocabulary),
           "targets": answers[0], "answers": answers}


def register(languages, *, prefix: str = "",
             root: Callable[[], str] = common.eval_root,
             vocabulary=common.vocabulary_lib.FLAN_VOCABULARY) -> list[str]:
  """Registers `{prefix}tydiqa_goldp:<lang>:1shot` (split "validation")."""
  names = []
  for language in languages:
    name = f"{prefix}tydiqa_goldp:{language}:1shot"
    names.append(common.register(
        name, common.prompt_source(
            name, {"validation": "tydiqa/tydiqa-goldp-v1.1-dev.json"},
            functools.partial(parse, language=language, vocabulary=vocabulary),
            root=root, signature=SIGNATURE),
        postprocessors.tydiqa_answers, [metrics.squad], vocabulary))
  return names
