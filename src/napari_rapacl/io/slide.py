"""Lazy whole-slide image I/O.

:func:`open_slide` opens a slide as a :class:`Slide`: a lazy multiscale image, one dask array
``(y, x, 3)`` uint8 per pyramid level, plus the microns per pixel when they are known.

Supported files
---------------
* Pyramidal TIFF / OME-TIFF / Aperio SVS / NDPI: every level is read lazily, tile by tile, through
  tifffile's Zarr store.
* Flat (single-level) TIFF: level 0 is read lazily (strip by strip or tile by tile); the lower
  levels are built lazily by 2 x 2 averaging.
* JPEG and PNG: these formats have no random access, so the first read of any level-0 pixel
  decodes the whole file (once; the result is cached). JPEG overviews (1/2, 1/4, 1/8) are decoded
  with libjpeg's DCT scaling, which never decodes level 0, so a thumbnail of a 10k x 10k JPEG is
  cheap. PNG overviews are averaged from level 0.

:func:`write_ome_tiff` writes a tiled, pyramidal OME-TIFF from a numpy or dask array tile by
tile, with bounded memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import threading
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr
from PIL import Image

from .._atomic import write_atomic
from .._errors import CorruptFileError, MissingPixelSizeError, RapaclInputError, UnsupportedFormatError
from ._paths import require_readable

__all__ = ["SUPPORTED_EXTENSIONS", "Slide", "open_slide", "write_ome_tiff"]

TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".svs", ".ndpi")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
PNG_EXTENSIONS = (".png",)
SUPPORTED_EXTENSIONS = TIFF_EXTENSIONS + JPEG_EXTENSIONS + PNG_EXTENSIONS

MPP_SOURCES = ("metadata", "caller", "spot-grid", "unknown")

#: Stop adding pyramid levels once the longest side is below this many pixels.
_MIN_LEVEL_SIZE = 1024
#: Decode one segment at open time (to detect corrupt data) only when it is at most this large.
_PROBE_BYTES = 64 * 2**20
#: Upper bound on the rows of pixels held in memory at once by :func:`write_ome_tiff`.
_BAND_BYTES = 256 * 2**20

_PIL_LIMIT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------------------------


#: Pixel sizes a person may give for a slide (um/px): a 40x scan is about 0.25, 20x about 0.5.
PLAUSIBLE_MPP = (0.05, 50.0)


def _check_mpp(mpp: Any, what: str = "mpp", *, plausible: bool = False) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise RapaclInputError(f"{what}={mpp!r} is not a number (microns per pixel)") from None
    if not math.isfinite(value) or value <= 0:
        raise RapaclInputError(f"{what}={mpp!r} must be a finite number > 0 (microns per pixel)")
    lo, hi = PLAUSIBLE_MPP
    if plausible and not lo <= value <= hi:
        raise RapaclInputError(
            f"a pixel size of {value:g} um/px is outside the plausible range {lo:g}-{hi:g} um/px (a 40x "
            "scan is about 0.25, 20x about 0.5): check the value, in microns per pixel (not pixels per "
            "micron)"
        )
    return value


@dataclass(frozen=True, eq=False)
class Slide:
    """A lazy multiscale RGB slide.

    Attributes
    ----------
    levels
        One dask array ``(y, x, 3)`` uint8 per pyramid level, level 0 first, square chunks.
    downsamples
        Level-0 pixels per level pixel (level-0 width / level width); ``downsamples[0] == 1.0``.
    mpp
        Microns per level-0 pixel, ``None`` if unknown.
    mpp_source
        Where ``mpp`` came from: ``"metadata"``, ``"caller"``, ``"spot-grid"`` or ``"unknown"``
        (other labels are accepted; ``"unknown"`` exactly when ``mpp`` is None).
    path
        The file the slide was read from, if any.
    """

    levels: tuple[da.Array, ...]
    downsamples: tuple[float, ...]
    mpp: float | None = None
    mpp_source: str = "unknown"
    path: Path | None = None
    # Lazy decoders behind the levels (JPEG/PNG) or the open TiffFile; internal.
    _sources: tuple[Any, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        downsamples = tuple(float(d) for d in self.downsamples)
        if not levels:
            raise RapaclInputError("a Slide needs at least one level")
        if len(levels) != len(downsamples):
            raise RapaclInputError(f"{len(levels)} levels but {len(downsamples)} downsample factors")
        for i, level in enumerate(levels):
            if level.ndim != 3 or level.shape[2] != 3 or level.dtype != np.uint8:
                raise RapaclInputError(
                    f"level {i} must be a (y, x, 3) uint8 array, got shape {level.shape} {level.dtype}"
                )
        if downsamples[0] != 1.0 or any(b < a for a, b in zip(downsamples, downsamples[1:], strict=False)):
            raise RapaclInputError(f"downsamples must start at 1.0 and increase, got {downsamples}")
        if not isinstance(self.mpp_source, str) or not self.mpp_source:
            raise RapaclInputError(f"mpp_source={self.mpp_source!r} must be a non-empty string")
        mpp = None if self.mpp is None else _check_mpp(self.mpp)
        if mpp is None:
            object.__setattr__(self, "mpp_source", "unknown")
        elif self.mpp_source == "unknown":
            object.__setattr__(self, "mpp_source", "caller")  # a pixel size was given after all
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "downsamples", downsamples)
        object.__setattr__(self, "mpp", mpp)
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    @property
    def name(self) -> str:
        """The file name, or ``"<in-memory slide>"``."""
        return self.path.name if self.path is not None else "<in-memory slide>"

    def with_mpp(self, mpp: float, source: str = "caller") -> Slide:
        """Return a copy with ``mpp`` microns per level-0 pixel (validated > 0) from ``source``."""
        value = _check_mpp(mpp)
        if not isinstance(source, str) or not source or source == "unknown":
            raise RapaclInputError(f"source={source!r} must name where the pixel size came from")
        return dataclasses.replace(self, mpp=value, mpp_source=source)

    def require_mpp(self, purpose: str) -> float:
        """Return ``mpp`` or raise :class:`MissingPixelSizeError` naming the slide and ``purpose``."""
        if self.mpp is None:
            raise MissingPixelSizeError(
                f"{self.path if self.path is not None else self.name}: the pixel size (microns per "
                f"pixel) is unknown, but {purpose} needs it; give it: --mpp on the command line (e.g. "
                "0.25 for a 40x scan, 0.5 for 20x), mpp= in Python (or estimate it from the spot grid)"
            )
        return self.mpp

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample factor ``<= downsample`` (level 0 if none)."""
        ds = float(downsample)
        if not math.isfinite(ds) or ds <= 0:
            raise RapaclInputError(f"downsample={downsample!r} must be a finite number > 0")
        best = 0
        for i, d in enumerate(self.downsamples):
            if d <= ds + 1e-6:
                best = i
        return best

    def read_region(self, x0: int, y0: int, x1: int, y1: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """Read a box given in level-0 pixel coordinates from ``level``.

        Parameters
        ----------
        x0, y0, x1, y1
            Half-open box in level-0 pixels (x = column, y = row).
        level
            Pyramid level to read from; the result is about ``((y1-y0)/ds, (x1-x0)/ds, 3)``.
        fill
            Value for the parts of the box outside the image.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8.
        """
        if not isinstance(level, (int, np.integer)) or not 0 <= level < len(self.levels):
            raise RapaclInputError(
                f"level={level!r} out of range for {self.name} ({len(self.levels)} levels)"
            )
        if not 0 <= int(fill) <= 255:
            raise RapaclInputError(f"fill={fill!r} must be in 0..255")
        coords = [float(v) for v in (x0, y0, x1, y1)]
        if not all(math.isfinite(v) for v in coords):
            raise RapaclInputError(f"region {coords} has non-finite coordinates")
        fx0, fy0, fx1, fy1 = coords
        if fx1 < fx0 or fy1 < fy0:
            raise RapaclInputError(f"region ({x0}, {y0}, {x1}, {y1}) has x1 < x0 or y1 < y0")
        arr = self.levels[level]
        ds = self.downsamples[level]
        lx0, ly0 = math.floor(fx0 / ds), math.floor(fy0 / ds)
        w, h = int(round((fx1 - fx0) / ds)), int(round((fy1 - fy0) / ds))
        out = np.full((h, w, 3), int(fill), dtype=np.uint8)
        height, width = arr.shape[:2]
        ax0, ay0 = max(lx0, 0), max(ly0, 0)
        ax1, ay1 = min(lx0 + w, width), min(ly0 + h, height)
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - ly0 : ay1 - ly0, ax0 - lx0 : ax1 - lx0] = arr[ay0:ay1, ax0:ax1].compute(
                scheduler="threads"
            )
        return out

    def thumbnail(self, max_size: int = 2000) -> tuple[np.ndarray, float]:
        """An overview image no larger than ``max_size`` on its longest side.

        It is read from the smallest level that is at least as large as the thumbnail, so level 0
        is never decoded when a smaller level suffices. A flat TIFF (no overview in the file) is read
        once, strip by strip (or row of tiles by row of tiles), each band averaged into the thumbnail
        as it is read, so memory stays bounded by a band (:data:`_THUMB_BAND_BYTES`) whatever the size.

        Returns
        -------
        image, scale
            ``(h, w, 3)`` uint8 and the thumbnail pixels per level-0 pixel.
        """
        if int(max_size) < 1:
            raise RapaclInputError(f"max_size={max_size!r} must be >= 1")
        height, width = self.shape
        scale = min(1.0, int(max_size) / max(height, width))
        level = self.best_level(1.0 / scale)
        th = min(int(max_size), max(1, int(round(height * scale))))
        tw = min(int(max_size), max(1, int(round(width * scale))))
        flat = next((s for s in self._sources if isinstance(s, _FlatTiffLevel)), None)
        if flat is not None and level > 0:
            # no overview in the file: one pass over its strips/tiles, averaged while reading
            return _stream_thumbnail(flat.native, th, tw), scale
        image = np.asarray(self.levels[level].compute(scheduler="threads"))
        if image.shape[:2] != (th, tw):
            image = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.LANCZOS))
        return image, scale

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g} um/px ({self.mpp_source})"
        shapes = ", ".join(f"{a.shape[1]}x{a.shape[0]}" for a in self.levels)
        return f"Slide({self.name!r}, levels=[{shapes}], mpp={mpp})"


# --------------------------------------------------------------------------------------------
# open_slide
# --------------------------------------------------------------------------------------------


def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


#: Largest JPEG / PNG (pixels) decoded by default: these formats have no random access, so level 0 is
#: decoded whole (3 bytes per pixel, and about as much again while decoding). Raise it with
#: ``open_slide(max_pixels=...)``, ``--max-pixels`` or the environment variable below.
DEFAULT_MAX_DECODE_PIXELS = 500_000_000
MAX_PIXELS_ENV = "NAPARI_RAPACL_MAX_PIXELS"


def max_decode_pixels(value: int | None = None) -> int:
    """The pixel budget for a whole-image decode: ``value``, else ``$NAPARI_RAPACL_MAX_PIXELS``, else
    :data:`DEFAULT_MAX_DECODE_PIXELS`."""
    text = value if value is not None else os.environ.get(MAX_PIXELS_ENV)
    if text is None or text == "":
        return DEFAULT_MAX_DECODE_PIXELS
    try:
        budget = int(float(text))
    except (TypeError, ValueError):
        raise RapaclInputError(f"max pixels {text!r} ({MAX_PIXELS_ENV}) is not a number of pixels") from None
    if budget < 1:
        raise RapaclInputError(f"max pixels {text!r} ({MAX_PIXELS_ENV}) must be >= 1")
    return budget


def open_slide(
    path: str | os.PathLike, mpp: float | None = None, chunk: int = 1024, *, max_pixels: int | None = None
) -> Slide:
    """Open a whole-slide image lazily.

    Parameters
    ----------
    path
        A TIFF / OME-TIFF / SVS / NDPI (pyramidal or flat), JPEG or PNG file. JPEG and PNG force a
        full decode of the file on the first level-0 access (cached afterwards); JPEG overviews
        are decoded at 1/2, 1/4 and 1/8 scale without decoding level 0.
    mpp
        Microns per level-0 pixel; overrides the file's metadata (``mpp_source="caller"``).
    chunk
        Side of the square dask chunks.
    max_pixels
        JPEG / PNG only: the most pixels decoded at once (:func:`max_decode_pixels`; default
        500 million, i.e. ~1.5 GB of RGB, or ``$NAPARI_RAPACL_MAX_PIXELS``). Larger files are refused
        with a message before anything is decoded (a decompression bomb's header can claim any size).

    Returns
    -------
    Slide

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    UnsupportedFormatError
        Unknown extension, a directory, or an image layout that is not RGB-like.
    CorruptFileError
        The file is truncated or damaged (checked at open time).
    RapaclInputError
        ``mpp`` or ``chunk`` is invalid.
    """
    path = Path(path)
    caller_mpp = None if mpp is None else _check_mpp(mpp, plausible=True)
    chunk = int(chunk)
    if chunk < 16:
        raise RapaclInputError(f"chunk={chunk} must be >= 16 pixels")
    require_readable(path, "slide file")
    supported = ", ".join(SUPPORTED_EXTENSIONS)
    if path.is_dir():
        raise UnsupportedFormatError(f"{path} is a directory, not a slide file; supported: {supported}")
    ext = _extension(path)
    if ext in TIFF_EXTENSIONS:
        levels, meta_mpp, sources = _open_tiff(path, chunk)
    elif ext in JPEG_EXTENSIONS or ext in PNG_EXTENSIONS:
        levels, meta_mpp, sources = _open_pil(path, chunk, max_decode_pixels(max_pixels))
    else:
        raise UnsupportedFormatError(
            f"{path}: unsupported file type {ext or '(no extension)'!r}; supported: {supported}"
        )
    width0 = levels[0].shape[1]
    downsamples = tuple(width0 / lv.shape[1] for lv in levels)
    if caller_mpp is not None:
        value, source = caller_mpp, "caller"
    elif meta_mpp is not None:
        value, source = meta_mpp, "metadata"
    else:
        value, source = None, "unknown"
    return Slide(tuple(levels), downsamples, value, source, path, tuple(sources))


def _coarsen_levels(level0: da.Array, chunk: int) -> list[da.Array]:
    """Lazy 2 x 2 mean pyramid below ``level0`` until the longest side is < ~1024 px."""
    levels = []
    current = level0
    while max(current.shape[:2]) >= _MIN_LEVEL_SIZE and min(current.shape[:2]) >= 2:
        current = _coarsen2(current, chunk)
        levels.append(current)
    return levels


def _coarsen2(arr: da.Array, chunk: int) -> da.Array:
    h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
    arr = arr[:h, :w]
    # coarsen needs chunk sizes divisible by 2
    if any(c % 2 for c in arr.chunks[0] + arr.chunks[1]):
        arr = arr.rechunk((2 * max(1, chunk // 2), 2 * max(1, chunk // 2), 3))
    out = da.coarsen(np.mean, arr, {0: 2, 1: 2}, trim_excess=True, dtype=np.float32)
    out = (out + 0.5).astype(np.uint8)
    return out.rechunk((chunk, chunk, 3))


# ---- TIFF ------------------------------------------------------------------------------------


def _open_tiff(path: Path, chunk: int) -> tuple[list[da.Array], float | None, list[Any]]:
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise CorruptFileError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    try:
        return _tiff_levels(path, tif, chunk)
    except RapaclInputError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise CorruptFileError(f"{path}: damaged TIFF file ({type(exc).__name__}: {exc})") from exc


def _tiff_levels(path: Path, tif: tifffile.TiffFile, chunk: int) -> tuple[list[da.Array], float | None, list]:
    if not tif.series:
        raise CorruptFileError(f"{path}: the TIFF file holds no image")
    series = tif.series[0]
    size = path.stat().st_size
    levels: list[da.Array] = []
    token = dask.base.tokenize(str(path.resolve()), size, path.stat().st_mtime_ns, chunk)
    for ilevel, level in enumerate(series.levels):
        # header check: every strip/tile must lie inside the file (catches truncated files)
        for page in level.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                raise CorruptFileError(
                    f"{path}: truncated TIFF file (image data of level {ilevel} ends beyond the "
                    f"end of the file, {size} bytes)"
                )
        native = _tiff_level_array(path, tif, series, ilevel, chunk, token)
        if ilevel == 0:
            native0 = native
        arr = native.rechunk((chunk, chunk, 3))
        if levels and (arr.shape[0] >= levels[-1].shape[0] or arr.shape[1] >= levels[-1].shape[1]):
            break  # not a proper reduction; ignore the rest
        levels.append(arr)
    # decode one small segment of the smallest native level so that damaged data fails here
    _probe_tiff(path, series.levels[len(levels) - 1])
    sources: list[Any] = [tif]
    if len(levels) == 1:
        levels += _coarsen_levels(levels[0], chunk)
        sources.append(_FlatTiffLevel(native0))
    return levels, _tiff_mpp(tif), sources


def _probe_tiff(path: Path, level: tifffile.TiffPageSeries) -> None:
    page = level.keyframe
    counts = page.databytecounts
    if len(counts) == 0 or int(counts[0]) > _PROBE_BYTES or page.is_tiled and page.tilewidth > 8192:
        return
    try:
        page = level.pages[0]
        for _segment in page.segments(maxworkers=1, buffersize=max(1, int(counts[0]))):
            break
    except Exception as exc:
        raise CorruptFileError(f"{path}: damaged TIFF image data ({type(exc).__name__}: {exc})") from exc
    # and the segment that ends last in the file: a truncated file padded back to its size with filler
    # keeps valid offsets, so only decoding its tail shows the damage (compressed data only: zeros are
    # valid uncompressed pixels)
    if int(page.compression) == 1:
        return
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    last = int(np.argmax(offsets + np.asarray(page.databytecounts, dtype=np.int64)))
    if last == 0 or int(page.databytecounts[last]) > _PROBE_BYTES:
        return
    try:
        fh = page.parent.filehandle
        with fh.lock:
            fh.seek(int(offsets[last]))
            data = fh.read(int(page.databytecounts[last]))
        page.decode(data, last, jpegtables=page.jpegtables)
    except Exception as exc:
        raise CorruptFileError(
            f"{path}: damaged TIFF image data at the end of the file (strip/tile {last} does not decode: "
            f"{type(exc).__name__}: {exc}); the file was probably cut short and padded. Copy or export it "
            "again"
        ) from exc


def _tiff_level_array(
    path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, ilevel: int, chunk: int, token: str
) -> da.Array:
    level = series.levels[ilevel]
    keyframe = level.keyframe
    axes = level.get_axes(True)
    shape = level.get_shape(True)
    layout = (
        f"axes {axes!r}, shape {tuple(shape)}, dtype {level.dtype}, photometric {keyframe.photometric.name}"
    )
    if "Y" not in axes or "X" not in axes:
        raise UnsupportedFormatError(f"{path}: unsupported image layout ({layout}); expected Y and X axes")
    extra = [a for a in axes if a not in "YX"]
    if len(extra) > 1 or (extra and extra[0] not in "SC"):
        raise UnsupportedFormatError(
            f"{path}: unsupported image layout ({layout}); expected a single 2-D RGB or grey image"
        )
    if keyframe.is_memmappable and level.dataoffset is not None:
        # uncompressed contiguous data: memory-map it (lazy, exact random access)
        raw: Any = tif.asarray(series=0, level=ilevel, out="memmap", squeeze=True)
        chunks = _native_chunks(raw.shape, axes, chunk)
        arr = da.from_array(raw, chunks=chunks, name=f"tiff-mm-{ilevel}-{token}")
    else:
        store = series.aszarr(level=ilevel, squeeze=True)
        z = zarr.open_array(store=store, mode="r")
        arr = da.from_zarr(z, name=f"tiff-{ilevel}-{token}")
    if arr.shape != tuple(shape):
        raise UnsupportedFormatError(f"{path}: unexpected array shape {arr.shape} for layout ({layout})")
    # to (y, x, c)
    order = [axes.index("Y"), axes.index("X")] + ([axes.index(extra[0])] if extra else [])
    arr = arr.transpose(order)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = _to_uint8(path, arr, keyframe, layout)
    nchan = arr.shape[2]
    photometric = int(keyframe.photometric)
    if photometric == int(tifffile.PHOTOMETRIC.PALETTE) and nchan == 1:
        cmap = keyframe.colormap
        if cmap is None:
            raise UnsupportedFormatError(f"{path}: palette image without colormap ({layout})")
        lut = np.asarray(cmap).T
        lut = (lut >> 8).astype(np.uint8) if lut.max() > 255 else lut.astype(np.uint8)
        arr = _apply_lut(arr[:, :, 0], lut)
    elif nchan == 1 or nchan == 2:  # grey (+ alpha)
        _warn_grey(path)
        grey = arr[:, :, :1]
        if photometric == int(tifffile.PHOTOMETRIC.MINISWHITE):
            grey = 255 - grey
        arr = da.concatenate([grey, grey, grey], axis=2)
    elif nchan in (3, 4):
        rgb_like = photometric in (int(tifffile.PHOTOMETRIC.RGB), int(tifffile.PHOTOMETRIC.MINISBLACK))
        # tifffile converts YCbCr to RGB for JPEG-compressed data only
        if photometric == int(tifffile.PHOTOMETRIC.YCBCR):
            rgb_like = int(keyframe.compression) in (6, 7, 34892, 33007)
        if not rgb_like:
            raise UnsupportedFormatError(f"{path}: unsupported colour space ({layout}); expected RGB")
        arr = arr[:, :, :3]  # drop alpha
    else:
        raise UnsupportedFormatError(
            f"{path}: unsupported image layout ({layout}); expected 1 (grey), 3 (RGB) or 4 (RGBA) channels"
        )
    return arr  # the file's own chunks (strips or tiles): the caller rechunks


#: The most bytes of level 0 held at once while a flat TIFF's thumbnail is read.
_THUMB_BAND_BYTES = 16 * 2**20


class _FlatTiffLevel:
    """Level 0 of a flat TIFF (no overviews) at the file's own chunks (strips or tiles), RGB uint8."""

    def __init__(self, native: da.Array) -> None:
        self.native = native


def _groups(sizes: tuple[int, ...], unit: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive chunks ``sizes`` grouped into ``(start, stop)`` runs of at most ``budget`` bytes
    (``unit`` bytes per element along the axis; one chunk at least)."""
    out, start, pos, size = [], 0, 0, 0
    for n in sizes:
        if size and (size + n) * unit > budget:
            out.append((start, pos))
            start, size = pos, 0
        pos += n
        size += n
    out.append((start, pos))
    return out


def _bin_starts(bins: np.ndarray) -> np.ndarray:
    """Start offsets of the runs of equal values in the non-decreasing ``bins``."""
    return np.concatenate([[0], np.flatnonzero(np.diff(bins)) + 1])


def _stream_thumbnail(native: da.Array, th: int, tw: int, budget: int | None = None) -> np.ndarray:
    """The ``(th, tw, 3)`` box average of ``native``, read one band of whole file chunks at a time (each
    strip or tile decoded once) and summed into the thumbnail as it is read."""
    budget = _THUMB_BAND_BYTES if budget is None else int(budget)
    height, width = native.shape[:2]
    row_bin = np.arange(height, dtype=np.int64) * th // height
    col_bin = np.arange(width, dtype=np.int64) * tw // width
    acc = np.zeros((th, tw, 3), dtype=np.float32)  # sums of at most ~(height/th)*(width/tw) values: exact
    for y0, y1 in _groups(native.chunks[0], width * 3, budget):
        for x0, x1 in _groups(native.chunks[1], (y1 - y0) * 3, budget):
            block = np.asarray(native[y0:y1, x0:x1].compute(scheduler="threads"))
            col_starts = _bin_starts(col_bin[x0:x1])
            c0 = int(col_bin[x0])
            # a few rows at a time: reduceat casts its input to float32 (4 bytes per sample)
            step = max(1, budget // 8 // max(1, (x1 - x0) * 3 * 4))
            for a in range(0, y1 - y0, step):
                b = min(y1 - y0, a + step)
                cols = np.add.reduceat(block[a:b], col_starts, axis=1, dtype=np.float32)
                sums = np.add.reduceat(cols, _bin_starts(row_bin[y0 + a : y0 + b]), axis=0)
                r0 = int(row_bin[y0 + a])
                acc[r0 : r0 + sums.shape[0], c0 : c0 + sums.shape[1]] += sums
            del block
    counts = np.bincount(row_bin, minlength=th)[:, None] * np.bincount(col_bin, minlength=tw)[None, :]
    acc /= counts[:, :, None].astype(np.float32)
    return (acc + 0.5).astype(np.uint8)


def _native_chunks(shape: tuple[int, ...], axes: str, chunk: int) -> tuple[int, ...]:
    return tuple(chunk if a in "YX" else s for a, s in zip(axes, shape, strict=True))


def _apply_lut(index: da.Array, lut: np.ndarray) -> da.Array:
    return index.map_blocks(lambda b: lut[b], dtype=np.uint8, new_axis=2, chunks=(*index.chunks, (3,)))


def _to_uint8(path: Path, arr: da.Array, keyframe: Any, layout: str) -> da.Array:
    dtype = np.dtype(arr.dtype)
    if dtype == np.uint8:
        return arr
    if dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if dtype == np.uint16:
        bits = int(keyframe.bitspersample) if 8 < int(keyframe.bitspersample) <= 16 else 16
        factor = np.float32(255.0 / (2**bits - 1))
        return arr.map_blocks(
            lambda b: np.clip(b.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8), dtype=np.uint8
        )
    raise UnsupportedFormatError(f"{path}: unsupported pixel type ({layout}); expected uint8 or uint16")


_OME_UNITS = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6,
    "in": 25400.0, "inch": 25400.0,
}  # fmt: skip


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """Microns per level-0 pixel from OME-XML, Aperio description or TIFF resolution tags."""
    page = tif.pages.first
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    description = page.description or ""
    if description.startswith("Aperio"):
        match = re.search(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", description)
        if match and float(match.group(1)) > 0:
            return float(match.group(1))
    return _resolution_mpp(page)


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for elem in root.iter():
        if elem.tag.rsplit("}", 1)[-1] == "Pixels":
            value = elem.get("PhysicalSizeX")
            if value is None:
                return None
            factor = _OME_UNITS.get(elem.get("PhysicalSizeXUnit", "µm").strip())
            try:
                mpp = float(value) * factor if factor is not None else None
            except ValueError:
                return None
            return mpp if mpp is not None and math.isfinite(mpp) and mpp > 0 else None
    return None


def _resolution_mpp(page: Any) -> float | None:
    xres_tag = page.tags.get("XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    if xres_tag is None:
        return None
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    try:
        num, den = xres_tag.value
        xres = float(num) / float(den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(xres) or xres <= 0:
        return None
    if unit == 2:  # inch; ignore the placeholder 72/96 dpi that many writers put in
        if round(xres, 3) in (72.0, 96.0):
            return None
        return 25400.0 / xres
    if unit == 3:  # centimeter
        return 1e4 / xres
    if unit == 4:  # millimeter (tifffile extension)
        return 1e3 / xres
    if unit == 5:  # micrometer (tifffile extension)
        return 1.0 / xres
    return None  # NONE: no absolute unit


# ---- JPEG / PNG ------------------------------------------------------------------------------


@contextlib.contextmanager
def _pil_unlimited() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit while opening a (large, trusted) slide."""
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _pil_open(path: Path) -> Image.Image:
    with _pil_unlimited():
        return Image.open(path)


def _pil_to_rgb(path: Path, im: Image.Image) -> np.ndarray:
    """Decode ``im`` to ``(h, w, 3)`` uint8 (alpha dropped, 16-bit scaled, grey repeated)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        a = np.clip(a.astype(np.float32) * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if im.mode in ("F",):
        raise UnsupportedFormatError(f"{path}: unsupported image mode {im.mode!r} (floating point)")
    if im.mode != "RGB":
        im = im.convert("RGB")  # RGBA/LA: drops alpha; L/P/1/CMYK/YCbCr: converted
    return np.asarray(im)


class _LazyPilLevel:
    """Array-like ``(h, w, 3)`` uint8 that decodes an image file on first access.

    ``reduce`` > 1 decodes a JPEG with libjpeg's DCT scaling (1/2, 1/4 or 1/8) via
    ``Image.draft``, without decoding the full-resolution image. The decode happens once,
    under a lock, and is cached.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, path: Path, shape: tuple[int, int], reduce: int = 1) -> None:
        self.path = path
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self.reduce = int(reduce)
        self._lock = threading.Lock()
        self._array: np.ndarray | None = None

    @property
    def loaded(self) -> bool:
        """Whether the file has been decoded (and is cached)."""
        return self._array is not None

    def _set(self, array: np.ndarray) -> None:
        with self._lock:
            self._array = array

    def load(self) -> np.ndarray:
        """Decode the file (once) and return the cached array."""
        if self._array is None:
            with self._lock:
                if self._array is None:
                    self._array = self._decode()
        return self._array

    def _decode(self) -> np.ndarray:
        try:
            with _pil_open(self.path) as im:
                if self.reduce > 1:
                    im.draft("RGB", (im.size[0] // self.reduce, im.size[1] // self.reduce))
                im.load()
                array = _pil_to_rgb(self.path, im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptFileError(f"{self.path}: cannot decode image ({exc})") from exc
        if array.shape != self.shape:
            raise CorruptFileError(f"{self.path}: decoded shape {array.shape} != expected {self.shape}")
        return array

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.load()[key]

    def __dask_tokenize__(self) -> tuple:
        return ("rapacl-pil-level", str(self.path), self.shape, self.reduce, id(self))


def _warn_grey(path: Path) -> None:
    warnings.warn(
        f"{path} is a greyscale image: it is read as RGB with the grey value in all three channels. "
        "Stain-based steps (nucleus segmentation, models trained on H&E colour) expect an RGB H&E "
        "scan and may be unreliable on it",
        UserWarning,
        stacklevel=4,
    )


def _open_pil(path: Path, chunk: int, max_pixels: int) -> tuple[list[da.Array], None, list[Any]]:
    """JPEG or PNG (whichever the file holds, whatever its extension says)."""
    try:
        with _pil_open(path) as im:
            fmt = im.format
            width, height = im.size
            mode = im.mode
            if fmt == "PNG":
                im.verify()  # checks every chunk's CRC without decompressing
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable JPEG or PNG file ({exc})") from exc
    if fmt not in ("JPEG", "MPO", "PNG"):
        raise CorruptFileError(f"{path}: the extension says JPEG/PNG but the file holds {fmt}")
    if width * height > max_pixels:
        raise RapaclInputError(
            f"{path}: a {width} x {height} px {fmt} ({width * height / 1e6:,.0f} million pixels) would be "
            f"decoded whole, about {width * height * 6 / 2**30:.1f} GB (JPEG and PNG have no random "
            f"access); the limit is {max_pixels / 1e6:,.0f} million pixels. Convert it to a tiled "
            "pyramidal TIFF (e.g. `vips tiffsave in.jpg out.tif --tile --pyramid --compression jpeg`), or, "
            f"if this machine has the memory, raise the limit with --max-pixels or {MAX_PIXELS_ENV}"
        )
    if mode == "F":
        raise UnsupportedFormatError(f"{path}: unsupported image mode {mode!r} (floating point)")
    if mode in ("L", "LA", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        _warn_grey(path)
    jpeg = fmt != "PNG"

    if jpeg:
        problem = _jpeg_data_problem(path, width, height)
        if problem is not None:
            raise CorruptFileError(
                f"{path}: {problem}. Decoding it would show grey or black where image data is missing; "
                "copy or export the file again from the scanner or the original source"
            )
    token = dask.base.tokenize(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns, chunk)
    level0 = _LazyPilLevel(path, (height, width))
    sources: list[_LazyPilLevel] = [level0]
    if jpeg:
        # reduced levels by DCT scaling; the 1/8 decode doubles as an integrity check
        probe = _LazyPilLevel(path, _draft_shape(path, 8), reduce=8)
        try:
            probe.load()
        except CorruptFileError as exc:
            raise CorruptFileError(f"{path}: truncated or damaged JPEG ({exc.__cause__ or exc})") from exc
        for reduce in (2, 4, 8):
            if max(sources[-1].shape[:2]) < _MIN_LEVEL_SIZE or min(sources[-1].shape[:2]) < 2:
                break
            shape = _draft_shape(path, reduce)
            if shape[1] >= sources[-1].shape[1]:
                break  # no DCT scaling available
            reuse = reduce == 8 and shape == probe.shape[:2]
            sources.append(probe if reuse else _LazyPilLevel(path, shape, reduce))
    levels = [
        da.from_array(
            src,
            chunks=(chunk, chunk, 3),
            name=f"pil-{src.reduce}-{token}",
            meta=np.empty((0, 0, 0), np.uint8),  # no probing read (it would decode the file)
        )
        for src in sources
    ]
    levels += _coarsen_levels(levels[-1], chunk)
    return levels, None, sources


#: JPEG start-of-frame markers (all but DHT C4, JPG C8 and DAC CC); baseline/extended Huffman are C0/C1.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: A run of this many 0x00 bytes inside JPEG image data is filler, not compressed pixels (a run of zero
#: bits that long would take hundreds of identical, all-minus-one 8 x 8 blocks).
_JPEG_FILLER_RUN = 64 * 1024
#: Baseline JPEG needs at least 2 bits per 8 x 8 block and component: less than a byte per 1024 px is a
#: header that claims pixels the file does not hold.
_JPEG_MIN_PX_PER_BYTE = 1024


def _jpeg_data_problem(path: Path, width: int, height: int) -> str | None:
    """What is wrong with a JPEG's image data without decoding it, or None: truncated (no end-of-image
    marker), padded with filler bytes (a long run of 0x00, at the end or inside), or far too few bytes
    for the size its header claims (baseline JPEG)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return "not a JPEG stream (no start-of-image marker)"
        pos, sof = 2, None
        while True:  # the header segments, up to the first scan
            fh.seek(pos)
            head = fh.read(4)
            if len(head) < 2 or head[0] != 0xFF:
                return f"truncated or damaged JPEG header (at byte {pos} of {size})"
            marker = head[1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            if marker == 0xD9 or len(head) < 4:
                return "truncated JPEG: the file ends before its image data"
            length = int.from_bytes(head[2:4], "big")
            if marker in _SOF_MARKERS and sof is None:
                sof = marker
            if marker == 0xDA:
                scan_start = pos + 2 + length
                break
            pos += 2 + length
        if scan_start >= size:
            return "truncated JPEG: the file ends before its image data"
        # filler runs of 0x00 (read in blocks; a run may span two blocks)
        fh.seek(scan_start)
        run, longest = 0, 0
        while block := fh.read(16 * 2**20):
            data = np.frombuffer(block, dtype=np.uint8)
            nonzero = np.flatnonzero(data)
            if nonzero.size == 0:
                run += data.size
                continue
            gaps = np.diff(nonzero) - 1  # runs ended by a non-zero byte (a trailing run is not filler inside)
            longest = max(longest, run + int(nonzero[0]), int(gaps.max()) if gaps.size else 0)
            run = data.size - 1 - int(nonzero[-1])
        trailing = run
        # the end: after any trailing filler, an end-of-image marker (or one shortly before a trailer)
        end = size - trailing
        fh.seek(max(scan_start, end - 2**20))
        tail = fh.read(end - max(scan_start, end - 2**20))
    data_bytes = size - scan_start - trailing
    if b"\xff\xd9" not in tail:  # 0xFF 0xD9 never occurs inside compressed data: only as the end marker
        if trailing >= 16:
            return (
                f"filler-padded JPEG: the image data stops and the last {trailing:,} bytes are zeros "
                "(no end-of-image marker)"
            )
        return "truncated JPEG: the image data has no end-of-image marker (the file was cut short)"
    if longest >= _JPEG_FILLER_RUN:
        return f"damaged JPEG: its image data holds a run of {longest:,} zero bytes (filler, not pixels)"
    if sof in (0xC0, 0xC1) and data_bytes * _JPEG_MIN_PX_PER_BYTE < width * height:
        return (
            f"the header claims {width} x {height} px but the file holds only {data_bytes:,} bytes of image "
            "data, far too few for that size (a forged or damaged header)"
        )
    return None


def _draft_shape(path: Path, reduce: int) -> tuple[int, int]:
    with _pil_open(path) as im:
        im.draft("RGB", (max(1, im.size[0] // reduce), max(1, im.size[1] // reduce)))
        return im.size[1], im.size[0]


# --------------------------------------------------------------------------------------------
# write_ome_tiff
# --------------------------------------------------------------------------------------------


def write_ome_tiff(
    path: str | os.PathLike,
    image: np.ndarray | da.Array,
    mpp: float | None = None,
    n_levels: int | None = None,
    tile: int = 512,
    compression: str | None = "zlib",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a tiled, pyramidal OME-TIFF (reduced levels in SubIFDs, each /2).

    The image is written tile by tile: a dask array is computed one band of rows at a time and
    each next level is accumulated in a temporary file beside ``path``, so memory stays bounded
    and level 0 is computed once. The file is written to a temporary name, then renamed.

    Parameters
    ----------
    path
        Output file (conventionally ``*.ome.tif``).
    image
        ``(y, x, 3)``, ``(y, x, 4)`` or ``(y, x)`` uint8 or uint16, numpy or dask.
    mpp
        Microns per pixel, written as OME ``PhysicalSizeX/Y`` (and TIFF resolution in cm).
    n_levels
        Total number of levels including level 0; by default levels are added until the
        longest side is at most ``tile``.
    tile
        Tile side in pixels (a multiple of 16).
    compression
        tifffile compression name (``"zlib"``, ``"jpeg"``, ``"zstd"``, ...) or ``None``.
    progress
        Called as ``progress(levels_done, n_levels)`` after each level is written.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    mpp_value = None if mpp is None else _check_mpp(mpp)
    tile = int(tile)
    if tile < 16 or tile % 16:
        raise RapaclInputError(f"tile={tile} must be a positive multiple of 16")
    if n_levels is not None and int(n_levels) < 1:
        raise RapaclInputError(f"n_levels={n_levels} must be >= 1")
    if not isinstance(image, (np.ndarray, da.Array)):
        image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise RapaclInputError(f"image must be (y, x), (y, x, 3) or (y, x, 4), got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise RapaclInputError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise RapaclInputError(f"image is empty: shape {image.shape}")
    if compression is not None and str(compression).lower() == "none":
        compression = None
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {path.parent}")

    shapes = [tuple(int(s) for s in image.shape[:2])]
    max_levels = math.inf if n_levels is None else int(n_levels)
    while len(shapes) < max_levels and max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    samples = () if image.ndim == 2 else (int(image.shape[2]),)
    dtype = np.dtype(image.dtype)
    metadata: dict[str, Any] = {"axes": "YX" if not samples else "YXS"}
    if mpp_value is not None:
        metadata.update(
            PhysicalSizeX=mpp_value, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp_value, PhysicalSizeYUnit="µm"
        )
    options: dict[str, Any] = {
        "dtype": dtype,
        "tile": (tile, tile),
        "photometric": "rgb" if samples else "minisblack",
        "compression": compression,
        "maxworkers": max(1, os.cpu_count() or 1),
        # tifffile buffers up to ``buffersize`` bytes of tiles before compressing them in threads
        "buffersize": 32 * 2**20,
    }
    if samples and samples[0] == 4:
        options["extrasamples"] = ("unassalpha",)

    def write(tmp: Path) -> None:
        buffers: list[Path] = []
        try:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as writer:
                source: Any = image
                for k, (h, w) in enumerate(shapes):
                    nxt = None
                    if k + 1 < len(shapes):
                        nxt = tmp.with_name(f"{tmp.name}.level{k + 1}-{uuid.uuid4().hex[:8]}.raw")
                        buffers.append(nxt)
                    tiles = _iter_tiles(source, (h, w), tile, nxt)
                    kwargs = dict(options, shape=(h, w, *samples))
                    if mpp_value is not None:
                        ds = 2**k
                        kwargs.update(resolution=(1e4 / (mpp_value * ds),) * 2, resolutionunit="CENTIMETER")
                    try:
                        if k == 0:
                            writer.write(tiles, subifds=len(shapes) - 1, metadata=metadata, **kwargs)
                        else:
                            writer.write(tiles, subfiletype=1, metadata=None, **kwargs)
                    finally:
                        tiles.close()  # closes the next level's buffer file
                    if progress is not None:
                        progress(k + 1, len(shapes))
                    if nxt is not None:
                        source = _RawBand(nxt, (h // 2, w // 2, *samples), dtype)
        finally:
            for buf in buffers:
                buf.unlink(missing_ok=True)

    # a temporary file beside ``path``, renamed in at the end, with the permissions of an ordinary write
    write_atomic(path, write, suffix=".tmp")
    return path


class _RawBand:
    """Row bands of a raw C-order image stored in a temporary file."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.row_items = int(np.prod(shape[1:]))

    def read(self, y0: int, y1: int) -> np.ndarray:
        count = (y1 - y0) * self.row_items
        offset = y0 * self.row_items * self.dtype.itemsize
        data = np.fromfile(self.path, dtype=self.dtype, count=count, offset=offset)
        return data.reshape((y1 - y0, *self.shape[1:]))


def _row_slabs(source: Any, height: int, max_rows: int) -> Iterator[np.ndarray]:
    """Consecutive row slabs of ``source`` covering rows ``0..height``, each computed once.

    A dask array is computed one chunk row at a time (split only if a chunk row would exceed
    ``max_rows``), so no dask chunk is computed twice.
    """
    if isinstance(source, da.Array):
        y = 0
        for size in source.chunks[0]:
            for a in range(y, y + size, max_rows):
                yield np.asarray(source[a : min(y + size, a + max_rows)].compute(scheduler="threads"))
            y += size
    elif isinstance(source, _RawBand):
        for a in range(0, height, max_rows):
            yield source.read(a, min(height, a + max_rows))
    else:
        for a in range(0, height, max_rows):
            yield np.asarray(source[a : a + max_rows])


def _bands(slabs: Iterator[np.ndarray], band_h: int) -> Iterator[np.ndarray]:
    """Re-block row slabs into bands of exactly ``band_h`` rows (the last may be shorter)."""
    pending: list[np.ndarray] = []
    rows = 0
    for slab in slabs:
        pending.append(slab)
        rows += slab.shape[0]
        while rows >= band_h:
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)
            yield joined[:band_h]
            rest = joined[band_h:]
            pending, rows = ([rest] if rest.shape[0] else []), rest.shape[0]
    if rows:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)


def _half(band: np.ndarray) -> np.ndarray:
    """2 x 2 mean with rounding (odd last row/column dropped)."""
    h, w = band.shape[0] // 2 * 2, band.shape[1] // 2 * 2
    b = np.ascontiguousarray(band[:h, :w])
    if b.dtype == np.uint8 and (b.ndim == 2 or b.shape[2] == 3):
        return np.asarray(Image.fromarray(b).reduce(2))  # Pillow's C box filter, rounds like below
    acc = np.uint32 if b.dtype == np.uint16 else np.uint16
    rows = b[0::2].astype(acc)
    rows += b[1::2]
    rows = rows.reshape(h // 2, w // 2, 2, *b.shape[2:])
    total = rows[:, :, 0] + rows[:, :, 1]
    total += 2
    total >>= 2
    return total.astype(b.dtype)


def _iter_tiles(
    source: Any, shape: tuple[int, int], tile: int, next_level: Path | None
) -> Iterator[np.ndarray]:
    """Yield the tiles of ``source`` row-major; append its 2 x 2 mean to ``next_level``."""
    h, w = shape
    row_bytes = w * int(np.prod(source.shape[2:])) * np.dtype(source.dtype).itemsize
    max_rows = max(tile, _BAND_BYTES // max(1, row_bytes) // tile * tile)  # a multiple of tile
    sink = open(next_level, "wb") if next_level is not None else None  # noqa: SIM115
    try:
        for band in _bands(_row_slabs(source, h, max_rows), tile):
            if sink is not None:
                _half(band).tofile(sink)
                sink.flush()
            for tx in range(0, w, tile):
                # a copy, so that buffered tiles do not keep the whole slab alive
                yield band[:, tx : tx + tile].copy()
            del band
    finally:
        if sink is not None:
            sink.close()
