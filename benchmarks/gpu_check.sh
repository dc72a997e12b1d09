#!/usr/bin/env bash
# The one prepared GPU check, for a machine with an NVIDIA GPU and nvcc: build with
# CUDA, the CUDA tests (CPU/CUDA parity included), then every benchmark that takes
# --device cuda. Every step is bounded by `timeout` (the sum, build included, is 530 s:
# under 9 minutes), and after each step everything so far is packed again into ONE
# archive, $OUT/gpu_check.tar.gz, so a run cut short still returns what it had. Besides
# it $OUT holds only summary.txt (one line per step: rc, seconds) and tests_tail.txt.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # the logs and JSON files; only the archive of it goes to $OUT
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

pack() { tar -czf "$OUT/gpu_check.tar.gz.tmp" -C "$WORK" . && mv "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"; }
# step NAME SECONDS CMD...: runs CMD under timeout, output to $WORK/NAME.txt, a line in summary.txt.
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$OUT/summary.txt"
  pack
  return $rc
}

: > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$WORK/gpu.txt" 2>&1
cat "$WORK/gpu.txt" >> "$OUT/summary.txt"
# One architecture (the H100's by default) halves nvcc's time.
step build 180 env NNMARK_CUDA=ON NNMARK_CUDA_ARCHITECTURES="${NNMARK_CUDA_ARCHITECTURES:-90}" \
  "$PY" -m pip install --no-build-isolation --no-deps . \
  || { tail -40 "$WORK/build.txt"; exit 1; }
step build_info 10 "$PY" -c "import json, nnmark; print(json.dumps(nnmark.build_info()))"
# The files with CUDA tests; pytest-xdist when the image has it.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
step tests 90 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_projection.py tests/test_dense.py \
  tests/test_trigger_op.py tests/test_pruning.py tests/test_channel_stats.py tests/test_inference.py \
  tests/test_cuda_sim.py tests/test_attacks_training.py -k "cuda or parity or gpu"
tail -15 "$WORK/tests.txt" > "$OUT/tests_tail.txt"
step bench_projection 90 "$PY" benchmarks/bench_projection.py --device cuda --sizes 576,1e6,1.67e7,2.56e7 \
  --max-seconds 2 --json "$WORK/bench_projection_cuda.json"
step bench_trigger 60 "$PY" benchmarks/bench_trigger.py --device cuda --json "$WORK/bench_trigger_cuda.json"
step bench_prune 60 "$PY" benchmarks/bench_prune.py --device cuda --quick --json "$WORK/bench_prune_cuda.json"
step bench_channel_stats 40 "$PY" benchmarks/bench_channel_stats.py --device cuda \
  --json "$WORK/bench_channel_stats_cuda.json"
echo "done: $OUT/gpu_check.tar.gz" | tee -a "$OUT/summary.txt"
