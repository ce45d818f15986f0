"""The bundled sample mixtures, the command line and the offline-tested prepare."""

import contextlib
import io
import json
import os
import tarfile

import seqio
import tensorflow as tf

from moe_jax_tasks import __main__ as cli
from moe_jax_tasks import prepare
from moe_jax_tasks import sample


def test_sample_vocabulary_is_offline():
  vocabulary = sample.vocabulary()
  assert os.path.getsize(sample.vocabulary_path()) < 1_000_000
  ids = vocabulary.encode("What is the capital of France?")
  assert vocabulary.decode(ids) == "What is the capital of France?"
  assert vocabulary.eos_id == 1 and vocabulary.vocab_size > 500


def test_flan_sample_mixture_composition():
  mixture = seqio.get_mixture_or_task("flan_sample")
  sources_seen = {t.name.split(":")[1] for t in mixture.tasks}
  assert sources_seen == {"muffin", "t0_sf", "niv2", "cot"}
  assert len(mixture.tasks) == len(sample.TRAINING_TASKS)
  rte = seqio.get_mixture_or_task("sample:muffin:rte:zs_opt")
  assert mixture.get_rate(rte) == 30.0  # examples-proportional: 30 examples


def test_zero_shot_sample_mixture_trains_offline():
  zero_shot = [n for n in sample.TRAINING_TASKS if n.endswith((":zs", ":zs_opt"))]
  assert len(zero_shot) == 11 + 2  # 11 tasks and the 2 CoT inversions
  mixture = seqio.Mixture("sample_zero_shot_for_test", zero_shot, default_rate=1.0)
  dataset = mixture.get_dataset({"inputs": 256, "targets": 64}, split="train",
                                shuffle=False, num_epochs=None)
  for example in dataset.take(20).as_numpy_iterator():
    assert set(example) == {"inputs", "targets"}
    assert example["targets"][-1] == 1 and len(example["inputs"]) <= 256


def test_sample_eval_tasks_yield_examples():
  for task in seqio.get_mixture_or_task("flan_sample_eval").tasks:
    dataset = task.get_dataset(None, split=task.splits[0], shuffle=False)
    assert next(iter(dataset)), task.name


def test_sample_eval_is_held_out():
  with open(os.path.join(sample.DATA_DIR, "cot", "gsm8k_train.tsv")) as f:
    training = {line.split("\t")[0] for line in f}
  with open(os.path.join(sample.DATA_DIR, "eval", "gsm8k", "test.jsonl")) as f:
    held_out = {json.loads(line)["question"] for line in f}
  assert held_out and not held_out & training


def _run_cli(*args):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    cli.main(list(args))
  return out.getvalue()


def test_cli_list_stats_show():
  lines = _run_cli("list", "--mixture", "cot").strip().split("\n")
  assert len(lines) == 9 and lines[0].startswith("cot_gsm8k\tcot\tcot_tsv\t")
  assert "training tasks: 1838" in _run_cli("stats")
  shown = _run_cli("show", "sample:niv2:task1146_country_capital:zs", "--n", "2")
  assert "Input: Spain" in shown or "Spain" in shown
  assert shown.count("targets:") == 2


def _fake_tar():
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as archive:
    for folder in ("dev", "val", "test"):
      data = b"What is 1 plus 1?,2,3,4,5,A\n"
      info = tarfile.TarInfo(f"data/{folder}/anatomy_{folder}.csv")
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


class _FakeBuilder:

  def __init__(self, name, calls):
    self.name, self.calls = name, calls

  def download_and_prepare(self):
    self.calls.append(self.name)

  def as_dataset(self, split):
    assert split == "train"
    return tf.data.Dataset.from_tensor_slices({
        "inputs_pretokenized": [b"Is it good? yes or no"],
        "targets_pretokenized": [b" yes\n"],
        "answer_choices": [[b"no", b"yes"]]})


class _FakeTfds:

  def __init__(self):
    self.calls, self.data_dirs = [], set()

  def builder(self, name, data_dir):
    self.data_dirs.add(data_dir)
    return _FakeBuilder(name, self.calls)

  @staticmethod
  def as_numpy(dataset):
    return dataset.as_numpy_iterator()


def test_prepare_offline_with_fakes(tmp_path, monkeypatch, spm_model):
  urls = []

  def fetch(url):
    urls.append(url)
    if url == prepare.MMLU_URL:
      return _fake_tar()
    if url.endswith(".json") and "natural-instructions" in url:
      return json.dumps({"Definition": ["d"], "Positive Examples": [],
                         "Instances": [{"input": "i", "output": ["o"]}]}).encode()
    if url.endswith(".tsv") and "cot_data" in url:
      return b"q\ta\tc\n"
    return b"{}"

  fake_tfds = _FakeTfds()
  out = str(tmp_path)
  only = {"task1146_country_capital", "cot_gsm8k", "rte",
          "amazon_polarity_Is_this_review"}
  done = prepare.prepare(out, only=only, fetch=fetch, tfds_module=fake_tfds)
  assert done["niv2"] == 1 and done["cot"] == 1 and done["p3"] == 1
  assert fake_tfds.calls == ["super_glue/rte:1.0.2",
                             "huggingface:bigscience__p3/amazon_polarity_Is_this_review"]
  assert fake_tfds.data_dirs == {os.path.join(out, "tfds")}
  assert os.path.exists(os.path.join(out, "eval", "mmlu", "val", "anatomy_val.csv"))
  assert os.path.exists(os.path.join(out, "eval", "bbh", "cot-prompts",
                                     "navigate.txt"))
  assert os.path.exists(os.path.join(out, "eval", "mgsm", "mgsm_sw.tsv"))
  # The export is read back by the registry.
  monkeypatch.setenv("FLAN_DATA_DIR", out)
  monkeypatch.setenv("FLAN_VOCAB", spm_model)
  task = seqio.get_mixture_or_task(
      "t0_sf:amazon_polarity_Is_this_review:zs_opt")
  example = next(task.get_dataset(None, split="train", shuffle=False)
                 .as_numpy_iterator())
  assert example["targets_pretokenized"] == b"yes"
  assert b"OPTIONS:\n- no\n- yes" in example["inputs_pretokenized"]
  # A second run resumes: nothing is downloaded again.
  urls.clear()
  prepare.prepare(out, parts=["niv2", "cot", "eval"], only=only, fetch=fetch,
                  tfds_module=fake_tfds)
  assert urls == []
