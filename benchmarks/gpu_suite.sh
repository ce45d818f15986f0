#!/usr/bin/env bash
# The GPU measurement suite of issue 12, in one call (see benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh [--budget SECONDS] [--only STAGE,...] [--list]
#   bash benchmarks/gpu_suite.sh --cpu_smoke [--out DIR]    # tiny, on the CPU (CI)
#
# On the device machine (nothing can be downloaded there): the wheels in .whl/
# (tokamax and what it needs, gin-config; see the pip command in gpu_suite.py's
# WHEELS) are installed into /tmp/site first. Every stage has its own time
# limit and the whole run stops starting stages after --budget seconds
# (default 500); this script's own `timeout` is the hard cap behind both.
# Output: $OUT (else --out, else /tmp/gpu_suite_out): results.jsonl, suite.log,
# summary.md, tuning.json, train_profile.xplane.pb, train_step.hlo.txt.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
HARD_LIMIT_S=${GPU_SUITE_HARD_LIMIT_S:-570}
smoke=0
for arg in "$@"; do [ "$arg" = "--cpu_smoke" ] && smoke=1; done
if [ "$smoke" = 1 ]; then
  HARD_LIMIT_S=${GPU_SUITE_HARD_LIMIT_S:-200}
elif compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_suite.sh: installing .whl/*.whl failed; going on without them" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout -k 10 "$HARD_LIMIT_S" "$PY" benchmarks/gpu_suite.py run "$@"
