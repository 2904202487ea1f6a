"""Nuclei of a region: segmentation, one table of per-cell measurements, and the spot radiomics.

One cell table for the CLI and the viewer (:func:`iter_cell_table`): one row per nucleus, measured
once and whole, with one centroid convention -- the mean of the nucleus's pixels in continuous
level-0 coordinates (level-0 pixel ``p`` covers ``[p, p + 1)``, the convention of spot coordinates
and ``obsm['spatial']``) -- and units in the column names (``area_um2``, ``..._Perimeter_um``,
``..._Mean_grey``).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..progress import Progress
from ..tiled import run_tasks

if TYPE_CHECKING:
    from anndata import AnnData

    from ..io.slide import Slide
    from ..io.spots import Spots
    from ..radiomics import NucleusSegmenter

Box = tuple[float, float, float, float]

#: Columns of every cell table, before the measured features.
BASE_COLUMNS = ("label", "centroid_x_px", "centroid_y_px", "n_pixels", "area_um2")

# units of pyradiomics' per-nucleus features when the pixel spacing is in um and the grey image is
# the 0-255 luminance (RadiomicsConfig.grey): appended to the column names
_SHAPE_UNITS = {
    "MeshSurface": "um2",
    "PixelSurface": "um2",
    "Perimeter": "um",
    "MaximumDiameter": "um",
    "MajorAxisLength": "um",
    "MinorAxisLength": "um",
    "PerimeterSurfaceRatio": "per_um",
}
_FIRSTORDER_UNITS = {
    "10Percentile": "grey",
    "90Percentile": "grey",
    "Maximum": "grey",
    "Minimum": "grey",
    "Mean": "grey",
    "Median": "grey",
    "Range": "grey",
    "InterquartileRange": "grey",
    "MeanAbsoluteDeviation": "grey",
    "RobustMeanAbsoluteDeviation": "grey",
    "RootMeanSquared": "grey",
    "Variance": "grey2",
    "Energy": "grey2",
    "TotalEnergy": "grey2_um2",
    "Entropy": "bits",
}


def feature_column(name: str) -> str:
    """A pyradiomics per-cell column with its unit: ``original_shape2D_Perimeter`` ->
    ``original_shape2D_Perimeter_um``; unitless features keep their name."""
    parts = name.split("_")
    if len(parts) >= 3:
        cls, feat = parts[-2], parts[-1]
        units = {"shape2D": _SHAPE_UNITS, "firstorder": _FIRSTORDER_UNITS}.get(cls, {})
        unit = units.get(feat)
        if unit:
            return f"{name}_{unit}"
    return name


@dataclass
class CellsResult:
    """The nuclei of ``box`` (level-0 px): ``labels`` (pixels of ``level``, first pixel at ``origin``
    in level px; a numpy array, or a dask array backed by a zarr store for large regions), the cell
    table (``cells``, :func:`iter_cell_table`) and the spot radiomics of the spots inside the box."""

    box: Box
    labels: Any
    level: int
    origin: tuple[int, int]
    segmenter: NucleusSegmenter
    cells: pd.DataFrame
    spot_index: np.ndarray | None = None
    spot_table: pd.DataFrame | None = None
    messages: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.cells)


def _windows(h: int, w: int, block: int) -> list[tuple[int, int]]:
    return [(ty, tx) for ty in range(0, h, block) for tx in range(0, w, block)]


def _window_cell_features(
    slide: Any, level: int, window: tuple[int, int, int, int], labels: np.ndarray, mpp: float, config: dict
) -> pd.DataFrame:
    """pyradiomics per-cell features of the labelled cells of one window (level px ``x0, y0, x1,
    y1``): the unit of work of :func:`iter_cell_table`, run here or on a scheduler's worker."""
    from ..radiomics import cell_features
    from ..tiled import _SlideRef

    if isinstance(slide, _SlideRef):
        slide = slide.resolve()
    x0, y0, x1, y1 = window
    rgb = np.asarray(slide.levels[level][y0:y1, x0:x1])
    feats = cell_features(rgb, labels, config, mpp=mpp)
    return feats.drop(columns=["centroid_y", "centroid_x", "area"], errors="ignore")


def iter_cell_table(
    slide: Slide,
    labels: Any,
    origin: tuple[int, int],
    *,
    level: int = 0,
    features: bool = True,
    config: Mapping[str, Any] | None = None,
    block: int = 1024,
    scheduler: Any = None,
) -> Generator[Progress, None, pd.DataFrame]:
    """One row per nucleus of a label image (``labels``: numpy or dask, pixels of ``level``, its first
    pixel at ``origin`` = ``(x, y)`` in level px), read ``block`` x ``block`` at a time.

    Columns: ``label``; ``centroid_x_px``, ``centroid_y_px`` (mean of the nucleus's pixels, continuous
    level-0 px); ``n_pixels`` (at ``level``); ``area_um2``; with ``features``, pyradiomics' shape2D and
    first-order features of each nucleus (:func:`~napari_rapacl.radiomics.cell_features`, pixel spacing
    in um) with units in their names (:func:`feature_column`). Each nucleus belongs to the block that
    holds its centroid's pixel and is measured once, whole, in a window of that block plus a margin of
    the largest nucleus size (the other labels masked out); nuclei too small for pyradiomics get NaN
    features. Windows run on ``scheduler`` (None: here; see :func:`run_tasks`).
    """
    from ..segmentation import DEFAULT_MAX_AREA_UM2

    ds = float(slide.downsamples[level])
    mpp_level = slide.require_mpp("cell measurements") * ds
    h, w = (int(v) for v in labels.shape)
    blocks = _windows(h, w, block)
    top = np.asarray(labels.max())
    n = int(top.compute() if hasattr(top, "compute") else top)
    count = np.zeros(n + 1, dtype=np.int64)
    sum_y = np.zeros(n + 1, dtype=np.float64)
    sum_x = np.zeros(n + 1, dtype=np.float64)
    total = len(blocks) * (2 if features else 1)
    yield Progress("cell table", 0, total)
    for i, (ty, tx) in enumerate(blocks):
        lab = np.asarray(labels[ty : ty + block, tx : tx + block])
        ys, xs = np.nonzero(lab)
        if len(ys):
            ids = lab[ys, xs]
            count += np.bincount(ids, minlength=n + 1)
            sum_y += np.bincount(ids, weights=ys + ty, minlength=n + 1)
            sum_x += np.bincount(ids, weights=xs + tx, minlength=n + 1)
        yield Progress("cell table", i + 1, total)
    ids = np.flatnonzero(count[1:] > 0) + 1
    cy = sum_y[ids] / count[ids]  # region px, pixel centres at integers
    cx = sum_x[ids] / count[ids]
    table = pd.DataFrame(
        {
            "label": ids.astype(np.int64),
            "centroid_x_px": (origin[0] + cx + 0.5) * ds,
            "centroid_y_px": (origin[1] + cy + 0.5) * ds,
            "n_pixels": count[ids],
            "area_um2": count[ids] * mpp_level**2,
        }
    )
    if not features or not len(ids):
        return table
    from ..radiomics import RadiomicsConfig, require_radiomics
    from ..tiled import _SlideRef

    require_radiomics()
    if not isinstance(config, RadiomicsConfig):
        config = RadiomicsConfig.from_dict(config or {})
    cfg = config.to_dict()
    margin = int(math.ceil(2.0 * math.sqrt(DEFAULT_MAX_AREA_UM2 / math.pi) / mpp_level)) + 8
    own_y = np.clip(np.floor(cy + 0.5).astype(np.int64), 0, h - 1)  # the pixel holding the centroid
    own_x = np.clip(np.floor(cx + 0.5).astype(np.int64), 0, w - 1)
    source = slide if scheduler is None or scheduler == "synchronous" else _SlideRef.of(slide)
    windows = []  # (block, its cells, the window around it in region px)
    for ty, tx in blocks:
        mine = ids[(own_y >= ty) & (own_y < ty + block) & (own_x >= tx) & (own_x < tx + block)]
        if len(mine):
            wy0, wy1 = max(0, ty - margin), min(h, ty + block + margin)
            wx0, wx1 = max(0, tx - margin), min(w, tx + block + margin)
            windows.append(((ty, tx), mine, (wy0, wy1, wx0, wx1)))

    def task(mine: np.ndarray, wy0: int, wy1: int, wx0: int, wx1: int) -> tuple:
        lab = np.asarray(labels[wy0:wy1, wx0:wx1]).astype(np.int32)
        lab = np.where(np.isin(lab, mine), lab, 0).astype(np.int32)  # each cell measured in one window
        window = (origin[0] + wx0, origin[1] + wy0, origin[0] + wx1, origin[1] + wy1)
        return source, level, window, lab, mpp_level, cfg

    done = len(blocks) + (len(blocks) - len(windows))  # blocks without cells are done already
    frames = []
    yield Progress("cell radiomics", done, total)
    # label windows are read a few at a time, so a whole slide's labels are never all in memory
    lazy_tasks = ((tag, task(mine, *box)) for tag, mine, box in windows)
    for _tag, frame in run_tasks(_window_cell_features, lazy_tasks, scheduler, in_flight=16):
        frames.append(frame)
        done += 1
        yield Progress("cell radiomics", done, total)
    measured = pd.concat(frames).sort_index() if frames else pd.DataFrame(index=pd.Index([], name="label"))
    measured = measured.rename(columns=feature_column)
    table = table.join(measured, on="label", how="left")
    table.attrs["radiomics_config"] = cfg
    return table


def iter_cells(
    slide: Slide,
    box: Box | None = None,
    *,
    level: int = 0,
    segmenter: NucleusSegmenter | None = None,
    features: bool = True,
    spots: Spots | None = None,
    spot_index: np.ndarray | None = None,
    tile: int = 1024,
    out: str | Path | None = None,
    scheduler: Any = None,
    gpu: bool = False,
    n_jobs: int = 2,
    hold_labels: bool = True,
) -> Generator[Progress, None, CellsResult]:
    """Segment the nuclei of ``box`` (level-0 px, clipped to the slide; None = the whole slide) at
    pyramid ``level``, tile by tile, then build the cell table (:func:`iter_cell_table`) and, for
    ``spots`` rows ``spot_index``, the spot radiomics with the same segmenter
    (:func:`~napari_rapacl.radiomics.iter_spot_features`, RaPaCL-ST's 72; computed once per spot and
    recipe, shared with RaPaCL-ST prediction through the process-wide radiomics cache).

    ``out``: None keeps the labels in memory, as a numpy array with ``hold_labels`` (a viewer's region)
    or else as a dask array over a compressed in-memory zarr (whole slides); a ``.zarr`` folder path
    writes them there. When pyradiomics is missing the labels and centroids are still returned and
    ``messages`` says why there are no features. ``scheduler`` runs the segmentation's tile windows
    and the per-cell measurement windows (:func:`~napari_rapacl.tiled.run_tasks`; the result does not
    depend on it); ``n_jobs`` worker processes measure the spots.
    """
    from ..radiomics import NucleusSegmenter
    from ..segmentation import iter_segment_region, region_origin

    seg = segmenter if segmenter is not None else NucleusSegmenter()
    height, width = slide.shape
    box = (0.0, 0.0, float(width), float(height)) if box is None else tuple(float(v) for v in box)
    seg_kwargs = seg.segment_kwargs()  # its recorded version too: v2 checkpoints segment with v2
    if seg.method == "cellpose":
        seg_kwargs["gpu"] = bool(gpu)
    labels = yield from iter_segment_region(
        slide,
        *box,
        level=level,
        tile=tile,
        clip=True,
        out=out,
        scheduler=scheduler,
        **seg_kwargs,
    )
    if out is None and hold_labels:
        labels = np.asarray(labels, dtype=np.int32)  # a viewer's region: held (it is shown)
    origin = region_origin(slide, box, level)
    messages: list[str] = []
    if features:
        try:
            from ..radiomics import require_radiomics

            require_radiomics()
        except ImportError as exc:
            messages.append(f"no radiomics: {exc}")
            features = False
    cells = yield from iter_cell_table(
        slide, labels, origin, level=level, features=features, block=tile, scheduler=scheduler
    )
    mpp_level = slide.require_mpp("cell measurements") * float(slide.downsamples[level])
    provenance = {
        "slide": str(slide.path) if slide.path is not None else slide.name,
        "roi": [float(v) for v in box],
        "level": int(level),
        "mpp_level": float(mpp_level),
        "segmenter": seg.to_dict(),
        "segmentation_version": seg.version,  # the version that made these labels
        "n_cells": len(cells),
        "centroids": "mean of the nucleus's pixels, continuous level-0 px (pixel p covers [p, p + 1))",
    }
    if "radiomics_config" in cells.attrs:
        provenance["radiomics_config"] = cells.attrs["radiomics_config"]
    result = CellsResult(
        box=box,
        labels=labels,
        level=int(level),
        origin=origin,
        segmenter=seg,
        cells=cells,
        messages=messages,
        provenance=provenance,
    )
    if features and spots is not None and spot_index is not None and len(spot_index):
        from ..radiomics import DEFAULT_PATCH_MPP, DEFAULT_PATCH_SIZE, iter_spot_features

        sub = spots.subset(np.asarray(spot_index))
        table = pd.DataFrame({"barcode": np.asarray(sub.barcode, dtype=str), "x": sub.x, "y": sub.y})
        spot_table = yield from iter_spot_features(
            slide, table, size=DEFAULT_PATCH_SIZE, mpp=DEFAULT_PATCH_MPP, segment=seg, n_jobs=n_jobs
        )
        result.spot_index = np.asarray(spot_index, dtype=np.int64)
        result.spot_table = spot_table.reindex(table["barcode"].to_numpy())
    return result


def cells_adata(cells: pd.DataFrame, provenance: Mapping[str, Any] | None = None) -> AnnData:
    """The cell table as AnnData: one row per nucleus (``obs_names`` ``cell_<label>``), the measured
    features in ``X`` (float32, ``var_names`` with units), ``label``, ``n_pixels`` and ``area_um2`` in
    ``obs``, the centroid (x, y) in level-0 px in ``obsm['spatial']`` (as spot AnnData), provenance in
    ``uns['napari_rapacl']``."""
    import anndata as ad

    from ..export import PROVENANCE_KEY, sanitize_uns

    base = [c for c in BASE_COLUMNS if c in cells.columns]
    features = [c for c in cells.columns if c not in BASE_COLUMNS]
    obs = cells[[c for c in base if not c.startswith("centroid_")]].copy()
    obs.index = pd.Index([f"cell_{v}" for v in cells["label"]], name="cell_id")
    X = cells[features].to_numpy(np.float32) if features else np.zeros((len(cells), 0), np.float32)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(features, dtype=str)))
    adata.obsm["spatial"] = cells[["centroid_x_px", "centroid_y_px"]].to_numpy(np.float64)
    adata.uns[PROVENANCE_KEY] = sanitize_uns(dict(provenance or {}))
    return adata


CELL_TABLE_SUFFIXES = (".h5ad", ".csv")


def write_cells(path: str | Path, cells: pd.DataFrame, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write a cell table atomically: ``.h5ad`` (:func:`cells_adata`) or ``.csv`` (every column)."""
    from .._atomic import write_atomic
    from .._errors import RapaclInputError
    from ..export import write_h5ad

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return write_h5ad(cells_adata(cells, provenance), path)
    if suffix == ".csv":
        write_atomic(path, lambda tmp: cells.to_csv(tmp, index=False))
        return path
    raise RapaclInputError(f"{path}: a cell table is written as .h5ad or .csv, not {suffix or '(none)'!r}")


def iter_write_cells(
    path: str | Path, cells: pd.DataFrame, provenance: Mapping[str, Any] | None = None
) -> Generator[Progress, None, Path]:
    """:func:`write_cells` as a job (one atomic write: it completes or leaves no file)."""
    yield Progress("write cells", 0, 1)
    return write_cells(path, cells, provenance)
