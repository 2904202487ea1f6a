"""Per-spot radiomics over a slide: segmentation + features per patch, parallel, cached in memory and
on disk.

The in-memory cache is process-wide and keyed like the disk cache (slide content, patch geometry,
radiomics config, feature set, segmentation identity, spot centre): the Cells widget, tiled RaPaCL-ST
prediction and the training tables all compute spot radiomics through :func:`iter_spot_features`, so a
spot measured by one with a given recipe is not measured again by another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._atomic import write_atomic, write_bytes_atomic
from .._errors import RapaclInputError
from ..progress import Progress
from ._config import RadiomicsConfig, check_config
from ._core import FEATURE_SETS, _check_jobs, spot_feature_names, spot_features

if TYPE_CHECKING:
    from ..io.slide import Slide
    from ..io.spots import Spots

#: Bytes hashed from each end of a slide file (or of its level-0 pixels) by :func:`slide_content_hash`.
HASH_BYTES = 2**20
#: Fewer patches to compute than this run in-process (starting workers costs seconds).
MIN_PARALLEL = 8

SegmentFn = Callable[[np.ndarray, float], np.ndarray]


# ------------------------------------------------------------------------------------------------
# identities for the cache key
# ------------------------------------------------------------------------------------------------


_HASH_MEMO: dict[tuple, str] = {}


def slide_content_hash(slide: Slide) -> str:
    """A cheap content hash of a slide (hex sha256).

    Hashing a multi-GB slide whole is slow, so this hashes: the level-0 shape, the number of
    levels, the pixel size (it changes patch geometry), and -- for a slide read from a file -- the
    file size plus its first and last MiB (:data:`HASH_BYTES`); for an in-memory slide, the first
    and last MiB of its level-0 pixels (row-major). The same file copied elsewhere has the same
    hash; an edit that keeps the size and both ends of the file is not seen (image formats put
    headers, offsets tables or tiles at both ends, so real edits change them).
    """
    h = hashlib.sha256(b"napari-rapacl slide hash v1\n")
    meta = {"shape": list(slide.shape), "levels": len(slide.levels), "mpp": slide.mpp}
    h.update(json.dumps(meta, sort_keys=True).encode())
    path = slide.path
    if path is not None and Path(path).is_file():
        st = Path(path).stat()
        memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, json.dumps(meta, sort_keys=True))
        if memo_key in _HASH_MEMO:
            return _HASH_MEMO[memo_key]
        size = st.st_size
        h.update(f"file {size}\n".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(HASH_BYTES))
            fh.seek(max(0, size - HASH_BYTES))
            h.update(fh.read(HASH_BYTES))
        _HASH_MEMO[memo_key] = h.hexdigest()
    else:
        level0 = slide.levels[0]
        width = int(level0.shape[1])
        rows = max(1, HASH_BYTES // max(1, width * 3))
        h.update(b"pixels\n")
        h.update(np.ascontiguousarray(level0[:rows].compute(scheduler="threads")).tobytes())
        h.update(np.ascontiguousarray(level0[-rows:].compute(scheduler="threads")).tobytes())
    return h.hexdigest()


def segment_identity(segment: str | SegmentFn, segment_key: str | None = None) -> str:
    """The segmentation part of the cache key.

    ``segment_key`` when given; for a method name, ``segment_nuclei:<name>`` plus the segmentation
    module's ``SEGMENTATION_VERSION`` if it defines one; for a callable, its ``cache_key``
    attribute or its qualified name (with the bound arguments of a ``functools.partial``).
    Changing a callable's code without renaming it does not change the key: pass ``segment_key``.
    """
    if segment_key is not None:
        return f"key:{segment_key}"
    if isinstance(segment, str):
        version = ""
        try:
            from .. import segmentation

            version = str(getattr(segmentation, "SEGMENTATION_VERSION", ""))
        except ImportError:
            pass
        return f"segment_nuclei:{segment}:{version}"
    key = getattr(segment, "cache_key", None)
    if key is not None:
        return f"key:{key}"
    if isinstance(segment, functools.partial):
        inner = segment_identity(segment.func)
        return f"{inner}{segment.args!r}{sorted(segment.keywords.items())!r}"
    module = getattr(segment, "__module__", None) or type(segment).__module__
    name = getattr(segment, "__qualname__", None) or type(segment).__qualname__
    return f"callable:{module}.{name}"


def _check_segment(segment: Any) -> SegmentFn:
    """A method name becomes its :class:`NucleusSegmenter` (default parameters), so that ``"classical"``
    and ``NucleusSegmenter("classical")`` are one identity in every cache."""
    if isinstance(segment, str):
        if not segment.strip():
            raise RapaclInputError(
                "segment='' : name a segment_nuclei method (e.g. 'classical') or pass a callable"
            )
        from ._recipe import NucleusSegmenter

        return NucleusSegmenter(segment)
    if callable(segment):
        return segment
    raise RapaclInputError(
        f"segment={segment!r} must be a segment_nuclei method name or a callable (region_rgb, mpp) -> labels"
    )


def _segment(segment: str | SegmentFn, patch: np.ndarray, mpp: float) -> np.ndarray:
    if isinstance(segment, str):
        from ..segmentation import segment_nuclei

        return segment_nuclei(patch, mpp, method=segment)
    return segment(patch, mpp)


def _spot_job(
    patch: np.ndarray, segment: str | SegmentFn, mpp: float, config_dict: dict, feature_set: str
) -> np.ndarray:
    """Segment one patch and compute its features; the unit of work of a worker process."""
    config = RadiomicsConfig.from_dict(config_dict)
    labels = _segment(segment, patch, mpp)
    series = spot_features(patch, labels, config, feature_set, mpp=mpp)
    return series.to_numpy(dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# on-disk cache
# ------------------------------------------------------------------------------------------------


class _MemoryCache:
    """A thread-safe LRU of per-spot vectors, keyed by ``(settings key, x, y)``."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = int(max_entries)
        self._data: OrderedDict[tuple[str, float, float], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, float, float]) -> np.ndarray | None:
        with self._lock:
            vec = self._data.get(key)
            if vec is not None:
                self._data.move_to_end(key)
            return vec

    def put(self, key: tuple[str, float, float], vec: np.ndarray) -> None:
        value = np.array(vec, dtype=np.float64, copy=True)
        value.setflags(write=False)
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


#: Spot radiomics computed in this process (every caller of :func:`iter_spot_features` shares it).
MEMORY_CACHE = _MemoryCache()


def _settings(
    slide: Slide,
    size: int,
    mpp: float,
    config: RadiomicsConfig,
    segment: Any,
    feature_set: str,
    segment_key: str | None = None,
) -> dict[str, Any]:
    names = spot_feature_names(config, feature_set)
    return {
        "what": "napari-rapacl spot radiomics",
        "slide": slide_content_hash(slide),
        "size": int(size),
        "mpp": float(mpp),
        "config": config.to_dict(),
        "feature_set": feature_set,
        "segment": segment_identity(segment, segment_key),
        "columns": names + ["n_nuclei", "cell_label"],
    }


def _settings_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class _Cache:
    """The memory cache, then one folder per settings hash with one ``.npy`` vector per spot, written
    atomically."""

    def __init__(self, root: Path | None, settings: dict[str, Any], n_values: int):
        self.n_values = n_values
        self.key = _settings_key(settings)
        self.dir = None if root is None else Path(root).expanduser() / "radiomics" / self.key[:32]
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "settings.json"
            if not meta.exists():
                write_bytes_atomic(meta, json.dumps(settings, indent=1, sort_keys=True, default=str).encode())

    def _path(self, x: float, y: float) -> Path:
        assert self.dir is not None
        k = hashlib.sha256(f"{self.key}|{float(x)!r}|{float(y)!r}".encode()).hexdigest()
        return self.dir / k[:2] / f"{k[2:34]}.npy"

    def get(self, x: float, y: float) -> np.ndarray | None:
        vec = MEMORY_CACHE.get((self.key, float(x), float(y)))
        if vec is not None and vec.shape == (self.n_values,):
            return vec
        if self.dir is None:
            return None
        path = self._path(x, y)
        try:
            vec = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if vec.shape != (self.n_values,) or vec.dtype != np.float64:
            return None
        MEMORY_CACHE.put((self.key, float(x), float(y)), vec)
        return vec

    def put(self, x: float, y: float, vec: np.ndarray) -> None:
        MEMORY_CACHE.put((self.key, float(x), float(y)), vec)
        if self.dir is None:
            return
        path = self._path(x, y)
        path.parent.mkdir(exist_ok=True)
        value = np.asarray(vec, dtype=np.float64)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to a path
                np.save(fh, value, allow_pickle=False)

        write_atomic(path, save)


class SpotFeatureCache:
    """Look up and store per-spot radiomics of one slide and recipe in the process-wide cache
    (what :func:`iter_spot_features` computes and reuses), without computing anything.

    Tiled RaPaCL-ST prediction uses it in the calling process to send only the spots that still
    need radiomics to its workers, and to keep what they computed.
    """

    def __init__(
        self,
        slide: Slide,
        *,
        size: int = 224,
        mpp: float = 0.5,
        config: RadiomicsConfig | Mapping[str, Any] | None = None,
        segment: str | SegmentFn = "classical",
        feature_set: str = "rapacl72",
    ) -> None:
        config = check_config(config)
        settings = _settings(slide, size, mpp, config, _check_segment(segment), feature_set)
        self.columns: list[str] = settings["columns"]
        self._cache = _Cache(None, settings, len(self.columns))

    def lookup(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values (n, n_columns) float64 -- NaN rows where unknown, known (n,) bool)``."""
        values = np.full((len(x), len(self.columns)), np.nan)
        known = np.zeros(len(x), dtype=bool)
        for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
            vec = self._cache.get(xi, yi)
            if vec is not None:
                values[i], known[i] = vec, True
        return values, known

    def store(self, x: np.ndarray, y: np.ndarray, values: np.ndarray) -> None:
        for xi, yi, vec in zip(x, y, np.asarray(values, dtype=np.float64), strict=True):
            self._cache.put(xi, yi, vec)


# ------------------------------------------------------------------------------------------------
# user-given labels
# ------------------------------------------------------------------------------------------------


def _codes(values: pd.Series, what: str) -> tuple[np.ndarray, list[Any] | None]:
    """Integer class codes (>= 0) of a label column, and the class names when they were not ints."""
    if values.isna().any():
        raise RapaclInputError(f"{what} holds missing values ({int(values.isna().sum())})")
    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
        codes = values.to_numpy().astype(np.int64)
        if codes.size and codes.min() < 0:
            raise RapaclInputError(f"{what} holds negative class codes (min {codes.min()})")
        return codes, None
    classes = sorted(values.astype(str).unique())
    lookup = {c: i for i, c in enumerate(classes)}
    return values.astype(str).map(lookup).to_numpy().astype(np.int64), classes


def labels_from_cells(
    cells: pd.DataFrame, x: np.ndarray, y: np.ndarray, half_box: float, column: str
) -> tuple[np.ndarray, list[Any] | None]:
    """Majority class of the labelled cells inside each spot's patch box.

    Parameters
    ----------
    cells
        One row per cell: ``x``, ``y`` (level-0 px) and the class column ``column`` (integers
        >= 0, or names, coded in sorted order).
    x, y
        Spot centres (level-0 px).
    half_box
        Half the patch side in level-0 px: a cell counts when ``|cx - x| <= half_box`` and
        ``|cy - y| <= half_box``.

    Returns
    -------
    codes, classes
        ``(n_spots,)`` int: the most frequent class (the smallest code on ties), ``-1`` where no
        labelled cell lies in the box (the RaPaCL loss ignores -1); the class names or None.
    """
    from scipy.spatial import cKDTree

    for col in ("x", "y", column):
        if col not in cells.columns:
            raise RapaclInputError(f"cell_labels has no column {col!r} (columns: {list(cells.columns)})")
    codes, classes = _codes(cells[column], f"cell_labels[{column!r}]")
    pts = cells[["x", "y"]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(pts)):
        raise RapaclInputError("cell_labels x / y hold NaN or infinite values")
    out = np.full(len(x), -1, dtype=np.int64)
    if len(pts) == 0:
        return out, classes
    tree = cKDTree(pts)
    hits = tree.query_ball_point(np.column_stack([x, y]), r=half_box, p=np.inf)
    n_classes = int(codes.max()) + 1
    for i, idx in enumerate(hits):
        if idx:
            out[i] = int(np.argmax(np.bincount(codes[idx], minlength=n_classes)))
    return out, classes


def _spot_table(spots: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ..io.spots import Spots

    if isinstance(spots, Spots):
        return np.asarray(spots.barcode, dtype=object), spots.x, spots.y
    if isinstance(spots, pd.DataFrame):
        missing = [c for c in ("x", "y") if c not in spots.columns]
        if missing:
            raise RapaclInputError(f"spots table lacks column(s) {missing}; it needs x, y (level-0 px)")
        barcodes = (
            spots["barcode"].astype(str).to_numpy(dtype=object)
            if "barcode" in spots.columns
            else spots.index.astype(str).to_numpy(dtype=object)
        )
        if len(set(barcodes)) != len(barcodes):
            raise RapaclInputError("spots table has duplicate barcodes")
        x = spots["x"].to_numpy(dtype=np.float64)
        y = spots["y"].to_numpy(dtype=np.float64)
        return barcodes, x, y
    raise RapaclInputError(
        f"spots must be a Spots object or a DataFrame with x, y; got {type(spots).__name__}"
    )


# ------------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------------


def iter_spot_features(
    slide: Slide,
    spots: Spots | pd.DataFrame,
    *,
    size: int = 224,
    mpp: float = 0.5,
    config: RadiomicsConfig | Mapping[str, Any] | None = None,
    segment: str | SegmentFn = "classical",
    feature_set: str = "rapacl72",
    cache_dir: str | os.PathLike | None = None,
    n_jobs: int = 2,
    cell_labels: pd.DataFrame | pd.Series | None = None,
    label_column: str = "cell_type",
    segment_key: str | None = None,
    batch_size: int = 16,
) -> Generator[Progress, None, pd.DataFrame]:
    """Per-spot radiomics (and the cell-composition label) of a slide, as a generator.

    The arguments are checked when this is called (bad input raises at once); the work starts at
    the first ``next()``.

    Every spot's patch (``size`` px at ``mpp`` um/px, read like
    :func:`~napari_rapacl.preprocess.extract_patches`) is segmented, then
    :func:`~napari_rapacl.radiomics.spot_features` runs on it. Yields :class:`Progress`
    (``stage="radiomics"``) as spots finish; returns the table (the generator's return value).

    Parameters
    ----------
    slide
        A slide with a known pixel size.
    spots
        :class:`~napari_rapacl.io.spots.Spots`, or a DataFrame with ``x``, ``y`` (level-0 px) and a
        ``barcode`` column or index.
    size, mpp
        Patch side in pixels and microns per patch pixel (RaPaCL-ST: 224 px at 0.5 um/px).
    config
        :class:`RadiomicsConfig`.
    segment
        A :func:`~napari_rapacl.segmentation.segment_nuclei` method name, or a callable
        ``(patch_rgb, mpp) -> int labels``. With ``n_jobs > 1`` a callable must be picklable (a
        module-level function); otherwise the work runs in this process.
    feature_set
        ``"rapacl72"`` or ``"full"`` (:func:`spot_feature_names`).
    cache_dir
        Folder of the on-disk cache (None: no cache). Entries are keyed by the slide's content hash
        (:func:`slide_content_hash`), the spot centre, ``size``, ``mpp``, the config, the feature
        set and the segmentation (:func:`segment_identity`); a spot seen before is read back
        without segmenting or running pyradiomics.
    n_jobs
        Worker processes (forkserver / spawn, never fork). Fewer than :data:`MIN_PARALLEL` patches
        to compute run in this process.
    cell_labels
        Optional user labels for the ``cell_label`` column instead of the morphology rule: a
        DataFrame of cells (``x``, ``y`` in level-0 px and ``label_column``) -- each spot gets the
        majority class of the cells in its patch box, -1 if none (:func:`labels_from_cells`) -- or
        a Series indexed by barcode (per-spot classes; missing spots get -1). Integer classes are
        kept; names are coded 0.. in sorted order (``attrs["cell_label_classes"]``).
    label_column
        The class column of a cells DataFrame.
    segment_key
        Overrides the segmentation's cache identity.
    batch_size
        Patches read from the slide at a time.

    Returns
    -------
    pandas.DataFrame
        Indexed by barcode: the features (in :func:`spot_feature_names` order), ``n_nuclei`` and
        ``cell_label`` (int). ``attrs`` hold the config, feature set, patch geometry, slide hash,
        segmentation identity, label source and the number of cache hits.
    """
    from ..preprocess import iter_patches

    config = check_config(config)
    if feature_set not in FEATURE_SETS:
        raise RapaclInputError(f"feature_set={feature_set!r}; choose one of {FEATURE_SETS}")
    n_jobs = _check_jobs(n_jobs)
    segment = _check_segment(segment)
    barcodes, xs, ys = _spot_table(spots)
    slide_mpp = slide.require_mpp("radiomics patch extraction")
    # check size / mpp / coordinates / batch size now, before any work (iter_patches checks eagerly)
    iter_patches(slide, xs, ys, size=size, mpp=mpp, batch_size=batch_size)
    if isinstance(cell_labels, pd.Series):
        user_codes, user_classes = _codes(cell_labels, "cell_labels")
        user = pd.Series(user_codes, index=cell_labels.index.astype(str))
        if user.index.has_duplicates:
            raise RapaclInputError("cell_labels (per-spot Series) has duplicate barcodes")
        spot_user = user.reindex(barcodes).fillna(-1).to_numpy().astype(np.int64)
        label_source = "per-spot labels"
    elif isinstance(cell_labels, pd.DataFrame):
        half = size * float(mpp) / slide_mpp / 2.0
        spot_user, user_classes = labels_from_cells(cell_labels, xs, ys, half, label_column)
        label_source = f"majority of cell_labels[{label_column!r}]"
    elif cell_labels is None:
        spot_user, user_classes = None, None
        label_source = "morphology rule"
    else:
        raise RapaclInputError(
            f"cell_labels must be a cells DataFrame or a per-spot Series, got {type(cell_labels).__name__}"
        )

    return _iter_spot_features(
        slide,
        barcodes,
        xs,
        ys,
        size,
        float(mpp),
        config,
        segment,
        feature_set,
        cache_dir,
        n_jobs,
        spot_user,
        user_classes,
        label_source,
        segment_key,
        batch_size,
    )


def _iter_spot_features(
    slide: Slide,
    barcodes: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    size: int,
    mpp: float,
    config: RadiomicsConfig,
    segment: str | SegmentFn,
    feature_set: str,
    cache_dir: str | os.PathLike | None,
    n_jobs: int,
    spot_user: np.ndarray | None,
    user_classes: list[Any] | None,
    label_source: str,
    segment_key: str | None,
    batch_size: int,
) -> Generator[Progress, None, pd.DataFrame]:
    from ..preprocess import iter_patches

    settings = _settings(slide, size, mpp, config, segment, feature_set, segment_key)
    columns = settings["columns"]
    seg_id = settings["segment"]
    cache = _Cache(None if cache_dir is None else Path(cache_dir), settings, len(columns))

    n = len(barcodes)
    values = np.full((n, len(columns)), np.nan)
    todo: list[int] = []
    for i in range(n):
        vec = cache.get(xs[i], ys[i])
        if vec is None:
            todo.append(i)
        else:
            values[i] = vec
    hits = n - len(todo)
    counter = {"done": hits}
    yield Progress("radiomics", hits, n)

    def sink(i: int, vec: np.ndarray) -> int:
        values[i] = vec
        cache.put(xs[i], ys[i], vec)
        counter["done"] += 1
        return counter["done"]

    use_pool = n_jobs > 1 and len(todo) >= MIN_PARALLEL
    if use_pool and not isinstance(segment, str):
        try:
            pickle.dumps(segment)
        except Exception:
            use_pool = False
    cfg_dict = config.to_dict()
    if todo:
        todo_arr = np.asarray(todo)
        patches = iter_patches(slide, xs[todo_arr], ys[todo_arr], size=size, mpp=mpp, batch_size=batch_size)
        if use_pool:
            yield from _run_pool(
                patches, todo_arr, segment, float(mpp), cfg_dict, feature_set, n_jobs, sink, n
            )
        else:
            for start, _stop, batch in patches:
                for j, patch in enumerate(batch):
                    i = int(todo_arr[start + j])
                    done = sink(i, _spot_job(patch, segment, float(mpp), cfg_dict, feature_set))
                    yield Progress("radiomics", done, n)

    df = pd.DataFrame(values, index=pd.Index(barcodes, name="barcode"), columns=columns)
    df["n_nuclei"] = df["n_nuclei"].astype(np.int64)
    df["cell_label"] = df["cell_label"].astype(np.int64)
    if spot_user is not None:
        df["cell_label"] = spot_user
    df.attrs.update(
        {
            "radiomics_config": cfg_dict,
            "feature_set": feature_set,
            "size": int(size),
            "mpp": float(mpp),
            "slide_hash": settings["slide"],
            "segment": seg_id,
            # the structured segmentation, for the recipe a model trained on this table records
            "segmenter": segment.to_dict() if hasattr(segment, "to_dict") else None,
            "cell_label_source": label_source,
            "cell_label_classes": user_classes,
            "cache_hits": int(hits),
        }
    )
    return df


def _run_pool(
    patches: Any,
    todo_arr: np.ndarray,
    segment: str | SegmentFn,
    mpp: float,
    cfg_dict: dict,
    feature_set: str,
    n_jobs: int,
    sink: Callable[[int, np.ndarray], int],
    n: int,
) -> Generator[Progress, None, None]:
    """Compute patches in the process pool, at most ``4 * n_jobs`` in flight.

    If the pool breaks (a worker died, or a script without an ``if __name__ == "__main__":`` guard
    made the workers re-run it), the unfinished patches are computed here, with a warning.
    """
    import warnings
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    from ._pool import get_pool

    pool = get_pool(n_jobs)
    pending: dict[Any, tuple[int, np.ndarray]] = {}
    broken = False
    done = 0

    def drain(limit: int) -> Generator[Progress, None, None]:
        nonlocal broken, done
        while len(pending) > limit and not broken:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    vec = fut.result()
                except BrokenProcessPool:
                    broken = True
                    break
                i, _patch = pending.pop(fut)
                done = sink(i, vec)
            yield Progress("radiomics", done, n)

    leftovers: list[tuple[int, np.ndarray]] = []
    try:
        for start, _stop, batch in patches:
            for j, patch in enumerate(batch):
                i = int(todo_arr[start + j])
                if broken:
                    leftovers.append((i, patch))
                    continue
                try:
                    pending[pool.submit(_spot_job, patch, segment, mpp, cfg_dict, feature_set)] = (i, patch)
                except BrokenProcessPool:
                    broken = True
                    leftovers.append((i, patch))
                    continue
                yield from drain(4 * n_jobs)
        yield from drain(0)
    finally:
        for fut in pending:
            fut.cancel()
    if broken:
        warnings.warn(
            "the radiomics worker processes stopped (a crashed worker, or a script run without an "
            "'if __name__ == \"__main__\":' guard); computing the remaining patches in this process",
            RuntimeWarning,
            stacklevel=3,
        )
        from ._pool import shutdown_pools

        shutdown_pools()
        leftovers = list(pending.values()) + leftovers
        pending.clear()
        for i, patch in leftovers:
            done = sink(i, _spot_job(patch, segment, mpp, cfg_dict, feature_set))
            yield Progress("radiomics", done, n)


def spot_feature_table(slide: Slide, spots: Spots | pd.DataFrame, **kwargs: Any) -> pd.DataFrame:
    """:func:`iter_spot_features` run to the end (progress ignored); same arguments."""
    gen = iter_spot_features(slide, spots, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
