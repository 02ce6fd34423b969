#!/usr/bin/env bash
# The refit issue's GPU checks, as one script for a CUDA machine:
#   1. the CUDA tests (nvJPEG decode, noise generators on CUDA, a CUDA extraction against a CPU one);
#   2. benchmarks/refit.py with a random-weight ViT-B/16 at 224 px on --n JPEGs + as many noise
#      images, bf16: pure forward vs extraction (goal ≥ 0.85×; also without read-ahead, with
#      the two stores in two processes, and with 2 and 4 decode processes) and vs the whole
#      `soap refit`, at the default chunk (64 images); then extraction alone at chunk 256 on
#      N2 JPEGs + as many noise images (default 8000: at ~8k img/s a forward of 2000 + 2000
#      takes half a second, so starting the decode workers and filling the pipeline weigh on
#      the ratio; this run shows the rate a long extraction keeps).
# Logs go to $OUT (default /tmp/soapflow-gpu-check). Packages the machine lacks (prefect, zarr,
# dask, …) are installed from wheels in .whl/ when that folder exists (benchmarks/device_wheels.sh
# makes it, ~54 MB, before the run):
#   bash benchmarks/gpu_check.sh [N [N2]]
set -u
cd "$(dirname "$0")/.."
N=${1:-2000}
N2=${2:-8000}
OUT=${OUT:-/tmp/soapflow-gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/soapflow-site \
    .whl/*.whl >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/soapflow-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # the tests' conftest hides GPUs unless told
export PREFECT_HOME=$(mktemp -d) PREFECT_SERVER_ANALYTICS_ENABLED=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc)"
python3 -c "import sys, torch, torchvision, timm, prefect, zarr, dask; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'prefect', \
prefect.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__, 'cuda', torch.cuda.is_available())"

echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_sources.py tests/test_noise_generators.py tests/test_extract.py \
  -k "cuda or nvjpeg or device_decode or transform_pixels" 2>&1 | tee "$OUT/pytest.log" | tail -15

for RUN in "64 $N" "256 $N2 --no-refit"; do
  set -- $RUN
  echo "== refit benchmark, chunk $1, $2 JPEGs"
  timeout 240 python3 benchmarks/refit.py --device cuda --backbone vit_base_patch16_224 --weights random \
    --jpegs --n "$2" --chunk "$1" --extraction ${3:-} 2>&1 | tee "$OUT/refit-chunk$1.log" | tail -24
done
bash benchmarks/fit_check.sh  # the fit (issue 17): CUDA tests, fit.py --scale
