#!/usr/bin/env bash
# Set up everything napari-rapacl needs on a fresh Debian/Ubuntu machine with Python 3.11:
#   * the system libraries that headless Qt and Xvfb need (installed with apt when run as root,
#     otherwise the exact apt line is printed and the script stops),
#   * a virtual environment in .venv (override with VENV=...) with the pinned versions of
#     requirements/lock.txt, torch 2.14.1 + torchvision 0.29.1 and pyradiomics 3.0.1 built
#     without build isolation (it ships no wheels).
# Idempotent: a second run with unchanged pins installs nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

APT_PACKAGES="xvfb xauth libegl1 libgl1 libdbus-1-3 libfontconfig1 libglib2.0-0 libxkbcommon-x11-0 \
libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-render-util0 libxcb-shape0 libxcb-xkb1 \
libxcb-randr0 libxcb-xinerama0 libxcb-xfixes0"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system libraries -------------------------------------------------------------------------
missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        log "installing system packages:$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
        log "missing system packages; run as root:"
        echo "sudo apt-get install -y --no-install-recommends$missing" >&2
        exit 1
    fi
fi

# --- Python environment -----------------------------------------------------------------------
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || {
    log "Python >= 3.10 is needed (3.11 recommended); set PYTHON=/path/to/python3.11"; exit 1; }
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

stamp="$VENV/.napari-rapacl-setup"
want="$(cat "$ROOT/requirements/lock.txt" "$ROOT/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "environment up to date ($VENV)"
    exit 0
fi

LOCK=(-c "$ROOT/requirements/lock.txt")
log "installing torch + torchvision (pinned)"
"${PIP[@]}" install "${LOCK[@]}" torch torchvision
log "installing pyradiomics build requirements, then pyradiomics without build isolation"
"${PIP[@]}" install "${LOCK[@]}" numpy SimpleITK PyWavelets pykwalify six setuptools wheel
"${PIP[@]}" install "${LOCK[@]}" --no-build-isolation pyradiomics
log "installing napari-rapacl with all extras"
"${PIP[@]}" install "${LOCK[@]}" -e "$ROOT[all,test]"
echo "$want" > "$stamp"
log "done: $VENV"
