"""Formats render as specified: options, zero-shot, few-shot, inversion."""

import pytest
import seqio
import tensorflow as tf

import moe_jax_tasks
from moe_jax_tasks import formats
from moe_jax_tasks import vocabulary

RECORDS = {r.name: r for r in moe_jax_tasks.catalog()}
SAMPLED = ["rte", "bool_q", "task1146_country_capital",
           "task105_story_cloze-rocstories_sentence_generation", "cot_gsm8k",
           "amazon_polarity_Is_this_review"]
CASES = [(name, fmt) for name in SAMPLED for fmt in RECORDS[name].seqio_tasks]
CASES += [("cot_gsm8k", f"inversion:{fmt}") for fmt in ("zs", "fs5", "xs")]


def _decode(values):
  return [v.decode() for v in values.numpy()]


def test_options_in_every_style_by_hand():
  texts, answers = formats.format_options(tf.constant(["yes", "no"]),
                                          tf.constant("no"))
  assert _decode(texts) == [
      "OPTIONS:\n- yes\n- no", "Options:\n(A) yes\n(B) no",
      "Choose one:\n1. yes\n2. no", "Possible answers:\n* yes\n* no",
      "Select from:\na) yes\nb) no"]
  assert _decode(answers) == ["no", "(B)", "2", "no", "b)"]


def test_options_answer_not_listed_stays_text_and_empty_list_is_empty():
  texts, answers = formats.format_options(tf.constant(["x", "y"]),
                                          tf.constant("z"))
  assert _decode(answers) == ["z"] * 5
  texts, answers = formats.format_options(tf.constant([], tf.string),
                                          tf.constant("z"))
  assert _decode(texts) == [""] * 5


def test_too_many_options_for_digits_fall_back_to_dashes():
  options = [f"o{i}" for i in range(12)]
  texts, answers = formats.format_options(tf.constant(options),
                                          tf.constant("o10"))
  assert _decode(texts)[2] == "OPTIONS:\n" + "\n".join(f"- {o}" for o in options)
  assert _decode(answers)[2] == "o10"
  assert _decode(answers)[1] == "(K)"  # 26 letters suffice for 12 options


@pytest.mark.parametrize("task,fmt", CASES)
def test_every_format_renders(read_task, task, fmt):
  record = RECORDS[task]
  if fmt.startswith("inversion:"):
    fmt = fmt.split(":")[1]
    name = record.inversion_seqio_tasks[fmt]
  else:
    name = record.seqio_tasks[fmt]
  rendered = read_task(name, n=3)
  assert rendered, name
  for ex in rendered:
    assert ex["inputs_pretokenized"].strip() and ex["targets_pretokenized"].strip()
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS appended
    assert ex["_task_name"] == (record.inversion if "inversion" in name else task)
    expected_type = ("zs" if fmt.startswith("zs") else "fs") + (
        "_opt" if fmt.endswith("_opt") else "_noopt")
    assert ex["_template_type"] == expected_type
    if fmt.endswith("_noopt") or fmt in ("zs", "fs5", "xs"):
      assert "OPTIONS" not in ex["inputs_pretokenized"]


def test_rte_zero_shot_with_options_by_hand(read_task):
  rendered = read_task(RECORDS["rte"].seqio_tasks["zs_opt"])
  assert rendered[0]["inputs_pretokenized"] == (
      "Premise: France has a capital named Paris.\nHypothesis: Paris is in "
      "France.\n\nDoes the premise entail the hypothesis?\n\nOPTIONS:\n- yes\n- no")
  assert rendered[0]["targets_pretokenized"] == "yes"
  # Example 6: template 0 again (6 NLI templates), option style 1 (letters).
  assert rendered[6]["inputs_pretokenized"] == (
      "Premise: Norway has a capital named Oslo.\nHypothesis: Oslo is in "
      "Norway.\n\nDoes the premise entail the hypothesis?\n\nOptions:\n(A) yes\n"
      "(B) no")
  assert rendered[6]["targets_pretokenized"] == "(A)"
  assert [ex["_template_idx"] for ex in rendered] == [0, 1, 2, 3, 4, 5, 0, 1]


def test_rte_without_options_keeps_answer_text(read_task):
  rendered = read_task(RECORDS["rte"].seqio_tasks["zs_noopt"])
  assert rendered[1]["inputs_pretokenized"] == (
      "Peru has a capital named Lima.\n\nGiven the text above, is it true that "
      "\"Lima is in Mars.\"?")
  assert rendered[1]["targets_pretokenized"] == "no"


def test_niv2_definition_is_the_instruction(read_task):
  zero = read_task(RECORDS["task1146_country_capital"].seqio_tasks["zs"])
  assert zero[0]["inputs_pretokenized"] == (
      "Name the capital city of the given country.\n\nInput: France\nOutput:")
  assert zero[0]["targets_pretokenized"] == "Paris"


def test_niv2_few_shot_uses_positive_examples_once_with_definition(read_task):
  few = read_task(RECORDS["task1146_country_capital"].seqio_tasks["fs5"])
  first = few[0]["inputs_pretokenized"]
  expected = [
      "Name the capital city of the given country.\n\nItaly\nRome" + sep +
      "Now solve this instance.\nSpain\nMadrid" + sep + "Input: France\nOutput:"
      for sep in ("\n\n", "\n\n\n")]
  assert first in expected
  assert few[0]["_num_shots"] == 2
  for ex in few:
    assert ex["inputs_pretokenized"].count("Name the capital city") == 1


def test_few_shot_never_leaks_the_target(read_task):
  for fmt in ("fs5", "xs"):
    for ex in read_task(RECORDS["cot_gsm8k"].seqio_tasks[fmt]):
      target = ex["targets_pretokenized"]
      reasoning = target.split(". ")[0]  # "i and i make 2i"
      assert reasoning not in ex["inputs_pretokenized"]
      assert ex["_num_shots"] >= 1


def test_x_shot_uses_the_query_template(read_task):
  for ex in read_task(RECORDS["cot_gsm8k"].seqio_tasks["xs"]):
    prompt = ex["inputs_pretokenized"]
    if ex["_template_idx"] == 0:
      assert prompt.count("Think it through step by step.") == ex["_num_shots"] + 1


def _cot_dataset(rows):
  return tf.data.Dataset.from_tensor_slices({
      "question": [r[0] for r in rows], "answer": [r[1] for r in rows],
      "chain_of_thought": [r[2] for r in rows]})


def _few_shot(rows, spm_model, **kwargs):
  features = vocabulary.output_features(seqio.SentencePieceVocabulary(spm_model))
  options = dict(group="cot", with_options=False, task_name="t", task_source="cot",
                 num_shots=3, same_template=False, max_input_tokens=1920)
  options.update(kwargs)
  dataset = formats.few_shot(_cot_dataset(rows), features, **options)
  return [{k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()}
          for ex in dataset.as_numpy_iterator()]


def test_duplicate_examples_are_not_used_as_their_own_exemplars(spm_model):
  rows = [("q1", "a1", "c1"), ("q1", "a1", "c1"), ("q2", "a2", "c2"),
          ("q3", "a3", "c3")]
  rendered = _few_shot(rows, spm_model)
  assert len(rendered) == 4
  for ex, (question, _, chain) in zip(rendered, rows):
    assert ex["inputs"].count(question) == 1
    assert chain not in ex["inputs"]
  assert rendered[0]["_num_shots"] == 2  # the duplicate q1 is skipped


def test_few_shot_is_pruned_to_the_token_budget(spm_model):
  rows = [(f"question {i} " + "word " * 20, str(i), "because " * 10)
          for i in range(6)]
  full = _few_shot(rows, spm_model)
  assert all(ex["_num_shots"] == 3 for ex in full)
  sp = seqio.SentencePieceVocabulary(spm_model)
  query_tokens = len(sp.encode(full[0]["inputs"].split("\n\n")[-1]))
  pruned = _few_shot(rows, spm_model, max_input_tokens=query_tokens + 5)
  assert pruned == []  # no exemplar fits: examples without exemplars are dropped
  budget = max(len(sp.encode(ex["inputs"])) for ex in full) - 1
  partial = _few_shot(rows, spm_model, max_input_tokens=budget)
  assert any(ex["_num_shots"] < 3 for ex in partial)
  assert all(len(sp.encode(ex["inputs"])) <= budget for ex in partial)


def test_inversion_targets_are_the_original_questions(read_task):
  name = RECORDS["cot_gsm8k"].inversion_seqio_tasks["zs"]
  rendered = read_task(name)
  assert rendered[0]["targets_pretokenized"] == "What is 1 plus 1?"
  assert "1 and 1 make 2." in rendered[0]["inputs_pretokenized"]
  assert "What is 1 plus 1?" not in rendered[0]["inputs_pretokenized"]


def test_one_table_names_the_formats_and_their_settings():
  names = [f.name for f in formats.FORMATS]
  assert len(set(names)) == len(names)
  settings = {s.name for s in formats.SETTINGS}
  assert all(set(f.settings) <= settings for f in formats.FORMATS)
  for record in RECORDS.values():
    assert list(record.seqio_tasks) == [
        f.name for f in formats.formats_for(record.has_options)], record.name
