"""The bundled sample mixtures: `flan_sample` (training) and `flan_sample_eval`.

A few hundred short examples written by us (see make_sample.py) in the real formats
of the four mixtures: Muffin tasks as JSON lines with TFDS feature names (rte,
bool_q, natural_questions, sst2), two T0-SF subsets in our P3 export format, three
NIv2 task files and two CoT TSVs (with their input inversions). `flan_sample_eval`
holds MMLU (2 subjects, rank classification and CoT), BBH boolean_expressions
(direct and CoT) and GSM8K-format CoT problems, none of which occur in the training
sample.

Task names are `sample:<mixture>:<task>:<format>` and `sample:<benchmark>...`; every
example has `inputs` and `targets` (strings before tokenization, int32 ids after,
EOS appended). The vocabulary is `vocabulary()`: the SentencePiece model shipped
here (sample_spm.model), or FLAN_SAMPLE_VOCAB / the gin binding
`moe_jax_tasks.sample.vocabulary_spec.path`. No file outside the package is read.
"""

import os
from typing import Optional

import gin
import seqio

from moe_jax_tasks.catalog import catalog as catalog_lib
from moe_jax_tasks import flan2021
from moe_jax_tasks import mixtures
from moe_jax_tasks import registry
from moe_jax_tasks import sources
from moe_jax_tasks import vocabulary as vocabulary_lib
from moe_jax_tasks.evals import suite

SAMPLE_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(SAMPLE_DIR, "data")
PREFIX = "sample:"
TASKS = {
    "muffin": ("rte", "bool_q", "natural_questions", "sst2"),
    "t0_sf": ("amazon_polarity_Is_this_review",
              "cos_e_v1.11_question_option_description_text"),
    "niv2": ("task1146_country_capital", "task1087_two_number_sum",
             "task1508_wordnet_antonyms"),
    "cot": ("cot_gsm8k", "cot_strategyqa"),
}
_CAPS = {"muffin": "flan2021", "t0_sf": "t0", "niv2": "niv2", "cot": "cot"}


def vocabulary_path() -> str:
  """The shipped sample SentencePiece model."""
  return os.path.join(SAMPLE_DIR, "sample_spm.model")


@gin.configurable
def vocabulary_spec(path: Optional[str] = None, extra_ids: int = 0
                    ) -> tuple[str, int]:
  """(model path, extra ids) of the sample tasks' vocabulary."""
  return path or os.environ.get("FLAN_SAMPLE_VOCAB") or vocabulary_path(), extra_ids


VOCABULARY = vocabulary_lib.ConfiguredVocabulary(
    vocabulary_spec, hint="Unset FLAN_SAMPLE_VOCAB to use the bundled model, or point "
    "it (or moe_jax_tasks.sample.vocabulary_spec.path) at a SentencePiece model.")


def vocabulary() -> seqio.Vocabulary:
  """The vocabulary of every sample task (offline; no download)."""
  return VOCABULARY


def _data_dir() -> str:
  return DATA_DIR


def _register_task(entry: catalog_lib.CatalogEntry) -> list[str]:
  """Registers one sample task (and its inversion) in all its formats."""
  common = dict(mixture=entry.mixture, name_prefix=PREFIX,
                output_features=vocabulary_lib.output_features(VOCABULARY))
  inversion_group = None
  if entry.mixture == "muffin":
    spec = flan2021.SPECS[entry.name]
    source = sources.FileSource(entry.name, {"train": f"muffin/{entry.name}/"
                                             "train.jsonl"}, sources.parse_jsonl,
                                root=_data_dir)
    plan = (source, registry.muffin_normalizers(spec), spec.group, spec.has_options)
  elif entry.mixture == "t0_sf":
    plan = (sources.p3_source(entry.name, _data_dir), (), "prompted", True)
  elif entry.mixture == "niv2":
    plan = (sources.niv2_source(entry.name, root=_data_dir), (), "niv2", False)
  else:
    plan = (sources.cot_source(entry.name, catalog_lib.cot_dataset(entry.name),
                               _data_dir), (), "cot", False)
    inversion_group = "cot_inversion"
  source, normalizers, group, has_options = plan
  names = list(registry.register_formats(
      task=entry.name, source=source, group=group, has_options=has_options,
      normalizers=normalizers, **common).values())
  if inversion_group:
    names += registry.register_formats(
        task=entry.inversion, source=source, group=inversion_group,
        has_options=False, normalizers=normalizers, **common).values()
  return names


def _register() -> tuple[list[str], dict[str, list[str]]]:
  by_name = {e.name: e for e in catalog_lib.entries()}
  training = []
  for mixture, names in TASKS.items():
    for name in names:
      cap = _CAPS[mixture]
      training += [(task, lambda t, cap=cap: mixtures.capped_rate(t, cap))
                   for task in _register_task(by_name[name])]
  seqio.MixtureRegistry.add("flan_sample", training)
  evals = suite.register_suite(
      prefix=PREFIX, root=lambda: os.path.join(DATA_DIR, "eval"),
      vocabulary=VOCABULARY,
      mmlu_subjects=("elementary_mathematics", "high_school_geography"),
      bbh_subtasks=("boolean_expressions",), tydiqa_languages=(),
      mgsm_languages=(), math=("gsm8k",), with_strategyqa=False)
  eval_tasks = sorted({t for tasks in evals.values() for t in tasks})
  seqio.MixtureRegistry.add("flan_sample_eval", eval_tasks, default_rate=1.0)
  return [name for name, _ in training], evals


TRAINING_TASKS, EVAL_MIXTURES = _register()
