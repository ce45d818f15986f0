"""Command line for checkpoint conversion.

  python -m moe_jax.convert hf --checkpoint_dir HF_MODEL_DIR --output_dir OUTPUT_DIR

imports a Hugging Face T5 / Flan-T5 / mT5 / Switch Transformers directory
(config.json + safetensors or pytorch_model.bin) into OUTPUT_DIR/checkpoint
(orbax) and OUTPUT_DIR/model.gin.

  python -m moe_jax.convert t5x --checkpoint_dir T5X_CHECKPOINT --gin_file MODEL_GIN \\
      --output_dir OUTPUT_DIR

imports a t5x checkpoint (`checkpoint_<step>/`: msgpack + tensorstore, as
released for T5 / Flan-T5 / Switch) the same way; the gin file builds the
model it belongs to.

  python -m moe_jax.convert to_hf --gin_file MODEL_GIN --checkpoint CHECKPOINT \\
      --output_dir OUTPUT_DIR [--approximate] [--expert_capacity N]

exports a moe_jax model to a transformers directory (config.json,
model.safetensors, and spiece.model + tokenizer files for a SentencePiece
vocabulary) that `AutoModelForSeq2SeqLM.from_pretrained` loads.
"""

import argparse
import sys
from typing import Optional, Sequence

from moe_jax import cli


def _import_hf(args: argparse.Namespace) -> None:
  from moe_jax.convert import hf  # pylint: disable=g-import-not-at-top
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


def _import_t5x(args: argparse.Namespace) -> None:
  from moe_jax.convert import t5x  # pylint: disable=g-import-not-at-top
  result = t5x.convert(args.checkpoint_dir, args.output_dir, args.gin_file,
                       gin_bindings=args.gin_bindings, gin_search_paths=args.gin_search_paths)
  step = "" if result["step"] is None else f" at step {result['step']}"
  print(f"Converted a t5x checkpoint{step} ({result['num_parameters']:,} parameters).")
  print(f"Wrote checkpoint: {result['checkpoint_dir']}")
  print(f"Wrote gin config: {result['gin_file']}")


def _export_hf(args: argparse.Namespace) -> None:
  from moe_jax.convert import hf  # pylint: disable=g-import-not-at-top
  result = hf.export(args.gin_file, args.checkpoint, args.output_dir,
                     gin_bindings=args.gin_bindings, gin_search_paths=args.gin_search_paths,
                     approximate=args.approximate, expert_capacity=args.expert_capacity)
  plan = result.plan
  arch = plan.architecture
  kind = (f"{arch.num_experts} experts, expert_capacity {arch.expert_capacity}"
          if arch.num_experts else "dense")
  print(f"Exported {arch.model_type} ({kind}; {result.num_parameters:,} parameters).")
  if plan.approximations:
    print("Approximated (--approximate): transformers computes this model with these "
          "changes:")
    for line in plan.approximations:
      print(f"  {line}")
  for line in plan.notes:
    print(f"Note: {line}")
  for path in result.files:
    print(f"Wrote {path}")
  print(f"Load with transformers.AutoModelForSeq2SeqLM.from_pretrained({result.output_dir!r}).")


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

  t5x_parser = commands.add_parser(
      "t5x", help="import a t5x checkpoint (msgpack + tensorstore) directory")
  t5x_parser.add_argument("--checkpoint_dir", required=True,
                          help="t5x checkpoint_<step> directory, or a t5x MODEL_DIR")
  t5x_parser.add_argument("--output_dir", required=True,
                          help="new (or empty) output directory")
  cli.add_gin_flags(t5x_parser)
  cli.add_output_flags(t5x_parser)
  t5x_parser.set_defaults(run=_import_t5x)

  export_parser = commands.add_parser(
      "to_hf", help="export a moe_jax model to a transformers directory")
  export_parser.add_argument(
      "--checkpoint", required=True,
      help="the parameters: a convert output, a run's MODEL_DIR or step, a t5x checkpoint")
  export_parser.add_argument("--output_dir", required=True,
                             help="new (or empty) output directory")
  export_parser.add_argument(
      "--approximate", action="store_true",
      help="export a model transformers can only approximate (top-2, GShard, expert "
      "choice, grouped routing); prints each change")
  export_parser.add_argument(
      "--expert_capacity", type=int, default=None,
      help="SwitchTransformers' fixed per-sequence expert capacity (default: the "
      "model's own, or for grouped routing a full group's eval capacity)")
  cli.add_gin_flags(export_parser)
  cli.add_output_flags(export_parser)
  export_parser.set_defaults(run=_export_hf)
  return cli.run(lambda args: args.run(args), parser, argv)


if __name__ == "__main__":
  sys.exit(main())
