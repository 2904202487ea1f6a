"""The weight-free classical nucleus segmenter (``segment_nuclei(..., method="classical")``).

Two versions are kept, bit for bit (``segment_nuclei(..., version=...)``; radiomics tables and checkpoints
record the version their nuclei came from). Version 3 (the default, :data:`SEGMENTATION_VERSION` "3") is
version 2's steps 1-6 below with a different acceptance of the objects:

* step 6's trim at half-way (``trim`` 0.5 instead of 0.3) from the floor to the object's peak: tighter
  outlines on the dark nucleus, its paler halo left out;
* instead of the shape rule alone, an object is kept when it **stands out from its own ring**: its mean
  haematoxylin exceeds the mean of the background ``ring_um`` (0.75-1.75 um) around it, each background
  pixel belonging to its nearest object (Euclidean distance transform with indices), by at least
  ``ring_contrast`` (0.3) of its own mean, or ``small_ring_contrast`` (0.5) when its area is below
  ``small_fraction`` (0.4) of a ``diameter_um`` disc; an object enclosed by others (no ring) has contrast 0.
  Step 7's ellipse fill >= ``min_fill`` still applies;
* the size filter starts at 8 um^2 (:data:`CLASSICAL_DEFAULTS`): small dark round objects (lymphocytes)
  are kept when contrasted, small pale specks are not.

On TNBC (``benchmarks/bench_tnbc.py``) this raises object F1@0.5 from 0.664 to 0.704 on the development
patients 01-08 (every setting was chosen there) and from 0.647 to 0.677 on the held-out 09-11; see
``benchmarks/README.md`` for what else was tried. The ring is local (1.75 um), so tiled = untiled still.

Version 2: every threshold and contrast limit is measured on the region itself, so that a pale stain
from one lab and a dark one from another are segmented alike.

1. haematoxylin optical density by colour deconvolution (the Ruifrok-Johnston matrix of
   :func:`skimage.color.rgb2hed`; per-channel lookup tables, equal to ``rgb2hed``'s first channel to
   float32 precision);
2. at a working resolution of at least ``work_mpp`` um/px (regions finer than that are block-averaged
   by an integer factor), Gaussian smoothing (``smooth_um``);
3. the region's threshold ``T``: Otsu's method on the smoothed haematoxylin of the *tissue* pixels
   (optical density summed over R, G and B above ``tissue_od``). Guards, both relative to the stain
   of the region: a region with less tissue than two mean nuclei, or whose two Otsu classes differ by
   less than ``min_contrast`` of the upper class's mean (a flat region, or pink tissue with noise
   only: its classes differ by ~10%, nuclei by 40-75%), has no nuclei; ``min_threshold`` is only a
   floor for tissue with almost no haematoxylin at all (rgb2hed units; real nuclei are 2-20x above);
4. the foreground is *locally* adaptive: a pixel is nucleus when its haematoxylin is above
   ``floor_fraction * T`` **and** above the local mean haematoxylin (a Gaussian of ``local_um``,
   default 0.4 nucleus diameters), a mean capped at ``local_cap * T``. A pale nucleus in pale tissue
   is kept, the paler gaps between the nuclei of a nest (above ``T``, but below their surroundings)
   separate them, and a nest of nuclei far darker than ``T`` (her2st tumour at 0.69 um/px, where the
   gaps are not resolved) stays whole for the watershed to split;
5. holes smaller than a mean nucleus are filled (vesicular nuclei), then a marker watershed splits
   touching nuclei. Its score is high in the middle of a nucleus: the distance to the background
   (octagonal distance transform, capped at the nucleus radius ``diameter_um / 2``, so that a dense
   nest of nuclei is a plateau) plus ``blob_weight`` x the haematoxylin smoothed at half the radius,
   divided by ``T``. Markers are the maxima of the score within a window of
   ``2 * peak_spacing * radius + 1`` pixels (a thin spindle nucleus, whose distance ridge is flat
   along its length, gets one);
6. each object is trimmed at its own level, ``floor + trim * (peak - floor)`` where ``peak`` is the
   maximum of its haematoxylin smoothed at half the radius: a dark nucleus loses the pale cytoplasm
   the local rule let in, a pale one keeps its extent; the largest 8-connected piece is kept;
7. shape: an object whose area is less than ``min_fill`` of the area of the ellipse with its second
   moments (1 for any filled ellipse, round or spindle; ~0.89 for two touching discs; lower for
   ragged, hollow or branched objects: cytoplasm, or nests the watershed could not split) is dropped;
8. a size filter in um^2 (``min_area_um2`` .. ``max_area_um2``), then labels 1..n in raster order
   of their markers. Everything is array code (scipy.ndimage, skimage's watershed), no per-object
   Python loop, and deterministic. Every step after the threshold is local (support below one nucleus
   diameter plus ``local_um``), so the tiled path (:mod:`._tiling`), which fixes ``T`` for the whole
   region, gives the whole-region labels.

Version 1 used fixed floors tuned on her2st (``T >= 0.06``, Otsu classes >= 0.03 apart) and a global
foreground ``h > T``: on breast H&E stained ~4x paler (TNBC, Naylor et al. 2019) it found 7% of the
nuclei; see ``benchmarks/bench_tnbc.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .._errors import RapaclInputError
from ._common import _positive, _relabel_by_size, check_version
from ._stain import TISSUE_OD, _haematoxylin, _optical_density

#: The threshold never goes below this (``rgb2hed`` units). Not a stain constant: it only keeps tissue
#: with (almost) no haematoxylin (pure eosin, where Ruifrok's haematoxylin is ~0 and Otsu would split
#: noise) from being thresholded; pale TNBC nuclei are ~0.02-0.05, her2st nuclei ~0.1-0.2.
MIN_THRESHOLD = 0.01
#: Otsu's two classes must differ by at least this fraction of the upper class's mean haematoxylin
#: (a ratio, independent of the stain's strength), else the region is flat: pink tissue with pixel
#: noise differs by ~0.1, nuclei in tissue by 0.4-0.75.
MIN_CONTRAST = 0.25
#: The settings that differ between the classical versions (``segment_nuclei``'s defaults when not given).
CLASSICAL_DEFAULTS: dict[str, dict[str, float]] = {
    "2": {"trim": 0.3, "min_area_um2": 12.0},
    "3": {"trim": 0.5, "min_area_um2": 8.0},
}
#: Histogram used for Otsu's threshold (shared by whole-region and tiled runs, so they agree).
_HIST_BINS = 2048
_HIST_MAX = 0.5


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
    local_um: float
    floor_fraction: float
    trim: float
    min_fill: float
    local_cap: float
    version: str = "2"
    ring_contrast: float = 0.3
    small_ring_contrast: float = 0.5
    small_fraction: float = 0.4
    ring_um: tuple[float, float] = (0.75, 1.75)

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


def _fraction(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RapaclInputError(f"{what}={value!r} is not a number") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise RapaclInputError(f"{what}={value!r} must be a number in [0, 1]")
    return v


def _make_params(
    mpp: Any,
    diameter_um: Any,
    min_area_um2: Any,
    max_area_um2: Any,
    *,
    smooth_um: Any = 0.4,
    work_mpp: Any = 0.5,
    peak_spacing: Any = 0.4,
    blob_weight: Any = 0.25,
    tissue_od: Any = TISSUE_OD,
    min_threshold: Any = MIN_THRESHOLD,
    min_contrast: Any = MIN_CONTRAST,
    local_um: Any = None,
    floor_fraction: Any = 0.8,
    trim: Any = 0.3,
    min_fill: Any = 0.8,
    local_cap: Any = 1.5,
    version: Any = "2",
    ring_contrast: Any = 0.3,
    small_ring_contrast: Any = 0.5,
    small_fraction: Any = 0.4,
    ring_um: Any = (0.75, 1.75),
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
    local = 0.4 * diameter_um if local_um is None else _positive(local_um, "local_um")
    try:
        ring_in, ring_out = (float(v) for v in ring_um)
    except (TypeError, ValueError):
        raise RapaclInputError(
            f"ring_um={ring_um!r} must be two numbers (um): the ring's inner and outer distance"
        ) from None
    if not (math.isfinite(ring_out) and 0.0 <= ring_in < ring_out):
        raise RapaclInputError(f"ring_um={ring_um!r} must satisfy 0 <= inner < outer (um)")
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
        min_contrast=_fraction(min_contrast, "min_contrast"),
        local_um=local,
        floor_fraction=_fraction(floor_fraction, "floor_fraction"),
        trim=_fraction(trim, "trim"),
        min_fill=_fraction(min_fill, "min_fill"),
        local_cap=_positive(local_cap, "local_cap"),
        version=check_version(version),
        ring_contrast=_fraction(ring_contrast, "ring_contrast"),
        small_ring_contrast=_fraction(small_ring_contrast, "small_ring_contrast"),
        small_fraction=_positive(small_fraction, "small_fraction"),
        ring_um=(ring_in, ring_out),
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


def _otsu(hist: np.ndarray) -> tuple[int, float, float] | None:
    """Otsu's split of a histogram: (last bin of the lower class, lower mean, upper mean)."""
    total = float(hist.sum())
    centers = (np.arange(_HIST_BINS) + 0.5) * (_HIST_MAX / _HIST_BINS)
    w0 = np.cumsum(hist, dtype=np.float64)
    m = np.cumsum(hist * centers, dtype=np.float64)
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None  # a single grey level
    mu0 = np.divide(m, w0, out=np.zeros_like(m), where=w0 > 0)
    mu1 = np.divide(m[-1] - m, w1, out=np.zeros_like(m), where=w1 > 0)
    between = np.where(valid, w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    i = int(np.argmax(between))
    return i, float(mu0[i]), float(mu1[i])


def _threshold_from_histogram(hist: np.ndarray, p: _Params) -> float | None:
    """Otsu threshold of the tissue histogram with the guards; ``None`` means 'no nuclei here'."""
    total = float(hist.sum())
    if total * _SAMPLE**2 < 2.0 * p.nucleus_px_w or total < 4:
        return None  # (almost) no tissue
    split = _otsu(hist)
    if split is None:
        return None  # a single grey level: flat
    i, mu0, mu1 = split
    if mu1 <= 0.0 or mu1 - mu0 < p.min_contrast * mu1:
        return None  # flat tissue: no separate nuclear class
    # pixels strictly above the upper edge of bin i are foreground
    return max(float((i + 1) * (_HIST_MAX / _HIST_BINS)), p.min_threshold)


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


def _foreground(h: np.ndarray, threshold: float, p: _Params) -> np.ndarray:
    """Locally adaptive foreground: above ``floor_fraction * T`` and above the local mean haematoxylin
    (capped at ``local_cap * T``), holes smaller than a mean nucleus filled."""
    floor = np.float32(p.floor_fraction * threshold)
    fg = h > floor
    if not fg.any():
        return fg
    local = _gaussian(h, p.local_um / p.mpp_w, truncate=2.5)
    np.minimum(local, np.float32(p.local_cap * threshold), out=local)  # dark nests stay whole
    fg &= h > local
    return _fill_small_holes(fg, p.nucleus_px_w)


def _largest_piece(labels: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected piece of every label (trimming can cut an object in two)."""
    from skimage.measure import label as label_regions

    pieces, n = label_regions(labels, background=0, connectivity=2, return_num=True)
    n_lab = int(labels.max())
    if n <= n_lab:
        return labels  # one piece per label
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[pieces.ravel()] = labels.ravel()
    area = np.bincount(pieces.ravel(), minlength=n + 1)
    ids = np.arange(1, n + 1)
    order = np.lexsort((-area[1:], owner[1:]))  # by owner, largest piece first
    first = np.ones(n, dtype=bool)
    first[1:] = owner[1:][order][1:] != owner[1:][order][:-1]
    keep = np.zeros(n + 1, dtype=bool)
    keep[ids[order][first]] = True
    return np.where(keep[pieces], labels, 0)


def _trimmed_objects(h: np.ndarray, threshold: float, p: _Params) -> tuple[np.ndarray, int] | None:
    """The split objects (:func:`_split`), each trimmed at its own level (:func:`_trim`), and their
    number; None when the region has no foreground. Shared by versions 2 and 3."""
    split = _split(h, threshold, p)
    if split is None:
        return None
    labels, blob, n = split
    if p.trim > 0:
        labels = _trim(labels, h, blob, threshold, n, p)
    return labels, n


def _watershed_labels(h: np.ndarray, threshold: float, p: _Params) -> np.ndarray:
    """Version 2: local foreground + marker watershed + per-object trim + ellipse-fill shape filter + size
    filter, at the working resolution (:func:`_split`)."""
    trimmed = _trimmed_objects(h, threshold, p)
    if trimmed is None:
        return np.zeros(h.shape, dtype=np.int32)
    labels, n = trimmed
    if p.min_fill > 0:
        labels = np.where((_ellipse_fill(labels, n) >= p.min_fill)[labels], labels, 0)
    return _relabel_by_size(labels, p.min_px_w, p.max_px_w)


def _watershed_labels_v3(h: np.ndarray, threshold: float, p: _Params) -> np.ndarray:
    """Version 3: version 2's objects (:func:`_split`, :func:`_trim`), accepted by their shape and by
    their contrast against their own surrounding ring (:func:`_ring_contrast`), then the size filter."""
    trimmed = _trimmed_objects(h, threshold, p)
    if trimmed is None:
        return np.zeros(h.shape, dtype=np.int32)
    labels, n = trimmed
    contrast, area = _ring_contrast(labels, h, n, p)
    small = area * p.mpp_w**2 < p.small_fraction * math.pi * (0.5 * p.diameter_um) ** 2
    keep = contrast >= np.where(small, p.small_ring_contrast, p.ring_contrast)
    if p.min_fill > 0:
        keep &= _ellipse_fill(labels, n) >= p.min_fill
    keep[0] = False
    return _relabel_by_size(np.where(keep[labels], labels, 0), p.min_px_w, p.max_px_w)


def _ring_contrast(labels: np.ndarray, h: np.ndarray, n: int, p: _Params) -> tuple[np.ndarray, np.ndarray]:
    """Per label (0..n): ``(mean h inside - mean h of its ring) / mean h inside``, and its area in px.

    The ring of an object is the background between ``ring_um[0]`` and ``ring_um[1]`` from it, closer to
    it than to any other object (Euclidean distance transform of the background: every background pixel
    belongs to its nearest object; pixels nearer than ``ring_um[0]`` to any object, its blurred edge, are
    left out). An object without any ring pixel (enclosed by others) has contrast 0.
    """
    background = labels == 0
    inside = ~background
    lab_in = labels[inside]
    area = np.bincount(lab_in, minlength=n + 1)
    s_in = np.bincount(lab_in, h[inside], minlength=n + 1)
    if not background.any():
        return np.zeros(n + 1), area
    dist, (iy, ix) = ndi.distance_transform_edt(background, return_indices=True)
    r0, r1 = (r / p.mpp_w for r in p.ring_um)
    ring = (dist > r0) & (dist <= r1)
    owner = labels[iy[ring], ix[ring]]
    s_ring = np.bincount(owner, h[ring], minlength=n + 1)
    c_ring = np.bincount(owner, minlength=n + 1)
    m_in = s_in / np.maximum(area, 1)
    m_ring = s_ring / np.maximum(c_ring, 1)
    ok = (c_ring > 0) & (m_in > 0)
    contrast = np.where(ok, (m_in - m_ring) / np.where(ok, m_in, 1.0), 0.0)
    return contrast, area


def _split(h: np.ndarray, threshold: float, p: _Params) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Local foreground + marker watershed, at the working resolution: (labels, blob, number of markers),
    or None when there is no foreground or no marker.

    The watershed runs on a score that is high in the middle of a nucleus: the distance to the
    background (octagonal, the mean of the chessboard and city-block distances, capped at the nucleus
    radius, so that dense nests of nuclei form a plateau) plus the haematoxylin smoothed at half the
    nucleus radius, scaled by the threshold (which separates dark nuclei inside a plateau). Markers are
    the maxima of the score within a window of ``2 * peak_spacing * radius + 1`` pixels.
    """
    from skimage.segmentation import watershed

    fg = _foreground(h, threshold, p)
    if not fg.any():
        return None
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
        return None
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
    return labels, blob, n


def _ellipse_fill(labels: np.ndarray, n: int) -> np.ndarray:
    """Per label (0..n): its area over the area of the ellipse with its second moments (1 for a filled
    ellipse, elongated or not; ~0.89 for two touching discs, lower for ragged or hollow objects)."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n + 1).astype(np.float64)
    a = np.maximum(area, 1.0)
    y = ys.astype(np.float64)
    x = xs.astype(np.float64)
    my = np.bincount(lab, y, n + 1) / a
    mx = np.bincount(lab, x, n + 1) / a
    syy = np.bincount(lab, y * y, n + 1) / a - my * my + 1.0 / 12.0  # + the pixel's own extent
    sxx = np.bincount(lab, x * x, n + 1) / a - mx * mx + 1.0 / 12.0
    sxy = np.bincount(lab, y * x, n + 1) / a - my * mx
    det = np.maximum(syy * sxx - sxy * sxy, 1e-12)
    fill = area / (4.0 * math.pi * np.sqrt(det))
    fill[0] = 0.0
    return fill


def _trim(
    labels: np.ndarray, h: np.ndarray, blob: np.ndarray, threshold: float, n: int, p: _Params
) -> np.ndarray:
    """Cut every object at its own level ``floor + trim * (peak - floor)`` (``peak``: its blob maximum)."""
    floor = p.floor_fraction * threshold
    peak = np.zeros(n + 1, dtype=np.float32)
    inside = labels > 0
    np.maximum.at(peak, labels[inside], blob[inside])
    level = np.float32(floor) + np.float32(p.trim) * np.maximum(peak - np.float32(floor), 0.0)
    level[0] = np.inf
    keep = _fill_small_holes(h > level[labels], p.nucleus_px_w)
    return _largest_piece(np.where(keep, labels, 0))


def _classical(rgb: np.ndarray, p: _Params, threshold: float | None) -> np.ndarray:
    if threshold is None:
        h, tissue = _prepare(rgb, p)
        threshold = _threshold_from_histogram(_histogram(h[::_SAMPLE, ::_SAMPLE], tissue), p)
        if threshold is None:
            return np.zeros(rgb.shape[:2], dtype=np.int32)
    else:
        h = _smoothed_haematoxylin(rgb, p)
    labels = (_watershed_labels_v3 if p.version == "3" else _watershed_labels)(h, threshold, p)
    return _upsample(labels, p.factor, rgb.shape[:2]).astype(np.int32, copy=False)
