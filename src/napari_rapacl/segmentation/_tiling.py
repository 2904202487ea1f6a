"""Tiled segmentation of a large slide region: :func:`iter_segment_region`, :func:`segment_region`.

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
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import RapaclInputError
from ..progress import Progress
from ._api import segment_nuclei
from ._cellpose import resolve_cellpose_model
from ._classical import _HIST_BINS, _SAMPLE, _histogram, _make_params, _prepare, _threshold_from_histogram
from ._common import (
    DEFAULT_DIAMETER_UM,
    DEFAULT_MAX_AREA_UM2,
    DEFAULT_MIN_AREA_UM2,
    METHODS,
    Method,
    _positive,
    _require_skimage,
)

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

    from ..io.slide import Slide


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


def region_origin(
    slide: Slide, box: tuple[float, float, float, float], level: int = 0, clip: bool = True
) -> tuple[int, int]:
    """``(x, y)`` in pixels of ``level`` of the first label pixel :func:`iter_segment_region` returns for
    the level-0 ``box`` (after clipping it to the slide when ``clip``)."""
    b, _ = _level_box(slide, *box, level, clip)
    return b.x0, b.y0


def _read(slide: Slide, level: int, box: _Box, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
    """Rows ya:yb, columns xa:xb of the region (region-relative, level px) as uint8 RGB."""
    arr = slide.levels[level][box.y0 + ya : box.y0 + yb, box.x0 + xa : box.x0 + xb]
    return np.ascontiguousarray(np.asarray(arr.compute(scheduler="threads")))


def _segment_window(
    slide: Any,
    level: int,
    box: _Box,
    window: tuple[int, int, int, int],
    method: str,
    mpp_level: float,
    threshold: float | None,
    segment_kwargs: dict[str, Any],
) -> np.ndarray:
    """The labels of one tile window (region-relative level px ``wy0, wy1, wx0, wx1``): the unit of work
    of :func:`iter_segment_region`, run here or on a scheduler's worker."""
    from ..tiled import _SlideRef

    if isinstance(slide, _SlideRef):
        slide = slide.resolve()
    rgb = _read(slide, level, box, *window)
    if method == "classical":
        if threshold is not None and math.isinf(threshold):
            return np.zeros(rgb.shape[:2], dtype=np.int32)
        return segment_nuclei(rgb, mpp_level, "classical", threshold=threshold, **segment_kwargs)
    return segment_nuclei(rgb, mpp_level, "cellpose", **segment_kwargs)


def _windows_in_order(
    slide: Slide, tasks: list[tuple[int, tuple]], scheduler: Any, in_flight: int
) -> Generator[tuple[int, np.ndarray], None, None]:
    """``(i, labels)`` of the tile windows in task order, computed here (``scheduler=None``) or on a
    scheduler, at most ``in_flight`` windows at a time (bounded memory: results are stitched in order)."""
    from ..tiled import _SlideRef, run_tasks

    here = scheduler is None or scheduler in ("synchronous", "threads")
    ref = slide if here else _SlideRef.of(slide)
    yield from run_tasks(
        _segment_window,
        ((i, (ref, *args)) for i, args in tasks),
        scheduler,
        in_flight=in_flight,
        ordered=True,
    )


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
    scheduler: Any = None,
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
    scheduler
        Where the tile windows are segmented: None (here), ``"threads"``, ``"processes"`` or a
        ``dask.distributed`` Client / cluster / scheduler address (:func:`napari_rapacl.tiled.run_tasks`);
        the windows are stitched here, in tile order, so the labels do not depend on it.
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
        # the classical local mean reaches 2.5 local_um (its Gaussian's truncation) around a nucleus
        reach_um = 2.5 * p.local_um + p.diameter_um if method == "classical" else 0.0
        overlap = int(math.ceil(max(max_diam_um, 2.0 * p.diameter_um, reach_um) / mpp_level)) + 8
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
        tasks = [
            (i, (level, box, window(ty, tx), method, mpp_level, threshold, segment_kwargs))
            for i, (ty, tx) in enumerate(cores)
        ]
        for i, labels in _windows_in_order(slide, tasks, scheduler, in_flight=16):
            ty, tx = cores[i]
            wy0, wy1, wx0, wx1 = window(ty, tx)
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

            from .._atomic import replace_dir

            replace_dir(tmp, final)
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
