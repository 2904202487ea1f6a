"""Image conventions shared by segmentation and radiomics (Qt- and torch-free)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._errors import RapaclInputError


def as_rgb_uint8(region: Any, name: str = "region", *, allow_empty: bool = True) -> np.ndarray:
    """Return ``region`` as a C-contiguous ``(H, W, 3)`` uint8 RGB array.

    Parameters
    ----------
    region
        ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA, ``(H, W)`` or ``(H, W, 1)`` grey; uint8, or float in
        [0, 1] (numpy, dask or anything :func:`numpy.asarray` accepts).
    name
        What to call the array in error messages.
    allow_empty
        Whether a zero-height or zero-width image is accepted.

    Returns
    -------
    numpy.ndarray
        Grey is replicated to three channels; RGBA is composited over white
        (``rgb * a + 255 * (1 - a)``); floats are scaled by 255 and rounded.

    Raises
    ------
    RapaclInputError
        Wrong number of dimensions or channels, a float image outside [0, 1] or with NaN/inf, or any
        dtype other than uint8 and float.
    """
    arr = np.asarray(region)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise RapaclInputError(
            f"{name} must be an (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey image, got shape {arr.shape}"
        )
    if not allow_empty and (arr.shape[0] < 1 or arr.shape[1] < 1):
        raise RapaclInputError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise RapaclInputError(f"{name} (float {arr.dtype}) contains NaN or infinite values")
            if lo < 0.0 or hi > 1.0:
                raise RapaclInputError(
                    f"{name} is float ({arr.dtype}) with values in [{lo:.4g}, {hi:.4g}]; float images must "
                    "be in [0, 1] (or pass uint8 0-255)"
                )
        arr = np.rint(arr.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
    else:
        raise RapaclInputError(
            f"{name} has dtype {arr.dtype}; pass uint8 (0-255) or float in [0, 1] "
            "(e.g. convert 16-bit with (x // 257).astype(np.uint8))"
        )
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.uint16)
        rgb = arr[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha)
        arr = ((rgb + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)
