"""Per-cell and per-spot radiomics with pyradiomics: the computing core.

The feature values are pyradiomics' own (its feature classes and ``get*FeatureValue`` methods,
with the extractor's settings); tests compare them with ``RadiomicsFeatureExtractor.execute`` and
pyradiomics' classes to rtol 1e-6 per cell and 1e-9 per spot (in practice they are bit-identical).
The speed comes from how pyradiomics is called:

* each ROI (a nucleus, the union of nuclei, the whole patch) is cropped to its bounding box -- the
  extractor does the same crop (``cropToTumorMask``, no padding) after checking the whole image, so
  the feature classes see identical arrays;
* no SimpleITK image is made: the texture classes are pyradiomics' own, fed the arrays a SimpleITK
  round trip would give (:func:`_array_classes`), and one ROI is discretised once for all its
  classes (:class:`_BinnedRoi`; pyradiomics bins each class's copy identically), its bin edges found
  from the (min, max) pair instead of Python's element-wise ``min``/``max`` (:func:`_bin_edges`);
* the GLRLM, GLSZM, GLDM and NGTDM matrices of 2-D ROIs are computed with numpy / scikit-image by
  drop-ins for pyradiomics' C functions, called from pyradiomics' own ``_calculateMatrix``
  (:class:`_NumpyMatrices`; same arrays bit for bit, tested against the C code); the C code walks
  the image voxel by voxel, numpy does one array operation per neighbour offset;
* shape2D runs per nucleus as pyradiomics' initialisation does (its C ``cShape`` on the padded mask,
  its covariance arithmetic, its getters) without a class or SimpleITK set-up per nucleus
  (:func:`shape2d_features`);
* first-order statistics of many ROIs come from **one** ``RadiomicsFirstOrder`` object whose
  arrays hold one row per ROI (NaN-padded, the layout of pyradiomics' voxel-based mode); its
  getters reduce along rows; order statistics (percentiles, median) are evaluated on sorted rows
  with numpy's exact arithmetic (:func:`row_percentiles`) instead of numpy's per-row Python loop;
  the per-spot shape statistics (``morph_*``) of all shapes share one such object;
* feature-name lists are cached (pyradiomics runs ``inspect.getmembers`` per object);
* derived images (wavelet, LoG, ...) are computed once per region, not once per nucleus (the
  extractor filters the whole image it is given, so the values are the same); the Original image
  is the grey image itself (pyradiomics' ``getOriginalImage`` yields its input).
"""

from __future__ import annotations

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
    TEXTURE_CLASSES,
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
    grey = np.asarray(grey, dtype=np.float64)
    if dict(config.image_types) == {"Original": {}}:  # pyradiomics' getOriginalImage yields its input
        return [("original", grey)]
    import SimpleITK as sitk

    _radiomics()
    from radiomics import imageoperations

    image = _sitk_image(grey, spacing)
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
            self._sorted_rows: tuple[np.ndarray, np.ndarray] | None = None
            self._pct: dict[float, np.ndarray] = {}

        def _initCalculation(self, voxelCoordinates: Any = None) -> None:
            pass

        def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
            """Rows sorted (NaNs last) and their non-NaN counts; only order statistics need them."""
            if self._sorted_rows is None:
                target = self.targetVoxelArray
                self._sorted_rows = (np.sort(target, axis=1), np.count_nonzero(~np.isnan(target), axis=1))
            return self._sorted_rows

        def percentile(self, q: float) -> np.ndarray:
            if q not in self._pct:
                self._pct[q] = row_percentiles(*self._sorted(), q)
            return self._pct[q]

        def get10PercentileFeatureValue(self) -> np.ndarray:
            return self.percentile(10)

        def get90PercentileFeatureValue(self) -> np.ndarray:
            return self.percentile(90)

        def getInterquartileRangeFeatureValue(self) -> np.ndarray:
            return self.percentile(75) - self.percentile(25)

        def getMedianFeatureValue(self) -> np.ndarray:
            return row_medians(*self._sorted())

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
    settings = dict(settings)
    for start in range(0, n, _FIRSTORDER_CHUNK):
        chunk = [np.asarray(v, dtype=np.float64).ravel() for v in values[start : start + _FIRSTORDER_CHUNK]]
        counts = [np.unique(np.digitize(v, _bin_edges(v, settings)), return_counts=True)[1] for v in chunk]
        res = _firstorder_rows(chunk, counts, features, settings, spacing)
        for f in features:
            out[f][start : start + len(chunk)] = res[f]
    return out


def _firstorder_rows(
    chunk: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    features: Sequence[str],
    settings: Mapping[str, Any],
    spacing: Sequence[float],
) -> dict[str, np.ndarray]:
    """:func:`batch_firstorder` of ROIs whose discretised histograms are known.

    ``chunk[i]`` are the grey values of ROI i, ``counts[i]`` the number of its values in each
    occupied bin (ascending bin order, zero bins left out: ``numpy.unique(digitized,
    return_counts=True)[1]``, what pyradiomics' first order computes ``p_i`` from).
    """
    cls = _batch_firstorder_class()
    n = len(chunk)
    width = max(len(v) for v in chunk)
    if n == 1:
        target = np.asarray(chunk[0], dtype=np.float64).reshape(1, -1)
    else:
        target = np.full((n, width), np.nan)
        for i, v in enumerate(chunk):
            target[i, : len(v)] = v
    p_i = np.zeros((n, max(len(c) for c in counts)))
    for i, c in enumerate(counts):
        p_i[i, : len(c)] = c
    p_i /= p_i.sum(axis=1, keepdims=True)
    obj = cls(target, p_i, tuple(spacing), dict(settings))
    out: dict[str, np.ndarray] = {}
    for f in features:
        if f in _STAT_PERCENTILES:
            val = obj.percentile(_STAT_PERCENTILES[f])
        else:
            val = getattr(obj, f"get{f}FeatureValue")()
        out[f] = np.broadcast_to(np.asarray(val, dtype=np.float64), (n,))
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


class _BinnedRoi:
    """One ROI of one image, discretised once for every feature class that reads it.

    ``binned`` is pyradiomics' ``binImage`` of ``image`` inside ``mask`` (bins 1..Ng inside, 0
    outside; bytes when Ng < 256, else int32; the values are what matters, pyradiomics' C matrices
    read them as int32), ``gray_levels`` the occupied bins (``numpy.unique`` of the ROI's bins),
    ``counts`` the number of pixels in each occupied bin (first order's histogram), ``values`` the
    grey values inside the mask. Also stands in for the SimpleITK image pyradiomics' classes keep
    (only ``GetSpacing`` is read, for weighting norms).
    """

    __slots__ = ("binned", "counts", "gray_levels", "image", "mask", "ng", "spacing", "values")

    def __init__(
        self, image: np.ndarray, mask: np.ndarray | None, settings: Mapping[str, Any], spacing: float = 1.0
    ):
        image = np.ascontiguousarray(image, dtype=np.float64)
        if mask is None:
            mask = np.ones(image.shape, dtype=bool)
            values = image.ravel()
        else:
            mask = np.ascontiguousarray(mask, dtype=bool)
            values = image[mask]
        bins = np.digitize(values, _bin_edges(values, settings))
        hist = np.bincount(bins)
        self.gray_levels = np.flatnonzero(hist)
        self.counts = hist[self.gray_levels]
        self.ng = int(self.gray_levels[-1])
        binned = np.zeros(image.shape, dtype=np.uint8 if self.ng < 2**8 else np.int32)
        binned[mask] = bins
        binned.flags.writeable = False  # shared by the feature classes, which only read it
        mask.flags.writeable = False
        self.image, self.mask, self.binned, self.values = image, mask, binned, values
        self.spacing = float(spacing)

    def GetSpacing(self) -> tuple[float, float]:  # noqa: N802 (SimpleITK's name)
        return (self.spacing, self.spacing)


# ------------------------------------------------------------------------------------------------
# texture matrices in numpy (drop-in for three of pyradiomics' C functions on 2-D ROIs)
# ------------------------------------------------------------------------------------------------


class _NumpyMatrices:
    """pyradiomics' ``_cmatrices`` module with ``calculate_glszm``, ``calculate_gldm`` and
    ``calculate_ngtdm`` computed with numpy / scikit-image for 2-D, segment-based calls.

    Same arguments, same arrays out (same shapes, dtypes and values: counts are integers, and the
    NGTDM's sums of absolute differences are accumulated per grey level in the C code's raster
    order, so they are bit-identical; tests compare them with the C functions). The neighbour
    offsets are pyradiomics' own (``generate_angles``). Any other call -- 3-D arrays, ``force2D``,
    voxel-based kernels, an empty mask, grey levels outside ``1..Ng`` inside the mask (which the C
    code refuses) -- and every other function (GLCM, GLRLM, angles) goes to pyradiomics' C code.

    Why: on a whole 224 x 224 patch these three take most of a spot's time in C, which walks the
    image voxel by voxel with index arithmetic per neighbour; numpy does each neighbour offset as
    one array operation and scikit-image labels all grey-level zones in one pass.
    """

    def __init__(self, c_module: Any):
        self._c = c_module
        self._last: tuple = (None, None, None, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    def _inputs(self, image: Any, mask: Any, Ng: int, force2D: Any, extra: tuple) -> Any:  # noqa: N803
        """``(levels with 0 outside the ROI, mask, levels inside)``, or None where C must run.

        The classes of one ROI pass the same read-only arrays (:class:`_BinnedRoi`): the last
        answer is kept for them.
        """
        if extra or force2D:
            return None
        last_image, last_mask, last_ng, parsed = self._last
        if image is last_image and mask is last_mask and Ng == last_ng:
            return parsed
        parsed = self._parse(image, mask, Ng)
        if all(isinstance(a, np.ndarray) and not a.flags.writeable for a in (image, mask)):
            self._last = (image, mask, Ng, parsed)
        return parsed

    @staticmethod
    def _parse(image: Any, mask: Any, Ng: int) -> Any:  # noqa: N803
        image = np.asarray(image)
        mask = np.asarray(mask, dtype=bool)
        if image.ndim != 2 or mask.shape != image.shape or image.dtype.kind not in "iu":
            return None
        if not mask.any():  # the C code's answer (GLSZM refuses an empty ROI)
            return None
        inside = image[mask]
        if int(inside.min()) < 1 or int(inside.max()) > Ng:
            return None
        # the smallest type that holds the levels: the neighbour comparisons run on bytes
        dtype = np.uint8 if Ng < 2**8 else np.uint16 if Ng < 2**16 else np.int64
        levels = np.where(mask, image, 0).astype(dtype, copy=False)
        inside = inside.astype(dtype, copy=False)
        for a in (levels, mask, inside):  # shared by the calls of one ROI, which only read them
            a.flags.writeable = False
        return levels, mask, inside

    def _offsets(self, shape: tuple[int, ...], distances: Any, bidirectional: bool = True) -> np.ndarray:
        # pyradiomics' neighbour offsets for this size (raises its error for a 1 x 1 image)
        return self._c.generate_angles(np.array(shape), np.asarray(distances), bidirectional, False, 0)

    @staticmethod
    def _shifted(padded: np.ndarray, pad: int, shape: tuple[int, ...], dy: int, dx: int) -> np.ndarray:
        """``a[y + dy, x + dx]`` for every ``(y, x)`` of the unpadded array (0 beyond its edges)."""
        return padded[pad + dy : pad + dy + shape[0], pad + dx : pad + dx + shape[1]]

    def calculate_glszm(self, image, mask, Ng, Ns, force2D, force2Ddimension, *extra):  # noqa: N803
        """Zones: 8-connected groups of pixels of one grey level (``skimage.measure.label``)."""
        parsed = self._inputs(image, mask, Ng, force2D, extra)
        if parsed is None:
            return self._c.calculate_glszm(image, mask, Ng, Ns, force2D, force2Ddimension, *extra)
        from skimage.measure import label

        levels = parsed[0]
        self._offsets(levels.shape, [1])
        zones, n = label(levels, background=0, connectivity=2, return_num=True)
        flat = zones.ravel()
        sizes = np.bincount(flat, minlength=n + 1)[1:]
        zone_level = np.zeros(n + 1, dtype=np.intp)
        zone_level[flat] = levels.ravel()
        max_region = max(int(sizes.max()) if n else 0, 1)
        counts = np.bincount((zone_level[1:] - 1) * max_region + sizes - 1, minlength=Ng * max_region)
        return counts.astype(np.float64).reshape(1, Ng, max_region)

    def calculate_gldm(self, image, mask, distances, Ng, alpha, force2D, force2Ddimension, *extra):  # noqa: N803
        """Dependence: neighbours in the ROI whose grey level differs by at most ``alpha``."""
        parsed = self._inputs(image, mask, Ng, force2D, extra)
        if parsed is None or isinstance(alpha, float):
            args = (image, mask, distances, Ng, alpha, force2D, force2Ddimension, *extra)
            return self._c.calculate_gldm(*args)
        levels, mask, inside = parsed
        offsets = self._offsets(levels.shape, distances)
        pad = int(np.abs(offsets).max())
        padded = np.pad(levels, pad)
        dependence = np.zeros(levels.shape, dtype=np.uint8 if len(offsets) < 256 else np.intp)
        for dy, dx in offsets:
            nb = self._shifted(padded, pad, levels.shape, dy, dx)
            if alpha == 0:  # a neighbour outside the ROI is 0, never equal to a level >= 1
                dependence += nb == levels
            else:
                dependence += (nb > 0) & (np.abs(nb.astype(np.int64) - levels) <= alpha)
        width = 2 * len(offsets) + 1
        index = (inside.astype(np.intp) - 1) * width + dependence[mask]
        return np.bincount(index, minlength=Ng * width).astype(np.float64).reshape(1, Ng, width)

    def calculate_ngtdm(self, image, mask, distances, Ng, force2D, force2Ddimension, *extra):  # noqa: N803
        """Per grey level: pixel count and sum of |level - mean level of its neighbours in the ROI|."""
        parsed = self._inputs(image, mask, Ng, force2D, extra)
        if parsed is None:
            return self._c.calculate_ngtdm(image, mask, distances, Ng, force2D, force2Ddimension, *extra)
        levels, mask, inside = parsed
        offsets = self._offsets(levels.shape, distances)
        pad = int(np.abs(offsets).max())
        padded = np.pad(levels, pad)
        padded_mask = np.pad(mask, pad)
        count = np.zeros(levels.shape, dtype=np.uint8 if len(offsets) < 256 else np.intp)
        total = np.zeros(levels.shape, dtype=np.int32 if Ng * len(offsets) < 2**31 else np.int64)
        for dy, dx in offsets:  # sums of integers: exact, as the C code's double sums are
            count += self._shifted(padded_mask, pad, levels.shape, dy, dx)
            total += self._shifted(padded, pad, levels.shape, dy, dx)
        n = count[mask].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            diff = np.abs(np.where(n > 0, inside - total[mask] / n, 0.0))
        index = inside.astype(np.intp) - 1
        out = np.empty((1, Ng, 3), dtype=np.float64)
        out[0, :, 0] = np.bincount(index, minlength=Ng)
        out[0, :, 1] = np.bincount(index, weights=diff, minlength=Ng)  # raster order, as the C loop
        out[0, :, 2] = np.arange(1, Ng + 1)
        return out

    def calculate_glrlm(self, image, mask, Ng, Nr, force2D, force2Ddimension, *extra):  # noqa: N803
        """Runs: maximal stretches of equal grey level inside the ROI along each of the 4 directions."""
        parsed = self._inputs(image, mask, Ng, force2D, extra)
        if parsed is None:
            return self._c.calculate_glrlm(image, mask, Ng, Nr, force2D, force2Ddimension, *extra)
        levels = parsed[0]
        angles = self._offsets(levels.shape, [1], bidirectional=False)
        h, w = levels.shape
        padded = np.zeros((h, w + 1), dtype=levels.dtype)  # a 0 after each row ends its runs
        padded[:, :w] = levels
        counts = np.zeros((len(angles), Ng * Nr), dtype=np.intp)
        for a, (dy, dx) in enumerate(angles):
            flat = _run_lines(padded, int(dy), int(dx))
            change = np.empty(flat.size, dtype=bool)
            change[0] = True
            np.not_equal(flat[1:], flat[:-1], out=change[1:])
            starts = np.flatnonzero(change)  # every stretch of one value, ROI or not
            lengths = np.diff(starts, append=flat.size)
            run_levels = flat[starts]
            keep = run_levels > 0
            run_levels, lengths = run_levels[keep], lengths[keep]
            if lengths.size and int(lengths.max()) > Nr:
                return self._c.calculate_glrlm(image, mask, Ng, Nr, force2D, force2Ddimension, *extra)
            if lengths.size and int(lengths.max()) == 1 and not _multi_element(levels, int(dy), int(dx)):
                continue  # pyradiomics drops an angle whose lines hold at most one ROI pixel each
            index = (run_levels.astype(np.intp) - 1) * Nr + lengths - 1
            counts[a] = np.bincount(index, minlength=Ng * Nr)
        matrix = counts.reshape(len(angles), Ng, Nr).transpose(1, 2, 0)
        return np.ascontiguousarray(matrix, dtype=np.float64)[None], angles


def _run_lines(padded: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """All lines of the image along ``(dy, dx)`` (one of pyradiomics' 4 2-D run directions), one
    after the other with a 0 between any two, from the image with a 0 column appended (``padded``).

    In ``padded.ravel()`` a step along ``(dy, dx)`` is a fixed stride (1, w + 1, w + 2 or w), and a
    line that leaves the image lands on a 0 of the appended column; so the columns of the flat
    array folded at that stride hold the lines, separated by zeros.
    """
    flat = padded.ravel()
    if dy == 0:
        return flat
    stride = padded.shape[1] + dx
    rows = -(-flat.size // stride) + 1  # and a row of zeros: no run continues into the next column
    folded = np.zeros(rows * stride, dtype=flat.dtype)
    folded[: flat.size] = flat
    return folded.reshape(rows, stride).T.ravel()


def _multi_element(levels: np.ndarray, dy: int, dx: int) -> bool:
    """Whether some line along ``(dy, dx)`` holds more than one ROI pixel (pyradiomics' C code
    keeps an angle only then)."""
    ys, xs = np.nonzero(levels)
    line = ys if dy == 0 else xs if dx == 0 else xs - ys if dx == dy else xs + ys
    return bool(np.bincount(line - line.min()).max() > 1) if line.size else False


#: texture class -> the method whose ``cMatrices`` calls go to :class:`_NumpyMatrices`
_NUMPY_MATRIX_CLASSES = ("glrlm", "glszm", "gldm", "ngtdm")


def _with_numpy_matrices(func: Any, matrices: _NumpyMatrices) -> Any:
    """pyradiomics' own ``_calculateMatrix`` function, its name ``cMatrices`` bound to ``matrices``."""
    import types

    scope = dict(func.__globals__)
    scope["cMatrices"] = matrices
    return types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)


@lru_cache(maxsize=1)
def _array_classes() -> dict[str, type]:
    """pyradiomics' texture classes, fed a :class:`_BinnedRoi` instead of SimpleITK images.

    Each class is pyradiomics' own (its ``__init__``, matrices in C, coefficients and
    ``get*FeatureValue`` methods). Only the two steps of its initialisation that read SimpleITK
    images and discretise them are replaced (``RadiomicsFeaturesBase.__init__``'s array reads and
    ``_applyBinning``): the arrays are those a SimpleITK round trip would give, and the discretised
    image is computed once per ROI (:class:`_BinnedRoi`) instead of once per class -- pyradiomics
    bins each class's copy of the ROI identically. The feature-name list is computed once
    (pyradiomics runs ``inspect.getmembers`` for every object).
    """
    radiomics = _radiomics()
    from radiomics import base

    class _ArrayInput(base.RadiomicsFeaturesBase):
        """``RadiomicsFeaturesBase.__init__`` (segment-based) on a :class:`_BinnedRoi`."""

        def __init__(self, inputImage: _BinnedRoi, inputMask: Any = None, **kwargs: Any):  # noqa: N803
            self.logger = logging.getLogger(self.__module__)
            self.progressReporter = radiomics.getProgressReporter
            self.settings = kwargs
            self.label = kwargs.get("label", 1)
            self.voxelBased = False
            self.coefficients = {}
            self.enabledFeatures = {}
            self.featureValues = {}
            self.featureNames = self.getFeatureNames()
            self.inputImage = inputImage
            self.inputMask = inputImage
            self.imageArray = inputImage.image
            self.maskArray = inputImage.mask

        def _applyBinning(self, matrix: np.ndarray) -> np.ndarray:  # noqa: N802 (pyradiomics' name)
            roi = self.inputImage
            self.coefficients["grayLevels"] = roi.gray_levels
            self.coefficients["Ng"] = roi.ng
            return roi.binned

    from radiomics import cMatrices

    matrices = _NumpyMatrices(cMatrices)
    out: dict[str, type] = {}
    for name, cls in radiomics.getFeatureClasses().items():
        if name not in TEXTURE_CLASSES:
            continue
        cached = cls.getFeatureNames()
        members = {
            "getFeatureNames": classmethod(lambda c, _n=cached: dict(_n)),
            "_applyBinning": _ArrayInput._applyBinning,
        }
        if name in _NUMPY_MATRIX_CLASSES:
            members["_calculateMatrix"] = _with_numpy_matrices(cls._calculateMatrix, matrices)
        # MRO: sub -> pyradiomics class -> _ArrayInput -> RadiomicsFeaturesBase, so the class's own
        # super().__init__ lands in _ArrayInput
        sub = type(cls.__name__, (cls, _ArrayInput), members)
        sub.__module__ = cls.__module__  # keeps the logger name (radiomics.<class>)
        out[name] = sub
    return out


def _roi_classes(
    roi: _BinnedRoi,
    request: Mapping[str, Sequence[str] | None],
    settings: Mapping[str, Any],
    errors: str = "default",
) -> dict[str, dict[str, float]]:
    """``{class: {feature: value}}`` of pyradiomics' classes on one discretised ROI.

    ``request`` maps a class (``firstorder`` or a texture class) to its feature names (None: all
    non-deprecated features). A class pyradiomics refuses for this ROI (an exception in its
    initialisation) gives ``{}`` with ``errors="default"`` and raises with ``errors="raise"``; a
    feature whose getter fails is NaN (pyradiomics' own rule).
    """
    out: dict[str, dict[str, float]] = {}
    classes = _array_classes()
    for cls_name, feats in request.items():
        try:
            if cls_name == "firstorder":
                names = list(feature_names("firstorder")) if feats is None else list(feats)
                res = _firstorder_rows([roi.values], [roi.counts], names, settings, roi.GetSpacing())
                out[cls_name] = {f: float(res[f][0]) for f in names}
                continue
            fc = classes[cls_name](roi, None, **settings)
            if feats is None:
                fc.enableAllFeatures()
            else:
                for nm in feats:
                    fc.enableFeatureByName(nm)
            out[cls_name] = {k: float(v) for k, v in fc.execute().items()}
        except Exception as exc:  # pyradiomics refuses some degenerate ROIs: use the defaults
            if errors == "raise":
                raise
            logging.getLogger(__name__).debug("%s failed: %s", cls_name, exc)
            out[cls_name] = {}
    return out


@lru_cache(maxsize=1)
def _shape2d_class() -> type:
    _radiomics()
    from radiomics import shape2D

    names = shape2D.RadiomicsShape2D.getFeatureNames()

    class _Shape2D(shape2D.RadiomicsShape2D):
        """pyradiomics' shape2D getters on coefficients computed by :func:`shape2d_features`."""

        def __init__(self, **attrs: Any):
            self.logger = logging.getLogger("radiomics.shape2D")
            self.featureNames = names
            self.__dict__.update(attrs)

    return _Shape2D


def shape2d_features(
    labels: np.ndarray,
    ids: Sequence[int],
    slices: Sequence[tuple[slice, slice]],
    spacing: float = 1.0,
    features: Sequence[str] = SHAPE2D_FEATURES,
) -> dict[str, np.ndarray]:
    """pyradiomics shape2D features of the nuclei ``ids`` (bounding boxes ``slices``) of ``labels``.

    The steps of ``RadiomicsShape2D._initSegmentBasedCalculation`` on each nucleus's mask, cropped
    to its bounding box (what the extractor crops to) and padded by one pixel as pyradiomics pads
    it -- perimeter, mesh surface and diameter from pyradiomics' C code (``cShape``), the
    covariance of the pixel coordinates with pyradiomics' numpy operations -- then pyradiomics'
    ``get*FeatureValue`` methods. No SimpleITK image and no class initialisation per nucleus. The
    2 x 2 eigenvalue problems go to one ``numpy.linalg.eigvals`` call (the same LAPACK routine per
    matrix as pyradiomics' one-matrix calls).

    Returns ``{feature: (n,) float64}``.
    """
    _radiomics()
    from radiomics import cShape

    n = len(ids)
    pixel_spacing = np.array((spacing, spacing), dtype=np.float64)  # GetSpacing()[::-1]
    spacing_row = pixel_spacing[None, :]
    coeffs = np.empty((n, 3))
    cov = np.empty((n, 2, 2))
    pixel_coords = []
    for k, (lab_id, (sy, sx)) in enumerate(zip(ids, slices, strict=True)):
        m = np.zeros((sy.stop - sy.start + 2, sx.stop - sx.start + 2), dtype=bool)
        m[1:-1, 1:-1] = labels[sy, sx] == lab_id
        coords = np.where(m)
        pixel_coords.append(coords)
        coeffs[k] = cShape.calculate_coefficients2D(m, pixel_spacing)
        n_pix = len(coords[0])
        physical = np.array(coords, dtype="int").transpose((1, 0)) * spacing_row
        physical -= np.add.reduce(physical, axis=0) / n_pix  # numpy.mean's own two steps
        physical /= np.sqrt(n_pix)
        cov[k] = np.dot(physical.T.copy(), physical)
    eig = np.linalg.eigvals(cov) if n else np.zeros((0, 2))
    if np.iscomplexobj(eig):  # numpy keeps a stack complex if any matrix is; pyradiomics decides per matrix
        eig = [np.linalg.eigvals(c) for c in cov]
    rows = [np.array(e) for e in eig]
    for ev in rows:  # pyradiomics' clean-up, per nucleus
        machine_errors = np.bitwise_and(ev < 0, ev > -1e-10)
        if np.sum(machine_errors) > 0:
            ev[machine_errors] = 0
        ev.sort()
    cls = _shape2d_class()
    out = {f: np.empty(n) for f in features}
    obj = cls(pixelSpacing=pixel_spacing)
    for k in range(n):
        obj.labelledPixelCoordinates = pixel_coords[k]
        obj.Perimeter, obj.Surface, obj.Diameter = coeffs[k]
        obj.eigenValues = rows[k]
        for f in features:
            out[f][k] = getattr(obj, f"get{f}FeatureValue")()
    return out


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
    ids, slices, areas, lab, index = _usable_nuclei(labels, min_area_px)
    cents = np.empty((len(ids), 2), dtype=np.float64)
    for k, (i, sl) in enumerate(zip(index, slices, strict=True)):
        yy, xx = np.nonzero(lab[sl] == i)
        cents[k] = (yy.mean() + sl[0].start, xx.mean() + sl[1].start)
    return ids, slices, areas, cents


def _usable_nuclei(
    labels: np.ndarray, min_area_px: int
) -> tuple[np.ndarray, list[tuple[slice, slice]], np.ndarray, np.ndarray, np.ndarray]:
    """:func:`find_nuclei` without centroids, plus the label image its bounding boxes index.

    Returns ids, slices, areas, the label image (``labels``, or labels renumbered 1..n when ids
    are too large for ``find_objects``) and each nucleus's value in that image.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    empty = np.zeros(0, np.int64)
    if lab.size == 0 or int(lab.max()) == 0:
        return empty, [], empty, lab, empty
    ids_present = None
    if int(lab.max()) > 2**22:  # find_objects allocates one entry per id up to the largest
        ids_present, inverse = np.unique(lab, return_inverse=True)
        lab = inverse.reshape(lab.shape).astype(np.int64)
    slices = ndi.find_objects(lab)
    pixels = np.bincount(lab.ravel().astype(np.intp, copy=False), minlength=len(slices) + 1)
    index, keep, areas = [], [], []
    for i, sl in enumerate(slices, start=1):
        if sl is None or sl[0].stop - sl[0].start < 2 or sl[1].stop - sl[1].start < 2:
            continue
        area = int(pixels[i])
        if area < min_area_px:
            continue
        index.append(i)
        keep.append(sl)
        areas.append(area)
    index_arr = np.asarray(index, dtype=np.int64)
    ids = ids_present[index_arr].astype(np.int64) if ids_present is not None else index_arr
    return ids, keep, np.asarray(areas, dtype=np.int64), lab, index_arr


def _cells_block(
    images: list[tuple[str, np.ndarray]],
    labels: np.ndarray,
    ids: np.ndarray,
    slices: Sequence[tuple[slice, slice]],
    config: RadiomicsConfig,
    spacing: float,
) -> dict[str, np.ndarray]:
    """The per-cell feature columns (pyradiomics names) for the nuclei ``ids`` / ``slices``."""
    _radiomics()
    settings = config.pyradiomics_settings()
    classes = config.cell_classes
    textures = [c for c in classes if c not in ("shape2D", "firstorder")]
    cols: dict[str, np.ndarray] = {}
    if "shape2D" in classes:
        shape_names = feature_names("shape2D")
        shapes = shape2d_features(labels, ids, slices, spacing, shape_names)
        for nm in shape_names:
            cols[f"original_shape2D_{nm}"] = shapes[nm]
    fo_values: dict[str, list[np.ndarray]] = {name: [] for name, _ in images}
    tex_rows: list[dict[str, float]] = []
    if "firstorder" in classes or textures:
        request = dict.fromkeys(textures)
        for lab, sl in zip(ids, slices, strict=True):
            m = labels[sl] == lab
            if "firstorder" in classes:
                for name, arr in images:
                    fo_values[name].append(arr[sl][m])
            if textures:
                row: dict[str, float] = {}
                for name, arr in images:
                    roi = _BinnedRoi(arr[sl], m, settings, spacing)
                    for cls_name, vals in _roi_classes(roi, request, settings, errors="raise").items():
                        for feat, v in vals.items():
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
    mask: np.ndarray | None,
    request: Mapping[str, Mapping[str, list[str]]],
    settings: Mapping[str, Any],
    prefix: str,
) -> dict[str, float]:
    """pyradiomics features of one ROI (``mask``; None: the whole image), cropped to its bounding
    box as the extractor crops it, discretised once per image for all its classes."""
    sl: tuple[slice, ...] = (slice(None), slice(None))
    if mask is not None:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask = mask[sl]
    out: dict[str, float] = {}
    for name, arr in images:
        wanted = request.get(name)
        if not wanted:
            continue
        roi = _BinnedRoi(arr[sl], mask, settings)
        for cls_name, vals in _roi_classes(roi, wanted, settings).items():
            for f in wanted[cls_name]:
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
    rows: list[np.ndarray] = []
    row_items: list[list[tuple[str, str]]] = []
    for shape, items in by_shape.items():
        vals = np.asarray(shape_values.get(shape, np.zeros(0)), dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            for col, _ in items:
                out[col] = 0.0
            continue
        rows.append(vals)
        row_items.append(items)
    if rows:  # one first-order object for all the shapes, one row each
        feats = sorted({_STAT_GETTERS.get(stat, stat) for items in row_items for _, stat in items})
        res = batch_firstorder(rows, feats, {"binCount": int(bin_count), "voxelArrayShift": 0})
        for k, items in enumerate(row_items):
            for col, stat in items:
                out[col] = float(res[_STAT_GETTERS.get(stat, stat)][k])
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
    names, union_req, patch_req, morph_req = _spot_requests(config, feature_set)
    settings = config.pyradiomics_settings()
    ids, slices, areas, lab_index, index = _usable_nuclei(lab, config.min_nucleus_area_px)
    images = derived_images(to_grey(rgb, config.grey), config, 1.0)
    values: dict[str, float] = {}
    values.update(_roi_features(images, None, patch_req, settings, "patch"))
    shape_cols: dict[str, np.ndarray] = {}
    if len(ids):
        keep = np.zeros(int(lab_index.max()) + 1, dtype=bool)
        keep[index] = True
        union = keep[lab_index]
        values.update(_roi_features(images, union, union_req, settings, "cellseg_all"))
        shape_cols = shape2d_features(lab_index, index, slices, 1.0)
    values.update(morph_stats(shape_cols, morph_req, config.morph_bin_count))
    extra = ["n_nuclei"] if mpp is None else ["n_nuclei", "cell_label"]
    data = np.empty(len(names) + len(extra), dtype=np.float64)
    data[: len(names)] = [values.get(c, 0.0) for c in names]
    data[~np.isfinite(data)] = 0.0
    data[len(names)] = float(len(ids))
    if mpp is not None:
        data[-1] = composition_from_morphology(
            areas * mpp * mpp,
            shape_cols.get("Elongation", np.zeros(0)),
            lab.shape[0] * lab.shape[1] * mpp * mpp,
            config.composition,
        )
    series = pd.Series(data, index=pd.Index(names + extra), dtype=np.float64)
    series.attrs["radiomics_config"] = config.to_dict()
    series.attrs["feature_set"] = feature_set
    return series


def _spot_requests(
    config: RadiomicsConfig, feature_set: str
) -> tuple[list[str], dict, dict, list[tuple[str, str, str]]]:
    """The feature names of :func:`spot_features` and their :func:`_parse_names` split (cached)."""
    if feature_set == "rapacl72":  # the same for every config
        return _rapacl72_requests()
    names = spot_feature_names(config, feature_set)
    return (names, *_parse_names(names))


@lru_cache(maxsize=1)
def _rapacl72_requests() -> tuple[list[str], dict, dict, list[tuple[str, str, str]]]:
    names = list(rapacl72_names())
    return (names, *_parse_names(names))


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
