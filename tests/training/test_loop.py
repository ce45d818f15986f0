"""The training run end to end on the toy task: resume, preemption, meshes, processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import checkpoints
from moe_jax.training import metrics as metrics_lib
from tests.training import conftest


def _params(model_dir, step):
  return checkpoints.flatten(checkpoints.restore_params(
      os.path.join(model_dir, f"checkpoint_{step}")))


def _assert_same_params(a, b, **tolerance):
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), err_msg=name,
                               **tolerance)


def _command_bindings(model_dir, **macros):
  return [f"--gin.{b.replace(' = ', '=', 1)}"
          for b in conftest.toy_bindings(model_dir, **macros)]


def test_sigterm_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path,
                                                                         monkeypatch):
  whole, split = tmp_path / "whole", tmp_path / "split"
  conftest.train_toy(whole)

  log = metrics_lib.MetricsLogger.log

  def log_then_preempt(self, step, metrics):
    log(self, step, metrics)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # What a preempted VM receives.

  monkeypatch.setattr(metrics_lib.MetricsLogger, "log", log_then_preempt)
  first = conftest.train_toy(split)
  assert first.preempted and first.step == 3
  assert checkpoints.latest_step(str(split)) == 3
  monkeypatch.undo()
  second = conftest.train_toy(split)
  assert not second.preempted and second.step == 6

  expected, resumed = conftest.losses(whole), conftest.losses(split)
  for step in (4, 5, 6):  # Same parameters, optimizer state and next batches.
    assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6)
  _assert_same_params(_params(whole, 6), _params(split, 6), rtol=1e-6, atol=1e-7)


def test_rerunning_a_finished_run_does_nothing(tmp_path, capsys):
  conftest.train_toy(tmp_path, TRAIN_STEPS=2)
  summary = conftest.train_toy(tmp_path, TRAIN_STEPS=2)
  assert summary.step == 2 and "Nothing to do" in capsys.readouterr().out


def test_kill_9_during_checkpoint_writes_always_leaves_a_restorable_step(tmp_path):
  model_dir = tmp_path / "run"
  args = ["moe_jax.train", f"--gin_file={conftest.TOY_RUN}",
          *_command_bindings(model_dir, TRAIN_STEPS=200, CHECKPOINT_PERIOD=1, LOG_PERIOD=50)]
  # Kill at several moments: as soon as a step's temporary directory
  # appears, and a little later, while orbax is writing.
  for delay in (0.0, 0.002, 0.01, 0.05):
    process = subprocess.Popen([sys.executable, "-m", *args], cwd=conftest.REPO,
                               env=conftest.command_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
      deadline = time.monotonic() + 300
      while time.monotonic() < deadline and process.poll() is None:
        names = os.listdir(model_dir) if model_dir.exists() else []
        if any("tmp" in n for n in names):
          time.sleep(delay)
          break
        time.sleep(0.0005)
    finally:
      process.kill()
      process.wait()
    step = checkpoints.latest_step(str(model_dir))
    if step is None:
      continue  # Killed before the first checkpoint finished: nothing to resume.
    # The newest complete step restores: every item of it is readable.
    _params(model_dir, step)
    with ocp.StandardCheckpointer() as reader:
      reader.restore(os.path.join(model_dir, f"checkpoint_{step}", "opt_state"))
  # The next run resumes from the newest complete step and trains on.
  resumed_from = checkpoints.latest_step(str(model_dir)) or 0
  summary = conftest.train_toy(model_dir, TRAIN_STEPS=resumed_from + 2, CHECKPOINT_PERIOD=1,
                               LOG_PERIOD=50)
  assert summary.step == resumed_from + 2


def test_meshes_give_the_same_losses_as_one_device(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  one_device = tmp_path / "one_device"
  result = conftest.run_command(
      "moe_jax.train", f"--gin_file={conftest.TOY_RUN}",
      *_command_bindings(one_device, TRAIN_STEPS=3),
      env=conftest.command_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert result.returncode == 0, result.stderr
  expected = conftest.losses(one_device)
  for name, mesh in (("data2_expert4", {"data": 2, "expert": 4, "model": 1}),
                     ("data2_expert2_model2", {"data": 2, "expert": 2, "model": 2})):
    conftest.train_toy(tmp_path / name, MESH_SHAPE=mesh, TRAIN_STEPS=3)
    got = conftest.losses(tmp_path / name)
    for step, loss in expected.items():
      assert got[step] == pytest.approx(loss, rel=2e-5), (name, step)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  conftest.train_toy(tmp_path / "one", TRAIN_STEPS=3)
  port = _free_port()
  args = ["moe_jax.train", f"--gin_file={conftest.TOY_RUN}",
          *_command_bindings(tmp_path / "two", TRAIN_STEPS=3)]
  processes = [subprocess.Popen(
      [sys.executable, "-m", *args], cwd=conftest.REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=conftest.command_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index)))
               for index in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  expected, got = conftest.losses(tmp_path / "one"), conftest.losses(tmp_path / "two")
  for step, loss in expected.items():
    assert got[step] == pytest.approx(loss, rel=2e-5), step


def test_profile_steps_write_a_trace(tmp_path):
  conftest.train_toy(tmp_path, TRAIN_STEPS=3, PROFILE_STEPS=[1, 2])
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces


def test_a_step_that_cannot_fit_is_refused_before_compiling():
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from moe_jax.training import loop  # pylint: disable=g-import-not-at-top
  mesh = partitioning.mesh_from_shape(None)
  figures = {"memory": {"total_bytes": 2**50}}
  with pytest.raises(ValueError, match="needs about 1048576.0 GiB per device.*REMAT_POLICY"):
    loop._check_memory(figures, mesh, 8, (512, 128))  # pylint: disable=protected-access
  loop._check_memory({"memory": {"total_bytes": 2**20}}, mesh, 8, (512, 128))  # pylint: disable=protected-access
