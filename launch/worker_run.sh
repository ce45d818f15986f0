#!/usr/bin/env bash
# Runs one host's driver detached from the ssh session that started it.
#
# Usage (on a TPU VM, from the shipped repository; launch/worker.py builds it):
#   setsid nohup bash launch/worker_run.sh RUN_DIR COMMAND [ARG...] &
# Writes, in the existing RUN_DIR: driver.log (the driver's output), pid (the
# driver's pid, which `launch/tpu.py stop` sends SIGTERM) and, once the driver
# exits, exit_code (which `run --restart_on_preemption` polls on worker 0).
set -u
run_dir="$1"
shift
"$@" > "$run_dir/driver.log" 2>&1 &
echo "$!" > "$run_dir/pid"
wait "$!"
echo "$?" > "$run_dir/exit_code"
