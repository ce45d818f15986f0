r"""Trains a model from gin files, with t5x's flags and macros.

  python -m moe_jax.train --gin_file=gin/runs/demo.gin --gin.MODEL_DIR="'runs/demo'"
  python -m moe_jax.train --gin_file=gin/models/flan_st_base.gin \
      --gin_file=gin/runs/finetune.gin --gin.MODEL_DIR="'gs://bucket/flan_st_base'" \
      --gin.INITIAL_CHECKPOINT_PATH="'gs://bucket/st_base_pretrained'" \
      --gin.MESH_SHAPE="{'data': -1, 'expert': 16}"

The run itself is `moe_jax.training.loop.train`; gin/runs/*.gin bind it.
"""

import sys
from typing import Optional, Sequence

from moe_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_gin_function("python -m moe_jax.train", __doc__, "moe_jax.training.loop", "train",
                              "gin/runs/finetune.gin", argv)


if __name__ == "__main__":
  sys.exit(main())
