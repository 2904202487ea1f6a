"""Shared constants and small helpers of the segmentation package (imports none of its modules)."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from .._errors import RapaclInputError

#: Bumped whenever a change to this package changes its segmentations (part of downstream cache keys).
#: The newest version, used when none is asked for.
SEGMENTATION_VERSION = "3"
#: The versions this code reproduces exactly (``segment_nuclei(..., version=...)``): radiomics tables and
#: checkpoints record the version their nuclei came from, and prediction must segment as they did.
#: For cellpose the version changes nothing (its path is the same in both).
SEGMENTATION_VERSIONS = ("2", "3")

Method = Literal["classical", "cellpose"]
METHODS = ("classical", "cellpose")

#: Default nucleus diameter (um): breast tissue nuclei are ~6 (lymphocytes) to ~12 um (tumour).
DEFAULT_DIAMETER_UM = 8.0
#: Default size filter (um^2): a 12 um^2 disc is ~3.9 um across, a 400 um^2 disc ~22.6 um. Classical
#: version 3 keeps objects down to 8 um^2 (a 3.2 um disc) when they stand out from their surroundings.
DEFAULT_MIN_AREA_UM2 = 12.0
DEFAULT_MAX_AREA_UM2 = 400.0


def _require_skimage() -> None:
    try:
        import skimage  # noqa: F401
    except ImportError as exc:  # pragma: no cover - skimage is installed with the cellpose/radiomics extras
        raise ImportError(
            "nucleus segmentation needs scikit-image: pip install 'napari-rapacl[cellpose]' "
            "(or pip install scikit-image)"
        ) from exc


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RapaclInputError(f"{what}={value!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise RapaclInputError(f"{what}={value!r} must be a finite number > 0")
    return v


def _relabel_by_size(labels: np.ndarray, min_px: float, max_px: float) -> np.ndarray:
    """Drop objects outside [min_px, max_px] pixels and renumber the rest 1..n (order kept)."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return labels.astype(np.int32, copy=False)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = (areas >= min_px) & (areas <= max_px)
    keep[0] = False
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def check_version(version: Any) -> str:
    """``version`` as a string when this code reproduces it (None: the newest), else a clear error."""
    if version is None:
        return SEGMENTATION_VERSION
    v = str(version)
    if v not in SEGMENTATION_VERSIONS:
        raise RapaclInputError(
            f"segmentation version {version!r} is not available: this napari-rapacl reproduces versions "
            f"{', '.join(SEGMENTATION_VERSIONS)} (the newest, {SEGMENTATION_VERSION}, is the default); "
            "segment again with one of them"
        )
    return v
