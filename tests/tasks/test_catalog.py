"""The registry holds exactly the catalog: counts, names, formats, exclusions."""

import collections
import os
import re
import subprocess
import sys

import pytest
import seqio

import moe_jax_tasks
from moe_jax_tasks.catalog import catalog as catalog_lib
from moe_jax_tasks import registry

EXPECTED = {"muffin": 80, "t0_sf": 193, "niv2": 1556, "cot": 9}


@pytest.mark.parametrize("mixture,count", sorted(EXPECTED.items()))
def test_catalog_counts_per_mixture(mixture, count):
  assert len(moe_jax_tasks.catalog(mixture)) == count


def test_every_catalog_name_is_registered_once():
  records = moe_jax_tasks.catalog()
  assert len(records) == 1838
  names = [r.name for r in records]
  assert len(set(names)) == len(names)
  seqio_names = [n for r in records for n in
                 list(r.seqio_tasks.values()) + list(r.inversion_seqio_tasks.values())]
  assert len(set(seqio_names)) == len(seqio_names)
  registered = set(seqio.TaskRegistry.names())
  assert set(seqio_names) <= registered
  # Every registered training task belongs to exactly one catalog record.
  training = {n for n in registered
              if n.split(":")[0] in EXPECTED and not n.startswith("sample:")}
  assert training == set(seqio_names)


def test_formats_follow_options():
  for record in moe_jax_tasks.catalog():
    expected = ({"zs_opt", "zs_noopt", "fs5_opt", "fs5_noopt", "xs_opt",
                 "xs_noopt"} if record.has_options else {"zs", "fs5", "xs"})
    assert set(record.seqio_tasks) == expected, record.name


def test_inversion_variants_for_cot_and_dialog():
  with_inversion = {r.name: r.inversion for r in moe_jax_tasks.catalog()
                    if r.inversion_seqio_tasks}
  assert with_inversion["cot_gsm8k"] == "cot_input_inversion_gsm8k"
  assert with_inversion["stream_aqua"] == "stream_input_inversion_aqua"
  assert with_inversion["wiki_dialog"] == "wiki_dialog_input_inversion"
  assert len(with_inversion) == 9 + 2  # 9 CoT + wiki_dialog and qrecc


def test_hyphen_is_written_as_underscore_in_seqio_names():
  record = {r.name: r for r in moe_jax_tasks.catalog()}[
      "task105_story_cloze-rocstories_sentence_generation"]
  assert record.seqio_tasks["zs"] == (
      "niv2:task105_story_cloze_rocstories_sentence_generation:zs")


def test_mmlu_derived_niv2_tasks_are_absent_everywhere():
  excluded = set(catalog_lib.names("niv2_excluded_mmlu_derived"))
  assert len(excluded) == 57
  assert not excluded & {r.name for r in moe_jax_tasks.catalog()}
  for name in seqio.TaskRegistry.names():
    assert not any(f":{task}:" in name for task in excluded), name
  for task in seqio.get_mixture_or_task("flan2022_submix").tasks:
    assert not any(f":{t}:" in task.name for t in excluded)


def test_records_describe_sources():
  by_name = {r.name: r for r in moe_jax_tasks.catalog()}
  assert by_name["rte"].location == "super_glue/rte:1.0.2"
  assert by_name["rte"].category == "nli"
  assert by_name["task1146_country_capital"].location == (
      "niv2/tasks/task1146_country_capital.json")
  assert by_name["task1146_country_capital"].category == (
      "Country Capital Prediction")
  assert by_name["cot_qasc"].location == "cot/qasc_train.tsv"
  assert by_name["task_master"].source_kind == "unreleased"
  assert not by_name["task_master"].in_default_mixtures
  kinds = collections.Counter(r.source_kind for r in moe_jax_tasks.catalog())
  assert kinds == {"tfds": 73, "unreleased": 7, "p3": 193, "niv2_json": 1556,
                   "cot_tsv": 9}


def test_unknown_mixture_is_rejected():
  with pytest.raises(ValueError, match="Unknown mixture 'flan'"):
    moe_jax_tasks.catalog("flan")


def test_every_muffin_tfds_task_has_a_normalizer():
  from moe_jax_tasks import flan2021  # pylint: disable=g-import-not-at-top
  released = {r.name for r in moe_jax_tasks.catalog("muffin")
              if r.source_kind == "tfds"}
  assert released == set(flan2021.SPECS)


def test_template_groups_exist_for_every_task():
  from moe_jax_tasks import templates  # pylint: disable=g-import-not-at-top
  groups = templates.all_groups()
  for record in registry.TASKS.values():
    assert record.template_group in groups
    assert len(groups[record.template_group]) >= 4


def test_the_package_never_imports_jax_or_the_framework():
  # seqio itself loads jax through clu; what must hold is that our code does not.
  package = os.path.dirname(moe_jax_tasks.__file__)
  pattern = re.compile(r"^\s*(import|from)\s+(jax|flax|moe_jax)\b", re.MULTILINE)
  for folder, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
          assert not pattern.search(f.read()), os.path.join(folder, name)
  code = "import sys, moe_jax_tasks; assert 'moe_jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
