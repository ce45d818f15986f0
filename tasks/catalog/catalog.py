"""Parses the collection's task-name lists (plain data files next to this module).

The lists are copied unchanged from the project's shared Flan catalog (see SOURCE.md):
Muffin 80, T0-SF 193, NIv2 1,556, CoT 9 = 1,838 training tasks. The Flan 2022 paper
counts 1,836 because it lists 1,554 NIv2 tasks; the public collection defines 1,556 and
does not say which two the paper left out, so all 1,556 are registered here.
"""

import csv
import dataclasses
import functools
import os
from typing import Optional

_DIR = os.path.dirname(os.path.abspath(__file__))

MIXTURES = ("muffin", "t0_sf", "niv2", "cot")
EXPECTED_COUNTS = {"muffin": 80, "t0_sf": 193, "niv2": 1556, "cot": 9}
# Data kinds, as they appear in `CatalogEntry.source_kind`.
TFDS, P3, NIV2_JSON, COT_TSV, UNRELEASED = (
    "tfds", "p3", "niv2_json", "cot_tsv", "unreleased")


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  """One training task of the collection, as the data files describe it.

  Attributes:
    name: the collection's task name (NIv2: the JSON file's stem).
    mixture: muffin, t0_sf, niv2 or cot.
    submix: the sub-mixture it is trained in: flan2021, dialog, t0, niv2, cot, or
      `unreleased` (data never published; not in the default mixtures).
    source_kind: tfds, p3, niv2_json, cot_tsv or unreleased.
    location: where the data is read from, relative to FLAN_DATA_DIR, or a TFDS
      `name:version`.
    category: NIv2 generic category, `chain-of-thought`, `prompted (P3)`, or for
      Muffin the template family (filled in by the registry).
    inversion: name of its input-inversion variant (CoT and dialog), if any.
    num_examples: training examples according to the collection's metadata (NIv2
      only; None where the metadata has no count).
  """
  name: str
  mixture: str
  submix: str
  source_kind: str
  location: str
  category: str
  inversion: Optional[str] = None
  num_examples: Optional[int] = None


def _read_lines(filename: str) -> list[str]:
  with open(os.path.join(_DIR, filename), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _read_tsv(filename: str) -> list[dict[str, str]]:
  with open(os.path.join(_DIR, filename), encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


@functools.lru_cache(maxsize=None)
def names(listname: str) -> tuple[str, ...]:
  """Returns one of the data lists by file stem, e.g. `niv2`, `eval_mmlu_subjects`."""
  return tuple(_read_lines(listname + ".txt"))


def _muffin_entries() -> list[CatalogEntry]:
  tfds_sources = {row["task"]: row["tfds_name_and_version"]
                  for row in _read_tsv("muffin_tfds_sources.tsv")}
  flan2021 = set(names("muffin_flan2021_in_code"))
  dialog = set(names("muffin_dialog"))
  entries = []
  for name in names("muffin"):
    source = tfds_sources[name]
    released = not source.startswith("not released")
    if not released:
      submix, kind, location = UNRELEASED, UNRELEASED, f"unreleased/{name}/train.jsonl"
    else:
      submix = "dialog" if name in dialog else "flan2021"
      if name not in flan2021 and name not in dialog:
        raise ValueError(f"Muffin task {name!r} is in no sub-list of the catalog.")
      kind, location = TFDS, source
    inversion = f"{name}_input_inversion" if submix == "dialog" else None
    entries.append(CatalogEntry(name, "muffin", submix, kind, location, "",
                                inversion=inversion))
  return entries


def _t0_entries() -> list[CatalogEntry]:
  return [CatalogEntry(name, "t0_sf", "t0", P3, f"p3/{name}", "prompted (P3)")
          for name in names("t0_sf")]


def _niv2_entries() -> list[CatalogEntry]:
  metadata = {row["task"]: row for row in _read_tsv("niv2_metadata.tsv")}
  excluded = set(names("niv2_excluded_mmlu_derived"))
  entries = []
  for name in names("niv2"):
    if name in excluded:
      raise ValueError(f"NIv2 task {name!r} is MMLU-derived and must not be trained.")
    row = metadata[name]
    entries.append(CatalogEntry(
        name, "niv2", "niv2", NIV2_JSON, f"niv2/tasks/{name}.json",
        row["generic_category"], num_examples=int(row["num_instances"])))
  return entries


def cot_dataset(name: str) -> str:
  """`cot_gsm8k` -> `gsm8k`, `stream_aqua` -> `aqua`: the TSV file's stem."""
  return name.split("_", 1)[1]


def _cot_entries() -> list[CatalogEntry]:
  inversions = {name.rsplit("_inversion_", 1)[1]: name
                for name in names("cot_input_inversion")}
  entries = []
  for name in names("cot"):
    dataset = cot_dataset(name)
    entries.append(CatalogEntry(
        name, "cot", "cot", COT_TSV, f"cot/{dataset}_train.tsv",
        "chain-of-thought", inversion=inversions[dataset]))
  return entries


@functools.lru_cache(maxsize=None)
def entries() -> tuple[CatalogEntry, ...]:
  """All 1,838 training tasks, in list order: Muffin, T0-SF, NIv2, CoT.

  Raises:
    ValueError: if a list does not have the count the collection documents, or a
      name appears twice, so a damaged data file cannot shrink the registry.
  """
  result = (_muffin_entries() + _t0_entries() + _niv2_entries() + _cot_entries())
  for mixture, expected in EXPECTED_COUNTS.items():
    got = sum(e.mixture == mixture for e in result)
    if got != expected:
      raise ValueError(f"Catalog list for {mixture} has {got} tasks, expected "
                       f"{expected}; the data files in {_DIR} are damaged.")
  seen = set()
  for e in result:
    if e.name in seen:
      raise ValueError(f"Task {e.name!r} appears twice in the catalog.")
    seen.add(e.name)
  return tuple(result)
