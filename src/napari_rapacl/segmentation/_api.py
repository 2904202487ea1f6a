"""The one entry point of both segmenters, :func:`segment_nuclei`.

Input conventions (:func:`as_rgb_uint8`): ``(H, W, 3)`` uint8 RGB; a grey ``(H, W)`` or ``(H, W, 1)``
image is replicated to R = G = B (the haematoxylin channel then measures darkness); RGBA is
composited over white (transparent pixels become background); float images in [0, 1] are scaled to
uint8; any other dtype is refused. An all-white or flat region gives all-zero labels.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import numpy as np

from .._errors import RapaclInputError
from .._image import as_rgb_uint8
from ._cellpose import _cellpose, cellpose_model_settings
from ._classical import CLASSICAL_DEFAULTS, MIN_CONTRAST, MIN_THRESHOLD, _classical, _make_params
from ._common import (
    DEFAULT_DIAMETER_UM,
    DEFAULT_MAX_AREA_UM2,
    DEFAULT_MIN_AREA_UM2,
    METHODS,
    Method,
    _require_skimage,
    check_version,
)
from ._stain import TISSUE_OD


def segment_nuclei(
    region: Any,
    mpp: float,
    method: Method = "classical",
    *,
    diameter_um: float = DEFAULT_DIAMETER_UM,
    min_area_um2: float | None = None,
    max_area_um2: float = DEFAULT_MAX_AREA_UM2,
    model: str | os.PathLike | None = None,
    gpu: bool = False,
    threshold: float | None = None,
    smooth_um: float = 0.4,
    work_mpp: float | None = 0.5,
    peak_spacing: float = 0.4,
    blob_weight: float = 0.25,
    tissue_od: float = TISSUE_OD,
    min_threshold: float = MIN_THRESHOLD,
    min_contrast: float = MIN_CONTRAST,
    local_um: float | None = None,
    floor_fraction: float = 0.8,
    trim: float | None = None,
    min_fill: float = 0.8,
    local_cap: float = 1.5,
    ring_contrast: float = 0.3,
    small_ring_contrast: float = 0.5,
    small_fraction: float = 0.4,
    ring_um: tuple[float, float] = (0.75, 1.75),
    version: str | None = None,
    cellpose_input: Literal["auto", "haematoxylin", "rgb"] = "auto",
    cellpose_kwargs: dict[str, Any] | None = None,
) -> np.ndarray:
    """Segment the nuclei of an H&E region.

    Parameters
    ----------
    region
        ``(H, W, 3)`` uint8 RGB (grey, RGBA and float in [0, 1] are converted, see
        :func:`as_rgb_uint8`).
    mpp
        Microns per pixel of ``region`` (> 0).
    method
        ``"classical"`` (weight-free, the default) or ``"cellpose"``.
    diameter_um
        Typical nucleus diameter (um): sets the watershed marker spacing, or cellpose's ``diameter``
        (converted to pixels with ``mpp``).
    min_area_um2, max_area_um2
        Objects outside this area range (um^2) are removed (both methods). ``min_area_um2=None``: the
        method's default: classical version 3 8 um^2 (:data:`CLASSICAL_DEFAULTS`), version 2 and cellpose
        :data:`DEFAULT_MIN_AREA_UM2` (12 um^2), or the size filter a project-trained cellpose model was
        made with (its sidecar's ``min_area_um2``; 4 um^2 for ``rapacl_nuclei_tnbc``).
    model, gpu
        cellpose only: a model file or name (default: the project's ``"rapacl_nuclei_tnbc"`` when it is
        built, else ``"nuclei"`` on cellpose 3.x; ``"cpsam"`` on 4.x) and whether to run on a GPU; see
        :func:`resolve_cellpose_model`. A project-trained model (one with a ``.rapacl.json`` sidecar) is
        run at its training pixel size: the region is resampled to it and ``diameter_um`` only sets
        the tile overlap.
    threshold
        classical only: a fixed haematoxylin threshold ``T`` (``rgb2hed`` units) instead of the
        region's Otsu threshold (the tiled path passes the one it measured over the whole region).
    smooth_um, work_mpp, peak_spacing, blob_weight, tissue_od, min_threshold, min_contrast
        classical only: Gaussian sigma (um); the coarsest working resolution (um/px; ``None`` = the
        input's); marker spacing as a fraction of the nucleus radius; the weight of the smoothed
        haematoxylin in the watershed score; the tissue optical density; the lowest threshold (a floor
        for tissue without haematoxylin); the smallest separation of the two Otsu classes, as a
        fraction of the upper class's mean (see :mod:`napari_rapacl.segmentation._classical`).
    local_um, local_cap, floor_fraction, trim, min_fill
        classical only: the sigma (um) of the local mean haematoxylin a nucleus pixel must exceed
        (``None``: 0.4 ``diameter_um``), and the cap of that mean as a multiple of ``T``; the fraction
        of ``T`` every nucleus pixel must exceed; the per-object level, as a fraction of the way from
        that floor to the object's peak (``None``: the version's default, 0.5 in version 3, 0.3 in
        version 2); the smallest ratio of an object's area to that of its moment ellipse (0 keeps every
        shape).
    ring_contrast, small_ring_contrast, small_fraction, ring_um
        classical version 3 only: an object is kept when its mean haematoxylin exceeds that of its own
        ring (the background ``ring_um[0]`` to ``ring_um[1]`` um around it) by at least
        ``ring_contrast`` of its own mean, or ``small_ring_contrast`` when its area is below
        ``small_fraction`` of a ``diameter_um`` disc (small objects must stand out more).
    version
        The classical segmenter's version (:data:`SEGMENTATION_VERSIONS`; ``None``: the newest,
        :data:`SEGMENTATION_VERSION`). Radiomics tables and checkpoints record the version their nuclei
        came from; prediction passes it here to segment as they did. cellpose accepts it and ignores it.
    cellpose_input
        cellpose only: ``"haematoxylin"`` (one channel, bright nuclei), ``"rgb"``, or ``"auto"``
        (haematoxylin on 3.x, RGB on 4.x).
    cellpose_kwargs
        cellpose only: extra keyword arguments for ``CellposeModel.eval`` (``flow_threshold``,
        ``cellprob_threshold``, ``batch_size``, ...).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32 labels: 0 = background, nuclei numbered 1..n without gaps. A region without
        tissue, or a flat one, gives all zeros.

    Raises
    ------
    RapaclInputError
        Bad image shape or dtype, ``mpp <= 0``, an unknown method or inconsistent settings.
    FileNotFoundError, CellposeModelUnavailableError
        cellpose: the model file is missing, or a named model cannot be had offline.
    """
    if method not in METHODS:
        raise RapaclInputError(f"method={method!r} is not one of {', '.join(METHODS)}")
    _require_skimage()
    version = check_version(version)
    defaults = CLASSICAL_DEFAULTS[version]
    if trim is None:
        trim = defaults["trim"]
    if min_area_um2 is None:
        min_area_um2 = defaults["min_area_um2"] if method == "classical" else DEFAULT_MIN_AREA_UM2
        if method == "cellpose":
            settings = cellpose_model_settings(model)
            if settings is not None:
                min_area_um2 = float(settings.get("min_area_um2", DEFAULT_MIN_AREA_UM2))
    p = _make_params(
        mpp,
        diameter_um,
        min_area_um2,
        max_area_um2,
        smooth_um=smooth_um,
        work_mpp=work_mpp,
        peak_spacing=peak_spacing,
        blob_weight=blob_weight,
        tissue_od=tissue_od,
        min_threshold=min_threshold,
        min_contrast=min_contrast,
        local_um=local_um,
        floor_fraction=floor_fraction,
        trim=trim,
        min_fill=min_fill,
        local_cap=local_cap,
        version=version,
        ring_contrast=ring_contrast,
        small_ring_contrast=small_ring_contrast,
        small_fraction=small_fraction,
        ring_um=ring_um,
    )
    if threshold is not None:
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise RapaclInputError(f"threshold={threshold!r} must be finite")
    rgb = as_rgb_uint8(region)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=np.int32)
    if method == "classical":
        return _classical(rgb, p, threshold)
    return _cellpose(rgb, p, model, gpu, cellpose_input, cellpose_kwargs)
