"""Shell quoting that stays readable: commands are printed for people to copy."""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Iterable, Sequence

_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-][A-Za-z0-9_@%+=:,./~-]*")
_FLAG = re.compile(r"(--[A-Za-z0-9_.-]+=)(.*)", re.DOTALL)
_ESCAPE_IN_DOUBLE_QUOTES = re.compile(r'(["$`\\])')


def quote(word: str) -> str:
  """Quotes one word so that a POSIX shell reads it back unchanged.

  Readable first, since people copy these commands: a --flag=value keeps its
  flag unquoted; values go bare, then in single quotes, then in double quotes
  (so --gin.MODEL_DIR='gs://b/r' prints as --gin.MODEL_DIR="'gs://b/r'", the
  way t5x users write it); shlex handles the rest (a '!' with a quote).
  """
  flag = _FLAG.fullmatch(word)
  if flag and not _PLAIN.fullmatch(word):
    return flag.group(1) + quote(flag.group(2))
  if _PLAIN.fullmatch(word):
    return word
  if "'" not in word:
    return f"'{word}'"
  if "!" not in word:
    return '"' + _ESCAPE_IN_DOUBLE_QUOTES.sub(r"\\\1", word) + '"'
  return shlex.quote(word)


def join(argv: Iterable[str]) -> str:
  return " ".join(quote(a) for a in argv)


def join_lines(argv: Sequence[str], raw: Collection[str] = ()) -> str:
  """Like join, but the flags after the first three words (the program and
  its subcommand or module) go one per continued line. Words in `raw` are
  already quoted, e.g. '--script-dir="$src"', which must expand."""
  words = [a if a in raw else quote(a) for a in argv]
  return " \\\n  ".join([" ".join(words[:3]), *words[3:]])
