"""Checks a --gin.MESH_SHAPE against the number of devices a run will have.

The driver builds its mesh from MESH_SHAPE, a dict of axis name -> size where
one axis may be -1 ("the rest"). A shape that does not tile the slice fails
only after the slice is up and the project installed, so check it here.
"""

from __future__ import annotations

import ast
import math

from launch.errors import LaunchError

_EXAMPLE = "\"{'data': -1, 'expert': 8, 'model': 1}\""


def parse(text: str) -> dict[str, int]:
  try:
    shape = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    shape = None
  if (not isinstance(shape, dict) or not shape
      or not all(isinstance(k, str) for k in shape)
      or not all(type(v) is int for v in shape.values())):
    raise LaunchError(f"--gin.MESH_SHAPE={text} is not a dict of axis sizes",
                      f"write it like --gin.MESH_SHAPE={_EXAMPLE}")
  return shape


def check_fits(shape: dict[str, int], devices: int, where: str) -> None:
  """Raises unless `shape` tiles exactly `devices` (-1 allowed once)."""
  text = str(shape)
  if any(v == 0 or v < -1 for v in shape.values()):
    raise LaunchError(f"--gin.MESH_SHAPE {text} has a size below 1",
                      "use positive sizes, and -1 for at most one axis")
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    raise LaunchError(f"--gin.MESH_SHAPE {text} has -1 on {len(free)} axes",
                      "give every axis but one a size")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free and devices % fixed:
    raise LaunchError(
        f"--gin.MESH_SHAPE {text} does not fit {where} ({devices} devices): "
        f"the fixed axes multiply to {fixed}, which does not divide {devices}",
        f"make the fixed axes multiply to a divisor of {devices}")
  if not free and fixed != devices:
    raise LaunchError(
        f"--gin.MESH_SHAPE {text} does not fit {where} ({devices} devices): "
        f"its axes multiply to {fixed}",
        f"make them multiply to {devices}, or set one axis to -1")
