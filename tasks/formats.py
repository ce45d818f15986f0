"""The collection's formats: their one table, and their rendering as preprocessors.

`FORMATS` names every format (the suffix of a seqio task name), how it renders
(zero-shot, few-shot, options, x-shot) and the mixture settings (`SETTINGS`) it is
mixed in; the registry and the mixtures both read it.

Rendering input: normalized examples (text fields as scalar strings, `answer`,
optionally `options` as a 1-D string tensor and, for NIv2, `_exemplars`: the task's
own demonstrations as 1-D tensors keyed like the fields). Output: `inputs` / `targets`
strings plus the metadata features `_task_name`, `_task_source`, `_template_idx`,
`_template_type`.

Templates are assigned round-robin over the stream (example i gets template i mod n);
the option style advances once per full round of templates, so every (template,
style) pair occurs. Input inversion is not a separate mechanism: inverted tasks render
the same normalized fields with an inversion template group, whose target is the
original input.
"""

import dataclasses
import string
import zlib
from typing import Mapping, NamedTuple, Optional, Sequence

import seqio
import tensorflow as tf

from moe_jax_tasks import templates as templates_lib


class Setting(NamedTuple):
  """A setting of the collection's mixtures (`<submix>_<name>`, e.g. `t0_fsopt`)."""
  name: str
  zero_shot: bool
  with_options: bool


SETTINGS = (Setting("zsopt", True, True), Setting("zsnoopt", True, False),
            Setting("fsopt", False, True), Setting("fsnoopt", False, False))


def template_type(zero_shot: bool, with_options: bool) -> str:
  """The collection's `_template_type`: zs_opt, zs_noopt, fs_opt or fs_noopt."""
  return f"{'zs' if zero_shot else 'fs'}_{'opt' if with_options else 'noopt'}"


@dataclasses.dataclass(frozen=True)
class Format:
  """One rendering of a task.

  Attributes:
    name: suffix of the seqio task name.
    for_options: whether tasks with answer options (or those without) get it.
    with_options: write the answer options.
    num_shots: 0 for zero-shot; else exemplars per prompt (most, for x-shot).
    same_template: x-shot (exemplars under the query's template).
    settings: names of the mixture settings it is mixed in.
  """
  name: str
  for_options: bool
  with_options: bool
  num_shots: int = 0
  same_template: bool = False
  settings: tuple[str, ...] = ()


# `fs5` is the 5-shot template mix, `xs` the same-template x-shot (1-4 exemplars).
# Tasks without options render no option list, so their formats serve the settings
# with and without options alike; few-shot without options mixes the x-shot only.
FORMATS = (
    Format("zs_opt", True, True, settings=("zsopt",)),
    Format("zs_noopt", True, False, settings=("zsnoopt",)),
    Format("fs5_opt", True, True, 5, settings=("fsopt",)),
    Format("fs5_noopt", True, False, 5),
    Format("xs_opt", True, True, 4, True, settings=("fsopt",)),
    Format("xs_noopt", True, False, 4, True, settings=("fsnoopt",)),
    Format("zs", False, False, settings=("zsopt", "zsnoopt")),
    Format("fs5", False, False, 5, settings=("fsopt",)),
    Format("xs", False, False, 4, True, settings=("fsopt", "fsnoopt")),
)


def formats_for(has_options: bool) -> tuple[Format, ...]:
  """The formats a task gets, in table order."""
  return tuple(f for f in FORMATS if f.for_options == has_options)


AUTOTUNE = tf.data.AUTOTUNE
SHOT_DELIMITER = "\n"  # between an exemplar's input and its target
_EXEMPLARS = "_exemplars"


class OptionStyle(NamedTuple):
  """How an option list is written, and what the answer becomes.

  Attributes:
    header: first line of the list.
    item: pattern of one item over `{label}` and `{text}`.
    labels: label alphabet ("" = unlabelled items).
    answer: pattern of the target over `{label}` / `{text}` (unlabelled: `{text}`).
  """
  header: str
  item: str
  labels: str
  answer: str


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OPTION_STYLES: tuple[OptionStyle, ...] = (
    OptionStyle("OPTIONS:", "- {text}", "", "{text}"),
    OptionStyle("Options:", "({label}) {text}", _LETTERS, "({label})"),
    OptionStyle("Choose one:", "{label}. {text}", "123456789", "{label}"),
    OptionStyle("Possible answers:", "* {text}", "", "{text}"),
    OptionStyle("Select from:", "{label}) {text}", _LETTERS.lower(), "{label})"),
)


def _render(pattern: str, fields: Mapping[str, tf.Tensor], where: str) -> tf.Tensor:
  """Fills a format pattern with string tensors (scalars, or vectors of one length)."""
  parts = []
  for literal, field, _, _ in string.Formatter().parse(pattern):
    if literal:
      parts.append(literal)
    if field is not None:
      if field not in fields:
        raise KeyError(f"{where}: template field {{{field}}} is not among the "
                       f"example's fields {sorted(fields)}.")
      parts.append(fields[field])
  return tf.strings.join(parts) if parts else tf.constant("")


def _tidy(text: tf.Tensor) -> tf.Tensor:
  """Drops the blank lines an empty `{options}` leaves, and outer whitespace."""
  text = tf.strings.regex_replace(text, r"[ \t]+\n", "\n")
  text = tf.strings.regex_replace(text, r"\n{3,}", "\n\n")
  return tf.strings.strip(text)


def format_options(options: tf.Tensor, answer: tf.Tensor) -> tuple[tf.Tensor,
                                                                   tf.Tensor]:
  """Writes an option list in every style.

  A style with more options than labels falls back to the unlabelled first style.
  The answer is rewritten to its label in labelled styles when it is one of the
  options (otherwise it stays as text).

  Args:
    options: 1-D string tensor (may be empty: then the text is empty too).
    answer: scalar string.

  Returns:
    (texts, answers), each a 1-D string tensor with one entry per style.
  """
  count = tf.size(options)
  # Index of the answer among the options (== count when it is not one of them).
  position = tf.argmax(tf.concat([tf.cast(tf.equal(options, answer), tf.int32),
                                  [1]], 0), output_type=tf.int32)
  found = tf.reduce_any(tf.equal(options, answer))
  texts, answers, fits = [], [], []
  for style in OPTION_STYLES:
    if style.labels:
      labels = tf.gather(tf.constant(list(style.labels)),
                         tf.minimum(tf.range(count), len(style.labels) - 1))
      fit = count <= len(style.labels)
    else:
      labels = tf.fill([count], "")
      fit = tf.constant(True)
    items = _render(style.item, {"label": labels, "text": options}, "options")
    text = tf.strings.join([style.header, "\n",
                            tf.strings.reduce_join(items, separator="\n")])
    text = tf.where(count > 0, text, "")
    label = tf.gather(tf.concat([labels, [""]], 0), position)
    styled = _render(style.answer, {"label": label, "text": answer}, "options")
    texts.append(text)
    answers.append(tf.where(found, styled, answer))
    fits.append(fit)
  # OPTION_STYLES[0] is unlabelled, so it fits any number of options.
  texts = [tf.where(f, x, texts[0]) for f, x in zip(fits, texts)]
  answers = [tf.where(f, x, answers[0]) for f, x in zip(fits, answers)]
  return tf.stack(texts), tf.stack(answers)


def _split_fields(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: v for k, v in ex.items() if k not in ("options", _EXEMPLARS)}


def _with_option_styles(ex: Mapping[str, tf.Tensor], with_options: bool) -> dict:
  """Fields plus `_option_texts` / `_option_answers` (one entry per style)."""
  fields = _split_fields(ex)
  if with_options and "options" in ex:
    texts, answers = format_options(ex["options"], ex["answer"])
  else:
    texts = tf.fill([len(OPTION_STYLES)], "")
    answers = tf.fill([len(OPTION_STYLES)], ex["answer"])
  fields["_option_texts"], fields["_option_answers"] = texts, answers
  if _EXEMPLARS in ex:
    fields[_EXEMPLARS] = ex[_EXEMPLARS]
  return fields


def _styled(fields: Mapping[str, tf.Tensor], style: tf.Tensor) -> dict:
  """Text fields with `options` / `answer` in the given style (any batch shape)."""
  out = {k: v for k, v in fields.items()
         if k not in ("_option_texts", "_option_answers", _EXEMPLARS)}
  out["options"] = tf.gather(fields["_option_texts"], style, axis=-1,
                             batch_dims=len(fields["_option_texts"].shape) - 1)
  out["answer"] = tf.gather(fields["_option_answers"], style, axis=-1,
                            batch_dims=len(fields["_option_answers"].shape) - 1)
  return out


def _render_all(templates, fields, part: str, where: str) -> tf.Tensor:
  """Renders one template part under every template: shape [n_templates, ...]."""
  return tf.stack([_render(getattr(t, part), fields, f"{where} template {i}")
                   for i, t in enumerate(templates)])


def _metadata(task_name, task_source, template_idx, type_name) -> dict:
  return {"_task_name": tf.constant(task_name),
          "_task_source": tf.constant(task_source),
          "_template_idx": tf.cast(template_idx, tf.int32),
          "_template_type": tf.constant(type_name)}


def zero_shot(dataset: tf.data.Dataset, *, group: str, with_options: bool,
              task_name: str, task_source: str) -> tf.data.Dataset:
  """Renders each example with template i mod n of `group`.

  Args:
    dataset: normalized examples.
    group: template group name.
    with_options: write the option list (`{options}` is empty otherwise and the
      answer stays text).
    task_name: catalog task name (metadata).
    task_source: mixture (metadata).

  Returns:
    Examples with `inputs`, `targets` and metadata.
  """
  templates = templates_lib.group(group)
  n = len(templates)
  where = f"{task_name} ({group})"
  type_name = template_type(True, with_options)

  def render(index, ex):
    fields = _with_option_styles(ex, with_options)
    t = tf.cast(index % n, tf.int32)
    style = tf.cast((index // n) % len(OPTION_STYLES), tf.int32)
    styled = _styled(fields, style)
    inputs = tf.gather(_render_all(
        [tp._replace(inputs=tp.preamble + tp.inputs) for tp in templates],
        styled, "inputs", where), t)
    targets = tf.gather(_render_all(templates, styled, "targets", where), t)
    return {"inputs": _tidy(inputs), "targets": _tidy(targets),
            **_metadata(task_name, task_source, t, type_name)}

  return dataset.enumerate().map(render, num_parallel_calls=AUTOTUNE)


def separator_for(task_name: str) -> str:
  """The exemplar separator of a task: fixed per task, varied across tasks."""
  return ("\n\n", "\n\n\n")[zlib.crc32(task_name.encode("utf-8")) % 2]


def _neighbour_windows(dataset: tf.data.Dataset, num_shots: int):
  """Pairs each example with the next `num_shots` examples of the stream.

  The stream is extended by its own first `num_shots` examples so the last examples
  also get exemplars; windows starting in that extension are dropped.

  Returns:
    (index, example) batches of length <= num_shots + 1, the query first.
  """
  tagged = dataset.enumerate().map(lambda i, ex: (i, ex, False))
  wrap = dataset.take(num_shots).enumerate().map(lambda i, ex: (i, ex, True))
  windows = tagged.concatenate(wrap).window(num_shots + 1, shift=1)
  batched = windows.flat_map(
      lambda i, ex, w: tf.data.Dataset.zip((i, ex, w)).batch(num_shots + 1))
  return batched.filter(lambda i, ex, w: tf.logical_not(w[0])).map(
      lambda i, ex, w: (i[0], ex))


def _content_key(fields: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """All text fields joined: equal keys mean the same example (leak guard)."""
  keys = sorted(k for k in fields if not k.startswith("_"))
  return tf.strings.join([fields[k] for k in keys], separator="\x1f")


def few_shot(dataset: tf.data.Dataset,
             output_features: Mapping[str, seqio.Feature], *, group: str,
             with_options: bool, task_name: str, task_source: str,
             num_shots: int, same_template: bool,
             max_input_tokens: int, separator: Optional[str] = None
             ) -> tf.data.Dataset:
  """Prepends exemplars to each example.

  Exemplars are the task's `_exemplars` when the examples carry them (NIv2 positive
  examples), else the next examples of the stream. An exemplar whose text fields
  equal the query's is never used, so a prompt cannot contain its own target.
  Exemplars are kept in order while the tokenized prompt fits `max_input_tokens`;
  an example left with no exemplar is dropped.

  Args:
    dataset: normalized examples.
    output_features: the task's features; the inputs vocabulary counts tokens.
    group: template group name.
    with_options: write option lists.
    task_name: catalog task name (metadata, separator choice).
    task_source: mixture (metadata).
    num_shots: exemplars per prompt (template mix); for same-template prompts the
      count cycles through 1..num_shots over the stream.
    same_template: render the exemplars with the query's template (the x-shot
      format) instead of each with a different template (the template mix).
    max_input_tokens: prompt budget in tokens.
    separator: between exemplars; defaults to `separator_for(task_name)`.

  Returns:
    Examples with `inputs`, `targets` and metadata.
  """
  templates = templates_lib.group(group)
  n = len(templates)
  where = f"{task_name} ({group}, few-shot)"
  separator = separator_for(task_name) if separator is None else separator
  vocabulary = output_features["inputs"].vocabulary
  type_name = template_type(False, with_options)
  has_exemplars = _EXEMPLARS in dataset.element_spec
  prepared = dataset.map(lambda ex: _with_option_styles(ex, with_options),
                         num_parallel_calls=AUTOTUNE)
  if has_exemplars:
    pairs = prepared.enumerate()
  else:
    pairs = _neighbour_windows(prepared, num_shots)

  def assemble(index, batch):
    if has_exemplars:
      query = {k: v for k, v in batch.items() if k != _EXEMPLARS}
      given = {k: v[:num_shots] for k, v in batch[_EXEMPLARS].items()}
      count = tf.shape(given["answer"])[0]
      # Fields the exemplars lack (e.g. the NIv2 definition) are the query's.
      shots = {k: tf.fill([count], v) for k, v in query.items()
               if not k.startswith("_option") and k not in given}
      shots.update(given)
      shots["_option_texts"] = tf.fill([count, len(OPTION_STYLES)], "")
      shots["_option_answers"] = tf.tile(given["answer"][:, tf.newaxis],
                                         [1, len(OPTION_STYLES)])
    else:
      query = {k: v[0] for k, v in batch.items()}
      shots = {k: v[1:] for k, v in batch.items()}
      count = tf.shape(shots["answer"])[0]
    t = tf.cast(index % n, tf.int32)
    style = tf.cast((index // n) % len(OPTION_STYLES), tf.int32)
    query_fields = _styled(query, style)
    shot_fields = _styled(shots, tf.fill([count], style))
    valid = tf.not_equal(_content_key(shot_fields), _content_key(query_fields))
    positions = tf.range(count, dtype=tf.int32)
    if same_template:
      shot_templates = tf.fill([count], t)
      wanted = tf.cast((index // n) % num_shots + 1, tf.int32)
      valid &= tf.cumsum(tf.cast(valid, tf.int32)) <= wanted
    else:
      shot_templates = (t + 1 + positions) % n
    gather_at = tf.stack([shot_templates, positions], axis=1)
    shot_inputs = tf.gather_nd(
        _render_all(templates, shot_fields, "inputs", where), gather_at)
    shot_targets = tf.gather_nd(
        _render_all(templates, shot_fields, "targets", where), gather_at)
    shot_texts = tf.strings.join(
        [_tidy(shot_inputs), SHOT_DELIMITER, _tidy(shot_targets), separator])
    preamble = tf.gather(_render_all(templates, query_fields, "preamble", where), t)
    query_inputs = _tidy(tf.gather(
        _render_all(templates, query_fields, "inputs", where), t))
    fixed = tf.strings.join([preamble, query_inputs])
    budget = max_input_tokens - _token_count(vocabulary, fixed[tf.newaxis])[0]
    lengths = _token_count(vocabulary, shot_texts) * tf.cast(valid, tf.int32)
    keep = valid & (tf.cumsum(lengths) <= budget)
    inputs = tf.strings.join([
        preamble,
        tf.strings.reduce_join(tf.boolean_mask(shot_texts, keep)),
        query_inputs])
    targets = tf.gather(_render_all(templates, query_fields, "targets", where), t)
    return {"inputs": inputs, "targets": _tidy(targets),
            "_num_shots": tf.reduce_sum(tf.cast(keep, tf.int32)),
            **_metadata(task_name, task_source, t, type_name)}

  assembled = pairs.map(assemble, num_parallel_calls=AUTOTUNE)
  return assembled.filter(lambda ex: ex["_num_shots"] > 0)


def _token_count(vocabulary: seqio.Vocabulary, texts: tf.Tensor) -> tf.Tensor:
  """Token counts of a 1-D batch of strings."""
  tokens = vocabulary.encode_tf(texts)
  if isinstance(tokens, tf.RaggedTensor):
    return tf.cast(tokens.row_lengths(), tf.int32)
  return tf.fill([tf.shape(texts)[0]], tf.shape(tokens)[-1])


def tokenize_pipeline() -> Sequence:
  """The collection's tail: tokenize, cache point, EOS appended after trimming."""
  return (seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim)
