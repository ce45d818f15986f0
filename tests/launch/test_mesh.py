import pytest

from launch import mesh
from launch.errors import LaunchError


@pytest.mark.parametrize("text, devices", [
    ("{'data': -1, 'expert': 8, 'model': 1}", 32),
    ("{'data': -1, 'expert': 8, 'model': 1}", 256),
    ("{'data': 4, 'expert': 8, 'model': 1}", 32),
    ("{'data': 1, 'expert': 1, 'model': -1}", 4),
    ("{'data': -1}", 7),
])
def test_fits(text, devices):
  mesh.check_fits(mesh.parse(text), devices, "the slice")


@pytest.mark.parametrize("text, devices, problem", [
    ("{'data': -1, 'expert': 48, 'model': 1}", 32, "multiply to 48, which does not divide 32"),
    ("{'data': 2, 'expert': 8, 'model': 1}", 32, "its axes multiply to 16"),
    ("{'data': 64, 'expert': 8, 'model': 1}", 256, "its axes multiply to 512"),
    ("{'data': -1, 'expert': -1}", 32, "-1 on 2 axes"),
    ("{'data': 0, 'expert': 32}", 32, "a size below 1"),
    ("{'data': -2, 'expert': 32}", 32, "a size below 1"),
])
def test_does_not_fit(text, devices, problem):
  with pytest.raises(LaunchError, match="MESH_SHAPE") as e:
    mesh.check_fits(mesh.parse(text), devices, "v4-64")
  assert problem in e.value.problem


@pytest.mark.parametrize("text", ["data=4", "{}", "[1, 2]", "{'data': 2.0}",
                                  "{1: 2}", "{'data': True}", "{'a': 'b'}"])
def test_parse_rejects(text):
  with pytest.raises(LaunchError, match="not a dict of axis sizes"):
    mesh.parse(text)
