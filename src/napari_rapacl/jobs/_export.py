"""Writing spot predictions as AnnData (``.h5ad``): one builder for the CLI and the viewer."""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..progress import Progress

if TYPE_CHECKING:
    from anndata import AnnData

    from ..io.slide import Slide
    from ..io.spots import Spots
    from ._predict import PredictResult

#: ``obsm`` key of the raw per-spot radiomics that fed a radiomics model (RaPaCL-ST).
RADIOMICS_KEY = "radiomics"
#: ``var`` column of each gene's Pearson r on the model's inner validation section(s).
RELIABILITY_KEY = "val_pearson_r"
RELIABILITY_NOTE = (
    "var['val_pearson_r']: each gene's Pearson r between prediction and measurement on the model's "
    "inner validation section(s), recorded in the checkpoint at training time (not measured on this "
    "slide); NaN where the checkpoint records none or the gene was constant there. Treat genes with a "
    "low r as unreliable."
)


def reliability_column(genes: Sequence[str], reliability: Mapping[str, Any] | None) -> np.ndarray | None:
    """``var['val_pearson_r']`` in gene order (NaN for a gene without a finite value), or None when no
    reliability is known at all."""
    if not reliability:
        return None
    out = np.full(len(genes), np.nan, dtype=np.float64)
    for i, gene in enumerate(genes):
        value = reliability.get(str(gene))
        try:
            value = float(value) if value is not None else np.nan
        except (TypeError, ValueError):
            value = np.nan
        out[i] = value if np.isfinite(value) else np.nan
    return out


def predicted_rows(features: pd.DataFrame, genes: list[str]) -> np.ndarray:
    """Rows whose every gene column holds a value (spots predicted so far)."""
    if not genes:
        return np.zeros(0, dtype=np.int64)
    values = features[genes].to_numpy(dtype=np.float64)
    return np.flatnonzero(np.isfinite(values).all(axis=1))


def prediction_adata(
    values: np.ndarray,
    genes: Sequence[str],
    spots: Spots,
    *,
    slide: Slide | str | Path | None = None,
    mpp: float | None = None,
    library_id: str = "sample",
    provenance: Mapping[str, Any] | None = None,
    radiomics: pd.DataFrame | None = None,
    gene_reliability: Mapping[str, Any] | None = None,
    measured: Mapping[str, np.ndarray] | None = None,
) -> AnnData:
    """The AnnData of spot predictions (:func:`napari_rapacl.export.to_anndata`: ``X``, ``obsm
    ['spatial']``, ``uns['spatial']`` with the slide's images, provenance in ``uns['napari_rapacl']``)
    plus, for a radiomics-fed model, the spot radiomics that fed it in ``obsm['radiomics']`` (a
    DataFrame, one column per feature, raw values). ``gene_reliability`` (gene -> validation r, from
    the checkpoint; None or missing genes allowed) goes into ``var['val_pearson_r']`` with a note in
    ``uns['napari_rapacl']['gene_reliability']``. ``measured`` (name -> array of the predictions'
    shape, e.g. ``{"measured": log1p(CP10k) of the spots' counts}``) goes into ``layers``, so a
    reader compares measured and predicted values gene by gene.

    ``slide`` may be a path (opened here with ``mpp``, for its thumbnails); a path that no longer
    exists gives an AnnData without images.
    """
    from ..export import PROVENANCE_KEY, prediction_values, to_anndata

    if isinstance(slide, (str, Path)):
        from ..io.slide import open_slide

        slide = open_slide(slide, mpp=mpp) if Path(slide).exists() else None
    prov = dict(provenance or {})
    prov["genes"] = [str(g) for g in genes]
    adata = to_anndata(
        prediction_values(values),  # an HDF5 dataset stays out of core: read chunk by chunk
        list(genes),
        spots,
        slide=slide,
        library_id=library_id,
        measured=measured,
        provenance=prov,
    )
    column = reliability_column(list(genes), gene_reliability)
    if column is not None:
        adata.var[RELIABILITY_KEY] = column
        adata.uns[PROVENANCE_KEY]["gene_reliability"] = RELIABILITY_NOTE
    if radiomics is not None:
        frame = pd.DataFrame(radiomics).reset_index(drop=True)
        if len(frame) != adata.n_obs:
            raise ValueError(f"{len(frame)} rows of spot radiomics for {adata.n_obs} spots")
        frame.index = adata.obs_names
        frame.columns = [str(c) for c in frame.columns]
        adata.obsm[RADIOMICS_KEY] = frame.astype(np.float64)
    return adata


def result_adata(
    result: PredictResult,
    spots: Spots,
    *,
    slide: Slide | None = None,
    library_id: str = "sample",
    provenance: Mapping[str, Any] | None = None,
) -> AnnData:
    """:func:`prediction_adata` of a :class:`PredictResult` (its spots, values and radiomics)."""
    return prediction_adata(
        result.values,
        result.genes,
        spots.subset(result.index),
        slide=slide,
        library_id=library_id,
        provenance=result.provenance(**(provenance or {})),
        radiomics=result.radiomics,
        gene_reliability=getattr(result, "gene_reliability", None),
    )


#: Seconds between two progress reports of a long write (the CLI and the viewer hear from it this often).
PROGRESS_SECONDS = 2.0


def iter_export(path: str | Path, *args: Any, **kwargs: Any) -> Generator[Progress, None, Path]:
    """:func:`prediction_adata` written to ``path`` atomically, as a job: the AnnData is built (slide
    thumbnails read) between two yields, so a cancel up to then writes nothing. The write (``X`` a row
    chunk at a time) runs in a thread while this job yields ``Progress("export write", chunks done,
    chunks)`` at least every :data:`PROGRESS_SECONDS`; a cancel then stops it between two chunks and
    leaves no file (the atomic write either completes, and is reported, or leaves nothing)."""
    yield Progress("export", 0, 2)
    adata = prediction_adata(*args, **kwargs)
    yield Progress("export", 1, 2)
    return (yield from iter_write_h5ad(adata, path))


def iter_write_h5ad(adata: AnnData, path: str | Path) -> Generator[Progress, None, Path]:
    """:func:`napari_rapacl.export.write_h5ad` in a thread, as a job reporting the chunks written at least
    every :data:`PROGRESS_SECONDS`; closing the job cancels the write (nothing is left)."""
    import queue
    import threading

    from ..export import write_h5ad

    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["path"] = write_h5ad(
                adata, path, progress=lambda d, t: events.put((d, t)), cancelled=stop.is_set
            )
        except BaseException as exc:  # handed to the job's thread
            outcome["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=work, name="napari-rapacl-export", daemon=True)
    thread.start()
    done, total = 0, 1
    try:
        while True:
            try:
                item = events.get(timeout=PROGRESS_SECONDS)
            except queue.Empty:
                yield Progress("export write", done, total)  # still at it (a big chunk, the obs table)
                continue
            if item is None:
                break
            done, total = item
            yield Progress("export write", done, total)
    finally:
        if thread.is_alive():  # the job was closed (cancelled) or failed: stop between two chunks
            stop.set()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["path"]
