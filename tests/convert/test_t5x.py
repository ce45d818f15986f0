"""t5x checkpoints in: read without t5x, parameters and logits as t5x has them.

The fixtures in testdata/ were written by real t5x (`make_t5x_fixtures.py`
says how): `t5x_moe/` trained our tiny MoE module under t5x's MoE trainer,
`t5x_t5/` t5x's own T5.1.1 network (the released checkpoints' parameter
names). Each keeps the step directory t5x wrote (msgpack `checkpoint` plus
tensorstore zarr arrays, optimizer state included) and the logits t5x's model
computed from it on a fixed batch. Parameters are compared with the zarr
arrays read independently (JSON + gzip + numpy), logits with t5x's.
"""

import gzip
import json
import os
import shutil

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

from moe_jax import checkpoints
from moe_jax import config
from moe_jax import partitioning
from moe_jax.convert import __main__ as convert_cli
from moe_jax.convert import t5x

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
FIXTURES = {
    # fixture: (its step directory, the gin files of the moe_jax model).
    "t5x_moe": ["gin/models/tiny_moe.gin", os.path.join(TESTDATA, "tiny_moe_t5x.gin")],
    "t5x_t5": ["gin/models/tiny.gin", os.path.join(TESTDATA, "tiny_t5_t5x.gin")],
}
STEP = 2
HEADS = 2  # both fixtures' (testdata/tiny_*_t5x.gin)


def _step_dir(fixture):
  return os.path.join(TESTDATA, fixture, f"checkpoint_{STEP}")


def _read_zarr(path):
  """A zarr v2 array (as t5x's tensorstore writes them), without tensorstore."""
  with open(os.path.join(path, ".zarray"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["order"] == "C" and meta["compressor"]["id"] == "gzip"
  shape, chunks = meta["shape"], meta["chunks"]
  out = np.zeros(shape, np.dtype(meta["dtype"]))
  separator = meta.get("dimension_separator", ".")
  for index in np.ndindex(*[-(-s // c) for s, c in zip(shape, chunks)]):
    name = separator.join(map(str, index)) if shape else "0"
    with open(os.path.join(path, name), "rb") as f:
      chunk = np.frombuffer(gzip.decompress(f.read()), out.dtype).reshape(chunks)
    region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
    out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
  return out


def _expected_params(fixture):
  """{moe_jax name: array} from the step directory's zarr arrays alone."""
  directory = _step_dir(fixture)
  flat = {}
  for entry in sorted(os.listdir(directory)):
    if not entry.startswith("target."):
      continue
    name = entry[len("target."):].replace(".", "/")
    # The released naming keeps dense weights under `kernel`, attention
    # kernels flattened to 2-D (t5x.py docstring).
    for weight in ("wi_0", "wi_1", "wi", "wo"):
      name = name.replace(f"/mlp/{weight}/kernel", f"/mlp/{weight}")
    value = _read_zarr(os.path.join(directory, entry))
    if "attention/" in name and value.ndim == 2:
      value = (value.reshape(HEADS, -1, value.shape[1]) if name.endswith("/out/kernel")
               else value.reshape(value.shape[0], HEADS, -1))
    flat[name] = value
  return flat


def _model(fixture):
  return config.load_model(FIXTURES[fixture])


def _logits(model, params, batch):
  return np.asarray(jax.jit(model.compute_logits)(
      params, {k: jnp.asarray(batch[k]) for k in
               ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}))


def _t5x_logits(fixture):
  return dict(np.load(os.path.join(TESTDATA, fixture, "logits.npz")))


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_parameters_equal_the_stored_arrays(fixture):
  params = checkpoints.restore_params(_step_dir(fixture))
  got, want = checkpoints.flatten(params), _expected_params(fixture)
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  # ...and they are exactly the parameters of the moe_jax model.
  checkpoints.check_params_match_model(params, checkpoints.param_shapes(_model(fixture)))


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_logits_equal_what_t5x_computed(fixture):
  saved = _t5x_logits(fixture)
  ours = _logits(_model(fixture), checkpoints.restore_params(_step_dir(fixture)), saved)
  theirs = saved["logits"]
  assert ours.shape == theirs.shape
  assert np.max(np.abs(ours - theirs)) <= 1e-6 * np.max(np.abs(theirs))


def test_model_dir_and_metadata():
  model_dir = os.path.join(TESTDATA, "t5x_moe")
  directory, _ = checkpoints.find_checkpoint(model_dir)  # the latest step
  assert directory == _step_dir("t5x_moe") and checkpoints.is_t5x_checkpoint(directory)
  assert checkpoints.step_of(directory) == STEP
  assert t5x.T5xCheckpoint(directory).step == STEP
  stored = checkpoints.flatten(checkpoints.stored_params(model_dir))
  want = _expected_params("t5x_moe")
  assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()}


def test_sharded_and_partial_restore():
  if jax.device_count() != 8:
    pytest.skip("needs the suite's 8 (fake) devices")
  mesh = partitioning.mesh_from_shape({"data": 2, "expert": 4})
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  name = "encoder/layers_1/mlp/expert/wi_0"
  want = _expected_params("t5x_moe")
  target = {"encoder": {"layers_1": {"mlp": {"expert": {"wi_0": jax.ShapeDtypeStruct(
      want[name].shape, jnp.float32, sharding=sharding)}}}}}
  with pytest.raises(ValueError, match="parameters the model lacks"):
    checkpoints.restore_params(_step_dir("t5x_moe"), target)
  got = checkpoints.restore_params(_step_dir("t5x_moe"), target, partial=True)
  value = got["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]
  assert value.sharding == sharding
  assert value.sharding.shard_shape(value.shape)[0] == 1
  np.testing.assert_array_equal(np.asarray(value), want[name])


def test_initial_checkpoint_path_takes_a_t5x_checkpoint():
  """INITIAL_CHECKPOINT_PATH: the train state starts from the t5x parameters."""
  from moe_jax.training import checkpoint_manager  # pylint: disable=g-import-not-at-top
  from moe_jax.training import optimizers  # pylint: disable=g-import-not-at-top
  from moe_jax.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  model = _model("t5x_moe")
  shapes = {"encoder_input_tokens": (4, 8), "decoder_input_tokens": (4, 8),
            "decoder_target_tokens": (4, 8)}
  placement = trainer_lib.Placement(model, partitioning.mesh_from_shape(None),
                                    partitioning.standard_logical_axis_rules(), shapes)
  trainer = trainer_lib.Trainer(placement, lambda axes: optimizers.build(
      optimizers.adafactor(1e-2), axes))
  state = checkpoint_manager.initial_state(
      trainer, os.path.join(TESTDATA, "t5x_moe"), jax.random.PRNGKey(0))
  assert int(state.step) == STEP
  got = checkpoints.flatten(state.params)
  for name, value in _expected_params("t5x_moe").items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)


def test_convert_cli_writes_a_checkpoint_and_model_gin(tmp_path, capsys):
  out = tmp_path / "out"
  argv = ["t5x", "--checkpoint_dir", _step_dir("t5x_t5"), "--output_dir", str(out)]
  for gin_file in FIXTURES["t5x_t5"]:
    argv += ["--gin_file", gin_file]
  assert convert_cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert f"Converted a t5x checkpoint at step {STEP}" in printed
  assert f"Wrote checkpoint: {out / 'checkpoint'}" in printed
  model = config.load_model([str(out / "model.gin")])
  saved = _t5x_logits("t5x_t5")
  ours = _logits(model, checkpoints.restore_params(str(out)), saved)
  assert np.max(np.abs(ours - saved["logits"])) <= 1e-6 * np.max(np.abs(saved["logits"]))
  # A second run refuses the non-empty output directory, in one line.
  assert convert_cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "not empty" in err[0]


def test_convert_cli_names_what_does_not_fit(tmp_path, capsys):
  argv = ["t5x", "--checkpoint_dir", _step_dir("t5x_t5"), "--output_dir",
          str(tmp_path / "out"), "--gin_file", "gin/models/tiny.gin",
          "--gin.NUM_EMBEDDINGS=32", "--gin.EMBED_DIM=8", "--gin.NUM_HEADS=2",
          "--gin.HEAD_DIM=4", "--gin.MLP_DIM=8"]  # two layers per stack, not one
  assert convert_cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "The parameters do not fit the model" in err[0]
  assert "missing decoder/layers_1" in err[0]
  assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_is_one_clear_error(tmp_path, capsys):
  (tmp_path / "checkpoint").write_text("model_checkpoint_path: \"model.ckpt-1\"\n")
  with pytest.raises(FileNotFoundError, match=(
      "holds no parameters: expected a training MODEL_DIR .* orbax checkpoint, .* "
      "t5x checkpoint directory")):
    checkpoints.find_checkpoint(str(tmp_path))
  assert convert_cli.main(["t5x", "--checkpoint_dir", str(tmp_path), "--output_dir",
                           str(tmp_path / "out"), "--gin_file", "gin/models/tiny.gin"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "holds no parameters" in err[0]


def _rewrite_target(directory, rename, extra=None):
  """Renames (and adds) `target` entries of a copied t5x checkpoint's msgpack file."""
  path = os.path.join(directory, t5x.CHECKPOINT_FILE)
  with open(path, "rb") as f:
    contents = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      name = f"{prefix}/{key}" if prefix else key
      if isinstance(value, dict) and "driver" not in value:
        walk(value, name)
      else:
        flat[rename(name)] = value

  walk(contents["optimizer"]["target"], "")
  for name, value in (extra or {}).items():  # inline, as flax packs small arrays
    flat[name] = msgpack.ExtType(1, msgpack.packb(
        (list(value.shape), value.dtype.name, value.tobytes()), use_bin_type=True))
  contents["optimizer"]["target"] = checkpoints.unflatten(flat)
  with open(path, "wb") as f:
    f.write(msgpack.packb(contents, use_bin_type=True))


def _flaxformer_name(name):
  """Our MoE names as flaxformer's (released Switch) checkpoints spell them."""
  for weight in ("wi_0", "wi_1", "wo"):
    name = name.replace(f"/mlp/expert/{weight}", f"/mlp/expert/{weight}/kernel")
    name = name.replace(f"/mlp/{weight}", f"/mlp/{weight}/kernel")
  return name.replace("/mlp/router/w", "/mlp/router/router_weights/w/kernel")


def test_flaxformer_parameter_names(tmp_path):
  directory = str(tmp_path / f"checkpoint_{STEP}")
  shutil.copytree(_step_dir("t5x_moe"), directory)
  bias = "encoder/layers_1/mlp/router/router_weights/w/bias"
  _rewrite_target(directory, _flaxformer_name, {bias: np.zeros(4, np.float32)})
  names = t5x.T5xCheckpoint(directory).names()
  assert "encoder/layers_1/mlp/router/w" in names
  assert "encoder/layers_1/mlp/expert/wi_0" in names
  got = checkpoints.flatten(checkpoints.restore_params(directory))
  for name, value in _expected_params("t5x_moe").items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)

  # A router bias moe_jax cannot apply is refused, by name.
  _rewrite_target(directory, lambda name: name, {bias: np.ones(4, np.float32)})
  with pytest.raises(ValueError, match="non-zero router bias .*router_weights/w/bias"):
    checkpoints.restore_params(directory)


def test_t5x_checkpoint_exports_to_transformers(tmp_path):
  """t5x -> transformers in one step: logits equal t5x's."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("safetensors")
  from moe_jax.convert import hf  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "hf")
  hf.export(FIXTURES["t5x_t5"], _step_dir("t5x_t5"), out)
  saved = _t5x_logits("t5x_t5")
  reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
  encoder = saved["encoder_input_tokens"].astype(np.int64)
  with torch.no_grad():
    theirs = reference(input_ids=torch.tensor(encoder),
                       attention_mask=torch.tensor(encoder != 0),
                       decoder_input_ids=torch.tensor(
                           saved["decoder_input_tokens"].astype(np.int64))).logits.numpy()
  # Compared where t5x's targets are real tokens (transformers has no
  # decoder padding mask here).
  real = saved["decoder_target_tokens"] > 0
  diff = np.abs(theirs - saved["logits"])[real]
  assert np.max(diff) <= 1e-5 * np.max(np.abs(saved["logits"]))


@pytest.mark.parametrize("layout", ["converted", "step"])
def test_partial_restore_of_orbax_checkpoints(tmp_path, layout):
  """`restore_params(..., partial=True)`, as INITIAL_CHECKPOINT_PATH reads any checkpoint."""
  params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "b": np.ones(4, np.float32)}
  if layout == "converted":  # {'params': tree}, as `convert` writes it
    path = str(tmp_path / "checkpoint")
    checkpoints.save_params(params, path)
  else:  # a training step's own `params` item
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    path = str(tmp_path / "checkpoint_7")
    with ocp.StandardCheckpointer() as writer:
      writer.save(os.path.join(path, checkpoints.PARAMS_ITEM), params)
  target = {"a": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
  got = checkpoints.restore_params(path, target, partial=True)
  assert list(got) == ["a"]
  np.testing.assert_array_equal(np.asarray(got["a"]["w"]), params["a"]["w"])


def test_t5x_orbax_format(tmp_path):
  """t5x's orbax checkpointer (its default): a `state/` item of {'target', 'state'}.

  Written here with orbax from the fixture's arrays, as t5x stores them (its
  names, 2-D attention kernels); the real layout was checked against a t5x run
  with `train.use_orbax = True` (too large to commit).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = _step_dir("t5x_t5")
  target = {}
  for entry in os.listdir(directory):
    if entry.startswith("target."):
      node = target
      *parents, leaf = entry[len("target."):].split(".")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = _read_zarr(os.path.join(directory, entry))
  step_dir = tmp_path / "model_dir" / f"checkpoint_{STEP}"
  with ocp.PyTreeCheckpointer() as writer:
    writer.save(str(step_dir / "state"), {"target": target,
                                          "state": {"step": np.asarray(STEP, np.int32)}})
  found, _ = checkpoints.find_checkpoint(str(tmp_path / "model_dir"))
  assert found == str(step_dir) and checkpoints.is_t5x_checkpoint(found)
  params = checkpoints.restore_params(str(step_dir))
  got, want = checkpoints.flatten(params), _expected_params("t5x_t5")
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  saved = _t5x_logits("t5x_t5")
  ours = _logits(_model("t5x_t5"), params, saved)
  assert np.max(np.abs(ours - saved["logits"])) <= 1e-6 * np.max(np.abs(saved["logits"]))


@pytest.mark.parametrize("directory, path, expected", [
    ("gs://bucket/run/checkpoint_2", "target.encoder.x",
     {"driver": "gcs", "bucket": "bucket", "path": "run/checkpoint_2/target.encoder.x"}),
    ("gs://bucket", "target.x", {"driver": "gcs", "bucket": "bucket", "path": "target.x"}),
    ("/ckpt/checkpoint_2", "target.x", {"driver": "file", "path": "/ckpt/checkpoint_2/target.x"}),
])
def test_array_kvstore(directory, path, expected):
  assert t5x.array_kvstore(directory, path) == expected


def test_checkpoint_on_gs_is_found_and_its_index_read(fake_bucket):
  shutil.copytree(_step_dir("t5x_t5"), fake_bucket / "t5x" / f"checkpoint_{STEP}")
  gs_dir = f"gs://bucket/t5x/checkpoint_{STEP}"
  assert checkpoints.find_checkpoint("gs://bucket/t5x") == (gs_dir, True)
  remote, local = t5x.T5xCheckpoint(gs_dir), t5x.T5xCheckpoint(_step_dir("t5x_t5"))
  assert remote.step == local.step == STEP
  assert remote.names() == local.names()
  assert all(remote.shape_dtype(n) == local.shape_dtype(n) for n in local.names())
  # The arrays themselves are Cloud Storage objects for tensorstore's gcs driver.
  name = local.names()[0]
  # pylint: disable-next=protected-access
  assert remote._spec(remote._entries[name])["kvstore"]["driver"] == "gcs"
