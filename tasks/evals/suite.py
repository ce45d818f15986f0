"""Registers the held-out suite over the data root's eval/ directory.

Mixtures: mmlu_5shot_direct, mmlu_5shot_cot, bbh_3shot_direct, bbh_3shot_cot,
gsm8k_cot, svamp_cot, asdiv_cot, strategyqa_cot, reasoning_cot (the four before),
tydiqa_goldp_1shot, mgsm_cot. `metrics.normalized_average` combines the headline
scores as the paper does.
"""

from typing import Callable

import seqio

from moe_jax_tasks.catalog import catalog as catalog_lib
from moe_jax_tasks.evals import bbh
from moe_jax_tasks.evals import common
from moe_jax_tasks.evals import gsm8k
from moe_jax_tasks.evals import mmlu
from moe_jax_tasks.evals import strategyqa
from moe_jax_tasks.evals import tydiqa


def register_suite(*, prefix: str = "", root: Callable[[], str] = common.eval_root,
                   vocabulary=common.vocabulary_lib.FLAN_VOCABULARY,
                   mmlu_subjects=None, bbh_subtasks=None, tydiqa_languages=None,
                   mgsm_languages=None,
                   math=("gsm8k", "svamp", "asdiv", "mgsm"),
                   with_strategyqa: bool = True) -> dict[str, list[str]]:
  """Registers the evaluation tasks and one mixture per benchmark and prompting.

  Args:
    prefix: prepended to every task and mixture name.
    root: returns the eval directory.
    vocabulary: the tasks' vocabulary.
    mmlu_subjects, bbh_subtasks, tydiqa_languages, mgsm_languages: subsets (default:
      the catalog's lists); an empty list skips the benchmark.
    math: which math benchmarks to register.
    with_strategyqa: whether to register StrategyQA.

  Returns:
    mixture name -> its task names.
  """
  def listed(value, listname):
    return catalog_lib.names(listname) if value is None else value

  kwargs = dict(prefix=prefix, root=root, vocabulary=vocabulary)
  groups = {}
  subjects = listed(mmlu_subjects, "eval_mmlu_subjects")
  if subjects:
    names = mmlu.register(subjects, **kwargs)
    groups["mmlu_5shot_direct"], groups["mmlu_5shot_cot"] = (names["direct"],
                                                              names["cot"])
  subtasks = listed(bbh_subtasks, "eval_bbh_subtasks")
  if subtasks:
    names = bbh.register(subtasks, **kwargs)
    groups["bbh_3shot_direct"], groups["bbh_3shot_cot"] = (names["direct"],
                                                            names["cot"])
  names = gsm8k.register(listed(mgsm_languages, "eval_mgsm_languages"),
                         include=math, **kwargs)
  for benchmark, tasks in names.items():
    if tasks:
      groups[f"{benchmark}_cot"] = tasks
  if with_strategyqa:
    groups["strategyqa_cot"] = strategyqa.register(**kwargs)
  reasoning = [t for b in ("gsm8k", "svamp", "asdiv", "strategyqa")
               for t in groups.get(f"{b}_cot", [])]
  if reasoning:
    groups["reasoning_cot"] = reasoning
  languages = listed(tydiqa_languages, "eval_tydiqa_goldp_languages")
  if languages:
    groups["tydiqa_goldp_1shot"] = tydiqa.register(languages, **kwargs)
  for mixture, tasks in groups.items():
    seqio.MixtureRegistry.add(prefix + mixture, tasks, default_rate=1.0)
  return {prefix + k: v for k, v in groups.items()}


MIXTURES = register_suite()
