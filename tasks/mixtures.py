"""The collection's mixtures: per-format sub-mixtures, submixes and flan2022_submix.

Within a sub-mixture tasks are mixed examples-proportionally with a per-task cap
(`config.mixture_caps`: Flan 2021 30k, T0 20k, NIv2 5k, CoT 100k, dialog 200k). The
settings are the collection's: zero-shot with options (`*_zsopt`), zero-shot without
(`*_zsnoopt`), few-shot with options (`*_fsopt`: the 5-shot template mix plus the
same-template x-shot) and few-shot without (`*_fsnoopt`: the x-shot). NIv2, CoT and
dialog have no options, so they have `_zsopt` and `_fsopt` only. CoT and dialog mix
their input-inversion variants at 0.3 against 1.

Every rate is read from `config` when the mixture is sampled, so gin bindings made
after import apply. Tasks whose data was never released are not in these mixtures.
"""

import numbers
from typing import Callable, Iterable

import seqio

from moe_jax_tasks import config
from moe_jax_tasks import registry

# The collection's settings, as (name, zero-shot, with options).
SETTINGS = (("zsopt", True, True), ("zsnoopt", True, False),
            ("fsopt", False, True), ("fsnoopt", False, False))
SUBMIXES = ("flan2021", "t0", "niv2", "cot", "dialog")
_WITHOUT_NOOPT = ("niv2", "cot", "dialog")


class ConfiguredRate:
  """A sub-mixture weight read from the configuration each time it is used.

  seqio requires sub-mixture rates to be numbers; this object is registered as a
  `numbers.Number` and converts with `float()`.
  """

  def __init__(self, read: Callable[[], float], description: str):
    self._read = read
    self._description = description

  def __float__(self) -> float:
    return float(self._read())

  def __repr__(self) -> str:
    return f"ConfiguredRate({self._description}={float(self)})"


numbers.Number.register(ConfiguredRate)


def capped_rate(task: seqio.Task, cap: str) -> float:
  """Examples-proportional rate: min(number of training examples, cap)."""
  return float(min(config.mixture_caps()[cap], task.num_input_examples("train")))


def setting_formats(has_options: bool, zero_shot: bool,
                    with_options: bool) -> tuple[str, ...]:
  """The format names a task contributes to one setting."""
  if zero_shot:
    if not has_options:
      return ("zs",)
    return ("zs_opt",) if with_options else ("zs_noopt",)
  if not has_options:
    return ("fs5", "xs") if with_options else ("xs",)
  return ("fs5_opt", "xs_opt") if with_options else ("xs_noopt",)


def _capped(names: Iterable[str], cap: str):
  return [(name, lambda task, cap=cap: capped_rate(task, cap)) for name in names]


def _tasks_of(submix: str, *, inversion: bool = False) -> list[registry.TaskRecord]:
  return [r for r in registry.TASKS.values()
          if r.submix == submix and r.in_default_mixtures and (
              not inversion or r.inversion)]


def _setting_names(records, zero_shot, with_options, inversion=False):
  names = []
  for record in records:
    seqio_tasks = record.inversion_seqio_tasks if inversion else record.seqio_tasks
    has_options = record.has_options and not inversion
    names += [seqio_tasks[f] for f in setting_formats(has_options, zero_shot,
                                                       with_options)]
  return names


def _setting_rate(zero_shot: bool, with_options: bool, submix: str):
  def read():
    shares = config.format_rates()
    z = shares["zero_shot"] if zero_shot else 1 - shares["zero_shot"]
    if submix in _WITHOUT_NOOPT:
      return z
    o = shares["with_options"] if with_options else 1 - shares["with_options"]
    return z * o
  return ConfiguredRate(read, f"{submix} {'zs' if zero_shot else 'fs'}"
                        f"{'' if submix in _WITHOUT_NOOPT else ('opt' if with_options else 'noopt')}")


def _register_submix(submix: str) -> None:
  records = _tasks_of(submix)
  parts = []
  for setting, zero_shot, with_options in SETTINGS:
    if submix in _WITHOUT_NOOPT and not with_options:
      continue
    name = f"{submix}_{setting}"
    base = _capped(_setting_names(records, zero_shot, with_options), submix)
    if submix in ("cot", "dialog"):
      seqio.MixtureRegistry.add(f"{name}_base", base)
      inverted = _capped(_setting_names(_tasks_of(submix, inversion=True),
                                        zero_shot, with_options, inversion=True),
                         submix)
      seqio.MixtureRegistry.add(f"{submix}_ii_{setting}", inverted)
      seqio.MixtureRegistry.add(name, [
          (f"{name}_base", 1.0),
          (f"{submix}_ii_{setting}",
           ConfiguredRate(config.input_inversion_rate, "input_inversion"))])
    else:
      seqio.MixtureRegistry.add(name, base)
    parts.append((name, _setting_rate(zero_shot, with_options, submix)))
  seqio.MixtureRegistry.add(f"{submix}_submix", parts)


def _register_all() -> None:
  for submix in SUBMIXES:
    _register_submix(submix)
  seqio.MixtureRegistry.add("flan2022_submix", [
      (f"{submix}_submix",
       ConfiguredRate(lambda s=submix: config.flan2022_rates()[s], submix))
      for submix in SUBMIXES])


_register_all()
