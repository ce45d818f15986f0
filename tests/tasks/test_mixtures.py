"""Mixtures: membership, caps and rates, configurable through gin."""

import gin
import pytest
import seqio

import moe_jax_tasks
from moe_jax_tasks import config
from moe_jax_tasks import formats
from moe_jax_tasks import mixtures


@pytest.fixture
def gin_bindings():
  yield gin.parse_config
  gin.clear_config()


@pytest.mark.parametrize("name,count", [
    ("niv2_zsopt", 1556), ("niv2_fsopt", 2 * 1556), ("t0_zsopt", 193),
    ("t0_fsopt", 2 * 193), ("t0_fsnoopt", 193), ("flan2021_zsnoopt", 71),
    ("dialog_zsopt_base", 2), ("dialog_ii_zsopt", 2), ("cot_zsopt_base", 9),
    ("cot_ii_fsopt", 18)])
def test_sub_mixture_sizes(name, count):
  assert len(seqio.get_mixture_or_task(name).tasks) == count


def test_unreleased_tasks_are_not_mixed():
  names = {t.name for t in seqio.get_mixture_or_task("flan2022_submix").tasks}
  assert not any(":task_master:" in n or ":dmcc_python:" in n for n in names)
  # Every released format is mixed, except the 5-shot template mix without options:
  # the collection's few-shot no-options setting uses the x-shot only.
  released = sum(len(r.seqio_tasks) - ("fs5_noopt" in r.seqio_tasks)
                 for r in moe_jax_tasks.catalog() if r.in_default_mixtures)
  inverted = sum(len(r.inversion_seqio_tasks) for r in moe_jax_tasks.catalog())
  assert len(names) == released + inverted


def test_flan2022_top_level_rates_and_gin_override(gin_bindings):
  mixture = seqio.get_mixture_or_task("flan2022_submix")
  rates = {name: float(rate) for name, rate in mixture.rate_per_task_name.items()}
  assert rates == {"flan2021_submix": 0.4, "t0_submix": 0.32, "niv2_submix": 0.2,
                   "cot_submix": 0.05, "dialog_submix": 0.03}
  gin_bindings("moe_jax_tasks.config.flan2022_rates.niv2 = 0.5")
  assert float(mixture.rate_per_task_name["niv2_submix"]) == 0.5


def test_setting_shares(gin_bindings):
  flan = seqio.get_mixture_or_task("flan2021_submix").rate_per_task_name
  assert {k: float(v) for k, v in flan.items()} == {
      "flan2021_zsopt": 0.25, "flan2021_zsnoopt": 0.25, "flan2021_fsopt": 0.25,
      "flan2021_fsnoopt": 0.25}
  cot = seqio.get_mixture_or_task("cot_submix").rate_per_task_name
  assert {k: float(v) for k, v in cot.items()} == {"cot_zsopt": 0.5,
                                                  "cot_fsopt": 0.5}
  inversion = seqio.get_mixture_or_task("cot_zsopt").rate_per_task_name
  assert float(inversion["cot_ii_zsopt"]) == 0.3
  assert float(inversion["cot_zsopt_base"]) == 1.0
  gin_bindings("moe_jax_tasks.config.format_rates.zero_shot = 0.8")
  assert float(flan["flan2021_zsopt"]) == pytest.approx(0.4)
  assert float(cot["cot_fsopt"]) == pytest.approx(0.2)


def test_examples_proportional_rate_is_capped(gin_bindings):
  niv2 = seqio.get_mixture_or_task("niv2_zsopt")
  big = seqio.get_mixture_or_task("niv2:task1146_country_capital:zs")  # 231 ex.
  huge = seqio.get_mixture_or_task("niv2:task001_quoref_question_generation:zs")
  assert niv2.get_rate(big) == 231.0
  assert niv2.get_rate(huge) == 4225.0
  capped = seqio.get_mixture_or_task("niv2:task002_quoref_answer_generation:zs")
  assert niv2.get_rate(capped) == 5000.0  # 6,500 instances, NIv2 cap 5,000
  gin_bindings("moe_jax_tasks.config.mixture_caps.niv2 = 300")
  assert niv2.get_rate(big) == 231.0
  assert niv2.get_rate(capped) == 300.0


def test_default_caps_and_lengths():
  assert config.mixture_caps() == {"flan2021": 30000, "t0": 20000, "niv2": 5000,
                                   "cot": 100000, "dialog": 200000}
  assert config.SEQUENCE_LENGTH == {"inputs": 2048, "targets": 512}
  assert config.FEW_SHOT_MAX_INPUT_TOKENS == 1920


def test_capped_rate_counts_real_files(data_root):
  task = seqio.get_mixture_or_task("cot:cot_gsm8k:zs")
  assert mixtures.capped_rate(task, "cot") == 8.0


def test_setting_formats():
  assert mixtures.setting_formats(True, True, True) == ("zs_opt",)
  assert mixtures.setting_formats(True, False, True) == ("fs5_opt", "xs_opt")
  assert mixtures.setting_formats(True, False, False) == ("xs_noopt",)
  assert mixtures.setting_formats(False, True, False) == ("zs",)


def test_sub_mixture_rates_reach_seqio_as_plain_floats():
  for name in ("flan2022_submix", "t0_submix", "niv2_submix", "cot_zsopt"):
    rates = seqio.get_mixture_or_task(name).rate_per_task_name
    assert rates and all(type(rate) is float for rate in rates.values()), name


def test_gin_binding_after_import_changes_seqio_sampling(gin_bindings):
  mixture = seqio.get_mixture_or_task("flan2022_submix")
  task = seqio.get_mixture_or_task("niv2:task1146_country_capital:zs")
  before = mixture.get_rate(task)
  assert before > 0
  gin_bindings("moe_jax_tasks.config.flan2022_rates.niv2 = 0.4")
  assert mixture.get_rate(task) == pytest.approx(2 * before)
  gin_bindings("moe_jax_tasks.config.format_rates.zero_shot = 0.75")
  assert mixture.get_rate(task) == pytest.approx(3 * before)


@pytest.mark.parametrize("submix,task", [("t0", "amazon_polarity_Is_this_review"),
                                         ("niv2", "task1146_country_capital"),
                                         ("flan2021", "bool_q")])
def test_settings_hold_the_formats_the_table_assigns(submix, task):
  record = {r.name: r for r in moe_jax_tasks.catalog()}[task]
  for setting in formats.SETTINGS:
    name = f"{submix}_{setting.name}"
    if name not in seqio.MixtureRegistry.names():
      assert submix == "niv2" and not setting.with_options
      continue
    mixed = {t.name for t in seqio.get_mixture_or_task(name).tasks}
    assert mixed & set(record.seqio_tasks.values()) == {
        record.seqio_tasks[f.name] for f in formats.formats_for(record.has_options)
        if setting.name in f.settings}, name
