"""Registers every training task of the catalog as seqio tasks, one per format.

Task names are `<mixture>:<task>:<format>` (the task name with '-' written '_', the
only character of the catalog that seqio rejects), e.g. `muffin:rte:zs_opt`,
`niv2:task1146_country_capital:fs5`, `cot:cot_input_inversion_gsm8k:zs`.

Formats (the table is `formats.FORMATS`): tasks with answer options get `zs_opt`,
`zs_noopt`, `fs5_opt`, `fs5_noopt`, `xs_opt`, `xs_noopt`; tasks without get `zs`,
`fs5`, `xs`. `fs5` is the 5-shot template mix (each exemplar under a different
template); `xs` is the same-template x-shot (1 to 4 exemplars, all under the query's
template). CoT and dialog tasks also register their input-inversion variant in the
plain formats.

Registration builds Python objects only; no data file, vocabulary or TFDS builder is
touched until a dataset is requested.
"""

import dataclasses
import functools
from typing import Callable, Optional

import seqio
import tensorflow as tf

from moe_jax_tasks.catalog import catalog as catalog_lib
from moe_jax_tasks import config
from moe_jax_tasks import flan2021
from moe_jax_tasks import formats
from moe_jax_tasks import sources
from moe_jax_tasks import vocabulary


@dataclasses.dataclass(frozen=True)
class TaskRecord:
  """One training task: its catalog entry and the seqio tasks registered for it.

  Attributes:
    name, mixture, submix, source_kind, location, category: see CatalogEntry.
    template_group: the template group it is rendered with.
    has_options: whether it has answer options (so `_opt` formats exist).
    in_default_mixtures: False for tasks whose data was never released.
    seqio_tasks: format -> seqio task name.
    inversion: catalog name of its input-inversion variant, if any.
    inversion_seqio_tasks: format -> seqio task name of that variant.
  """
  name: str
  mixture: str
  submix: str
  source_kind: str
  location: str
  category: str
  template_group: str
  has_options: bool
  in_default_mixtures: bool
  seqio_tasks: dict[str, str]
  inversion: Optional[str] = None
  inversion_seqio_tasks: dict[str, str] = dataclasses.field(default_factory=dict)


def seqio_name(mixture: str, task: str, format_name: str, prefix: str = "") -> str:
  return f"{prefix}{mixture}:{task.replace('-', '_')}:{format_name}"


def _map(dataset: tf.data.Dataset, fn: Callable) -> tf.data.Dataset:
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _filter(dataset: tf.data.Dataset, predicate: Callable) -> tf.data.Dataset:
  return dataset.filter(predicate)


def _user_prompted(task: str, ex: dict) -> dict:
  """Normalizes a user-supplied {"inputs", "targets"} record."""
  if "inputs" not in ex or "targets" not in ex:
    raise sources.MalformedDataError(
        f"Task {task!r}: user-supplied records need string fields 'inputs' and "
        f"'targets'; got {sorted(ex)}.")
  return {"inputs": ex["inputs"], "answer": ex["targets"]}


def format_preprocessor(fmt: formats.Format, *, group: str, task: str, mixture: str):
  """The seqio preprocessor that renders `fmt` (zero- or few-shot)."""
  common = dict(group=group, with_options=fmt.with_options, task_name=task,
                task_source=mixture)
  if not fmt.num_shots:
    return functools.partial(formats.zero_shot, **common)
  return functools.partial(
      formats.few_shot, num_shots=fmt.num_shots, same_template=fmt.same_template,
      max_input_tokens=config.FEW_SHOT_MAX_INPUT_TOKENS, **common)


def register_formats(*, mixture: str, task: str, source: seqio.DataSource,
                     group: str, has_options: bool,
                     normalizers: tuple = (),
                     output_features: Optional[dict] = None,
                     name_prefix: str = ""
                     ) -> dict[str, str]:
  """Registers one task in each of its formats; returns format -> seqio name."""
  output_features = output_features or vocabulary.output_features()
  names = {}
  for fmt in formats.formats_for(has_options):
    name = seqio_name(mixture, task, fmt.name, name_prefix)
    seqio.TaskRegistry.add(
        name, source=source, output_features=output_features,
        preprocessors=(*normalizers,
                       format_preprocessor(fmt, group=group, task=task,
                                           mixture=mixture),
                       *formats.tokenize_pipeline()))
    names[fmt.name] = name
  return names


def _muffin_plan(entry):
  """(source, normalizers, group, has_options, category) of a Muffin task."""
  if entry.source_kind == catalog_lib.UNRELEASED:
    return (sources.unreleased_source(entry.name),
            (functools.partial(_map, fn=functools.partial(_user_prompted,
                                                          entry.name)),),
            "prompted", False, "unreleased")
  spec = flan2021.SPECS[entry.name]
  return (sources.TfdsSource(entry.name, entry.location, spec.train_split),
          muffin_normalizers(spec), spec.group, spec.has_options, spec.family)


def muffin_normalizers(spec: flan2021.Spec) -> tuple:
  """Preprocessors turning raw TFDS examples of a Muffin task into text fields."""
  keep = () if spec.keep is None else (
      functools.partial(_filter, predicate=spec.keep),)
  return keep + (functools.partial(_map, fn=spec.normalize),)


def _register_entry(entry: catalog_lib.CatalogEntry) -> TaskRecord:
  inversion_group = None
  if entry.mixture == "muffin":
    source, normalizers, group, has_options, category = _muffin_plan(entry)
    if entry.submix == "dialog":
      inversion_group = "dialog_inversion"
  elif entry.mixture == "t0_sf":
    source, normalizers, group, has_options, category = (
        sources.p3_source(entry.name), (), "prompted", True, entry.category)
  elif entry.mixture == "niv2":
    source, normalizers, group, has_options, category = (
        sources.niv2_source(entry.name, entry.num_examples), (), "niv2", False,
        entry.category)
  else:
    source, normalizers, group, has_options, category = (
        sources.cot_source(entry.name, catalog_lib.cot_dataset(entry.name)), (),
        "cot", False, entry.category)
    inversion_group = "cot_inversion"
  names = register_formats(mixture=entry.mixture, task=entry.name, source=source,
                           group=group, has_options=has_options,
                           normalizers=normalizers)
  inversion_names = {}
  if inversion_group:
    inversion_names = register_formats(
        mixture=entry.mixture, task=entry.inversion, source=source,
        group=inversion_group, has_options=False, normalizers=normalizers)
  return TaskRecord(
      name=entry.name, mixture=entry.mixture, submix=entry.submix,
      source_kind=entry.source_kind, location=entry.location, category=category,
      template_group=group, has_options=has_options,
      in_default_mixtures=entry.submix != catalog_lib.UNRELEASED,
      seqio_tasks=names, inversion=entry.inversion,
      inversion_seqio_tasks=inversion_names)


def _register_all() -> dict[str, TaskRecord]:
  records = {}
  for entry in catalog_lib.entries():
    records[entry.name] = _register_entry(entry)
  return records


TASKS: dict[str, TaskRecord] = _register_all()
