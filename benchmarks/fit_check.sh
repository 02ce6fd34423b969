#!/usr/bin/env bash
# The fit's GPU check (issue 17), about 1.5 min; gpu_check.sh calls it last (its packages and
# PYTHONPATH then apply), or alone on a CUDA machine:  bash benchmarks/fit_check.sh [N]
#   1. the fit's CUDA tests: CUDA leaves against NumPy leaves (projector 1e-6, scores 1e-9,
#      P and Q equal), artifact bit-identical run to run; and the exact-sign tests;
#   2. benchmarks/fit.py --scale on N + N ViT-B/16-shaped images (default 4000, 1.2 GB of float16
#      each): fit time and GB/s per pass with 4 threads (before), every core, and on CUDA.
set -u
cd "$(dirname "$0")/.."
N=${1:-4000}
OUT=${OUT:-/tmp/soapflow-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # the tests' conftest hides GPUs unless told
echo "== fit: CUDA tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fit_scale.py -k "cuda or exact or device" 2>&1 \
  | tee "$OUT/fit-pytest.log" | tail -8
echo "== fit benchmark --scale, $N + $N images"
timeout 150 python3 benchmarks/fit.py --scale --n "$N" 2>&1 | tee "$OUT/fit-scale.log" | tail -12
