"""Export predictions as a scanpy/squidpy-ready AnnData (``.h5ad``).

Layout (``docs/ecosystem.md`` section 3.1, the legacy Visium convention):

* ``X``: predictions, float32 ``(n_spots, n_genes)``; ``var_names`` = genes; ``obs_names`` = barcodes.
* ``obs``: ``spot_id``, ``radius`` (level-0 px), ``library_id`` and ``section`` (categorical),
  ``in_tissue`` (1), and ``array_row``/``array_col`` when known.
* ``obsm['spatial']``: float64 ``(x, y)`` = (column, row) in level-0 (full-resolution) pixels.
* ``uns['spatial'][library_id]``: ``images`` (``hires`` ~2000 px, ``lowres`` ~600 px),
  ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``
  and ``microns_per_pixel`` when known) and ``metadata`` (``source_image_path``).
* ``layers[name]``: measured values on the same scale as ``X`` (e.g. measured log1p(CP10k)).
* ``uns['napari_rapacl']``: provenance (model, checkpoint hash, config, patch geometry,
  normalisation, package version, creation time).

Plot with ``scanpy.pl.spatial(adata, color=gene, library_id=lib, img_key="hires")`` or
``squidpy.pl.spatial_scatter(adata, color=gene, library_id=lib, img_res_key="hires")``.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from . import __version__
from ._atomic import write_atomic
from ._errors import CorruptFileError, DuplicateBarcodeError, RapaclInputError, UnsupportedFormatError
from .preprocess import NORMALISATION

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from .io.slide import Slide
    from .io.spots import Spots

__all__ = [
    "PROVENANCE_KEY",
    "SPILL_SUFFIX",
    "PredictionSpill",
    "checkpoint_sha256",
    "read_prediction_h5ad",
    "sanitize_uns",
    "to_anndata",
    "write_h5ad",
]

#: Where provenance lives in ``adata.uns``.
PROVENANCE_KEY = "napari_rapacl"

HIRES_SIZE = 2000
LOWRES_SIZE = 600


# --------------------------------------------------------------------------------------------
# uns sanitiser
# --------------------------------------------------------------------------------------------
def _sanitize_key(key: Any) -> str:
    # h5py treats "/" as a group separator; anndata refuses it in keys
    return str(key).replace("/", "_")


def _sanitize_scalar(value: Any) -> Any:
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _sanitize_scalar(value.value)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, complex):
        return str(value)
    return str(value)


def _is_scalar_like(value: Any) -> bool:
    return not isinstance(value, (Mapping, list, tuple, set, frozenset, np.ndarray))


def sanitize_uns(value: Any) -> Any:
    """Make a value writable into ``AnnData.uns`` (and readable back from ``.h5ad``/``.zarr``).

    Rules: mappings become dicts with ``str`` keys (``/`` replaced by ``_``); ``None`` becomes
    the string ``"None"``; ``Path`` becomes ``str``; numpy scalars become Python scalars; enums
    their value; dates ISO strings; tuples, lists and sets of scalars become 1-D numpy arrays
    (all-numeric -> numeric dtype, otherwise strings; sets are sorted); sequences holding
    mappings or sequences become dicts keyed ``"0"``, ``"1"``, ...; numeric/bool/str numpy arrays
    are kept, object arrays are converted to strings; anything else becomes ``str(value)``.
    """
    if isinstance(value, Mapping):
        return {_sanitize_key(k): sanitize_uns(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return value
        if value.dtype.kind in "U":
            return value
        if value.dtype.kind == "S":
            return value.astype(str)
        return np.array([str(_sanitize_scalar(v)) for v in value.ravel()], dtype=str).reshape(value.shape)
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        items = list(value)
        if all(_is_scalar_like(v) for v in items):
            scal = [_sanitize_scalar(v) for v in items]
            if not scal:
                return np.zeros(0, dtype=np.float64)
            if all(isinstance(v, bool) for v in scal):
                return np.asarray(scal, dtype=bool)
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scal):
                return np.asarray(scal)
            return np.asarray([str(v) for v in scal], dtype=str)
        return {str(i): sanitize_uns(v) for i, v in enumerate(items)}
    return _sanitize_scalar(value)


# --------------------------------------------------------------------------------------------
# AnnData
# --------------------------------------------------------------------------------------------
def _resize_max(img: np.ndarray, max_size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) <= max_size:
        return img
    f = max_size / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, resample=Image.Resampling.BOX), dtype=np.uint8)


def _spot_arrays(spots: Spots) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    barcode = np.asarray(spots.barcode).astype(str)
    x = np.asarray(spots.x, dtype=np.float64).ravel()
    y = np.asarray(spots.y, dtype=np.float64).ravel()
    radius = np.asarray(spots.radius, dtype=np.float64).ravel()
    n = len(barcode)
    if not (len(x) == len(y) == len(radius) == n):
        raise RapaclInputError(
            f"spots: barcode/x/y/radius lengths differ ({n}, {len(x)}, {len(y)}, {len(radius)})"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise RapaclInputError("spots: coordinates contain NaN or infinite values")
    uniq, counts = np.unique(barcode, return_counts=True)
    if (counts > 1).any():
        raise DuplicateBarcodeError(f"spots: duplicated barcode(s): {', '.join(uniq[counts > 1][:5])}")
    return barcode, x, y, radius


def to_anndata(
    prediction: np.ndarray,
    genes: Sequence[str],
    spots: Spots,
    *,
    slide: Slide | None = None,
    library_id: str = "sample",
    measured: Mapping[str, np.ndarray] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> AnnData:
    """Build a scanpy/squidpy-ready AnnData from spot predictions.

    Parameters
    ----------
    prediction
        ``(n_spots, n_genes)`` predicted values (e.g. log1p(CP10k)), finite; stored as float32 ``X``.
    genes
        Gene names, one per column, unique.
    spots
        The spots, in the row order of ``prediction`` (barcodes, level-0 px centres, radii).
    slide
        When given, ``hires`` (~2000 px) and ``lowres`` (~600 px) images and their scale factors
        are stored, and its ``mpp`` is recorded.
    library_id
        Key in ``uns['spatial']`` and value of the ``library_id``/``section`` obs columns.
    measured
        Extra arrays of the prediction's shape, stored as ``layers[name]`` (e.g. measured
        log1p(CP10k) of the same genes).
    provenance
        Stored (sanitised, see :func:`sanitize_uns`) in ``uns['napari_rapacl']``; suggested keys:
        ``model``, ``checkpoint_sha256``, ``config`` (dict), ``patch_size``, ``patch_mpp``.
        ``package_version``, ``created``, ``normalisation`` and ``mpp`` are filled in
        unless given.

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    RapaclInputError
        Shapes that do not match, non-finite values, duplicated genes, a bad library id.
    DuplicateBarcodeError
        Two spots share a barcode.
    """
    import anndata as ad

    pred = _as_prediction_array(prediction)
    if pred.ndim != 2:
        raise RapaclInputError(f"prediction must be 2-D (spots, genes), got shape {pred.shape}")
    if not np.issubdtype(pred.dtype, np.number):
        raise RapaclInputError(f"prediction must be numeric, got dtype {pred.dtype}")
    genes = [str(g) for g in genes]
    barcode, x, y, radius = _spot_arrays(spots)
    if pred.shape[0] != len(barcode):
        raise RapaclInputError(f"prediction has {pred.shape[0]} rows but there are {len(barcode)} spots")
    if pred.shape[1] != len(genes):
        raise RapaclInputError(f"prediction has {pred.shape[1]} columns but {len(genes)} gene names")
    if len(set(genes)) != len(genes):
        names, counts = np.unique(np.asarray(genes), return_counts=True)
        dup = [str(g) for g in names[counts > 1]]
        raise RapaclInputError(f"gene names must be unique; listed twice: {', '.join(dup[:5])}")
    if isinstance(pred, np.ndarray):
        n_bad = _count_not_finite(pred)
        if n_bad:
            raise RapaclInputError(f"prediction contains {n_bad} NaN or infinite value(s)")
    if not isinstance(library_id, str) or not library_id or "/" in library_id:
        raise RapaclInputError(f"library_id must be a non-empty string without '/', got {library_id!r}")

    if isinstance(pred, np.ndarray):
        X = pred if pred.dtype == np.float32 and pred.flags.c_contiguous else _float32_rows(pred)
    else:  # out of core (dask, h5py, zarr): read and checked chunk by chunk while it is written
        X = pred.astype(np.float32).map_blocks(_check_finite_block, dtype=np.float32)
    obs = pd.DataFrame(index=pd.Index(barcode, name=None))
    obs["spot_id"] = barcode
    obs["radius"] = radius
    obs["library_id"] = pd.Categorical([library_id] * len(barcode))
    obs["section"] = pd.Categorical([library_id] * len(barcode))
    obs["in_tissue"] = np.ones(len(barcode), dtype=np.int64)
    for key in ("array_row", "array_col"):
        val = getattr(spots, key, None)
        if val is not None:
            val = np.asarray(val)
            if len(val) != len(barcode):
                raise RapaclInputError(f"spots.{key} has {len(val)} values for {len(barcode)} spots")
            obs[key] = val.astype(np.int64)
    var = pd.DataFrame(index=pd.Index(genes, name=None))

    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.column_stack([x, y]).astype(np.float64)

    for name, arr in (measured or {}).items():
        arr = np.asarray(arr)
        if not isinstance(name, str) or not name or "/" in name:
            raise RapaclInputError(
                f"measured layer names must be non-empty strings without '/', got {name!r}"
            )
        if arr.shape != X.shape:
            raise RapaclInputError(f"measured layer {name!r} has shape {arr.shape}, expected {X.shape}")
        if not np.issubdtype(arr.dtype, np.number) or _count_not_finite(arr):
            raise RapaclInputError(f"measured layer {name!r} must be numeric and finite")
        adata.layers[name] = _float32_rows(arr)

    # --- uns['spatial'] -------------------------------------------------------------------
    valid_r = radius[np.isfinite(radius) & (radius > 0)]
    scalefactors: dict[str, float] = {}
    if valid_r.size:
        scalefactors["spot_diameter_fullres"] = float(2.0 * np.median(valid_r))
    mpp = getattr(slide, "mpp", None) if slide is not None else None
    if mpp is None:
        mpp = getattr(spots, "mpp", None)
    if mpp is not None:
        scalefactors["microns_per_pixel"] = float(mpp)
    images: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    if slide is not None:
        hires, hires_scale = slide.thumbnail(HIRES_SIZE)
        hires = np.ascontiguousarray(np.asarray(hires)[..., :3], dtype=np.uint8)
        lowres = _resize_max(hires, LOWRES_SIZE)
        images["hires"] = hires
        images["lowres"] = lowres
        scalefactors["tissue_hires_scalef"] = float(hires_scale)
        scalefactors["tissue_lowres_scalef"] = float(hires_scale) * lowres.shape[1] / hires.shape[1]
        if getattr(slide, "path", None) is not None:
            metadata["source_image_path"] = str(slide.path)
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }

    # --- provenance ------------------------------------------------------------------------
    prov: dict[str, Any] = {
        "package": "napari-rapacl",
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "normalisation": NORMALISATION,
        "library_id": library_id,
        "n_spots": int(X.shape[0]),
        "n_genes": int(X.shape[1]),
    }
    if mpp is not None:
        prov["mpp"] = float(mpp)
    if slide is not None:
        prov["mpp_source"] = str(getattr(slide, "mpp_source", "unknown"))
    if getattr(spots, "source", None) is not None:
        prov["spots_source"] = str(spots.source)
    prov.update(dict(provenance or {}))
    adata.uns[PROVENANCE_KEY] = sanitize_uns(prov)
    return adata


#: Rows of a prediction handled at once by checks, conversions and chunked writes: about this many bytes.
CHUNK_BYTES = 64 * 2**20


def _chunk_rows(n_cols: int, itemsize: int = 4) -> int:
    return max(1, CHUNK_BYTES // max(1, n_cols * itemsize))


def _as_prediction_array(prediction: Any) -> Any:
    """A numpy array, or a dask array for out-of-core predictions (dask, h5py, zarr, any array-like
    with ``shape``, ``dtype`` and row slicing), read in row chunks of about :data:`CHUNK_BYTES`."""
    import dask.array as da

    if isinstance(prediction, np.ndarray):
        return prediction
    if isinstance(prediction, da.Array):
        return prediction
    if hasattr(prediction, "shape") and hasattr(prediction, "dtype") and len(prediction.shape) == 2:
        rows = _chunk_rows(int(prediction.shape[1]), np.dtype(prediction.dtype).itemsize)
        return da.from_array(prediction, chunks=(rows, int(prediction.shape[1])), asarray=True)
    return np.asarray(prediction)


def _count_not_finite(arr: np.ndarray) -> int:
    """NaN/inf values of ``arr`` counted a row chunk at a time (no full-size temporary)."""
    if arr.dtype.kind in "biu" or arr.size == 0:
        return 0
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    rows = _chunk_rows(flat.shape[1], 1)
    return sum(
        int(flat[a : a + rows].size - np.isfinite(flat[a : a + rows]).sum())
        for a in range(0, len(flat), rows)
    )


def _float32_rows(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a C-contiguous float32 array, converted a row chunk at a time (one output array, no
    intermediate of the input's size)."""
    if arr.dtype == np.float32 and arr.flags.c_contiguous:
        return arr
    out = np.empty(arr.shape, dtype=np.float32)
    rows = _chunk_rows(int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1)
    for a in range(0, arr.shape[0], rows):
        out[a : a + rows] = arr[a : a + rows]
    return out


def _check_finite_block(block: np.ndarray) -> np.ndarray:
    if not np.isfinite(block).all():
        raise RapaclInputError(
            f"prediction contains {int((~np.isfinite(block)).sum())} NaN or infinite value(s)"
        )
    return block


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def write_h5ad(
    adata: AnnData,
    path: str | os.PathLike,
    *,
    compression: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Path:
    """Write ``adata`` to ``path`` atomically.

    The file is written to a temporary file in the same folder and moved into place with
    :func:`os.replace`; if writing fails, the temporary file is removed and ``path`` is left as
    it was (absent, or the previous file).

    ``X`` is written a row chunk at a time (about :data:`CHUNK_BYTES`): a dask ``X`` (out-of-core
    predictions) is read, checked and written chunk by chunk, a large numpy ``X`` is written in row
    slices, so no copy of ``X`` is made. ``progress(done, total)`` is called after each chunk;
    ``cancelled()`` returning True stops the write (:class:`InterruptedError`, nothing written).

    Parameters
    ----------
    adata
        The AnnData to write.
    path
        Target ``.h5ad`` file; its folder is created if needed.
    compression
        ``None`` (default), ``"gzip"`` or ``"lzf"``.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    if compression not in (None, "gzip", "lzf"):
        raise RapaclInputError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
    if path.is_dir():
        raise RapaclInputError(f"cannot write {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(
        path, lambda tmp: _write_chunked(adata, tmp, compression, progress, cancelled), suffix=".tmp.h5ad"
    )


def _write_chunked(
    adata: AnnData,
    tmp: Path,
    compression: str | None,
    progress: Callable[[int, int], None] | None,
    cancelled: Callable[[], bool] | None,
) -> None:
    """anndata writes everything but ``X``; ``X`` is then added with h5py a row chunk at a time (numpy
    row slices are views; a dask ``X`` is computed one block at a time), in anndata's dense-array
    encoding."""
    import dask.array as da
    import h5py

    X = adata.X
    numeric = X is not None and np.dtype(X.dtype).kind in "iuf"
    if not (isinstance(X, (np.ndarray, da.Array)) and X.ndim == 2 and numeric):  # anndata's own writer
        adata.write_h5ad(tmp, compression=compression)
        return
    n, g = (int(v) for v in X.shape)
    if isinstance(X, da.Array):
        blocks = X.rechunk((_chunk_rows(max(1, g)), g)) if X.numblocks[1] != 1 else X
        edges = np.concatenate([[0], np.cumsum(blocks.chunks[0])]).astype(int)
    else:
        rows = _chunk_rows(max(1, g), X.dtype.itemsize)
        edges = np.unique(np.concatenate([np.arange(0, n, rows), [n]])).astype(int)
    total = max(1, len(edges) - 1)
    adata.X = None
    try:
        adata.write_h5ad(tmp, compression=compression)
    finally:
        adata.X = X
    with h5py.File(tmp, "r+") as f:
        options: dict[str, Any] = {"compression": compression} if compression else {}
        if n and g:
            options["chunks"] = (max(1, min(n, _chunk_rows(g) // 8)), g)
        dtype = np.dtype(X.dtype)  # kept as given (predictions are float32 already; cell tables float64)
        dset = f.create_dataset("X", shape=(n, g), dtype=dtype, **options)
        dset.attrs["encoding-type"] = "array"
        dset.attrs["encoding-version"] = "0.2.0"
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            if cancelled is not None and cancelled():
                raise InterruptedError("export cancelled: nothing was written")
            if isinstance(X, da.Array):
                block = np.asarray(blocks.blocks[i].compute(scheduler="sync"), dtype=dtype)
            else:
                block = X[a:b]  # a view
            dset[a:b] = block
            del block
            if progress is not None:
                progress(i + 1, total)
    if progress is not None and len(edges) < 2:
        progress(1, 1)


def prediction_values(values: Any) -> Any:
    """Predictions as float32 numpy, or unchanged when held out of core (an HDF5 dataset of a
    :class:`PredictionSpill`: anything array-like with ``shape`` and ``dtype`` that is not numpy),
    which the writers then read a chunk of rows at a time."""
    if not isinstance(values, np.ndarray) and hasattr(values, "shape") and hasattr(values, "dtype"):
        return values
    return np.asarray(values, dtype=np.float32)


#: Ends the name of the temporary HDF5 file a prediction spills its values to beside its output.
SPILL_SUFFIX = ".predictions.h5"
#: Bytes of one HDF5 chunk of spilled predictions (whole rows) and of the file's chunk cache.
SPILL_CHUNK_BYTES = 2**20
SPILL_CACHE_BYTES = 32 * 2**20


class PredictionSpill:
    """Predictions kept out of core while a prediction that goes to a file runs (the CLI's ``predict
    --out``): a temporary HDF5 file beside the output, ``.<output name>.<random>.predictions.h5``, whose
    datasets the tiled job writes each finished tile into and the exporters read a row chunk at a time,
    so the ``(spots, genes)`` values (3.1 GB for 1M spots x 785 genes) never sit in memory at once.

    Use it as a context manager: the file is closed and removed at the end, also on failure. One left
    by a killed process is found by its name; the next spill for the same output removes those not
    written to for :data:`napari_rapacl._atomic.STALE_SECONDS` (as the atomic writes do).
    It needs free disk space beside the output for the values (4 bytes per spot and gene).
    """

    def __init__(self, target: str | os.PathLike) -> None:
        import tempfile

        import h5py

        from ._atomic import _remove_stale

        target = Path(target)
        _remove_stale(target, SPILL_SUFFIX)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=SPILL_SUFFIX)
        os.close(fd)
        self.path = Path(name)
        try:
            self._file = h5py.File(self.path, "w", rdcc_nbytes=SPILL_CACHE_BYTES, rdcc_nslots=10007)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def array(self, name: str, n_rows: int, n_cols: int) -> Any:
        """A new float32 ``(n_rows, n_cols)`` dataset ``name`` in the file (chunks of whole rows)."""
        rows = max(1, min(max(1, n_rows), SPILL_CHUNK_BYTES // max(1, 4 * n_cols)))
        chunks = (rows, max(1, n_cols)) if n_rows and n_cols else None
        return self._file.create_dataset(name, shape=(n_rows, n_cols), dtype=np.float32, chunks=chunks)

    def close(self) -> None:
        """Close and remove the file (idempotent)."""
        file, self._file = getattr(self, "_file", None), None
        if file is not None:
            try:
                file.close()
            finally:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> PredictionSpill:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def checkpoint_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (constant memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def read_prediction_h5ad(path: str | os.PathLike) -> AnnData:
    """Read an ``.h5ad`` written by :func:`write_h5ad` and check the layout of :func:`to_anndata`.

    Raises
    ------
    FileNotFoundError
        No such file.
    CorruptFileError
        The file is not a readable h5ad.
    UnsupportedFormatError
        The file lacks ``obsm['spatial']``, ``uns['spatial']`` or ``uns['napari_rapacl']``.
    """
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise a variety of errors on damaged files
        raise CorruptFileError(f"cannot read {path} as h5ad: {exc}") from exc
    problems = []
    spatial = adata.obsm.get("spatial") if "spatial" in adata.obsm else None
    if spatial is None or np.asarray(spatial).shape != (adata.n_obs, 2):
        problems.append("obsm['spatial'] of shape (n_spots, 2)")
    if not isinstance(adata.uns.get("spatial"), Mapping) or not adata.uns["spatial"]:
        problems.append("uns['spatial'][library_id]")
    if not isinstance(adata.uns.get(PROVENANCE_KEY), Mapping):
        problems.append(f"uns['{PROVENANCE_KEY}'] (provenance)")
    if problems:
        raise UnsupportedFormatError(
            f"{path} is not a napari-rapacl prediction file: missing {'; '.join(problems)}"
        )
    X = np.asarray(adata.X)
    if X.size and not np.all(np.isfinite(X)):
        raise CorruptFileError(f"{path}: X contains NaN or infinite values")
    return adata
