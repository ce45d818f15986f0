"""Run moe-jax on GPU nodes: python launch/gpu.py --emit slurm|skypilot ...

Prints (or writes with --out) an sbatch script or a SkyPilot task file for
one or several nodes, one JAX process per node, jax.distributed configured
from the environment. See launch/README.md; launch/examples/ has one of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/gpu.py`: make `launch` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import cli, skypilot, slurm
from launch.driver import check_model_dir, parse_overrides
from launch.errors import LaunchError


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="launch/gpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--emit", choices=("slurm", "skypilot"), required=True)
  parser.add_argument("--name", help=f"the job ({cli.NAME_HELP})")
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  sky = parser.add_argument_group("skypilot")
  sky.add_argument("--gpu", default="H100", help="SkyPilot accelerator name")
  sky.add_argument("--spot", action="store_true")
  sky.add_argument("--infra", help="e.g. gcp, aws/us-east-1, k8s")
  batch = parser.add_argument_group("slurm")
  batch.add_argument("--time", default="24:00:00", help="sbatch --time")
  batch.add_argument("--partition")
  batch.add_argument("--account")
  batch.add_argument("--venv", default=".venv",
                     help="virtualenv with the project, from the submit dir")
  cli.add_driver_flags(parser)
  cli.add_common_flags(parser)
  return parser


def main(argv: list[str]) -> int:
  args, extras = build_parser().parse_known_args(argv)
  overrides = parse_overrides(extras)  # unknown flags fail first
  name = cli.check_name(args.name)
  if args.nodes < 1 or not 1 <= args.gpus_per_node <= 16:
    raise LaunchError(
        f"--nodes {args.nodes} --gpus_per_node {args.gpus_per_node} is no "
        "cluster", "use --nodes >= 1 and --gpus_per_node between 1 and 16")
  slurm_only = {"--partition": args.partition, "--account": args.account}
  sky_only = {"--spot": args.spot, "--infra": args.infra}
  misplaced = [flag for flag, value in
               (sky_only if args.emit == "slurm" else slurm_only).items()
               if value]
  if misplaced:
    raise LaunchError(f"{misplaced[0]} does not apply to --emit {args.emit}",
                      "drop it")
  where = f"{args.nodes}x{args.gpus_per_node} GPUs"
  # SLURM clusters share a filesystem across nodes; SkyPilot nodes do not.
  model_dir = check_model_dir(args.model_dir, args.nodes, where, args.spot,
                              shared_fs=args.emit == "slurm")
  run = cli.driver_run(args, overrides, model_dir)
  run.check_mesh(args.nodes * args.gpus_per_node, where)
  if args.emit == "slurm":
    job = slurm.SlurmJob(name=name, nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, time=args.time,
                         venv=args.venv, partition=args.partition,
                         account=args.account)
    text = slurm.sbatch_script(job, run)
  else:
    text = skypilot.gpu_task(name, run, args.nodes,
                             f"{args.gpu}:{args.gpus_per_node}", args.spot,
                             args.infra)
  cli.write_or_print(text, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(cli.main(main, None))
