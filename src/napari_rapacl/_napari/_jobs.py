"""The work behind the dock widgets, Qt-free: generators that yield :class:`~napari_rapacl.progress.Progress`
between tiles and return one result object, so a widget runs them in a ``thread_worker`` (progress in the
activity dock, cancel between tiles) and a script or test simply drains them.

Nothing here touches a layer: the widgets write the returned results into layers in the UI thread, in one
step, so a cancelled job leaves the layers as they were.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..progress import Progress
from .layers import Box, spots_from_layer_data

if TYPE_CHECKING:
    from ..io.slide import Slide
    from ..io.spots import Spots


log = logging.getLogger(__name__)


def avoid_llvm_clash() -> bool:
    """Keep torch from importing triton into a process where an OpenGL driver already loaded LLVM.

    Mesa's software renderer (llvmpipe, what napari gets under Xvfb or on a VM without a GPU) loads
    ``libLLVM``; triton (imported by ``torch._dynamo``, which torchvision and timm import) carries its own
    LLVM, and loading it after Mesa's crashes the interpreter (SIGSEGV). When ``libLLVM`` is mapped and
    triton is not imported yet, ``sys.modules["triton"] = None`` makes torch see triton as absent (it is
    optional: only ``torch.compile`` GPU kernels need it). Returns True when it did so.
    """
    if "triton" in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            maps = fh.read()
    except OSError:  # not Linux
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None
    log.warning("an OpenGL driver loaded LLVM into this process: triton is disabled for torch")
    return True


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready to predict, with what provenance needs to say about it."""

    model: Any
    genes: list[str]
    name: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    config: dict
    key: tuple  # identity: a different key means cached tiles and earlier predictions are stale

    @property
    def is_dense(self) -> bool:
        """PixNet-like models also give a dense (per-pixel) map."""
        return hasattr(self.model, "predict_map")

    def provenance(self) -> dict[str, Any]:
        prov: dict[str, Any] = {"model": self.name, "config": self.config}
        if self.checkpoint:
            prov["checkpoint"] = self.checkpoint
            prov["checkpoint_sha256"] = self.checkpoint_sha256
        else:
            prov["checkpoint"] = "none (random initial weights)"
        return prov


def checkpoint_path(value: Any) -> Path | None:
    """A FileEdit value as a checkpoint path: None when empty (FileEdit gives '.' or the cwd)."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or text == ".":
        return None
    path = Path(text)
    return path if not path.is_dir() else None


def default_genes(n_genes: int) -> list[str]:
    """Gene names for a model without a checkpoint: the her2st 785 when they fit, else ``gene_<i>``."""
    try:
        from ..datasets import her2st_genes

        genes = her2st_genes(download=False)
        if len(genes) == n_genes:
            return genes
    except Exception:  # no local gene list: numbered names
        pass
    return [f"gene_{i}" for i in range(n_genes)]


def load_model_choice(name: str | None, checkpoint: str | Path | None) -> LoadedModel:
    """A checkpoint defines the model (its registry name, config, weights and genes); without one,
    the registry model ``name`` is built with its default config and random initial weights."""
    if checkpoint is not None:
        from ..export import checkpoint_sha256
        from ..models.checkpoint import load_model

        path = Path(checkpoint)
        sha = checkpoint_sha256(path)
        model, ckpt = load_model(path)
        return LoadedModel(
            model=model,
            genes=[str(g) for g in ckpt["genes"]],
            name=str(ckpt["model"]),
            checkpoint=str(path),
            checkpoint_sha256=sha,
            config=dict(ckpt["config"]),
            key=("checkpoint", str(path.resolve()), sha),
        )
    if not name:
        raise ValueError("choose a model or a checkpoint file")
    from ..models import create_model

    model = create_model(name).eval()
    return LoadedModel(
        model=model,
        genes=default_genes(model.config.n_genes),
        name=name,
        checkpoint=None,
        checkpoint_sha256=None,
        config=model.config.to_dict(),
        key=("registry", name, id(model)),
    )


_PRELOADER = None


def preload_model(name: str | None, checkpoint: str | Path | None) -> Future:
    """:func:`load_model_choice` in a background thread (one at a time, in order), with the model's
    cache key (:func:`napari_rapacl.tiled.model_key`) computed and, without a GPU, its frozen CPU
    predictor (:func:`napari_rapacl.inference.frozen_image_predictor`) built too; returns the Future
    of the :class:`LoadedModel` (its exception, if loading fails)."""
    global _PRELOADER
    if _PRELOADER is None:
        _PRELOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-rapacl-preload")
    return _PRELOADER.submit(_load_with_key, name, checkpoint)


def _load_with_key(name: str | None, checkpoint: str | Path | None) -> LoadedModel:
    import torch

    from ..inference import frozen_image_predictor
    from ..tiled import model_key

    loaded = load_model_choice(name, checkpoint)
    model_key(loaded.model)  # memoised on the model
    if not torch.cuda.is_available():
        frozen_image_predictor(loaded.model, "cpu")  # memoised per model and weights
    return loaded


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
@dataclass
class PredictResult:
    """Predictions at the spots inside ``box`` (rows ``index`` of the spots layer) and, for dense
    models, the map of ``dense_gene`` over the box."""

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


def iter_predict(
    model_choice: tuple[str | None, Path | None] | LoadedModel | Future,
    slide: Slide,
    spots: Spots,
    box: Box,
    *,
    cache=None,
    device: str = "auto",
    dense: bool = False,
    dense_gene: str | None = None,
    tile_px: int = 2048,
    batch_size: int = 64,
    scheduler=None,
    view_first: bool = False,
) -> Generator[Progress, None, PredictResult]:
    """Load the model (unless given loaded, or a Future of it from :func:`preload_model`), predict the
    spots inside ``box`` tile by tile through :func:`napari_rapacl.tiled.iter_predict_region` (tiles
    already in ``cache`` cost nothing) and, with ``dense`` and a dense model, the dense map of
    ``dense_gene`` (the model's first gene when it is None or not one of the model's;
    :func:`~napari_rapacl.tiled.iter_predict_dense`).

    With ``view_first`` the spots of the box are predicted before the rest of their tiles, and yielded
    as soon as they are known: a ``Progress`` whose ``result`` is a ``PredictResult`` with
    ``partial=True`` (the box's spots, no dense map yet), which a viewer can show at once.
    """
    import time

    from ..tiled import iter_predict_dense, iter_predict_region

    t0 = time.perf_counter()
    if isinstance(model_choice, LoadedModel):
        loaded = model_choice
    else:
        yield Progress("load model", 0, 1)
        if isinstance(model_choice, Future):  # being built in the background (preload_model)
            loaded = model_choice.result()
        else:
            loaded = load_model_choice(*model_choice)
        yield Progress("load model", 1, 1)
    t1 = time.perf_counter()
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
                    box,
                    progress.result,
                    seconds={"load": t1 - t0, "view": time.perf_counter() - t1},
                    partial=True,
                )
                progress = Progress(progress.stage, progress.done, progress.total, result=shown)
            yield progress
    finally:
        spot_job.close()  # a cancel (GeneratorExit here) stops the tiles too
    t2 = time.perf_counter()
    dense_map = None
    if dense and loaded.is_dense:
        if dense_gene not in loaded.genes:
            dense_gene = loaded.genes[0]
        channel = loaded.genes.index(dense_gene)  # by index: a model need not carry its gene names
        dense_map = yield from iter_predict_dense(
            loaded.model, slide, box, tile_px=tile_px, cache=cache, device=device, genes=[channel]
        )
    t3 = time.perf_counter()
    return _predict_result(
        loaded,
        box,
        region,
        dense=dense_map,
        dense_gene=dense_gene if dense_map is not None else None,
        seconds={"load": t1 - t0, "spots": t2 - t1, "dense": t3 - t2},
    )


def _predict_result(loaded: LoadedModel, box: Box, region, **extra) -> PredictResult:
    """A :class:`PredictResult` from a :class:`~napari_rapacl.tiled.RegionPrediction` of ``box``."""
    return PredictResult(
        loaded=loaded,
        box=tuple(int(v) for v in box),
        index=np.asarray(region.index, dtype=np.int64),
        values=np.asarray(region.values, dtype=np.float32),
        tiles_computed=int(region.tiles_computed),
        tiles_cached=int(region.tiles_cached),
        **extra,
    )


# --------------------------------------------------------------------------------------------
# cells: segmentation + radiomics
# --------------------------------------------------------------------------------------------
@dataclass
class CellsResult:
    """Nucleus labels of ``box`` (level-0 px of the box), their per-cell radiomics (``cells``, one row
    per label, ``index`` = label id) and the spot radiomics of the spots inside the box."""

    box: Box
    labels: Any
    n_labels: int
    cells: pd.DataFrame | None = None
    spot_index: np.ndarray | None = None
    spot_table: pd.DataFrame | None = None
    messages: list[str] = field(default_factory=list)


def _margin_px(mpp: float, diameter_um: float) -> int:
    from ..segmentation import DEFAULT_MAX_AREA_UM2

    max_diam_um = 2.0 * math.sqrt(DEFAULT_MAX_AREA_UM2 / math.pi)
    return int(math.ceil(max(max_diam_um, 2.0 * diameter_um) / mpp)) + 8


def iter_cell_features(
    slide: Slide, box: Box, labels, mpp: float, *, block: int = 1024, margin: int = 64, config=None
) -> Generator[Progress, None, pd.DataFrame]:
    """Per-cell radiomics (:func:`napari_rapacl.radiomics.cell_features`) of a labelled region, block by
    block: each block is read with ``margin`` px of context and keeps the cells whose centroid lies in its
    core, so a nucleus is measured whole and once. Centroids are returned in level-0 px of the slide."""
    from ..radiomics import cell_features

    x0, y0 = int(box[0]), int(box[1])
    h, w = (int(v) for v in labels.shape)
    cores = [(ty, tx) for ty in range(0, h, block) for tx in range(0, w, block)]
    frames = []
    yield Progress("cell radiomics", 0, len(cores))
    for i, (ty, tx) in enumerate(cores):
        wy0, wy1 = max(0, ty - margin), min(h, ty + block + margin)
        wx0, wx1 = max(0, tx - margin), min(w, tx + block + margin)
        lab = np.asarray(labels[wy0:wy1, wx0:wx1], dtype=np.int32)
        if lab.any():
            rgb = slide.read_region(x0 + wx0, y0 + wy0, x0 + wx1, y0 + wy1)
            df = cell_features(rgb, lab, config, mpp=mpp)
            cy = df["centroid_y"].to_numpy() + wy0
            cx = df["centroid_x"].to_numpy() + wx0
            own = (cy >= ty) & (cy < ty + block) & (cx >= tx) & (cx < tx + block)
            df = df.loc[own].copy()
            df["centroid_y"] = cy[own] + y0
            df["centroid_x"] = cx[own] + x0
            frames.append(df)
        yield Progress("cell radiomics", i + 1, len(cores))
    if frames:
        table = pd.concat(frames)
        table = table[~table.index.duplicated(keep="first")].sort_index()
    else:
        table = pd.DataFrame(columns=["centroid_y", "centroid_x", "area"], index=pd.Index([], name="label"))
    table = table.rename(columns={"centroid_y": "centroid_y_px", "centroid_x": "centroid_x_px"})
    table.insert(0, "index", table.index.to_numpy(dtype=np.int64))  # napari: row <-> label id
    return table.reset_index(drop=True)


def iter_cells(
    slide: Slide,
    box: Box,
    *,
    method: str = "classical",
    diameter_um: float = 8.0,
    cellpose_model: str | Path | None = None,
    radiomics: bool = True,
    spots: Spots | None = None,
    spot_index: np.ndarray | None = None,
    tile: int = 1024,
) -> Generator[Progress, None, CellsResult]:
    """Segment the nuclei of ``box`` (level 0, tile by tile), then, with ``radiomics``, measure every
    nucleus and the spots inside the box (``spots`` rows ``spot_index``).

    When pyradiomics is missing the labels are still returned and ``messages`` says why no radiomics.
    """
    from ..segmentation import iter_segment_region

    mpp = slide.require_mpp("nucleus segmentation")
    seg_kwargs: dict[str, Any] = {"diameter_um": float(diameter_um)}
    if method == "cellpose" and cellpose_model is not None:
        seg_kwargs["model"] = str(cellpose_model)
    labels = yield from iter_segment_region(
        slide, *box, level=0, method=method, tile=tile, clip=True, **seg_kwargs
    )
    labels = np.asarray(labels, dtype=np.int32)  # the region: small enough to hold (the viewer shows it)
    result = CellsResult(box=tuple(int(v) for v in box), labels=labels, n_labels=int(labels.max()))
    if not radiomics:
        return result
    try:
        from ..radiomics import require_radiomics

        require_radiomics()
    except ImportError as exc:
        result.messages.append(f"no radiomics: {exc}")
        return result
    margin = _margin_px(mpp, diameter_um)
    result.cells = yield from iter_cell_features(slide, box, labels, mpp, block=tile, margin=margin)
    if spots is not None and spot_index is not None and len(spot_index):
        from ..radiomics import iter_spot_features
        from ..segmentation import segment_nuclei

        sub = spots.subset(np.asarray(spot_index))
        table = pd.DataFrame({"barcode": np.asarray(sub.barcode, dtype=str), "x": sub.x, "y": sub.y})
        segment = functools.partial(segment_nuclei, method=method, **seg_kwargs)
        spot_table = yield from iter_spot_features(slide, table, segment=segment, n_jobs=1)
        result.spot_index = np.asarray(spot_index, dtype=np.int64)
        result.spot_table = spot_table.reindex(table["barcode"].to_numpy())
    return result


# --------------------------------------------------------------------------------------------
# open: a slide and its spots, placed together
# --------------------------------------------------------------------------------------------
def iter_open(
    slide_path: str | Path,
    spots_path: str | Path | None = None,
    *,
    mpp: float | None = None,
    radius: float | None = None,
) -> Generator[Progress, None, list[tuple]]:
    """Open a slide lazily and, optionally, its spots; return napari layer-data tuples
    ``(data, kwargs, layer_type)`` -- a multiscale Image in um and a Points layer on it.

    ``mpp`` (um per level-0 px) overrides the slide's metadata; when neither gives one, the spots'
    own pixel size (from a Space Ranger scale factor or the ST array pitch) is used, so both layers
    share one scale. Spots whose centres lie outside the slide raise an error naming both files.
    """
    from ..io.slide import open_slide
    from ..io.spots import read_spots
    from .layers import slide_layer_data, spots_layer_data

    steps = 2 if spots_path is not None else 1
    yield Progress("open", 0, steps)
    slide = open_slide(slide_path, mpp=mpp)
    yield Progress("open", 1, steps)
    layers = []
    spots = None
    if spots_path is not None:
        spots = read_spots(spots_path, radius=radius)
        spots.check_inside(slide.shape, name=str(slide_path))
        if slide.mpp is None and spots.mpp is not None:
            slide = slide.with_mpp(spots.mpp, source=f"spots ({Path(spots_path).name})")
    layers.append(slide_layer_data(slide))
    if spots is not None:
        name = Path(spots_path).name
        name = name[: -len("_selection.tsv")] if name.endswith("_selection.tsv") else Path(name).stem
        layers.append(
            spots_layer_data(
                spots,
                mpp=slide.mpp,
                name=f"{layers[0][1]['name']} spots",
                library_id=name,
                slide_path=str(slide.path) if slide.path else None,
            )
        )
        yield Progress("open", 2, steps)
    return layers


def iter_open_sample(section: str) -> Generator[Progress, None, list[tuple]]:
    """The her2st ``section`` (slide and spots) as layer-data tuples, from the local mirror or the
    cache (downloaded once, with a checksum, when neither has it)."""
    from ._sample import her2st_layers

    yield Progress("open sample", 0, 1)
    layers = her2st_layers(section)
    yield Progress("open sample", 1, 1)
    return layers


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def predicted_rows(features: pd.DataFrame, genes: list[str]) -> np.ndarray:
    """Rows whose every gene column holds a value (spots predicted so far)."""
    if not genes:
        return np.zeros(0, dtype=np.int64)
    values = features[genes].to_numpy(dtype=np.float64)
    return np.flatnonzero(np.isfinite(values).all(axis=1))


def spots_adata(
    data: np.ndarray,
    meta: dict,
    *,
    rows: np.ndarray | None = None,
    provenance: dict | None = None,
    with_images: bool = True,
):
    """AnnData of a spots layer's predictions (``meta``: the layer's ``features``, ``metadata``, ``name``).

    ``rows`` picks spots (default: every spot with a prediction for every gene); ``provenance`` is added
    to the layer's own (model, checkpoint sha256, regions, ...).
    """
    from ..export import to_anndata
    from .layers import META_KEY

    info = meta.get("metadata", {}).get(META_KEY, {})
    features = meta["features"]
    genes = [g for g in info.get("genes", []) if g in features.columns]
    if not genes:
        raise ValueError(
            f"layer {meta.get('name')!r} holds no predicted genes "
            "(run a prediction first; metadata['napari_rapacl']['genes'] is empty)"
        )
    ready = predicted_rows(features, genes)
    rows = ready if rows is None else np.intersect1d(np.asarray(rows, dtype=np.int64), ready)
    if len(rows) == 0:
        raise ValueError(f"layer {meta.get('name')!r}: no spot in the chosen scope has been predicted yet")
    spots = spots_from_layer_data(np.asarray(data), features, info.get("mpp")).subset(rows)
    slide = None
    if with_images and info.get("slide_path") and Path(info["slide_path"]).exists():
        from ..io.slide import open_slide

        slide = open_slide(info["slide_path"], mpp=info.get("mpp"))
    prov = dict(info.get("provenance") or {})
    prov.update(provenance or {})
    prov["genes"] = list(genes)
    return to_anndata(
        features[genes].to_numpy(dtype=np.float32)[rows],
        genes,
        spots,
        slide=slide,
        library_id=str(info.get("library_id") or meta.get("name") or "sample"),
        provenance=prov,
    )


def export_spots(path: str | Path, data: np.ndarray, meta: dict, **kwargs) -> Path:
    """Write :func:`spots_adata` to ``path`` atomically (:func:`napari_rapacl.export.write_h5ad`)."""
    from ..export import write_h5ad

    return write_h5ad(spots_adata(data, meta, **kwargs), path)


def iter_export(path: str | Path, data: np.ndarray, meta: dict, **kwargs) -> Generator[Progress, None, Path]:
    """:func:`export_spots` as a job: the AnnData is built (slide thumbnails read) between two yields, so
    a cancel up to then writes nothing; no yield follows the atomic write, which either completes (and
    is reported) or leaves no file."""
    from ..export import write_h5ad

    yield Progress("export", 0, 2)
    adata = spots_adata(data, meta, **kwargs)
    yield Progress("export", 1, 2)
    return write_h5ad(adata, path)
