"""The collection's mixtures: per-format sub-mixtures, submixes and flan2022_submix.

Within a sub-mixture tasks are mixed examples-proportionally with a per-task cap
(`config.mixture_caps`: Flan 2021 30k, T0 20k, NIv2 5k, CoT 100k, dialog 200k). The
settings are the collection's (`formats.SETTINGS`): zero-shot with options
(`*_zsopt`), zero-shot without (`*_zsnoopt`), few-shot with options (`*_fsopt`: the
5-shot template mix plus the same-template x-shot) and few-shot without (`*_fsnoopt`:
the x-shot). NIv2, CoT and dialog have no options, so they have `_zsopt` and `_fsopt`
only. CoT and dialog mix their input-inversion variants at 0.3 against 1.

Every rate is read from `config` when the mixture is sampled, so gin bindings made
after import apply: task rates are callables, as seqio allows, and mixtures of
sub-mixtures are `ConfiguredMixture`s. Tasks whose data was never released are not
in these mixtures.
"""

import collections.abc
from typing import Callable, Iterable, Iterator, Mapping

import seqio

from moe_jax_tasks import config
from moe_jax_tasks import formats
from moe_jax_tasks import registry

SUBMIXES = ("flan2021", "t0", "niv2", "cot", "dialog")
_WITHOUT_NOOPT = ("niv2", "cot", "dialog")

Rates = Callable[[], Mapping[str, float]]


class _ConfiguredRates(collections.abc.Mapping):
  """Sub-mixture name -> rate, read from the configuration at every lookup."""

  def __init__(self, read: Rates):
    self._read = read

  def __getitem__(self, name: str) -> float:
    return float(self._read()[name])

  def __iter__(self) -> Iterator[str]:
    return iter(self._read())

  def __len__(self) -> int:
    return len(self._read())


class ConfiguredMixture(seqio.Mixture):
  """A mixture of sub-mixtures whose rates are read from the configuration.

  seqio reads every rate through `rate_per_task_name` and needs a number for a
  sub-mixture (callable rates are for tasks only); this mixture's mapping reads
  `rates()` at each lookup, so a gin binding made after import applies.

  Args:
    name: the mixture's name.
    rates: returns sub-mixture name -> rate.
  """

  def __init__(self, name: str, rates: Rates):
    super().__init__(name, list(rates().items()))
    self._rates = _ConfiguredRates(rates)

  @property
  def rate_per_task_name(self) -> Mapping[str, float]:
    return self._rates


def capped_rate(task: seqio.Task, cap: str) -> float:
  """Examples-proportional rate: min(number of training examples, cap)."""
  return float(min(config.mixture_caps()[cap], task.num_input_examples("train")))


def setting_formats(has_options: bool, zero_shot: bool,
                    with_options: bool) -> tuple[str, ...]:
  """The format names a task contributes to one setting."""
  setting, = (s.name for s in formats.SETTINGS
              if (s.zero_shot, s.with_options) == (zero_shot, with_options))
  return tuple(f.name for f in formats.formats_for(has_options)
               if setting in f.settings)


def _capped(names: Iterable[str], cap: str):
  return [(name, lambda task, cap=cap: capped_rate(task, cap)) for name in names]


def _tasks_of(submix: str, *, inversion: bool = False) -> list[registry.TaskRecord]:
  return [r for r in registry.TASKS.values()
          if r.submix == submix and r.in_default_mixtures and (
              not inversion or r.inversion)]


def _setting_names(records, setting: formats.Setting, inversion=False):
  names = []
  for record in records:
    seqio_tasks = record.inversion_seqio_tasks if inversion else record.seqio_tasks
    has_options = record.has_options and not inversion
    names += [seqio_tasks[f] for f in setting_formats(
        has_options, setting.zero_shot, setting.with_options)]
  return names


def _settings_of(submix: str) -> tuple[formats.Setting, ...]:
  return tuple(s for s in formats.SETTINGS
               if s.with_options or submix not in _WITHOUT_NOOPT)


def _setting_shares(submix: str) -> dict[str, float]:
  """`<submix>_<setting>` -> its share of the submix (`config.format_rates`)."""
  shares = config.format_rates()
  rates = {}
  for setting in _settings_of(submix):
    rate = shares["zero_shot"] if setting.zero_shot else 1 - shares["zero_shot"]
    if submix not in _WITHOUT_NOOPT:
      rate *= (shares["with_options"] if setting.with_options
               else 1 - shares["with_options"])
    rates[f"{submix}_{setting.name}"] = rate
  return rates


def _add(name: str, rates: Rates) -> None:
  seqio.MixtureRegistry.add_provider(name, ConfiguredMixture(name, rates))


def _register_submix(submix: str) -> None:
  records = _tasks_of(submix)
  for setting in _settings_of(submix):
    name = f"{submix}_{setting.name}"
    base = _capped(_setting_names(records, setting), submix)
    if submix in ("cot", "dialog"):
      inverted = f"{submix}_ii_{setting.name}"
      seqio.MixtureRegistry.add(f"{name}_base", base)
      seqio.MixtureRegistry.add(inverted, _capped(_setting_names(
          _tasks_of(submix, inversion=True), setting, inversion=True), submix))
      _add(name, lambda base=f"{name}_base", inverted=inverted: {
          base: 1.0, inverted: config.input_inversion_rate()})
    else:
      seqio.MixtureRegistry.add(name, base)
  _add(f"{submix}_submix", lambda: _setting_shares(submix))


def _register_all() -> None:
  for submix in SUBMIXES:
    _register_submix(submix)
  _add("flan2022_submix", lambda: {
      f"{submix}_submix": rate for submix, rate in config.flan2022_rates().items()})


_register_all()
