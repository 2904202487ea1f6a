"""Lazy, tiled inference over a slide region, with an in-memory tile cache.

Spot predictions (:func:`iter_predict_region`)
    A fixed grid of ``tile_px`` x ``tile_px`` level-0 pixels is laid over the slide from its origin; a
    *tile* is the set of spots whose centres fall in one grid cell. To predict the spots inside a box
    (the visible region of a viewer, say), only the tiles holding at least one of those spots are
    needed. Each tile is predicted whole (all of its spots, also those outside the box) with
    :func:`~napari_rapacl.inference.iter_predict_spots`, and its ``(n_tile_spots, n_genes)`` result is
    cached, so panning back to a region costs only cache lookups. With ``view_first`` the spots inside
    the box are predicted first and handed out (a ``Progress`` carrying the box's complete result)
    before the rest of their tiles, so a viewer shows the view after the cost of its own spots; every
    spot is still predicted once. The predictions are those of
    :func:`~napari_rapacl.inference.predict_spots` on the same spots (each spot's patch is read and
    predicted independently of the others; batches differ only in floating-point summation order).
    The pixels under a tile's patches are read from the slide in one piece (one dask computation per
    tile instead of one per spot) and cut into exactly the patches ``predict_spots`` would read.

Dense maps (:func:`iter_predict_dense`, models with ``predict_map`` such as PixNet)
    The map has one pixel per model pixel (``model.config.mpp`` um), on a grid anchored at the slide's
    origin, so that every map pixel has one fixed place whatever box is asked for. It is computed in
    windows of ``patch_size`` model pixels (the input size the model was trained on), read through the
    lazy slide like spot patches; windows overlap by ``margin`` pixels on every side and only their
    central ``patch_size - 2 * margin`` pixels (the *core*) are kept, so each map pixel comes from the
    window in whose core it lies, at least ``margin`` pixels away from that window's border (where zero
    padding changes the network's output). The cores tile the plane without gaps or overlaps; the
    cached unit is a tile of whole cores (``tile_px`` rounded to a multiple of the core). The map is
    therefore independent of ``tile_px`` and of the box. Residual differences at core borders remain
    where the network's receptive field is wider than the margin (a fully convolutional model would
    need a margin of its whole receptive field to be exactly seamless; we keep the training patch size
    instead).

Cache keys are ``(model_key, slide_key, kind, tile_index)``: :func:`model_key` hashes the weights and the
config (memoised on the model and recomputed when a parameter is modified in place), :func:`slide_key`
is the file (path, size, modification time) or, for an in-memory slide, the dask names of its levels,
plus shape, pyramid and mpp; ``kind`` encodes what was predicted and a hash of the tile's spot
coordinates and radii (or the dense-map geometry and genes).

Schedulers: ``scheduler=None`` runs the tiles one after the other in the calling thread (what the GUI
uses: a ``thread_worker`` around the generator, cancelled between tiles). Otherwise tiles run as tasks:
a ``dask.distributed.Client`` (or the address of a scheduler) gets the model once
(``client.scatter(model, broadcast=True)``) and one task per tile, gathered with ``as_completed``;
``"threads"`` and ``"processes"`` use a local pool of threads or of spawned processes (each process
receives the model once, through the pool's initializer), ``"synchronous"`` runs the same task
function in the calling thread. Whatever the scheduler, results come back to the calling thread,
which fills the cache and yields a :class:`~napari_rapacl.progress.Progress` counting spots: per tile
and, with ``None`` (each tile in a helper thread) and ``"threads"``, after every batch of a running
tile (a 2048 px tile of 8 µm bins holds ~16k spots: minutes on a CPU); such a tile waits after each
report until the generator is asked for more, so it never runs ahead of a consumer that stopped. Closing
the generator cancels the tasks not yet started, stops running tiles at their next batch (threads) and
leaves the cache holding whole tiles only. A slide read from a file is reopened from that file on the
workers; an in-memory slide is pickled. With ``out`` the finished tiles' rows go into an out-of-core
array (the CLI's temporary HDF5 file) instead of memory.

Importing this module is cheap: torch, dask.distributed and the model code are imported only when
they are used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import RapaclInputError
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .io.slide import Slide

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_TILE_PX",
    "LOCAL_SCHEDULERS",
    "DenseMap",
    "RegionPrediction",
    "TileCache",
    "default_cache",
    "dense_geometry",
    "iter_predict_dense",
    "iter_predict_region",
    "model_key",
    "predict_dense",
    "predict_region",
    "run_tasks",
    "slide_key",
    "spot_tiles",
]

DEFAULT_TILE_PX = 2048
DEFAULT_CACHE_BYTES = 512 * 2**20
LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")
#: Upper bound on the bytes of one ``predict_map`` output batch (windows x genes x pixels x 4).
_DENSE_BATCH_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


class TileCache:
    """A thread-safe in-memory LRU of numpy arrays, bounded by their total bytes.

    Keys are ``(model_key, slide_key, kind, tile_index)`` tuples (any hashable works). Stored arrays
    are made read-only, so a caller cannot change a cached result by accident. An array larger than
    ``max_bytes`` is not stored.

    Attributes
    ----------
    hits, misses
        Counters of :meth:`get` calls that found / did not find their key.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise RapaclInputError(f"max_bytes={max_bytes!r} must be an integer >= 0")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        """The array stored under ``key`` (marked most recently used), or None."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        """Store ``value`` (a read-only copy's view: the array itself, flagged read-only)."""
        value = np.asarray(value)
        nbytes = int(value.nbytes)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._nbytes -= int(old.nbytes)
            if nbytes > self.max_bytes:
                return
            value.setflags(write=False)
            self._data[key] = value
            self._nbytes += nbytes
            while self._nbytes > self.max_bytes and self._data:
                _, evicted = self._data.popitem(last=False)
                self._nbytes -= int(evicted.nbytes)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._nbytes

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._data.clear()
            self._nbytes = 0
            self.hits = 0
            self.misses = 0

    def __repr__(self) -> str:
        return (
            f"TileCache({len(self)} tiles, {self.nbytes / 2**20:.1f} / {self.max_bytes / 2**20:.0f} MB, "
            f"hits={self.hits}, misses={self.misses})"
        )


_DEFAULT_CACHE: TileCache | None = None
_DEFAULT_CACHE_LOCK = threading.Lock()


def default_cache() -> TileCache:
    """The process-wide cache used when ``cache=None`` (512 MB)."""
    global _DEFAULT_CACHE
    with _DEFAULT_CACHE_LOCK:
        if _DEFAULT_CACHE is None:
            _DEFAULT_CACHE = TileCache()
        return _DEFAULT_CACHE


def _resolve_cache(cache: TileCache | None | bool) -> TileCache | None:
    if cache is None or cache is True:
        return default_cache()
    if cache is False:
        return None
    if not isinstance(cache, TileCache):
        raise RapaclInputError(f"cache={cache!r} must be a TileCache, None (the default cache) or False")
    return cache


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------

_MODEL_KEY_ATTR = "_rapacl_model_key"


def model_key(model: torch.nn.Module) -> str:
    """A stable hash of ``model``'s weights (state dict bytes), config and radiomics recipe.

    Computed once and memoised on the model; recomputed when a parameter or buffer has been changed in
    place since (tracked through the tensors' version counters).
    """
    import torch

    from .inference import param_versions

    versions = param_versions(model)
    memo = getattr(model, _MODEL_KEY_ATTR, None)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.blake2b(digest_size=16)
    name = getattr(model, "model_name", type(model).__name__)
    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else repr(config)
    recipe = getattr(model, "radiomics_recipe", None)  # how its radiomics inputs are made
    recipe = recipe.to_dict() if recipe is not None else None
    ident = {"model": name, "config": cfg, "recipe": recipe}
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t = t.detach()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            flat = t.reshape(-1).cpu().contiguous()
            if flat.numel():
                h.update(flat.view(torch.uint8).numpy().data)
    key = f"{name}-{h.hexdigest()}"
    with contextlib.suppress(AttributeError, TypeError):  # a model that refuses attributes
        object.__setattr__(model, _MODEL_KEY_ATTR, (versions, key))
    return key


_MEMORY_SLIDE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def slide_key(slide: Slide) -> tuple:
    """What identifies a slide's pixels: its file (path, size, mtime) or, in memory, its levels' dask
    names; plus level-0 shape, downsamples and mpp."""
    geometry = (tuple(slide.shape), tuple(round(d, 9) for d in slide.downsamples), slide.mpp)
    if slide.path is not None and Path(slide.path).exists():
        p = Path(slide.path).resolve()
        st = p.stat()
        return ("file", str(p), st.st_size, st.st_mtime_ns, *geometry)
    names = []
    for level in slide.levels:
        name = getattr(level, "name", None)
        if not isinstance(name, str):  # pragma: no cover - levels are dask arrays
            ident = _MEMORY_SLIDE_IDS.get(slide)
            if ident is None:
                ident = _MEMORY_SLIDE_IDS.setdefault(slide, uuid.uuid4().hex)
            return ("memory", ident, *geometry)
        names.append(name)
    return ("dask", tuple(names), *geometry)


def _hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionPrediction:
    """Predictions for the spots inside a box.

    Attributes
    ----------
    index
        ``int64 (n,)`` indices of those spots in the ``x``/``y`` arrays passed in, sorted.
    values
        ``float32 (n, n_genes)``, one row per ``index``.
    tiles_computed, tiles_cached
        Tiles predicted by this call and tiles taken from the cache.
    radiomics
        For models fed with radiomics (RaPaCL-ST): the raw per-spot radiomics their predictions
        used (columns of :meth:`RadiomicsRecipe.raw_columns`, one row per ``index``); else None.
    """

    index: np.ndarray
    values: np.ndarray
    tiles_computed: int
    tiles_cached: int
    radiomics: Any = None  # pandas.DataFrame: the raw spot radiomics that fed the model, one row per index


@dataclass(frozen=True)
class DenseMap:
    """A dense gene map over a box of the slide.

    Attributes
    ----------
    values
        ``float32 (n_genes_selected, H, W)``. Map pixels cover the box clipped to the slide; the last row
        and column may reach past the slide's edge (read as white glass there).
    genes
        The selected genes, in the order of ``values``: names when the model carries a ``genes`` list
        (the checkpoint's), else output channel indices.
    translate_px
        ``(y0, x0)``: where the **centre** of map pixel ``(0, 0)`` lies, in level-0 pixel coordinates
        with napari's convention (level-0 pixel ``p`` is centred on ``p``, which is how the slide's
        image layer places it). A napari layer lines up with the slide layer with
        ``scale=(mpp * px_size,) * 2`` and ``translate=(y0 * mpp, x0 * mpp)`` (see :meth:`layer_kwargs`).
    px_size
        Level-0 pixels per map pixel (``model.config.mpp / slide.mpp``).
    channels
        The selected output channel indices of the model.
    corner_px
        ``(y, x)`` of the map's top-left corner in continuous level-0 coordinates (level-0 pixel
        ``p`` covers ``[p, p + 1)``, the convention of spot coordinates and ``read_region``).
    """

    values: np.ndarray
    genes: list
    translate_px: tuple[float, float]
    px_size: float
    channels: tuple[int, ...] = ()
    corner_px: tuple[float, float] = (0.0, 0.0)

    def layer_kwargs(self, mpp: float) -> dict[str, Any]:
        """``scale`` and ``translate`` (um) for a napari Image layer over a slide of ``mpp`` um/px."""
        s = float(mpp) * self.px_size
        return {
            "scale": (s, s),
            "translate": (self.translate_px[0] * float(mpp), self.translate_px[1] * float(mpp)),
        }


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_tile_px(tile_px: Any) -> int:
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)) or tile_px < 16:
        raise RapaclInputError(f"tile_px={tile_px!r} must be an integer >= 16 (level-0 pixels)")
    return int(tile_px)


def _check_box(box: Any, slide: Slide, what: str = "box") -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in level-0 px, clipped to the slide; it must overlap the slide."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RapaclInputError(
            f"{what}={box!r} must be four numbers (x0, y0, x1, y1) in level-0 px"
        ) from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise RapaclInputError(f"{what}={box!r} has non-finite coordinates")
    if not (x1 > x0 and y1 > y0):
        raise RapaclInputError(f"{what}=({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty: need x1 > x0 and y1 > y0")
    height, width = slide.shape
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise RapaclInputError(
            f"{what}=({x0:g}, {y0:g}, {x1:g}, {y1:g}) in level-0 px lies outside {slide.name}, whose "
            f"level 0 is {width} px wide and {height} px high"
        )
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def _check_spots(x: Any, y: Any, radius: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    from .preprocess import check_spot_xy

    xs, ys = check_spot_xy(x, y)
    rs = None
    if radius is not None:
        try:
            rs = np.broadcast_to(np.asarray(radius, dtype=np.float64), xs.shape)
        except ValueError:
            raise RapaclInputError(
                f"radius must be one number or one per spot ({len(xs)}), got shape {np.shape(radius)}"
            ) from None
        if not np.all(np.isfinite(rs)) or np.any(rs <= 0):
            raise RapaclInputError("radius must be finite and > 0 (level-0 px)")
    return xs, ys, rs


def _check_model_for_spots(model: Any, radius: np.ndarray | None) -> set[str]:
    from .inference import check_spot_model

    return check_spot_model(model, radius)


# --------------------------------------------------------------------------------------------
# spot tiles
# --------------------------------------------------------------------------------------------


def spot_tiles(
    x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float] | None, tile_px: int
) -> tuple[np.ndarray, list[tuple[tuple[int, int], np.ndarray]]]:
    """The spots inside ``box`` and the tiles that hold them.

    Returns
    -------
    index, tiles
        ``index``: sorted indices of the spots inside the half-open box (all spots if None);
        ``tiles``: ``((ty, tx), spot indices of the whole tile, sorted)`` for every tile that holds at
        least one of them, in row-major tile order.
    """
    tx = np.floor(x / tile_px).astype(np.int64)
    ty = np.floor(y / tile_px).astype(np.int64)
    if box is None:
        inside = np.ones(len(x), dtype=bool)
    else:
        x0, y0, x1, y1 = box
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    index = np.flatnonzero(inside)
    if not len(index):
        return index, []
    # a unique id per tile (offset so negative tile coordinates stay unique)
    ox, oy = int(tx.min()), int(ty.min())
    width = int(tx.max()) - ox + 1
    tid = (ty - oy) * width + (tx - ox)
    wanted = np.unique(tid[index])
    member = np.flatnonzero(np.isin(tid, wanted))
    order = np.argsort(tid[member], kind="stable")  # stable: indices stay sorted within a tile
    member = member[order]
    ids = tid[member]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    stops = np.r_[starts[1:], len(ids)]
    tiles = []
    for a, b in zip(starts, stops, strict=True):
        i = member[a]
        tiles.append(((int(ty[i]), int(tx[i])), member[a:b]))
    return index, tiles


# --------------------------------------------------------------------------------------------
# tasks (these run on workers too: module-level, picklable arguments)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SlideRef:
    """A picklable stand-in for a slide: its file (reopened on the worker) or the slide itself."""

    path: str | None = None
    mpp: float | None = None
    mpp_source: str = "unknown"
    chunk: int = 1024
    mtime_ns: int = 0
    slide: Any = field(default=None, compare=False)

    @classmethod
    def of(cls, slide: Slide) -> _SlideRef:
        if slide.path is not None and Path(slide.path).is_file():
            chunk = int(slide.levels[0].chunksize[0]) if hasattr(slide.levels[0], "chunksize") else 1024
            return cls(
                str(Path(slide.path).resolve()),
                slide.mpp,
                slide.mpp_source,
                max(16, chunk),
                Path(slide.path).stat().st_mtime_ns,
            )
        try:
            pickle.dumps(slide)
        except Exception as exc:
            raise RapaclInputError(
                f"{slide.name}: an in-memory slide must be picklable to run on a scheduler "
                f"({type(exc).__name__}: {exc}); use scheduler=None"
            ) from exc
        return cls(slide=slide)

    def resolve(self) -> Slide:
        if self.slide is not None:
            return self.slide
        return _open_slide_cached(self.path, self.mpp, self.mpp_source, self.chunk, self.mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_slide_cached(path: str, mpp: float | None, source: str, chunk: int, mtime_ns: int) -> Slide:
    from .io.slide import open_slide

    slide = open_slide(path, chunk=chunk)
    if mpp is not None and slide.mpp != mpp:
        slide = slide.with_mpp(mpp, source if source != "unknown" else "caller")
    return slide


class _PrefetchedSlide:
    """A slide whose pixels around one tile's spots were read in one piece.

    ``read_region`` requests at the prefetched level that fall inside the buffer are served from it,
    with exactly :meth:`Slide.read_region`'s footprint arithmetic and fill (255 outside the image, which
    the buffer holds too), so they return the same pixels; every other request goes to the slide.
    Everything else is the slide's. One dask computation per tile instead of one per spot.
    """

    def __init__(self, slide: Slide, level: int, box: tuple[int, int, int, int]) -> None:
        self._slide = slide
        self._level = level
        bx0, by0, bx1, by1 = box
        self._box = box
        arr = slide.levels[level]
        height, width = arr.shape[:2]
        buf = np.full((by1 - by0, bx1 - bx0, 3), 255, dtype=np.uint8)
        ax0, ay0, ax1, ay1 = max(bx0, 0), max(by0, 0), min(bx1, width), min(by1, height)
        if ax1 > ax0 and ay1 > ay0:
            buf[ay0 - by0 : ay1 - by0, ax0 - bx0 : ax1 - bx0] = arr[ay0:ay1, ax0:ax1].compute(
                scheduler="threads"
            )
        self._buf = buf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slide, name)

    def read_region(self, x0, y0, x1, y1, level: int = 0, fill: int = 255) -> np.ndarray:
        if level == self._level and fill == 255:
            ds = self._slide.downsamples[level]
            fx0, fy0, fx1, fy1 = (float(v) for v in (x0, y0, x1, y1))
            if all(math.isfinite(v) for v in (fx0, fy0, fx1, fy1)) and fx1 >= fx0 and fy1 >= fy0:
                lx0, ly0 = math.floor(fx0 / ds), math.floor(fy0 / ds)
                w, h = int(round((fx1 - fx0) / ds)), int(round((fy1 - fy0) / ds))
                bx0, by0, bx1, by1 = self._box
                if lx0 >= bx0 and ly0 >= by0 and lx0 + w <= bx1 and ly0 + h <= by1:
                    return self._buf[ly0 - by0 : ly0 - by0 + h, lx0 - bx0 : lx0 - bx0 + w].copy()
        return self._slide.read_region(x0, y0, x1, y1, level=level, fill=fill)


#: Largest buffer read at once for one tile's patches; larger tiles read patch by patch.
_PREFETCH_BYTES = 256 * 2**20


def _prefetch(slide: Slide, x: np.ndarray, y: np.ndarray, size: int, mpp: float) -> Slide | _PrefetchedSlide:
    """The slide, with the pixels that ``x, y``'s patches need read in one piece when that is small."""
    if not len(x):
        return slide
    box = size * float(mpp) / slide.require_mpp("patch extraction")  # as in preprocess.iter_patches
    level = slide.best_level(box / size)
    ds = float(slide.downsamples[level])
    half = box / 2.0
    bx0 = math.floor((float(np.min(x)) - half) / ds) - 2
    by0 = math.floor((float(np.min(y)) - half) / ds) - 2
    bx1 = math.ceil((float(np.max(x)) + half) / ds) + 3
    by1 = math.ceil((float(np.max(y)) + half) / ds) + 3
    if (bx1 - bx0) * (by1 - by0) * 3 > _PREFETCH_BYTES:
        return slide
    return _PrefetchedSlide(slide, level, (bx0, by0, bx1, by1))


def _tile_radiomics(
    model: Any,
    slide: Slide | _SlideRef,
    x: np.ndarray,
    y: np.ndarray,
    raw: np.ndarray | None,
    known: np.ndarray | None,
    n_jobs: int = 1,
) -> np.ndarray | None:
    """The raw radiomics of a tile's spots with the model's recipe: ``raw`` rows already ``known``
    are kept, the others computed (segmentation + features of each spot's recipe patch, the tile's
    pixels read at once; :func:`~napari_rapacl.radiomics.iter_spot_features`, which also fills this
    process's radiomics cache). None for a model without radiomics inputs."""
    if raw is None:
        return None
    import pandas as pd

    from .inference import radiomics_recipe
    from .progress import run_to_completion
    from .radiomics import iter_spot_features

    if isinstance(slide, _SlideRef):
        slide = slide.resolve()
    recipe = radiomics_recipe(model)
    raw = np.array(raw, dtype=np.float64, copy=True)
    todo = np.flatnonzero(~np.asarray(known, dtype=bool))
    if len(todo):
        xs, ys = x[todo], y[todo]
        source = _prefetch(slide, xs, ys, recipe.patch_size, recipe.patch_mpp)
        table = pd.DataFrame({"x": xs, "y": ys, "barcode": [str(i) for i in range(len(todo))]})
        result = run_to_completion(
            iter_spot_features(source, table, n_jobs=n_jobs, **recipe.spot_feature_kwargs())
        )
        raw[todo] = result[recipe.raw_columns()].to_numpy(dtype=np.float64)
    return raw


def _predict_tile(
    model: Any,
    slide: Slide | _SlideRef,
    x: np.ndarray,
    y: np.ndarray,
    radius: np.ndarray | None,
    batch_size: int,
    device: str,
    raw: np.ndarray | None = None,
    known: np.ndarray | None = None,
    radiomics_jobs: int = 1,
    on_batch: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions for one tile's spots (float32 ``(n, n_genes)``), the tile's pixels read at once, and
    the raw radiomics they used (None for an image-only model). ``raw``/``known``: the radiomics
    already known (rows where ``known``); the others are computed here first. ``on_batch(done)`` is
    called after every batch with the tile's spots predicted so far (it may raise to stop the tile)."""
    from .inference import iter_predict_spots, radiomics_recipe
    from .progress import run_to_completion

    if isinstance(slide, _SlideRef):
        slide = slide.resolve()
    inputs = None
    if raw is not None:
        raw = _tile_radiomics(model, slide, x, y, raw, known, radiomics_jobs)
        inputs = {"radiomics": radiomics_recipe(model).transform(raw)}
    source = _prefetch(slide, x, y, int(model.config.patch_size), float(model.config.mpp))
    job = iter_predict_spots(
        model, source, x, y, radius=radius, batch_size=batch_size, device=device, inputs=inputs
    )
    pred = run_to_completion(job, None if on_batch is None else (lambda p: on_batch(int(p.done))))
    return pred, raw


_WORKER_MODEL: Any = None


def _init_process_worker(model_bytes: bytes, n_threads: int) -> None:
    global _WORKER_MODEL
    import torch

    torch.set_num_threads(max(1, n_threads))
    _WORKER_MODEL = pickle.loads(model_bytes)


def _predict_tile_in_process(slide, *args) -> tuple[np.ndarray, np.ndarray | None]:
    return _predict_tile(_WORKER_MODEL, slide, *args)


# --------------------------------------------------------------------------------------------
# executing tile tasks
# --------------------------------------------------------------------------------------------


def _local_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class _Batch:
    """What a running tile task reports between its batches: ``done`` of its spots are predicted."""

    done: int


class _TileStopped(Exception):
    """Raised in a tile task's batch callback once the job has been closed (cancelled): the task stops
    after its current batch and its partial result is dropped."""


def _batch_reporter(tag: Any, events: Any, stop: threading.Event) -> Callable[[int], None]:
    """``report(done)`` for a task running in a helper thread: it hands ``(tag, _Batch(done), taken)``
    to the job's thread and waits until the job has handed that report on and asked for more
    (``taken`` set), so a task never runs ahead of a job that stopped asking (a viewer's cancel that
    leaves the generator suspended): it waits there, and raises :class:`_TileStopped` once the job is
    closed (``stop``)."""

    def report(done: int) -> None:
        if stop.is_set():
            raise _TileStopped
        taken = threading.Event()
        events.put((tag, _Batch(int(done)), taken))
        while not taken.wait(0.25):
            if stop.is_set():
                raise _TileStopped
        if stop.is_set():
            raise _TileStopped

    return report


def _relay_batches(events: Any) -> Generator[tuple, None, Any]:
    """Hand on the batch reports ``(tag, _Batch, taken)`` that running tasks put on ``events`` (each
    report's task goes on only once the consumer has asked for the next item: ``taken``) until a task
    finishes, an item ``(None, what, None)``; return ``what``."""
    while True:
        key, item, taken = events.get()
        if key is None:
            return item
        yield key, item
        taken.set()  # asked for more: the task goes on with its next batch


def _task_in_thread(tag: Any, fn: Callable[[Callable[[int], None]], Any]) -> Generator[tuple, None, Any]:
    """Run ``fn(report)`` in a helper thread and yield ``(tag, _Batch(done))`` for each ``report(done)``
    it makes, as they come; return what ``fn`` returns (or raise what it raises). ``fn`` goes on after a
    report only when this generator is asked for its next item, so it never runs ahead of its consumer;
    closing stops it at that report (it is waiting there)."""
    import queue

    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    report = _batch_reporter(tag, events, stop)

    def work() -> None:
        try:
            events.put((None, ("done", fn(report)), None))
        except BaseException as exc:  # handed to the job's thread
            events.put((None, ("error", exc), None))

    thread = threading.Thread(target=work, name="napari-rapacl-tile", daemon=True)
    thread.start()
    try:
        kind, value = yield from _relay_batches(events)
        if kind == "error":
            raise value
        return value
    finally:
        stop.set()
        thread.join()


def _run_tasks(
    model: Any,
    slide: Slide,
    tasks: list[tuple[Any, tuple]],
    scheduler: Any,
) -> Generator[tuple[Any, np.ndarray], None, None]:
    """Run ``(tag, (x, y, radius, batch_size, device, raw, known, radiomics_jobs))`` tasks; yield
    ``(tag, (predictions, raw radiomics or None))`` as they finish and, with ``scheduler`` None or
    ``"threads"``, ``(tag, _Batch(done))`` after every batch of a running task (a tile of thousands of
    spots reports while it runs; ``"synchronous"``, ``"processes"`` and dask report per task).

    Closing this generator cancels the tasks that have not started and stops the running ones after
    their current batch (threads) or waits for them (processes, dask).
    """
    if not tasks:
        return
    if scheduler is None or scheduler == "synchronous":
        yield from _run_sequential(
            model,
            slide,
            tasks,
            lookahead=scheduler is None and _overlap_pays(tasks),
            batches=scheduler is None,
        )
        return
    if scheduler == "threads":
        yield from _run_threads(model, slide, tasks)
        return
    if isinstance(scheduler, str) and scheduler == "processes":
        import concurrent.futures as cf
        import multiprocessing

        n = min(_local_workers(), max(1, len(tasks)))
        pool = cf.ProcessPoolExecutor(
            max_workers=n,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process_worker,
            initargs=(pickle.dumps(model), max(1, (os.cpu_count() or 1) // n)),
        )
        submit = functools.partial(pool.submit, _predict_tile_in_process, _SlideRef.of(slide))
        try:
            futures = {submit(*args): tag for tag, args in tasks}
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    yield from _run_distributed(model, slide, tasks, scheduler)


def _overlap_pays(tasks: list[tuple[Any, tuple]]) -> bool:
    """Whether measuring the next tile's radiomics while predicting this one gains time: when the
    model runs on a GPU, or when the CPU has cores for both the radiomics workers and torch's threads
    (on 2 cores there is nothing to overlap: first views interleaved without and with it measured
    3.23 s and 3.31 s, benchmarks/README.md)."""
    import torch

    from .inference import resolve_device

    _x, _y, _r, _b, device, _raw, _known, jobs = tasks[0][1]
    if resolve_device(device).startswith("cuda"):
        return True
    return (os.cpu_count() or 1) >= int(jobs) + torch.get_num_threads() + 2


def _run_threads(model: Any, slide: Slide, tasks: list[tuple[Any, tuple]]) -> Generator[tuple, None, None]:
    """Tasks on a local pool of threads; every batch of a running task is reported (``_Batch``) as it
    finishes (the task waits until the job asks for the next item), results as their task finishes.
    Closing cancels the tasks not started and stops the running ones at their next report."""
    import concurrent.futures as cf
    import queue

    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    pool = cf.ThreadPoolExecutor(max_workers=_local_workers(), thread_name_prefix="napari-rapacl-tile")
    futures: dict = {}
    try:
        for tag, args in tasks:
            fut = pool.submit(_predict_tile, model, slide, *args, _batch_reporter(tag, events, stop))
            futures[fut] = tag
            fut.add_done_callback(lambda f: events.put((None, f, None)))
        for _ in range(len(futures)):
            fut = yield from _relay_batches(events)
            yield futures[fut], fut.result()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _run_sequential(
    model: Any, slide: Slide, tasks: list[tuple[Any, tuple]], lookahead: bool, batches: bool = False
) -> Generator[tuple[Any, tuple], None, None]:
    """Tasks one after the other. For a model fed with radiomics and ``lookahead``
    (:func:`_overlap_pays`), the radiomics of the next task are computed in a background thread (its
    segmentation and pyradiomics run in the radiomics worker processes) while the current one is
    predicted: CPU workers measure nuclei while the GPU predicts. With ``batches`` each task runs in a
    helper thread (:func:`_task_in_thread`) so that its batches are reported (``_Batch``) while it runs
    and a close stops it after its current batch; without, in this thread."""

    def run(tag: Any, args: tuple) -> Generator[tuple, None, Any]:
        if not batches:
            return _predict_tile(model, slide, *args)
        return (yield from _task_in_thread(tag, lambda report: _predict_tile(model, slide, *args, report)))

    needs_radiomics = any(args[5] is not None for _, args in tasks)
    if not (lookahead and needs_radiomics and len(tasks) > 1):
        for tag, args in tasks:
            result = yield from run(tag, args)
            yield tag, result
        return
    import concurrent.futures as cf

    def radiomics_of(args: tuple) -> np.ndarray | None:
        x, y, _r, _b, _d, raw, known, jobs = args
        return _tile_radiomics(model, slide, x, y, raw, known, jobs)

    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-rapacl-radiomics")
    try:
        ahead = pool.submit(radiomics_of, tasks[0][1])
        for i, (tag, args) in enumerate(tasks):
            raw = ahead.result()
            if i + 1 < len(tasks):
                ahead = pool.submit(radiomics_of, tasks[i + 1][1])
            x, y, r, b, d, _raw, known, jobs = args
            done = None if raw is None else np.ones(len(x), dtype=bool)
            result = yield from run(tag, (x, y, r, b, d, raw, done, jobs))
            yield tag, result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _get_client(scheduler: Any) -> tuple[Any, bool]:
    try:
        from distributed import Client
    except ImportError as exc:
        raise ImportError(
            f"scheduler={scheduler!r} needs dask.distributed: pip install 'napari-rapacl[distributed]'"
        ) from exc
    if isinstance(scheduler, Client):
        return scheduler, False
    if hasattr(scheduler, "scheduler_address"):  # a cluster object, e.g. distributed.LocalCluster
        return Client(scheduler), True
    if isinstance(scheduler, str):
        try:
            return Client(scheduler, timeout="10s"), True
        except OSError as exc:
            raise RapaclInputError(
                f"scheduler={scheduler!r}: cannot connect to a dask scheduler there ({exc}); "
                f"use an address like tcp://host:8786 or one of {', '.join(LOCAL_SCHEDULERS)}"
            ) from exc
    raise RapaclInputError(
        f"scheduler={scheduler!r} must be None, a dask.distributed Client, a scheduler address or one of "
        f"{', '.join(LOCAL_SCHEDULERS)}"
    )


@contextlib.contextmanager
def _client_futures(scheduler: Any) -> Generator[tuple[Any, list], None, None]:
    """A dask.distributed client for ``scheduler`` and a list to register its futures in: on exit the
    registered futures not done are cancelled and a client made here is closed."""
    client, owned = _get_client(scheduler)
    futures: list = []
    try:
        yield client, futures
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        if owned:
            client.close()


def _on_client(scheduler: Any, submit: Callable[[Any], dict]) -> Generator[tuple[Any, Any], None, None]:
    """Yield ``(tag, result)`` of the futures ``submit(client)`` returns (``{future: tag}``) as they
    finish on a dask.distributed client; closing cancels the futures not done and closes a client
    made here."""
    from distributed import as_completed

    with _client_futures(scheduler) as (client, registered):
        futures = submit(client)
        registered.extend(futures)
        for fut in as_completed(list(futures)):
            yield futures[fut], fut.result()


def _run_distributed(model, slide, tasks, scheduler) -> Generator[tuple[Any, np.ndarray], None, None]:
    def submit(client) -> dict:
        ref = _SlideRef.of(slide)
        model_future = client.scatter(model, broadcast=True, hash=False)
        return {
            client.submit(_predict_tile, model_future, ref, *args, pure=False): tag for tag, args in tasks
        }

    yield from _on_client(scheduler, submit)


def run_tasks(
    fn: Callable[..., Any],
    tasks: Iterable[tuple[Any, tuple]],
    scheduler: Any = None,
    *,
    in_flight: int | None = None,
    ordered: bool = False,
) -> Generator[tuple[Any, Any], None, None]:
    """Run ``fn(*args)`` for every ``(tag, args)`` and yield ``(tag, result)``.

    ``scheduler``: None or ``"synchronous"`` (this thread, in order), ``"threads"``, ``"processes"``
    (spawned; ``fn`` and its arguments must be picklable, module-level) or a ``dask.distributed``
    Client, cluster or scheduler address (as for :func:`iter_predict_region`).

    ``tasks`` is consumed lazily: at most ``in_flight`` tasks (default: twice the local workers, or
    every task for a dask client) are submitted and not yet handed out, so a caller can build each
    task's arguments (a window of labels, say) only when it is about to run, and memory stays bounded
    whatever the number of tasks. One pool serves all of them. Results come as they finish, or in task
    order with ``ordered=True`` (results that finish early wait, and count against ``in_flight``).
    Closing the generator cancels the tasks not started yet.
    """
    _check_scheduler(scheduler)
    if in_flight is not None and in_flight < 1:
        raise RapaclInputError(f"in_flight must be at least 1, got {in_flight}")
    if scheduler is None or scheduler == "synchronous":
        for tag, args in tasks:
            yield tag, fn(*args)
        return
    if scheduler in ("threads", "processes"):
        import concurrent.futures as cf
        import multiprocessing

        if scheduler == "threads":
            pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=_local_workers())
        else:
            pool = cf.ProcessPoolExecutor(
                max_workers=_local_workers(), mp_context=multiprocessing.get_context("spawn")
            )
        try:
            yield from _bounded(
                tasks,
                lambda args: pool.submit(fn, *args),
                lambda fs: cf.wait(fs, return_when=cf.FIRST_COMPLETED).done,
                in_flight or 2 * _local_workers(),
                ordered,
            )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return

    from distributed import wait

    with _client_futures(scheduler) as (client, futures):

        def submit(args: tuple) -> Any:
            fut = client.submit(fn, *args, pure=False)
            futures.append(fut)
            return fut

        yield from _bounded(
            tasks,
            submit,
            lambda fs: wait(list(fs), return_when="FIRST_COMPLETED").done,
            in_flight or math.inf,
            ordered,
        )


def _bounded(
    tasks: Iterable[tuple[Any, tuple]],
    submit: Callable[[tuple], Any],
    first_done: Callable[[Any], Any],
    limit: float,
    ordered: bool,
) -> Generator[tuple[Any, Any], None, None]:
    """The loop of :func:`run_tasks` over futures: keep at most ``limit`` submitted tasks not yet
    handed out, pull the next task only when one is handed out."""
    from collections import deque

    todo = iter(tasks)
    pending: deque = deque()  # (future, tag) in submission order

    def fill() -> None:
        while len(pending) < limit:
            item = next(todo, None)
            if item is None:
                return
            tag, args = item
            pending.append((submit(args), tag))

    fill()
    while pending:
        if ordered:
            fut, tag = pending.popleft()
        else:
            done = first_done([f for f, _ in pending])
            index = next(i for i, (f, _) in enumerate(pending) if f in done)
            fut, tag = pending[index]
            del pending[index]
        result = fut.result()
        fill()
        yield tag, result


def _check_scheduler(scheduler: Any) -> None:
    if scheduler is None or (isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS):
        return
    if isinstance(scheduler, str):
        if "://" in scheduler or ":" in scheduler:
            return
        raise RapaclInputError(
            f"scheduler={scheduler!r} is not one of {', '.join(LOCAL_SCHEDULERS)} nor a scheduler address "
            "(tcp://host:port)"
        )
    if type(scheduler).__name__ == "Client" or hasattr(scheduler, "scheduler_address"):
        return
    raise RapaclInputError(
        f"scheduler={scheduler!r} must be None, a dask.distributed Client, a scheduler address or one of "
        f"{', '.join(LOCAL_SCHEDULERS)}"
    )


# --------------------------------------------------------------------------------------------
# spot predictions over a region
# --------------------------------------------------------------------------------------------


def iter_predict_region(
    model: torch.nn.Module,
    slide: Slide,
    x: Any,
    y: Any,
    *,
    radius: Any = None,
    box: Any = None,
    tile_px: int = DEFAULT_TILE_PX,
    cache: TileCache | None | bool = None,
    device: str = "auto",
    batch_size: int = 64,
    scheduler: Any = None,
    view_first: bool = False,
    radiomics_jobs: int | None = None,
    out: Callable[[int, int], Any] | None = None,
) -> Generator[Progress, None, RegionPrediction]:
    """Predict the spots inside ``box``, tile by tile, through a cache.

    Parameters
    ----------
    model
        A registered model (``model.config.patch_size``, ``.mpp``, ``.n_genes``; ``predict``).
    slide
        The lazy slide (its mpp is needed).
    x, y
        Spot centres in level-0 px, all the spots of the slide (the tiles are made from them).
    radius
        Spot radius in level-0 px (one number or one per spot); needed by models that aggregate over
        the spot (``"radius_px"`` in ``predict_inputs``, PixNet).
    box
        ``(x0, y0, x1, y1)`` half-open, level-0 px: only spots whose centre is inside are returned;
        None = all spots. It may extend past the slide but must overlap it.
    tile_px
        Side of the tile grid's cells in level-0 px.
    cache
        A :class:`TileCache`; None uses the process-wide :func:`default_cache`; False disables caching.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``... (resolved where the tile runs).
    batch_size
        Patches per ``model.predict`` call.
    scheduler
        None (tiles in this thread), ``"threads"``, ``"processes"``, ``"synchronous"``, a
        ``dask.distributed.Client``, a cluster (``LocalCluster``...) or a scheduler address (see the
        module docstring).
    view_first
        Predict the box's own spots first (in batches of ``batch_size``, stage ``"predict view"``) and
        yield them as soon as they are known -- a ``Progress`` whose ``result`` is the complete
        :class:`RegionPrediction` of the box -- then predict the rest of the tiles' spots to complete
        the cache (stage ``"predict"``). A viewer shows the view after the cost of its own spots
        instead of that of every spot of the tiles it touches; the returned result is the same.
    radiomics_jobs
        Models fed with radiomics (RaPaCL-ST, ``model.radiomics_recipe``): worker processes that
        segment and measure the spots of a tile (default: 2 when this machine has 2 cores or more,
        with ``scheduler=None``; tiles sent to a scheduler measure their spots on that worker). Each
        spot's radiomics are computed once per recipe and kept in the process-wide radiomics cache
        (shared with the Cells widget), so panning back, another model with the same recipe or a
        region measured before costs nothing.

    out
        ``out(n_spots, n_genes)`` returns the array the box's predictions are written into as each tile
        completes (an HDF5 dataset, say: the values then never sit in memory all at once; the CLI
        spills them so when it writes a file); the result's ``values`` is that array. None (the
        default): the values are gathered in memory. Not with ``view_first``.

    Yields
    ------
    Progress
        ``("predict", spots_done, spots_total)`` over the spots of every tile touched: once at the
        start, after every tile (cached tiles included) and, with ``scheduler`` None or ``"threads"``,
        after every batch of a running tile (a 2048 px tile of 8 µm bins holds ~16k spots: without it a
        CPU would be silent for tens of minutes); with ``view_first``,
        ``("predict view", batches_done, batches_total)`` too. ``"processes"``, ``"synchronous"`` and
        dask report per tile.

    Returns
    -------
    RegionPrediction
    """
    import torch  # noqa: F401  (fail early and clearly when torch is missing)

    xs, ys, rs = _check_spots(x, y, radius)
    tile_px = _check_tile_px(tile_px)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise RapaclInputError(f"batch_size={batch_size!r} must be a positive integer")
    _check_scheduler(scheduler)
    needs = _check_model_for_spots(model, rs)
    slide.require_mpp("spot prediction")
    radiomics = None
    if "radiomics" in needs:
        from .inference import radiomics_recipe
        from .radiomics import SpotFeatureCache, require_radiomics

        require_radiomics()
        recipe = radiomics_recipe(model)
        radiomics = SpotFeatureCache(slide, **recipe.spot_feature_kwargs())
        if radiomics_jobs is None:
            radiomics_jobs = min(2, os.cpu_count() or 1) if scheduler is None else 1
        if (
            isinstance(radiomics_jobs, bool)
            or not isinstance(radiomics_jobs, (int, np.integer))
            or radiomics_jobs < 1
        ):
            raise RapaclInputError(f"radiomics_jobs={radiomics_jobs!r} must be a positive integer")
    clipped = None if box is None else _check_box(box, slide)
    store = _resolve_cache(cache)
    n_genes = int(model.config.n_genes)

    index, tiles = spot_tiles(xs, ys, clipped, tile_px)
    total_tiles = len(tiles)
    sink = None
    if out is not None:
        if view_first:
            raise RapaclInputError(
                "view_first hands the box's values out while the tiles complete, which needs them in "
                "memory: use out=None with view_first"
            )
        sink = out(len(index), n_genes)
        if tuple(sink.shape) != (len(index), n_genes):
            raise RapaclInputError(
                f"out gave an array of shape {tuple(sink.shape)}; expected ({len(index)}, {n_genes})"
            )
    # progress counts spots (those of every tile touched): a tile of thousands of spots reports per batch
    total = int(sum(len(members) for _, members in tiles))
    yield Progress("predict", 0, total)
    mkey = model_key(model) if store is not None else None
    skey = slide_key(slide) if store is not None else None

    def task(members: np.ndarray) -> tuple:
        r_m = None if rs is None else np.ascontiguousarray(rs[members])
        raw = known = None
        if radiomics is not None:  # what this process already measured is not measured again
            raw, known = radiomics.lookup(xs[members], ys[members])
        return xs[members], ys[members], r_m, int(batch_size), device, raw, known, int(radiomics_jobs or 1)

    results: dict[tuple[int, int], np.ndarray] = {}
    keys: dict[tuple[int, int], tuple] = {}
    pending: dict[tuple[int, int], np.ndarray] = {}
    done = 0  # spots of finished tiles plus spots reported by running tiles
    n_tiles_cached = 0

    def keep(tile: tuple[int, int], members: np.ndarray, values: np.ndarray) -> None:
        """A finished tile's rows: written to ``sink`` (the box's spots among them), else kept."""
        if sink is None:
            results[tile] = values
        else:
            _scatter(index, members, values, sink)

    for tile, members in tiles:
        if store is not None:
            r_t = () if rs is None else (np.ascontiguousarray(rs[members]),)
            keys[tile] = (mkey, skey, f"spots/{tile_px}/{_hash_arrays(xs[members], ys[members], *r_t)}", tile)
            hit = store.get(keys[tile])
            if hit is not None:
                keep(tile, members, hit)
                n_tiles_cached += 1
                done += len(members)
                yield Progress("predict", done, total)
                continue
        pending[tile] = members
    cached = n_tiles_cached

    # the box's spots in tiles still to predict: first, when asked and when the tiles hold more
    view = np.zeros(0, dtype=np.int64)
    if view_first and pending:
        in_pending = np.concatenate(list(pending.values()))
        candidates = np.intersect1d(in_pending, index)
        if len(candidates) < len(in_pending):
            view = candidates
    view_values = np.empty((len(view), n_genes), dtype=np.float32)
    chunks = [(s, min(s + int(batch_size), len(view))) for s in range(0, len(view), int(batch_size))]
    rest = {tile: np.setdiff1d(members, view, assume_unique=True) for tile, members in pending.items()}
    tasks = [(("view", a, b), task(view[a:b])) for a, b in chunks]
    tasks += [(("tile", tile), task(r)) for tile, r in rest.items() if len(r)]
    rest_values: dict[tuple[int, int], np.ndarray] = {}
    if chunks:
        yield Progress("predict view", 0, len(chunks))

    def assemble(tile: tuple[int, int], complete: bool = True) -> np.ndarray:
        """A pending tile's rows: the view's values, then (``complete``) its rest, else NaN."""
        members = pending[tile]
        values = np.full((len(members), n_genes), np.nan, dtype=np.float32)
        in_view = np.isin(members, view, assume_unique=True)
        values[in_view] = view_values[np.searchsorted(view, members[in_view])]
        if complete and not in_view.all():
            values[~in_view] = rest_values.pop(tile)
        return values

    counted: dict[tuple[int, int], int] = {}  # spots of a running tile already counted in ``done``
    finished: set[tuple[int, int]] = set()

    def finish(tile: tuple[int, int]) -> Progress:
        nonlocal done
        values = assemble(tile)
        keep(tile, pending[tile], values)
        finished.add(tile)
        if store is not None:
            store.put(keys[tile], values)
        done += len(pending[tile]) - counted.pop(tile, 0)
        return Progress("predict", done, total)

    chunks_done = 0
    view_ready = not chunks  # a tile is finished once the view and its own rest are predicted
    # spots measured in this process are in its radiomics cache already (iter_spot_features puts them)
    other_process = scheduler not in (None, "synchronous", "threads")
    task_members = {("view", a, b): view[a:b] for a, b in chunks}
    task_members.update({("tile", tile): r for tile, r in rest.items() if len(r)})
    runner = _run_tasks(model, slide, tasks, scheduler)
    try:
        for tag, item in runner:
            if isinstance(item, _Batch):  # a running tile's spots so far: reported once the view is out
                if view_ready and tag[0] == "tile" and counted.get(tag[1], 0) < item.done < len(rest[tag[1]]):
                    done += item.done - counted.get(tag[1], 0)
                    counted[tag[1]] = item.done
                    yield Progress("predict", done, total)
                continue
            values, raw = item
            values = np.asarray(values, dtype=np.float32)
            if radiomics is not None and raw is not None and other_process:
                members = task_members[tag]  # measured in a worker process: keep them here too
                radiomics.store(xs[members], ys[members], raw)
            if tag[0] == "tile":
                rest_values[tag[1]] = values
                if view_ready:
                    yield finish(tag[1])
                continue
            view_values[tag[1] : tag[2]] = values
            chunks_done += 1
            view_ready = chunks_done == len(chunks)
            partial = None
            if view_ready:  # the box is complete: hand it out, then finish the tiles
                rows = {**results, **{tile: assemble(tile, complete=False) for tile in pending}}
                partial = RegionPrediction(
                    index,
                    _gather(index, tiles, rows, n_genes),
                    total_tiles - cached,
                    cached,
                    _box_radiomics(radiomics, xs, ys, index),
                )
            yield Progress("predict view", chunks_done, len(chunks), result=partial)
            if view_ready:
                for tile in pending:  # tiles all inside the box, and those whose rest came first
                    if tile not in finished and (len(rest[tile]) == 0 or tile in rest_values):
                        yield finish(tile)
    finally:
        runner.close()
    return RegionPrediction(
        index,
        _gather(index, tiles, results, n_genes) if sink is None else sink,
        total_tiles - cached,
        cached,
        _box_radiomics(radiomics, xs, ys, index),
    )


def _scatter(index: np.ndarray, members: np.ndarray, values: np.ndarray, out: Any) -> None:
    """Write a tile's rows (``values``, one per ``members``) at the rows of ``out`` that hold the box's
    spots (``index``, sorted): numpy arrays at once, other arrays (HDF5, zarr) one contiguous run of rows
    at a time (a tile's spots are runs of consecutive spots in a grid's row order)."""
    if not len(index) or not len(members):
        return
    pos = np.searchsorted(index, members)
    pos_c = np.minimum(pos, len(index) - 1)
    hit = index[pos_c] == members
    rows, vals = pos_c[hit], np.asarray(values)[hit]
    if not len(rows):
        return
    if isinstance(out, np.ndarray):
        out[rows] = vals
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
        out[int(rows[a]) : int(rows[b - 1]) + 1] = vals[a:b]


def _box_radiomics(radiomics: Any, xs: np.ndarray, ys: np.ndarray, index: np.ndarray) -> Any:
    """The raw radiomics of the box's spots from the radiomics cache (NaN rows for spots whose tile
    came from the prediction cache after their radiomics left the radiomics cache), or None."""
    if radiomics is None:
        return None
    import pandas as pd

    values, _known = radiomics.lookup(xs[index], ys[index])
    return pd.DataFrame(values, columns=radiomics.columns)


def _gather(
    index: np.ndarray, tiles: list[tuple[tuple[int, int], np.ndarray]], results: dict, n_genes: int
) -> np.ndarray:
    """The rows of ``index`` (the box's spots) from per-tile results of every member of each tile."""
    out = np.empty((len(index), n_genes), dtype=np.float32)
    for tile, members in tiles:
        pos = np.searchsorted(index, members)
        pos_c = np.minimum(pos, max(len(index) - 1, 0))
        hit = index[pos_c] == members
        out[pos_c[hit]] = results[tile][hit]
    return out


def predict_region(model, slide, x, y, **kwargs) -> RegionPrediction:
    """Blocking form of :func:`iter_predict_region`."""
    from .progress import run_to_completion

    return run_to_completion(iter_predict_region(model, slide, x, y, **kwargs))


# --------------------------------------------------------------------------------------------
# dense maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DenseGeometry:
    s: float  # level-0 px per map px
    patch: int  # window side (map px)
    margin: int  # discarded border of each window (map px)
    tile: int  # cached tile side (map px), a multiple of core
    map_h: int  # map extent of the whole slide (map px)
    map_w: int

    @property
    def core(self) -> int:
        return self.patch - 2 * self.margin


def dense_geometry(model: Any, slide: Slide, tile_px: int = DEFAULT_TILE_PX) -> _DenseGeometry:
    """The window/core/tile geometry :func:`iter_predict_dense` uses for ``model`` on ``slide``."""
    cfg = model.config
    s = float(cfg.mpp) / slide.require_mpp("dense maps")
    patch = int(cfg.patch_size)
    margin = (patch // 7) // 4 * 4  # 32 px of a 224 px window; a multiple of the stride-4 output grid
    core = patch - 2 * margin
    tile = max(1, round(tile_px / s / core)) * core
    height, width = slide.shape
    return _DenseGeometry(s, patch, margin, tile, math.ceil(height / s), math.ceil(width / s))


def _resolve_genes(model: Any, genes: Any) -> tuple[list[int], list]:
    n = int(model.config.n_genes)
    names = getattr(model, "genes", None)
    if genes is None:
        channels = list(range(n))
    else:
        if isinstance(genes, (str, int, np.integer)):
            genes = [genes]
        channels = []
        for g in genes:
            if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
                if not 0 <= int(g) < n:
                    raise RapaclInputError(f"gene index {g} out of range: the model predicts {n} genes")
                channels.append(int(g))
            elif isinstance(g, str):
                if names is None:
                    raise RapaclInputError(
                        f"gene {g!r} given by name, but the model carries no gene list: pass output indices "
                        "(ints) or set model.genes to the checkpoint's genes"
                    )
                try:
                    channels.append(list(names).index(g))
                except ValueError:
                    raise RapaclInputError(f"gene {g!r} is not one of the model's {n} genes") from None
            else:
                raise RapaclInputError(f"genes must be names or output indices, got {g!r}")
        if not channels:
            raise RapaclInputError("genes is empty: select at least one gene (None = all)")
    labels = [names[c] for c in channels] if names is not None else list(channels)
    return channels, labels


def _dense_tile(
    model: Any,
    slide: Slide,
    geo: _DenseGeometry,
    ty: int,
    tx: int,
    channels: list[int],
    device: str,
) -> np.ndarray:
    """``float32 (len(channels), tile, tile)`` map of one tile (NaN outside the slide)."""
    import torch

    from .inference import images_to_tensor
    from .preprocess import iter_patches

    t, c, m, p, s = geo.tile, geo.core, geo.margin, geo.patch, geo.s
    out = np.full((len(channels), t, t), np.nan, dtype=np.float32)
    # the cores of this tile that overlap the slide's map extent
    rows = [r for r in range(ty * t, (ty + 1) * t, c) if r < geo.map_h]
    cols = [q for q in range(tx * t, (tx + 1) * t, c) if q < geo.map_w]
    if not rows or not cols:
        return out
    origins = [(r, q) for r in rows for q in cols]
    # window (r - m, q - m) .. + p in map px; its centre in continuous level-0 coordinates
    cy = np.array([(r - m + p / 2) * s for r, _ in origins])
    cx = np.array([(q - m + p / 2) * s for _, q in origins])
    per_window = int(model.config.n_genes) * p * p * 4
    batch = max(1, min(64, _DENSE_BATCH_BYTES // max(1, per_window)))
    sel = torch.as_tensor(channels, dtype=torch.long, device=device)
    source = _prefetch(slide, cx, cy, p, float(model.config.mpp))  # this tile's windows, read at once
    for start, stop, patches in iter_patches(source, cx, cy, size=p, mpp=model.config.mpp, batch_size=batch):
        with torch.inference_mode():
            maps = model.predict_map(images_to_tensor(patches, device))
            maps = maps.index_select(1, sel)[:, :, m : m + c, m : m + c].float().cpu().numpy()
        for j in range(stop - start):
            r, q = origins[start + j]
            out[:, r - ty * t : r - ty * t + c, q - tx * t : q - tx * t + c] = maps[j]
    # map pixels past the slide's extent are not part of the map
    out[:, max(0, geo.map_h - ty * t) :, :] = np.nan
    out[:, :, max(0, geo.map_w - tx * t) :] = np.nan
    return out


def iter_predict_dense(
    model: torch.nn.Module,
    slide: Slide,
    box: Any,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    cache: TileCache | None | bool = None,
    device: str = "auto",
    genes: Any = None,
) -> Generator[Progress, None, DenseMap]:
    """A dense gene map over ``box`` from a model with ``predict_map`` (PixNet), tile by tile.

    Parameters
    ----------
    model
        A model with ``predict_map(images) -> (B, G, H, W)`` at its input resolution.
    slide
        The lazy slide (its mpp is needed).
    box
        ``(x0, y0, x1, y1)`` in level-0 px (may extend past the slide, must overlap it); None = the
        whole slide.
    tile_px
        Approximate side of a cached tile in level-0 px (rounded to whole window cores).
    cache
        A :class:`TileCache`; None uses :func:`default_cache`; False disables caching.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``...
    genes
        Output indices (ints) or names (when ``model.genes`` is set) of the genes to map; None = all.
        Memory is ``len(genes) x H x W x 4`` bytes for the output plus one tile.

    Yields
    ------
    Progress
        ``("dense", tiles_done, tiles_total)`` at the start and after every tile.

    Returns
    -------
    DenseMap
    """
    from .inference import resolve_device

    if not callable(getattr(model, "predict_map", None)):
        raise RapaclInputError(
            f"model {getattr(model, 'model_name', type(model).__name__)!r} has no predict_map: dense maps "
            "need a model that predicts a per-pixel map (pixnet)"
        )
    tile_px = _check_tile_px(tile_px)
    height, width = slide.shape
    x0, y0, x1, y1 = (0.0, 0.0, float(width), float(height)) if box is None else _check_box(box, slide)
    geo = dense_geometry(model, slide, tile_px)
    channels, labels = _resolve_genes(model, genes)
    store = _resolve_cache(cache)
    device = resolve_device(device)
    model = model.to(device).eval()

    s, t = geo.s, geo.tile
    i0, i1 = math.floor(y0 / s), min(math.ceil(y1 / s), geo.map_h)
    j0, j1 = math.floor(x0 / s), min(math.ceil(x1 / s), geo.map_w)
    out = np.empty((len(channels), i1 - i0, j1 - j0), dtype=np.float32)
    tiles = [(ty, tx) for ty in range(i0 // t, (i1 - 1) // t + 1) for tx in range(j0 // t, (j1 - 1) // t + 1)]
    kind = f"dense/{geo.patch}/{geo.margin}/{t}/{_hash_arrays(np.asarray(channels, np.int64))}"
    mkey = model_key(model) if store is not None else None
    skey = slide_key(slide) if store is not None else None
    yield Progress("dense", 0, len(tiles))
    for k, (ty, tx) in enumerate(tiles):
        key = (mkey, skey, kind, (ty, tx))
        values = store.get(key) if store is not None else None
        if values is None:
            values = _dense_tile(model, slide, geo, ty, tx, channels, device)
            if store is not None:
                store.put(key, values)
        # the part of this tile inside [i0, i1) x [j0, j1)
        a0, a1 = max(i0, ty * t), min(i1, (ty + 1) * t)
        b0, b1 = max(j0, tx * t), min(j1, (tx + 1) * t)
        out[:, a0 - i0 : a1 - i0, b0 - j0 : b1 - j0] = values[
            :, a0 - ty * t : a1 - ty * t, b0 - tx * t : b1 - tx * t
        ]
        yield Progress("dense", k + 1, len(tiles))
    centre = (s - 1.0) / 2.0  # map pixel i covers [i s, (i + 1) s): its centre in napari's convention
    return DenseMap(
        values=out,
        genes=labels,
        translate_px=(i0 * s + centre, j0 * s + centre),
        px_size=s,
        channels=tuple(channels),
        corner_px=(i0 * s, j0 * s),
    )


def predict_dense(model, slide, box, **kwargs) -> DenseMap:
    """Blocking form of :func:`iter_predict_dense`."""
    from .progress import run_to_completion

    return run_to_completion(iter_predict_dense(model, slide, box, **kwargs))
