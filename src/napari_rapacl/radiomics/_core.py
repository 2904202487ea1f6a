"""Per-cell and per-spot radiomics with pyradiomics: the computing core.

The feature values are pyradiomics' own (its feature classes and ``get*FeatureValue`` methods,
with the extractor's settings); tests compare them with ``RadiomicsFeatureExtractor.execute`` to
rtol 1e-6 (in practice ~1e-14). The speed comes from how pyradiomics is called:

* each nucleus is cropped to its bounding box before SimpleITK images are built -- the extractor
  does the same crop (``cropToTumorMask``, no padding) after checking the whole image, so the
  feature classes see identical arrays;
* the shape2D and texture classes run per nucleus on those crops without the extractor's per-call
  overhead (mask checks and label statistics over the whole image, casts, logging);
* first-order statistics of all the nuclei come from **one** ``RadiomicsFirstOrder`` object whose
  arrays hold one row per nucleus (NaN-padded, the layout of pyradiomics' voxel-based mode); its
  getters reduce along rows; order statistics (percentiles, median) are evaluated on sorted rows
  with numpy's exact arithmetic (:func:`row_percentiles`) instead of numpy's per-row Python loop;
* the feature classes are subclassed only to cache their feature-name list (pyradiomics runs
  ``inspect.getmembers`` per object) and to find bin edges from the (min, max) pair instead of
  Python's element-wise ``min``/``max`` (:func:`_bin_edges`, same edges);
* derived images (wavelet, LoG, ...) are computed once per region, not once per nucleus (the
  extractor filters the whole image it is given, so the values are the same).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from typing import Any

import numpy as np
import pandas as pd

from .._errors import RapaclInputError
from .._image import as_rgb_uint8 as _as_rgb_uint8
from ._config import (
    COMPOSITION_CLASSES,
    MORPH_STATS,
    SHAPE2D_FEATURES,
    CompositionRule,
    RadiomicsConfig,
    check_config,
    rapacl72_names,
    require_radiomics,
)

FEATURE_SETS = ("rapacl72", "full")

#: Largest H value (``skimage.color.rgb2hed``, channel 0) an 8-bit pixel with all channels >= 1 can
#: have: H is linear in t_c = log(x_c) / log(1e-6), t_c in [0, log(1/255)/log(1e-6)].
_T_MAX = math.log(1.0 / 255.0) / math.log(1e-6)
_FIRSTORDER_CHUNK = 512
#: cell_features(n_jobs > 1) uses worker processes from this many nuclei on (starting them costs ~1 s).
_PARALLEL_MIN_NUCLEI = 2000


class _DropKnownNoise(logging.Filter):
    """Drop pyradiomics' per-call notice that SumAverage = 2 * JointAverage for a symmetric GLCM."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("GLCM is symmetrical")


_noise_filter = _DropKnownNoise()


def _radiomics() -> Any:
    mod = require_radiomics()
    glcm_logger = logging.getLogger("radiomics.glcm")
    if _noise_filter not in glcm_logger.filters:
        glcm_logger.addFilter(_noise_filter)
    return mod


# ------------------------------------------------------------------------------------------------
# input checks and grey conversion
# ------------------------------------------------------------------------------------------------


def as_rgb_uint8(region: Any, name: str = "region") -> np.ndarray:
    """Check an image and return it as C-contiguous ``(h, w, 3)`` uint8 RGB (empty images refused).

    The conventions of :func:`napari_rapacl.segmentation.as_rgb_uint8`: grey replicated, RGBA composited
    over white, floats in [0, 1] scaled by 255; anything else raises :class:`RapaclInputError`.
    """
    return _as_rgb_uint8(region, name, allow_empty=False)


def check_labels(labels: Any, shape: tuple[int, int], name: str = "labels") -> np.ndarray:
    """A ``(h, w)`` non-negative integer label image matching ``shape`` (0 = background)."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        raise RapaclInputError(
            f"{name} is a boolean mask; pass a label image (one integer id per nucleus, 0 = background), "
            "e.g. skimage.measure.label(mask)"
        )
    if arr.dtype.kind not in "ui":
        raise RapaclInputError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise RapaclInputError(f"{name} must be 2-D (h, w), got shape {arr.shape}")
    if tuple(arr.shape) != tuple(shape):
        raise RapaclInputError(f"{name} has shape {arr.shape} but the image is {tuple(shape)}")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise RapaclInputError(f"{name} holds negative values (min {int(arr.min())}); 0 is background")
    return arr


def to_grey(rgb: np.ndarray, mode: str = "luminance") -> np.ndarray:
    """RGB uint8 -> the float64 grey image (integer values 0..255) the features are computed on.

    ``luminance``: ITU-R BT.601 ``0.299 R + 0.587 G + 0.114 B``, rounded.
    ``haematoxylin``: H of ``skimage.color.rgb2hed(max(rgb, 1))`` times ``255 / H_max``, clipped
    to 0..255 and rounded, with ``H_max`` the largest H any 8-bit pixel can have (0.753). A fixed
    scale, so values compare across patches; nuclei are bright.
    """
    rgb = as_rgb_uint8(rgb)
    if mode == "luminance":
        grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(grey), 0, 255)
    if mode == "haematoxylin":
        from skimage.color import hed_from_rgb, rgb2hed

        coef = hed_from_rgb[:, 0]
        h_max = _T_MAX * float(coef[coef > 0].sum())
        h = rgb2hed(np.maximum(rgb, 1))[..., 0]
        return np.clip(np.rint(h * (255.0 / h_max)), 0, 255)
    raise RapaclInputError(f"unknown grey conversion {mode!r}; choose luminance or haematoxylin")


# ------------------------------------------------------------------------------------------------
# pyradiomics plumbing
# ------------------------------------------------------------------------------------------------


def _sitk_image(array: np.ndarray, spacing: float) -> Any:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    if spacing != 1.0:
        img.SetSpacing((spacing, spacing))
    return img


def derived_images(
    grey: np.ndarray, config: RadiomicsConfig, spacing: float = 1.0
) -> list[tuple[str, np.ndarray]]:
    """``[(image type name, float array)]`` for every configured image type, from pyradiomics' filters.

    The names are pyradiomics' (``original``, ``wavelet-LH``, ``log-sigma-1-0-mm-3D``, ...).
    The filters see the whole ``grey`` image, as the extractor's do.
    """
    import SimpleITK as sitk

    _radiomics()
    from radiomics import imageoperations

    image = _sitk_image(np.asarray(grey, dtype=np.float64), spacing)
    mask = sitk.GetImageFromArray(np.ones(grey.shape, dtype=np.uint32))
    mask.CopyInformation(image)
    base = config.pyradiomics_settings()
    out: list[tuple[str, np.ndarray]] = []
    for image_type, custom in config.image_types.items():
        kwargs = dict(base)
        kwargs.update(custom)
        gen = getattr(imageoperations, f"get{image_type}Image")(image, mask, **kwargs)
        for img, name, _kw in gen:
            out.append((name, sitk.GetArrayFromImage(img).astype(np.float64, copy=False)))
    return out


@lru_cache(maxsize=32)
def _image_type_names_cached(image_types_json: str) -> tuple[str, ...]:
    import json

    cfg = RadiomicsConfig(image_types=json.loads(image_types_json))
    rng = np.random.default_rng(0)
    dummy = rng.integers(0, 256, size=(32, 32)).astype(np.float64)
    return tuple(name for name, _ in derived_images(dummy, cfg))


def image_type_names(config: RadiomicsConfig) -> tuple[str, ...]:
    """Names of the images the configured image types produce (``original``, ``wavelet-LH``, ...)."""
    import json

    return _image_type_names_cached(json.dumps(config.to_dict()["image_types"], sort_keys=True))


def feature_names(cls_name: str) -> tuple[str, ...]:
    """Non-deprecated features of a pyradiomics class, in pyradiomics' order."""
    return _feature_names(cls_name)


@cache
def _feature_names(cls_name: str) -> tuple[str, ...]:
    radiomics = _radiomics()
    cls = radiomics.getFeatureClasses()[cls_name]
    return tuple(n for n, deprecated in cls.getFeatureNames().items() if not deprecated)


def row_percentiles(sorted_rows: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """``numpy.nanpercentile(rows, q, axis=1)`` (method ``linear``) without a Python loop over rows.

    ``sorted_rows`` is each row sorted ascending with its NaNs last (``numpy.sort``), ``counts``
    the number of non-NaN values per row (>= 1). The arithmetic is numpy's own (virtual index
    ``(n - 1) * q / 100``, ``_lerp`` with its ``t >= 0.5`` branch), so the values are the same.
    """
    counts = np.asarray(counts, dtype=np.intp)
    qf = np.true_divide(q, 100)
    virtual = (counts - 1) * qf
    prev = np.floor(virtual)
    above = virtual >= counts - 1
    prev[above] = -1
    gamma = virtual - prev
    last = counts - 1
    prev_idx = np.where(above, last, prev).astype(np.intp)
    next_idx = np.where(above, last, prev + 1).astype(np.intp)
    rows = np.arange(sorted_rows.shape[0])
    a = sorted_rows[rows, prev_idx]
    b = sorted_rows[rows, next_idx]
    diff = b - a
    out = a + diff * gamma
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), out)


def row_medians(sorted_rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``numpy.nanmedian(rows, axis=1)`` for rows sorted with NaNs last (mean of the middle pair)."""
    counts = np.asarray(counts, dtype=np.intp)
    rows = np.arange(sorted_rows.shape[0])
    lo = sorted_rows[rows, (counts - 1) // 2]
    hi = sorted_rows[rows, counts // 2]
    return np.where(counts % 2 == 1, lo, (lo + hi) / 2.0)


@lru_cache(maxsize=1)
def _batch_firstorder_class() -> type:
    _radiomics()
    from radiomics import firstorder

    names = firstorder.RadiomicsFirstOrder.getFeatureNames()

    class _BatchFirstOrder(firstorder.RadiomicsFirstOrder):
        """pyradiomics first order over many ROIs at once: one row of ``targetVoxelArray`` per ROI.

        The base initialiser (which reads one SimpleITK image/mask) is skipped; the arrays it
        would build -- ``targetVoxelArray`` and ``coefficients['p_i']`` -- are given ready, one row
        per ROI, NaN-padded, as pyradiomics' voxel-based mode lays them out. pyradiomics'
        ``get*FeatureValue`` methods reduce along axis 1, so row i equals a single-ROI run on ROI i.

        The order statistics (10th / 90th percentile, interquartile range, median, which the
        robust MAD reuses) are pyradiomics' definitions -- ``numpy.nanpercentile`` /
        ``numpy.nanmedian`` of the ROI -- evaluated by :func:`row_percentiles` /
        :func:`row_medians` on sorted rows: numpy's nan-functions loop over rows in Python, which
        would dominate the run time; the values are identical.
        """

        def __init__(self, target: np.ndarray, p_i: np.ndarray, spacing: tuple[float, ...], settings: dict):
            self.logger = logging.getLogger("radiomics.firstorder")
            self.settings = settings
            self.label = 1
            self.voxelBased = False
            self.enabledFeatures = {}
            self.featureValues = {}
            self.featureNames = names
            self.coefficients = {"p_i": p_i}
            self.pixelSpacing = spacing
            self.voxelArrayShift = settings.get("voxelArrayShift", 0)
            self.targetVoxelArray = target
            self._sorted = np.sort(target, axis=1)
            self._counts = np.count_nonzero(~np.isnan(target), axis=1)
            self._pct: dict[float, np.ndarray] = {}

        def _initCalculation(self, voxelCoordinates: Any = None) -> None:
            pass

        def percentile(self, q: float) -> np.ndarray:
            if q not in self._pct:
                self._pct[q] = row_percentiles(self._sorted, self._counts, q)
            return self._pct[q]

        def get10PercentileFeatureValue(self) -> np.ndarray:
            return self.percentile(10)

        def get90PercentileFeatureValue(self) -> np.ndarray:
            return self.percentile(90)

        def getInterquartileRangeFeatureValue(self) -> np.ndarray:
            return self.percentile(75) - self.percentile(25)

        def getMedianFeatureValue(self) -> np.ndarray:
            return row_medians(self._sorted, self._counts)

    return _BatchFirstOrder


#: morph statistic -> how it is computed on the batched first-order object
_STAT_GETTERS = {
    "minimum": "Minimum",
    "maximum": "Maximum",
    "range": "Range",
    "mean": "Mean",
    "median": "Median",
    "p10": "10Percentile",
    "p90": "90Percentile",
    "interquartilerange": "InterquartileRange",
    "standarddeviation": "StandardDeviation",
    "variance": "Variance",
    "meanabsolutedeviation": "MeanAbsoluteDeviation",
    "robustmeanabsolutedeviation": "RobustMeanAbsoluteDeviation",
    "rootmeansquared": "RootMeanSquared",
    "energy": "Energy",
    "entropy": "Entropy",
    "uniformity": "Uniformity",
    "skewness": "Skewness",
    "kurtosis": "Kurtosis",
}
_STAT_PERCENTILES = {"p25": 25, "p75": 75}


def batch_firstorder(
    values: Sequence[np.ndarray],
    features: Sequence[str],
    settings: Mapping[str, Any],
    spacing: tuple[float, ...] = (1.0, 1.0),
) -> dict[str, np.ndarray]:
    """pyradiomics first-order features of many ROIs, one ROI per entry of ``values``.

    Parameters
    ----------
    values
        The grey values inside each ROI (1-D, any length >= 1).
    features
        pyradiomics first-order feature names (``Energy``, ``10Percentile``, ...;
        ``StandardDeviation`` is allowed) or ``"p25"`` / ``"p75"`` (``numpy.nanpercentile``'s
        value, the definition pyradiomics' own percentiles use).
    settings
        pyradiomics settings (``binWidth`` or ``binCount``, ``voxelArrayShift``).
    spacing
        Pixel spacing (only ``TotalEnergy`` uses it: Energy times the pixel area).

    Returns
    -------
    dict
        ``feature -> (n,)`` float64.
    """
    _radiomics()
    n = len(values)
    out = {f: np.empty(n, dtype=np.float64) for f in features}
    if n == 0:
        return out
    cls = _batch_firstorder_class()
    settings = dict(settings)
    for start in range(0, n, _FIRSTORDER_CHUNK):
        chunk = [np.asarray(v, dtype=np.float64).ravel() for v in values[start : start + _FIRSTORDER_CHUNK]]
        width = max(len(v) for v in chunk)
        target = np.full((len(chunk), width), np.nan)
        p_rows = []
        for i, v in enumerate(chunk):
            target[i, : len(v)] = v
            _, counts = np.unique(np.digitize(v, _bin_edges(v, settings)), return_counts=True)
            p_rows.append(counts)
        p_i = np.zeros((len(chunk), max(len(c) for c in p_rows)))
        for i, c in enumerate(p_rows):
            p_i[i, : len(c)] = c
        p_i /= p_i.sum(axis=1, keepdims=True)
        obj = cls(target, p_i, tuple(spacing), settings)
        for f in features:
            if f in _STAT_PERCENTILES:
                val = obj.percentile(_STAT_PERCENTILES[f])
            else:
                val = getattr(obj, f"get{f}FeatureValue")()
            out[f][start : start + len(chunk)] = np.broadcast_to(
                np.asarray(val, dtype=np.float64), (len(chunk),)
            )
    return out


def _bin_edges(values: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """pyradiomics' ``getBinEdges`` of ``values``, called on their (min, max) pair.

    Its edges depend only on the smallest and largest value (``binWidth``: multiples of the width
    from below the minimum to beyond the maximum; ``binCount``: ``numpy.histogram``'s equal bins over
    the range), but it finds them with Python's ``min``/``max``, which iterate element by element
    (milliseconds for a whole patch, once per feature class). Same edges, computed in C.
    """
    from radiomics import imageoperations

    v = np.asarray(values)
    return imageoperations.getBinEdges(np.array([v.min(), v.max()]), **settings)


def _apply_binning(self: Any, matrix: np.ndarray) -> np.ndarray:
    """``RadiomicsFeaturesBase._applyBinning`` (pyradiomics' ``binImage`` inside the mask) with the
    bin edges from :func:`_bin_edges`; the discretised image and coefficients are the same."""
    mask = self.maskArray
    vals = matrix[mask]
    out = np.zeros(matrix.shape, dtype="int")
    out[mask] = np.digitize(vals, _bin_edges(vals, self.settings))
    self.coefficients["grayLevels"] = np.unique(out[mask])
    self.coefficients["Ng"] = int(np.max(self.coefficients["grayLevels"]))
    return out


@lru_cache(maxsize=1)
def _feature_classes() -> dict[str, type]:
    """pyradiomics' feature classes, subclassed to drop two pure overheads; the features are theirs.

    * ``getFeatureNames``: pyradiomics enumerates a class's features with ``inspect.getmembers`` on
      every instantiation (a quarter of the per-nucleus cost); the list never changes, so it is
      computed once;
    * ``_applyBinning``: see :func:`_bin_edges`.
    """
    out: dict[str, type] = {}
    for name, cls in _radiomics().getFeatureClasses().items():
        cached = cls.getFeatureNames()
        members = {
            "getFeatureNames": classmethod(lambda c, _n=cached: dict(_n)),
            "_applyBinning": _apply_binning,
        }
        sub = type(cls.__name__, (cls,), members)
        sub.__module__ = cls.__module__  # keeps the logger name (radiomics.<class>)
        out[name] = sub
    return out


def _run_class(
    cls_name: str, image: Any, mask: Any, settings: Mapping[str, Any], names: Sequence[str] | None
) -> dict:
    fc = _feature_classes()[cls_name](image, mask, **settings)
    if names is None:
        fc.enableAllFeatures()
    else:
        for nm in names:
            fc.enableFeatureByName(nm)
    return {k: float(v) for k, v in fc.execute().items()}


# ------------------------------------------------------------------------------------------------
# nuclei
# ------------------------------------------------------------------------------------------------


def find_nuclei(
    labels: np.ndarray, min_area_px: int
) -> tuple[np.ndarray, list[tuple[slice, slice]], np.ndarray, np.ndarray]:
    """Label ids, bounding boxes, areas (px) and centroids ``(y, x)`` of the usable nuclei.

    A nucleus is usable when it has at least ``min_area_px`` pixels and its bounding box is at
    least 2 x 2 (pyradiomics refuses 1-pixel-thin ROIs). Sorted by label id.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    if lab.size == 0 or int(lab.max()) == 0:
        return np.zeros(0, np.int64), [], np.zeros(0, np.int64), np.zeros((0, 2))
    ids_present = None
    if int(lab.max()) > 2**22:  # find_objects allocates one entry per id up to the largest
        ids_present, inverse = np.unique(lab, return_inverse=True)
        lab = inverse.reshape(lab.shape).astype(np.int64)
    slices = ndi.find_objects(lab)
    ids, keep, areas, cents = [], [], [], []
    for i, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if h < 2 or w < 2:
            continue
        m = lab[sl] == i
        area = int(np.count_nonzero(m))
        if area < min_area_px:
            continue
        yy, xx = np.nonzero(m)
        ids.append(int(ids_present[i]) if ids_present is not None else i)
        keep.append(sl)
        areas.append(area)
        cents.append((yy.mean() + sl[0].start, xx.mean() + sl[1].start))
    return (
        np.asarray(ids, dtype=np.int64),
        keep,
        np.asarray(areas, dtype=np.int64),
        np.asarray(cents, dtype=np.float64).reshape(-1, 2),
    )


def _cells_block(
    images: list[tuple[str, np.ndarray]],
    labels: np.ndarray,
    ids: np.ndarray,
    slices: Sequence[tuple[slice, slice]],
    config: RadiomicsConfig,
    spacing: float,
) -> dict[str, np.ndarray]:
    """The per-cell feature columns (pyradiomics names) for the nuclei ``ids`` / ``slices``."""
    import SimpleITK as sitk

    _radiomics()
    settings = config.pyradiomics_settings()
    classes = config.cell_classes
    textures = [c for c in classes if c not in ("shape2D", "firstorder")]
    n = len(ids)
    cols: dict[str, np.ndarray] = {}
    if "shape2D" in classes:
        shape_names = feature_names("shape2D")
        for nm in shape_names:
            cols[f"original_shape2D_{nm}"] = np.empty(n)
    fo_values: dict[str, list[np.ndarray]] = {name: [] for name, _ in images}
    tex_rows: list[dict[str, float]] = []
    for k, (lab, sl) in enumerate(zip(ids, slices, strict=True)):
        m = labels[sl] == lab
        mask_img = sitk.GetImageFromArray(m.astype(np.uint32))
        if spacing != 1.0:
            mask_img.SetSpacing((spacing, spacing))
        if "shape2D" in classes:
            vals = _run_class("shape2D", mask_img, mask_img, settings, None)
            for nm in shape_names:
                cols[f"original_shape2D_{nm}"][k] = vals[nm]
        if "firstorder" in classes:
            for name, arr in images:
                fo_values[name].append(arr[sl][m])
        if textures:
            row: dict[str, float] = {}
            for name, arr in images:
                img = _sitk_image(np.ascontiguousarray(arr[sl]), spacing)
                for cls_name in textures:
                    for feat, v in _run_class(cls_name, img, mask_img, settings, None).items():
                        row[f"{name}_{cls_name}_{feat}"] = v
            tex_rows.append(row)
    if "firstorder" in classes:
        fo_names = feature_names("firstorder")
        for name, _ in images:
            res = batch_firstorder(fo_values[name], fo_names, settings, (spacing, spacing))
            for nm in fo_names:
                cols[f"{name}_firstorder_{nm}"] = res[nm]
    if textures:
        keys = [f"{name}_{c}_{f}" for name, _ in images for c in textures for f in feature_names(c)]
        for key in keys:
            cols[key] = np.array([r.get(key, np.nan) for r in tex_rows], dtype=np.float64)
    return cols


def cell_feature_columns(config: RadiomicsConfig) -> list[str]:
    """Column names of :func:`cell_features` for ``config`` (after centroid and area)."""
    cols: list[str] = []
    if "shape2D" in config.cell_classes:
        cols += [f"original_shape2D_{f}" for f in feature_names("shape2D")]
    for name in image_type_names(config):
        for c in config.cell_classes:
            if c != "shape2D":
                cols += [f"{name}_{c}_{f}" for f in feature_names(c)]
    return cols


def cell_features(
    region_rgb: Any,
    labels: Any,
    config: RadiomicsConfig | Mapping[str, Any] | None = None,
    *,
    mpp: float | None = None,
    n_jobs: int = 1,
) -> pd.DataFrame:
    """pyradiomics features of every nucleus of a labelled region.

    Parameters
    ----------
    region_rgb
        ``(h, w, 3)`` RGB uint8 (grey, RGBA, other integer or [0, 1] float images are converted;
        see :func:`as_rgb_uint8`).
    labels
        ``(h, w)`` integer label image, 0 = background, one id per nucleus.
    config
        :class:`RadiomicsConfig` (default settings if None).
    mpp
        Microns per pixel of the region. Given: pyradiomics sees that pixel spacing, so lengths are
        in um, areas in um^2 (and TotalEnergy scales with it). None: unit spacing (pixels).
    n_jobs
        Worker processes for large regions (from 2000 nuclei on; smaller ones run in this process).

    Returns
    -------
    pandas.DataFrame
        Indexed by label id (``label``), sorted; columns ``centroid_y``, ``centroid_x`` (px in the
        region), ``area`` (px), then pyradiomics' feature names as the extractor would write them
        (``original_shape2D_MeshSurface``, ``original_firstorder_Mean``, ...). Nuclei with fewer than
        ``config.min_nucleus_area_px`` pixels or a 1-pixel-thin bounding box are left out (their
        ids are in ``df.attrs["skipped_labels"]``). ``df.attrs["radiomics_config"]`` holds the
        settings, ``df.attrs["spacing"]`` the pixel spacing used.

    Raises
    ------
    ImportError
        pyradiomics is not installed (the message says how to install it).
    RapaclInputError
        Bad image, labels, config or mpp.
    """
    config = check_config(config)
    _radiomics()
    rgb = as_rgb_uint8(region_rgb, "region_rgb")
    lab = check_labels(labels, rgb.shape[:2])
    spacing = 1.0 if mpp is None else _positive(mpp, "mpp")
    n_jobs = _check_jobs(n_jobs)
    ids, slices, areas, cents = find_nuclei(lab, config.min_nucleus_area_px)
    images = derived_images(to_grey(rgb, config.grey), config, spacing)
    columns = cell_feature_columns(config)
    if n_jobs > 1 and len(ids) >= _PARALLEL_MIN_NUCLEI:
        cols = _cells_parallel(images, lab, ids, slices, config, spacing, n_jobs)
    else:
        cols = _cells_block(images, lab, ids, slices, config, spacing)
    df = pd.DataFrame(
        {
            "centroid_y": cents[:, 0],
            "centroid_x": cents[:, 1],
            "area": areas,
            **{c: cols[c] for c in columns},
        },
        index=pd.Index(ids, name="label"),
    )
    present = np.unique(lab)
    present = present[present != 0]
    df.attrs["skipped_labels"] = [int(v) for v in np.setdiff1d(present, ids)]
    df.attrs["radiomics_config"] = config.to_dict()
    df.attrs["spacing"] = spacing
    df.attrs["units"] = "px" if mpp is None else "um"
    return df


def _positive(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RapaclInputError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise RapaclInputError(f"{name}={value!r} must be a finite number > 0")
    return v


def _check_jobs(n_jobs: Any) -> int:
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise RapaclInputError(f"n_jobs={n_jobs!r} must be a positive integer")
    return int(n_jobs)


def _cells_chunk_worker(
    images: list[tuple[str, np.ndarray]],
    labels: np.ndarray,
    ids: np.ndarray,
    slices: list[tuple[slice, slice]],
    config_dict: dict,
    spacing: float,
) -> dict[str, np.ndarray]:
    return _cells_block(images, labels, ids, slices, RadiomicsConfig.from_dict(config_dict), spacing)


def _cells_parallel(
    images: list[tuple[str, np.ndarray]],
    labels: np.ndarray,
    ids: np.ndarray,
    slices: list[tuple[slice, slice]],
    config: RadiomicsConfig,
    spacing: float,
    n_jobs: int,
) -> dict[str, np.ndarray]:
    """Split the nuclei into row bands and compute them in worker processes."""
    from ._pool import get_pool

    order = np.argsort([sl[0].start for sl in slices], kind="stable")
    n_chunks = min(len(ids), n_jobs * 4)
    parts = np.array_split(order, n_chunks)
    pool = get_pool(n_jobs)
    futures = []
    for part in parts:
        y0 = min(slices[i][0].start for i in part)
        y1 = max(slices[i][0].stop for i in part)
        band_slices = [(slice(slices[i][0].start - y0, slices[i][0].stop - y0), slices[i][1]) for i in part]
        band_images = [(name, np.ascontiguousarray(arr[y0:y1])) for name, arr in images]
        futures.append(
            pool.submit(
                _cells_chunk_worker,
                band_images,
                np.ascontiguousarray(labels[y0:y1]),
                ids[part],
                band_slices,
                config.to_dict(),
                spacing,
            )
        )
    out: dict[str, np.ndarray] = {}
    for part, fut in zip(parts, futures, strict=True):
        res = fut.result()
        for key, vals in res.items():
            if key not in out:
                out[key] = np.empty(len(ids))
            out[key][part] = vals
    return out


# ------------------------------------------------------------------------------------------------
# per spot / patch
# ------------------------------------------------------------------------------------------------


def _parse_names(names: Sequence[str]) -> tuple[dict, dict, list[tuple[str, str, str]]]:
    """Split feature names into union-mask, patch and morph requests.

    Returns ``({image_type: {class: [features]}}`` for ``cellseg_all_*``, the same for
    ``patch_*``, and ``[(column, shape2D feature, stat)]`` for ``morph_*``).
    """
    shape_lookup = {s.lower(): s for s in SHAPE2D_FEATURES}
    union: dict[str, dict[str, list[str]]] = {}
    patch: dict[str, dict[str, list[str]]] = {}
    morph: list[tuple[str, str, str]] = []
    for col in names:
        if col.startswith("morph_"):
            _, shape, stat = col.split("_", 2)
            if shape not in shape_lookup or stat not in MORPH_STATS:
                raise RapaclInputError(f"unknown morph feature {col!r}")
            morph.append((col, shape_lookup[shape], stat))
            continue
        if col.startswith("cellseg_all_"):
            target, rest = union, col[len("cellseg_all_") :]
        elif col.startswith("patch_"):
            target, rest = patch, col[len("patch_") :]
        else:
            raise RapaclInputError(f"feature {col!r} is neither cellseg_all_*, patch_* nor morph_*")
        image_type, cls_name, feat = rest.rsplit("_", 2)
        target.setdefault(image_type, {}).setdefault(cls_name, []).append(feat)
    return union, patch, morph


def spot_feature_names(
    config: RadiomicsConfig | Mapping[str, Any] | None = None, feature_set: str = "rapacl72"
) -> list[str]:
    """The feature columns of :func:`spot_features` (without ``n_nuclei`` / ``cell_label``).

    ``rapacl72``: :func:`rapacl72_names`. ``full``: for every configured image type and every
    class of ``config.spot_classes``, all pyradiomics features inside the union of nuclei
    (``cellseg_all_<image>_<class>_<feature>``) and of the whole patch (``patch_...``), then every
    shape2D feature with every statistic of ``MORPH_STATS`` (``morph_<shape>_<stat>``).
    """
    config = check_config(config)
    if feature_set == "rapacl72":
        return list(rapacl72_names())
    if feature_set != "full":
        raise RapaclInputError(f"feature_set={feature_set!r}; choose one of {FEATURE_SETS}")
    names: list[str] = []
    image_names = image_type_names(config)
    for prefix in ("cellseg_all", "patch"):
        for image in image_names:
            for cls_name in config.spot_classes:
                names += [f"{prefix}_{image}_{cls_name}_{f}" for f in feature_names(cls_name)]
    for shape in SHAPE2D_FEATURES:
        names += [f"morph_{shape.lower()}_{stat}" for stat in MORPH_STATS]
    return names


def _roi_features(
    images: list[tuple[str, np.ndarray]],
    mask: np.ndarray,
    request: Mapping[str, Mapping[str, list[str]]],
    settings: Mapping[str, Any],
    prefix: str,
) -> dict[str, float]:
    """pyradiomics features of one ROI, cropped to its bounding box as the extractor crops it."""
    import SimpleITK as sitk

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    mask_img = sitk.GetImageFromArray(mask[sl].astype(np.uint32))
    out: dict[str, float] = {}
    for name, arr in images:
        wanted = request.get(name)
        if not wanted:
            continue
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr[sl]))
        for cls_name, feats in wanted.items():
            try:
                vals = _run_class(cls_name, img, mask_img, settings, feats)
            except Exception as exc:  # pyradiomics refuses some degenerate ROIs: use the defaults
                logging.getLogger(__name__).debug("%s %s %s failed: %s", prefix, name, cls_name, exc)
                vals = {}
            for f in feats:
                out[f"{prefix}_{name}_{cls_name}_{f}"] = vals.get(f, np.nan)
    return out


def morph_stats(
    shape_values: Mapping[str, np.ndarray], requests: Sequence[tuple[str, str, str]], bin_count: int
) -> dict[str, float]:
    """Statistics of per-nucleus shape features over the nuclei of a patch.

    Every statistic is pyradiomics' first-order feature of the same name computed on the list of
    per-nucleus values (``energy`` = sum of squares, ``standarddeviation`` / ``variance`` /
    ``skewness`` / ``kurtosis`` = population moments, 0 for a single nucleus,
    ``meanabsolutedeviation``, ``minimum``, ``maximum``, ``range``, ...), with ``p25`` / ``p75`` from
    ``numpy.nanpercentile`` (pyradiomics' percentile function). ``entropy`` and ``uniformity`` use
    pyradiomics' ``binCount`` discretisation: ``bin_count`` equal-width bins between the smallest and
    largest value in the patch; entropy = -sum p log2(p + eps). With no nuclei every statistic is 0.
    """
    out: dict[str, float] = {}
    by_shape: dict[str, list[tuple[str, str]]] = {}
    for col, shape, stat in requests:
        by_shape.setdefault(shape, []).append((col, stat))
    for shape, items in by_shape.items():
        vals = np.asarray(shape_values.get(shape, np.zeros(0)), dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            for col, _ in items:
                out[col] = 0.0
            continue
        feats = sorted({_STAT_GETTERS.get(stat, stat) for _, stat in items})
        res = batch_firstorder([vals], feats, {"binCount": int(bin_count), "voxelArrayShift": 0})
        for col, stat in items:
            out[col] = float(res[_STAT_GETTERS.get(stat, stat)][0])
    return out


def spot_features(
    patch_rgb: Any,
    labels: Any,
    config: RadiomicsConfig | Mapping[str, Any] | None = None,
    feature_set: str = "rapacl72",
    *,
    mpp: float | None = None,
) -> pd.Series:
    """The per-spot radiomics of one patch and its nucleus labels.

    Three families (methods.md 1.3), all with unit pixel spacing (so values are in pixels of the
    patch; patches of a fixed um/px keep them physical):

    * ``cellseg_all_<image>_<class>_<feature>``: pyradiomics inside the union of all usable nuclei;
    * ``patch_<image>_<class>_<feature>``: pyradiomics over the whole patch;
    * ``morph_<shape>_<stat>``: per-nucleus shape2D features summarised over the patch's nuclei
      (:func:`morph_stats`).

    Parameters
    ----------
    patch_rgb, labels
        The patch (RGB uint8 or convertible, see :func:`as_rgb_uint8`) and its label image.
    config
        :class:`RadiomicsConfig`.
    feature_set
        ``"rapacl72"`` (the 72 names of :func:`rapacl72_names`, in order) or ``"full"``
        (:func:`spot_feature_names`).
    mpp
        Microns per pixel of the patch. Needed only for the ``cell_label`` (composition rule).

    Returns
    -------
    pandas.Series
        The features (float64, NaN-free), then ``n_nuclei`` (usable nuclei), then ``cell_label``
        when ``mpp`` is given. Defaults: with no usable nucleus every ``cellseg_all_*`` and
        ``morph_*`` value is 0; any value pyradiomics cannot compute (a degenerate ROI, NaN or inf)
        is 0; ``n_nuclei`` lets a model tell these apart. ``attrs["radiomics_config"]`` holds
        the settings.
    """
    config = check_config(config)
    _radiomics()
    rgb = as_rgb_uint8(patch_rgb, "patch_rgb")
    lab = check_labels(labels, rgb.shape[:2])
    if mpp is not None:
        mpp = _positive(mpp, "mpp")
    names = spot_feature_names(config, feature_set)
    union_req, patch_req, morph_req = _parse_names(names)
    settings = config.pyradiomics_settings()
    ids, slices, areas, _ = find_nuclei(lab, config.min_nucleus_area_px)
    images = derived_images(to_grey(rgb, config.grey), config, 1.0)
    values: dict[str, float] = {}
    values.update(_roi_features(images, np.ones(lab.shape, dtype=bool), patch_req, settings, "patch"))
    shape_cols: dict[str, np.ndarray] = {}
    if len(ids):
        union = np.isin(lab, ids)
        values.update(_roi_features(images, union, union_req, settings, "cellseg_all"))
        shape_cfg = dataclasses.replace(config, cell_classes=("shape2D",))
        cols = _cells_block(images[:1], lab, ids, slices, shape_cfg, 1.0)
        shape_cols = {s: cols[f"original_shape2D_{s}"] for s in SHAPE2D_FEATURES}
    values.update(morph_stats(shape_cols, morph_req, config.morph_bin_count))
    data = np.array([values.get(c, 0.0) for c in names], dtype=np.float64)
    data[~np.isfinite(data)] = 0.0
    series = pd.Series(data, index=pd.Index(names), dtype=np.float64)
    series["n_nuclei"] = float(len(ids))
    if mpp is not None:
        label = composition_from_morphology(
            areas * mpp * mpp,
            shape_cols.get("Elongation", np.zeros(0)),
            lab.shape[0] * lab.shape[1] * mpp * mpp,
            config.composition,
        )
        series["cell_label"] = float(label)
    series.attrs["radiomics_config"] = config.to_dict()
    series.attrs["feature_set"] = feature_set
    return series


# ------------------------------------------------------------------------------------------------
# composition label
# ------------------------------------------------------------------------------------------------


def nucleus_types(
    area_um2: np.ndarray, elongation: np.ndarray, rule: CompositionRule | None = None
) -> np.ndarray:
    """Per-nucleus morphological type: 1 inflammatory-like, 2 neoplastic-like, 3 stromal-like, 0 other.

    See :class:`CompositionRule` for the thresholds and why.
    """
    rule = rule or CompositionRule()
    area = np.asarray(area_um2, dtype=np.float64)
    elong = np.asarray(elongation, dtype=np.float64)
    if area.shape != elong.shape:
        raise RapaclInputError(f"area_um2 has shape {area.shape} but elongation {elong.shape}")
    types = np.zeros(area.shape, dtype=np.int64)
    spindle = elong < rule.spindle_elongation
    types[spindle] = 3
    types[~spindle & (area >= rule.large_area_um2)] = 2
    types[(elong >= rule.round_elongation) & (area < rule.small_area_um2)] = 1
    return types


def composition_from_morphology(
    area_um2: np.ndarray,
    elongation: np.ndarray,
    patch_area_um2: float,
    rule: CompositionRule | None = None,
) -> int:
    """The cell-composition class of a patch from its nuclei (see :class:`CompositionRule`).

    ``0`` sparse (nucleus density below ``rule.sparse_per_mm2``), else the per-nucleus type
    (:func:`nucleus_types`: 1 inflammatory-like, 2 neoplastic-like, 3 stromal-like) that is strictly
    the most frequent and holds at least ``rule.min_share`` of all the nuclei, else ``4`` mixed.
    """
    rule = rule or CompositionRule()
    area = np.asarray(area_um2, dtype=np.float64).ravel()
    n = area.size
    density = n / (float(patch_area_um2) * 1e-6) if patch_area_um2 > 0 else 0.0
    if n == 0 or density < rule.sparse_per_mm2:
        return 0
    types = nucleus_types(area, np.asarray(elongation, dtype=np.float64).ravel(), rule)
    counts = np.bincount(types, minlength=4)[1:4]
    best = int(np.argmax(counts))
    if counts[best] >= rule.min_share * n and np.count_nonzero(counts == counts[best]) == 1:
        return best + 1
    return 4


__all__ = [
    "COMPOSITION_CLASSES",
    "FEATURE_SETS",
    "as_rgb_uint8",
    "batch_firstorder",
    "cell_features",
    "check_labels",
    "composition_from_morphology",
    "derived_images",
    "find_nuclei",
    "morph_stats",
    "nucleus_types",
    "spot_feature_names",
    "spot_features",
    "to_grey",
]
