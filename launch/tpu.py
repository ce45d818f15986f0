"""Run moe-jax on a Cloud TPU slice: python launch/tpu.py VERB --name ... (see
launch/README.md).

  create  the slice (tpu-vm create, or a queued resource with --queued)
  run     ship the current commit to every worker, install it with the tpu
          extra, start the driver on all workers; --restart_on_preemption
          then watches the slice and recreates it when it is preempted;
          --emit skypilot|xpk prints the same run for SkyPilot or xpk instead
  logs    stream worker 0's driver log
  stop    SIGTERM the driver on all workers (it checkpoints and exits)
  delete  the slice
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python launch/tpu.py`: make `launch` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import cli, gcloud, preemption, skypilot, tpu_types, tpu_vm, xpk
from launch.driver import check_model_dir, parse_overrides
from launch.errors import LaunchError
from launch.runner import Runner

VERBS = ("create", "run", "logs", "stop", "delete")


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="launch/tpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("verb", choices=VERBS)
  slice_flags = parser.add_argument_group("slice")
  slice_flags.add_argument("--name", help=f"the slice ({cli.NAME_HELP})")
  slice_flags.add_argument("--tpu_type", help="v4-64, v5e-256, v5p-128, v6e-16, ...")
  slice_flags.add_argument("--zone", help="e.g. us-central2-b")
  slice_flags.add_argument("--project", help="the GCP project with TPU quota")
  slice_flags.add_argument("--spot", action="store_true",
                           help="spot capacity: cheaper, preemptible")
  slice_flags.add_argument("--queued", action="store_true",
                           help="request through the queued-resources API")
  slice_flags.add_argument("--runtime_version",
                           help="default: the JAX runtime of the generation")
  cli.add_driver_flags(parser)
  restarts = parser.add_argument_group("preemption (run)")
  restarts.add_argument("--restart_on_preemption", action="store_true",
                        help="stay attached; recreate a preempted slice")
  restarts.add_argument("--max_restarts", type=int, default=10)
  restarts.add_argument("--poll_s", type=float, default=120.0,
                        help="seconds between state probes")
  emit = parser.add_argument_group("other launchers (run --emit)")
  emit.add_argument("--emit", choices=("skypilot", "xpk"),
                    help="print a SkyPilot task file or an xpk script instead")
  emit.add_argument("--cluster", help="the xpk (GKE) cluster")
  emit.add_argument("--docker_image",
                    help="xpk: an image with the project installed "
                    "(default: build one from the current commit)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print every command in order; run nothing")
  cli.add_common_flags(parser)
  return parser


def slice_spec(args: argparse.Namespace) -> gcloud.SliceSpec:
  name = cli.check_name(args.name)
  if not args.tpu_type:
    raise LaunchError("missing --tpu_type", "pass e.g. --tpu_type v4-64")
  tpu = tpu_types.resolve(args.tpu_type)
  zone = gcloud.check_zone(args.zone)
  if not args.project:
    raise LaunchError("missing --project",
                      "pass --project PROJECT, the project with TPU quota")
  return gcloud.SliceSpec(
      name=name, slice=tpu, zone=zone, project=args.project, spot=args.spot,
      queued=args.queued,
      runtime_version=args.runtime_version or tpu.generation.runtime_version)


def check_flag_combinations(args: argparse.Namespace) -> None:
  if args.emit and args.verb != "run":
    raise LaunchError(f"--emit describes a run, not {args.verb}",
                      "use it with the run verb")
  if args.emit and args.queued:
    raise LaunchError(f"--queued has no {args.emit} equivalent",
                      "drop it: SkyPilot and xpk get capacity themselves")
  if args.out and not args.emit:
    raise LaunchError("--out names the file --emit writes",
                      "use it with --emit skypilot|xpk")
  if args.emit == "xpk" and not args.cluster:
    raise LaunchError("--emit xpk needs --cluster",
                      "pass the GKE cluster made by `xpk cluster create`")
  if args.emit != "xpk" and (args.cluster or args.docker_image):
    raise LaunchError("--cluster and --docker_image are xpk flags",
                      "use them with --emit xpk")
  if (args.restart_on_preemption and not args.emit
      and not (args.spot or args.queued)):
    raise LaunchError("--restart_on_preemption watches for preemption, which "
                      "only spot and queued slices see",
                      "add --spot (or --queued), or drop the flag")


def main(argv: list[str]) -> int:
  args, extras = build_parser().parse_known_args(argv)
  overrides = parse_overrides(extras)  # unknown flags fail first
  check_flag_combinations(args)
  spec = slice_spec(args)
  runner = Runner(dry_run=args.dry_run, echo=args.debug)
  if args.verb != "run":
    if overrides:
      raise LaunchError(f"{args.verb} takes no --gin.* flags",
                        "pass them to run")
    if args.verb == "create":
      tpu_vm.create(runner, spec, args.poll_s)
    else:
      {"logs": tpu_vm.logs, "stop": tpu_vm.stop,
       "delete": tpu_vm.delete}[args.verb](runner, spec)
    return 0
  model_dir = check_model_dir(args.model_dir, spec.slice.hosts, spec.where,
                              spec.spot)
  run = cli.driver_run(args, overrides, model_dir)
  run.check_mesh(spec.slice.chips, spec.where)
  if args.emit == "skypilot":
    cli.write_or_print(skypilot.tpu_task(spec, run), args.out)
    return 0
  if args.emit == "xpk":
    restarts = args.max_restarts if args.restart_on_preemption else 0
    cli.write_or_print(
        xpk.workload_script(spec, run, args.cluster, args.docker_image,
                            restarts), args.out)
    return 0
  setup = tpu_vm.RunSetup(driver=run, repo_root=cli.REPO_ROOT,
                          staging_dir=Path(tempfile.gettempdir()),
                          poll_s=args.poll_s)
  tpu_vm.run(runner, spec, setup)
  if args.restart_on_preemption:
    return preemption.supervise(runner, spec, setup, args.max_restarts)
  return 0


if __name__ == "__main__":
  sys.exit(cli.main(main, None))
