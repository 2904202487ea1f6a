"""The *Open slide and spots* widget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
)

from ._common import _JobWidget, keep_units_consistent
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
    """

    run_text = "Open"

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
        self._mpp = FloatSpinBox(label="um / px (0: from file)", value=0.0, min=0.0, max=100.0, step=0.0001)
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
            self._say("choose a slide file")
            return None
        text = str(self._spots.value or "").strip()
        spots = Path(text) if text and text != "." else None  # an empty FileEdit gives "."
        if spots is not None and spots.is_dir() and not self._folder.value:
            self._say(f"cannot open: {spots} is a folder; tick 'spots are a Space Ranger folder'")
            return None
        for what, path in (("slide", slide), ("spots", spots)):
            if path is not None and not path.exists():
                self._say(f"cannot open: {what} not found: {path}")
                return None
        mpp = float(self._mpp.value) or None
        return self._launch(
            iter_open, slide, spots, mpp=mpp, desc=f"open {slide.name}", on_done=self._on_done
        )

    def _on_done(self, opened):
        from .layers import opened_layer_data

        self.layers = []
        for data, kwargs, kind in opened_layer_data(opened):
            name = kwargs.get("name")
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
            self.layers.append(getattr(self._viewer, f"add_{kind}")(data, **kwargs))
        parts = []
        for layer in self.layers:
            info = layer.metadata.get(META_KEY, {})
            if info.get("kind") == "slide":
                shape = level0_shape(layer)
                mpp = info.get("mpp")
                size = f"{mpp:.4g} um/px ({info.get('mpp_source')})" if mpp else "pixel size unknown"
                parts.append(f"{layer.name}: {shape[1]} x {shape[0]} px, {size}")
            else:
                parts.append(f"{layer.name}: {len(layer.data)} spots")
        self._say("; ".join(parts))
        if self.layers:
            self._viewer.reset_view()


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------
