#!/usr/bin/env bash
# The full her2st benchmark with the settings recorded in benchmarks/README.md (fits the 3-hour budget on
# 2 CPU cores). Radiomics tables for RaPaCL-ST first (cached), then every model, leave-one-section-out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export NAPARI_RAPACL_DATA_DIR=${NAPARI_RAPACL_DATA_DIR:-../shared/data}
start=$(date +%s)
$PY -m training.radiomics_tables --out outputs/radiomics
# MODELS="pixnet stnet" runs a subset (results are merged into the JSON file)
# shellcheck disable=SC2086
$PY benchmarks/her2st_accuracy.py --models ${MODELS:-ridge rapacl pixnet stnet nh2st} \
    --radiomics-dir outputs/radiomics --out benchmarks/results/her2st_accuracy.json \
    model.config.patch_size=64 model.config.mpp=2.0 optim.lr=1e-3 optim.epochs=20 \
    rapacl:model.config.backbone=resnet18 rapacl:model.config.warmup_epochs=2 \
    rapacl:model.config.ramp_epochs=6 rapacl:optim.lr=3e-4 \
    pixnet:model.config.hidden=128 pixnet:optim.epochs=15 \
    nh2st:model.config.k_neighbors=4 nh2st:optim.epochs=15 "$@"
echo "total wall time: $(( $(date +%s) - start )) s"
