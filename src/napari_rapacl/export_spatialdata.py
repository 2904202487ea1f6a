"""Export predictions as SpatialData (``.zarr``) for napari-spatialdata, spatialdata-plot and squidpy.

Layout of ``out.zarr`` (``docs/ecosystem.md`` section 3.2), for a library ``lib``:

* ``images/{lib}_wsi``: the slide as a multiscale ``(c, y, x)`` uint8 image (``c`` = ``r, g, b``, the
  channel names napari-spatialdata needs to show it as RGB), levels by 2 down to ~1024 px, written
  chunk by chunk from the lazy slide (level 0 is never held in memory whole).
* ``shapes/{lib}_spots``: one circle per spot (a ``Point`` at the spot centre and its ``radius``),
  index = ``instance_id`` (0..n-1).
* ``tables/spots``: the prediction AnnData of :func:`napari_rapacl.jobs.prediction_adata` (genes in
  ``var``, predictions in ``X``, ``obsm['spatial']``, ``uns['spatial']`` with hires/lowres for the legacy
  scanpy/squidpy tools, provenance in ``uns['napari_rapacl']``) annotating the circles:
  ``obs['region']`` (categorical, ``{lib}_spots``) and ``obs['instance_id']``
  (``uns['spatialdata_attrs']`` written by ``TableModel.parse``).

Coordinate systems: ``global`` is level-0 pixels (the frame of ``obsm['spatial']``; identity for the image
and the circles) and, when the pixel size is known, ``um`` (micrometres: ``Scale(mpp)`` on both), so
that the image, the circles and their radii line up in either.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import CorruptFileError, RapaclInputError, UnsupportedFormatError
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from .io.slide import Slide

__all__ = [
    "SPOTS_TABLE",
    "iter_write_spatialdata",
    "read_spatialdata_prediction",
    "to_spatialdata",
    "write_spatialdata",
]

#: Name of the spot table in ``sdata.tables``.
SPOTS_TABLE = "spots"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
UM_SYSTEM = "um"
#: Stop adding image levels once the longest side is below this many pixels.
MIN_LEVEL_SIZE = 1024
IMAGE_CHUNK = 1024


def _library_id(adata: AnnData) -> str:
    spatial = adata.uns.get("spatial")
    if isinstance(spatial, dict) and len(spatial) == 1:
        return str(next(iter(spatial)))
    libs = adata.obs["library_id"].unique() if "library_id" in adata.obs else []
    return str(libs[0]) if len(libs) == 1 else "sample"


def _element_name(library_id: str, what: str) -> str:
    safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in library_id) or "sample"
    return f"{safe}_{what}"


def _mpp(adata: AnnData, slide: Slide | None) -> float | None:
    if slide is not None and slide.mpp is not None:
        return float(slide.mpp)
    lib = _library_id(adata)
    sf = adata.uns.get("spatial", {}).get(lib, {}).get("scalefactors", {})
    value = sf.get("microns_per_pixel")
    return float(value) if value is not None else None


def _scale_factors(height: int, width: int) -> list[int]:
    factors = [2] if min(height, width) >= 4 else []  # always a multiscale image (a DataTree)
    h, w = height // 2, width // 2
    while max(h, w) >= 2 * MIN_LEVEL_SIZE and min(h, w) >= 4:
        factors.append(2)
        h, w = h // 2, w // 2
    return factors


def to_spatialdata(adata: AnnData, slide: Slide | None = None, *, with_x: bool = True) -> SpatialData:
    """A :class:`spatialdata.SpatialData` of a prediction AnnData (see the module doc for the layout).

    ``adata`` is a prediction AnnData (:func:`napari_rapacl.jobs.prediction_adata`: barcodes as
    ``obs_names``, ``obsm['spatial']`` in level-0 px, ``obs['radius']`` in level-0 px); ``slide`` adds the
    image (lazy: nothing is read until the object is written). ``with_x=False`` leaves the table's ``X``
    out (:func:`iter_write_spatialdata` writes it itself, a row chunk at a time). Raises
    :class:`RapaclInputError` for an AnnData without spot centres or radii.
    """
    from spatialdata import SpatialData

    return SpatialData(**{kind: dict([build()]) for kind, build in _elements(adata, slide, with_x)})


def _elements(adata: AnnData, slide: Slide | None, with_x: bool) -> list[tuple[str, Any]]:
    """``(kind, build)`` for each element of the store, in writing order (``images``, ``shapes``,
    ``tables``); ``build()`` returns ``(name, element)``. The spots are checked here, before anything is
    built or written; each element is built only when asked for, so that a writer can build, write and
    drop them one at a time."""
    if "spatial" not in adata.obsm or np.asarray(adata.obsm["spatial"]).shape != (adata.n_obs, 2):
        raise RapaclInputError("the predictions have no obsm['spatial'] (x, y) spot centres to place")
    if "radius" not in adata.obs:
        raise RapaclInputError("the predictions have no obs['radius'] (spot radius, level-0 px)")
    radius = np.asarray(adata.obs["radius"], dtype=np.float64)
    if not np.all(np.isfinite(radius)) or (radius <= 0).any():
        raise RapaclInputError("obs['radius'] must be finite and > 0 for every spot (level-0 px)")
    lib = _library_id(adata)
    mpp = _mpp(adata, slide)
    spots_name = _element_name(lib, "spots")

    def transforms() -> dict[str, Any]:
        from spatialdata.transformations import Identity, Scale

        out: dict[str, Any] = {"global": Identity()}
        if mpp is not None:
            out[UM_SYSTEM] = Scale([mpp, mpp], axes=("y", "x"))
        return out

    def image() -> tuple[str, Any]:
        from spatialdata.models import Image2DModel

        level0 = slide.levels[0]  # (y, x, 3) dask uint8
        height, width = slide.shape
        cyx = level0.transpose(2, 0, 1).rechunk((3, IMAGE_CHUNK, IMAGE_CHUNK))
        return _element_name(lib, "wsi"), Image2DModel.parse(
            cyx,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=_scale_factors(height, width) or None,
            chunks=(3, IMAGE_CHUNK, IMAGE_CHUNK),
            transformations=transforms(),
        )

    def circles() -> tuple[str, Any]:
        import geopandas as gpd
        import pandas as pd
        from shapely import points
        from spatialdata.models import ShapesModel

        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        frame = gpd.GeoDataFrame({"radius": radius}, geometry=points(xy), index=pd.RangeIndex(adata.n_obs))
        return spots_name, ShapesModel.parse(frame, transformations=transforms())

    def table() -> tuple[str, Any]:
        import anndata as ad
        import pandas as pd
        from spatialdata.models import TableModel

        n = adata.n_obs
        # a new AnnData over the same X (no copy of the predictions), its own obs with the link columns
        tab = ad.AnnData(
            X=adata.X if with_x else None,
            obs=adata.obs.copy(),
            var=adata.var.copy(),
            obsm=dict(adata.obsm.items()),
            layers=dict(adata.layers.items()),
            uns=dict(adata.uns.items()),
        )
        tab.obs[REGION_KEY] = pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[spots_name])
        tab.obs[INSTANCE_KEY] = np.arange(n, dtype=np.int64)
        return SPOTS_TABLE, TableModel.parse(
            tab, region=spots_name, region_key=REGION_KEY, instance_key=INSTANCE_KEY
        )

    kinds = [("images", image)] if slide is not None else []
    return [*kinds, ("shapes", circles), ("tables", table)]


def iter_write_spatialdata(
    adata: AnnData, path: str | os.PathLike, slide: Slide | None = None, *, overwrite: bool = False
) -> Generator[Progress, None, Path]:
    """:func:`to_spatialdata` written to ``path`` (a ``.zarr`` folder), as a job: the store is written into
    a temporary folder beside ``path`` and renamed in at the end (an existing store is replaced only with
    ``overwrite``, by rename aside, rename in, then delete), so an interruption leaves the old store or the
    new one, never a half-written one."""
    from spatialdata import SpatialData

    from ._atomic import replace_dir
    from ._memory import release_freed_memory

    path = Path(path)
    if path.suffix.lower() != ".zarr":
        raise RapaclInputError(f"{path}: a SpatialData store is a folder named *.zarr")
    if path.exists() and not overwrite:
        raise RapaclInputError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {path.parent}")
    # everything but the predictions through spatialdata; X then a row chunk at a time (spatialdata hands
    # a dask X to a threaded dask store, which held several of its 64 MB chunks at once: 1M x 785 spots
    # peaked 600 MB above the .h5ad export), with progress after each chunk
    import dask.array as da

    X = adata.X
    own_x = isinstance(X, (np.ndarray, da.Array)) and X.ndim == 2 and np.dtype(X.dtype).kind in "iuf"
    elements = _elements(adata, slide, with_x=not own_x)
    total = len(elements) + 1
    yield Progress("spatialdata", 0, total)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # an empty store, then one element at a time (image, circles, table): each is built, written and
        # dropped, with the memory it used handed back, before the next is built. Built and written
        # together they held everything at once (1M spots: ~540 MB above the predictions' own memory)
        # and the write reported nothing for ~60 s
        sdata = SpatialData()
        sdata.write(tmp, overwrite=False, consolidate_metadata=False)
        for done, (kind, build) in enumerate(elements, start=1):
            name, element = build()
            getattr(sdata, kind)[name] = element
            del element
            if kind == "images":  # the slide's pyramid, chunk by chunk: progress while it is written
                yield from _iter_write_counting_chunks(sdata, name)
            else:
                sdata.write_element(name)
            del getattr(sdata, kind)[name]
            release_freed_memory()
            yield Progress("spatialdata", done, total)
        if own_x:
            yield from _iter_write_x(X, tmp / "tables" / SPOTS_TABLE)
        _consolidate(tmp)
        replace_dir(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    yield Progress("spatialdata", total, total)
    return path


#: Seconds between two progress reports while the slide's image is written.
IMAGE_PROGRESS_S = 1.0


def _iter_write_counting_chunks(sdata: SpatialData, name: str) -> Generator[Progress]:
    """``sdata.write_element(name)`` in a helper thread, yielding ``Progress("spatialdata image", tasks
    done, tasks known)`` about every :data:`IMAGE_PROGRESS_S` seconds from dask's task callbacks (a
    16k^2 px slide's pyramid is one call of ~25 s on a CPU, otherwise silent). The total grows as
    each level's graph is computed. With a dask.distributed client as the default scheduler the
    callbacks do not fire: the stage then reports only its start and end. Errors of the write are
    raised here; closing the generator (a cancel) waits for the write to end, so that the caller
    removes a finished folder."""
    import threading

    from dask.callbacks import Callback

    counts = {"done": 0, "total": 0}
    failure: list[BaseException] = []

    def write() -> None:
        try:
            sdata.write_element(name)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    def start_state(dsk, state) -> None:
        counts["total"] += len(dsk)

    def posttask(key, result, dsk, state, worker_id) -> None:
        counts["done"] += 1

    worker = threading.Thread(target=write, name="napari-rapacl-spatialdata-image", daemon=True)
    with Callback(start_state=start_state, posttask=posttask):
        worker.start()
        try:
            while worker.is_alive():
                yield Progress("spatialdata image", counts["done"], max(counts["total"], counts["done"], 1))
                worker.join(IMAGE_PROGRESS_S)
        finally:
            worker.join()
    if failure:
        raise failure[0]


#: Bytes of one zarr chunk of the table's ``X`` (whole rows).
X_CHUNK_BYTES = 4 * 2**20


def _iter_write_x(X: Any, table: Path) -> Generator[Progress, None, None]:
    """Add ``X`` (numpy, or a dask array of an out-of-core prediction) to the AnnData group ``table`` of a
    written store as anndata's dense-array encoding, one row chunk of about
    :data:`napari_rapacl.export.CHUNK_BYTES` at a time (a dask ``X`` computed block by block in this
    thread: its NaN check runs per block), yielding ``Progress("spatialdata X", chunks done, chunks)``."""
    import dask.array as da
    import zarr

    from .export import _chunk_rows

    n, g = (int(v) for v in X.shape)
    dtype = np.dtype(X.dtype)
    group = zarr.open_group(str(table), mode="r+", use_consolidated=False)
    rows = max(1, min(max(1, n), X_CHUNK_BYTES // max(1, g * dtype.itemsize)))
    arr = group.create_array("X", shape=(n, g), dtype=dtype, chunks=(rows, max(1, g)))
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    if isinstance(X, da.Array):
        blocks = X.rechunk((_chunk_rows(max(1, g)), g)) if X.numblocks[1] != 1 else X
        edges = np.concatenate([[0], np.cumsum(blocks.chunks[0])]).astype(int)
    else:
        step = _chunk_rows(max(1, g), dtype.itemsize)
        edges = np.unique(np.concatenate([np.arange(0, n, step), [n]])).astype(int)
    total = max(1, len(edges) - 1)
    yield Progress("spatialdata X", 0, total)
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if isinstance(X, da.Array):
            block = np.asarray(blocks.blocks[i].compute(scheduler="sync"), dtype=dtype)
        else:
            block = X[a:b]
        arr[a:b] = block
        del block
        yield Progress("spatialdata X", i + 1, total)


def _consolidate(store: Path) -> None:
    """The store's consolidated metadata (what ``sdata.write(consolidate_metadata=True)`` writes), now
    that every element is in it."""
    import warnings

    import zarr

    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    with warnings.catch_warnings():  # .parquet files of the shapes are not zarr: zarr says so
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(group.store)
    group.store.close()


def write_spatialdata(
    adata: AnnData, path: str | os.PathLike, slide: Slide | None = None, *, overwrite: bool = False
) -> Path:
    """:func:`iter_write_spatialdata` run to completion."""
    from .progress import run_to_completion

    return run_to_completion(iter_write_spatialdata(adata, path, slide, overwrite=overwrite))


def read_spatialdata_prediction(path: str | os.PathLike) -> tuple[SpatialData, AnnData]:
    """Open a store written by :func:`write_spatialdata`: the SpatialData and its spot table, checked
    (the table annotates the circles through ``region``/``instance_id``, one row per circle).

    Raises ``FileNotFoundError`` (no such store), :class:`CorruptFileError` (not readable as SpatialData)
    or :class:`UnsupportedFormatError` (a SpatialData store without a napari-rapacl spot table).
    """
    import spatialdata as sd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SpatialData store not found: {path}")
    try:
        sdata = sd.read_zarr(path)
    except Exception as exc:  # zarr/ome-zarr/spatialdata raise many types on damaged stores
        raise CorruptFileError(f"cannot read {path} as SpatialData: {type(exc).__name__}: {exc}") from exc
    if SPOTS_TABLE not in sdata.tables:
        raise UnsupportedFormatError(
            f"{path} is a SpatialData store without a '{SPOTS_TABLE}' table: not a napari-rapacl prediction"
        )
    table = sdata.tables[SPOTS_TABLE]
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    region = region if isinstance(region, str) else (list(region)[0] if len(region or []) == 1 else None)
    if region is None or region not in sdata.shapes:
        raise UnsupportedFormatError(f"{path}: the '{SPOTS_TABLE}' table does not annotate a shapes element")
    circles = sdata.shapes[region]
    ids = np.asarray(table.obs[attrs.get("instance_key", INSTANCE_KEY)])
    if len(circles) != table.n_obs or not np.array_equal(np.sort(ids), np.sort(np.asarray(circles.index))):
        raise CorruptFileError(
            f"{path}: the '{SPOTS_TABLE}' table ({table.n_obs} rows) does not match the {len(circles)} "
            f"circles of '{region}'"
        )
    return sdata, table
