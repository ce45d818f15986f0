"""Reading Hugging Face directories, and the errors for what cannot be converted."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from moe_jax import checkpoints
from moe_jax.convert import hf


def _write_safetensors(path, tensors):
  """Minimal safetensors writer (header size, JSON header, raw bytes)."""
  names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
           np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64"}
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name, array in tensors.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_read_safetensors_handles_float32_float16_and_bfloat16(tmp_path):
  tensors = {
      "a": np.arange(6, dtype=np.float32).reshape(2, 3),
      "b": np.array([1.5, -2.0], np.float16),
      "c": np.array([[0.25, 3.0]], ml_dtypes.bfloat16),
      "d": np.array([7], np.int64),
  }
  _write_safetensors(tmp_path / "model.safetensors", tensors)
  read = hf.read_weights(str(tmp_path))
  assert sorted(read) == ["a", "b", "c", "d"]
  for name, array in tensors.items():
    assert read[name].dtype == array.dtype and read[name].shape == array.shape
    np.testing.assert_array_equal(read[name].astype(np.float64), array.astype(np.float64))


def test_sharded_safetensors_are_merged(tmp_path):
  _write_safetensors(tmp_path / "part-1.safetensors", {"x": np.ones(2, np.float32)})
  _write_safetensors(tmp_path / "part-2.safetensors", {"y": np.zeros(3, np.float32)})
  with open(tmp_path / hf.SAFETENSORS_INDEX_FILE, "w", encoding="utf-8") as f:
    json.dump({"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}, f)
  assert sorted(hf.read_weights(str(tmp_path))) == ["x", "y"]


def test_missing_shard_is_named(tmp_path):
  with open(tmp_path / hf.SAFETENSORS_INDEX_FILE, "w", encoding="utf-8") as f:
    json.dump({"weight_map": {"x": "gone.safetensors"}}, f)
  with pytest.raises(FileNotFoundError, match="gone.safetensors"):
    hf.read_weights(str(tmp_path))


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="No config.json"):
    hf.convert(str(tmp_path), str(tmp_path / "out"))


def test_unknown_architecture(tmp_path):
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump({"model_type": "bart", "architectures": ["BartForConditionalGeneration"]}, f)
  with pytest.raises(ValueError, match="Unsupported architecture.*'bart'.*switch_transformers"):
    hf.convert(str(tmp_path), str(tmp_path / "out"))


def test_missing_weights(tmp_path):
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump({"model_type": "t5"}, f)
  with pytest.raises(FileNotFoundError, match="No weights.*model.safetensors"):
    hf.convert(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("config, num_layers, expected", [
    # Without `*_sparse_step`: step = num_layers // num_sparse, layer i sparse
    # iff i % step == 1 (or step == 1).
    ({"num_sparse_encoder_layers": 6}, 12, (1, 3, 5, 7, 9, 11)),
    ({"num_sparse_encoder_layers": 3}, 12, (1, 5, 9)),
    ({"num_sparse_encoder_layers": 4}, 4, (0, 1, 2, 3)),
    # A count of 0 gives step = num_layers, which still makes layer 1 sparse.
    ({"num_sparse_encoder_layers": 0}, 4, (1,)),
    # An explicit step (transformers 5 saves it) wins over the count.
    ({"num_sparse_encoder_layers": 3, "encoder_sparse_step": 2}, 3, (1,)),
    ({"num_sparse_encoder_layers": 1, "encoder_sparse_step": 1}, 3, (0, 1, 2)),
    ({"num_sparse_encoder_layers": 3, "encoder_sparse_step": 0}, 3, ()),
])
def test_sparse_layers_follow_transformers_rule(config, num_layers, expected):
  assert hf.transformers_sparse_layers(config, "encoder", num_layers) == expected


def test_sparse_layout_of_layer_indices():
  assert hf.sparse_layout((1, 3, 5, 7, 9, 11), 12) == (6, "mixed")
  with pytest.raises(ValueError, match=r"Sparse layers \[1, 5, 9\].*match no moe_jax layout"):
    hf.sparse_layout((1, 5, 9), 12)


class TestWithTransformersCheckpoints:
  """Errors that need a real checkpoint layout (written by transformers)."""

  @pytest.fixture
  def t5_dir(self, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    path = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(config).save_pretrained(str(path))
    return path

  def _edit_config(self, path, **changes):
    with open(path / "config.json", encoding="utf-8") as f:
      config = json.load(f)
    config.update(changes)
    with open(path / "config.json", "w", encoding="utf-8") as f:
      json.dump(config, f)

  def test_shape_mismatch_names_the_parameter(self, t5_dir, tmp_path):
    self._edit_config(t5_dir, d_ff=24)
    with pytest.raises(ValueError, match="Shape mismatch for encoder/layers_0/mlp/wi_0"):
      hf.convert(str(t5_dir), str(tmp_path / "out"))

  def test_unused_tensors_are_reported(self, t5_dir, tmp_path):
    path = t5_dir / hf.SAFETENSORS_FILE
    tensors = dict(hf.read_safetensors(str(path)))
    tensors["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(8, np.float32)
    _write_safetensors(tmp_path / "model.safetensors", tensors)
    os.replace(tmp_path / "model.safetensors", path)
    with pytest.raises(ValueError, match="1 checkpoint tensors have no place.*q.bias"):
      hf.convert(str(t5_dir), str(tmp_path / "out"))

  def test_refuses_non_empty_output_dir(self, t5_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
      hf.convert(str(t5_dir), str(out))

  def test_pytorch_bin_converts_like_safetensors(self, t5_dir, tmp_path):
    import torch  # pylint: disable=g-import-not-at-top
    state = {k: torch.from_numpy(np.array(v)) for k, v in
             hf.read_safetensors(str(t5_dir / hf.SAFETENSORS_FILE)).items()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(state, bin_dir / hf.TORCH_FILE)
    os.link(t5_dir / "config.json", bin_dir / "config.json")
    config = hf.read_config(str(t5_dir))
    from_safetensors = hf.convert_weights(
        hf.architecture_from_config(config, hf.read_weights(str(t5_dir))),
        hf.read_weights(str(t5_dir)))
    weights = hf.read_weights(str(bin_dir))
    from_bin = hf.convert_weights(hf.architecture_from_config(config, weights), weights)
    flat_a, flat_b = checkpoints.flatten(from_safetensors), checkpoints.flatten(from_bin)
    assert sorted(flat_a) == sorted(flat_b)
    for name in flat_a:
      np.testing.assert_array_equal(flat_a[name], flat_b[name])

  def test_cli_reports_outputs(self, t5_dir, tmp_path, capsys):
    from moe_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
    out = tmp_path / "out"
    assert cli.main(["hf", "--checkpoint_dir", str(t5_dir), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote checkpoint: {out / 'checkpoint'}" in printed
    assert f"Wrote gin config: {out / 'model.gin'}" in printed
    assert cli.main(["hf", "--checkpoint_dir", str(t5_dir), "--output_dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
