import shutil
import subprocess

import pytest

from launch import shell

pytestmark = pytest.mark.skipif(shutil.which("bash") is None,
                                reason="bash reads the words back")

WORDS = [
    "plain", "--zone=us-central2-b", "--gin.MODEL_DIR='gs://b/run'",
    "--gin.MESH_SHAPE={'data': -1, 'expert': 8, 'model': 1}", "a b", "",
    "it's", 'say "hi"', "$HOME", "`x`", "back\\slash", "wow!", "it's wow!",
    "~/x", "'.[tpu]'", "--command=a && b 'c' \"d\" $e `f` \\g", "new\nline",
    "*.gin", "#not-a-comment",
]


def bash_words(text: str) -> list[str]:
  """How bash splits `text` into words (quotes removed, nothing expanded
  that was quoted)."""
  out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], check=True,
                       capture_output=True, env={}).stdout.decode()
  return out.split("\0")[:-1]


def test_quote_round_trips_through_bash():
  assert bash_words(shell.join(WORDS)) == WORDS


@pytest.mark.parametrize("word, quoted", [
    ("--zone=us-central2-b", "--zone=us-central2-b"),
    ("--gin.MODEL_DIR='gs://b/run'", "--gin.MODEL_DIR=\"'gs://b/run'\""),
    ("--gin.MESH_SHAPE={'data': -1}", "--gin.MESH_SHAPE=\"{'data': -1}\""),
    ("--format=value(state)", "--format='value(state)'"),
    ("~/x", "'~/x'"),
    ("a b", "'a b'"),
    ("it's $x", '"it\'s \\$x"'),
])
def test_quote_is_readable(word, quoted):
  assert shell.quote(word) == quoted


def test_join_lines_puts_flags_on_continued_lines():
  argv = ["python3", "-m", "moe_jax.train", "--a=1", "--b=c d", '--s="$x"']
  text = shell.join_lines(argv, raw={'--s="$x"'})
  assert text == ("python3 -m moe_jax.train \\\n  --a=1 \\\n  --b='c d' \\\n"
                  '  --s="$x"')
  assert bash_words(text) == argv[:-1] + ["--s="]  # raw words do expand
