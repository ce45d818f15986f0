"""Runs what the launchers send to machines, locally, against fake tools:
the TPU worker commands, the sbatch script, SkyPilot's run blocks and the xpk
script. Checks that every host gets exactly the driver argv (quoting intact)
and, on GPUs, its jax.distributed environment."""

import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from launch import driver, worker
from launch.cli import REPO_ROOT

from .test_emit import EXAMPLE_DIR, load

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("bash", "setsid", "nohup", "pgrep",
                                          "pkill", "tar")),
    reason="needs bash and procps")

RUN = driver.DriverRun(
    driver="train", gin_files=("gin/models/flan_switch_base.gin",),
    gin_search_paths=".", model_dir="gs://my-bucket/flan-moe",
    overrides=(("MESH_SHAPE", "{'data': -1, 'expert': 8, 'model': 1}"),
               ("NOTE", "it's \"quoted\" $HOME `x` \\")))

# Records its cwd and argv; as the driver, prints, then exits with
# $FAKE_DRIVER_EXIT or sleeps $FAKE_DRIVER_SECONDS (SIGTERM ends the sleep).
FAKE_PYTHON = """#!/bin/sh
echo "$PWD|$*" >> "$CALLS"
case "$2" in moe_jax.*)
  { echo "$JAX_COORDINATOR_ADDRESS|$JAX_NUM_PROCESSES|$JAX_PROCESS_ID"
    printf '%s\\n' "$@"; } > "$OUT_DIR/driver${JAX_PROCESS_ID}.txt"
  echo training
  [ -z "$FAKE_DRIVER_EXIT" ] || exit "$FAKE_DRIVER_EXIT"
  exec sleep "${FAKE_DRIVER_SECONDS:-0}";;
esac
"""


def tool(directory: Path, name: str, text: str) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / name
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def sh(command: str, env: dict, cwd: Path | None = None, script=False):
  argv = ["bash", command] if script else ["bash", "-c", command]
  return subprocess.run(argv, env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=60)


def wait_for(path: Path) -> str:
  deadline = time.monotonic() + 20
  while not (path.exists() and path.read_text().strip()):
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  return path.read_text().strip()


def driver_record(out_dir: Path, process_id: str = "") -> list[str]:
  return (out_dir / f"driver{process_id}.txt").read_text().splitlines()


@pytest.fixture
def box(tmp_path):
  """A fake machine: HOME, a bin dir with a fake python, and an env."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  for name in ("python3", "python"):
    tool(bin_dir, name, FAKE_PYTHON)
  env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin",
         "CALLS": str(tmp_path / "calls"), "OUT_DIR": str(tmp_path)}
  return tmp_path, home, bin_dir, env


def test_tpu_worker_lifecycle(box):
  tmp, home, _, env = box
  with tarfile.open(home / worker.ARCHIVE, "w:gz") as tar:
    tar.add(REPO_ROOT / "launch" / "worker_run.sh", "launch/worker_run.sh")
  run_dir = home / "moe-jax-run"
  try:
    done = sh(worker.install("tpu"), env)
    assert done.returncode == 0, done.stderr
    assert (tmp / "calls").read_text() == (
        f"{home}/moe-jax|-m pip install --quiet --use-pep517 .[tpu]\n")

    began = time.monotonic()
    started = sh(worker.start(RUN.argv()), dict(env, FAKE_DRIVER_SECONDS="30"))
    assert started.returncode == 0
    assert time.monotonic() - began < 10  # returned while the driver runs
    pid = wait_for(run_dir / "pid")
    wait_for(tmp / "driver.txt")
    assert driver_record(tmp) == ["||", *RUN.argv()[1:]]
    assert wait_for(run_dir / "driver.log") == "training"
    assert sh(worker.exit_code(), env).stdout == ""

    again = sh(worker.install("tpu"), env)
    assert again.returncode == 3
    assert "refusing to reinstall" in again.stderr

    assert sh(worker.stop(), env).returncode == 0
    assert wait_for(run_dir / "exit_code") == "143"  # SIGTERM reached the driver
    assert sh(worker.exit_code(), env).stdout == "143\n"
    assert subprocess.run(["pgrep", "-F", str(run_dir / "pid")]).returncode == 1
    assert sh(worker.stop(), env).returncode == 0  # nothing left: still fine

    sh(worker.start(RUN.argv()), dict(env, FAKE_DRIVER_EXIT="7"))
    assert wait_for(run_dir / "exit_code") == "7"
    assert wait_for(run_dir / "pid") != pid
  finally:
    subprocess.run(["pkill", "-KILL", "-F", str(run_dir / "pid")],
                   capture_output=True)


def test_sbatch_script_gives_each_node_its_process_id(box):
  tmp, _, bin_dir, env = box
  submit = tmp / "repo"
  venv_bin = submit / ".venv" / "bin"
  tool(venv_bin, "python", FAKE_PYTHON)
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  tool(bin_dir, "scontrol", "#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
  tool(bin_dir, "srun", '#!/bin/sh\nshift\n'
       'for id in 0 1; do SLURM_PROCID=$id "$@" || exit; done\n')
  (bin_dir / "python").unlink()  # only the venv's python may run
  env = dict(env, SLURM_SUBMIT_DIR=str(submit), SLURM_NNODES="2",
             SLURM_JOB_NODELIST="gpu-[a-b]")
  done = sh(str(EXAMPLE_DIR / "flan_moe_2x8gpu.sbatch"), env, script=True)
  assert done.returncode == 0, done.stderr
  for process_id in ("0", "1"):
    assert driver_record(tmp, process_id) == [
        f"gpu-a:8476|2|{process_id}", "-m", "moe_jax.train",
        "--gin_file=gin/models/flan_switch_base.gin",
        "--gin_file=gin/runs/finetune.gin", "--gin_search_paths=.",
        "--gin.MODEL_DIR='gs://my-bucket/flan-moe-gpu'",
        "--gin.INITIAL_CHECKPOINT_PATH="
        "'gs://my-bucket/switch_base_128/checkpoint_500000'",
        "--gin.TRAIN_STEPS=520000",
        "--gin.MESH_SHAPE={'data': -1, 'expert': 8, 'model': 1}"]


def test_skypilot_gpu_run_block(box):
  tmp, _, _, env = box
  task = load("flan_moe_2x8gpu.sky.yaml")
  env = dict(env, SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6",
             SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1")
  done = sh(task["run"], env)
  assert done.returncode == 0, done.stderr
  record = driver_record(tmp, "1")
  assert record[0] == "10.0.0.5:8476|2|1"
  assert record[-1] == "--gin.MESH_SHAPE={'data': -1, 'expert': 8, 'model': 1}"


def test_skypilot_tpu_run_block(box):
  tmp, _, _, env = box
  done = sh(load("flan_moe_v4_64.sky.yaml")["run"], env)
  assert done.returncode == 0, done.stderr
  record = driver_record(tmp)
  assert record[0] == "||"  # TPU: the driver reads the TPU metadata instead
  assert record[5:7] == ["--gin_search_paths=.",
                         "--gin.MODEL_DIR='gs://my-bucket/flan-moe'"]


def test_xpk_script_ships_the_commit_and_its_command_runs(box):
  tmp, _, bin_dir, env = box
  tool(bin_dir, "git", "#!/bin/sh\nexec tar -cf - --files-from /dev/null\n")
  tool(bin_dir, "xpk", '#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT_DIR/xpk.txt"\n'
       '[ -d "$(echo "$@" | sed -n "s/.*--script-dir=\\([^ ]*\\).*/\\1/p")" ]\n')
  done = sh(str(EXAMPLE_DIR / "flan_moe_v5e_256.xpk.sh"), env, cwd=tmp,
            script=True)
  assert done.returncode == 0, done.stderr
  flags = (tmp / "xpk.txt").read_text().split("\n")
  script_dir = next(f for f in flags if f.startswith("--script-dir="))
  assert not Path(script_dir.split("=", 1)[1]).exists()  # trap cleaned up
  command = next(f for f in flags if f.startswith("--command="))
  done = sh(command.split("=", 1)[1], env, cwd=tmp)
  assert done.returncode == 0, done.stderr
  assert (tmp / "calls").read_text().splitlines()[0] == (
      f"{tmp}|-m pip install --quiet --use-pep517 .[tpu]")
  assert "--gin.MODEL_DIR='gs://my-bucket-us-west4/flan-moe'" in driver_record(tmp)
