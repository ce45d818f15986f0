"""moe_jax_tasks: the Flan 2022 collection and the held-out evaluation suite for seqio.

`import moe_jax_tasks` registers every training task (1,838 catalog tasks in each of
their formats), the collection's mixtures, the held-out evaluation tasks and the
bundled sample mixtures. It imports seqio and TensorFlow only (never jax) and reads
no data file: sources are resolved when a dataset is built.
"""

from moe_jax_tasks import startup

# `python -m moe_jax_tasks` imports this package, TensorFlow included, before its
# __main__ parses flags: the command line's quiet start has to begin here.
if startup.quiet_command_line(__name__):
  startup.import_tensorflow_quietly()

# pylint: disable=g-import-not-at-top,wrong-import-position
from moe_jax_tasks.catalog import catalog as _catalog_data  # noqa: E402
from moe_jax_tasks import config  # noqa: E402
from moe_jax_tasks import registry  # noqa: E402
from moe_jax_tasks import mixtures  # noqa: E402
from moe_jax_tasks import sample  # noqa: E402
from moe_jax_tasks import pretraining  # noqa: E402
from moe_jax_tasks.evals import suite as _eval_suite  # noqa: E402
from moe_jax_tasks.registry import TaskRecord  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position


def catalog(mixture: str | None = None) -> list[TaskRecord]:
  """One record per training task, in catalog order.

  Args:
    mixture: optionally only `muffin`, `t0_sf`, `niv2` or `cot`.

  Returns:
    TaskRecords: name, mixture, submix, source kind and location, category, template
    group, whether it has options, and the seqio task names registered for it.

  Raises:
    ValueError: for an unknown mixture name.
  """
  if mixture is not None and mixture not in _catalog_data.MIXTURES:
    raise ValueError(f"Unknown mixture {mixture!r}; choose one of "
                     f"{', '.join(_catalog_data.MIXTURES)}.")
  return [r for r in registry.TASKS.values()
          if mixture is None or r.mixture == mixture]
