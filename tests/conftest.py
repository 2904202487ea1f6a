"""Shared fixtures.

Real data lives in ``../shared/data`` beside the repository (or wherever NAPARI_RAPACL_DATA_DIR
points). Tests that need it take the ``data_dir`` fixture, which skips them with a clear reason
when the folder is absent.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"

# Never reach for a network download during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NAPARI_RAPACL_OFFLINE", "1")
# the tests never see (nor write into) the user's own installed models
os.environ.setdefault("NAPARI_RAPACL_MODELS_DIR", tempfile.mkdtemp(prefix="napari-rapacl-test-models-"))
if "NAPARI_RAPACL_DATA_DIR" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["NAPARI_RAPACL_DATA_DIR"] = str(_DEFAULT_DATA)

# napari's pytest plugin breaks pyradiomics' logging formatting; keep it quiet.
logging.getLogger("radiomics").setLevel(logging.WARNING)


def _data_dir() -> Path | None:
    value = os.environ.get("NAPARI_RAPACL_DATA_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data mirror (``../shared/data``); skips the test when it is absent."""
    path = _data_dir()
    if path is None:
        pytest.skip(
            "real data not found: set NAPARI_RAPACL_DATA_DIR to a folder holding her2st/ and "
            "visium_mouse_brain_crop/ (CI uses ../shared/data)"
        )
    return path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files a person should look at (screenshots, figures)."""
    path = Path(os.environ.get("NAPARI_RAPACL_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def rapacl_run(tmp_path_factory, data_dir):
    """A tiny RaPaCL-ST trained the way the product trains it, on real her2st sections.

    ``python -m training.radiomics_tables`` writes the radiomics tables of C2, C3 and C4 (every spot:
    classical nuclei + RaPaCL-ST's 72 features, recipe in the parquet metadata); ``training.run``
    trains ``rapacl_tiny`` Stage 1, then Stage 2 from it (1 epoch each; train C3, select on C4, test
    C2; 40 spots per section). Returns the tables' path template and both ``best.pt``.
    """
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("radiomics")
    import sys
    from types import SimpleNamespace

    import yaml

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from training.config import load_config
    from training.radiomics_tables import write_section_table
    from training.run import train

    root = tmp_path_factory.mktemp("rapacl_run")
    for section in ("C2", "C3", "C4"):
        write_section_table(section, root / "tables", n_jobs=2, cache_dir=None)
    template = str(root / "tables" / "her2st_{section}.parquet")
    base = yaml.safe_load((REPO / "training" / "configs" / "stnet_tiny_test.yaml").read_text())
    for stage in (1, 2):
        cfg = {
            **base,
            "model": {
                "name": "rapacl_tiny",
                "stage": stage,
                "config": {"dropout": 0.0, "warmup_epochs": 0, "ramp_epochs": 1},
            },
            "data": {
                **base["data"],
                "train": ["C3"],
                "val": ["C4"],
                "test": ["C2"],
                "max_spots": 40,
                "cache_dir": str(root / "patches"),
                "radiomics_table": template,
                "radiomics_columns": "rapacl72",
                "radiomics_signed_log": ["Energy", "NonUniformity"],
                "cell_label_column": "cell_label",
            },
            "optim": {**base["optim"], "epochs": 1},
            "run": {**base["run"], "out_dir": str(root / f"stage{stage}"), "find_unused_parameters": True},
        }
        if stage == 2:
            cfg["model"]["init_checkpoint"] = str(root / "stage1" / "best.pt")
        path = root / f"stage{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        train(load_config(path, []))
    return SimpleNamespace(
        root=root, tables=template, stage1=root / "stage1" / "best.pt", stage2=root / "stage2" / "best.pt"
    )


@pytest.fixture()
def cellpose_models(tmp_path, monkeypatch):
    """An empty cellpose models folder (``CELLPOSE_LOCAL_MODELS_PATH``, and cellpose's own folder, which
    it fixes at its first import), offline; the process's cellpose model cache is cleared around."""
    pytest.importorskip("cellpose")
    from cellpose import models

    from napari_rapacl import segmentation as seg

    path = tmp_path / "cellpose-models"
    path.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(path))
    monkeypatch.setenv("NAPARI_RAPACL_OFFLINE", "1")
    monkeypatch.setattr(models, "MODEL_DIR", path)
    seg.clear_cellpose_cache()
    yield path
    seg.clear_cellpose_cache()


# The suite's outcome, for the exit below.
_SESSION: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _SESSION["exitstatus"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's final garbage collection once pytest has reported everything:
    on 2026-12-07 a clean CI run passed every test and then aborted in it ("Fatal Python error:
    none_dealloc ... Garbage-collecting", exit 134), a reference-count bug in one of the C extensions
    loaded by the suite (Qt, torch, SimpleITK, cellpose ...), not in a test. The exit status stays
    pytest's. ``NAPARI_RAPACL_TEST_CLEAN_EXIT=1`` keeps the normal shutdown (to look for the culprit)."""
    if "exitstatus" in _SESSION and os.environ.get("NAPARI_RAPACL_TEST_CLEAN_EXIT") != "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION["exitstatus"])
