#!/usr/bin/env bash
# bench/gpu_check.sh: check a GPU machine end to end, in about 8 minutes on an H100 or H200.
#
#   bench/gpu_check.sh [--data-dir DIR]      # DIR (or $MINIDIFF_DATA_DIR) holds MNIST for the short training run
#   OUT=/some/folder bench/gpu_check.sh      # keep the log there (default: a new temporary folder)
#
# Steps, each with its own time limit, each run even when an earlier one failed:
#   1. build and install minidiff for the GPU found (CMAKE_CUDA_ARCHITECTURES from nvidia-smi; the build
#      requirements already installed are used, --no-build-isolation, so no package index is needed;
#      $MINIDIFF_WHEELS may name a folder of wheels for scikit-build-core and pybind11 when they are missing)
#   2. minidiff.backends()
#   3. pytest -m gpu, from outside the source tree (the installed package is what runs)
#   4. bench/bench_unet.py --device cuda (with PyTorch beside it when torch sees the GPU)
#   5. bench/bench_sample.py --device cuda and 6. bench/bench_step.py --device cuda
#   7. a short examples/mnist_train.py --device cuda (300 steps) and its training speed
# Everything goes to $OUT/gpu_check.log, which ends with a summary: one line per step, passed or failed, and the
# figures. Exit status: the number of steps that failed.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d -t minidiff-gpu-check.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
DATA_DIR=${MINIDIFF_DATA_DIR:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) DATA_DIR=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)"; exit 2 ;;
    esac
done
: > "$LOG"
SUMMARY=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# run NAME SECONDS COMMAND...: the command's output goes to the log (and to $OUT/NAME.out), its result to the summary
run() {
    local name=$1 limit=$2; shift 2
    log ""
    log "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.out" 2>&1
    local rc=$?
    cat "$OUT/$name.out" >> "$LOG"
    local what="passed"
    [ $rc -eq 124 ] && what="FAILED (timed out after ${limit}s)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (exit status $rc)"
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    SUMMARY+=("$name: $what in $((SECONDS - t0)) s")
    return $rc
}

# figures NAME: the table rows (and a few key lines) of a step's output, for the summary
figures() {
    grep -E '^\||images/s|passed|failed|skipped|error' "$OUT/$1.out" 2>/dev/null | grep -v -- '--- |' | head -20 | sed 's/^/    /'
}

log "minidiff GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), log: $LOG"
if ! command -v nvidia-smi > /dev/null; then
    log "nvidia-smi not found: this machine has no NVIDIA GPU (or no driver); nothing to check"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee -a "$LOG"
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
log "CUDA architecture: $ARCH; nvcc: $(command -v nvcc || echo 'not on PATH')"

# 1. build and install (the build requirements from a wheel folder when they are missing and there is no index)
BUILD='
if ! "$PY" -c "import scikit_build_core, pybind11" 2> /dev/null; then
    if [ -n "${MINIDIFF_WHEELS:-}" ]; then
        "$PY" -m pip install --no-index --find-links "$MINIDIFF_WHEELS" scikit-build-core pybind11 || exit 1
    else
        "$PY" -m pip install scikit-build-core pybind11 || exit 1
    fi
fi
"$PY" -m pip install --no-deps --no-build-isolation --force-reinstall \
    -Ccmake.define.MINIDIFF_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" "$REPO"'
run build 300 env PY="$PY" ARCH="$ARCH" REPO="$REPO" MINIDIFF_WHEELS="${MINIDIFF_WHEELS:-}" bash -c "$BUILD"

# 2.-6. from outside the source tree, so that the installed minidiff (with its compiled kernels) is imported
cd "$OUT" || exit 1
run backends 60 "$PY" -c "import minidiff, json; print(json.dumps(minidiff.backends(), indent=1))"
run pytest_gpu 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider "$REPO/tests"
run bench_unet 180 "$PY" "$REPO/bench/bench_unet.py" --device cuda --rounds 1 --seconds 3
run bench_sample 120 "$PY" "$REPO/bench/bench_sample.py" --device cuda
run bench_step 60 "$PY" "$REPO/bench/bench_step.py" --device cuda --reps 20

# 7. a short training run on the GPU
if [ -n "$DATA_DIR" ]; then
    run train 180 "$PY" "$REPO/examples/mnist_train.py" --device cuda --data-dir "$DATA_DIR" --steps 300 \
        --batch-size 128 --out-dir "$OUT/train" --no-progress --final-images 36
    "$PY" - "$OUT/train/log.jsonl" >> "$OUT/train.out" 2>&1 <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
speeds = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]     # the first includes the capture
print(f"training: {statistics.median(speeds):.0f} images/s (median of {len(speeds)} log intervals), "
      f"loss {rows[-1]['loss_smooth']:.4f} at step {rows[-1]['step']}")
EOF
else
    SUMMARY+=("train: SKIPPED (no MNIST: give --data-dir DIR or set MINIDIFF_DATA_DIR)")
    FAILED=$((FAILED + 1))
fi

log ""
log "=== summary (log: $LOG)"
for line in "${SUMMARY[@]}"; do
    log "$line"
    name=${line%%:*}
    figures "$name" | tee -a "$LOG"
done
log "$FAILED step(s) failed"
exit $FAILED
