#!/usr/bin/env bash
# Set up (scripts/setup_env.sh), then run the main job on the built-in default: train the small
# image-only baseline on her2st sections C3-C5 (C6 for model selection), predict section C2, and
# write C2's predictions as .h5ad plus a PNG figure. Extra arguments go to `napari-rapacl demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
if [ -z "${NAPARI_RAPACL_DATA_DIR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
    export NAPARI_RAPACL_DATA_DIR="$ROOT/../shared/data"
fi
export MPLBACKEND=Agg
exec "$VENV/bin/napari-rapacl" demo --out "$ROOT/outputs/demo" "$@"
