"""Decoding a task, a mixture or a JSONL file to JSONL (what `python -m moe_jax.infer` runs).

Two kinds of input:
  * a seqio task or mixture (`mixture_or_task_name`): each example of a split is
    decoded; output lines `{"task", "index", "inputs", "targets",
    "prediction"}` in `OUTPUT_DIR/<task>-<split>.jsonl`;
  * a JSONL file of raw `{"inputs": "..."}` lines (`input_file`): tokenized
    with the model's vocabulary (EOS appended, as seqio does); output lines
    are the input objects plus `"prediction"`, in
    `OUTPUT_DIR/<input file name>.predictions.jsonl`.
Files are written to a temporary name and renamed when complete.
"""

import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import seqio
from etils import epath

from moe_jax import inputs
from moe_jax import partitioning
from moe_jax import paths
from moe_jax.training import evaluation
from moe_jax.training import trainer as trainer_lib


def _write_jsonl(path: str, rows) -> None:
  paths.write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_raw_inputs(path: str, vocabulary: Any, max_length: int
                    ) -> List[Tuple[Dict[str, Any], Dict[str, np.ndarray]]]:
  """`(object, features)` per line of a `{"inputs": text}` JSONL file.

  Raises:
    ValueError: naming the line of a malformed example.
  """
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"Input file {path!r} does not exist.")
  if vocabulary is None:
    raise ValueError("The model has no input vocabulary to tokenize the file with; bind "
                     "VOCABULARY in the model gin.")
  examples = []
  with epath.Path(path).open() as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number}: not valid JSON ({e.msg}).") from None
      if not isinstance(example, dict) or not isinstance(example.get("inputs"), str):
        raise ValueError(f'{path} line {number}: expected an object with "inputs" text.')
      ids = list(vocabulary.encode(example["inputs"]))[:max_length - 1] + [vocabulary.eos_id]
      examples.append((example, {"encoder_input_tokens": np.asarray(ids, np.int32)}))
  return examples


def _decoded(functions: evaluation.ModelFunctions, examples: Iterator[Tuple[int, Mapping]],
             vocabulary: Any) -> Dict[int, str]:
  predictions = functions.predict_examples(examples)
  return {index: vocabulary.decode(tokens) for index, tokens in predictions}


def infer(*, model: Any, checkpoint_path: str, output_dir: str,
          task_feature_lengths: Mapping[str, int], batch_size: int,
          input_file: Optional[str] = None, mixture_or_task_name: Optional[str] = None,
          split: str = "validation", task_module: Optional[str] = None,
          mesh_shape: Optional[Mapping[str, int]] = None) -> List[str]:
  """Decodes a task / mixture or a JSONL file (see the module docstring).

  Args:
    model: the `EncoderDecoderModel` (gin's MODEL).
    checkpoint_path: parameters (CHECKPOINT_PATH).
    output_dir: where the JSONL files go (INFER_OUTPUT_DIR).
    task_feature_lengths: `{'inputs': L_in, 'targets': L_out}`; targets is
      the decode length.
    batch_size: global rows per decoding call.
    input_file: a `{"inputs": ...}` JSONL file (INPUT_FILE), or
    mixture_or_task_name: a seqio task or mixture (MIXTURE_OR_TASK_NAME),
    split: of that task (INFER_SPLIT),
    task_module: imported to register it (MIXTURE_OR_TASK_MODULE).
    mesh_shape: MESH_SHAPE.

  Returns:
    The files written.
  """
  if (mixture_or_task_name is None) == (input_file is None):
    raise ValueError("Give either a task or mixture (MIXTURE_OR_TASK_NAME) or an "
                     "INPUT_FILE of {\"inputs\": ...} lines, not both or neither.")
  lengths = {"encoder_input_tokens": task_feature_lengths["inputs"],
             "decoder_input_tokens": task_feature_lengths["targets"]}
  mesh = partitioning.mesh_from_shape(mesh_shape)
  placement = trainer_lib.Placement(
      model, mesh, partitioning.standard_logical_axis_rules(),
      {name: (batch_size, length) for name, length in lengths.items()})
  params = evaluation.load_params(placement, checkpoint_path)
  functions = evaluation.ModelFunctions(
      model, params, batch_size, lengths,
      lambda batch: inputs.to_global_arrays(batch, mesh, whole_batch=True),
      placement.context)
  written = []
  if input_file is not None:
    examples = read_raw_inputs(input_file, model.input_vocabulary, lengths["encoder_input_tokens"])
    predicted = _decoded(functions, ((i, f) for i, (_, f) in enumerate(examples)),
                         model.output_vocabulary)
    path = os.path.join(output_dir,
                        os.path.splitext(os.path.basename(input_file))[0] + ".predictions.jsonl")
    _write_jsonl(path, (dict(obj, prediction=predicted[i])
                        for i, (obj, _) in enumerate(examples)))
    written.append(path)
  else:
    mixture = inputs.get_mixture_or_task(mixture_or_task_name, task_module)
    for task in seqio.get_subtasks(mixture):
      dataset = task.get_dataset(sequence_length=dict(task_feature_lengths),
                                 split=split, shuffle=False, num_epochs=1)
      rows = list(dataset.as_numpy_iterator())
      features = ((i, {"encoder_input_tokens": row["inputs"]}) for i, row in enumerate(rows))
      predicted = _decoded(functions, features, model.output_vocabulary)
      path = os.path.join(output_dir, f"{task.name}-{split}.jsonl")
      _write_jsonl(path, ({"task": task.name, "index": i,
                           "inputs": row.get("inputs_pretokenized", b"").decode(),
                           "targets": row.get("targets_pretokenized", b"").decode(),
                           "prediction": predicted[i]} for i, row in enumerate(rows)))
      written.append(path)
  for path in written:
    print(f"Wrote {path}")
  return written
