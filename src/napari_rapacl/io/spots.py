"""Spot tables: positions (and optionally counts) from four on-disk formats.

One type, :class:`Spots`, holds spot centres in level-0 pixels of the slide they annotate, their
radius, their grid position, their raw counts and the pixel size the format implies.
:func:`read_spots` reads

* a 10x Space Ranger output folder (or its ``spatial/`` subfolder, or its positions CSV);
* legacy Spatial Transcriptomics (her2st layout): ``<S>_selection.tsv`` + ``<S>.tsv.gz``;
* a HEST/scanpy-style ``.h5ad`` with ``obsm['spatial']``;
* a plain CSV with columns ``x, y[, radius][, barcode]``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_rapacl._errors import (
    CorruptFileError,
    DuplicateBarcodeError,
    InvalidCountsError,
    NoOverlapError,
    RapaclInputError,
    SpotsOutsideImageError,
    UnsupportedFormatError,
)
from napari_rapacl.io._paths import require_readable

__all__ = [
    "ST_SPOT_DIAMETER_UM",
    "ST_SPOT_SPACING_UM",
    "VISIUM_SPOT_DIAMETER_UM",
    "Spots",
    "read_10x_h5",
    "read_spots",
]

#: Visium spots are 55 um across.
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Legacy ST spot centres are 200 um apart on the array grid ...
ST_SPOT_SPACING_UM = 200.0
#: ... and the spots are 100 um across.
ST_SPOT_DIAMETER_UM = 100.0

_POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def _examples(values: Sequence[Any], n: int = 3) -> str:
    shown = ", ".join(repr(str(v)) for v in list(values)[:n])
    return shown + (", ..." if len(values) > n else "")


def _name(path: Path | None) -> str:
    return str(path) if path is not None else "<in-memory spots>"


@dataclass
class Spots:
    """Spot centres, radii and (optionally) raw counts, in level-0 pixels of one slide.

    Attributes
    ----------
    barcode : np.ndarray
        ``(n,)`` unique spot identifiers (object array of ``str``).
    x, y : np.ndarray
        ``(n,)`` float64 spot centres: ``x`` is the level-0 pixel column, ``y`` the row.
    radius : np.ndarray
        ``(n,)`` float64 spot radius in level-0 pixels (a scalar is broadcast).
    array_row, array_col : np.ndarray or None
        ``(n,)`` integer grid position (Visium ``array_row/array_col``; legacy ST ``y/x``).
    counts : anndata.AnnData or None
        Raw counts, spots x genes, ``obs_names`` equal to ``barcode`` in the same order.
    mpp : float or None
        Microns per level-0 pixel if the format implies it (scalefactors, spot grid).
    source : pathlib.Path or None
        The file or folder the spots were read from (used in error messages).
    """

    barcode: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    array_row: np.ndarray | None = None
    array_col: np.ndarray | None = None
    counts: ad.AnnData | None = None
    mpp: float | None = None
    source: Path | None = field(default=None)

    def __post_init__(self) -> None:
        name = _name(self.source)
        self.barcode = np.asarray([str(b) for b in np.asarray(self.barcode).ravel()], dtype=object)
        n = self.barcode.shape[0]
        self.x = np.asarray(self.x, dtype=np.float64).ravel()
        self.y = np.asarray(self.y, dtype=np.float64).ravel()
        radius = np.asarray(self.radius, dtype=np.float64)
        self.radius = np.full(n, float(radius)) if radius.ndim == 0 else radius.ravel().copy()
        for label in ("x", "y", "radius"):
            if getattr(self, label).shape != (n,):
                raise RapaclInputError(
                    f"{name}: {label} has {getattr(self, label).shape[0]} values but there are {n} spots"
                )
        for label in ("array_row", "array_col"):
            value = getattr(self, label)
            if value is not None:
                value = np.asarray(value).ravel()
                if value.shape != (n,):
                    raise RapaclInputError(
                        f"{name}: {label} has {value.shape[0]} values but there are {n} spots"
                    )
                setattr(self, label, value.astype(np.int64))
        bad = ~(np.isfinite(self.x) & np.isfinite(self.y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RapaclInputError(
                f"{name}: {int(bad.sum())} spot(s) have NaN or infinite coordinates "
                f"(e.g. spot {self.barcode[i]!r} at x={self.x[i]}, y={self.y[i]})"
            )
        bad = ~(np.isfinite(self.radius) & (self.radius > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RapaclInputError(
                f"{name}: spot radius must be a positive number of pixels; {int(bad.sum())} spot(s) have "
                f"radius {self.radius[i]} (e.g. spot {self.barcode[i]!r})"
            )
        _check_unique(self.barcode, name)
        if self.mpp is not None:
            self.mpp = float(self.mpp)
            if not (np.isfinite(self.mpp) and self.mpp > 0):
                raise RapaclInputError(f"{name}: microns per pixel must be positive, got {self.mpp}")
        if self.counts is not None:
            if self.counts.n_obs != n:
                raise RapaclInputError(
                    f"{name}: counts have {self.counts.n_obs} rows but there are {n} spots"
                )
            if not np.array_equal(np.asarray(self.counts.obs_names, dtype=object), self.barcode):
                raise RapaclInputError(f"{name}: counts obs_names must equal the spot barcodes, in order")

    def __len__(self) -> int:
        return int(self.barcode.shape[0])

    def __repr__(self) -> str:
        genes = f", {self.counts.n_vars} genes" if self.counts is not None else ""
        mpp = f", mpp={self.mpp:.4g}" if self.mpp is not None else ""
        return f"Spots({len(self)} spots{genes}{mpp}, source={_name(self.source)!r})"

    def subset(self, index: Any) -> Spots:
        """Spots selected by a boolean mask or an integer index array (counts are subset too)."""
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise RapaclInputError(f"boolean mask has shape {index.shape}, expected ({len(self)},)")
            index = np.flatnonzero(index)
        index = index.astype(np.int64).ravel()

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return Spots(
            barcode=self.barcode[index],
            x=self.x[index],
            y=self.y[index],
            radius=self.radius[index],
            array_row=take(self.array_row),
            array_col=take(self.array_col),
            counts=None if self.counts is None else self.counts[index].copy(),
            mpp=self.mpp,
            source=self.source,
        )

    def to_dataframe(self) -> pd.DataFrame:
        """A table with columns ``barcode, x, y, radius[, array_row, array_col]``, indexed by barcode."""
        data: dict[str, np.ndarray] = {
            "barcode": self.barcode,
            "x": self.x,
            "y": self.y,
            "radius": self.radius,
        }
        if self.array_row is not None:
            data["array_row"] = self.array_row
        if self.array_col is not None:
            data["array_col"] = self.array_col
        return pd.DataFrame(data, index=pd.Index(self.barcode, dtype=object))

    def check_inside(self, shape: tuple[int, int], name: str = "image") -> None:
        """Raise :class:`SpotsOutsideImageError` if a centre lies outside an image of ``(height, width)``."""
        height, width = int(shape[0]), int(shape[1])
        outside = (self.x < 0) | (self.x >= width) | (self.y < 0) | (self.y >= height)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise SpotsOutsideImageError(
                f"{int(outside.sum())} of {len(self)} spots from {_name(self.source)} lie outside {name} "
                f"({width} x {height} px, width x height); e.g. spot {self.barcode[i]!r} at "
                f"x={self.x[i]:.1f}, y={self.y[i]:.1f}. Spot coordinates must be level-0 pixels of this "
                "image."
            )


# --------------------------------------------------------------------------------------------------
# helpers


def _check_unique(barcodes: np.ndarray | pd.Index, name: str) -> None:
    index = pd.Index(barcodes)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()
        raise DuplicateBarcodeError(
            f"{name}: {len(dup)} barcode(s) occur more than once: {_examples(dup)}; barcodes must be unique"
        )


def _check_counts(matrix: np.ndarray | sp.spmatrix, name: str) -> None:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise InvalidCountsError(f"{name}: counts must be numeric, got dtype {values.dtype}")
    finite = np.isfinite(values)
    if not finite.all():
        raise InvalidCountsError(f"{name}: counts contain {int((~finite).sum())} NaN or infinite value(s)")
    negative = values < 0
    if negative.any():
        raise InvalidCountsError(
            f"{name}: counts contain {int(negative.sum())} negative value(s) (min {values.min()}); "
            "raw counts must be >= 0"
        )


def _make_counts(
    matrix: np.ndarray | sp.spmatrix, barcodes: Sequence[str], genes: Sequence[str], name: str
) -> ad.AnnData:
    """Validated spots x genes AnnData with a float32 CSR matrix."""
    _check_counts(matrix, name)
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    var_names = pd.Index([str(g) for g in genes], dtype=object)
    adata = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(index=pd.Index([str(b) for b in barcodes], dtype=object)),
        var=pd.DataFrame(index=var_names),
    )
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def _join(
    barcodes: np.ndarray,
    counts: ad.AnnData,
    positions_name: str,
    counts_name: str,
) -> tuple[np.ndarray, ad.AnnData]:
    """Indices of the spots that have counts, and the counts in that spot order.

    Spots without a count row are dropped with a warning; count rows without a spot are ignored.
    """
    _check_unique(counts.obs_names, counts_name)
    lookup = pd.Index(counts.obs_names)
    where = lookup.get_indexer(pd.Index(barcodes, dtype=object))
    keep = np.flatnonzero(where >= 0)
    if keep.size == 0:
        raise NoOverlapError(
            f"counts {counts_name} and spot positions {positions_name} share no barcode "
            f"(positions e.g. {_examples(barcodes)}; counts e.g. {_examples(counts.obs_names)})"
        )
    missing = len(barcodes) - keep.size
    if missing:
        dropped = np.asarray(barcodes)[where < 0]
        warnings.warn(
            f"{missing} of {len(barcodes)} spots in {positions_name} have no counts in {counts_name} and "
            f"were dropped (e.g. {_examples(dropped)})",
            UserWarning,
            stacklevel=3,
        )
    joined = counts[where[keep]].copy()
    return keep, joined


def _require_file(path: Path) -> Path:
    return require_readable(path, "spot file or folder")


def _radius_or_error(radius: float | None, name: str, why: str) -> float:
    if radius is None:
        raise RapaclInputError(
            f"{name}: {why}; give the spot radius in level-0 pixels: --radius on the command line, "
            "radius= in Python"
        )
    radius = float(radius)
    if not (np.isfinite(radius) and radius > 0):
        raise RapaclInputError(f"radius must be a positive number of pixels, got {radius} (for {name})")
    return radius


# --------------------------------------------------------------------------------------------------
# counts readers


def read_10x_h5(path: str | os.PathLike, *, gene_expression_only: bool = True) -> ad.AnnData:
    """Read a 10x ``filtered_feature_bc_matrix.h5`` (v3; v2 also accepted) into a float32 CSR AnnData.

    ``var_names`` are gene names (made unique), ``var['gene_ids']`` the feature ids; only
    ``Gene Expression`` features are kept unless ``gene_expression_only=False``.
    """
    import h5py

    path = _require_file(Path(path))
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                features = g["features"]
                ids = features["id"][:].astype(str)
                names = features["name"][:].astype(str)
                kinds = (
                    features["feature_type"][:].astype(str)
                    if "feature_type" in features
                    else np.full(len(ids), "Gene Expression")
                )
            else:  # v2: one group per genome
                genome = next(iter(f.keys()))
                g = f[genome]
                ids = g["genes"][:].astype(str)
                names = g["gene_names"][:].astype(str)
                kinds = np.full(len(ids), "Gene Expression")
            barcodes = g["barcodes"][:].astype(str)
            n_features, n_barcodes = (int(v) for v in g["shape"][:])
            # 10x stores features x barcodes as CSC, which is barcodes x features as CSR.
            matrix = sp.csr_matrix(
                (g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_barcodes, n_features)
            )
    except (OSError, KeyError, StopIteration, ValueError) as exc:
        raise UnsupportedFormatError(
            f"{path}: not a readable 10x feature-barcode HDF5 matrix ({type(exc).__name__}: {exc})"
        ) from exc
    if gene_expression_only:
        keep = kinds == "Gene Expression"
        matrix, ids, names = matrix[:, keep], ids[keep], names[keep]
    adata = _make_counts(matrix, barcodes, names, str(path))
    adata.var["gene_ids"] = ids
    return adata


def _read_counts_table(path: Path) -> ad.AnnData:
    """A spots x genes text table (tsv/csv, optionally gzipped); first column is the spot id."""
    sep = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        header = fh.readline().rstrip("\r\n").split(sep)
    if len(header) < 2:
        raise UnsupportedFormatError(f"{path}: expected a spots x genes table with a header row")
    # The C engine with type inference reads a 15k-gene table in well under a second; a per-column
    # dtype mapping is several times slower. Types are checked after reading.
    try:
        table = pd.read_csv(path, sep=sep, index_col=0, engine="c", low_memory=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise UnsupportedFormatError(f"{path}: cannot parse the counts table ({exc})") from exc
    bad = [str(c) for c, t in table.dtypes.items() if not (pd.api.types.is_numeric_dtype(t))]
    if bad:
        raise InvalidCountsError(
            f"{path}: counts must be numbers; column(s) {_examples(bad)} hold non-numeric values"
        )
    genes = [str(g) for g in header[1:]]
    if len(genes) != table.shape[1]:
        genes = [str(c) for c in table.columns]
    barcodes = [str(b) for b in table.index]
    _check_unique(pd.Index(barcodes), str(path))
    return _make_counts(table.to_numpy(dtype=np.float32), barcodes, genes, str(path))


def _read_h5ad_counts(path: Path) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    return _counts_from_anndata(adata, path)


def _counts_from_anndata(adata: ad.AnnData, path: Path) -> ad.AnnData:
    matrix = adata.layers.get("counts", adata.X)
    if matrix is None:
        raise InvalidCountsError(f"{path}: the AnnData has no X and no layers['counts']")
    counts = _make_counts(matrix, adata.obs_names, adata.var_names, str(path))
    for column in ("gene_ids", "feature_types"):
        if column in adata.var:
            counts.var[column] = np.asarray(adata.var[column])
    values = counts.X.data
    if values.size and not np.allclose(values[: min(values.size, 100_000)], np.round(values[:100_000])):
        warnings.warn(
            f"{path}: the counts ({'layers[counts]' if 'counts' in adata.layers else 'X'}) are not integers; "
            "they look normalised rather than raw",
            UserWarning,
            stacklevel=3,
        )
    return counts


def _read_counts(path: str | os.PathLike) -> ad.AnnData:
    """Counts from a 10x ``.h5``, an ``.h5ad`` or a spots x genes ``.tsv/.csv(.gz)`` table."""
    path = _require_file(Path(path))
    lower = path.name.lower()
    if lower.endswith(".h5"):
        return read_10x_h5(path)
    if lower.endswith(".h5ad"):
        return _read_h5ad_counts(path)
    if lower.removesuffix(".gz").endswith((".tsv", ".csv", ".txt")):
        return _read_counts_table(path)
    raise UnsupportedFormatError(
        f"{path}: unknown counts format; expected a 10x .h5, an .h5ad or a spots x genes .tsv/.csv(.gz)"
    )


def _attach_counts(spots: Spots, counts: ad.AnnData | None, counts_name: str) -> Spots:
    if counts is None:
        return spots
    keep, joined = _join(spots.barcode, counts, _name(spots.source), counts_name)
    out = spots.subset(keep)
    out.counts = joined
    return out


# --------------------------------------------------------------------------------------------------
# format readers


def _spaceranger_dirs(path: Path) -> tuple[Path, Path]:
    """(outs folder, spatial folder) for a Space Ranger folder, its ``spatial/`` or a positions file.

    Visium HD: a bin-size folder (``binned_outputs/square_008um``) is a Space Ranger folder of its own;
    the ``outs`` or ``binned_outputs`` folder above it holds several bin sizes, so it is refused with
    the choices."""
    if path.is_file():
        spatial = path.parent
        return spatial.parent, spatial
    binned = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
    sizes = sorted(p.name for p in binned.glob("square_*um") if (p / "spatial").is_dir())
    if sizes and not (path / "spatial" / "tissue_positions.parquet").is_file():
        raise UnsupportedFormatError(
            f"{path} is a Visium HD output with bins of several sizes: choose one, e.g. "
            f"{binned / ('square_008um' if 'square_008um' in sizes else sizes[0])} (found {', '.join(sizes)})"
        )
    if (path / "spatial").is_dir():
        return path, path / "spatial"
    return path.parent, path


def _read_positions(spatial: Path, positions: Path | None = None) -> tuple[pd.DataFrame, Path]:
    if positions is None:
        for candidate in ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"):
            if (spatial / candidate).is_file():
                positions = spatial / candidate
                break
        else:
            raise FileNotFoundError(
                f"no tissue_positions.parquet, tissue_positions.csv or tissue_positions_list.csv in "
                f"{spatial} (a Space Ranger spatial/ folder)"
            )
    if positions.suffix.lower() == ".parquet":  # Visium HD bins
        table = pd.read_parquet(positions)
        missing = [c for c in _POSITION_COLUMNS if c not in table.columns]
        if missing:
            raise UnsupportedFormatError(f"{positions}: missing column(s) {missing}")
        table["barcode"] = table["barcode"].astype(str)
        return table, positions
    with open(positions) as fh:
        first = fh.readline()
    has_header = first.split(",")[0].strip().lower() == "barcode"
    if has_header:
        table = pd.read_csv(positions, header=0, dtype={"barcode": str})
    else:
        table = pd.read_csv(positions, header=None, dtype={0: str})
    if not has_header:
        if table.shape[1] != 6:
            raise UnsupportedFormatError(
                f"{positions}: expected 6 columns ({', '.join(_POSITION_COLUMNS)}), found {table.shape[1]}"
            )
        table.columns = _POSITION_COLUMNS
    missing = [c for c in _POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise UnsupportedFormatError(f"{positions}: missing column(s) {missing}")
    table["barcode"] = table["barcode"].astype(str)
    return table, positions


def _read_scalefactors(path: Path) -> tuple[float, float]:
    """``(spot diameter in full-resolution px, um/px)`` from a Space Ranger ``scalefactors_json.json``."""
    try:
        factors = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(factors, dict) or "spot_diameter_fullres" not in factors:
        raise CorruptFileError(
            f"{path}: has no 'spot_diameter_fullres' (the spot diameter in full-resolution px)"
        )
    try:
        diameter = float(factors["spot_diameter_fullres"])
        mpp = float(factors.get("microns_per_pixel", VISIUM_SPOT_DIAMETER_UM / diameter))
    except (TypeError, ValueError, ZeroDivisionError):
        diameter, mpp = math.nan, math.nan
    if not (math.isfinite(diameter) and diameter > 0 and math.isfinite(mpp) and mpp > 0):
        bad = [f"spot_diameter_fullres={factors.get('spot_diameter_fullres')!r}"]
        if "microns_per_pixel" in factors:  # optional: named only when the file has it
            bad.append(f"microns_per_pixel={factors.get('microns_per_pixel')!r}")
        what = "positive numbers" if len(bad) > 1 else "a positive number"
        raise CorruptFileError(
            f"{path}: {' and '.join(bad)} must be {what} (is the file complete, as Space Ranger wrote it?)"
        )
    return diameter, mpp


def _read_spaceranger(path: Path, radius: float | None, counts: str | os.PathLike | None) -> Spots:
    outs, spatial = _spaceranger_dirs(path)
    table, positions = _read_positions(spatial, path if path.is_file() else None)
    _check_unique(table["barcode"].to_numpy(), str(positions))

    mpp = None
    scalefile = spatial / "scalefactors_json.json"
    if scalefile.is_file():
        diameter, mpp = _read_scalefactors(scalefile)
        if radius is None:
            radius = diameter / 2.0
    radius = _radius_or_error(radius, str(spatial), "no scalefactors_json.json to give the spot size")

    in_tissue = pd.to_numeric(table["in_tissue"], errors="coerce")
    if not in_tissue.isin([0, 1]).all():
        bad = table["in_tissue"][~in_tissue.isin([0, 1])].astype(str).unique()[:3].tolist()
        raise CorruptFileError(f"{positions}: in_tissue must be 0 or 1 for every spot, found {bad}")
    table = table[in_tissue.to_numpy() == 1]
    spots = Spots(
        barcode=table["barcode"].to_numpy(),
        x=table["pxl_col_in_fullres"].to_numpy(np.float64),
        y=table["pxl_row_in_fullres"].to_numpy(np.float64),
        radius=radius,
        array_row=table["array_row"].to_numpy(),
        array_col=table["array_col"].to_numpy(),
        mpp=mpp,
        source=positions,
    )
    counts_path = Path(counts) if counts is not None else outs / "filtered_feature_bc_matrix.h5"
    if counts is None and not counts_path.is_file():
        return spots
    return _attach_counts(spots, _read_counts(counts_path), str(counts_path))


def _st_layout_partner(path: Path, want: str) -> Path | None:
    """her2st layout: ``<root>/ST-spotfiles/<S>_selection.tsv`` <-> ``<root>/ST-cnts/<S>.tsv.gz``."""
    name = path.name
    if want == "counts":
        section = name[: -len("_selection.tsv")] if name.endswith("_selection.tsv") else None
        if section is None:
            return None
        for folder in (path.parent.parent / "ST-cnts", path.parent):
            for suffix in (".tsv.gz", ".tsv"):
                candidate = folder / f"{section}{suffix}"
                if candidate.is_file():
                    return candidate
        return None
    section = name.removesuffix(".gz").removesuffix(".tsv")
    for folder in (path.parent.parent / "ST-spotfiles", path.parent):
        candidate = folder / f"{section}_selection.tsv"
        if candidate.is_file():
            return candidate
    return None


def _st_pixels_per_unit(table: pd.DataFrame, name: str) -> float:
    """Least-squares pixels per array unit from (new_x, new_y) -> (pixel_x, pixel_y)."""
    gx = table["new_x"] if "new_x" in table else table["x"]
    gy = table["new_y"] if "new_y" in table else table["y"]
    scales = []
    for grid, pix in ((gx, table["pixel_x"]), (gy, table["pixel_y"])):
        g = np.asarray(grid, dtype=np.float64)
        p = np.asarray(pix, dtype=np.float64)
        ok = np.isfinite(g) & np.isfinite(p)
        g, p = g[ok], p[ok]
        if np.unique(np.round(g)).size < 2:
            raise RapaclInputError(f"{name}: too few distinct grid positions to fit the spot spacing")
        design = np.column_stack([g, np.ones_like(g)])
        (slope, _), *_ = np.linalg.lstsq(design, p, rcond=None)
        scales.append(abs(float(slope)))
    ppu = float(np.mean(scales))
    if not ppu > 0:
        raise RapaclInputError(f"{name}: cannot fit the spot spacing (pixels per array unit = {ppu})")
    return ppu


def _read_st(path: Path, radius: float | None, counts: str | os.PathLike | None) -> Spots:
    lower = path.name.lower()
    if lower.endswith("_selection.tsv"):
        selection = path
        counts_path = Path(counts) if counts is not None else _st_layout_partner(path, "counts")
    else:  # a counts table was given
        counts_path = Path(counts) if counts is not None else path
        selection = _st_layout_partner(path, "selection")
        if selection is None:
            raise RapaclInputError(
                f"{path}: a legacy ST counts table needs its spot file (<section>_selection.tsv with "
                "pixel coordinates); none found in ../ST-spotfiles/ or beside it. Pass the selection file "
                "as the path and the counts as counts=."
            )
    table = pd.read_csv(selection, sep="\t")
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in table.columns]
    if missing:
        raise UnsupportedFormatError(
            f"{selection}: not a legacy ST spot file, missing column(s) {missing} "
            "(expected x y new_x new_y pixel_x pixel_y selected)"
        )
    ppu = _st_pixels_per_unit(table, str(selection))
    mpp = ST_SPOT_SPACING_UM / ppu
    if radius is None:
        radius = ST_SPOT_DIAMETER_UM / 2.0 / mpp
    radius = _radius_or_error(radius, str(selection), "")
    if "selected" in table.columns:
        table = table[table["selected"].astype(int) == 1]
    xs = table["x"].to_numpy()
    ys = table["y"].to_numpy()
    barcodes = np.asarray([f"{int(a)}x{int(b)}" for a, b in zip(xs, ys, strict=True)], dtype=object)
    _check_unique(barcodes, str(selection))
    spots = Spots(
        barcode=barcodes,
        x=table["pixel_x"].to_numpy(np.float64),
        y=table["pixel_y"].to_numpy(np.float64),
        radius=radius,
        array_row=ys.astype(np.int64),
        array_col=xs.astype(np.int64),
        mpp=mpp,
        source=selection,
    )
    if counts_path is None:
        return spots
    return _attach_counts(spots, _read_counts(counts_path), str(counts_path))


def _is_visium(adata: ad.AnnData, library: dict | None) -> bool:
    texts: list[str] = []
    if library is not None:
        meta = library.get("metadata", {}) or {}
        texts += [str(meta.get(k, "")) for k in ("chemistry_description", "software_version")]
    for key in ("st_technology", "technology", "platform"):
        if key in adata.uns:
            texts.append(str(adata.uns[key]))
    return any("visium" in t.lower() or "spaceranger" in t.lower() for t in texts)


def _read_h5ad(path: Path, radius: float | None, counts: str | os.PathLike | None) -> Spots:
    adata = ad.read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise UnsupportedFormatError(f"{path}: no obsm['spatial'] (spot x, y in full-resolution pixels)")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise UnsupportedFormatError(f"{path}: obsm['spatial'] must have shape (n_spots, 2), got {xy.shape}")

    library = None
    spatial_uns = adata.uns.get("spatial")
    if isinstance(spatial_uns, dict) and spatial_uns:
        # scanpy layout: one key per library id; HEST uses library 'ST'.
        key = "ST" if "ST" in spatial_uns else next(iter(spatial_uns))
        library = spatial_uns[key]
    scalefactors = dict(library.get("scalefactors", {})) if isinstance(library, dict) else {}
    mpp = None
    diameter = scalefactors.get("spot_diameter_fullres")
    if diameter is not None and radius is None:
        radius = float(diameter) / 2.0
    if "microns_per_pixel" in scalefactors:
        mpp = float(scalefactors["microns_per_pixel"])
    elif diameter is not None and _is_visium(adata, library):
        mpp = VISIUM_SPOT_DIAMETER_UM / float(diameter)
    radius = _radius_or_error(
        radius,
        str(path),
        "no uns['spatial'][library]['scalefactors']['spot_diameter_fullres'] gives the spot size",
    )
    spots = Spots(
        barcode=np.asarray(adata.obs_names, dtype=object),
        x=xy[:, 0],
        y=xy[:, 1],
        radius=radius,
        array_row=adata.obs["array_row"].to_numpy() if "array_row" in adata.obs else None,
        array_col=adata.obs["array_col"].to_numpy() if "array_col" in adata.obs else None,
        mpp=mpp,
        source=path,
    )
    if counts is not None:
        return _attach_counts(spots, _read_counts(counts), str(counts))
    if adata.n_vars == 0:
        return spots
    spots.counts = _counts_from_anndata(adata, path)
    return spots


def _read_csv(path: Path, radius: float | None, counts: str | os.PathLike | None) -> Spots:
    table = pd.read_csv(path)
    columns = {str(c).strip().lower(): c for c in table.columns}
    missing = [c for c in ("x", "y") if c not in columns]
    if missing:
        raise UnsupportedFormatError(
            f"{path}: a spot CSV needs a header with columns x, y[, radius][, barcode]; "
            f"missing {missing} (found {list(table.columns)})"
        )
    if "radius" in columns:
        r = pd.to_numeric(table[columns["radius"]], errors="coerce").to_numpy(np.float64)
    else:
        r = _radius_or_error(radius, str(path), "has no radius column")
    if "barcode" in columns:
        barcodes = table[columns["barcode"]].astype(str).to_numpy(dtype=object)
        _check_unique(barcodes, str(path))
    else:
        barcodes = np.asarray([f"spot_{i}" for i in range(len(table))], dtype=object)
    rows = {k: columns[k] for k in ("array_row", "array_col") if k in columns}
    spots = Spots(
        barcode=barcodes,
        x=pd.to_numeric(table[columns["x"]], errors="coerce").to_numpy(np.float64),
        y=pd.to_numeric(table[columns["y"]], errors="coerce").to_numpy(np.float64),
        radius=r,
        array_row=table[rows["array_row"]].to_numpy() if "array_row" in rows else None,
        array_col=table[rows["array_col"]].to_numpy() if "array_col" in rows else None,
        source=path,
    )
    if counts is None:
        return spots
    return _attach_counts(spots, _read_counts(counts), str(counts))


def _is_positions_csv(path: Path) -> bool:
    if path.name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        return True
    with open(path) as fh:
        first = fh.readline().lower()
    return "pxl_row_in_fullres" in first and "pxl_col_in_fullres" in first


def read_spots(
    path: str | os.PathLike,
    *,
    radius: float | None = None,
    counts: str | os.PathLike | None = None,
) -> Spots:
    """Read spot positions (and counts, where the format has them) into :class:`Spots`.

    Parameters
    ----------
    path
        One of: a Space Ranger folder (or its ``spatial/`` subfolder or positions CSV; for Visium HD a
        bin-size folder such as ``binned_outputs/square_008um``, positions in parquet); a legacy ST
        ``<S>_selection.tsv`` (or its counts ``<S>.tsv(.gz)``); an ``.h5ad`` with
        ``obsm['spatial']``; a CSV with columns ``x, y[, radius][, barcode]``.
    radius
        Spot radius in level-0 pixels; overrides the format's value and is required where the
        format has none.
    counts
        A counts file (10x ``.h5``, ``.h5ad``, or spots x genes ``.tsv/.csv(.gz)``) joined on
        barcode; by default the one that goes with ``path`` (if any).

    Returns
    -------
    Spots
        Only spots that have counts are kept when counts are present (a warning says how many
        were dropped); counts rows follow the spot order.
    """
    path = _require_file(Path(path).expanduser())
    if counts is not None:
        _require_file(Path(counts))
    if radius is not None:
        radius = _radius_or_error(radius, str(path), "")
    try:
        spots = _read_any(path, radius, counts)
    except (RapaclInputError, FileNotFoundError):
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError, EOFError) as exc:
        # parsers fail in many ways on damaged or binary files: one message naming the file
        raise CorruptFileError(
            f"{path}: cannot be read as spots ({type(exc).__name__}: {str(exc)[:200]}); is it a complete, "
            "uncorrupted spot file (Space Ranger folder, *_selection.tsv, .h5ad, CSV x,y[,radius][,barcode])?"
        ) from exc
    if len(spots) == 0:
        raise RapaclInputError(
            f"{path} holds no spots: there is nothing to place or predict (check that it is the spot file "
            "of this section and that its in-tissue spots are listed)"
        )
    return spots


def _read_any(path: Path, radius: float | None, counts: Any) -> Spots:
    lower = path.name.lower()
    if path.is_dir():
        return _read_spaceranger(path, radius, counts)
    if lower.endswith("_selection.tsv") or lower.endswith((".tsv", ".tsv.gz")):
        return _read_st(path, radius, counts)
    if lower.endswith(".h5ad"):
        return _read_h5ad(path, radius, counts)
    if lower.endswith(".csv"):
        if _is_positions_csv(path):
            return _read_spaceranger(path, radius, counts)
        return _read_csv(path, radius, counts)
    if lower == "tissue_positions.parquet":
        return _read_spaceranger(path, radius, counts)
    raise UnsupportedFormatError(
        f"{path}: unsupported spot format; expected a Space Ranger folder, a legacy ST *_selection.tsv "
        "or counts .tsv(.gz), an .h5ad with obsm['spatial'], or a CSV with columns x, y[, radius][, barcode]"
    )
