"""Stain channels of H&E: haematoxylin optical density and the tissue mask.

Haematoxylin is computed by colour deconvolution (the Ruifrok-Johnston matrix of
:func:`skimage.color.rgb2hed`) with per-channel lookup tables, equal to ``rgb2hed``'s first channel to
float32 precision. A pixel is tissue when its optical density summed over R, G and B is above
``tissue_od`` (:data:`TISSUE_OD` by default).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from .._image import as_rgb_uint8
from ._common import _require_skimage

#: Optical density (summed over R, G, B, in ``rgb2hed``'s units) above which a pixel is tissue.
TISSUE_OD = 0.04

_LOG_ADJUST = math.log(1e-6)  # rgb2hed's optical-density scale: OD = log(max(v, 1e-6)) / log(1e-6)


@functools.lru_cache(maxsize=1)
def _luts() -> tuple[np.ndarray, np.ndarray]:
    """Per-channel lookup tables: haematoxylin contribution (3, 256) and optical density (256,)."""
    from skimage.color import hed_from_rgb

    v = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    od = np.log(v) / _LOG_ADJUST  # rgb2hed's normalised optical density of one channel value
    hema = (od[None, :] * np.asarray(hed_from_rgb)[:, 0][:, None]).astype(np.float32)
    return hema, od.astype(np.float32)


def haematoxylin(region: Any) -> np.ndarray:
    """Haematoxylin optical density, equal to ``skimage.color.rgb2hed(region)[..., 0]`` (float32).

    Parameters
    ----------
    region
        Anything :func:`as_rgb_uint8` accepts.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 >= 0; nuclei are high (her2st nuclei ~0.1-0.2, stroma ~0.03-0.06).
    """
    _require_skimage()
    return _haematoxylin(as_rgb_uint8(region))


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    lut, _ = _luts()
    h = lut[0][rgb[:, :, 0]]
    h += lut[1][rgb[:, :, 1]]
    h += lut[2][rgb[:, :, 2]]
    np.maximum(h, 0.0, out=h)
    return h


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    _, od = _luts()
    s = od[rgb[:, :, 0]]
    s += od[rgb[:, :, 1]]
    s += od[rgb[:, :, 2]]
    return s


def tissue_mask(region: Any, tissue_od: float = TISSUE_OD) -> np.ndarray:
    """Pixels that are tissue: optical density summed over R, G, B above ``tissue_od`` (bool ``(H, W)``)."""
    _require_skimage()
    return _optical_density(as_rgb_uint8(region)) > float(tissue_od)
