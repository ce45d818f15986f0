"""Our instruction templates, one module per task family.

A template is a pair of Python format patterns over an example's text fields. The
field `{options}` is filled by the options formatter (an `OPTIONS:`-style list, or
nothing in the no-options formats); `{answer}` is the gold answer, rewritten to the
option label when the options are labelled. `preamble` is rendered once per prompt,
before any few-shot exemplars (NIv2 puts the task definition there).

Each family module defines `GROUPS`: group name -> tuple of templates. Templates are
applied round-robin over a task's stream: example i gets template i mod n.
"""

import string
from typing import NamedTuple


class Template(NamedTuple):
  """One (inputs, targets) pattern pair.

  Attributes:
    inputs: pattern of the model input.
    targets: pattern of the target.
    preamble: pattern rendered once before the exemplars of a few-shot prompt (and
      before `inputs` in a zero-shot prompt).
  """
  inputs: str
  targets: str = "{answer}"
  preamble: str = ""

  def fields(self) -> set[str]:
    """Names of the fields the three patterns refer to."""
    return {field for pattern in self for _, field, _, _ in
            string.Formatter().parse(pattern) if field is not None}


def all_groups() -> dict[str, tuple[Template, ...]]:
  """Every template group of every family module, by group name."""
  # Imported here so that `import moe_jax_tasks` does not parse template modules it
  # never renders.
  from moe_jax_tasks.templates import (  # pylint: disable=g-import-not-at-top
      classification, closed_book_qa, commonsense, coreference, cot, dialog, nli,
      niv2, paraphrase, prompted, reading_comprehension, sentiment, struct_to_text,
      summarization, text_repair, translation)
  modules = (classification, closed_book_qa, commonsense, coreference, cot, dialog,
             nli, niv2, paraphrase, prompted, reading_comprehension, sentiment,
             struct_to_text, summarization, text_repair, translation)
  groups = {}
  for module in modules:
    for name, templates in module.GROUPS.items():
      if name in groups:
        raise ValueError(f"Template group {name!r} is defined twice.")
      groups[name] = templates
  return groups


def group(name: str) -> tuple[Template, ...]:
  """Returns the templates of one group.

  Raises:
    KeyError: naming the known groups when `name` is not one of them.
  """
  groups = all_groups()
  if name not in groups:
    raise KeyError(f"Unknown template group {name!r}; known: {sorted(groups)}")
  return groups[name]
