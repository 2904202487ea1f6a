"""Shared fixtures.

Real data lives in ``../shared/data`` beside the repository (or wherever NAPARI_RAPACL_DATA_DIR
points). Tests that need it take the ``data_dir`` fixture, which skips them with a clear reason
when the folder is absent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"

# Never reach for a network download during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NAPARI_RAPACL_OFFLINE", "1")
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
