r"""Evaluates a checkpoint on a seqio task or mixture, with t5x's flags and macros.

  python -m moe_jax.eval --gin_file=gin/models/tiny_moe.gin --gin_file=gin/runs/eval.gin \
      --gin.CHECKPOINT_PATH="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'flan_sample_eval'"

The evaluation is `moe_jax.training.evaluation.evaluate`; gin/runs/eval.gin binds it.
"""

import sys
from typing import Optional, Sequence

from moe_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_gin_function("python -m moe_jax.eval", __doc__, "moe_jax.training.evaluation", "evaluate",
                              "gin/runs/eval.gin", argv)


if __name__ == "__main__":
  sys.exit(main())
