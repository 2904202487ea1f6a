#!/usr/bin/env bash
# The her2st benchmark with the settings recorded in benchmarks/README.md ("her2st accuracy").
# Radiomics tables for RaPaCL-ST first (cached; segmentation v2), then the ridge floor, then every deep
# model FOLD BY FOLD (all models of one held-out section before the next section), so an interrupted
# run leaves every model scored on the same sections. Results are merged into the JSON after every fold.
#
#   bash benchmarks/run_her2st_accuracy.sh                        # everything
#   MODELS="rapacl rapacl@shuffle" SECTIONS="C3 C4" bash benchmarks/run_her2st_accuracy.sh
#   RIDGE=0 RADIOMICS=0 ...     # skip the ridge floor / the radiomics tables (when another process does them)
#
# Models: rapacl@plain (RaPaCL-ST's published Stage 2: fused head on [z_img; z_rad], MSE; the kept
# RaPaCL-ST configuration, chosen on the validation section), rapacl@plainshuffle (its ablation: same
# encoder, budget and Stage 1, radiomics rows shuffled within every batch; rapacl@plainzero: all
# radiomics replaced by 0, the training mean, so the head sees z_img and a constant), rapacl (levers tried: the
# z-scored radiomics also into the gene head + MSE + 0.5 (1 - PCC); not kept), rapacl@shuffle (its
# ablation), stnet, pixnet, nh2st. Every model's test-time spot smoothing is chosen on the inner
# validation section and stored in its best.pt. Variants reuse the main model's Stage 1 of the fold.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export NAPARI_RAPACL_DATA_DIR=${NAPARI_RAPACL_DATA_DIR:-../shared/data}
OUT=${OUT:-benchmarks/results/her2st_accuracy.json}
RUNS=${RUNS:-outputs/benchmark_runs}
start=$(date +%s)
if [ "${RADIOMICS:-1}" = 1 ]; then
    $PY -m training.radiomics_tables --out outputs/radiomics
fi
if [ "${RIDGE:-1}" = 1 ]; then
    $PY benchmarks/her2st_accuracy.py --models ridge --out "$OUT"
fi
SETTINGS=(
    model.config.patch_size=64 model.config.mpp=2.0 optim.lr=1e-3 optim.epochs=12
    rapacl:model.config.backbone=resnet18 rapacl:optim.lr=3e-4
    rapacl:stage1.optim.epochs=6 rapacl:model.config.warmup_epochs=1 rapacl:model.config.ramp_epochs=3
    rapacl:model.config.rad_skip=true rapacl:model.config.pcc_weight=0.5
    rapacl@shuffle:model.config.radiomics_ablation=shuffle
    rapacl@plain:model.config.rad_skip=false rapacl@plain:model.config.pcc_weight=0.0
    rapacl@plainshuffle:model.config.rad_skip=false rapacl@plainshuffle:model.config.pcc_weight=0.0
    rapacl@plainshuffle:model.config.radiomics_ablation=shuffle
    rapacl@plainzero:model.config.rad_skip=false rapacl@plainzero:model.config.pcc_weight=0.0
    rapacl@plainzero:model.config.radiomics_ablation=zero
    pixnet:model.config.hidden=128 pixnet:optim.epochs=10
    nh2st:model.config.k_neighbors=4 nh2st:optim.epochs=8
)
for section in ${SECTIONS:-C3 C4 C5 C6 C2}; do
    # shellcheck disable=SC2086
    $PY benchmarks/her2st_accuracy.py --sections "$section" \
        --models ${MODELS:-rapacl@plain rapacl@plainzero rapacl@plainshuffle stnet pixnet rapacl rapacl@shuffle nh2st} \
        --radiomics-dir outputs/radiomics --runs "$RUNS" --out "$OUT" "${SETTINGS[@]}" "$@"
done
echo "total wall time: $(( $(date +%s) - start )) s"
