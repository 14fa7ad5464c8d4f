#!/usr/bin/env bash
# Issue 10's layer formulations on an accelerator, in one call, from the source tree (no
# TensorFlow, TFDS, ml_collections or clu needed): for the three families below their bf16
# share of the ResNet-50 target (benchmark_results/h200/), XLA's own ops against one CPU
# formulation at a time (`layers.implementation('fast:OP')`), each network's arms in one process
# (`python -m cnn_jax.benchmark --ab=...`: same state and batch, rounds in rotated order).
#
#   bash scripts/gpu_ab.sh OUT [SCALE]
#
# Writes OUT/env.txt, OUT/log.txt and OUT/<name>.json (seven files). SCALE (default 1) multiplies each
# command's time limit. AB_ARGS (environment) is appended to every command's flags (a later flag
# wins), e.g. AB_ARGS="--image_size=32 --batch_size=2 --num_classes=10" to try it on a CPU;
# DRY_RUN=1 prints each command's name and flags instead of running it.
set -u -o pipefail
out=${1:?usage: bash scripts/gpu_ab.sh OUT [SCALE]}
scale=${2:-1}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
mkdir -p "$out"
# shellcheck source=scripts/gpu_env.sh
. scripts/gpu_env.sh
[ -n "${DRY_RUN:-}" ] || gpu_env "$out/env.txt"

run() {  # NAME SECONDS FLAGS...: one benchmark command, its JSON in OUT/NAME.json, killed
  # after SECONDS x SCALE; its progress lines (stderr) in OUT/log.txt
  local name=$1 seconds
  seconds=$(awk "BEGIN {print int($2 * $scale)}")
  shift 2
  local t0=$SECONDS
  # shellcheck disable=SC2086  # AB_ARGS is meant to split
  set -- --json --dtype=bfloat16 --batch_size=256 "$@" ${AB_ARGS:-}
  if [ -n "${DRY_RUN:-}" ]; then  # the commands' flags, one command per line (for the tests)
    echo "$name $*"
    return
  fi
  timeout "$seconds" "$python" -m cnn_jax.benchmark "$@" 2>&1 >"$out/$name.json" \
    | tee -a "$out/log.txt"
  echo "$name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/log.txt"
}
# Cheapest first: resnet50 (the 7,000 img/s goal; also its 53 batch norms' own backward), then
# googlenet (13 max pools, the lowest share), then densenet121 (a 1x1 convolution after every
# concatenation); then resnet50 alone at batch 256 and 512 per device, back-to-back steps, each
# with a 3-step profile.
run ab_resnet50 100 --arch=resnet50 --ab=xla,fast:max_pool,fast:conv1x1,fast:batch_norm --steps=10
run ab_googlenet 120 --arch=googlenet --ab=xla,fast:max_pool --steps=10
run ab_densenet121 140 --arch=densenet121 --ab=xla,fast:conv1x1 --steps=10
run resnet50_b256 40 --arch=resnet50 --steps=20 --profile=3 --noeval
run resnet50_b512 50 --arch=resnet50 --batch_size=512 --steps=20 --profile=3 --noeval
