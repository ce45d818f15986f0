"""SkyPilot, xpk and SLURM files: exact text, parsed fields, SkyPilot's schema."""

import copy
import shutil
import subprocess

import pytest

from launch.cli import REPO_ROOT

from .examples import EXAMPLES

EXAMPLE_DIR = REPO_ROOT / "launch" / "examples"


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_are_what_the_launchers_emit(launch_cli, name):
  script, argv = EXAMPLES[name]
  code, out, err = launch_cli(script, *argv)
  assert (code, err) == (0, "")
  assert out == (EXAMPLE_DIR / name).read_text()


def load(name):
  yaml = pytest.importorskip("yaml")
  return yaml.safe_load((EXAMPLE_DIR / name).read_text())


DRIVER_LINES = [
    "    --gin_file=gin/models/flan_switch_base.gin \\",
    "    --gin_file=gin/runs/finetune.gin \\",
    "    --gin_search_paths=. \\",
]


def test_skypilot_tpu_fields():
  task = load("flan_moe_v4_64.sky.yaml")
  assert task == {
      "name": "flan-moe",
      "workdir": ".",
      "resources": {
          "infra": "gcp/us-central2/us-central2-b",
          "accelerators": "tpu-v4-64",
          "accelerator_args": {"runtime_version": "tpu-ubuntu2204-base",
                               "tpu_vm": True},
          "use_spot": True,
          "job_recovery": {"strategy": "FAILOVER"},
      },
      "setup": "python3 -m pip install --quiet --use-pep517 '.[tpu]'\n",
      "run": task["run"],
  }
  assert task["run"].splitlines()[:4] == [
      "python3 -m moe_jax.train \\", *(l[2:] for l in DRIVER_LINES)]
  assert "  --gin.MODEL_DIR=\"'gs://my-bucket/flan-moe'\" \\" in task["run"]


def test_skypilot_gpu_fields():
  task = load("flan_moe_2x8gpu.sky.yaml")
  assert task["num_nodes"] == 2
  assert task["resources"] == {"accelerators": "H100:8", "use_spot": True,
                               "job_recovery": {"strategy": "FAILOVER"}}
  assert task["setup"] == "python3 -m pip install --quiet --use-pep517 '.[gpu]'\n"
  assert task["run"].splitlines()[:3] == [
      'export JAX_COORDINATOR_ADDRESS="$(echo "$SKYPILOT_NODE_IPS" | head -n 1):8476"',
      'export JAX_NUM_PROCESSES="$SKYPILOT_NUM_NODES"',
      'export JAX_PROCESS_ID="$SKYPILOT_NODE_RANK"']


def test_skypilot_gpu_infra_and_on_demand(launch_cli):
  yaml = pytest.importorskip("yaml")
  _, out, _ = launch_cli("gpu", "--emit", "skypilot", "--name", "g",
                         "--nodes", "1", "--gpus_per_node", "4", "--gpu",
                         "A100-80GB", "--infra", "aws/us-east-1",
                         "--gin_file=gin/models/tiny.gin", "--model_dir",
                         "gs://b/r")
  task = yaml.safe_load(out)
  assert task["resources"] == {"infra": "aws/us-east-1",
                               "accelerators": "A100-80GB:4",
                               "use_spot": False,
                               "job_recovery": {"strategy": "FAILOVER"}}
  assert task["num_nodes"] == 1


def sky_validate(task, home, monkeypatch):
  """SkyPilot's own checks, offline: the task schema, then Task parsing
  (which validates `resources` against the resources schema)."""
  monkeypatch.setenv("HOME", str(home))  # sky writes ~/.sky
  monkeypatch.chdir(REPO_ROOT)  # workdir: . is the repository root
  import sky
  from sky.utils import common_utils, schemas
  common_utils.validate_schema(copy.deepcopy(task), schemas.get_task_schema(),
                               "Invalid task YAML: ")
  return sky.Task.from_yaml_config(copy.deepcopy(task))


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n.endswith(".yaml")])
def test_skypilot_schema_accepts(name, tmp_path, monkeypatch):
  pytest.importorskip("sky")
  task = load(name)
  (resources,) = sky_validate(task, tmp_path, monkeypatch).resources
  assert resources.use_spot
  assert list(resources.accelerators) == [
      task["resources"]["accelerators"].split(":")[0]]


def test_skypilot_schema_rejects_a_typo(tmp_path, monkeypatch):
  pytest.importorskip("sky")
  task = load("flan_moe_v4_64.sky.yaml")
  task["resources"]["use_spott"] = task["resources"].pop("use_spot")
  with pytest.raises(Exception, match="use_spot"):
    sky_validate(task, tmp_path, monkeypatch)


def test_xpk_script():
  text = (EXAMPLE_DIR / "flan_moe_v5e_256.xpk.sh").read_text()
  lines = text.splitlines()
  assert lines[4:7] == ['src="$(mktemp -d)"', "trap 'rm -rf \"$src\"' EXIT",
                        'git archive HEAD | tar -x -C "$src"']
  assert lines[7:18] == [
      "xpk workload create \\",
      "  --cluster=moe-v5e \\",
      "  --workload=flan-moe \\",
      "  --tpu-type=v5litepod-256 \\",
      "  --num-slices=1 \\",
      "  --project=my-project \\",
      "  --zone=us-west4-a \\",
      "  --max-restarts=10 \\",
      "  --base-docker-image=python:3.11 \\",
      '  --script-dir="$src" \\',
      "  --command=\"python3 -m pip install --quiet --use-pep517 '.[tpu]' && "
      "python3 -m moe_jax.train --gin_file=gin/models/flan_switch_base.gin "
      "--gin_file=gin/runs/finetune.gin --gin_search_paths=. "
      "--gin.MODEL_DIR=\\\"'gs://my-bucket-us-west4/flan-moe'\\\" "
      "--gin.INITIAL_CHECKPOINT_PATH=\\\"'gs://my-bucket-us-west4/switch_base_128/checkpoint_500000'\\\" "
      "--gin.TRAIN_STEPS=520000 "
      "--gin.MESH_SHAPE=\\\"{'data': -1, 'expert': 8, 'model': 1}\\\"\""]
  assert len(lines) == 18


def test_xpk_with_a_prebuilt_image(launch_cli):
  _, out, _ = launch_cli("tpu", "run", "--name", "r", "--tpu_type", "v4-64",
                         "--zone", "us-central2-b", "--project", "p",
                         "--gin_file=gin/models/tiny.gin", "--model_dir",
                         "gs://b/r", "--emit", "xpk", "--cluster", "c",
                         "--docker_image", "gcr.io/p/moe-jax:1")
  assert "git archive" not in out and "--max-restarts" not in out
  assert out.splitlines()[-2:] == [
      "  --docker-image=gcr.io/p/moe-jax:1 \\",
      "  --command=\"python3 -m moe_jax.train --gin_file=gin/models/tiny.gin "
      "--gin_search_paths=. --gin.MODEL_DIR=\\\"'gs://b/r'\\\"\""]


def test_sbatch_script():
  text = (EXAMPLE_DIR / "flan_moe_2x8gpu.sbatch").read_text()
  directives = [l for l in text.splitlines() if l.startswith("#SBATCH")]
  assert directives == [
      "#SBATCH --job-name=flan-moe", "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
      "#SBATCH --time=24:00:00", "#SBATCH --signal=TERM@300",
      "#SBATCH --requeue", "#SBATCH --open-mode=append",
      "#SBATCH --output=%x-%j.out"]
  body = text.split("#SBATCH --output=%x-%j.out\n")[1].splitlines()
  assert body[:6] == [
      "set -euo pipefail",
      'cd "$SLURM_SUBMIT_DIR"',
      "source .venv/bin/activate",
      "# jax.distributed env mode: the first node of the job coordinates.",
      'export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames '
      '"$SLURM_JOB_NODELIST" | head -n 1):8476"',
      'export JAX_NUM_PROCESSES="$SLURM_NNODES"']
  assert body[6:9] == [
      "srun --kill-on-bad-exit=1 bash -c 'JAX_PROCESS_ID=\"$SLURM_PROCID\" "
      "exec \"$@\"' driver \\",
      "  python -m moe_jax.train \\",
      *DRIVER_LINES[:1]]


def test_sbatch_partition_account_venv(launch_cli):
  _, out, _ = launch_cli("gpu", "--emit", "slurm", "--name", "one",
                         "--gin_file=gin/models/tiny.gin", "--model_dir",
                         "/lustre/me/run", "--partition", "a100",
                         "--account", "ml", "--venv", "/opt/envs/moe",
                         "--time", "2:00:00")
  assert "#SBATCH --partition=a100\n#SBATCH --account=ml\n" in out
  assert "#SBATCH --nodes=1\n" in out and "#SBATCH --time=2:00:00\n" in out
  assert "source /opt/envs/moe/bin/activate\n" in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", [n for n in EXAMPLES if not n.endswith(".yaml")])
def test_scripts_parse_as_bash(name):
  subprocess.run(["bash", "-n", str(EXAMPLE_DIR / name)], check=True)


GPU_BAD = [
    (["--nodes", "0"], ["--nodes 0", "--nodes >= 1"]),
    (["--gpus_per_node", "17"], ["--gpus_per_node 17"]),
    (["--name", "Bad_Name"], ["not a valid resource name"]),
    (["--model_dir", "/local/run", "--emit", "skypilot"], ["is local", "2 hosts of 2x8 GPUs"]),
    (["--model_dir", "relative/run"], ["is relative", "absolute path"]),
    (["--extra", "--gin.MESH_SHAPE={'data': 3, 'expert': 8}"], ["does not fit 2x8 GPUs (16 devices)"]),
    (["--extra", "--partition=x", "--emit", "skypilot"], ["--partition does not apply to --emit skypilot"]),
    (["--extra", "--spot"], ["--spot does not apply to --emit slurm"]),
    (["--extra", "--frobnicate"], ["unknown flag '--frobnicate'"]),
]


@pytest.mark.parametrize("change, words", GPU_BAD)
def test_gpu_bad_flags(launch_cli, change, words):
  flags = {"--emit": "slurm", "--name": "flan-moe", "--nodes": "2",
           "--gpus_per_node": "8", "--model_dir": "gs://b/r"}
  extra = []
  for key, value in zip(change[::2], change[1::2]):
    if key == "--extra":
      extra.append(value)
    else:
      flags[key] = value
  code, out, err = launch_cli("gpu", *(x for kv in flags.items() for x in kv),
                              "--gin_file=gin/models/tiny.gin", *extra)
  assert (code, out) == (2, "")
  assert err.count("\n") == 1
  for word in words:
    assert word in err


@pytest.mark.parametrize("tpu_type, zone, accelerator, runtime", [
    ("v4-64", "us-central2-b", "tpu-v4-64", "tpu-ubuntu2204-base"),
    ("v5e-256", "us-west4-a", "tpu-v5litepod-256", "v2-alpha-tpuv5-lite"),
])
def test_skypilot_tpu_resources_per_slice(launch_cli, tpu_type, zone,
                                          accelerator, runtime):
  yaml = pytest.importorskip("yaml")
  code, out, _ = launch_cli("tpu", "run", "--name", "r", "--tpu_type", tpu_type,
                            "--zone", zone, "--project", "p",
                            "--gin_file=gin/models/tiny.gin",
                            "--model_dir", "gs://b/r", "--emit", "skypilot")
  assert code == 0
  assert yaml.safe_load(out)["resources"] == {
      "infra": f"gcp/{zone[:-2]}/{zone}", "accelerators": accelerator,
      "accelerator_args": {"runtime_version": runtime, "tpu_vm": True},
      "use_spot": False, "job_recovery": {"strategy": "FAILOVER"}}


@pytest.mark.parametrize("tpu_type, accelerator, hosts", [
    ("v4-64", "v4-64", 8), ("v5e-256", "v5litepod-256", 64)])
def test_xpk_tpu_type_per_slice(launch_cli, tpu_type, accelerator, hosts):
  _, out, _ = launch_cli("tpu", "run", "--name", "r", "--tpu_type", tpu_type,
                         "--zone", "us-central2-b", "--project", "p",
                         "--gin_file=gin/models/tiny.gin", "--model_dir",
                         "gs://b/r", "--emit", "xpk", "--cluster", "c")
  assert f"  --tpu-type={accelerator} \\\n" in out
  assert f"({accelerator}, {hosts} host(s))" in out
