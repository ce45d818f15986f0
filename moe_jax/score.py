"""Scores targets given inputs: per-example log-likelihoods from a checkpoint.

  python -m moe_jax.score --gin_file OUT/model.gin --checkpoint OUT \\
      --input_file examples.jsonl --output_file scores.jsonl

Each input line is a JSON object with the inputs and the targets, either as
text (`inputs`, `targets`; tokenized with the model's vocabulary from gin, EOS
appended as seqio's T5 tasks do) or as token ids (`inputs_ids`,
`targets_ids`; used verbatim). Each output line is the input object plus
`log_likelihood` = sum over target tokens of log p(token | inputs, prefix),
from the model's `score_batch`, and `num_target_tokens`. Typical use: rank
classification (score every answer option, pick the highest).
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from moe_jax import checkpoints
from moe_jax import cli
from moe_jax import config

# Pad lengths to a multiple of this so that few distinct shapes get compiled.
_LENGTH_MULTIPLE = 8


class InputError(ValueError):
  """A problem with the input file, naming the line."""


def _token_ids(value: Any, field: str, line: int) -> List[int]:
  if (not isinstance(value, list) or not value
      or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
    raise InputError(f"line {line}: {field!r} must be a non-empty list of positive "
                     f"token ids (0 is padding), got {value!r}.")
  return value


def _encode(example: Mapping[str, Any], name: str, vocabulary: Any, line: int) -> List[int]:
  """Token ids of `name` ('inputs' or 'targets') from text or ids."""
  ids_field = f"{name}_ids"
  if ids_field in example and name in example:
    raise InputError(f"line {line}: give either {name!r} (text) or {ids_field!r}, not both.")
  if ids_field in example:
    return _token_ids(example[ids_field], ids_field, line)
  if name not in example:
    raise InputError(f"line {line}: missing {name!r} (text) or {ids_field!r} (token ids).")
  text = example[name]
  if not isinstance(text, str):
    raise InputError(f"line {line}: {name!r} must be a string, got {type(text).__name__}.")
  if vocabulary is None:
    raise InputError(
        f"line {line}: {name!r} is text, but the model has no vocabulary. Bind one in "
        "gin (e.g. --gin_bindings \"VOCABULARY = @seqio.SentencePieceVocabulary()\" "
        "plus its sentencepiece_model_file) or give token ids in "
        f"{ids_field!r}.")
  ids = list(vocabulary.encode(text)) + [vocabulary.eos_id]
  return ids


def read_examples(path: str, input_vocabulary: Any, output_vocabulary: Any
                  ) -> Iterator[Tuple[Dict[str, Any], List[int], List[int]]]:
  """Yields `(example, input ids, target ids)` for each non-blank line.

  Raises:
    InputError: naming the line of a malformed example.
  """
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        example = json.loads(text)
      except json.JSONDecodeError as e:
        raise InputError(f"line {number}: not valid JSON ({e.msg}).") from None
      if not isinstance(example, dict):
        raise InputError(f"line {number}: expected a JSON object, got "
                         f"{type(example).__name__}.")
      yield (example, _encode(example, "inputs", input_vocabulary, number),
             _encode(example, "targets", output_vocabulary, number))


def _padded_length(lengths: Sequence[int]) -> int:
  longest = max(lengths)
  return -(-longest // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE


def make_batch(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
               batch_size: int) -> Dict[str, np.ndarray]:
  """t5x-style features for `score_batch`, padded to `batch_size` rows."""
  enc_len, dec_len = _padded_length([len(x) for x in inputs]), _padded_length(
      [len(y) for y in targets])
  batch = {
      "encoder_input_tokens": np.zeros((batch_size, enc_len), np.int32),
      "decoder_target_tokens": np.zeros((batch_size, dec_len), np.int32),
      "decoder_input_tokens": np.zeros((batch_size, dec_len), np.int32),
      "decoder_loss_weights": np.zeros((batch_size, dec_len), np.int32),
  }
  for row, (x, y) in enumerate(zip(inputs, targets)):
    batch["encoder_input_tokens"][row, :len(x)] = x
    batch["decoder_target_tokens"][row, :len(y)] = y
    # Targets shifted right; decoding starts from id 0.
    batch["decoder_input_tokens"][row, 1:len(y)] = y[:-1]
    batch["decoder_loss_weights"][row, :len(y)] = 1
  return batch


def score_file(model: Any, params: Mapping[str, Any], input_file: str, output_file: str,
               batch_size: int = 8) -> int:
  """Scores every example of `input_file` into `output_file` (JSON lines).

  The output is written to a temporary file and renamed at the end, so a
  failed run leaves no partial output.

  Returns:
    The number of examples scored.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if not os.path.isfile(input_file):
    raise FileNotFoundError(f"Input file {input_file!r} does not exist.")
  checkpoints.check_params_match_model(params, checkpoints.param_shapes(model))
  score = jax.jit(model.score_batch)
  examples = read_examples(input_file, model.input_vocabulary, model.output_vocabulary)
  tmp_file = output_file + ".tmp"
  count = 0
  try:
    with open(tmp_file, "w", encoding="utf-8") as out:
      while True:
        chunk = [e for _, e in zip(range(batch_size), examples)]
        if not chunk:
          break
        batch = make_batch([c[1] for c in chunk], [c[2] for c in chunk], batch_size)
        scores = np.asarray(score(params, batch))
        for row, (example, _, target_ids) in enumerate(chunk):
          result = dict(example, log_likelihood=float(scores[row]),
                        num_target_tokens=len(target_ids))
          out.write(json.dumps(result) + "\n")
        count += len(chunk)
    os.replace(tmp_file, output_file)
  finally:
    if os.path.exists(tmp_file):
      os.remove(tmp_file)
  return count


def _score(args: argparse.Namespace) -> None:
  model = config.load_model(args.gin_file, args.gin_bindings, args.gin_search_paths)
  params = checkpoints.restore_params(args.checkpoint)
  count = score_file(model, params, args.input_file, args.output_file, args.batch_size)
  print(f"Scored {count} examples; wrote {os.path.abspath(args.output_file)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.score",
                                   description=__doc__.split("\n\n")[0])
  cli.add_gin_flags(parser)
  parser.add_argument("--checkpoint", required=True,
                      help="orbax checkpoint directory, or a `moe_jax.convert` output dir")
  parser.add_argument("--input_file", required=True, help="JSON lines to score")
  parser.add_argument("--output_file", required=True, help="where to write JSON lines")
  parser.add_argument("--batch_size", type=int, default=8)
  cli.add_output_flags(parser)
  return cli.run(_score, parser, argv)


if __name__ == "__main__":
  sys.exit(main())
