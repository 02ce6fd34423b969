#!/usr/bin/env bash
# Issue 16's GPU check, as one script for a CUDA machine (≤ 6 min on one H200 with 16 cores):
#   1. the CUDA tests (nvJPEG decode, streams and the pinned ring, noise on CUDA, a CUDA extraction
#      against a CPU one);
#   2. extraction at default settings of N JPEGs (500x375) + N mixture images, ViT-B/16 at 224 px
#      in bf16, both stores in one process as the refit flow runs them, against the pure forward of
#      the same images (goal: ≥ 6000 img/s);
#   3. a whole `soap refit` of NR + NR at default settings, its fixed part (a refit of one chunk per
#      store) broken down by phase, and the projected wall time of 50 000 + 50 000 (goal ≤ 60 s).
#   bash benchmarks/gpu_check.sh [N [NR]]        (defaults: 8000, 2000)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   (the same steps on a CPU, with a tiny ViT at 32 px on
#                                                 64 + 64 and 32 + 32 images: that it runs end to end)
# Logs go to $OUT (default /tmp/soapflow-gpu-check). Packages the machine lacks (prefect, zarr,
# dask, …) are installed from wheels in .whl/ when that folder exists (benchmarks/device_wheels.sh
# makes it before the run). $PYTHON: the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-/tmp/soapflow-gpu-check}
mkdir -p "$OUT"
if [ $DRY = 1 ]; then
  N=${1:-64}; NR=${2:-32}
  MODEL=(--device cpu --backbone vit_tiny_patch16_224 --weights random --image-size 32 --chunk 16)
  # a shared CPU: one OpenMP thread, which a busy machine cannot stall, and time to spare
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300
  T_TESTS=600 T_EXTRACT=600 T_REFIT=900
else
  N=${1:-8000}; NR=${2:-2000}
  T_TESTS=120 T_EXTRACT=150 T_REFIT=180
  MODEL=(--device cuda --backbone vit_base_patch16_224 --weights random)
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/soapflow-site \
      .whl/*.whl >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
    export PYTHONPATH=/tmp/soapflow-site
  fi
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # the tests' conftest hides GPUs unless told
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PREFECT_HOME=$(mktemp -d) PREFECT_SERVER_ANALYTICS_ENABLED=false
echo "cores: $(nproc --all)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
$PY -c "import sys, torch, torchvision, timm, prefect, zarr, dask; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'prefect', \
prefect.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__, 'cuda', torch.cuda.is_available())"
status=0
# The fresh PREFECT_HOME's database is created (migrated) now, beside the CUDA tests: a machine's
# first run pays that once, and it would otherwise land in the refit's fixed part below.
( t0=$(date +%s); $PY -m prefect server database upgrade -y >"$OUT/prefect-db.log" 2>&1 \
  && echo "prefect database created in $(( $(date +%s) - t0 )) s (once per PREFECT_HOME; not in the times below)" ) &
db=$!

echo "== CUDA tests"
timeout $T_TESTS $PY -m pytest -q -p no:cacheprovider -rs \
  tests/test_sources.py tests/test_noise_generators.py tests/test_extract.py tests/test_scheduler.py \
  -k "cuda or nvjpeg or device_decode or transform_pixels" 2>&1 | tee "$OUT/pytest.log" | tail -15
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "(exit $rc)"; status=1; }

wait $db || { echo "(prefect database upgrade failed: $OUT/prefect-db.log)"; status=1; }

echo "== extraction at default settings, $N JPEGs + $N noise images"
timeout $T_EXTRACT $PY benchmarks/refit.py "${MODEL[@]}" --jpegs --n "$N" --extraction --no-refit --no-variants \
  2>&1 | tee "$OUT/extraction.log" | tail -12
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "(exit $rc)"; status=1; }

echo "== whole soap refit, $NR JPEGs + $NR noise images; projected 50000 + 50000"
timeout $T_REFIT $PY benchmarks/refit.py "${MODEL[@]}" --jpegs --n "$NR" --project 50000 \
  2>&1 | tee "$OUT/refit.log" | tail -12
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "(exit $rc)"; status=1; }
[ $DRY = 1 ] || bash benchmarks/fit_check.sh  # the fit (issue 17): CUDA tests, fit.py --scale
exit $status
