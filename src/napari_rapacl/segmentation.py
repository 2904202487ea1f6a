"""Nucleus segmentation on H&E: a weight-free classical segmenter and cellpose, tiled over large regions.

Two segmenters share one entry point, :func:`segment_nuclei` (an RGB region in, an int32 label image
out, 0 = background, 1..n = nuclei):

``method="classical"`` (the offline default, no weights)
    1. haematoxylin optical density by colour deconvolution (the Ruifrok-Johnston matrix of
       :func:`skimage.color.rgb2hed`; computed with per-channel lookup tables, equal to ``rgb2hed``'s
       first channel to float32 precision);
    2. at a working resolution of at least ``work_mpp`` um/px (regions finer than that are block-averaged
       by an integer factor), Gaussian smoothing (``smooth_um``);
    3. a threshold: Otsu's method on the smoothed haematoxylin of the *tissue* pixels (optical density
       summed over R, G and B above ``tissue_od``), never below ``min_threshold``. Guard: a region with
       less tissue than two mean nuclei, or whose two Otsu classes differ by less than ``min_contrast``
       (a flat region), has no nuclei;
    4. holes smaller than half a mean nucleus are filled, then a marker watershed splits touching
       nuclei. Its score is high in the middle of a nucleus: the distance to the background (octagonal
       distance transform, capped at the nucleus radius ``diameter_um / 2``, so that a dense nest of
       nuclei is a plateau) plus ``blob_weight`` x the haematoxylin smoothed at half the radius,
       divided by the threshold (which separates the dark nuclei inside a plateau). Markers are the
       maxima of the score within a window of ``2 * peak_spacing * radius + 1`` pixels;
    5. a size filter in um^2 (``min_area_um2`` .. ``max_area_um2``), then labels 1..n in raster order
       of their markers. Everything is array code (scipy.ndimage, skimage's watershed), no per-object
       Python loop, and deterministic.

``method="cellpose"``
    The real cellpose API (``cellpose.models.CellposeModel.eval``). cellpose 3.x (CI installs 3.1.1.3) and
    4.x are supported behind a version check. The model is a local file, or a cellpose model name
    (3.x: ``"nuclei"``, ``"cyto3"``, ...; 4.x: ``"cpsam"``) looked up *before* cellpose is called in
    ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``; a named model that is not there is
    downloaded by cellpose only on a connected machine: with ``$HF_HUB_OFFLINE`` or
    ``$NAPARI_RAPACL_OFFLINE`` set, or when the download host does not answer within 3 s, a
    :class:`CellposeModelUnavailableError` is raised at once (never a hang). Loaded models are cached
    in-process per (file, gpu). Input: on 3.x the haematoxylin image (bright nuclei, one channel),
    on 4.x the RGB image (``cellpose_input=`` overrides). A region with no tissue is not sent to
    cellpose (all-zero labels).

Large regions: :func:`segment_region` / :func:`iter_segment_region` read a box of a lazy
:class:`~napari_rapacl.io.slide.Slide` in overlapping tiles and stitch the labels: each object is kept
from the one tile whose core (the tile without its overlap) holds its centroid, relabelled with a
running global offset, and written into a zarr array (in memory, compressed, or a directory store
given by the caller, written under a temporary name and renamed when complete). Memory stays
bounded: one tile window (core + overlap, read from the lazy slide) and its intermediate maps are
held at a time (about 80 bytes per window pixel: ~100 MB for 1024 px tiles), plus the compressed label
store, so a 20k x 20k region never becomes one in-memory RGB (or label) array; the result is a dask
array over the zarr store. The classical threshold is made global first, from the haematoxylin
histograms of the tile cores (all of them, or ``sample_tiles`` evenly spaced ones), so that every
tile uses the same threshold: when every tile is sampled, the tiled labels are the untiled ones
(objects on tile borders included). Limits: an object larger than the overlap can be cut at a window
edge, and where two tiles' objects claim the same pixel the first tile written keeps it.
Single-threaded on purpose (scipy.ndimage and the watershed hold the GIL); run several regions in
processes for more cores.

Input conventions (:func:`as_rgb_uint8`): ``(H, W, 3)`` uint8 RGB; a grey ``(H, W)`` or ``(H, W, 1)``
image is replicated to R = G = B (the haematoxylin channel then measures darkness); RGBA is
composited over white (transparent pixels become background); float images in [0, 1] are scaled to
uint8; any other dtype is refused. An all-white or flat region gives all-zero labels.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import socket
import sys
import threading
import uuid
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage as ndi

from ._errors import RapaclInputError
from ._image import as_rgb_uint8
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

    from .io.slide import Slide

__all__ = [
    "DEFAULT_DIAMETER_UM",
    "DEFAULT_MAX_AREA_UM2",
    "DEFAULT_MIN_AREA_UM2",
    "CellposeModelUnavailableError",
    "SEGMENTATION_VERSION",
    "MatchResult",
    "Progress",
    "as_rgb_uint8",
    "cellpose_major_version",
    "cellpose_models_dir",
    "clear_cellpose_cache",
    "haematoxylin",
    "iter_segment_region",
    "load_cellpose_model",
    "match_labels",
    "nucleus_statistics",
    "resolve_cellpose_model",
    "segment_nuclei",
    "segment_region",
    "synthetic_he_nuclei",
    "tissue_mask",
]

#: Bumped whenever a change to this module changes its segmentations (part of downstream cache keys).
SEGMENTATION_VERSION = "1"

Method = Literal["classical", "cellpose"]
METHODS = ("classical", "cellpose")

#: Default nucleus diameter (um): breast tissue nuclei are ~6 (lymphocytes) to ~12 um (tumour).
DEFAULT_DIAMETER_UM = 8.0
#: Default size filter (um^2): a 12 um^2 disc is ~3.9 um across, a 400 um^2 disc ~22.6 um.
DEFAULT_MIN_AREA_UM2 = 12.0
DEFAULT_MAX_AREA_UM2 = 400.0

#: Optical density (summed over R, G, B, in ``rgb2hed``'s units) above which a pixel is tissue.
TISSUE_OD = 0.04
#: The haematoxylin threshold never goes below this (``rgb2hed`` units; her2st stroma is ~0.03-0.06,
#: nuclei ~0.1-0.2).
MIN_THRESHOLD = 0.06
#: Otsu's two classes must differ by at least this much haematoxylin, else the region is flat.
MIN_CONTRAST = 0.03
#: Histogram used for Otsu's threshold (shared by whole-region and tiled runs, so they agree).
_HIST_BINS = 1024
_HIST_MAX = 0.5

_LOG_ADJUST = math.log(1e-6)  # rgb2hed's optical-density scale: OD = log(max(v, 1e-6)) / log(1e-6)


class CellposeModelUnavailableError(RapaclInputError):
    """A named cellpose model is not on this machine and cannot be downloaded (offline)."""


# --------------------------------------------------------------------------------------------
# input conversion and stain channels
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _luts() -> tuple[np.ndarray, np.ndarray]:
    """Per-channel lookup tables: haematoxylin contribution (3, 256) and optical density (256,)."""
    from skimage.color import hed_from_rgb

    v = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    od = np.log(v) / _LOG_ADJUST  # rgb2hed's normalised optical density of one channel value
    hema = (od[None, :] * np.asarray(hed_from_rgb)[:, 0][:, None]).astype(np.float32)
    return hema, od.astype(np.float32)


def _require_skimage() -> None:
    try:
        import skimage  # noqa: F401
    except ImportError as exc:  # pragma: no cover - skimage is installed with the cellpose/radiomics extras
        raise ImportError(
            "nucleus segmentation needs scikit-image: pip install 'napari-rapacl[cellpose]' "
            "(or pip install scikit-image)"
        ) from exc


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


# --------------------------------------------------------------------------------------------
# classical segmenter
# --------------------------------------------------------------------------------------------


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RapaclInputError(f"{what}={value!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise RapaclInputError(f"{what}={value!r} must be a finite number > 0")
    return v


@dataclass(frozen=True)
class _Params:
    """Settings of one segmentation run, in um and in working-resolution pixels."""

    mpp: float
    diameter_um: float
    min_area_um2: float
    max_area_um2: float
    smooth_um: float
    work_mpp: float | None
    peak_spacing: float
    blob_weight: float
    tissue_od: float
    min_threshold: float
    min_contrast: float

    @property
    def factor(self) -> int:
        """Integer block-averaging factor from the input to the working resolution."""
        if self.work_mpp is None:
            return 1
        return max(1, int(math.floor(self.work_mpp / self.mpp + 1e-6)))

    @property
    def mpp_w(self) -> float:
        return self.mpp * self.factor

    @property
    def radius_w(self) -> float:
        return 0.5 * self.diameter_um / self.mpp_w

    @property
    def min_px_w(self) -> float:
        return self.min_area_um2 / self.mpp_w**2

    @property
    def max_px_w(self) -> float:
        return self.max_area_um2 / self.mpp_w**2

    @property
    def nucleus_px_w(self) -> float:
        return math.pi * self.radius_w**2


def _make_params(
    mpp: Any,
    diameter_um: Any,
    min_area_um2: Any,
    max_area_um2: Any,
    *,
    smooth_um: Any = 0.7,
    work_mpp: Any = 0.5,
    peak_spacing: Any = 0.4,
    blob_weight: Any = 0.25,
    tissue_od: Any = TISSUE_OD,
    min_threshold: Any = MIN_THRESHOLD,
    min_contrast: Any = MIN_CONTRAST,
) -> _Params:
    mpp = _positive(mpp, "mpp")
    diameter_um = _positive(diameter_um, "diameter_um")
    max_area = _positive(max_area_um2, "max_area_um2")
    try:
        min_area = float(min_area_um2)
    except (TypeError, ValueError):
        raise RapaclInputError(f"min_area_um2={min_area_um2!r} is not a number") from None
    if not math.isfinite(min_area) or min_area < 0:
        raise RapaclInputError(f"min_area_um2={min_area_um2!r} must be a finite number >= 0")
    if min_area > max_area:
        raise RapaclInputError(f"min_area_um2={min_area_um2!r} is larger than max_area_um2={max_area_um2!r}")
    smooth = float(smooth_um)
    if not math.isfinite(smooth) or smooth < 0:
        raise RapaclInputError(f"smooth_um={smooth_um!r} must be a finite number >= 0")
    work = None if work_mpp is None else _positive(work_mpp, "work_mpp")
    return _Params(
        mpp=mpp,
        diameter_um=diameter_um,
        min_area_um2=min_area,
        max_area_um2=max_area,
        smooth_um=smooth,
        work_mpp=work,
        peak_spacing=_positive(peak_spacing, "peak_spacing"),
        blob_weight=_positive(blob_weight, "blob_weight"),
        tissue_od=float(tissue_od),
        min_threshold=float(min_threshold),
        min_contrast=float(min_contrast),
    )


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks (edge-padded to a multiple of k)."""
    if k == 1:
        return a
    h, w = a.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw)), mode="edge")
    hh, ww = a.shape[0] // k, a.shape[1] // k
    return a.reshape(hh, k, ww, k).mean(axis=(1, 3), dtype=np.float32)


def _upsample(labels: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    if k == 1:
        return labels
    up = np.repeat(np.repeat(labels, k, axis=0), k, axis=1)
    return np.ascontiguousarray(up[: shape[0], : shape[1]])


def _gaussian(a: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
    """Separable Gaussian filter (float32, mirror-symmetric borders like scipy's ``mode='reflect'``).

    Written as sums of shifted views (the kernel is symmetric), which is about twice as fast as
    ``scipy.ndimage.gaussian_filter`` for the short kernels used here; equal to it to ~1e-7.
    """
    radius = int(truncate * sigma + 0.5)
    if radius < 1:
        return a
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w = (w / w.sum()).astype(np.float32)
    out = np.asarray(a, dtype=np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")

        def view(start: int, padded: np.ndarray = padded, n: int = n, axis: int = axis) -> np.ndarray:
            return padded[start : start + n] if axis == 0 else padded[:, start : start + n]

        acc = view(radius) * w[radius]
        for k in range(1, radius + 1):
            pair = view(radius - k) + view(radius + k)
            pair *= w[radius + k]
            acc += pair
        out = acc
    return out


def _max_filter(a: np.ndarray, half: int) -> np.ndarray:
    """Maximum over a ``(2 half + 1)^2`` square window clipped to the image (separable, shifted views)."""
    out = a
    for axis in (0, 1):
        res = out.copy()
        for k in range(1, half + 1):
            if axis == 0:
                np.maximum(res[k:], out[:-k], out=res[k:])
                np.maximum(res[:-k], out[k:], out=res[:-k])
            else:
                np.maximum(res[:, k:], out[:, :-k], out=res[:, k:])
                np.maximum(res[:, :-k], out[:, k:], out=res[:, :-k])
        out = res
    return out


def _smoothed_haematoxylin(rgb: np.ndarray, p: _Params) -> np.ndarray:
    """Haematoxylin at the working resolution, Gaussian-smoothed (``smooth_um``)."""
    h = _block_mean(_haematoxylin(rgb), p.factor)
    sigma = p.smooth_um / p.mpp_w
    if sigma > 0.05:
        h = _gaussian(h, sigma, truncate=3.0)
    return h


#: The threshold histogram and the tissue mask use every ``_SAMPLE``-th working-resolution pixel in
#: each direction (the threshold is a statistic: a quarter of the pixels give the same Otsu bin).
_SAMPLE = 2


def _prepare(rgb: np.ndarray, p: _Params) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed haematoxylin at the working resolution and the tissue mask on its sampling grid.

    The tissue mask has the shape of ``h[::_SAMPLE, ::_SAMPLE]``: the optical density of the first
    input pixel of every sampled working-resolution pixel.
    """
    step = _SAMPLE * p.factor
    tissue = _optical_density(rgb[::step, ::step]) > p.tissue_od
    return _smoothed_haematoxylin(rgb, p), tissue


def _histogram(h_sampled: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Integer histogram of the sampled haematoxylin over tissue pixels, on the fixed Otsu bins."""
    vals = h_sampled[tissue]
    idx = np.minimum((vals * (_HIST_BINS / _HIST_MAX)).astype(np.int64), _HIST_BINS - 1)
    return np.bincount(idx, minlength=_HIST_BINS).astype(np.int64)


def _threshold_from_histogram(hist: np.ndarray, p: _Params) -> float | None:
    """Otsu threshold of the tissue histogram with the guards; ``None`` means 'no nuclei here'."""
    total = float(hist.sum())
    if total * _SAMPLE**2 < 2.0 * p.nucleus_px_w or total < 4:
        return None  # (almost) no tissue
    centers = (np.arange(_HIST_BINS) + 0.5) * (_HIST_MAX / _HIST_BINS)
    w0 = np.cumsum(hist, dtype=np.float64)
    m = np.cumsum(hist * centers, dtype=np.float64)
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None  # a single grey level: flat
    mu0 = np.divide(m, w0, out=np.zeros_like(m), where=w0 > 0)
    mu1 = np.divide(m[-1] - m, w1, out=np.zeros_like(m), where=w1 > 0)
    between = np.where(valid, w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    i = int(np.argmax(between))
    if mu1[i] - mu0[i] < p.min_contrast:
        return None  # flat tissue: no separate nuclear class
    # pixels strictly above the upper edge of bin i are foreground
    return max(float((i + 1) * (_HIST_MAX / _HIST_BINS)), p.min_threshold)


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


def _fill_small_holes(fg: np.ndarray, max_hole_px: float) -> np.ndarray:
    holes, n = ndi.label(~fg)
    if n == 0:
        return fg
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    # a hole touching the image border is not a hole
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = sizes < max_hole_px
    small[0] = False
    small[border] = False
    return fg | small[holes]


def _watershed_labels(h: np.ndarray, threshold: float, p: _Params) -> np.ndarray:
    """Threshold + marker watershed + size filter, at the working resolution.

    The watershed runs on a score that is high in the middle of a nucleus: the distance to the
    background (octagonal, the mean of the chessboard and city-block distances, capped at the nucleus
    radius, so that dense nests of nuclei form a plateau) plus the haematoxylin smoothed at half the
    nucleus radius, scaled by the threshold (which separates dark nuclei inside a plateau). Markers are
    the maxima of the score within a window of ``2 * peak_spacing * radius + 1`` pixels.
    """
    from skimage.segmentation import watershed

    fg = h > threshold
    if not fg.any():
        return np.zeros(h.shape, dtype=np.int32)
    fg = _fill_small_holes(fg, 0.5 * p.nucleus_px_w)
    radius = max(p.radius_w, 1.0)
    sigma = math.sqrt(max(0.0, (0.5 * radius) ** 2 - (p.smooth_um / p.mpp_w) ** 2))
    blob = _gaussian(h, sigma, truncate=2.5) if sigma > 0.3 else h
    dist = ndi.distance_transform_cdt(fg, metric="chessboard").astype(np.float32)
    dist += ndi.distance_transform_cdt(fg, metric="taxicab")
    score = np.minimum(dist, 2.0 * radius)
    score *= np.float32(0.5 / radius)
    score += blob * np.float32(p.blob_weight / max(threshold, 1e-3))
    half = max(1, int(round(p.peak_spacing * radius)))
    peaks = (score == _max_filter(score, half)) & fg
    markers, n = ndi.label(peaks, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(h.shape, dtype=np.int32)
    # A 4-connected component with one marker is that marker's object as a whole (that is what the
    # watershed, which floods 4-connected, would make of it): only components holding two or more
    # markers are flooded, which skips the heap work for the many isolated nuclei.
    comp, n_comp = ndi.label(fg)
    at = markers > 0
    pairs = np.unique(comp[at].astype(np.int64) * (n + 1) + markers[at])
    pair_comp, pair_marker = pairs // (n + 1), (pairs % (n + 1)).astype(np.int32)
    per_comp = np.bincount(pair_comp, minlength=n_comp + 1)
    single = per_comp[pair_comp] == 1
    lut = np.zeros(n_comp + 1, dtype=np.int32)
    lut[pair_comp[single]] = pair_marker[single]
    labels = lut[comp]
    shared = (per_comp >= 2)[comp]
    if shared.any():
        np.negative(score, out=score)
        flooded = watershed(score, np.where(shared, markers, 0), mask=shared)
        labels[shared] = flooded[shared]
    return _relabel_by_size(labels, p.min_px_w, p.max_px_w)


def _classical(rgb: np.ndarray, p: _Params, threshold: float | None) -> np.ndarray:
    if threshold is None:
        h, tissue = _prepare(rgb, p)
        threshold = _threshold_from_histogram(_histogram(h[::_SAMPLE, ::_SAMPLE], tissue), p)
        if threshold is None:
            return np.zeros(rgb.shape[:2], dtype=np.int32)
    else:
        h = _smoothed_haematoxylin(rgb, p)
    labels = _watershed_labels(h, threshold, p)
    return _upsample(labels, p.factor, rgb.shape[:2]).astype(np.int32, copy=False)


# --------------------------------------------------------------------------------------------
# cellpose
# --------------------------------------------------------------------------------------------

_CELLPOSE_CACHE: dict[tuple[str, bool], Any] = {}
_CELLPOSE_LOCK = threading.Lock()
_CELLPOSE_HOSTS = {3: "www.cellpose.org", 4: "huggingface.co"}
#: cellpose 3.x file names of the built-in models whose file name differs from the model name.
_CP3_FILENAMES = {"cyto": "cytotorch_0", "cyto2": "cyto2torch_0", "nuclei": "nucleitorch_0"}
#: Built-in model names (``cellpose.models.MODEL_NAMES`` of 3.1.1 and of 4.x).
_CP3_MODEL_NAMES = (
    "cyto3",
    "nuclei",
    "cyto2_cp3",
    "tissuenet_cp3",
    "livecell_cp3",
    "yeast_PhC_cp3",
    "yeast_BF_cp3",
    "bact_phase_cp3",
    "bact_fluor_cp3",
    "deepbacs_cp3",
    "cyto2",
    "cyto",
    "CPx",
    "transformer_cp3",
    "neurips_cellpose_default",
    "neurips_cellpose_transformer",
    "neurips_grayscale_cyto2",
    "CP",
    "TN1",
    "TN2",
    "TN3",
    "LC1",
    "LC2",
    "LC3",
    "LC4",
)
_CP4_MODEL_NAMES = ("cpsam",)


def _import_cellpose() -> Any:
    try:
        from cellpose import models
    except ImportError as exc:
        raise ImportError(
            "method='cellpose' needs cellpose: pip install 'napari-rapacl[cellpose]' (cellpose 3.x or 4.x)"
        ) from exc
    return models


def cellpose_major_version() -> int:
    """Major version of the installed cellpose (3 or 4); ``ImportError`` if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("cellpose")
    except PackageNotFoundError as exc:
        raise ImportError(
            "method='cellpose' needs cellpose: pip install 'napari-rapacl[cellpose]' (cellpose 3.x or 4.x)"
        ) from exc
    major = int(text.split(".")[0])
    if major not in (3, 4):
        raise ImportError(f"cellpose {text} is installed; napari-rapacl supports cellpose 3.x and 4.x")
    return major


def cellpose_models_dir() -> Path:
    """Where cellpose keeps named models: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``."""
    value = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(value).expanduser() if value else Path.home() / ".cellpose" / "models"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _offline_reason() -> str | None:
    for var in ("NAPARI_RAPACL_OFFLINE", "HF_HUB_OFFLINE"):
        if _truthy(var):
            return f"${var} is set"
    return None


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a TCP connection within ``timeout`` s (DNS included, in a thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _looks_like_path(model: str) -> bool:
    return (
        os.sep in model
        or "/" in model
        or (os.altsep is not None and os.altsep in model)
        or Path(model).suffix != ""
        or Path(model).exists()
    )


def _user_models(models_dir: Path) -> list[str]:
    """Names listed in cellpose's ``gui_models.txt`` (user-trained models in the models folder)."""
    listing = models_dir / "gui_models.txt"
    try:
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def resolve_cellpose_model(model: str | os.PathLike | None = None) -> Path:
    """The local file of a cellpose model, downloading a named one only on a connected machine.

    Nothing is imported from cellpose unless a download is needed, so a missing model fails in
    milliseconds.

    Parameters
    ----------
    model
        A file path, or a cellpose model name (cellpose 3.x: ``"nuclei"``, ``"cyto3"``, ... and user
        models listed in ``gui_models.txt``; 4.x: ``"cpsam"``). ``None``: ``"nuclei"`` on 3.x,
        ``"cpsam"`` on 4.x.

    Returns
    -------
    Path
        An existing file.

    Raises
    ------
    FileNotFoundError
        ``model`` is a path (or an unknown name) and no such file exists.
    CellposeModelUnavailableError
        A built-in model name that is not in :func:`cellpose_models_dir` while offline
        (``$NAPARI_RAPACL_OFFLINE`` / ``$HF_HUB_OFFLINE``) or with the download host unreachable (3 s).
    """
    major = cellpose_major_version()
    if model is None:
        model = "nuclei" if major == 3 else "cpsam"
    if isinstance(model, os.PathLike) or _looks_like_path(str(model)):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"cellpose model file not found: {path}")
        return path
    name = str(model)
    filename = _CP3_FILENAMES.get(name, name) if major == 3 else name
    dirs = [cellpose_models_dir()]
    loaded = sys.modules.get("cellpose.models")  # cellpose fixes its folder when first imported
    if loaded is not None and getattr(loaded, "MODEL_DIR", None) is not None:
        cp_dir = Path(loaded.MODEL_DIR)
        if cp_dir not in dirs:
            dirs.append(cp_dir)
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    builtin = _CP3_MODEL_NAMES if major == 3 else _CP4_MODEL_NAMES
    if name not in builtin:
        known = sorted(set(builtin) | {m for d in dirs for m in _user_models(d)})
        raise FileNotFoundError(
            f"cellpose model {name!r} is neither a file nor a model in {dirs[0]} (cellpose {major}.x "
            f"names: {', '.join(known)})"
        )
    where = " or ".join(str(d) for d in dirs)
    reason = _offline_reason()
    host = _CELLPOSE_HOSTS[major]
    if reason is None and not _host_reachable(host):
        reason = f"{host} cannot be reached"
    if reason is not None:
        raise CellposeModelUnavailableError(
            f"cellpose model {name!r} (file {filename}) is not in {where} and {reason}, so it cannot be "
            "downloaded; copy the file there (or point CELLPOSE_LOCAL_MODELS_PATH at its folder), pass "
            "model=<path to a model file>, or use method='classical' (no weights needed)"
        )
    # connected: let cellpose download it into its own models folder
    models = _import_cellpose()  # pragma: no cover - needs the network
    path = Path(models.model_path(name)) if major == 3 else Path(models.cache_CPSAM_model_path())
    if not path.is_file():  # pragma: no cover
        raise CellposeModelUnavailableError(f"cellpose could not download model {name!r} to {path}")
    return path  # pragma: no cover


def load_cellpose_model(model: str | os.PathLike | None = None, gpu: bool = False) -> Any:
    """A ``cellpose.models.CellposeModel`` for ``model`` (see :func:`resolve_cellpose_model`), cached.

    The cache key is (resolved file, gpu): loading the same file twice costs nothing the second time.
    On cellpose 4.x the network runs in float32 on the CPU (``use_bfloat16=False``) and in bfloat16 on
    a GPU (cellpose's default). ``gpu=True`` without a usable GPU falls back to the CPU with a warning.
    """
    path = resolve_cellpose_model(model)
    key = (str(path.resolve()), bool(gpu))
    with _CELLPOSE_LOCK:
        cached = _CELLPOSE_CACHE.get(key)
        if cached is not None:
            return cached
        models = _import_cellpose()
        major = cellpose_major_version()
        use_gpu = bool(gpu)
        if use_gpu:
            from cellpose import core

            if not core.use_gpu():
                warnings.warn("gpu=True but no usable GPU was found; cellpose runs on the CPU", stacklevel=2)
                use_gpu = False
        try:
            if major == 3:
                net = models.CellposeModel(gpu=use_gpu, pretrained_model=str(path))
            else:
                net = models.CellposeModel(gpu=use_gpu, pretrained_model=str(path), use_bfloat16=use_gpu)
        except Exception as exc:  # torch.load / state-dict errors of any kind: name the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RapaclInputError(
                f"{path} is not a cellpose {major}.x model file ({type(exc).__name__}: {first})"
            ) from exc
        _CELLPOSE_CACHE[key] = net
        return net


def clear_cellpose_cache() -> None:
    """Forget every cellpose model loaded by :func:`load_cellpose_model`."""
    with _CELLPOSE_LOCK:
        _CELLPOSE_CACHE.clear()


def _cellpose(
    rgb: np.ndarray,
    p: _Params,
    model: str | os.PathLike | None,
    gpu: bool,
    cellpose_input: str,
    cellpose_kwargs: dict[str, Any] | None,
) -> np.ndarray:
    major = cellpose_major_version()
    mode = cellpose_input
    if mode == "auto":
        mode = "haematoxylin" if major == 3 else "rgb"
    if mode not in ("haematoxylin", "rgb"):
        raise RapaclInputError(f"cellpose_input={cellpose_input!r} must be 'auto', 'haematoxylin' or 'rgb'")
    # no tissue -> nothing to segment (cellpose's percentile normalisation would amplify glass noise)
    nucleus_px = math.pi * (0.5 * p.diameter_um / p.mpp) ** 2
    if int((_optical_density(rgb) > p.tissue_od).sum()) < 2.0 * nucleus_px:
        return np.zeros(rgb.shape[:2], dtype=np.int32)
    net = load_cellpose_model(model, gpu=gpu)
    kwargs: dict[str, Any] = {
        "diameter": p.diameter_um / p.mpp,
        "min_size": max(1, int(math.floor(p.min_area_um2 / p.mpp**2))),
    }
    if mode == "haematoxylin":
        x = _haematoxylin(rgb)
        if major == 3:
            kwargs["channels"] = [0, 0]
    else:
        x = rgb
        kwargs["channel_axis"] = 2
        if major == 3:
            kwargs["channels"] = [0, 0]  # grey from RGB (3.x nets take one cytoplasm + one nuclear channel)
    kwargs.update(cellpose_kwargs or {})
    masks = net.eval(x, **kwargs)[0]
    masks = np.asarray(masks)
    if masks.shape != rgb.shape[:2]:  # pragma: no cover - defensive
        raise RuntimeError(f"cellpose returned masks of shape {masks.shape} for an image {rgb.shape[:2]}")
    masks = masks.astype(np.int32, copy=False)
    return _relabel_by_size(masks, p.min_area_um2 / p.mpp**2, p.max_area_um2 / p.mpp**2)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def segment_nuclei(
    region: Any,
    mpp: float,
    method: Method = "classical",
    *,
    diameter_um: float = DEFAULT_DIAMETER_UM,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    max_area_um2: float = DEFAULT_MAX_AREA_UM2,
    model: str | os.PathLike | None = None,
    gpu: bool = False,
    threshold: float | None = None,
    smooth_um: float = 0.7,
    work_mpp: float | None = 0.5,
    peak_spacing: float = 0.4,
    blob_weight: float = 0.25,
    tissue_od: float = TISSUE_OD,
    min_threshold: float = MIN_THRESHOLD,
    min_contrast: float = MIN_CONTRAST,
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
        Objects outside this area range (um^2) are removed (both methods).
    model, gpu
        cellpose only: a model file or name (default ``"nuclei"`` on cellpose 3.x, ``"cpsam"`` on 4.x)
        and whether to run on a GPU; see :func:`resolve_cellpose_model`.
    threshold
        classical only: a fixed haematoxylin threshold (``rgb2hed`` units) instead of Otsu's.
    smooth_um, work_mpp, peak_spacing, blob_weight, tissue_od, min_threshold, min_contrast
        classical only: Gaussian sigma (um); the coarsest working resolution (um/px; ``None`` = the
        input's); marker spacing as a fraction of the nucleus radius; the weight of the smoothed
        haematoxylin in the watershed score; the tissue optical density; the lowest Otsu threshold;
        the smallest Otsu class separation (see the module docstring).
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


# --------------------------------------------------------------------------------------------
# tiled segmentation of a slide region
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Box:
    """A region at one pyramid level: rows ``y0:y1``, columns ``x0:x1`` of that level."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def _level_box(
    slide: Slide, x0: float, y0: float, x1: float, y1: float, level: int, clip: bool
) -> tuple[_Box, tuple[float, float, float, float]]:
    if (
        not isinstance(level, (int, np.integer))
        or isinstance(level, bool)
        or not 0 <= level < len(slide.levels)
    ):
        raise RapaclInputError(f"level={level!r} out of range for {slide.name} ({len(slide.levels)} levels)")
    coords = []
    for v in (x0, y0, x1, y1):
        try:
            coords.append(float(v))
        except (TypeError, ValueError):
            raise RapaclInputError(f"region ({x0}, {y0}, {x1}, {y1}) has a non-numeric coordinate") from None
    if not all(math.isfinite(v) for v in coords):
        raise RapaclInputError(f"region ({x0}, {y0}, {x1}, {y1}) has non-finite coordinates")
    fx0, fy0, fx1, fy1 = coords
    if fx1 <= fx0 or fy1 <= fy0:
        raise RapaclInputError(
            f"region (x0={x0}, y0={y0}, x1={x1}, y1={y1}) is empty: need x1 > x0 and y1 > y0"
        )
    height, width = slide.shape
    inside = fx0 >= 0 and fy0 >= 0 and fx1 <= width and fy1 <= height
    if not inside:
        if not clip:
            raise RapaclInputError(
                f"region (x0={x0}, y0={y0}, x1={x1}, y1={y1}) in level-0 px is not inside {slide.name}, "
                f"whose level 0 is {width} px wide and {height} px high (x in [0, {width}], "
                f"y in [0, {height}]); "
                "pass clip=True to segment only the part inside the slide"
            )
        fx0, fy0 = max(fx0, 0.0), max(fy0, 0.0)
        fx1, fy1 = min(fx1, float(width)), min(fy1, float(height))
        if fx1 <= fx0 or fy1 <= fy0:
            raise RapaclInputError(
                f"region (x0={x0}, y0={y0}, x1={x1}, y1={y1}) does not overlap {slide.name} "
                f"({width} x {height} px, width x height)"
            )
    ds = slide.downsamples[int(level)]
    lh, lw = slide.levels[int(level)].shape[:2]
    bx0, by0 = min(int(math.floor(fx0 / ds)), lw - 1), min(int(math.floor(fy0 / ds)), lh - 1)
    bx1 = min(max(bx0 + 1, int(math.ceil(fx1 / ds - 1e-9))), lw)
    by1 = min(max(by0 + 1, int(math.ceil(fy1 / ds - 1e-9))), lh)
    return _Box(by0, bx0, by1, bx1), (fx0, fy0, fx1, fy1)


def _read(slide: Slide, level: int, box: _Box, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
    """Rows ya:yb, columns xa:xb of the region (region-relative, level px) as uint8 RGB."""
    arr = slide.levels[level][box.y0 + ya : box.y0 + yb, box.x0 + xa : box.x0 + xb]
    return np.ascontiguousarray(np.asarray(arr.compute(scheduler="threads")))


def _open_output(
    out: Any, shape: tuple[int, int], chunk: int, overwrite: bool
) -> tuple[Any, Path | None, Path | None]:
    """(zarr array to write, temporary folder, final folder)."""
    import zarr

    chunks = (min(chunk, shape[0]), min(chunk, shape[1]))
    if out is None:
        store = zarr.storage.MemoryStore()
        return (
            zarr.open_array(store=store, mode="w", shape=shape, chunks=chunks, dtype=np.int32, fill_value=0),
            None,
            None,
        )
    if isinstance(out, (str, os.PathLike)):
        final = Path(out).expanduser()
        if final.exists() and not overwrite:
            raise FileExistsError(f"output {final} already exists; pass overwrite=True to replace it")
        if not final.parent.is_dir():
            raise FileNotFoundError(f"output folder not found: {final.parent}")
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        arr = zarr.open_array(str(tmp), mode="w", shape=shape, chunks=chunks, dtype=np.int32, fill_value=0)
        return arr, tmp, final
    if hasattr(out, "shape") and hasattr(out, "dtype") and hasattr(out, "__setitem__"):
        if tuple(out.shape) != tuple(shape):
            raise RapaclInputError(f"out has shape {tuple(out.shape)}, but the region's labels are {shape}")
        if np.dtype(out.dtype) != np.int32:
            raise RapaclInputError(f"out has dtype {out.dtype}; labels need int32")
        return out, None, None
    raise RapaclInputError(f"out={out!r} must be None, a folder path for a zarr store, or a zarr array")


def iter_segment_region(
    slide: Slide,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    *,
    level: int = 0,
    method: Method = "classical",
    tile: int = 1024,
    overlap: int | None = None,
    mpp: float | None = None,
    out: Any = None,
    overwrite: bool = False,
    clip: bool = False,
    sample_tiles: int = 16,
    **segment_kwargs: Any,
) -> Generator[Progress, None, da.Array]:
    """Segment the nuclei of a slide region tile by tile; yields :class:`Progress`, returns the labels.

    Parameters
    ----------
    slide
        A lazy :class:`~napari_rapacl.io.slide.Slide`.
    x0, y0, x1, y1
        The region, a half-open box in **level-0** pixels.
    level
        The pyramid level to segment at; the labels have that level's pixel grid
        (about ``((y1 - y0) / ds, (x1 - x0) / ds)``, ``ds = slide.downsamples[level]``).
    method
        ``"classical"`` or ``"cellpose"`` (see :func:`segment_nuclei`).
    tile
        Side of a tile core in level pixels (>= 32). One tile window (core + overlap on every side) is
        the most image held in memory.
    overlap
        Context added on each side of a core (level px). Default: the larger of two nucleus diameters
        and the diameter of a ``max_area_um2`` disc, plus 8 px. Objects are kept whole only if they
        fit in the overlap.
    mpp
        Microns per **level-0** pixel; default ``slide.mpp`` (:class:`MissingPixelSizeError` if unknown).
    out
        ``None``: an in-memory (compressed) zarr array; a folder path: a zarr store written under a
        temporary name and renamed when complete (``overwrite=True`` replaces an existing one); or an
        existing int32 zarr array of the right shape, written in place.
    clip
        A region not entirely inside the slide raises :class:`RapaclInputError` naming the box and the
        slide size; with ``clip=True`` it is clipped to the slide instead (an empty intersection still
        raises).
    sample_tiles
        classical: the global threshold is Otsu's on the histogram of at most this many tile cores
        (evenly spaced over the grid; all tiles when there are no more).
    **segment_kwargs
        Passed to :func:`segment_nuclei` (``diameter_um``, ``min_area_um2``, ``max_area_um2``, ``model``,
        ``gpu``, ``threshold``, ...).

    Yields
    ------
    Progress
        ``("threshold", done, total)`` while sampling the threshold, then ``("segment", done, total)``
        after each tile, so a GUI can cancel between tiles.

    Returns
    -------
    dask.array.Array
        ``(h, w)`` int32 labels backed by the zarr array; labels are unique across the region.
    """
    import dask.array as dsk

    if method not in METHODS:
        raise RapaclInputError(f"method={method!r} is not one of {', '.join(METHODS)}")
    _require_skimage()
    import inspect

    allowed = set(inspect.signature(segment_nuclei).parameters) - {"region", "mpp", "method"}
    unknown = sorted(set(segment_kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"iter_segment_region got unexpected keyword arguments {unknown}; allowed: {sorted(allowed)}"
        )
    box, _ = _level_box(slide, x0, y0, x1, y1, level, clip)
    level = int(level)
    if method == "cellpose":
        resolve_cellpose_model(segment_kwargs.get("model"))  # a missing model fails before any tile is read
    mpp0 = slide.require_mpp("nucleus segmentation") if mpp is None else _positive(mpp, "mpp")
    mpp_level = mpp0 * slide.downsamples[level]
    threshold = segment_kwargs.pop("threshold", None)
    p = _make_params(
        mpp_level,
        segment_kwargs.get("diameter_um", DEFAULT_DIAMETER_UM),
        segment_kwargs.get("min_area_um2", DEFAULT_MIN_AREA_UM2),
        segment_kwargs.get("max_area_um2", DEFAULT_MAX_AREA_UM2),
        **{
            k: segment_kwargs[k]
            for k in (
                "smooth_um",
                "work_mpp",
                "peak_spacing",
                "blob_weight",
                "tissue_od",
                "min_threshold",
                "min_contrast",
            )
            if k in segment_kwargs
        },
    )
    k = p.factor if method == "classical" else 1
    tile = int(tile)
    if tile < 32:
        raise RapaclInputError(f"tile={tile} must be >= 32 px")
    if overlap is None:
        max_diam_um = 2.0 * math.sqrt(p.max_area_um2 / math.pi)
        overlap = int(math.ceil(max(max_diam_um, 2.0 * p.diameter_um) / mpp_level)) + 8
    overlap = int(overlap)
    if overlap < 0:
        raise RapaclInputError(f"overlap={overlap} must be >= 0")
    grid = _SAMPLE * k  # windows start on the (sampled) working-resolution grid
    tile = -(-tile // grid) * grid
    overlap = -(-overlap // grid) * grid
    sample_tiles = int(sample_tiles)
    if sample_tiles < 1:
        raise RapaclInputError(f"sample_tiles={sample_tiles} must be >= 1")

    h, w = box.shape
    cores = [(ty, tx) for ty in range(0, h, tile) for tx in range(0, w, tile)]

    def window(ty: int, tx: int, margin: int = overlap) -> tuple[int, int, int, int]:
        return (
            max(0, ty - margin),
            min(h, ty + tile + margin),
            max(0, tx - margin),
            min(w, tx + tile + margin),
        )

    # the threshold pass needs only the Gaussian's support around a core
    smooth_radius = int(3.0 * p.smooth_um / p.mpp_w + 0.5) + 1
    margin = min(overlap, -(-(smooth_radius * k) // grid) * grid)

    if method == "classical" and threshold is None:
        n = len(cores)
        picks = (
            range(n)
            if n <= sample_tiles
            else sorted(set(np.linspace(0, n - 1, sample_tiles).round().astype(int)))
        )
        picks = list(picks)
        hist = np.zeros(_HIST_BINS, dtype=np.int64)
        yield Progress("threshold", 0, len(picks))
        for i, j in enumerate(picks):
            ty, tx = cores[j]
            wy0, wy1, wx0, wx1 = window(ty, tx, margin)
            hs, tissue = _prepare(_read(slide, level, box, wy0, wy1, wx0, wx1), p)
            # the core on the sampling grid (window and core origins are multiples of _SAMPLE * k)
            cy0, cx0 = (ty - wy0) // k, (tx - wx0) // k
            cy1 = cy0 + -(-(min(ty + tile, h) - ty) // k)
            cx1 = cx0 + -(-(min(tx + tile, w) - tx) // k)
            sy, sx = slice(cy0 // _SAMPLE, -(-cy1 // _SAMPLE)), slice(cx0 // _SAMPLE, -(-cx1 // _SAMPLE))
            hist += _histogram(hs[::_SAMPLE, ::_SAMPLE][sy, sx], tissue[sy, sx])
            yield Progress("threshold", i + 1, len(picks))
        threshold = _threshold_from_histogram(hist, p)
        if threshold is None:
            threshold = math.inf  # no tissue / flat: no nuclei anywhere

    arr, tmp, final = _open_output(out, (h, w), tile, overwrite)
    try:
        next_label = 0
        yield Progress("segment", 0, len(cores))
        for i, (ty, tx) in enumerate(cores):
            wy0, wy1, wx0, wx1 = window(ty, tx)
            rgb = _read(slide, level, box, wy0, wy1, wx0, wx1)
            if method == "classical":
                if math.isinf(threshold):
                    labels = np.zeros(rgb.shape[:2], dtype=np.int32)
                else:
                    labels = segment_nuclei(
                        rgb, mpp_level, "classical", threshold=threshold, **segment_kwargs
                    )
            else:
                labels = segment_nuclei(rgb, mpp_level, "cellpose", **segment_kwargs)
            n = int(labels.max())
            if n:
                ys, xs = np.nonzero(labels)
                ids = labels[ys, xs]
                count = np.bincount(ids, minlength=n + 1)
                cy = np.bincount(ids, weights=ys, minlength=n + 1) / np.maximum(count, 1)
                cx = np.bincount(ids, weights=xs, minlength=n + 1) / np.maximum(count, 1)
                ry0, rx0 = ty - wy0, tx - wx0
                owned = (cy >= ry0) & (cy < ry0 + tile) & (cx >= rx0) & (cx < rx0 + tile) & (count > 0)
                owned[0] = False
                lut = np.zeros(n + 1, dtype=np.int32)
                n_owned = int(owned.sum())
                lut[owned] = np.arange(next_label + 1, next_label + n_owned + 1, dtype=np.int32)
                next_label += n_owned
                mine = lut[labels]
                if n_owned:
                    current = np.asarray(arr[wy0:wy1, wx0:wx1])
                    put = (mine > 0) & (current == 0)  # first come keeps a contested pixel
                    current[put] = mine[put]
                    arr[wy0:wy1, wx0:wx1] = current
            yield Progress("segment", i + 1, len(cores))
        if tmp is not None and final is not None:
            import zarr

            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
            tmp = None
            arr = zarr.open_array(str(final), mode="r")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dsk.from_zarr(arr)


def segment_region(
    slide: Slide,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    *,
    level: int = 0,
    method: Method = "classical",
    tile: int = 1024,
    overlap: int | None = None,
    mpp: float | None = None,
    out: Any = None,
    overwrite: bool = False,
    clip: bool = False,
    sample_tiles: int = 16,
    **segment_kwargs: Any,
) -> da.Array:
    """Run :func:`iter_segment_region` to the end and return its labels (a dask array over zarr)."""
    gen = iter_segment_region(
        slide,
        x0,
        y0,
        x1,
        y1,
        level=level,
        method=method,
        tile=tile,
        overlap=overlap,
        mpp=mpp,
        out=out,
        overwrite=overwrite,
        clip=clip,
        sample_tiles=sample_tiles,
        **segment_kwargs,
    )
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# --------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchResult:
    """Object-level agreement of a predicted label image with a reference one."""

    n_true: int
    n_pred: int
    tp: int
    iou_threshold: float
    mean_matched_iou: float

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        denom = self.n_pred + self.n_true
        return 2.0 * self.tp / denom if denom else 1.0


def match_labels(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> MatchResult:
    """Match objects of two label images by intersection over union.

    A reference object and a predicted object match when their IoU exceeds ``iou_threshold``; for
    thresholds >= 0.5 such a match is unique on both sides, so no assignment problem is solved (for
    lower thresholds the best IoU partner is taken greedily). Fully vectorised (one ``np.unique`` over
    the overlapping pixels).
    """
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise RapaclInputError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    t_ids, t_inv = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    t_area = np.bincount(t_inv, minlength=len(t_ids))
    p_area = np.bincount(p_inv, minlength=len(p_ids))
    t_obj = t_ids != 0
    p_obj = p_ids != 0
    n_true, n_pred = int(t_obj.sum()), int(p_obj.sum())
    both = (true.ravel() != 0) & (pred.ravel() != 0)
    if not both.any():
        return MatchResult(n_true, n_pred, 0, float(iou_threshold), 0.0)
    pair = t_inv[both].astype(np.int64) * len(p_ids) + p_inv[both]
    pairs, inter = np.unique(pair, return_counts=True)
    ti, pi = pairs // len(p_ids), pairs % len(p_ids)
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    # best partner for each reference object, then keep pairs that are mutual bests above threshold
    order = np.lexsort((-iou, ti))
    ti, pi, iou = ti[order], pi[order], iou[order]
    first = np.ones(len(ti), dtype=bool)
    first[1:] = ti[1:] != ti[:-1]
    ti, pi, iou = ti[first], pi[first], iou[first]
    order = np.lexsort((-iou, pi))
    ti, pi, iou = ti[order], pi[order], iou[order]
    first = np.ones(len(pi), dtype=bool)
    first[1:] = pi[1:] != pi[:-1]
    iou = iou[first]
    good = iou > iou_threshold
    tp = int(good.sum())
    return MatchResult(n_true, n_pred, tp, float(iou_threshold), float(iou[good].mean()) if tp else 0.0)


def nucleus_statistics(labels: Any, mpp: float, region: Any | None = None) -> dict[str, float]:
    """Count, density and size distribution of the nuclei in a label image.

    Parameters
    ----------
    labels
        ``(H, W)`` integer labels (numpy or dask).
    mpp
        Microns per pixel of ``labels``.
    region
        The RGB region, optional: adds the tissue area and the density per mm^2 of tissue.

    Returns
    -------
    dict
        ``n``, ``area_mm2``, ``density_per_mm2`` (per region area), ``median_area_um2``,
        ``q25_area_um2``, ``q75_area_um2``, ``iqr_area_um2``, ``mean_area_um2``, and with ``region``
        ``tissue_mm2`` and ``density_per_tissue_mm2``. NaN-free: sizes are 0.0 when there is no nucleus.
    """
    mpp = _positive(mpp, "mpp")
    lab = np.asarray(labels)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    areas = counts * mpp**2
    area_mm2 = lab.size * mpp**2 * 1e-6
    q25, q50, q75 = np.percentile(areas, [25, 50, 75]) if len(areas) else (0.0, 0.0, 0.0)
    stats = {
        "n": float(len(ids)),
        "area_mm2": float(area_mm2),
        "density_per_mm2": float(len(ids) / area_mm2) if area_mm2 else 0.0,
        "median_area_um2": float(q50),
        "q25_area_um2": float(q25),
        "q75_area_um2": float(q75),
        "iqr_area_um2": float(q75 - q25),
        "mean_area_um2": float(areas.mean()) if len(areas) else 0.0,
    }
    if region is not None:
        tissue_mm2 = float(tissue_mask(region).sum()) * mpp**2 * 1e-6
        stats["tissue_mm2"] = tissue_mm2
        stats["density_per_tissue_mm2"] = float(len(ids) / tissue_mm2) if tissue_mm2 else 0.0
    return stats


# --------------------------------------------------------------------------------------------
# synthetic H&E with known nuclei
# --------------------------------------------------------------------------------------------

_H_OD = np.array([0.65, 0.70, 0.29])  # haematoxylin, eosin absorbance directions (Ruifrok & Johnston)
_E_OD = np.array([0.07, 0.99, 0.11])


def synthetic_he_nuclei(
    shape: tuple[int, int] = (512, 512),
    *,
    mpp: float = 0.5,
    n_nuclei: int = 60,
    n_touching_pairs: int = 10,
    diameter_um: tuple[float, float] = (6.0, 11.0),
    max_elongation: float = 1.6,
    centers: Any = None,
    blank_fraction: float = 0.0,
    noise: float = 8.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image with known nuclei, for validating segmenters.

    Pink (eosin) tissue with a slowly varying stain density, dark purple (haematoxylin) elliptical
    nuclei with texture and a soft edge, ``n_touching_pairs`` pairs of nuclei that touch, optionally a
    white glass strip on the right (``blank_fraction`` of the width), and Gaussian pixel noise. Colours
    follow Beer-Lambert with the haematoxylin and eosin absorbance vectors behind ``rgb2hed``.

    Parameters
    ----------
    shape
        ``(H, W)``.
    mpp
        Microns per pixel (sets the nucleus size in pixels).
    n_nuclei
        Single (non-touching) nuclei to place (fewer if they do not fit).
    n_touching_pairs
        Pairs of nuclei that touch each other (each counts two nuclei).
    diameter_um
        Range of the ellipse's mean diameter (um).
    max_elongation
        Largest major/minor axis ratio.
    centers
        Optional ``(k, 2)`` (y, x) centres placed first (single nuclei), e.g. on tile borders.
    blank_fraction
        Fraction of the width, on the right, that is glass (no tissue).
    noise
        Standard deviation of the per-pixel noise (grey levels).
    seed
        Random seed; the output is a deterministic function of the arguments.

    Returns
    -------
    rgb, labels
        ``(H, W, 3)`` uint8 and ``(H, W)`` int32 ground truth (1..n; touching pairs split along the
        boundary where each ellipse's normalised radius is smaller).
    """
    rng = np.random.default_rng(seed)
    hgt, wid = int(shape[0]), int(shape[1])
    mpp = _positive(mpp, "mpp")
    tissue_w = int(round(wid * (1.0 - float(blank_fraction))))
    labels = np.zeros((hgt, wid), dtype=np.int32)
    best_q = np.full((hgt, wid), np.inf, dtype=np.float32)
    occupied = np.zeros((hgt, wid), dtype=bool)
    conc = np.zeros((hgt, wid), dtype=np.float32)  # haematoxylin concentration of nuclei

    def footprint(cy: float, cx: float, a: float, b: float, theta: float) -> tuple[Any, ...] | None:
        r = int(math.ceil(max(a, b))) + 3
        y0, y1 = max(0, int(cy) - r), min(hgt, int(cy) + r + 2)
        x0, x1 = max(0, int(cx) - r), min(tissue_w, int(cx) + r + 2)
        if y1 <= y0 or x1 <= x0:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        c, s = math.cos(theta), math.sin(theta)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        q = (u / a) ** 2 + (v / b) ** 2
        if not (q <= 1.0).any():
            return None
        halo = q <= (1.0 + 3.0 / min(a, b)) ** 2  # keep ~3 px of stroma around each nucleus
        return (slice(y0, y1), slice(x0, x1)), q, halo

    def free(fp: tuple[Any, ...] | None) -> bool:
        return fp is not None and not occupied[fp[0]][fp[2]].any()

    def paint(fp: tuple[Any, ...], label: int) -> None:
        sl, q, halo = fp
        inside = q <= 1.0
        sub_q = best_q[sl]
        win = inside & (q < sub_q)
        labels[sl][win] = label
        sub_q[win] = q[win]
        occupied[sl] |= halo
        dens = rng.uniform(0.7, 1.1)
        edge = np.clip((1.0 - q) * 6.0, 0.0, 1.0)  # soft edge, ~1 px wide
        conc[sl] = np.maximum(conc[sl], dens * edge)

    def random_axes() -> tuple[float, float, float]:
        d = rng.uniform(*diameter_um) / mpp
        e = rng.uniform(1.0, max_elongation)
        a, b = 0.5 * d * math.sqrt(e), 0.5 * d / math.sqrt(e)
        return a, b, rng.uniform(0, math.pi)

    def radius_towards(a: float, b: float, theta: float, phi: float) -> float:
        t = phi - theta
        return 1.0 / math.sqrt((math.cos(t) / a) ** 2 + (math.sin(t) / b) ** 2)

    label = 0
    if centers is not None:
        for cy, cx in np.asarray(centers, dtype=float).reshape(-1, 2):
            fp = footprint(cy, cx, *random_axes())
            if free(fp):
                paint(fp, label + 1)
                label += 1
    margin = 0.5 * diameter_um[1] / mpp + 2
    placed_pairs = 0
    for _ in range(n_touching_pairs * 50):
        if placed_pairs >= n_touching_pairs:
            break
        a1, b1, t1 = random_axes()
        a2, b2, t2 = random_axes()
        cy, cx = rng.uniform(margin * 2, hgt - margin * 2), rng.uniform(margin * 2, tissue_w - margin * 2)
        phi = rng.uniform(0, 2 * math.pi)
        dist = radius_towards(a1, b1, t1, phi) + radius_towards(a2, b2, t2, phi + math.pi) - 1.0
        cy2, cx2 = cy + dist * math.sin(phi), cx + dist * math.cos(phi)
        if not (margin <= cy2 < hgt - margin and margin <= cx2 < tissue_w - margin):
            continue
        fp1, fp2 = footprint(cy, cx, a1, b1, t1), footprint(cy2, cx2, a2, b2, t2)
        if not (free(fp1) and free(fp2)):
            continue
        paint(fp1, label + 1)
        paint(fp2, label + 2)
        label += 2
        placed_pairs += 1
    placed = 0
    for _ in range(n_nuclei * 50):
        if placed >= n_nuclei:
            break
        cy, cx = rng.uniform(margin, hgt - margin), rng.uniform(margin, tissue_w - margin)
        fp = footprint(cy, cx, *random_axes())
        if free(fp):
            paint(fp, label + 1)
            label += 1
            placed += 1
    # stain densities: eosin everywhere in tissue (slowly varying), haematoxylin in nuclei (textured)
    yy, xx = np.mgrid[0:hgt, 0:wid].astype(np.float32)
    eosin = 0.6 + 0.2 * np.sin(xx / 57.0 + rng.uniform(0, 6)) * np.cos(yy / 43.0 + rng.uniform(0, 6))
    hema = 0.3 + 0.1 * np.sin(xx / 23.0) * np.sin(yy / 31.0)  # background haematoxylin (cytoplasm, stroma)
    texture = ndi.gaussian_filter(rng.normal(0.0, 1.0, (hgt, wid)).astype(np.float32), 1.0)
    hema = hema + conc * (2.8 + 0.6 * texture)  # nuclei: RGB about (35, 40, 110), as on her2st
    eosin = eosin * (1.0 - 0.5 * np.clip(conc, 0, 1))
    if tissue_w < wid:
        eosin[:, tissue_w:] = 0.04
        hema[:, tissue_w:] = 0.02
    od = hema[..., None] * _H_OD + eosin[..., None] * _E_OD
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, float(noise), (hgt, wid, 3))
    labels = _relabel_by_size(labels, 1, np.inf)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels
