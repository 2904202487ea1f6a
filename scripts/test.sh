#!/usr/bin/env bash
# Set up (scripts/setup_env.sh), then run the whole test suite under a virtual X server.
# napari renders Image layers only with a real GL context: Xvfb, not QT_QPA_PLATFORM=offscreen.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k slide`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
cd "$ROOT"
if [ -z "${NAPARI_RAPACL_DATA_DIR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
    export NAPARI_RAPACL_DATA_DIR="$ROOT/../shared/data"
fi
export HF_HUB_OFFLINE=1 NAPARI_RAPACL_OFFLINE=1 MPLBACKEND=Agg
unset QT_QPA_PLATFORM
exec xvfb-run -a -s "-screen 0 1920x1200x24" "$VENV/bin/python" -m pytest "$@"
