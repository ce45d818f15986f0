"""launch/tpu.py: the exact commands of every verb, dry, and bad flags."""

import textwrap

import pytest

from launch.cli import REPO_ROOT

from .conftest import STAGING

SLICES = {
    # --tpu_type: (accelerator type, runtime version, zone, region, hosts)
    "v4-64": ("v4-64", "tpu-ubuntu2204-base", "us-central2-b", 8),
    "v5e-256": ("v5litepod-256", "v2-alpha-tpuv5-lite", "us-west4-a", 64),
}
GIN = ("--gin_file=gin/models/flan_switch_base.gin",
       "--gin_file=gin/runs/finetune.gin")
MESH = "--gin.MESH_SHAPE={'data': -1, 'expert': 8, 'model': 1}"


def common(tpu_type):
  zone = SLICES[tpu_type][2]
  return ["--name", "flan-moe", "--tpu_type", tpu_type, "--zone", zone,
          "--project", "my-proj"]


def expected(tpu_type, text):
  accel, runtime, zone, hosts = SLICES[tpu_type]
  return textwrap.dedent(text).lstrip("\n").format(
      accel=accel, runtime=runtime, zone=zone, hosts=hosts, last=hosts - 1,
      where=f"--zone={zone} --project=my-proj", root=REPO_ROOT,
      staging=STAGING)


@pytest.mark.parametrize("tpu_type", SLICES)
@pytest.mark.parametrize("flags, text", [
    ([], """
     gcloud compute tpus tpu-vm create flan-moe {where} --accelerator-type={accel} --version={runtime}
     """),
    (["--spot"], """
     gcloud compute tpus tpu-vm create flan-moe {where} --accelerator-type={accel} --version={runtime} --spot
     """),
    (["--queued", "--poll_s", "60"], """
     gcloud compute tpus queued-resources create flan-moe {where} --node-id=flan-moe --accelerator-type={accel} --runtime-version={runtime}
     # every 60s until the queued resource is ACTIVE:
     gcloud compute tpus queued-resources describe flan-moe {where} --format='value(state.state)'
     """),
])
def test_create(launch_cli, tpu_type, flags, text):
  code, out, err = launch_cli("tpu", "create", *common(tpu_type), *flags,
                              "--dry_run")
  assert (code, err) == (0, "")
  assert out == expected(tpu_type, text)


RUN = """
git -C {root} status --porcelain --untracked-files=no
git -C {root} ls-tree --name-only HEAD -- gin/models/flan_switch_base.gin gin/runs/finetune.gin
gcloud storage buckets describe gs://my-bucket --format='value(location)'
git -C {root} archive --format=tar.gz --output={staging}/moe-jax-flan-moe.tar.gz HEAD
gcloud compute tpus tpu-vm scp {staging}/moe-jax-flan-moe.tar.gz flan-moe:moe-jax.tar.gz --worker=all {where}
gcloud compute tpus tpu-vm ssh flan-moe {where} --worker=all --command="if pgrep -F ~/moe-jax-run/pid > /dev/null 2>&1; then echo refusing to reinstall: a driver still runs here, stop it with launch/tpu.py stop >&2; exit 3; fi; rm -rf ~/moe-jax && mkdir -p ~/moe-jax && tar -xzf ~/moe-jax.tar.gz -C ~/moe-jax && cd ~/moe-jax && python3 -m pip install --quiet --use-pep517 '.[tpu]'"
gcloud compute tpus tpu-vm ssh flan-moe {where} --worker=all --command="mkdir -p ~/moe-jax-run && rm -f ~/moe-jax-run/exit_code && cd ~/moe-jax && (setsid nohup bash launch/worker_run.sh ~/moe-jax-run python3 -m moe_jax.train --gin_file=gin/models/flan_switch_base.gin --gin_file=gin/runs/finetune.gin --gin_search_paths=. --gin.MODEL_DIR=\\"'gs://my-bucket/flan-moe'\\" --gin.MESH_SHAPE=\\"{{'data': -1, 'expert': 8, 'model': 1}}\\" --gin.TRAIN_STEPS=20000 > /dev/null 2>&1 < /dev/null &)"
# started on {hosts} worker(s) of flan-moe; follow worker 0 with `launch/tpu.py logs`, stop with `launch/tpu.py stop`
"""
RUN_FLAGS = (*GIN, "--model_dir", "gs://my-bucket/flan-moe", MESH,
             "--gin.TRAIN_STEPS=20000")


@pytest.mark.parametrize("tpu_type", SLICES)
def test_run(launch_cli, tpu_type):
  code, out, err = launch_cli("tpu", "run", *common(tpu_type), *RUN_FLAGS,
                              "--dry_run")
  assert (code, err) == (0, "")
  assert out == expected(tpu_type, RUN)


SUPERVISE = """\
# every 300s until worker 0 has an exit code:
gcloud compute tpus tpu-vm describe flan-moe {where} --format='value(state)'
gcloud compute tpus tpu-vm ssh flan-moe {where} --worker=0 --command='cat ~/moe-jax-run/exit_code 2>/dev/null || true'
# when the state is one of FAILED, PREEMPTED, SUSPENDED, SUSPENDING, TERMINATED (at most 5 times):
gcloud compute tpus tpu-vm delete flan-moe {where} --quiet
gcloud compute tpus tpu-vm create flan-moe {where} --accelerator-type={accel} --version={runtime} --spot
"""


@pytest.mark.parametrize("tpu_type", SLICES)
def test_run_restart_on_preemption(launch_cli, tpu_type):
  code, out, err = launch_cli(
      "tpu", "run", *common(tpu_type), "--spot", *RUN_FLAGS,
      "--restart_on_preemption", "--max_restarts", "5", "--poll_s", "300",
      "--dry_run")
  assert (code, err) == (0, "")
  restart = RUN.strip().splitlines()[3:7]  # archive, scp, install, start again
  assert out == expected(tpu_type, RUN + SUPERVISE + "\n".join(restart) + "\n")


def test_run_restart_queued_recreates_the_queued_resource(launch_cli):
  code, out, _ = launch_cli(
      "tpu", "run", *common("v4-64"), "--queued", "--spot", *RUN_FLAGS,
      "--restart_on_preemption", "--dry_run")
  assert code == 0
  tail = out.split("(at most 10 times):\n")[1].splitlines()
  assert tail[:4] == [
      "gcloud compute tpus queued-resources delete flan-moe --zone=us-central2-b --project=my-proj --force --quiet",
      "gcloud compute tpus queued-resources create flan-moe --zone=us-central2-b --project=my-proj --node-id=flan-moe --accelerator-type=v4-64 --runtime-version=tpu-ubuntu2204-base --spot",
      "# every 120s until the queued resource is ACTIVE:",
      "gcloud compute tpus queued-resources describe flan-moe --zone=us-central2-b --project=my-proj --format='value(state.state)'",
  ]
  assert "--format='value(state.state)'" in out.split("has an exit code:\n")[1]


@pytest.mark.parametrize("tpu_type", SLICES)
def test_logs(launch_cli, tpu_type):
  code, out, err = launch_cli("tpu", "logs", *common(tpu_type), "--dry_run")
  assert (code, err) == (0, "")
  assert out == expected(tpu_type, """
    # worker 0 of {hosts}; workers 1-{last} write ~/moe-jax-run/driver.log on their own VM (gcloud compute tpus tpu-vm ssh flan-moe {where} --worker=N --command='tail -n +1 -F ~/moe-jax-run/driver.log')
    gcloud compute tpus tpu-vm ssh flan-moe {where} --worker=0 --command='tail -n +1 -F ~/moe-jax-run/driver.log'
    """)


def test_logs_single_host_has_no_note(launch_cli):
  code, out, _ = launch_cli("tpu", "logs", "--name", "small", "--tpu_type",
                            "v4-8", "--zone", "us-central2-b", "--project", "p",
                            "--dry_run")
  assert code == 0 and not out.startswith("#") and len(out.splitlines()) == 1


@pytest.mark.parametrize("tpu_type", SLICES)
def test_stop(launch_cli, tpu_type):
  code, out, err = launch_cli("tpu", "stop", *common(tpu_type), "--dry_run")
  assert (code, err) == (0, "")
  assert out == expected(tpu_type, """
    gcloud compute tpus tpu-vm ssh flan-moe {where} --worker=all --command='pkill -TERM -F ~/moe-jax-run/pid 2>/dev/null || true'
    # sent SIGTERM: the driver saves a checkpoint to MODEL_DIR and exits; the slice keeps billing until `launch/tpu.py delete`
    """)


@pytest.mark.parametrize("tpu_type", SLICES)
@pytest.mark.parametrize("flags, text", [
    ([], "gcloud compute tpus tpu-vm delete flan-moe {where}\n"),
    (["--queued"],
     "gcloud compute tpus queued-resources delete flan-moe {where} --force\n"),
])
def test_delete(launch_cli, tpu_type, flags, text):
  code, out, err = launch_cli("tpu", "delete", *common(tpu_type), *flags,
                              "--dry_run")
  assert (code, err) == (0, "")
  assert out == expected(tpu_type, text)


def test_runtime_version_override(launch_cli):
  _, out, _ = launch_cli("tpu", "create", *common("v5e-256"),
                         "--runtime_version", "v2-alpha-tpuv5-lite-next",
                         "--dry_run")
  assert out.endswith("--version=v2-alpha-tpuv5-lite-next\n")


def test_single_host_run_may_use_a_local_model_dir(launch_cli):
  code, out, _ = launch_cli("tpu", "run", "--name", "small", "--tpu_type",
                            "v5e-8", "--zone", "us-west4-a", "--project", "p",
                            GIN[0], "--model_dir", "/tmp/run", "--dry_run")
  assert code == 0
  assert "gcloud storage" not in out  # no bucket to check
  assert "--gin.MODEL_DIR=\\\"'/tmp/run'\\\"" in out


def test_eval_driver(launch_cli):
  _, out, _ = launch_cli("tpu", "run", *common("v4-64"), GIN[0], "--driver",
                         "eval", "--model_dir", "gs://b/r", "--dry_run")
  assert "python3 -m moe_jax.eval --gin_file=" in out


BAD = [
    # (argv after the verb, verb, words the one-line error must contain)
    (["--tpu_type", "v4-63"], "create", ["unknown --tpu_type 'v4-63'", "v4-{8,16"]),
    (["--tpu_type", "v5e-512"], "create", ["unknown --tpu_type 'v5e-512'"]),
    (["--project", None], "create", ["missing --project", "pass --project"]),
    (["--zone", None], "create", ["missing --zone", "us-central2-b"]),
    (["--zone", "us-central2"], "create", ["is a region", "us-central2-b"]),
    (["--zone", "uscentral2b"], "create", ["not a zone name"]),
    (["--name", None], "create", ["missing --name"]),
    (["--name", "Flan_MoE"], "create", ["not a valid resource name"]),
    (["--model_dir", "/tmp/run"], "run", ["--model_dir /tmp/run is local", "8 hosts of v4-64", "gs://BUCKET/PATH"]),
    (["--model_dir", None], "run", ["missing --model_dir"]),
    (["--model_dir", "gs://"], "run", ["names no bucket"]),
    (["--extra", "--gin.MESH_SHAPE={'data': -1, 'expert': 48, 'model': 1}"], "run", ["does not fit v4-64 (32 devices)", "48"]),
    (["--extra", "--gin.MESH_SHAPE={'data': 8, 'expert': 8, 'model': 1}"], "run", ["does not fit v4-64", "multiply to 64", "multiply to 32"]),
    (["--extra", "--gin.MESH_SHAPE=data:4"], "run", ["not a dict of axis sizes"]),
    (["--extra", "--gin.MODEL_DIR='gs://b/x'"], "run", ["set by the launcher", "--model_dir"]),
    (["--extra", "--bogus"], "run", ["unknown flag '--bogus'", "--gin.NAME=VALUE"]),
    (["--extra", "--gin_fil=x.gin"], "run", ["unknown flag '--gin_fil=x.gin'"]),
    (["--extra", "--gin_file=gin/nope.gin"], "run", ["--gin_file gin/nope.gin is not in the repository"]),
    (["--extra", "--restart_on_preemption"], "run", ["only spot and queued slices", "add --spot"]),
    (["--extra", "--emit=skypilot"], "create", ["--emit describes a run"]),
    (["--extra", "--emit=xpk"], "run", ["--emit xpk needs --cluster"]),
    (["--extra", "--cluster=c"], "run", ["xpk flags"]),
    (["--extra", "--out=f.yaml"], "run", ["use it with --emit"]),
    (["--extra", "--gin.X=1"], "stop", ["stop takes no --gin.* flags"]),
]


@pytest.mark.parametrize("change, verb, words", BAD)
def test_bad_flags_fail_before_anything_runs(launch_cli, change, verb, words):
  flags = {"--name": "flan-moe", "--tpu_type": "v4-64",
           "--zone": "us-central2-b", "--project": "my-proj",
           "--model_dir": "gs://my-bucket/run"}
  extra = []
  for key, value in zip(change[::2], change[1::2]):
    if key == "--extra":
      extra.append(value)
    elif value is None:
      del flags[key]
    else:
      flags[key] = value
  argv = [verb, *(x for kv in flags.items() for x in kv), GIN[0], *extra]
  code, out, err = launch_cli("tpu", *argv)  # not dry: nothing may run
  assert (code, out) == (2, "")
  assert err.startswith("error: ") and err.count("\n") == 1
  for word in words:
    assert word in err


def test_debug_raises_with_traceback():
  from launch import cli, tpu
  from launch.errors import LaunchError
  with pytest.raises(LaunchError, match="missing --project"):
    cli.main(tpu.main, ["create", "--name", "a", "--tpu_type", "v4-8",
                        "--zone", "us-central2-b", "--debug"])
