"""npe2 readers: slides as multiscale images, spot files as Points layers.

napari 0.9 gives a file to the reader the user's preference names (``settings.plugins.extension2reader``,
a filename pattern -> plugin) and otherwise, when several plugins match (napari's builtin reader
matches every image), asks which one. :func:`prefer_plugin_readers` makes this plugin's reader the
default for slide files the user has not assigned: the panel and the *Open* widget call it, so
after the plugin is used once, *File > Open* and drag-and-drop of a slide give the multiscale µm
pyramid. A user's own choice (made in napari's dialog or *Preferences > Plugins*) is never changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .layers import slide_layer_data, spots_layer_data

log = logging.getLogger(__name__)

PLUGIN_NAME = "napari-rapacl"
#: the slide files this plugin reads (the manifest's filename patterns say the same)
SLIDE_PATTERNS = (
    "*.svs",
    "*.ndpi",
    "*.tif",
    "*.tiff",
    "*.ome.tif",
    "*.ome.tiff",
    "*.jpg",
    "*.jpeg",
    "*.png",
)
SLIDE_SUFFIXES = tuple(p[1:] for p in SLIDE_PATTERNS)
#: what napari matches (case-sensitively on Linux): scanners often write ``.SVS`` / ``.JPG``
SLIDE_PATTERNS_ANY_CASE = SLIDE_PATTERNS + tuple(p.upper() for p in SLIDE_PATTERNS)

#: ``ask_pixel_size(question) -> float | None``: asked when a slide without a pixel size is opened
#: through napari's *File > Open*; None (the default) shows a number dialog in a running viewer (never
#: under pytest or with ``NAPARI_RAPACL_NO_DIALOGS=1``). Tests replace it.
ask_pixel_size: Callable[[str], float | None] | None = None


def prefer_plugin_readers(settings=None) -> list[str]:
    """Make this plugin napari's reader for the slide patterns the user has not assigned to a reader
    (``settings``: napari's settings, default ``napari.settings.get_settings()``). Returns the
    patterns it assigned (empty when every one was already assigned)."""
    if settings is None:
        from napari.settings import get_settings

        settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    added = [p for p in SLIDE_PATTERNS_ANY_CASE if p not in current]
    if added:
        settings.plugins.extension2reader = {**current, **dict.fromkeys(added, PLUGIN_NAME)}
        log.info("napari-rapacl now opens %s by default (Preferences > Plugins to change)", ", ".join(added))
    return added


def _one_path(path):
    if isinstance(path, list):
        return path[0] if len(path) == 1 else None
    return path


def get_slide_reader(path: str | list[str]):
    """Return a reader for a slide file, or None when the path is not one we read."""
    path = _one_path(path)
    if path is None or not str(path).lower().endswith(SLIDE_SUFFIXES):
        return None
    return read_slide


def _dialog_pixel_size(question: str) -> float | None:
    if os.environ.get("PYTEST_CURRENT_TEST") or os.environ.get("NAPARI_RAPACL_NO_DIALOGS"):
        return None
    try:
        from qtpy.QtWidgets import QApplication, QInputDialog
    except Exception:  # no Qt: nobody to ask
        return None
    app = QApplication.instance()
    if app is None or not any(w.isVisible() for w in app.topLevelWidgets()):
        return None
    value, ok = QInputDialog.getDouble(app.activeWindow(), "Pixel size", question, 0.5, 0.05, 50.0, 4)
    return float(value) if ok else None


def read_slide(path: str | list[str]):
    """A slide as a multiscale Image layer in µm; a slide without a pixel size (JPEG/PNG) asks for one
    (:data:`ask_pixel_size`) and, without an answer, opens in pixels with a warning saying how to
    give it."""
    from ..io.slide import open_slide
    from ..jobs._open import missing_pixel_size

    path = _one_path(path)
    slide = open_slide(path)
    question = missing_pixel_size(slide, field="µm / px")
    if question is not None:
        ask = ask_pixel_size or _dialog_pixel_size
        value = ask(question)
        if value:
            slide = slide.with_mpp(float(value), "caller")
        else:
            _warn(
                f"{slide.path.name} opened in pixels (no pixel size): open it in the RaPaCL panel's "
                "'Open slide and spots' with its spot file, or type its µm / px there"
            )
    return [slide_layer_data(slide)]


def _warn(text: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(text)
    except Exception:
        log.warning(text)


def _looks_like_spots(path: Path) -> bool:
    if path.is_dir():
        return (
            (path / "spatial").is_dir() or path.name == "spatial" or any(path.glob("tissue_positions*.csv"))
        )
    name = path.name.lower()
    if name.endswith((".h5ad", "_selection.tsv", ".tsv.gz")):
        return True
    if name.endswith(".csv"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = [c.strip().lower() for c in fh.readline().split(",")]
        return {"x", "y"} <= set(header) or name.startswith("tissue_positions")
    return False


def get_spots_reader(path: str | list[str]):
    """Return a reader for spot coordinates (Space Ranger folder, legacy ST, HEST .h5ad, CSV), or None."""
    path = _one_path(path)
    if path is None or not os.path.exists(path) or not _looks_like_spots(Path(path)):
        return None
    return read_spots_layer


def read_spots_layer(path: str | list[str]):
    from ..io.spots import read_spots

    path = _one_path(path)
    spots = read_spots(path)
    return [spots_layer_data(spots, name=f"{Path(path).stem} spots", slide_path=None)]
