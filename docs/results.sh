#!/usr/bin/env bash
# Reproduces docs/results.md: every number there comes from the JSON files these commands write.
#   N=1000 bash docs/results.sh [WORK_DIR]   (default WORK_DIR: results-work)
# N images each: fit on N Fashion-MNIST train + N noise:mixture, evaluate on N test with a kNN bank
# of N train images. (The numbers on the page were made before soap scan's options were renamed:
# --n, --synth noise:mixture, --synth-n, --work-dir then; the same run.) Then: python docs/render_results.py (docs/data/*.json -> docs/results.md, README).
set -euo pipefail
W=${1:-results-work}
N=${N:-1000}
SOAP=${SOAP:-soap}
mkdir -p "$W/reports" docs/data

# 1. one extraction pass for blocks 6, 8 and 11 (block 11 after the model's final norm, the
#    default --final-norm auto; 6 and 8 are block outputs), a fit per block (μ = 2, τ = 0.05),
#    and per block the evaluations at TokenCut τ = 0.2 (salient, patch kNN seg, kNN cls)
$SOAP scan --backbone dinov2_vits14 --layers 6,8,11 --data fashion-mnist:train --n-real "$N" \
  --generator mixture --n-synth "$N" --eval salient,knn-seg,knn-cls \
  --eval-data fashion-mnist:test --eval-n "$N" --bank-n "$N" --bank-patches 16384 \
  --workdir "$W/work" --artifacts "$W/artifacts" --out "$W/scan" --quiet

# 2. the other TokenCut τ pairings on the cached tokens (no new forward passes):
#    the authors' (raw τ = 0.2, SOAP τ = 0.3) and τ = 0.3 for both
for L in 11 8 6; do
  $SOAP eval salient --head "$W/artifacts/L$L" --dataset fashion-mnist --n "$N" --tau 0.2 --soap-tau 0.3 \
    --cache-dir "$W/work/tokens" --json "$W/reports/salient-L$L-tau0.2-soap0.3.json"
done
for L in 11 8 6; do
  $SOAP eval salient --head "$W/artifacts/L$L" --dataset fashion-mnist --n "$N" --tau 0.3 \
    --cache-dir "$W/work/tokens" --json "$W/reports/salient-L$L-tau0.3.json"
done

# 3. keep the JSON with the docs
cp "$W/scan/scan.json" docs/data/scan.json
cp "$W"/reports/salient-L*.json docs/data/
