import pytest

from launch import yaml_text

yaml = pytest.importorskip("yaml")

VALUES = {
    "plain": "flan-moe", "path": "gcp/us-central2/us-central2-b",
    "accel": "H100:8", "dot": ".", "empty": "", "true_word": "true",
    "no": "No", "number_text": "8476", "float_text": "1e3", "colon": "a: b",
    "dash": "-x", "hash": "# not a comment", "quote": "it's \"q\"",
    "unicode": "naïve", "yes": True, "off": False, "count": 2,
    "script": "echo a\n  indented\n\necho 'b' \"$c\"\n",
    "no_final_newline": "line 1\nline 2",
    "starts_indented": "  a\nb\n",
    "nested": {"inner": {"k": "v"}, "list": ["a", "1", "b c"]},
}


def test_round_trips_through_pyyaml():
  assert yaml.safe_load(yaml_text.dump(VALUES)) == VALUES


def test_header_is_comments_and_scripts_are_literal_blocks():
  text = yaml_text.dump({"run": "a \\\n  --b\n"}, header="line one\n\nline two")
  assert text == "# line one\n#\n# line two\nrun: |\n  a \\\n    --b\n"
