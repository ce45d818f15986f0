"""Shared pieces of the evaluation tasks: registration, prompt files, length limits.

An evaluation source reads the benchmark's own files and yields finished prompts
(`inputs`, `targets` and the fields its postprocessor needs); exemplars come from
the benchmark's dev/train files or from a prompt file the user supplies, never from
text in this package.
"""

import os
from typing import Callable, Optional, Sequence

import seqio
import tensorflow as tf

from moe_jax_tasks import config
from moe_jax_tasks import sources
from moe_jax_tasks import vocabulary as vocabulary_lib

STRING = tf.TensorSpec((), tf.string)
PROMPT_SIGNATURE = {"inputs": STRING, "targets": STRING}
# Prompts longer than this lose exemplars from the front (the collection's limit).
MAX_PROMPT_TOKENS = config.SEQUENCE_LENGTH["inputs"]


def eval_root() -> str:
  """<data root>/eval."""
  return os.path.join(config.data_dir(), "eval")


def read_text(task: str, path: str, hint: str) -> str:
  """Reads a whole text file, or raises DataNotFoundError naming the task."""
  if not tf.io.gfile.exists(path):
    raise sources.DataNotFoundError(f"Task {task!r}: {path} does not exist. {hint}")
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def read_prompt_file(task: str, path: str, hint: str) -> str:
  """A user-supplied exemplar prompt; text after a `-----` line if there is one
  (BIG-Bench-Hard's prompt files start with a canary line and that separator)."""
  text = read_text(task, path, hint)
  if "\n-----\n" in text:
    text = text.split("\n-----\n", 1)[1]
  return text.strip()


def fit_exemplars(exemplars: Sequence[str], query: str, header: str,
                  separator: str,
                  vocabulary: seqio.Vocabulary) -> str:
  """header + as many exemplars as fit MAX_PROMPT_TOKENS (dropping the first ones)
  + query."""
  shots = list(exemplars)
  while True:
    prompt = header + "".join(s + separator for s in shots) + query
    if not shots or len(vocabulary.encode(prompt)) <= MAX_PROMPT_TOKENS:
      return prompt
    shots = shots[1:]


def register(name: str, source: seqio.DataSource, postprocess_fn: Callable,
             metric_fns: Sequence[Callable],
             vocabulary: seqio.Vocabulary = vocabulary_lib.FLAN_VOCABULARY) -> str:
  """Registers an evaluation task whose source yields finished prompts."""
  seqio.TaskRegistry.add(
      name, source=source,
      output_features=vocabulary_lib.output_features(vocabulary),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=postprocess_fn, metric_fns=list(metric_fns))
  return name


def prompt_source(task: str, files: dict, parser: sources.Parser,
                  root: Callable[[], str] = eval_root, signature=None,
                  hint: str = "") -> sources.FileSource:
  return sources.FileSource(task, files, parser, signature or PROMPT_SIGNATURE,
                            root=root, missing_hint=hint)


def optional_exists(path: Optional[str]) -> bool:
  return bool(path) and tf.io.gfile.exists(path)
