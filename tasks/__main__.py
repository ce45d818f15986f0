"""Command line: `python -m moe_jax_tasks {list,show,stats,prepare}`.

  list [--mixture niv2]           one line per training task
  show TASK [--n 3] [--format F]  rendered inputs/targets of real examples (TASK is a
                                  catalog name or a seqio task name)
  stats                           task counts per mixture, source kind and format
  prepare --out DIR [--parts niv2,cot,tfds,p3,eval] [--only TASK ...]

Every command takes --debug (tracebacks for anticipated errors, which otherwise
print one line and exit with status 2) and --verbose (TensorFlow's C++ start-up
log, hidden by default).
"""

import argparse
import collections
import os
import re
import sys
import traceback
from typing import Optional

import seqio
import tensorflow as tf

import moe_jax_tasks
from moe_jax_tasks import errors
from moe_jax_tasks import prepare as prepare_lib
from moe_jax_tasks import startup

# The last line of an `errors.Error` raised inside a tf.data generator, which
# TensorFlow reports as the text of the Python traceback.
_ERROR_IN_TENSORFLOW = re.compile(r"^moe_jax_tasks\.[\w.]+: (.+)$", re.MULTILINE)


def _list(args) -> None:
  for record in moe_jax_tasks.catalog(args.mixture):
    print("\t".join([record.name, record.mixture, record.source_kind,
                     record.location, record.category,
                     ",".join(record.seqio_tasks)]))


def resolve(task: str, format_name: str | None) -> str:
  """A seqio task name from a seqio name or a catalog name (+ format)."""
  if task in seqio.TaskRegistry.names():
    return task
  records = {r.name: r for r in moe_jax_tasks.catalog()}
  if task not in records:
    raise errors.UsageError(
        f"Unknown task {task!r}: give a catalog name (see `list`) or a registered "
        "seqio task name.")
  formats = records[task].seqio_tasks
  if format_name is None:
    return next(iter(formats.values()))
  if format_name not in formats:
    raise errors.UsageError(f"Task {task!r} has no format {format_name!r}; its "
                            f"formats are {', '.join(formats)}.")
  return formats[format_name]


def text_dataset(task: seqio.Task, split: str) -> tf.data.Dataset:
  """A task's examples as text: its source and its preprocessors up to tokenizing.

  Showing text needs no vocabulary; only formats that count tokens (few-shot
  prompts fitted to a token budget) read it.
  """
  dataset = task.source.get_dataset(split=split, shuffle=False)
  for preprocessor in task.preprocessors:
    if preprocessor is seqio.preprocessors.tokenize:
      break
    dataset = seqio.add_kwargs_to_transform(
        preprocessor, sequence_length=None,
        output_features=task.output_features)(dataset)
  return dataset


def _show(args) -> None:
  if args.vocab:
    os.environ["FLAN_VOCAB"] = args.vocab
  name = resolve(args.task, args.format)
  task = seqio.get_mixture_or_task(name)
  split = args.split or task.splits[0]
  if split not in task.splits:
    raise errors.UsageError(f"Task {name!r} has no split {split!r}; its splits "
                            f"are {', '.join(task.splits)}.")
  print(f"# {name} ({split})")
  for i, example in enumerate(text_dataset(task, split).take(args.n)):
    print(f"--- example {i} inputs:\n"
          f"{example['inputs'].numpy().decode()}\n"
          f"--- example {i} targets:\n"
          f"{example['targets'].numpy().decode()}")


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


def anticipated_message(error: BaseException) -> Optional[str]:
  """The message of the `errors.Error` behind `error`, if there is one.

  TensorFlow re-raises errors of traced functions as its own (the original is the
  context) and reports errors of tf.data generators as the traceback's text. Our
  messages are one line; gin appends the configurable's name on a second.
  """
  while error is not None:
    if isinstance(error, errors.Error):
      return str(error).split("\n", 1)[0]
    if isinstance(error, tf.errors.OpError):
      found = _ERROR_IN_TENSORFLOW.findall(error.message)
      if found:
        return found[-1]
    error = error.__cause__ or error.__context__
  return None


def _parser() -> argparse.ArgumentParser:
  # The flags every command takes, before or after the command's name.
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the traceback of anticipated errors too")
  common.add_argument(startup.VERBOSE_FLAG, action="store_true",
                      default=argparse.SUPPRESS,
                      help="let TensorFlow's C++ start-up log through")
  parser = argparse.ArgumentParser(prog="python -m moe_jax_tasks",
                                   description=__doc__.split("\n")[0],
                                   parents=[common])
  commands = parser.add_subparsers(dest="command", required=True)
  listing = commands.add_parser("list", help="list training tasks",
                                parents=[common])
  listing.add_argument("--mixture", choices=("muffin", "t0_sf", "niv2", "cot"))
  listing.set_defaults(run=_list)
  show = commands.add_parser("show", help="render examples of a task",
                             parents=[common])
  show.add_argument("task")
  show.add_argument("--n", type=int, default=3)
  show.add_argument("--format", help="zs_opt, zs_noopt, fs5_opt, ..., zs, fs5, xs")
  show.add_argument("--split")
  show.add_argument("--vocab", help="SentencePiece model (sets FLAN_VOCAB)")
  show.set_defaults(run=_show)
  stats = commands.add_parser("stats", help="counts per mixture and format",
                              parents=[common])
  stats.set_defaults(run=_stats)
  prep = commands.add_parser("prepare", help="download the public sources",
                             parents=[common])
  prep.add_argument("--out", required=True)
  prep.add_argument("--parts", help=",".join(prepare_lib.PARTS))
  prep.add_argument("--only", nargs="*", help="catalog task names")
  prep.set_defaults(run=_prepare)
  return parser


def main(argv=None) -> int:
  """Runs one command; returns the exit status (2 for an anticipated error)."""
  args = _parser().parse_args(argv)
  try:
    args.run(args)
  except Exception as error:  # pylint: disable=broad-except
    message = anticipated_message(error)
    if message is None:
      raise
    if getattr(args, "debug", False):
      traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
