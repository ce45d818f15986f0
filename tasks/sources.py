"""Data sources in the collection's real formats, read lazily from the data root.

Layout under FLAN_DATA_DIR (local path or gs://; all I/O goes through tf.io.gfile):

  niv2/tasks/<task>.json        allenai/natural-instructions task files
  cot/<dataset>_train.tsv       question <TAB> answer <TAB> chain_of_thought
  p3/<subset>/<split>.jsonl     our P3 export: {"inputs", "targets", "answer_choices"}
                                (`inputs_pretokenized` / `targets_pretokenized`, as in
                                bigscience/P3, are accepted too)
  tfds/                         TFDS data_dir: <name>/<config>/<version>/ (prepared)
  muffin/<task>/<split>.jsonl   optional per-task override of a TFDS source: one JSON
                                object per line with the TFDS feature names
  unreleased/<task>/train.jsonl user-supplied {"inputs", "targets"} for tasks whose
                                data was never published
  eval/                         held-out evaluation files (see evals/)

Nothing is opened at import or registration: paths are resolved, and checked, when a
dataset is built. A missing file, malformed record or empty task raises an error
naming the task and the file; with `config.skip_malformed()` malformed records are
skipped instead and counted. Each pass over a file counts in its own
`MalformedRecords`, which the source keeps as its latest
(`FileSource.skipped_records()`; `skipped_records()` gathers the registered tasks').
"""

import collections
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import seqio
import tensorflow as tf

from moe_jax_tasks import config
from moe_jax_tasks import errors

Record = dict[str, Any]


class DataNotFoundError(errors.Error, FileNotFoundError):
  """A task's data file or directory does not exist."""


class MalformedDataError(errors.Error, ValueError):
  """A data file or record does not have the expected format."""


class EmptyTaskError(errors.Error, ValueError):
  """A task's data file holds no usable example."""


class UnreleasedDataError(DataNotFoundError):
  """The task's data was never published and the user supplied none."""


class MalformedRecords:
  """The malformed records of one pass over a task's files.

  Each is an error, or, when the user asked to skip them (`config.skip_malformed()`,
  read when the pass starts), a skip counted under its file.
  """

  def __init__(self):
    self._skip = config.skip_malformed()
    self.counts: collections.Counter = collections.Counter()

  def report(self, task: str, path: str, where: str, problem: str) -> None:
    """Raises MalformedDataError, or counts a skip."""
    if not self._skip:
      raise MalformedDataError(
          f"Task {task!r}: malformed record in {path} ({where}): {problem}. Fix the "
          "file, or set FLAN_SKIP_MALFORMED=1 (gin: "
          "moe_jax_tasks.config.skip_malformed.enabled = True) to skip such records.")
    self.counts[path] += 1


# Reads one file: (task name, path, the pass's malformed records) -> records.
Parser = Callable[[str, str, MalformedRecords], Iterator[Record]]


def skipped_records() -> dict[str, int]:
  """Malformed records skipped in the latest pass over each file, all tasks.

  Gathered from the sources of the registered tasks; one source's own counts are
  its `skipped_records()`.
  """
  counts = {}
  for name in seqio.TaskRegistry.names():
    source = seqio.TaskRegistry.get(name).source
    if isinstance(source, (FileSource, TfdsSource)):
      counts.update(source.skipped_records())
  return counts


def _tensor_spec(value: Any) -> Any:
  """TensorSpec (nested) of a JSON value, as TFDS would give the feature."""
  if isinstance(value, dict):
    return {k: _tensor_spec(v) for k, v in value.items()}
  if isinstance(value, bool):
    return tf.TensorSpec((), tf.bool)
  if isinstance(value, int):
    return tf.TensorSpec((), tf.int64)
  if isinstance(value, float):
    return tf.TensorSpec((), tf.float32)
  if isinstance(value, str):
    return tf.TensorSpec((), tf.string)
  if isinstance(value, list):
    inner = _tensor_spec(value[0]) if value else tf.TensorSpec((), tf.string)
    if isinstance(inner, tf.TensorSpec) and inner.shape.rank == 1:
      return tf.RaggedTensorSpec((None, None), inner.dtype)
    if isinstance(inner, tf.TensorSpec):
      return tf.TensorSpec((None,), inner.dtype)
  raise MalformedDataError(f"Unsupported JSON value for a feature: {value!r}")


class FileSource(seqio.DataSource):
  """A seqio DataSource over one file per split, parsed by a Python generator.

  Args:
    task_name: catalog task name, used in every error message.
    files: split -> path relative to the root.
    parser: (task_name, path, malformed records of the pass) -> iterator of
      records (dicts).
    signature: tf.data output signature of a record, or None to infer it from the
      file's first record (JSON lines).
    root: returns the root directory; defaults to the configured data root.
    num_examples: split -> known count (from metadata); counted on demand when
      absent.
    missing_hint: appended to the missing-file error (how to obtain the data).
    missing_error: exception class for a missing file.
    fallback_glob: pattern (relative to the root) tried when the file is missing;
      used when it matches exactly one file.
  """

  def __init__(self, task_name: str, files: Mapping[str, str], parser: Parser,
               signature: Optional[Any] = None,
               root: Callable[[], str] = config.data_dir,
               num_examples: Optional[Mapping[str, int]] = None,
               missing_hint: str = "",
               missing_error: type = DataNotFoundError,
               fallback_glob: Optional[str] = None):
    super().__init__(splits=tuple(files), num_input_examples=None)
    self._fallback_glob = fallback_glob
    self._task_name = task_name
    self._files = dict(files)
    self._parser = parser
    self._signature = signature
    self._root = root
    self._known_counts = dict(num_examples or {})
    self._missing_hint = missing_hint
    self._missing_error = missing_error
    self._latest_pass: dict[str, MalformedRecords] = {}

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def path(self, split: str) -> str:
    """Absolute path (or URL) of a split's file."""
    if split not in self._files:
      raise ValueError(f"Task {self._task_name!r} has no split {split!r}; its "
                       f"splits are {sorted(self._files)}.")
    return os.path.join(self._root(), self._files[split])

  def list_shards(self, split: str) -> list[str]:
    return [self.path(split)]

  def _checked_path(self, split: str) -> str:
    path = self.path(split)
    if not tf.io.gfile.exists(path) and self._fallback_glob:
      matches = tf.io.gfile.glob(os.path.join(self._root(), self._fallback_glob))
      if len(matches) == 1:
        return matches[0]
    if not tf.io.gfile.exists(path):
      raise self._missing_error(
          f"Task {self._task_name!r}: data file {path} does not exist. "
          f"{self._missing_hint}".strip())
    return path

  def skipped_records(self) -> dict[str, int]:
    """Malformed records skipped in the latest pass over each split's file."""
    counts = collections.Counter()
    for malformed in list(self._latest_pass.values()):
      counts.update(malformed.counts)
    return dict(counts)

  def _pass(self, path: str) -> Iterator[Record]:
    """The records of a new pass over `path`, which becomes its latest pass."""
    malformed = self._latest_pass[path] = MalformedRecords()
    yield from self._parser(self._task_name, path, malformed)
    for skipped, count in malformed.counts.items():
      logging.warning("Task %r: skipped %d malformed records in %s.",
                      self._task_name, count, skipped)

  def _records(self, path: str) -> Iterator[Record]:
    count = 0
    for record in self._pass(path):
      count += 1
      yield record
    if not count:
      raise EmptyTaskError(f"Task {self._task_name!r}: {path} holds no usable "
                           "example; a task must never yield an empty dataset.")

  def output_signature(self, split: str) -> Any:
    """The record signature (inferred from the first record for JSON lines)."""
    if self._signature is not None:
      return self._signature
    path = self._checked_path(split)
    first = next(self._parser(self._task_name, path, MalformedRecords()), None)
    if first is None:
      raise EmptyTaskError(f"Task {self._task_name!r}: {path} holds no example.")
    return _tensor_spec(first)

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs  # Task shuffles.
    path = self._checked_path(split)
    dataset = tf.data.Dataset.from_generator(
        lambda: self._records(path), output_signature=self.output_signature(split))
    if shard_info and shard_info.num_shards > 1:
      dataset = dataset.shard(shard_info.num_shards, shard_info.index)
    return dataset

  def num_input_examples(self, split: str) -> int:
    if split not in self._known_counts:
      path = self._checked_path(split)
      self._known_counts[split] = sum(1 for _ in self._pass(path))
    return self._known_counts[split]


def lines(path: str) -> Iterator[tuple[int, str]]:
  with tf.io.gfile.GFile(path, "r") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if line.strip():
        yield number, line


def json_objects(task: str, path: str,
                 malformed: MalformedRecords) -> Iterator[tuple[int, dict]]:
  for number, line in lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      malformed.report(task, path, f"line {number}", f"invalid JSON ({e})")
      continue
    if not isinstance(record, dict):
      malformed.report(task, path, f"line {number}", "expected a JSON object")
      continue
    yield number, record


# ----------------------------------------------------------------- NIv2 JSON files

NIV2_SIGNATURE = {
    "definition": tf.TensorSpec((), tf.string),
    "input": tf.TensorSpec((), tf.string),
    "answer": tf.TensorSpec((), tf.string),
    "_exemplars": {"input": tf.TensorSpec((None,), tf.string),
                   "answer": tf.TensorSpec((None,), tf.string)},
}


def _text(value: Any) -> Optional[str]:
  """A string, or the first string of a non-empty list of strings; else None."""
  if isinstance(value, list):
    value = value[0] if value else None
  return value if isinstance(value, str) else None


def parse_niv2(task: str, path: str,
               malformed: MalformedRecords) -> Iterator[Record]:
  """Reads an allenai/natural-instructions task file.

  The Definition (list of strings) is the instruction; Positive Examples become the
  task's exemplars; each Instance yields one example with its first output.
  """
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise MalformedDataError(f"Task {task!r}: {path} is not valid JSON ({e}).")
  if not isinstance(data, dict) or "Instances" not in data or (
      "Definition" not in data):
    raise MalformedDataError(
        f"Task {task!r}: {path} lacks 'Definition' or 'Instances'; expected a "
        "natural-instructions task file.")
  definition = data["Definition"]
  if isinstance(definition, list):
    definition = " ".join(d for d in definition if isinstance(d, str))
  if not isinstance(definition, str) or not definition.strip():
    raise MalformedDataError(f"Task {task!r}: {path} has an empty Definition.")
  shots_in, shots_out = [], []
  for number, example in enumerate(data.get("Positive Examples") or [], start=1):
    text_in = _text(example.get("input")) if isinstance(example, dict) else None
    text_out = _text(example.get("output")) if isinstance(example, dict) else None
    if text_in is None or text_out is None:
      malformed.report(task, path, f"Positive Examples #{number}",
                       "needs string 'input' and 'output'")
      continue
    shots_in.append(text_in)
    shots_out.append(text_out)
  exemplars = {"input": shots_in, "answer": shots_out}
  for number, instance in enumerate(data["Instances"], start=1):
    text_in = _text(instance.get("input")) if isinstance(instance, dict) else None
    text_out = _text(instance.get("output")) if isinstance(instance, dict) else None
    if text_in is None or text_out is None:
      malformed.report(task, path, f"Instances #{number}",
                       "needs a string 'input' and a non-empty 'output' list")
      continue
    yield {"definition": definition, "input": text_in, "answer": text_out,
           "_exemplars": exemplars}


def niv2_source(task: str, num_examples: Optional[int] = None,
                root: Callable[[], str] = config.data_dir) -> FileSource:
  return FileSource(
      task, {"train": f"niv2/tasks/{task}.json"}, parse_niv2, NIV2_SIGNATURE,
      root=root, num_examples={"train": num_examples} if num_examples else None,
      # The collection keys ten tasks by the name cut at its first '.', e.g.
      # task074_squad1 for tasks/task074_squad1.1_question_generation.json.
      fallback_glob=f"niv2/tasks/{task}.*.json",
      missing_hint="Download it from github.com/allenai/natural-instructions "
      "(tasks/<name>.json) or run `python -m moe_jax_tasks prepare --out DIR`.")


# ------------------------------------------------------------------- CoT TSV files

COT_SIGNATURE = {k: tf.TensorSpec((), tf.string)
                 for k in ("question", "answer", "chain_of_thought")}


def parse_cot_tsv(task: str, path: str,
                  malformed: MalformedRecords) -> Iterator[Record]:
  """Reads `question \\t answer \\t chain_of_thought` rows."""
  for number, line in lines(path):
    columns = line.split("\t")
    if len(columns) != 3 or not all(c.strip() for c in columns):
      malformed.report(task, path, f"line {number}", "expected 3 non-empty "
                       f"tab-separated columns, got {len(columns)}")
      continue
    question, answer, chain = (c.strip() for c in columns)
    yield {"question": question, "answer": answer, "chain_of_thought": chain}


def cot_source(task: str, dataset: str,
               root: Callable[[], str] = config.data_dir) -> FileSource:
  return FileSource(
      task, {"train": f"cot/{dataset}_train.tsv"}, parse_cot_tsv, COT_SIGNATURE,
      root=root,
      missing_hint="The collection's CoT files are cot_data/<dataset>_train.tsv in "
      "google-research/FLAN (flan/v2); `prepare` copies them.")


# --------------------------------------------------------------------- P3 export

P3_SIGNATURE = {"inputs": tf.TensorSpec((), tf.string),
                "answer": tf.TensorSpec((), tf.string),
                "options": tf.TensorSpec((None,), tf.string)}


def parse_p3_jsonl(task: str, path: str,
                   malformed: MalformedRecords) -> Iterator[Record]:
  """Reads our P3 export: one {"inputs", "targets", "answer_choices"?} per line."""
  for number, record in json_objects(task, path, malformed):
    inputs = record.get("inputs", record.get("inputs_pretokenized"))
    targets = record.get("targets", record.get("targets_pretokenized"))
    choices = record.get("answer_choices") or []
    if not isinstance(inputs, str) or not isinstance(targets, str) or not (
        isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
      malformed.report(task, path, f"line {number}", "needs string 'inputs' and "
                       "'targets' and an optional list of strings 'answer_choices'")
      continue
    yield {"inputs": inputs.strip(), "answer": targets.strip(),
           "options": [c.strip() for c in choices]}


def p3_source(task: str, root: Callable[[], str] = config.data_dir) -> FileSource:
  return FileSource(
      task, {"train": f"p3/{task}/train.jsonl"}, parse_p3_jsonl, P3_SIGNATURE,
      root=root,
      missing_hint="Export the bigscience/P3 subset with `python -m moe_jax_tasks "
      "prepare --out DIR` (or write the JSON lines yourself: inputs, targets, "
      "answer_choices).")


# ----------------------------------------------------------- JSON lines (generic)

def parse_jsonl(task: str, path: str,
                malformed: MalformedRecords) -> Iterator[Record]:
  """Reads one JSON object per line, keeping the keys of the first line."""
  keys = None
  for number, record in json_objects(task, path, malformed):
    if keys is None:
      keys = set(record)
    if set(record) != keys:
      malformed.report(task, path, f"line {number}", f"keys {sorted(record)} "
                       f"differ from the first line's {sorted(keys)}")
      continue
    yield record


def unreleased_source(task: str) -> FileSource:
  return FileSource(
      task, {"train": f"unreleased/{task}/train.jsonl"}, parse_jsonl,
      missing_hint=(
          "This task's data was never publicly released (the collection names it "
          "but publishes no data). If you have it, write one JSON object per line "
          "with string fields 'inputs' and 'targets' to that path."),
      missing_error=UnreleasedDataError)


# ------------------------------------------------------------------------- TFDS

class TfdsSource(seqio.DataSource):
  """A prepared TFDS dataset under <data root>/tfds, or a JSON-lines override.

  Reads `tfds/<name>/<version>/` with `tfds.builder_from_directory`, so no builder
  code, registry lookup or download happens. If `muffin/<task>/<split>.jsonl`
  exists it is read instead (same feature names as the TFDS builder).

  Args:
    task_name: catalog task name.
    tfds_spec: `name[/config]:version` or `huggingface:<name>` (any version).
    split: the TFDS split trained on.
  """

  def __init__(self, task_name: str, tfds_spec: str, split: str = "train"):
    super().__init__(splits=("train",), num_input_examples=None)
    self._task_name = task_name
    self._tfds_spec = tfds_spec
    self._split = split
    self._override = FileSource(
        task_name, {"train": f"muffin/{task_name}/{split}.jsonl"}, parse_jsonl)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  @property
  def tfds_spec(self) -> str:
    return self._tfds_spec

  def skipped_records(self) -> dict[str, int]:
    """Malformed records skipped in the latest pass over the JSON-lines override."""
    return self._override.skipped_records()

  def list_shards(self, split: str) -> list[str]:
    return [self._tfds_spec]

  def dataset_dir(self) -> str:
    """The prepared dataset directory; raises DataNotFoundError naming the fix."""
    name, _, version = self._tfds_spec.partition(":")
    if name == "huggingface":
      name, version = version, ""
    base = os.path.join(config.data_dir(), "tfds", name)
    if version:
      candidate = os.path.join(base, version)
    else:
      versions = (sorted(v.rstrip("/") for v in tf.io.gfile.listdir(base))
                  if tf.io.gfile.isdir(base) else [])
      candidate = os.path.join(base, versions[-1]) if versions else base
    if not tf.io.gfile.exists(os.path.join(candidate, "dataset_info.json")):
      raise DataNotFoundError(
          f"Task {self._task_name!r}: TFDS dataset {self._tfds_spec} is not "
          f"prepared at {candidate}. Run `python -m moe_jax_tasks prepare --out "
          f"DIR --only {self._task_name}` on a machine with internet, or `tfds "
          f"build` with --data_dir={os.path.dirname(base)}, or write "
          f"{self._override.path('train')} (JSON lines with the TFDS features).")
    return candidate

  def _use_override(self) -> bool:
    return tf.io.gfile.exists(self._override.path("train"))

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    if self._use_override():
      return self._override.get_dataset("train", shuffle, seed, shard_info)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(self.dataset_dir())
    dataset = builder.as_dataset(
        split=self._split, shuffle_files=shuffle,
        read_config=tfds.ReadConfig(shuffle_seed=seed))
    if shard_info and shard_info.num_shards > 1:
      dataset = dataset.shard(shard_info.num_shards, shard_info.index)
    return dataset

  def num_input_examples(self, split: str) -> int:
    if self._use_override():
      return self._override.num_input_examples("train")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(self.dataset_dir())
    return builder.info.splits[self._split].num_examples
