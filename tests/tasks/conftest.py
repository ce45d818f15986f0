"""Shared fixtures: a tiny SentencePiece model and a fake data root in real formats.

Everything is written by the tests (no download): NIv2 task JSON, CoT TSV, a P3
export, TFDS datasets prepared locally with `tfds.folder_dataset.write_metadata`,
and MMLU / BBH / GSM8K / SVAMP / ASDiv / StrategyQA / TyDiQA / MGSM files.
"""

import csv
import json
import os

import pytest
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

import moe_jax_tasks  # noqa: F401  (registers everything)

CAPITALS = [("France", "Paris"), ("Peru", "Lima"), ("Japan", "Tokyo"),
            ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo"),
            ("Norway", "Oslo"), ("Cuba", "Havana")]
NIV2_DEFINITION = "Name the capital city of the given country."


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def niv2_task(definition, positives, instances):
  return {"Contributors": ["test"], "Source": ["test"], "Categories": ["test"],
          "Definition": [definition],
          "Positive Examples": [{"input": i, "output": o, "explanation": "x"}
                                for i, o in positives],
          "Negative Examples": [],
          "Instances": [{"id": f"t-{n}", "input": i, "output": [o]}
                        for n, (i, o) in enumerate(instances)]}


def _tfds_dataset(root, name, config, version, features, examples):
  directory = os.path.join(root, "tfds", name, *([config] if config else []),
                           version)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}-train.tfrecord-00000-of-00001")
  with tf.io.TFRecordWriter(path) as writer:
    for example in examples:
      writer.write(features.serialize_example(example))
  tfds.folder_dataset.write_metadata(data_dir=directory, features=features,
                                     split_infos=None, version=version)


def _write_eval(root):
  ev = os.path.join(root, "eval")
  mmlu_rows = [[f"What is {a} plus {a}?", str(2 * a), str(2 * a + 1), str(a),
                str(a + 3), "A"] for a in range(1, 9)]
  for folder, rows in (("dev", mmlu_rows[:5]), ("val", mmlu_rows[5:7]),
                       ("test", mmlu_rows[7:])):
    path = os.path.join(ev, "mmlu", folder, f"abstract_algebra_{folder}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
      csv.writer(f).writerows(rows)
  _write(os.path.join(ev, "mmlu", "cot_prompts", "abstract_algebra.txt"),
         "Q: What is 1 plus 1?\n(A) 2 (B) 3 (C) 1 (D) 4\nA: Let's think step by "
         "step. One and one make two. The answer is (A).\n")
  _write(os.path.join(ev, "bbh", "navigate.json"), json.dumps({"examples": [
      {"input": "Take 1 step. Take 1 step back. Are you home?", "target": "Yes"},
      {"input": "Take 2 steps. Are you home?", "target": "No"}]}))
  _write(os.path.join(ev, "bbh", "cot-prompts", "navigate.txt"),
         "CANARY LINE\n-----\nDecide whether you end where you started.\n\n"
         "Q: Take 3 steps. Are you home?\nA: Let's think step by step. We moved 3. "
         "So the answer is No.\n\nQ: Take 1 step. Take 1 step back. Are you home?\n"
         "A: Let's think step by step. We moved 0. So the answer is Yes.")
  gsm = [{"question": f"Ann has {a} pens and buys {a} more. How many?",
          "answer": f"She has {a} + {a} = <<{a}+{a}={2 * a}>>{2 * a} pens.\n#### "
                    f"{2 * a:,}"} for a in (3, 600)]
  _write(os.path.join(ev, "gsm8k", "train.jsonl"), json.dumps(gsm[0]) + "\n")
  _write(os.path.join(ev, "gsm8k", "test.jsonl"), json.dumps(gsm[1]) + "\n")
  _write(os.path.join(ev, "svamp", "SVAMP.json"), json.dumps([
      {"ID": "1", "Body": "Tom had 5 cars.", "Question": "How many now if he "
       "sells 2?", "Equation": "5 - 2", "Answer": 3.0, "Type": "Subtraction"}]))
  _write(os.path.join(ev, "asdiv", "ASDiv.xml"),
         "<Machine-Reading-Corpus-File><ProblemSet><Problem ID=\"nluds-0001\">"
         "<Body>Sue has 4 hats.</Body><Question>How many hats in 2 boxes like "
         "that?</Question><Solution-Type>Multiplication</Solution-Type><Answer>8 "
         "(hats)</Answer><Formula>4*2=8</Formula></Problem></ProblemSet>"
         "</Machine-Reading-Corpus-File>")
  _write(os.path.join(ev, "strategyqa", "train.json"), json.dumps([
      {"question": "Is ice cold?", "answer": True, "facts": ["Ice is frozen."]}]))
  _write(os.path.join(ev, "strategyqa", "dev.json"), json.dumps([
      {"question": "Is fire cold?", "answer": False}]))
  squad = lambda qas: {"data": [{"title": "t", "paragraphs": [
      {"context": "Oslo is in Norway.", "qas": qas}]}]}
  _write(os.path.join(ev, "tydiqa", "tydiqa-goldp-v1.1-train.json"), json.dumps(
      squad([{"id": "finnish-1", "question": "Where is Oslo?",
              "answers": [{"text": "Norway", "answer_start": 11}]}])))
  _write(os.path.join(ev, "tydiqa", "tydiqa-goldp-v1.1-dev.json"), json.dumps(
      squad([{"id": "finnish-2", "question": "What is in Norway?",
              "answers": [{"text": "Oslo", "answer_start": 0}]},
             {"id": "arabic-3", "question": "x?",
              "answers": [{"text": "y", "answer_start": 0}]}])))
  _write(os.path.join(ev, "mgsm", "mgsm_de.tsv"), "Wie viel ist 2 plus 2?\t4\n")


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
  """A ~150-piece SentencePiece model trained on a few KB of text."""
  directory = tmp_path_factory.mktemp("spm")
  corpus = directory / "corpus.txt"
  lines = [f"The capital of {c} is {k}. What is {i} plus {i}? The answer is "
           f"{2 * i}. Options yes no maybe Input Output Question Answer"
           for i, (c, k) in enumerate(CAPITALS * 6)]
  corpus.write_text("\n".join(lines), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(directory / "tiny"), vocab_size=150,
      model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return str(directory / "tiny.model")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, spm_model):
  """FLAN_DATA_DIR with small files in every real format; sets the env vars."""
  root = str(tmp_path_factory.mktemp("flan_data"))
  capitals = niv2_task(NIV2_DEFINITION, [("Italy", "Rome"), ("Spain", "Madrid")],
                       CAPITALS)
  _write(os.path.join(root, "niv2", "tasks", "task1146_country_capital.json"),
         json.dumps(capitals))
  _write(os.path.join(root, "niv2", "tasks",
                      "task074_squad1.1_question_generation.json"),
         json.dumps(niv2_task("Write a question about the text.", [],
                              [("Rain falls.", "What falls?")])))
  _write(os.path.join(root, "niv2", "tasks",
                      "task105_story_cloze-rocstories_sentence_generation.json"),
         json.dumps(niv2_task("Finish the story.", [("A cat sat.", "It slept.")],
                              [("A dog ran.", "It rested."),
                               ("A bird sang.", "It flew.")])))
  _write(os.path.join(root, "cot", "gsm8k_train.tsv"), "".join(
      f"What is {i} plus {i}?\t{2 * i}\t{i} and {i} make {2 * i}.\n"
      for i in range(1, 9)))
  _write(os.path.join(root, "p3", "amazon_polarity_Is_this_review", "train.jsonl"),
         "".join(json.dumps({"inputs": f"Review {i}: it was {w}. Positive or "
                             "negative?", "targets": t,
                             "answer_choices": ["Negative", "Positive"]}) + "\n"
                 for i, (w, t) in enumerate([("great", "Positive"),
                                             ("bad", "Negative")] * 3)))
  rte_features = tfds.features.FeaturesDict({
      "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
      "idx": tf.int32,
      "label": tfds.features.ClassLabel(names=["entailment", "not_entailment"])})
  _tfds_dataset(root, "super_glue", "rte", "1.0.2", rte_features, [
      {"premise": f"{c} has a capital named {k}.", "hypothesis":
       f"{k} is in {c}." if i % 2 == 0 else f"{k} is in Mars.", "idx": i,
       "label": i % 2} for i, (c, k) in enumerate(CAPITALS)])
  boolq_features = tfds.features.FeaturesDict({
      "question": tfds.features.Text(), "title": tfds.features.Text(),
      "passage": tfds.features.Text(), "answer": tf.bool})
  _tfds_dataset(root, "bool_q", None, "1.0.0", boolq_features, [
      {"question": f"is {k} the capital of {c}", "title": c,
       "passage": f"The capital of {c} is {k}.", "answer": True}
      for c, k in CAPITALS[:4]])
  _write_eval(root)
  saved = {k: os.environ.get(k) for k in ("FLAN_DATA_DIR", "FLAN_VOCAB")}
  os.environ["FLAN_DATA_DIR"] = root
  os.environ["FLAN_VOCAB"] = spm_model
  yield root
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope="session")
def read_task(data_root):
  """Returns examples(task_name, split, n): decoded examples of a task."""
  del data_root  # Only needed for its environment.
  return examples


def examples(task_name, split="train", n=None, sequence_length=None):
  """Decoded examples (dicts of Python values) of a registered task."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(sequence_length=sequence_length, split=split,
                             shuffle=False)
  if n is not None:
    dataset = dataset.take(n)
  out = []
  for ex in dataset.as_numpy_iterator():
    out.append({k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()})
  return out
