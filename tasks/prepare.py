"""`python -m moe_jax_tasks prepare --out DIR`: builds a data root from public sources.

Needs internet (run it once, then point FLAN_DATA_DIR at DIR, or copy DIR to gs://).
Parts (`--parts`, default all):

  niv2   allenai/natural-instructions tasks/<task>.json for the 1,556 NIv2 tasks
  cot    the collection's nine CoT TSVs (google-research/FLAN, flan/v2/cot_data)
  tfds   the Muffin TFDS datasets, prepared by TFDS into DIR/tfds
  p3     the 193 T0-SF subsets through TFDS's Hugging Face bridge
         (`huggingface:bigscience__p3/<subset>`), exported as DIR/p3/<subset>/train.jsonl
  eval   MMLU, BBH, GSM8K, SVAMP, ASDiv, TyDiQA GoldP, MGSM files under DIR/eval

Every download goes through an injectable `fetch(url) -> bytes` and TFDS module, so
the command is tested offline with fakes. Existing files are kept (re-runs resume).
StrategyQA and the MMLU CoT prompts are not fetched (no stable public file); put
them under eval/ as documented in evals/.
"""

import io
import json
import logging
import os
import tarfile
import urllib.request
from typing import Callable, Iterable, Optional

import tensorflow as tf

from moe_jax_tasks.catalog import catalog as catalog_lib
from moe_jax_tasks import errors

Fetch = Callable[[str], bytes]
PARTS = ("niv2", "cot", "tfds", "p3", "eval")

NIV2_URL = ("https://raw.githubusercontent.com/allenai/natural-instructions/master/"
            "tasks/{task}.json")
COT_URL = ("https://raw.githubusercontent.com/google-research/FLAN/main/flan/v2/"
           "cot_data/{dataset}_train.tsv")
MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
BBH_URL = ("https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/"
           "{path}")
GSM8K_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
             "grade_school_math/data/{split}.jsonl")
SVAMP_URL = "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/SVAMP.json"
ASDIV_URL = ("https://raw.githubusercontent.com/chaochun/nlu-asdiv-dataset/master/"
             "dataset/ASDiv.xml")
TYDIQA_URL = "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-{split}.json"
MGSM_URL = ("https://raw.githubusercontent.com/google-research/url-nlp/main/mgsm/"
            "mgsm_{language}.tsv")


class DownloadError(errors.Error, OSError):
  """A public source could not be downloaded."""


def urllib_fetch(url: str) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310
      return response.read()
  except OSError as error:  # URLError, HTTPError and timeouts among them.
    raise DownloadError(
        f"Cannot download {url} ({error}). `prepare` needs internet: run it where "
        "there is and copy DIR here; files already written are kept, so a re-run "
        "resumes.") from error


def _write(path: str, data: bytes) -> None:
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)


def _download(fetch: Fetch, url: str, path: str) -> bool:
  """Downloads url to path unless it exists; returns whether it wrote."""
  if tf.io.gfile.exists(path):
    return False
  _write(path, fetch(url))
  return True


def prepare_niv2(out: str, fetch: Fetch, only: Optional[set] = None) -> int:
  count = 0
  for task in catalog_lib.names("niv2"):
    if only is None or task in only:
      count += _download(fetch, NIV2_URL.format(task=task),
                         os.path.join(out, "niv2", "tasks", f"{task}.json"))
  return count


def prepare_cot(out: str, fetch: Fetch, only: Optional[set] = None) -> int:
  count = 0
  for task in catalog_lib.names("cot"):
    if only is None or task in only:
      dataset = catalog_lib.cot_dataset(task)
      count += _download(fetch, COT_URL.format(dataset=dataset),
                         os.path.join(out, "cot", f"{dataset}_train.tsv"))
  return count


def prepare_tfds(out: str, tfds_module, only: Optional[set] = None) -> int:
  """Prepares each released Muffin TFDS dataset into out/tfds (TFDS layout)."""
  data_dir = os.path.join(out, "tfds")
  done = set()
  for entry in catalog_lib.entries():
    if entry.source_kind != catalog_lib.TFDS or (only and entry.name not in only):
      continue
    if entry.location in done:
      continue
    tfds_module.builder(entry.location, data_dir=data_dir).download_and_prepare()
    done.add(entry.location)
  return len(done)


def _plain(value):
  """numpy / bytes values of a TFDS example -> JSON values."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "tolist"):
    return _plain(value.tolist())
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return value


def prepare_p3(out: str, tfds_module, only: Optional[set] = None) -> int:
  """Exports each T0-SF subset (via TFDS's HF bridge) to p3/<subset>/train.jsonl."""
  count = 0
  for subset in catalog_lib.names("t0_sf"):
    if only is not None and subset not in only:
      continue
    path = os.path.join(out, "p3", subset, "train.jsonl")
    if tf.io.gfile.exists(path):
      continue
    builder = tfds_module.builder(f"huggingface:bigscience__p3/{subset}",
                                  data_dir=os.path.join(out, "tfds"))
    builder.download_and_prepare()
    lines = []
    for example in tfds_module.as_numpy(builder.as_dataset(split="train")):
      example = _plain(example)
      lines.append(json.dumps({
          "inputs": example["inputs_pretokenized"],
          "targets": example["targets_pretokenized"],
          "answer_choices": example.get("answer_choices") or []},
                              ensure_ascii=False))
    _write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    count += 1
  return count


def prepare_eval(out: str, fetch: Fetch) -> int:
  """MMLU, BBH, GSM8K, SVAMP, ASDiv, TyDiQA GoldP and MGSM in the evals/ layout."""
  root = os.path.join(out, "eval")
  count = 0
  if not tf.io.gfile.exists(os.path.join(root, "mmlu", "dev")):
    with tarfile.open(fileobj=io.BytesIO(fetch(MMLU_URL))) as archive:
      for member in archive.getmembers():
        parts = member.name.split("/")
        if member.isfile() and len(parts) >= 3 and parts[-2] in ("dev", "val",
                                                                 "test"):
          _write(os.path.join(root, "mmlu", parts[-2], parts[-1]),
                 archive.extractfile(member).read())
          count += 1
  for subtask in catalog_lib.names("eval_bbh_subtasks"):
    count += _download(fetch, BBH_URL.format(path=f"bbh/{subtask}.json"),
                       os.path.join(root, "bbh", f"{subtask}.json"))
    count += _download(fetch, BBH_URL.format(path=f"cot-prompts/{subtask}.txt"),
                       os.path.join(root, "bbh", "cot-prompts", f"{subtask}.txt"))
  for split in ("train", "test"):
    count += _download(fetch, GSM8K_URL.format(split=split),
                       os.path.join(root, "gsm8k", f"{split}.jsonl"))
  count += _download(fetch, SVAMP_URL, os.path.join(root, "svamp", "SVAMP.json"))
  count += _download(fetch, ASDIV_URL, os.path.join(root, "asdiv", "ASDiv.xml"))
  for split in ("train", "dev"):
    count += _download(fetch, TYDIQA_URL.format(split=split), os.path.join(
        root, "tydiqa", f"tydiqa-goldp-v1.1-{split}.json"))
  for language in catalog_lib.names("eval_mgsm_languages"):
    count += _download(fetch, MGSM_URL.format(language=language),
                       os.path.join(root, "mgsm", f"mgsm_{language}.tsv"))
  return count


def prepare(out: str, parts: Iterable[str] = PARTS, only: Optional[set] = None,
            fetch: Fetch = urllib_fetch, tfds_module=None) -> dict[str, int]:
  """Runs the requested parts; returns how many files/datasets each produced.

  Args:
    out: the data root to fill (local or gs://).
    parts: subset of PARTS.
    only: restrict to these catalog task names (niv2, cot, tfds, p3).
    fetch: url -> bytes.
    tfds_module: the tensorflow_datasets module (or a fake with the same calls).

  Raises:
    errors.UsageError: (a ValueError) for an unknown part.
    DownloadError: when a source cannot be downloaded.
  """
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise errors.UsageError(
        f"Unknown prepare parts {sorted(unknown)}; choose from {PARTS}.")
  if tfds_module is None and {"tfds", "p3"} & set(parts):
    import tensorflow_datasets as tfds_module  # pylint: disable=g-import-not-at-top
  done = {}
  for part in parts:
    if part == "niv2":
      done[part] = prepare_niv2(out, fetch, only)
    elif part == "cot":
      done[part] = prepare_cot(out, fetch, only)
    elif part == "tfds":
      done[part] = prepare_tfds(out, tfds_module, only)
    elif part == "p3":
      done[part] = prepare_p3(out, tfds_module, only)
    else:
      done[part] = prepare_eval(out, fetch)
    logging.info("prepare %s: %d written under %s", part, done[part], out)
  return done
