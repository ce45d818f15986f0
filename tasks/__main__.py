"""Command line: `python -m moe_jax_tasks {list,show,stats,prepare}`.

  list [--mixture niv2]           one line per training task
  show TASK [--n 3] [--format F]  rendered inputs/targets of real examples (TASK is a
                                  catalog name or a seqio task name)
  stats                           task counts per mixture, source kind and format
  prepare --out DIR [--parts niv2,cot,tfds,p3,eval] [--only TASK ...]
"""

import argparse
import collections
import os
import sys

import moe_jax_tasks
from moe_jax_tasks import prepare as prepare_lib


def _list(args) -> None:
  for record in moe_jax_tasks.catalog(args.mixture):
    print("\t".join([record.name, record.mixture, record.source_kind,
                     record.location, record.category,
                     ",".join(record.seqio_tasks)]))


def resolve(task: str, format_name: str | None) -> str:
  """A seqio task name from a seqio name or a catalog name (+ format)."""
  import seqio  # pylint: disable=g-import-not-at-top
  if task in seqio.TaskRegistry.names():
    return task
  records = {r.name: r for r in moe_jax_tasks.catalog()}
  if task not in records:
    raise SystemExit(f"Unknown task {task!r}: give a catalog name (see `list`) or a "
                     "registered seqio task name.")
  formats = records[task].seqio_tasks
  if format_name is None:
    return next(iter(formats.values()))
  if format_name not in formats:
    raise SystemExit(f"Task {task!r} has no format {format_name!r}; its formats "
                     f"are {', '.join(formats)}.")
  return formats[format_name]


def _show(args) -> None:
  import seqio  # pylint: disable=g-import-not-at-top
  if args.vocab:
    os.environ["FLAN_VOCAB"] = args.vocab
  name = resolve(args.task, args.format)
  task = seqio.get_mixture_or_task(name)
  split = args.split or task.splits[0]
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  print(f"# {name} ({split})")
  for i, example in enumerate(dataset.take(args.n)):
    print(f"--- example {i} inputs:\n"
          f"{example['inputs_pretokenized'].numpy().decode()}\n"
          f"--- example {i} targets:\n"
          f"{example['targets_pretokenized'].numpy().decode()}")


def _stats(args) -> None:
  del args
  records = moe_jax_tasks.catalog()
  by_mixture = collections.Counter(r.mixture for r in records)
  by_kind = collections.Counter((r.mixture, r.source_kind) for r in records)
  by_format = collections.Counter()
  seqio_count = 0
  for r in records:
    for fmt in list(r.seqio_tasks) + list(r.inversion_seqio_tasks):
      by_format[(r.mixture, fmt)] += 1
      seqio_count += 1
  print(f"training tasks: {len(records)} (paper: 1,836; NIv2 has 1,556 here, "
        "1,554 in the paper)")
  for mixture, count in by_mixture.items():
    print(f"  {mixture}: {count}")
  print("by source kind:")
  for (mixture, kind), count in sorted(by_kind.items()):
    print(f"  {mixture} {kind}: {count}")
  print(f"seqio training tasks: {seqio_count}")
  for (mixture, fmt), count in sorted(by_format.items()):
    print(f"  {mixture} {fmt}: {count}")
  unreleased = [r.name for r in records if not r.in_default_mixtures]
  print(f"not in the default mixtures (data never released): {len(unreleased)}: "
        f"{', '.join(unreleased)}")


def _prepare(args) -> None:
  parts = args.parts.split(",") if args.parts else prepare_lib.PARTS
  done = prepare_lib.prepare(args.out, parts, set(args.only) if args.only else None)
  for part, count in done.items():
    print(f"{part}: {count}")
  print(f"Data root written to {args.out}; set FLAN_DATA_DIR={args.out}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax_tasks",
                                   description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  listing = commands.add_parser("list", help="list training tasks")
  listing.add_argument("--mixture", choices=("muffin", "t0_sf", "niv2", "cot"))
  listing.set_defaults(run=_list)
  show = commands.add_parser("show", help="render examples of a task")
  show.add_argument("task")
  show.add_argument("--n", type=int, default=3)
  show.add_argument("--format", help="zs_opt, zs_noopt, fs5_opt, ..., zs, fs5, xs")
  show.add_argument("--split")
  show.add_argument("--vocab", help="SentencePiece model (sets FLAN_VOCAB)")
  show.set_defaults(run=_show)
  stats = commands.add_parser("stats", help="counts per mixture and format")
  stats.set_defaults(run=_stats)
  prep = commands.add_parser("prepare", help="download the public sources")
  prep.add_argument("--out", required=True)
  prep.add_argument("--parts", help=",".join(prepare_lib.PARTS))
  prep.add_argument("--only", nargs="*", help="catalog task names")
  prep.set_defaults(run=_prepare)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main(sys.argv[1:])
