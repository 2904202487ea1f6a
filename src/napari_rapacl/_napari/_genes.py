"""The *Gene colours* widget and its colour bar."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    create_widget,
)

from ._common import (
    COLORMAPS,
    apply_gene_colors,
    colored_by,
    dense_layers,
    gene_columns,
    keep_units_consistent,
)
from .layers import (
    META_KEY,
    robust_limits,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


def _colorbar_widget():
    """A small Qt colour bar: the colormap as a gradient between the min and max labels."""
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QImage, QPixmap
    from qtpy.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout, QWidget

    class ColorBar(QWidget):
        def __init__(self, parent=None):
            super().__init__(parent)
            self.title = QLabel("")
            self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self.bar = QLabel()
            self.bar.setFixedHeight(16)
            self.lo, self.hi = QLabel(""), QLabel("")
            row = QHBoxLayout()
            row.setContentsMargins(0, 0, 0, 0)
            row.addWidget(self.lo)
            row.addWidget(self.bar, 1)
            row.addWidget(self.hi)
            col = QVBoxLayout(self)
            col.setContentsMargins(4, 2, 4, 2)
            col.addWidget(self.title)
            col.addLayout(row)
            self.rgb = np.zeros((16, 256, 3), dtype=np.uint8)
            self.setObjectName("rapacl_colorbar")

        def set(self, colormap: str, limits: tuple[float, float], title: str = "") -> None:
            from napari.utils.colormaps import ensure_colormap

            rgba = np.asarray(ensure_colormap(colormap).map(np.linspace(0.0, 1.0, 256)), dtype=float)
            row = np.clip(np.round(rgba[:, :3] * 255), 0, 255).astype(np.uint8)
            self.rgb = np.ascontiguousarray(np.repeat(row[None], 16, axis=0))
            h, w = self.rgb.shape[:2]
            image = QImage(self.rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
            self.bar.setPixmap(QPixmap.fromImage(image))
            self.bar.setScaledContents(True)
            self.lo.setText(f"{limits[0]:.3g}")
            self.hi.setText(f"{limits[1]:.3g}")
            self.title.setText(title)

    return ColorBar()


class GeneWidget(Container):
    """Pick a spots layer and a gene (type to search); spots and the gene's dense map are coloured by it,
    with a colormap and contrast limits (automatic 1-99th percentile, or typed in), and a colour bar.

    The gene list follows the layer: it is refreshed when another layer is picked and when the layer's
    features change (e.g. when a prediction lands in them).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        keep_units_consistent(viewer)
        self._layer = create_widget(annotation="napari.layers.Points", label="spots")
        self._search = LineEdit(label="search", value="")
        self._gene = ComboBox(label="gene", choices=self._gene_choices)
        self._cmap = ComboBox(label="colormap", choices=COLORMAPS, value="viridis")
        self._auto = CheckBox(text="auto contrast (1st-99th percentile)", value=True)
        self._lo = FloatSpinBox(label="min", value=0.0, min=-1e6, max=1e6, step=0.05)
        self._hi = FloatSpinBox(label="max", value=1.0, min=-1e6, max=1e6, step=0.05)
        self._napari_bar = CheckBox(text="napari colour bars on the canvas", value=False)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        super().__init__(
            widgets=[
                self._layer,
                self._search,
                self._gene,
                self._cmap,
                self._auto,
                self._lo,
                self._hi,
                self._napari_bar,
                self._status,
            ]
        )
        self.colorbar = _colorbar_widget()
        self.native.layout().addWidget(self.colorbar)
        self._watched = None
        self._busy = False
        self._limits = (0.0, 1.0)
        self._layer.changed.connect(self._watch_layer)
        self._search.changed.connect(self._on_search)
        self._gene.changed.connect(self._recolor)
        self._cmap.changed.connect(self._recolor)
        self._auto.changed.connect(self._recolor)
        self._lo.changed.connect(self._on_limits)
        self._hi.changed.connect(self._on_limits)
        self._napari_bar.changed.connect(self._recolor)
        self._watch_layer()

    @property
    def limits(self) -> tuple[float, float]:
        """The contrast limits in use (the spin boxes show them rounded)."""
        return self._limits

    def _gene_choices(self, _w=None) -> list[str]:
        names = gene_columns(self._layer.value)
        text = str(self._search.value or "").strip().lower()
        return [g for g in names if text in g.lower()] if text else names

    def reset_choices(self, *_):
        super().reset_choices()
        self._watch_layer()

    def _watch_layer(self, *_):
        layer = self._layer.value
        if layer is not self._watched:
            colour_events = ("face_color", "face_colormap", "face_contrast_limits")
            if self._watched is not None:
                self._watched.events.features.disconnect(self._on_features)
                for name in colour_events:
                    getattr(self._watched.events, name).disconnect(self._sync_from_layer)
            if layer is not None:
                layer.events.features.connect(self._on_features)
                for name in colour_events:
                    getattr(layer.events, name).connect(self._sync_from_layer)
            self._watched = layer
        self._on_features()

    def _on_features(self, *_):
        """New columns (a prediction, radiomics) refresh the list without recolouring the spots."""
        self._busy = True
        try:
            self._gene.reset_choices()
        finally:
            self._busy = False
        self._sync_from_layer()

    def _sync_from_layer(self, *_):
        """Show what the spots are coloured by (another widget, e.g. Predict, may have coloured them)."""
        layer = self._layer.value
        if self._busy or layer is None:
            return
        gene = colored_by(layer)
        if gene is None or gene not in self._gene.choices:
            return
        cmap = getattr(layer.face_colormap, "name", None)
        limits = tuple(float(v) for v in layer.face_contrast_limits)
        self._busy = True
        try:
            self._gene.value = gene
            if cmap in COLORMAPS:
                self._cmap.value = cmap
            self._lo.value, self._hi.value = limits
        finally:
            self._busy = False
        self._limits = limits
        self.colorbar.set(cmap or "viridis", limits, title=gene)

    def _on_search(self, *_):
        self._gene.reset_choices()
        n = len(self._gene.choices)
        self._status.value = f"{n} match{'es' if n != 1 else ''}" if self._search.value else ""

    def _on_limits(self, *_):
        if self._busy:
            return
        with self._auto.changed.blocked():
            self._auto.value = False  # typed limits override the automatic ones
        self._recolor()

    def _recolor(self, *_):
        layer, gene = self._layer.value, self._gene.value
        if self._busy or layer is None or not gene or gene not in layer.features.columns:
            return
        cmap = self._cmap.value
        if self._auto.value:
            limits = robust_limits(layer.features[gene].to_numpy(dtype=float))
        else:
            limits = (float(self._lo.value), float(self._hi.value))
        if not limits[1] > limits[0]:
            limits = (limits[0], limits[0] + 1e-6)
        self._busy = True
        try:
            self._lo.value, self._hi.value = limits
            self._limits = (float(limits[0]), float(limits[1]))
            apply_gene_colors(layer, gene, cmap, limits)
        finally:
            self._busy = False
        bars = bool(self._napari_bar.value)
        if hasattr(layer, "face_colorbar"):
            layer.face_colorbar.visible = bars
        maps = dense_layers(self._viewer, layer.name)
        for dense in maps:
            mine = dense.metadata[META_KEY].get("gene") == gene
            dense.visible = mine
            if mine:
                dense.colormap = cmap
                dense.contrast_limits = robust_limits(dense.data) if self._auto.value else limits
                if hasattr(dense, "colorbar"):
                    dense.colorbar.visible = bars
        if maps and not any(d.visible for d in maps):
            self._status.value = (
                f"no dense map of {gene} yet: Predict computes it for the coloured gene "
                "(the spots come from the tile cache)"
            )
        elif str(self._status.value).startswith("no dense map"):
            self._status.value = ""
        self.colorbar.set(cmap, limits, title=gene)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
