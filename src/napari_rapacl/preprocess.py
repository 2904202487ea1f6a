"""Preprocessing shared by every model: gene lists, expression normalisation and spot patches.

Conventions (``docs/methods.md`` section 5.1):

* **Normalisation.** One target transform for all models: the library size is taken over *all*
  genes of a spot, then ``ln(1 + 1e4 * x / libsize)`` ("log1p(CP10k)", natural log), then the
  genes of interest are picked out. No smoothing.
* **Gene selection** is computed on the **training sections only** (never on a held-out or test
  section), so that the choice of genes cannot leak information from the evaluation data.
* **Patches** are square crops centred on the spot centre at a documented physical resolution
  (``mpp``, microns per output pixel), read lazily from a :class:`~napari_rapacl.io.slide.Slide`
  and resampled with area averaging.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from scipy import sparse

from ._errors import InvalidCountsError, RapaclInputError

if TYPE_CHECKING:  # pragma: no cover
    from .io.slide import Slide

__all__ = [
    "NORMALISATION",
    "extract_patches",
    "iter_patches",
    "normalize_log1p_cp10k",
    "read_gene_list",
    "resolve_genes",
    "select_genes",
    "zscore_apply",
    "zscore_fit",
]

#: The name of the target transform, as recorded in provenance.
NORMALISATION = "log1p(CP10k)"

_CP = 1e4


# --------------------------------------------------------------------------------------------
# gene lists
# --------------------------------------------------------------------------------------------
def read_gene_list(path: str | os.PathLike) -> list[str]:
    """Read a gene list: one gene per line.

    Blank lines and lines starting with ``#`` are ignored; surrounding whitespace is stripped.

    Parameters
    ----------
    path
        A text file (UTF-8, an optional BOM is accepted).

    Returns
    -------
    list of str
        The genes in file order.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    RapaclInputError
        The file lists no gene, a line holds more than one field, or a gene appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene list not found: {path}")
    genes: list[str] = []
    first_line: dict[str, int] = {}
    duplicates: list[str] = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if len(line.split()) > 1:
                raise RapaclInputError(
                    f"gene list {path}, line {lineno}: expected one gene per line, got {line!r}"
                )
            if line in first_line:
                duplicates.append(f"{line} (lines {first_line[line]} and {lineno})")
                continue
            first_line[line] = lineno
            genes.append(line)
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (" ..." if len(duplicates) > 5 else "")
        raise RapaclInputError(f"gene list {path} lists {len(duplicates)} gene(s) twice: {shown}")
    if not genes:
        raise RapaclInputError(f"gene list {path} lists no gene")
    return genes


def _check_unique_genes(genes: Sequence[str], what: str = "genes") -> list[str]:
    genes = [str(g) for g in genes]
    if not genes:
        raise RapaclInputError(f"{what}: the gene list is empty")
    seen: set[str] = set()
    dup: set[str] = set()
    for g in genes:
        (dup if g in seen else seen).add(g)
    if dup:
        raise RapaclInputError(f"{what}: gene(s) listed twice: {', '.join(sorted(set(dup))[:5])}")
    return genes


# --------------------------------------------------------------------------------------------
# counts and normalisation
# --------------------------------------------------------------------------------------------
def _as_matrix(counts: Any, name: str = "counts") -> tuple[Any, np.ndarray | None]:
    """Return ``(X, var_names)`` from an AnnData, an ``(array, var_names)`` pair or an array."""
    var_names: np.ndarray | None
    if hasattr(counts, "X") and hasattr(counts, "var_names"):  # AnnData
        X, var_names = counts.X, np.asarray(counts.var_names, dtype=str)
    elif isinstance(counts, tuple) and len(counts) == 2:
        X, var_names = counts[0], np.asarray(list(counts[1]), dtype=str)
    else:
        X, var_names = counts, None
    if X is None:
        raise InvalidCountsError(f"{name}: the matrix is empty (X is None)")
    if not sparse.issparse(X):
        X = np.asarray(X)
        if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise InvalidCountsError(f"{name}: counts must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise InvalidCountsError(f"{name}: counts must be 2-D (spots, genes), got shape {X.shape}")
    if var_names is not None and len(var_names) != X.shape[1]:
        raise InvalidCountsError(f"{name}: {X.shape[1]} columns but {len(var_names)} gene names")
    values = X.data if sparse.issparse(X) else X
    if values.size:
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            raise InvalidCountsError(f"{name}: counts contain NaN or infinite values")
        signed = not (np.issubdtype(values.dtype, np.unsignedinteger) or values.dtype == bool)
        if signed and values.min() < 0:
            raise InvalidCountsError(f"{name}: counts contain negative values (min {values.min()})")
    return X, var_names


def _gene_index(
    var_names: np.ndarray, genes: Sequence[str], name: str, missing: str
) -> tuple[np.ndarray, np.ndarray]:
    """Column index of each gene (``-1`` where absent) and the mask of present genes."""
    lookup: dict[str, int] = {}
    dup: set[str] = set()
    for i, g in enumerate(var_names):
        if g in lookup:
            dup.add(g)
        else:
            lookup[g] = i
    wanted_dup = dup.intersection(genes)
    if wanted_dup:
        raise RapaclInputError(
            f"{name}: gene name(s) appear in several columns, cannot pick one: "
            f"{', '.join(sorted(wanted_dup)[:5])}"
        )
    idx = np.array([lookup.get(g, -1) for g in genes], dtype=np.int64)
    present = idx >= 0
    if not present.all():
        absent = [g for g, p in zip(genes, present, strict=True) if not p]
        shown = ", ".join(absent[:8]) + (" ..." if len(absent) > 8 else "")
        msg = f"{name}: {len(absent)} of {len(genes)} requested genes are absent from the counts: {shown}"
        if missing == "error":
            raise RapaclInputError(msg + " (pass missing='zero' to fill them with zeros)")
        warnings.warn(msg + "; they are filled with zeros", stacklevel=3)
    return idx, present


def library_size(counts: Any) -> np.ndarray:
    """Total counts per spot over all genes, ``float64 (n,)``."""
    X, _ = _as_matrix(counts)
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()


def normalize_log1p_cp10k(
    counts: Any,
    genes: Sequence[str] | None = None,
    *,
    missing: Literal["error", "zero"] = "error",
    name: str = "counts",
) -> np.ndarray:
    """Normalise raw counts to ``ln(1 + 1e4 * x / libsize)`` and pick out ``genes``.

    The library size is the sum over **all** genes of the spot, taken before subsetting.
    Spots with a zero library give zeros (not NaN).

    Parameters
    ----------
    counts
        An AnnData (sparse or dense ``X``, ``var_names`` = genes), an ``(array, var_names)`` pair,
        or a plain ``(n_spots, n_genes)`` array (then ``genes`` must be None).
    genes
        The genes to return, in this order. None keeps all columns.
    missing
        ``"error"`` (default) raises when a requested gene is absent; ``"zero"`` fills absent
        genes with zeros and warns.
    name
        How to call the input in error messages (e.g. the section or file name).

    Returns
    -------
    numpy.ndarray
        ``float32 (n_spots, len(genes))``.

    Raises
    ------
    InvalidCountsError
        Negative, NaN or infinite counts, or a matrix that is not 2-D.
    RapaclInputError
        Absent genes with ``missing="error"``, or duplicated gene names.
    """
    if missing not in ("error", "zero"):
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    X, var_names = _as_matrix(counts, name)
    libsize = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    scale = np.zeros_like(libsize)
    np.divide(_CP, libsize, out=scale, where=libsize > 0)

    if genes is None:
        sub = X
        idx, present = None, None
    else:
        genes = _check_unique_genes(genes, name)
        if var_names is None:
            raise RapaclInputError(
                f"{name}: gene names are needed to select genes; pass an AnnData or (array, var_names)"
            )
        idx, present = _gene_index(var_names, genes, name, missing)
        sub = X[:, idx[present]]

    if sparse.issparse(sub):
        sub = sub.toarray()
    values = np.asarray(sub, dtype=np.float64) * scale[:, None]
    values = np.log1p(values).astype(np.float32, copy=False)
    if present is not None and not present.all():
        out = np.zeros((X.shape[0], len(present)), dtype=np.float32)
        out[:, present] = values
        return out
    return np.ascontiguousarray(values)


def select_genes(
    train_counts: Sequence[Any],
    k: int,
    by: Literal["mean", "var"] = "mean",
    min_frac_spots: float = 0.1,
) -> list[str]:
    """Choose ``k`` genes from the **training** sections only.

    Pass only the sections a model is trained on: the selection must never see the held-out
    section, otherwise the gene list leaks information from the evaluation data.

    A gene is eligible when it is present in every section and expressed (count > 0) in at
    least ``min_frac_spots`` of the spots of **each** section. Eligible genes are ranked by the
    mean (or variance) of log1p(CP10k) over all training spots pooled; ties are broken by name.

    Parameters
    ----------
    train_counts
        Raw counts of the training sections (AnnData or ``(array, var_names)`` pairs).
    k
        How many genes to return.
    by
        ``"mean"`` (highly expressed genes) or ``"var"`` (highly variable genes).
    min_frac_spots
        Minimum fraction of spots, in every section, with a non-zero count.

    Returns
    -------
    list of str
        ``k`` gene names, best first.

    Raises
    ------
    RapaclInputError
        No section given, a bad ``k``/``by``/``min_frac_spots``, or fewer than ``k`` eligible genes.
    """
    single_pair = (
        isinstance(train_counts, tuple)
        and len(train_counts) == 2
        and (isinstance(train_counts[0], np.ndarray) or sparse.issparse(train_counts[0]))
    )
    if hasattr(train_counts, "X") or single_pair:
        raise RapaclInputError("select_genes: pass a list of training sections, not a single section")
    train_counts = list(train_counts)
    if len(train_counts) == 0:
        raise RapaclInputError("select_genes: no training section given")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RapaclInputError(f"select_genes: k must be a positive integer, got {k!r}")
    if by not in ("mean", "var"):
        raise RapaclInputError(f"select_genes: by must be 'mean' or 'var', got {by!r}")
    if not 0.0 <= float(min_frac_spots) <= 1.0:
        raise RapaclInputError(f"select_genes: min_frac_spots must be in [0, 1], got {min_frac_spots!r}")

    mats = []
    for i, counts in enumerate(train_counts):
        X, var_names = _as_matrix(counts, f"training section {i}")
        if var_names is None:
            raise RapaclInputError(f"training section {i}: gene names are needed (AnnData or (X, names))")
        if X.shape[0] == 0:
            raise RapaclInputError(f"training section {i}: no spot")
        mats.append((X, var_names))

    # genes present in every section, each name once
    common = set(mats[0][1])
    for _, names in mats[1:]:
        common.intersection_update(names)
    candidates = sorted(common)  # sorted: deterministic order, and the tie-break rule
    eligible = np.ones(len(candidates), dtype=bool)
    total = np.zeros(len(candidates))
    total_sq = np.zeros(len(candidates))
    n_spots = 0
    for i, (X, names) in enumerate(mats):
        idx, _ = _gene_index(names, candidates, f"training section {i}", "error")
        sub = X[:, idx]
        nnz = np.asarray((sub > 0).sum(axis=0)).ravel()
        eligible &= nnz >= min_frac_spots * X.shape[0]
        logn = normalize_log1p_cp10k((X, names), candidates, name=f"training section {i}")
        logn = logn.astype(np.float64)
        total += logn.sum(axis=0)
        total_sq += (logn**2).sum(axis=0)
        n_spots += X.shape[0]
    mean = total / n_spots
    score = mean if by == "mean" else np.maximum(total_sq / n_spots - mean**2, 0.0)

    n_ok = int(eligible.sum())
    if n_ok < k:
        raise RapaclInputError(
            f"select_genes: only {n_ok} genes are present in all {len(mats)} training sections and "
            f"expressed in >= {min_frac_spots:g} of the spots of each; asked for k={k} "
            "(lower min_frac_spots or k)"
        )
    cand = np.asarray(candidates)[eligible]
    sc = score[eligible]
    # `cand` is sorted by name, so a stable sort on -score breaks ties by name
    order = np.argsort(-sc, kind="stable")
    return [str(g) for g in cand[order[:k]]]


def resolve_genes(
    train_counts: Sequence[Any],
    genes: str | os.PathLike | Sequence[str] | None = None,
    *,
    k: int = 250,
    by: Literal["mean", "var"] = "mean",
    min_frac_spots: float = 0.1,
) -> list[str]:
    """The gene list to use: a file, an explicit list, or (None) selected on the training sections.

    Parameters
    ----------
    train_counts
        Raw counts of the training sections; only used when ``genes`` is None.
    genes
        A path to a gene-list file (:func:`read_gene_list`), a sequence of gene names, or None to
        pick ``k`` genes with :func:`select_genes`.
    k, by, min_frac_spots
        Passed to :func:`select_genes`.
    """
    if genes is None:
        return select_genes(train_counts, k, by=by, min_frac_spots=min_frac_spots)
    if isinstance(genes, (str, os.PathLike)):
        return read_gene_list(genes)
    return _check_unique_genes(list(genes), "gene list")


# --------------------------------------------------------------------------------------------
# z-scoring
# --------------------------------------------------------------------------------------------
def zscore_fit(X: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation of ``X`` (``float64``); a zero std becomes 1.

    Fit on training data only, then apply the same statistics to validation/test data with
    :func:`zscore_apply`.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise RapaclInputError(f"zscore_fit: need a non-empty 2-D array, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise RapaclInputError("zscore_fit: the array contains NaN or infinite values")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > eps, std, 1.0)
    return mean, std


def zscore_apply(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(X - mean) / std`` as ``float32``."""
    X = np.asarray(X, dtype=np.float64)
    mean, std = np.asarray(mean), np.asarray(std)
    if X.ndim != 2 or X.shape[1] != mean.shape[0] or std.shape != mean.shape:
        raise RapaclInputError(
            f"zscore_apply: X has shape {X.shape}, statistics have shapes {mean.shape}, {std.shape}"
        )
    return ((X - mean) / std).astype(np.float32)


# --------------------------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------------------------
def check_spot_xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres as two finite 1-D float64 arrays of equal length (level-0 px)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.ndim != 1 or x.shape != y.shape:
        raise RapaclInputError(f"spot x and y must be 1-D and of equal length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise RapaclInputError("spot coordinates contain NaN or infinite values")
    return x, y


def _check_patch_args(
    slide: Slide, x: Any, y: Any, size: Any, mpp: Any, batch_size: Any = 1
) -> tuple[np.ndarray, np.ndarray, int, float, float]:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise RapaclInputError(f"patch size must be a positive integer number of pixels, got {size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise RapaclInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise RapaclInputError(f"patch mpp must be a number (microns per pixel), got {mpp!r}") from None
    if not (math.isfinite(mpp) and mpp > 0):
        raise RapaclInputError(f"patch mpp must be a positive number of microns per pixel, got {mpp!r}")
    x, y = check_spot_xy(x, y)
    slide_mpp = slide.require_mpp("patch extraction")
    return x, y, int(size), mpp, float(slide_mpp)


def _read_patch(
    slide: Slide, cx: float, cy: float, box: float, size: int, level: int, ds: float
) -> np.ndarray:
    """One ``(size, size, 3)`` patch covering ``box`` level-0 px centred on ``(cx, cy)``."""
    half = box / 2.0
    # the box in level px, and the whole level pixels that hold it
    bx0, by0, bx1, by1 = (cx - half) / ds, (cy - half) / ds, (cx + half) / ds, (cy + half) / ds
    lx0, ly0 = math.floor(bx0), math.floor(by0)
    lx1, ly1 = max(math.ceil(bx1), lx0 + 1), max(math.ceil(by1), ly0 + 1)
    # level-0 integer box whose level-`level` footprint is exactly [lx0, lx1) x [ly0, ly1)
    x0, y0 = math.ceil(lx0 * ds - 1e-9), math.ceil(ly0 * ds - 1e-9)
    x1, y1 = x0 + round((lx1 - lx0) * ds), y0 + round((ly1 - ly0) * ds)
    region = np.asarray(slide.read_region(x0, y0, x1, y1, level=level))
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    region = region[..., :3]
    if region.dtype != np.uint8:
        region = np.clip(region, 0, 255).astype(np.uint8)
    h, w = region.shape[:2]
    if (h, w) == (ly1 - ly0, lx1 - lx0):
        crop = (bx0 - lx0, by0 - ly0, bx1 - lx0, by1 - ly0)
    else:  # a reader that rounds differently: map with the scale it actually returned
        sx, sy = w / (x1 - x0), h / (y1 - y0)
        crop = ((cx - half - x0) * sx, (cy - half - y0) * sy, (cx + half - x0) * sx, (cy + half - y0) * sy)
    if (h, w) == (size, size) and max(abs(crop[0]), abs(crop[1])) < 1e-6:
        return np.ascontiguousarray(region)
    img = Image.fromarray(np.ascontiguousarray(region))
    out = img.resize((size, size), resample=Image.Resampling.BOX, box=crop)
    return np.asarray(out, dtype=np.uint8)


def iter_patches(
    slide: Slide,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    size: int,
    mpp: float,
    batch_size: int = 64,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield spot patches in batches: ``(start, stop, patches)``.

    Same geometry as :func:`extract_patches`; ``patches`` is ``(stop - start, size, size, 3)``
    uint8 for the spots ``start:stop``. Arguments are checked when this is called, before the
    first batch is read, so callers can report progress and stop early between batches.

    Raises
    ------
    MissingPixelSizeError
        The slide has no pixel size.
    RapaclInputError
        Bad coordinates, size, mpp or batch size.
    """
    xs, ys, size, mpp, slide_mpp = _check_patch_args(slide, x, y, size, mpp, batch_size)
    box = size * mpp / slide_mpp  # level-0 px covered by one patch side
    level = slide.best_level(box / size)
    ds = float(slide.downsamples[level])

    def _gen() -> Iterator[tuple[int, int, np.ndarray]]:
        n = len(xs)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            out = np.empty((stop - start, size, size, 3), dtype=np.uint8)
            for j, i in enumerate(range(start, stop)):
                out[j] = _read_patch(slide, xs[i], ys[i], box, size, level, ds)
            yield start, stop, out

    return _gen()


def extract_patches(
    slide: Slide,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    size: int,
    mpp: float,
) -> np.ndarray:
    """Square RGB patches centred on spots, at a chosen physical resolution.

    Each patch covers ``size * mpp`` microns, i.e. ``size * mpp / slide.mpp`` level-0 px,
    centred on ``(x[i], y[i])`` (level-0 px; x = column, y = row). The box is read from the
    coarsest pyramid level that still has at least one pixel per output pixel
    (``slide.best_level``), and resampled to ``size x size`` with area averaging (PIL ``BOX``).
    Parts outside the image are white (255).

    Parameters
    ----------
    slide
        A :class:`~napari_rapacl.io.slide.Slide` with a known pixel size.
    x, y
        Spot centres in level-0 pixels.
    size
        Output side in pixels.
    mpp
        Microns per output pixel.

    Returns
    -------
    numpy.ndarray
        ``(n, size, size, 3)`` uint8.
    """
    it = iter_patches(slide, x, y, size=size, mpp=mpp, batch_size=256)
    n = int(np.size(np.atleast_1d(np.asarray(x))))
    out = np.empty((n, int(size), int(size), 3), dtype=np.uint8)
    for start, stop, batch in it:
        out[start:stop] = batch
    return out
