"""The held-out suite: prompts from data files, postprocessors and metrics."""

import os
import shutil

import pytest
import seqio

from moe_jax_tasks.evals import metrics
from moe_jax_tasks.evals import postprocessors as post

MIXTURES = ["mmlu_5shot_direct", "mmlu_5shot_cot", "bbh_3shot_direct",
            "bbh_3shot_cot", "gsm8k_cot", "svamp_cot", "asdiv_cot",
            "strategyqa_cot", "reasoning_cot", "tydiqa_goldp_1shot", "mgsm_cot"]


@pytest.mark.parametrize("name,count", [
    ("mmlu_5shot_direct", 57), ("mmlu_5shot_cot", 57), ("bbh_3shot_direct", 27),
    ("bbh_3shot_cot", 27), ("gsm8k_cot", 1), ("reasoning_cot", 4),
    ("tydiqa_goldp_1shot", 8), ("mgsm_cot", 11)])
def test_suite_mixtures(name, count):
  assert len(seqio.get_mixture_or_task(name).tasks) == count


def test_mmlu_direct_rows_for_rank_classification(read_task):
  rows = read_task("mmlu:abstract_algebra:5shot_direct", split="validation")
  assert len(rows) == 8  # 2 questions x 4 options
  shots = "".join(f"What is {a} plus {a}?\nA. {2 * a}\nB. {2 * a + 1}\nC. {a}\n"
                  f"D. {a + 3}\nAnswer: A\n\n" for a in range(1, 6))
  assert rows[0]["inputs_pretokenized"] == (
      "Multiple choice questions about abstract algebra, with their answers.\n\n"
      + shots + "What is 6 plus 6?\nA. 12\nB. 13\nC. 6\nD. 9\nAnswer:")
  assert [r["targets_pretokenized"] for r in rows[:4]] == ["A", "B", "C", "D"]
  assert [r["is_correct"] for r in rows[:4]] == [True, False, False, False]
  assert {r["idx"] for r in rows} == {0, 1}


def test_mmlu_cot_prompt_ends_with_the_question(read_task):
  rows = read_task("mmlu:abstract_algebra:5shot_cot", split="test")
  assert rows[0]["inputs_pretokenized"].endswith(
      "One and one make two. The answer is (A).\n\nQ: What is 8 plus 8?\n"
      "(A) 16 (B) 17 (C) 8 (D) 11\nA: Let's think step by step.")
  assert rows[0]["targets_pretokenized"] == "A"


def test_bbh_direct_prompt_is_derived_from_the_cot_file(read_task):
  rows = read_task("bbh:navigate:3shot_direct", split="test")
  assert rows[0]["inputs_pretokenized"] == (
      "Decide whether you end where you started.\n\nQ: Take 3 steps. Are you "
      "home?\nA: No\n\nQ: Take 1 step. Take 1 step back. Are you home?\nA: Yes\n\n"
      "Q: Take 1 step. Take 1 step back. Are you home?\nA:")
  assert rows[1]["targets_pretokenized"] == "No"
  cot = read_task("bbh:navigate:3shot_cot", split="test")
  assert "We moved 3. So the answer is No." in cot[0]["inputs_pretokenized"]
  assert cot[0]["inputs_pretokenized"].endswith("A: Let's think step by step.")


def test_gsm8k_exemplars_come_from_the_train_file(read_task):
  rows = read_task("gsm8k:cot", split="test")
  assert rows[0]["inputs_pretokenized"] == (
      "Q: Ann has 3 pens and buys 3 more. How many?\nA: She has 3 + 3 = 6 pens. "
      "The answer is 6.\n\nQ: Ann has 600 pens and buys 600 more. How many?\nA:")
  assert rows[0]["targets_pretokenized"] == "1200"


@pytest.mark.parametrize("task,split,target,question", [
    ("svamp:cot", "test", "3", "Tom had 5 cars. How many now if he sells 2?"),
    ("asdiv:cot", "test", "8", "Sue has 4 hats. How many hats in 2 boxes like "
     "that?"),
    ("mgsm:de:cot", "test", "4", "Wie viel ist 2 plus 2?"),
    ("strategyqa:cot", "validation", "no", "Is fire cold?")])
def test_reasoning_sets(read_task, task, split, target, question):
  rows = read_task(task, split=split)
  assert rows[0]["targets_pretokenized"] == target
  assert rows[0]["inputs_pretokenized"].endswith(f"Q: {question}\nA:")


def test_strategyqa_exemplars_use_facts(read_task):
  rows = read_task("strategyqa:cot", split="validation")
  assert rows[0]["inputs_pretokenized"].startswith(
      "Q: Is ice cold?\nA: Ice is frozen. So the answer is yes.")


def test_tydiqa_one_shot_same_language(read_task):
  rows = read_task("tydiqa_goldp:fi:1shot", split="validation")
  assert rows[0]["inputs_pretokenized"] == (
      "Oslo is in Norway.\n\nQ: Where is Oslo?\nA: Norway\n\nOslo is in Norway."
      "\n\nQ: What is in Norway?\nA:")
  assert list(rows[0]["answers"]) == [b"Oslo"]
  with pytest.raises(Exception, match="no ar question for the exemplar"):
    read_task("tydiqa_goldp:ar:1shot", split="validation")


def test_missing_eval_prompt_file_is_named(read_task, data_root):
  bbh = os.path.join(data_root, "eval", "bbh")
  shutil.copy(os.path.join(bbh, "navigate.json"),
              os.path.join(bbh, "word_sorting.json"))
  with pytest.raises(Exception, match="cot-prompts/word_sorting.txt does not exist"):
    read_task("bbh:word_sorting:3shot_cot", split="test")


@pytest.mark.parametrize("fn,text,expected", [
    (post.cot_answer, "Two steps. So the answer is (B).", "(B)"),
    (post.number, "She pays $1,234.50 in total. The answer is $1,234.50.",
     "1234.5"),
    (post.number, "First 12, then 15", "15"),
    (post.number, "The answer is 7 apples.", "7"),
    (post.number, "no digits here", ""),
    (post.choice_letter, "Therefore, the answer is (C).", "C"),
    (post.choice_letter, "B. Paris", "B"),
    (post.yes_no, "Fire is hot. So the answer is Yes.", "yes"),
    (post.yes_no, "Nope.", ""),
    (post.bbh_answer, "It moved. So the answer is valid.", "valid"),
    (post.first_line, " Oslo\nmore", "Oslo")])
def test_postprocessors(fn, text, expected):
  assert fn(text) == expected


def test_targets_pass_through_postprocessors():
  assert post.bbh_answer(b"(A) ", is_target=True) == "(A)"
  assert post.rank_classification(b"B", example={"idx": 3, "is_correct": True},
                                   is_target=True) == (3, True)


def test_metrics_by_hand():
  assert metrics.accuracy(["1", "2", "3", "4"], ["1", "2", "0", "4"]) == {
      "accuracy": 75.0}
  assert metrics.exact_match(["Yes"], ["yes"]) == {"exact_match": 0.0}
  targets = [(0, True), (0, False), (1, False), (1, True)]
  assert metrics.rank_classification_accuracy(targets, [-1, -2, -0.5, -3]) == {
      "accuracy": 50.0}
  squad = metrics.squad([["Oslo", "oslo city"]], ["The Oslo"])
  assert squad == {"em": 100.0, "f1": 100.0}
  squad = metrics.squad([["Oslo", "oslo city"]], ["Oslo Norway"])
  assert squad["em"] == 0.0
  assert squad["f1"] == pytest.approx(200 / 3)


def test_normalized_average_by_hand():
  # MMLU: (50 - 25) / 75 = 33.33; BBH-direct has chance 0 here: 40.
  assert metrics.normalized_average({"mmlu_direct": 50.0, "bbh_direct": 40.0}) == (
      pytest.approx((100 / 3 + 40) / 2))
  with pytest.raises(KeyError, match="No chance baseline for 'squad'"):
    metrics.normalized_average({"squad": 1.0})
