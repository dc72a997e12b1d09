#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md §3), for a machine with an NVIDIA GPU and
# nvcc: build with CUDA, run the whole test suite (CUDA tests and CPU/CUDA parity
# run there), then the benchmarks on the GPU. Everything lands in $OUT.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
NNMARK_CUDA=ON NNMARK_CUDA_ARCHITECTURES="${NNMARK_CUDA_ARCHITECTURES:-80;90}" \
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import json, nnmark; print(json.dumps(nnmark.build_info()))" | tee "$OUT/build_info.json"
# pytest-xdist is on the device image: 8 workers keep the suite to a minute or two.
timeout 240 python3 -m pytest -q -n 8 tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 150 python3 benchmarks/bench_projection.py --device cuda --sizes 576,1e6,1.67e7,2.56e7 --max-seconds 2 --json "$OUT/bench_projection_cuda.json" 2>&1 \
  | tee "$OUT/bench_projection_cuda.txt" | tail -40
timeout 100 python3 benchmarks/bench_trigger.py --device cuda --json "$OUT/bench_trigger_cuda.json" 2>&1 \
  | tee "$OUT/bench_trigger_cuda.txt" | tail -30
timeout 120 python3 benchmarks/bench_prune.py --device cuda --quick --json "$OUT/bench_prune_cuda.json" 2>&1 \
  | tee "$OUT/bench_prune_cuda.txt" | tail -30
timeout 60 python3 benchmarks/bench_channel_stats.py --device cuda --json "$OUT/bench_channel_stats_cuda.json" 2>&1 \
  | tee "$OUT/bench_channel_stats_cuda.txt" | tail -20
