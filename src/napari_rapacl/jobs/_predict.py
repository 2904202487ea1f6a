"""Predicting expression at the spots of a region (or all spots) of a slide."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import Progress
from ._models import LoadedModel, load_model_choice

if TYPE_CHECKING:
    import pandas as pd

    from ..io.slide import Slide
    from ..io.spots import Spots

Box = tuple[float, float, float, float]


@dataclass
class PredictResult:
    """Predictions at the spots inside ``box`` (rows ``index`` of the spots) and, for dense models,
    the map of ``dense_gene`` over the box; for radiomics-fed models, the raw spot radiomics the
    predictions used (``radiomics``, one row per ``index``)."""

    loaded: LoadedModel
    box: Box
    index: np.ndarray
    values: np.ndarray
    tiles_computed: int
    tiles_cached: int
    dense: Any = None  # tiled.DenseMap
    dense_gene: str | None = None
    seconds: dict = field(default_factory=dict)
    partial: bool = False  # handed out before the end: the box's spots, tiles and dense map still to come
    radiomics: pd.DataFrame | None = None

    @property
    def genes(self) -> list[str]:
        return self.loaded.genes

    @property
    def gene_reliability(self) -> dict[str, float] | None:
        """``{gene: Pearson r on the model's inner validation section}`` (NaN for genes constant
        there), from the checkpoint; None for a model without one (random weights, older files)."""
        return self.loaded.gene_reliability

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """The model's provenance plus how this prediction was made (``extra`` added)."""
        prov = self.loaded.provenance()
        prov.update(extra)
        return prov


def _resolve_model(model_choice: Any) -> Generator[Progress, None, LoadedModel]:
    if isinstance(model_choice, LoadedModel):
        return model_choice
    yield Progress("load model", 0, 1)
    building = isinstance(model_choice, Future)  # being built in the background (preload_model)
    loaded = model_choice.result() if building else load_model_choice(*model_choice)
    yield Progress("load model", 1, 1)
    return loaded


def iter_predict(
    model_choice: tuple[str | None, str | Path | None] | LoadedModel | Future,
    slide: Slide,
    spots: Spots,
    box: Box | None = None,
    *,
    cache: Any = None,
    device: str = "auto",
    dense: bool = False,
    dense_gene: str | None = None,
    tile_px: int = 2048,
    batch_size: int = 64,
    scheduler: Any = None,
    view_first: bool = False,
    radiomics_jobs: int | None = None,
    out: Callable[[str, int, int], Any] | None = None,
) -> Generator[Progress, None, PredictResult]:
    """Predict the spots inside ``box`` (level-0 px; None = every spot) tile by tile.

    The model is ``(registry name, checkpoint)`` (loaded here), a :class:`LoadedModel`, or the Future
    of one (:func:`preload_model`). Spots are predicted through
    :func:`napari_rapacl.tiled.iter_predict_region` (tiles already in ``cache`` cost nothing;
    ``cache=False`` for one pass; RaPaCL-ST's radiomics are computed per tile with the checkpoint's
    recipe); with ``dense`` and a dense model (PixNet) the map of ``dense_gene`` (the model's first
    gene when None or not one of its genes) is added (:func:`~napari_rapacl.tiled.iter_predict_dense`).

    With ``view_first`` the spots of the box are predicted before the rest of their tiles, and yielded
    as soon as they are known: a ``Progress`` whose ``result`` is a ``PredictResult`` with
    ``partial=True`` (the box's spots, no dense map yet), which a viewer can show at once.

    ``out(name, n_spots, n_genes)`` (e.g. :meth:`napari_rapacl.export.PredictionSpill.array`) returns
    an out-of-core array (HDF5) the predictions are written into tile by tile, so they never sit in
    memory at once (the CLI writing a file); the result's ``values`` is then that array. The
    checkpoint's spot smoothing, if any, is then applied a row chunk at a time from a second array
    (``"raw"`` -> ``"values"``, stage ``"smooth"``). Not with ``view_first``.
    """
    from ..tiled import iter_predict_dense, iter_predict_region

    t0 = time.perf_counter()
    loaded = yield from _resolve_model(model_choice)
    t1 = time.perf_counter()
    # the checkpoint's test-time spot smoothing (chosen on its validation section), as benchmarked
    sigma = _smoothing_sigma(loaded, slide)
    post = _spot_postprocess(sigma, slide, spots)
    region_out = None
    if out is not None:
        spilled = "raw" if sigma else "values"
        region_out = lambda n, g: out(spilled, n, g)  # noqa: E731
    height, width = slide.shape
    region_box = (0.0, 0.0, float(width), float(height)) if box is None else box
    spot_job = iter_predict_region(
        loaded.model,
        slide,
        spots.x,
        spots.y,
        radius=spots.radius,
        box=box,
        tile_px=tile_px,
        cache=cache,
        device=device,
        batch_size=batch_size,
        scheduler=scheduler,
        view_first=view_first,
        radiomics_jobs=radiomics_jobs,
        out=region_out,
    )
    try:
        while True:
            try:
                progress = next(spot_job)
            except StopIteration as stop:
                region = stop.value
                break
            if progress.result is not None:  # the box's spots, before the rest of their tiles
                shown = _predict_result(
                    loaded,
                    region_box,
                    post(progress.result),
                    seconds={"load": t1 - t0, "view": time.perf_counter() - t1},
                    partial=True,
                )
                progress = Progress(progress.stage, progress.done, progress.total, result=shown)
            yield progress
    finally:
        spot_job.close()  # a cancel (GeneratorExit here) stops the tiles too
    if out is not None and sigma:  # smoothed a row chunk at a time into the "values" array
        region = yield from _iter_smooth_out_of_core(region, out, spots, slide, sigma)
        post = lambda region: region  # noqa: E731
    t2 = time.perf_counter()
    dense_map = None
    if dense and loaded.is_dense:
        if dense_gene not in loaded.genes:
            dense_gene = loaded.genes[0]
        channel = loaded.genes.index(dense_gene)  # by index: a model need not carry its gene names
        dense_map = yield from iter_predict_dense(
            loaded.model, slide, region_box, tile_px=tile_px, cache=cache, device=device, genes=[channel]
        )
    t3 = time.perf_counter()
    return _predict_result(
        loaded,
        region_box,
        post(region),
        dense=dense_map,
        dense_gene=dense_gene if dense_map is not None else None,
        seconds={"load": t1 - t0, "spots": t2 - t1, "dense": t3 - t2},
    )


def _smoothing_sigma(loaded: LoadedModel, slide: Slide) -> float:
    """The checkpoint's spot-smoothing width in um (0 when none or the pixel size is unknown)."""
    from ..inference import model_postprocess

    setting = model_postprocess(loaded.model, loaded.checkpoint)
    if slide.mpp is None:
        return 0.0
    return float(setting.get("smooth_sigma_um") or 0.0)


def _iter_smooth_out_of_core(
    region: Any, out: Callable[[str, int, int], Any], spots: Spots, slide: Slide, sigma: float
) -> Generator[Progress, None, Any]:
    """:func:`napari_rapacl.inference.smooth_over_spots` of an out-of-core ``region.values`` into a new
    array ``out("values", ...)``, a block of rows at a time: each block's weights (the smoothing
    matrix's rows) are applied to the raw rows they reach, read a block of columns at a time, so memory
    holds a few blocks, not the values."""
    import dataclasses

    from ..export import CHUNK_BYTES
    from ..inference import spot_smoothing_matrix

    raw = region.values
    n, g = (int(v) for v in raw.shape)
    mat = spot_smoothing_matrix(_spots_um(spots, region.index, slide), sigma).tocsr()
    values = out("values", n, g)
    rows = max(1, CHUNK_BYTES // max(1, 8 * g))
    starts = range(0, n, rows)
    yield Progress("smooth", 0, len(starts))
    for k, a in enumerate(starts):
        b = min(n, a + rows)
        sub = mat[a:b].tocsc()
        acc = np.zeros((b - a, g), dtype=np.float64)
        reached = np.flatnonzero(np.diff(sub.indptr))  # columns (raw rows) these rows reach
        if len(reached):
            for c0 in range(int(reached[0]), int(reached[-1]) + 1, rows):
                c1 = min(n, c0 + rows)
                part = sub[:, c0:c1]
                if part.nnz:
                    acc += part @ np.asarray(raw[c0:c1], dtype=np.float64)
        values[a:b] = acc.astype(np.float32)
        yield Progress("smooth", k + 1, len(starts))
    return dataclasses.replace(region, values=values)


def _spots_um(spots: Spots, index: Any, slide: Slide) -> np.ndarray:
    """``(n, 2)`` x, y of the spots ``index`` in um (the frame spot smoothing works in)."""
    index = np.asarray(index, dtype=np.int64)
    return np.stack([spots.x[index], spots.y[index]], axis=1) * float(slide.mpp)


def _spot_postprocess(sigma: float, slide: Slide, spots: Spots) -> Any:
    """``region -> region`` with the checkpoint's spot smoothing of width ``sigma`` um
    (:func:`_smoothing_sigma`) applied over the region's spots
    (:func:`napari_rapacl.inference.postprocess_spots`; identity when ``sigma`` is 0)."""
    import dataclasses

    from ..inference import postprocess_spots

    if not sigma:
        return lambda region: region
    setting = {"smooth_sigma_um": sigma}

    def apply(region: Any) -> Any:
        values = postprocess_spots(np.asarray(region.values), _spots_um(spots, region.index, slide), setting)
        return dataclasses.replace(region, values=values)

    return apply


def _predict_result(loaded: LoadedModel, box: Box, region: Any, **extra: Any) -> PredictResult:
    """A :class:`PredictResult` from a :class:`~napari_rapacl.tiled.RegionPrediction` of ``box``."""
    from ..export import prediction_values

    return PredictResult(
        loaded=loaded,
        box=tuple(int(v) for v in box),
        index=np.asarray(region.index, dtype=np.int64),
        values=prediction_values(region.values),
        tiles_computed=int(region.tiles_computed),
        tiles_cached=int(region.tiles_cached),
        radiomics=region.radiomics,
        **extra,
    )
