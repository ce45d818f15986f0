"""Math word problems with chain of thought: GSM8K, SVAMP, ASDiv and MGSM.

All four share one exemplar prompt: `eval/gsm8k/cot_prompt.txt` if the user supplies
it, else the first 8 problems of `eval/gsm8k/train.jsonl` with their worked
solutions (calculator annotations removed) as "Q: ...\nA: <steps> The answer is N."
MGSM uses `eval/mgsm/cot_prompt_<lang>.txt` (the native-language exemplars) when
present and falls back to the shared prompt otherwise.

Files: eval/gsm8k/test.jsonl ({"question", "answer": "... #### N"}),
eval/svamp/SVAMP.json ([{"Body", "Question", "Answer"}]), eval/asdiv/ASDiv.xml
(<Problem><Body/><Question/><Answer>N (unit)</Answer></Problem>),
eval/mgsm/mgsm_<lang>.tsv (question <TAB> number). Scored by the accuracy of the
number after "the answer is".
"""

import functools
import json
import os
import re
import xml.etree.ElementTree as ElementTree
from typing import Callable, Iterator


from moe_jax_tasks import sources
from moe_jax_tasks.evals import common
from moe_jax_tasks.evals import metrics
from moe_jax_tasks.evals import postprocessors

NUM_EXEMPLARS = 8


def _eval_dir(path: str) -> str:
  return os.path.dirname(os.path.dirname(path))


def gsm8k_solution(answer: str) -> tuple[str, str]:
  """(reasoning, final number) of a GSM8K answer field."""
  reasoning, sep, final = answer.partition("####")
  if not sep:
    raise sources.MalformedDataError(f"GSM8K answer without '####': {answer[:60]!r}")
  reasoning = re.sub(r"<<[^>]*>>", "", reasoning)
  return " ".join(reasoning.split()), final.strip().replace(",", "")


def _jsonl(task: str, path: str,
           malformed: sources.MalformedRecords) -> Iterator[dict]:
  for _, record in sources.json_objects(task, path, malformed):
    yield record


def shared_prompt(task: str, eval_dir: str,
                  malformed: sources.MalformedRecords) -> str:
  """The math CoT exemplars (user prompt file, or GSM8K train solutions)."""
  prompt_file = os.path.join(eval_dir, "gsm8k", "cot_prompt.txt")
  if common.optional_exists(prompt_file):
    return common.read_prompt_file(task, prompt_file, "")
  train = os.path.join(eval_dir, "gsm8k", "train.jsonl")
  if not common.optional_exists(train):
    raise sources.DataNotFoundError(
        f"Task {task!r}: no math exemplars: write {prompt_file} or provide "
        f"{train} (GSM8K train split).")
  shots = []
  for record in _jsonl(task, train, malformed):
    reasoning, final = gsm8k_solution(record["answer"])
    shots.append(f"Q: {record['question']}\nA: {reasoning} The answer is {final}.")
    if len(shots) == NUM_EXEMPLARS:
      break
  return "\n\n".join(shots)


def _prompt(exemplars: str, question: str, vocabulary) -> str:
  return common.fit_exemplars([exemplars], f"Q: {question}\nA:", "", "\n\n",
                              vocabulary)


def parse_gsm8k(task, path, malformed, *, vocabulary) -> Iterator[dict]:
  exemplars = shared_prompt(task, _eval_dir(path), malformed)
  for record in _jsonl(task, path, malformed):
    _, final = gsm8k_solution(record["answer"])
    yield {"inputs": _prompt(exemplars, record["question"], vocabulary),
           "targets": final}


def parse_svamp(task, path, malformed, *, vocabulary) -> Iterator[dict]:
  exemplars = shared_prompt(task, _eval_dir(path), malformed)
  problems = json.loads(common.read_text(task, path, ""))
  for problem in problems:
    question = f"{problem['Body'].strip()} {problem['Question'].strip()}"
    yield {"inputs": _prompt(exemplars, question, vocabulary),
           "targets": postprocessors.number(str(problem["Answer"]))}


def parse_asdiv(task, path, malformed, *, vocabulary) -> Iterator[dict]:
  exemplars = shared_prompt(task, _eval_dir(path), malformed)
  try:
    root = ElementTree.fromstring(common.read_text(task, path, ""))
  except ElementTree.ParseError as e:
    raise sources.MalformedDataError(f"Task {task!r}: {path} is not valid XML ({e}).")
  for problem in root.iter("Problem"):
    body, question = problem.findtext("Body"), problem.findtext("Question")
    answer = postprocessors.number(problem.findtext("Answer") or "")
    if not body or not question or not answer:
      malformed.report(task, path, f"Problem {problem.get('ID')}",
                       "needs Body, Question and a numeric Answer")
      continue
    yield {"inputs": _prompt(exemplars, f"{body.strip()} {question.strip()}",
                             vocabulary),
           "targets": answer}


def parse_mgsm(task, path, malformed, *, language, vocabulary) -> Iterator[dict]:
  native = os.path.join(os.path.dirname(path), f"cot_prompt_{language}.txt")
  exemplars = (common.read_prompt_file(task, native, "")
               if common.optional_exists(native)
               else shared_prompt(task, _eval_dir(path), malformed))
  for number, line in sources.lines(path):
    columns = line.split("\t")
    if len(columns) != 2:
      malformed.report(task, path, f"line {number}", "expected question<TAB>answer")
      continue
    yield {"inputs": _prompt(exemplars, columns[0].strip(), vocabulary),
           "targets": postprocessors.number(columns[1])}


def register(languages, *, prefix: str = "",
             root: Callable[[], str] = common.eval_root,
             vocabulary=common.vocabulary_lib.FLAN_VOCABULARY,
             include=("gsm8k", "svamp", "asdiv", "mgsm")) -> dict[str, list]:
  """Registers `{prefix}gsm8k:cot`, `svamp:cot`, `asdiv:cot`, `mgsm:<lang>:cot`."""
  plans = {"gsm8k": ("gsm8k/test.jsonl", parse_gsm8k),
           "svamp": ("svamp/SVAMP.json", parse_svamp),
           "asdiv": ("asdiv/ASDiv.xml", parse_asdiv)}
  names = {}
  for benchmark, (relpath, parser) in plans.items():
    if benchmark not in include:
      continue
    name = f"{prefix}{benchmark}:cot"
    names[benchmark] = [common.register(
        name, common.prompt_source(name, {"test": relpath},
                                   functools.partial(parser, vocabulary=vocabulary),
                                   root=root),
        postprocessors.number, [metrics.accuracy], vocabulary)]
  if "mgsm" in include:
    names["mgsm"] = []
    for language in languages:
      name = f"{prefix}mgsm:{language}:cot"
      names["mgsm"].append(common.register(
          name, common.prompt_source(
              name, {"test": f"mgsm/mgsm_{language}.tsv"},
              functools.partial(parse_mgsm, language=language,
                                vocabulary=vocabulary), root=root),
          postprocessors.number, [metrics.accuracy], vocabulary))
  return names
