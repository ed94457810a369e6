#!/usr/bin/env bash
# The GPU check (issue #21 item 5; docs/performance.md, "GPU"), in under 5 minutes on a machine
# with a CUDA device and a python3 that has torch:
#   1. installs contlearn (editable, no dependencies: the image's torch, numpy, pandas, ...;
#      the MuJoCo wheels from .whl/ if scripts/gpu_wheels.sh put them there);
#   2. the device tests (tests/test_device.py: every learner, credit rule and network option on
#      the device against the CPU reference; a run of each stream on both);
#   3. a short `contlearn run` of each stream with device=cuda, timed;
#   4. the benchmark's CUDA rows (scripts/bench_cuda.py: width 100 R = 32 / 256, width 2000
#      R = 1 / 8), beside the same bp rows on that machine's CPU.
# Everything lands in OUTDIR (default $OUT, else ./gpu_check_out): tests.log, runs.log,
# bench_cuda.json, bench.log, summary.txt. Exit status: the number of failed steps.
#   bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}  # (cpu: a dry run of this script on a machine without a GPU)
export CONTLEARN_TEST_DEVICE=$device
export PYTHONUNBUFFERED=1 CI=true CONTLEARN_DATA=${CONTLEARN_DATA:-/tmp/contlearn-data}
failed=0
step() {  # step NAME LOG COMMAND...: run, time, record
    local name=$1 log=$2 start=$SECONDS
    shift 2
    if "$@" >>"$out/$log" 2>&1; then status=ok; else status=FAILED; failed=$((failed + 1)); fi
    echo "$name: $status in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; \
} 2>&1 | tee "$out/summary.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    step "mujoco wheels" install.log "$py" -m pip install -q --no-index --no-deps --no-compile \
        .whl/*.whl
fi
step "install contlearn" install.log "$py" -m pip install -q --no-index --no-deps \
    --no-build-isolation -e .
step "device tests" tests.log "$py" -m pytest -q -p no:cacheprovider tests/test_device.py \
    tests/test_ppo_credit.py -k "device or to_moves"
runs() {
    local stream sets
    for stream in permuted-mnist label-shuffled-mnist bit-flipping slippery-ant; do
        sets=(--set "device=$device")
        case $stream in
            slippery-ant) "$py" -c "import mujoco" 2>/dev/null || { echo "$stream: no mujoco"; continue; }
                sets+=(--steps 2048) ;;
            bit-flipping) sets+=(--tasks 3 --set examples_per_task=2000) ;;
            *) sets+=(--tasks 3 --set examples_per_task=1000) ;;
        esac
        for learner in bp cbp; do
            local start=$SECONDS
            "$py" -m contlearn run "$stream" --learner "$learner" --seeds 4 "${sets[@]}" \
                --out "/tmp/gpu_check_runs/$stream-$learner" --overwrite || return 1
            echo "$stream $learner: $((SECONDS - start)) s"
        done
    done
    for stream in permuted-mnist label-shuffled-mnist bit-flipping; do
        "$py" -m contlearn summary /tmp/gpu_check_runs/"$stream"-* || return 1
    done
}
step "a run of each stream" runs.log runs
step "bench_cuda" bench.log "$py" scripts/bench_cuda.py --device "$device" \
    --json "$out/bench_cuda.json"
cat "$out/runs.log" "$out/bench.log" >>"$out/summary.txt" 2>/dev/null
echo "failed steps: $failed" | tee -a "$out/summary.txt"
exit "$failed"
