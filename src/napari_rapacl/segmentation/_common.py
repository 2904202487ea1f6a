"""Shared constants and small helpers of the segmentation package (imports none of its modules)."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from .._errors import RapaclInputError

#: Bumped whenever a change to this package changes its segmentations (part of downstream cache keys).
SEGMENTATION_VERSION = "2"

Method = Literal["classical", "cellpose"]
METHODS = ("classical", "cellpose")

#: Default nucleus diameter (um): breast tissue nuclei are ~6 (lymphocytes) to ~12 um (tumour).
DEFAULT_DIAMETER_UM = 8.0
#: Default size filter (um^2): a 12 um^2 disc is ~3.9 um across, a 400 um^2 disc ~22.6 um.
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
