"""The *Open slide and spots* widget."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
)

from ._common import _JobWidget, beside_offset, keep_units_consistent
from .layers import (
    META_KEY,
    level0_shape,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


FILES, SAMPLE = "slide and spots files", "her2st sample"


class LoadWidget(_JobWidget):
    """Open a slide (multiscale Image layer in um) and its spots (Points layer on it: size = spot
    diameter, ``features`` = barcode and radius), or a her2st sample section.

    The spots may be a Space Ranger folder (tick *folder*), a legacy ST ``*_selection.tsv``, an
    ``.h5ad`` or a CSV ``x,y[,radius][,barcode]``, in level-0 px of the slide. A pixel size typed here
    overrides the slide's; without one in the file either, the spots' own (Visium scale factors, ST
    array pitch) places both layers. napari's own *File > Open* uses the same readers for one file.

    At open: spots that fall mostly on glass are warned about (naming the fraction) before any work;
    a slide without a pixel size (JPEG/PNG alone) asks for one (:attr:`ask_pixel_size`); layers are
    named by section (``C4``, ``her2st C4 spots``); a further slide opens to the right of those open.
    """

    run_text = "Open"
    #: ``ask_pixel_size(question) -> float | None``: asked when a slide opens without a pixel size;
    #: the default shows a number dialog. Replace it on an instance (tests answer programmatically).
    ask_pixel_size: Callable[[str], float | None] | None = None

    def __init__(self, viewer: napari.viewer.Viewer):
        from ..datasets import HER2ST_SECTIONS

        self._viewer = viewer
        keep_units_consistent(viewer)
        self._source = ComboBox(label="open", choices=[FILES, SAMPLE], value=FILES)
        slide_filter = "*.tif *.tiff *.ome.tif *.ome.tiff *.svs *.jpg *.jpeg *.png"
        self._slide = FileEdit(label="slide", mode="r", filter=slide_filter)
        self._spots = FileEdit(label="spots", mode="r", filter="*.h5ad *.csv *.tsv *.tsv.gz")
        self._folder = CheckBox(text="spots are a Space Ranger folder", value=False)
        # step 0.0001: four decimals (Visium full-res images are ~0.25-0.27 um/px)
        self._mpp = FloatSpinBox(label="µm / px (0: from file)", value=0.0, min=0.0, max=100.0, step=0.0001)
        self._mpp.tooltip = "microns per level-0 pixel; 0 takes it from the slide file or the spots"
        self._section = ComboBox(label="section", choices=list(HER2ST_SECTIONS), value="C2", visible=False)
        super().__init__(
            widgets=[
                self._source,
                self._slide,
                self._spots,
                self._folder,
                self._mpp,
                self._section,
                *self._init_job(),
            ]
        )
        self._source.changed.connect(self._on_source)
        self._folder.changed.connect(lambda v: setattr(self._spots, "mode", "d" if v else "r"))
        self.layers: list = []
        self.warnings: list[str] = []
        _prefer_plugin_readers()

    def _on_error(self, exc):
        self._job_open = False
        self._say(f"cannot open: {exc}")

    def _on_source(self, value):
        files = value == FILES
        for w in (self._slide, self._spots, self._folder, self._mpp):
            w.visible = files
        self._section.visible = not files

    def start(self, *_):
        """Open in a worker thread (a sample may need a download); returns the worker, or None."""
        from ..jobs import iter_open, iter_open_sample
        from ._env import checkpoint_path

        if self._refuse_if_busy():
            return None
        if self._source.value == SAMPLE:
            section = self._section.value
            return self._launch(iter_open_sample, section, desc=f"her2st {section}", on_done=self._on_done)
        slide = checkpoint_path(self._slide.value)
        if slide is None:
            self._say("choose a slide file (.svs, .tif, .ndpi, .jpg, .png) next to 'slide'")
            return None
        text = str(self._spots.value or "").strip()
        spots = Path(text) if text and text != "." else None  # an empty FileEdit gives "."
        if spots is not None and not self._folder.value and spots.resolve() == Path.cwd().resolve():
            spots = None  # a cleared FileEdit gives the working folder
        if spots is not None and spots.is_dir() and not self._folder.value:
            self._say(f"cannot open: {spots} is a folder; tick 'spots are a Space Ranger folder'")
            return None
        for what, path in (("slide", slide), ("spots", spots)):
            if path is not None and not path.exists():
                self._say(f"cannot open: {what} not found: {path}. Check the path, or choose the file again")
                return None
        mpp = float(self._mpp.value) or None
        return self._launch(
            iter_open, slide, spots, mpp=mpp, desc=f"open {slide.name}", on_done=self._on_done
        )

    def _pixel_size_from_user(self, question: str) -> float | None:
        if self.ask_pixel_size is not None:
            value = self.ask_pixel_size(question)
        else:
            from qtpy.QtWidgets import QInputDialog

            value, ok = QInputDialog.getDouble(self.native, "Pixel size", question, 0.5, 0.05, 50.0, 4)
            value = value if ok else None
        return float(value) if value else None

    def _on_done(self, opened):
        from dataclasses import replace

        from ..jobs._open import missing_pixel_size, pixel_size_text
        from .layers import opened_layer_data

        notes = []
        question = missing_pixel_size(opened.slide, field="µm / px")
        if question is not None:
            value = self._pixel_size_from_user(question)
            if value is not None:
                opened = replace(opened, slide=opened.slide.with_mpp(value, "caller"))
            else:
                notes.append(
                    f"{opened.slide.path.name if opened.slide.path else 'the slide'} is shown in pixels "
                    "(no pixel size): type its µm / px and press Open again before Cells or Predict"
                )
        tuples = opened_layer_data(opened)
        names = {kw.get("name") for _, kw, _ in tuples}
        for name in names:
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)  # opened again: replaced where it was
        offset = beside_offset(self._viewer)
        if offset is not None:  # a slide is already open: put this one beside it, not on top
            tuples = opened_layer_data(opened, translate=offset)
        self.layers = [getattr(self._viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in tuples]
        parts = []
        for layer in self.layers:
            info = layer.metadata.get(META_KEY, {})
            if info.get("kind") == "slide":
                h, w = level0_shape(layer)
                parts.append(f"{layer.name}: {w:,} x {h:,} px, {pixel_size_text(opened.slide)}")
            else:
                parts.append(f"{layer.name}: {len(layer.data)} spots")
        if offset is not None:
            parts.append(f"placed to the right of the slides already open (at x = {offset[1]:,.0f} µm)")
        self.warnings = list(opened.warnings)
        text = "; ".join(parts)
        if self.warnings or notes:
            text = "\n".join([*(f"⚠ {w}" for w in self.warnings), *(f"⚠ {n}" for n in notes), text])
            self._status.native.setStyleSheet("color: #ffb347;")
            for warning in self.warnings:
                _notify(warning)
        else:
            self._status.native.setStyleSheet("")
        self._say(text)
        if self.layers:
            self._viewer.reset_view()


def _prefer_plugin_readers() -> None:
    """Using the plugin makes it napari's reader for slides the user has not assigned elsewhere."""
    from ._reader import prefer_plugin_readers

    try:
        prefer_plugin_readers()
    except Exception:  # settings not writable: File > Open still offers the plugin in its dialog
        log.warning("could not make napari-rapacl the default slide reader", exc_info=True)


def _notify(text: str) -> None:
    """A napari warning notification (shown in the viewer's corner), if napari can show one."""
    try:
        from napari.utils.notifications import show_warning

        show_warning(text)
    except Exception:  # no notification manager: the status line already says it
        log.warning(text)


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------
