"""`run --restart_on_preemption`: watch a spot/queued slice, recreate it when
it is preempted, and start the driver again (it resumes from MODEL_DIR)."""

from __future__ import annotations

from launch import gcloud, tpu_vm, worker
from launch.errors import CommandFailed, LaunchError
from launch.gcloud import SliceSpec
from launch.runner import Runner

MAX_FAILED_PROBES = 3


def recreate(runner: Runner, spec: SliceSpec, setup: tpu_vm.RunSetup) -> None:
  try:
    runner.run(gcloud.delete(spec, unattended=True))
  except CommandFailed:
    pass  # already gone, e.g. deleted before a create that failed
  tpu_vm.create(runner, spec, setup.poll_s)
  tpu_vm.start(runner, spec, setup)


def supervise(runner: Runner, spec: SliceSpec, setup: tpu_vm.RunSetup,
              max_restarts: int) -> int:
  """Returns the driver's exit code (from worker 0) once it exits.

  Recreating is attempted at most `max_restarts` times; a failed attempt
  (spot capacity is often short right after a preemption) is retried after
  --poll_s seconds.
  """
  state_probe = gcloud.state(spec)
  exit_probe = gcloud.ssh(spec, "0", worker.exit_code())
  if runner.dry_run:
    runner.note(f"every {setup.poll_s:g}s until worker 0 has an exit code:")
    runner.capture(state_probe)
    runner.capture(exit_probe)
    runner.note(f"when the state is one of {', '.join(sorted(gcloud.LOST_STATES))}"
                f" (at most {max_restarts} times):")
    recreate(runner, spec, setup)
    return 0
  restarts = failed_probes = 0
  lost = ""  # the state that took the slice, until it is back
  while True:
    if lost:
      if restarts >= max_restarts:
        raise LaunchError(
            f"{spec.name} was lost ({lost}) after {restarts} attempts to "
            "recreate it", "raise --max_restarts and rerun; training resumes "
            "from MODEL_DIR")
      restarts += 1
      runner.note(f"{spec.name} is {lost}: recreating it "
                  f"(attempt {restarts} of at most {max_restarts})")
      try:
        recreate(runner, spec, setup)
        lost = ""
      except CommandFailed as e:
        runner.note(f"that failed ({e.problem}); trying again in "
                    f"{setup.poll_s:g}s")
    runner.sleep(setup.poll_s)
    if lost:
      continue
    try:
      state = runner.capture(state_probe)
      code = runner.capture(exit_probe) if state in gcloud.READY_STATES else ""
    except CommandFailed:
      failed_probes += 1
      if failed_probes >= MAX_FAILED_PROBES:
        raise LaunchError(
            f"{MAX_FAILED_PROBES} probes of {spec.name} failed in a row",
            "check `gcloud auth list` and that the slice exists, then rerun "
            "`run --restart_on_preemption` (training resumes from MODEL_DIR)")
      continue
    failed_probes = 0
    if state in gcloud.LOST_STATES:
      lost = state
    elif code:
      runner.note(f"the driver on worker 0 exited with code {code}")
      return int(code)
