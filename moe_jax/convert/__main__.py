"""Command line for checkpoint conversion.

  python -m moe_jax.convert hf --checkpoint_dir HF_MODEL_DIR --output_dir OUTPUT_DIR

imports a Hugging Face T5 / Flan-T5 / mT5 / Switch Transformers directory
(config.json + safetensors or pytorch_model.bin) into OUTPUT_DIR/checkpoint
(orbax) and OUTPUT_DIR/model.gin.
"""

import argparse
import sys
from typing import Optional, Sequence

from moe_jax import cli
from moe_jax.convert import hf


def _import_hf(args: argparse.Namespace) -> None:
  result = hf.convert(args.checkpoint_dir, args.output_dir)
  arch = result.architecture
  kind = (f"sparse, {arch.num_experts} experts, encoder MoE layers "
          f"{list(arch.encoder_sparse_layers)}, decoder MoE layers "
          f"{list(arch.decoder_sparse_layers)}" if arch.num_experts else "dense")
  print(f"Converted {arch.model_type} ({kind}; {result.num_parameters:,} parameters).")
  print(f"Wrote checkpoint: {result.checkpoint_dir}")
  print(f"Wrote gin config: {result.gin_file}")
  if result.vocabulary_file:
    print(f"Wrote vocabulary: {result.vocabulary_file}")
  else:
    print("No spiece.model in the source: score with token ids, or bind VOCABULARY.")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.convert",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  hf_parser = commands.add_parser(
      "hf", help="import a Hugging Face checkpoint directory")
  hf_parser.add_argument("--checkpoint_dir", required=True,
                         help="Hugging Face directory with config.json and weights")
  hf_parser.add_argument("--output_dir", required=True,
                         help="new (or empty) output directory")
  cli.add_output_flags(hf_parser)
  hf_parser.set_defaults(run=_import_hf)
  return cli.run(lambda args: args.run(args), parser, argv)


if __name__ == "__main__":
  sys.exit(main())
