r"""Decodes a task, a mixture or a JSONL file of inputs, with t5x's flags and macros.

  python -m moe_jax.infer --gin_file=gin/models/tiny_moe.gin --gin_file=gin/runs/infer.gin \
      --gin.CHECKPOINT_PATH="'runs/demo'" --gin.INFER_OUTPUT_DIR="'runs/demo/infer'" \
      --gin.INPUT_FILE="'questions.jsonl'"

Decoding is `moe_jax.training.inference.infer`; gin/runs/infer.gin binds it.
"""

import sys
from typing import Optional, Sequence

from moe_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_gin_function("python -m moe_jax.infer", __doc__, "moe_jax.training.inference", "infer",
                              "gin/runs/infer.gin", argv)


if __name__ == "__main__":
  sys.exit(main())
