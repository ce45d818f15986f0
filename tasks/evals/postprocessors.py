"""Answer extraction from model outputs (and normalization of gold targets).

seqio calls a postprocessor as `fn(text, example=..., is_target=...)` for both the
decoded prediction and the target text.
"""

import re
from typing import Any, Optional

_ANSWER_IS = re.compile(r"answer is|answer:|final answer", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CHOICE = re.compile(r"\(([A-Za-z])\)")


def _as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def after_answer_marker(text: str) -> str:
  """The text after the last "answer is" / "answer:" / "final answer", first line,
  without surrounding punctuation; the whole text when there is no marker."""
  text = _as_text(text)
  matches = list(_ANSWER_IS.finditer(text))
  if matches:
    text = text[matches[-1].end():]
  text = text.strip().split("\n")[0].strip()
  return text.strip(" .:").strip()


def cot_answer(text, example: Optional[dict] = None, is_target: bool = False) -> str:
  """Final answer of a chain of thought (targets pass through stripped)."""
  del example
  return _as_text(text).strip() if is_target else after_answer_marker(text)


def number(text, example: Optional[dict] = None, is_target: bool = False) -> str:
  """The final number of a (CoT) answer, canonical: no commas, no trailing '.0'.

  Takes the first number after the last answer marker, else the last number of the
  text; returns "" when there is none.
  """
  del example, is_target
  text = _as_text(text).replace("$", "")
  markers = list(_ANSWER_IS.finditer(text))
  found = _NUMBER.findall(text[markers[-1].end():]) if markers else []
  value = found[0] if found else (_NUMBER.findall(text) or [""])[-1]
  value = value.replace(",", "")
  if "." in value:
    value = value.rstrip("0").rstrip(".")
  return value


def choice_letter(text, example: Optional[dict] = None,
                  is_target: bool = False) -> str:
  """A multiple-choice letter: "(B)" / "B" / "B. text" -> "B"; "" if none."""
  del example, is_target
  answer = after_answer_marker(text)
  match = _CHOICE.search(answer)
  if match:
    return match.group(1).upper()
  match = re.match(r"([A-Za-z])(?:$|[\s.):])", answer)
  return match.group(1).upper() if match else ""


def yes_no(text, example: Optional[dict] = None, is_target: bool = False) -> str:
  """"yes" or "no" from the final answer ("" if neither starts it)."""
  del example, is_target
  answer = after_answer_marker(text).lower()
  for word in ("yes", "no"):
    if re.match(rf"{word}\b", answer):
      return word
  return ""


def bbh_answer(text, example: Optional[dict] = None,
               is_target: bool = False) -> str:
  """BBH: targets verbatim; predictions after the answer marker, first line."""
  del example
  return _as_text(text).strip() if is_target else after_answer_marker(text)


def first_line(text, example: Optional[dict] = None, is_target: bool = False) -> str:
  """The first line, stripped (direct answers)."""
  del example, is_target
  return _as_text(text).strip().split("\n")[0].strip()


def rank_classification(text, example: Optional[dict] = None,
                        is_target: bool = False) -> Any:
  """For scoring tasks: targets become (question id, is_correct)."""
  if is_target:
    return int(example["idx"]), bool(example["is_correct"])
  return text


def tydiqa_answers(text, example: Optional[dict] = None,
                   is_target: bool = False) -> Any:
  """TyDiQA: targets become the list of gold answers; predictions the first line."""
  if is_target:
    return [_as_text(a) for a in example["answers"]]
  return first_line(text)
