"""Data sources: real formats, overrides, and clear errors on bad data."""

import json
import os

import pytest
import tensorflow as tf

import moe_jax_tasks
from moe_jax_tasks import sources

RECORDS = {r.name: r for r in moe_jax_tasks.catalog()}


def _first_zero_shot(task):
  return next(iter(RECORDS[task].seqio_tasks.values()))


def _write(root, relpath, text):
  path = os.path.join(root, relpath)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


@pytest.fixture
def bad_root(tmp_path, monkeypatch, spm_model):
  monkeypatch.setenv("FLAN_DATA_DIR", str(tmp_path))
  monkeypatch.setenv("FLAN_VOCAB", spm_model)
  return str(tmp_path)


def _iterate(task):
  import seqio  # pylint: disable=g-import-not-at-top
  dataset = seqio.get_mixture_or_task(_first_zero_shot(task)).get_dataset(
      None, split="train", shuffle=False)
  return list(dataset.as_numpy_iterator())


@pytest.mark.parametrize("task,relpath", [
    ("task1146_country_capital", "niv2/tasks/task1146_country_capital.json"),
    ("cot_qasc", "cot/qasc_train.tsv"),
    ("amazon_polarity_Is_this_review", "p3/amazon_polarity_Is_this_review/"
     "train.jsonl")])
def test_missing_file_names_task_and_path(bad_root, task, relpath):
  with pytest.raises(sources.DataNotFoundError) as error:
    _iterate(task)
  assert repr(task) in str(error.value)
  assert os.path.join(bad_root, relpath) in str(error.value)


def test_missing_tfds_dataset_says_how_to_prepare(bad_root):
  with pytest.raises(sources.DataNotFoundError, match="super_glue/rte:1.0.2 is not "
                     "prepared") as error:
    _iterate("rte")
  assert "moe_jax_tasks prepare" in str(error.value)


@pytest.mark.parametrize("task", ["task_master", "dmcc_python",
                                  "trivia_qa_wiki_missing"])
def test_unreleased_tasks_say_so(bad_root, task):
  with pytest.raises(sources.UnreleasedDataError,
                     match="never publicly released") as error:
    _iterate(task)
  assert f"unreleased/{task}/train.jsonl" in str(error.value)


def test_unreleased_task_reads_user_files(bad_root):
  _write(bad_root, "unreleased/task_master/train.jsonl",
         json.dumps({"inputs": "Book a table.", "targets": "For how many?"}) + "\n")
  rendered = _iterate("task_master")
  assert rendered[0]["targets_pretokenized"] == b"For how many?"


def test_malformed_tsv_line_raises_with_line_number(bad_root):
  _write(bad_root, "cot/qasc_train.tsv", "q1\ta1\tc1\nbroken line\nq2\ta2\tc2\n")
  with pytest.raises(Exception, match=r"cot_qasc.*line 2.*3 non-empty"):
    _iterate("cot_qasc")


def test_malformed_lines_are_skipped_and_counted_on_request(bad_root, monkeypatch):
  path = _write(bad_root, "cot/creak_train.tsv",
                "q1\ta1\tc1\nbroken\nq2\ta2\n{}\n")
  monkeypatch.setenv("FLAN_SKIP_MALFORMED", "1")
  rendered = _iterate("cot_creak")
  assert len(rendered) == 1
  assert sources.skipped_records()[path] == 3


def test_malformed_json_file_and_missing_fields(bad_root):
  _write(bad_root, "niv2/tasks/task1146_country_capital.json", "{not json")
  with pytest.raises(Exception, match="task1146_country_capital.*not valid JSON"):
    _iterate("task1146_country_capital")
  _write(bad_root, "niv2/tasks/task1146_country_capital.json",
         json.dumps({"Definition": ["d"]}))
  with pytest.raises(Exception, match="lacks 'Definition' or 'Instances'"):
    _iterate("task1146_country_capital")


def test_malformed_p3_line(bad_root):
  _write(bad_root, "p3/amazon_polarity_Is_this_review/train.jsonl",
         json.dumps({"inputs": "a", "targets": "b"}) + "\n{\"inputs\": 3}\n")
  with pytest.raises(Exception, match=r"amazon_polarity_Is_this_review.*line 2"):
    _iterate("amazon_polarity_Is_this_review")


def test_empty_task_is_an_error_not_an_empty_dataset(bad_root):
  _write(bad_root, "niv2/tasks/task1146_country_capital.json",
         json.dumps({"Definition": ["d"], "Instances": []}))
  with pytest.raises(Exception, match="holds no usable example"):
    _iterate("task1146_country_capital")


def test_no_data_root_configured(monkeypatch):
  monkeypatch.delenv("FLAN_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match="FLAN_DATA_DIR"):
    _iterate("cot_qasc")


def test_names_with_dots_and_hyphens_resolve(read_task):
  # The catalog keys task074 as `task074_squad1`; the real file name is longer.
  for task in ("task074_squad1",
               "task105_story_cloze-rocstories_sentence_generation"):
    rendered = read_task(RECORDS[task].seqio_tasks["zs"])
    assert rendered, task


def test_tfds_prepared_dataset_is_read(read_task):
  rendered = read_task(RECORDS["bool_q"].seqio_tasks["zs_noopt"])
  assert len(rendered) == 4
  assert "The capital of France is Paris." in rendered[0]["inputs_pretokenized"]
  assert rendered[0]["targets_pretokenized"] == "yes"


def test_jsonl_override_of_a_tfds_task(bad_root):
  _write(bad_root, "muffin/rte/train.jsonl", json.dumps(
      {"idx": 0, "premise": "It rains.", "hypothesis": "It is wet.",
       "label": 0}) + "\n")
  rendered = _iterate("rte")
  assert b"It rains." in rendered[0]["inputs_pretokenized"]


def test_counts_for_mixing(data_root):
  source = sources.cot_source("cot_gsm8k", "gsm8k")
  assert source.num_input_examples("train") == 8
  niv2 = sources.niv2_source("task1146_country_capital", 5)
  assert niv2.num_input_examples("train") == 5  # metadata, no file read
  assert tf.io.gfile.exists(os.path.join(data_root, "cot", "gsm8k_train.tsv"))


def test_skip_counts_belong_to_each_pass(bad_root, monkeypatch):
  path = _write(bad_root, "cot/creak_train.tsv", "q1\ta1\tc1\nbroken\nq2\ta2\n")
  monkeypatch.setenv("FLAN_SKIP_MALFORMED", "1")
  first, second = (sources.cot_source("cot_creak", "creak") for _ in range(2))
  assert len(list(first.get_dataset("train").as_numpy_iterator())) == 1
  assert first.skipped_records() == {path: 2}
  assert second.skipped_records() == {}  # Another source's passes are its own.
  assert second.num_input_examples("train") == 1  # Counting is a pass too.
  assert second.skipped_records() == {path: 2}
  _write(bad_root, "cot/creak_train.tsv", "q1\ta1\tc1\n")
  assert len(list(first.get_dataset("train").as_numpy_iterator())) == 1
  assert first.skipped_records() == {}  # Only the latest pass counts.
  assert second.skipped_records() == {path: 2}


@pytest.mark.parametrize("skip", ["0", "1"])
def test_malformed_records_raise_or_count(monkeypatch, skip):
  monkeypatch.setenv("FLAN_SKIP_MALFORMED", skip)
  malformed = sources.MalformedRecords()
  if skip == "0":
    with pytest.raises(sources.MalformedDataError,
                       match=r"Task 't': malformed record in f.tsv \(line 2\): bad"):
      malformed.report("t", "f.tsv", "line 2", "bad")
  else:
    malformed.report("t", "f.tsv", "line 2", "bad")
    malformed.report("t", "g.tsv", "line 3", "bad")
    assert malformed.counts == {"f.tsv": 1, "g.tsv": 1}
