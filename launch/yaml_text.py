"""A minimal YAML writer for the task files we emit (no PyYAML needed).

Block mappings and lists; strings quoted as JSON (valid YAML) unless plainly
safe; multi-line strings as literal blocks, so scripts read as scripts.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./:-]*")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def dump(value: dict[str, Any], header: str = "") -> str:
  comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
  return comments + "".join(_mapping(value, 0))


def _scalar(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, int):
    return str(value)
  if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
    return value
  return json.dumps(value)


def _mapping(value: dict[str, Any], indent: int) -> list[str]:
  pad = " " * indent
  lines = []
  for key, item in value.items():
    key = _scalar(key)
    if isinstance(item, dict):
      lines.append(f"{pad}{key}:\n")
      lines += _mapping(item, indent + 2)
    elif isinstance(item, list):
      lines.append(f"{pad}{key}:\n")
      lines += [f"{pad}  - {_scalar(x)}\n" for x in item]
    elif isinstance(item, str) and "\n" in item:
      # An explicit indentation when the text itself starts indented.
      indicator = "2" if item.startswith(" ") else ""
      chomp = "" if item.endswith("\n") else "-"
      lines.append(f"{pad}{key}: |{indicator}{chomp}\n")
      lines += [f"{pad}  {line}".rstrip() + "\n" for line in item.splitlines()]
    else:
      lines.append(f"{pad}{key}: {_scalar(item)}\n")
  return lines
