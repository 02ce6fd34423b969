#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a device machine (Python 3.12, torch/timm/scipy but no
# prefect, zarr or dask, and no internet): downloaded here into .whl/ (git-ignored), carried
# there with the run (`carry: [".whl"]`). numpy is left out: the device's torch brings its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
  prefect==3.9.1 prefect-dask==0.3.7 zarr==3.1.6 "dask[array,distributed]==2026.8.0" numcodecs==0.16.6
rm -f .whl/numpy-*.whl
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
