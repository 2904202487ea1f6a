"""The installable plugin: manifest, import budget, CLI entry point."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_manifest_is_one_file_shipped_in_the_package():
    import napari_rapacl

    shipped = Path(napari_rapacl.__file__).parent / "napari.yaml"
    top = REPO / "napari.yaml"
    assert shipped.is_file() and top.exists()
    assert os.path.samefile(shipped, top), "top-level napari.yaml must be the packaged manifest, not a copy"


def test_npe2_validate_passes():
    exe = shutil.which("npe2", path=str(Path(sys.executable).parent)) or shutil.which("npe2")
    assert exe, "npe2 command not found"
    result = subprocess.run([exe, "validate", "napari-rapacl"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


def test_napari_lists_the_contributions():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover()
    manifest = pm.get_manifest("napari-rapacl")
    contrib = manifest.contributions
    assert {w.display_name for w in contrib.widgets} >= {"Predict expression", "Gene colours"}
    assert len(contrib.readers) == 3 and len(contrib.writers) == 1  # slides, spots, our SpatialData .zarr
    assert {s.key for s in contrib.sample_data} >= {"her2st_c2"}
    # every command resolves to a real callable
    for cmd in contrib.commands:
        module, attr = cmd.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name


def test_import_is_fast_and_light():
    code = (
        "import sys, time; t = time.perf_counter(); import napari_rapacl, napari_rapacl.models; "
        "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'qtpy', 'PySide6', 'napari', "
        "'cellpose', 'radiomics', 'dask') if m in sys.modules]; print(dt, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, heavy = out.split(" ", 1)
    assert float(seconds) < 1.5
    assert heavy.strip() == "[]", f"import napari_rapacl pulled in {heavy}"


def test_cli_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "napari_rapacl", "demo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "held-out" in result.stdout


@pytest.mark.parametrize("bad", [["bogus"], []])
def test_cli_rejects_unknown_commands(bad):
    result = subprocess.run([sys.executable, "-m", "napari_rapacl", *bad], capture_output=True, text=True)
    assert result.returncode == 2


def test_code_is_lint_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed in this environment (it is in the 'test' extra)")
    targets = [str(REPO / d) for d in ("src", "tests", "training", "benchmarks") if (REPO / d).is_dir()]
    result = subprocess.run([ruff, "check", *targets], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
