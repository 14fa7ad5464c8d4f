#!/usr/bin/env bash
# The accelerator checks in one call, from the source tree (no TensorFlow, TFDS, ml_collections
# or clu needed): issue 10's one-shot GPU suite, then issue 14's degradation experiment at the
# paper's widths and data size with its step count fitted to the time left.
#
#   bash scripts/gpu_check.sh OUT [SUITE_SECONDS] [DEGRADATION_SECONDS]
#
# Writes OUT/env.txt, OUT/suite.log, OUT/suite/gpu_suite.{json,md}, OUT/degradation.log and
# OUT/degradation/{results.json,README.md,curves.png}; 0 seconds skips that part. SUITE_ARGS and
# DEGRADATION_ARGS (environment) are appended to the two commands' flags (a later flag wins),
# e.g. to try it small on a CPU. On one H200 (2026-12-04) the defaults took 467 s: the suite's
# bfloat16 rows but densenet121's, and 3,000 steps per degradation network.
set -u -o pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT [SUITE_SECONDS] [DEGRADATION_SECONDS]}
suite_s=${2:-220}
degradation_s=${3:-250}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
mkdir -p "$out"
# shellcheck source=scripts/gpu_env.sh
. scripts/gpu_env.sh
gpu_env "$out/env.txt"
if [ "$suite_s" != 0 ]; then
  # shellcheck disable=SC2086  # the extra arguments are meant to split
  timeout $((suite_s + 30)) "$python" -m cnn_jax.benchmark --suite=gpu --output="$out/suite" \
    --time_budget_s="$suite_s" --profile_steps=3 ${SUITE_ARGS:-} 2>&1 | tee "$out/suite.log"
  echo "suite: exit ${PIPESTATUS[0]}"
fi
if [ "$degradation_s" != 0 ]; then
  # shellcheck disable=SC2086
  timeout $((degradation_s + 30)) "$python" -m experiments.degradation_gpu \
    --out="$out/degradation" --depths=20,56 --seeds=0,1,2 --time_budget_s="$degradation_s" \
    ${DEGRADATION_ARGS:-} 2>&1 | tee "$out/degradation.log"
  echo "degradation: exit ${PIPESTATUS[0]}"
fi
