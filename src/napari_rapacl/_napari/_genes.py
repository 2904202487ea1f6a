"""The *Gene colours* widget, its colour bar, and how coloured spots look on the canvas.

What a pathologist reads on the canvas (:func:`style_spots`): the spots layer is named after the
section, the shown gene and its unit (``C2 predicted: CD74, log1p(CP10k)``), the same title is written
on the canvas beside napari's colour bar, hovering a spot shows its id and the coloured gene's value
only, predicted spots are discs (fill opacity the user picks, thin outline in a colour outside the
colormap) and spots without a value yet are hollow grey rings. With counts on the spots (her2st,
Visium) the measured expression of the same gene is shown beside the prediction
(:func:`show_measured_beside`), with the section's Pearson r.
"""

from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
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
    EDGE_COLOURS,
    EXPRESSION_UNIT,
    META_KEY,
    NOT_PREDICTED_BORDER,
    NOT_PREDICTED_EDGE,
    SPOT_BORDER,
    SPOT_OPACITY,
    level0_shape,
    measured_expression,
    measured_genes,
    robust_limits,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

PREDICTED, RADIOMICS = "predicted genes", "spot radiomics"
BY_R, MODEL_ORDER, BY_NAME = "validation r (best first)", "model order", "name (A-Z)"
#: genes whose validation r is below this are flagged (and hidden on request)
R_THRESHOLD = 0.1
NO_SCORES = "no validation scores stored in this checkpoint (the model's genes are listed in its order)"


# --------------------------------------------------------------------------------------------
# Qt-free: what a spots layer holds, how it is drawn
# --------------------------------------------------------------------------------------------
def spots_info(layer) -> dict:
    return layer.metadata.get(META_KEY, {}) if layer is not None and isinstance(layer.metadata, dict) else {}


def predicted_genes(layer) -> list[str]:
    """The model's genes a spots layer holds (prediction order)."""
    if layer is None:
        return []
    return [g for g in spots_info(layer).get("genes") or [] if g in layer.features.columns]


def radiomics_features(layer) -> list[str]:
    """The other colourable columns (spot radiomics such as ``n_nuclei``): not genes."""
    genes = set(predicted_genes(layer))
    return [c for c in gene_columns(layer) if c not in genes]


def gene_reliability(layer) -> dict[str, float] | None:
    """``{gene: validation r}`` stored with the layer's prediction (from the checkpoint), or None."""
    rel = spots_info(layer).get("gene_reliability")
    return {str(g): float(r) for g, r in rel.items()} if rel else None


def most_reliable(genes: list[str], reliability: dict[str, float] | None) -> str | None:
    """The gene with the highest finite validation r (None without scores)."""
    if not reliability:
        return None
    scored = [(reliability[g], g) for g in genes if g in reliability and np.isfinite(reliability[g])]
    return max(scored)[1] if scored else None


def spots_base_name(layer) -> str:
    """The layer's name before any gene was added to it (kept in its metadata)."""
    info = spots_info(layer)
    return str(info.get("base_name") or layer.name)


def section_name(layer) -> str:
    """How the spots' section is called on the canvas: the library id (``C2``), else the layer's name."""
    info = spots_info(layer)
    lib = info.get("library_id")
    return str(lib) if lib else spots_base_name(layer)


def spots_title(layer, gene: str) -> str:
    """``C2 predicted: CD74, log1p(CP10k)`` (a gene) or ``C2 spot radiomics: n_nuclei``."""
    if gene in predicted_genes(layer):
        return f"{section_name(layer)} predicted: {gene}, {EXPRESSION_UNIT}"
    if spots_info(layer).get("kind") == "measured":
        return f"{section_name(layer)} measured: {gene}, {EXPRESSION_UNIT}"
    return f"{section_name(layer)} {RADIOMICS}: {gene}"


def spot_diameter_um(layer) -> float | None:
    """The median spot diameter in um (None without a pixel size)."""
    mpp = spots_info(layer).get("mpp")
    if not mpp or "radius_px" not in layer.features or len(layer.features) == 0:
        return None
    r = layer.features["radius_px"].to_numpy(dtype=float)
    r = r[np.isfinite(r)]
    return float(2.0 * np.median(r) * mpp) if r.size else None


def hover_lines(layer, index: int) -> list[str]:
    """What hovering spot ``index`` shows: its id and the value of the coloured column (not all of them)."""
    features = layer.features
    lines = []
    if "barcode" in features:
        lines.append(f"spot {features['barcode'].iloc[index]}")
    gene = colored_by(layer)
    if gene is not None and gene in features:
        value = float(features[gene].iloc[index])
        genes = set(predicted_genes(layer)) | set(spots_info(layer).get("measured_genes") or [])
        unit = f" {EXPRESSION_UNIT}" if gene in genes else ""
        kind = "measured" if spots_info(layer).get("kind") == "measured" else "predicted"
        if not np.isfinite(value):
            lines.append(f"{gene}: {'not predicted yet' if unit else 'not measured here'}")
        elif unit:
            lines.append(f"{gene} {kind} = {value:.3g}{unit}")
        else:
            lines.append(f"{gene} = {value:.3g}")
    return lines


def _spot_properties(self, position, *, view_direction=None, dims_displayed=None, world=False) -> list:
    value = self.get_value(
        position, view_direction=view_direction, dims_displayed=dims_displayed, world=world
    )
    if value is None or not 0 <= int(value) < len(self.data):
        return []
    return hover_lines(self, int(value))


def show_coloured_value_on_hover(layer) -> None:
    """napari's status line and tooltip for a Points layer list every feature column (thousands of
    genes); ours list the spot id and the coloured column's value (:func:`hover_lines`)."""
    layer._get_properties = types.MethodType(_spot_properties, layer)


def _rgba(colour) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return np.asarray(transform_color(colour)[0], dtype=np.float32)


def canvas_colour_bars() -> bool:
    """napari's colour bars on the canvas by default: yes, unless OpenGL renders on the CPU, where the
    first bar costs about a second of the UI thread (measured: a 4.2 s stall of the first prediction
    with bar and canvas title, 1.2 s without, under Xvfb/llvmpipe on the loaded 2-core machine); the
    dock's colour bar (title, unit, range) is always there and the Genes widget turns them on."""
    from ._common import software_rendering

    return not software_rendering()


def warm_canvas_title(viewer) -> None:
    """Draw the canvas title once, blank, so its first real use (after a prediction) does not stall the
    UI thread while the text overlay is first built (about 1.5 s under software OpenGL)."""
    from ._common import software_rendering

    if viewer is not None and software_rendering():
        overlay = viewer.canvas.overlays.text if hasattr(viewer, "canvas") else viewer.text_overlay
        if not overlay.visible:
            overlay.text = " "
            overlay.visible = True


def style_spots(
    layer, gene: str, colormap: str = "viridis", limits=None, *, viewer=None, colour_bar: bool | None = None
) -> tuple:
    """Colour ``layer``'s spots by ``gene`` and make them readable (see the module docstring):
    spots with a value are filled, outlined thinly in :data:`EDGE_COLOURS` (outside the colormap);
    spots without one are hollow grey rings; the layer's name says the gene and its unit; napari's
    colour bar is shown (``colour_bar``; default :func:`canvas_colour_bars`); with ``viewer`` the title
    is also written on the canvas. Returns the limits."""
    limits = apply_gene_colors(layer, gene, colormap, limits)
    done = np.isfinite(layer.features[gene].to_numpy(dtype=float))
    edge = np.where(done[:, None], _rgba(EDGE_COLOURS.get(colormap, "white")), _rgba(NOT_PREDICTED_EDGE))
    layer.border_width_is_relative = True
    layer.border_width = np.where(done, SPOT_BORDER, NOT_PREDICTED_BORDER)
    layer.border_color = edge
    info = spots_info(layer)
    if info and "base_name" not in info:
        layer.metadata = {**layer.metadata, META_KEY: {**info, "base_name": layer.name}}
    title = spots_title(layer, gene)
    layer.name = title
    diameter = spot_diameter_um(layer)
    if diameter is not None and not len(layer.selected_data):
        layer.current_size = float(2.0 * np.median(layer.features["radius_px"]))  # napari's "point size"
    if hasattr(layer, "face_colorbar"):  # bottom right: the title is top left, never under it
        layer.face_colorbar.position = "bottom_right"
        layer.face_colorbar.visible = canvas_colour_bars() if colour_bar is None else bool(colour_bar)
    show_coloured_value_on_hover(layer)
    if viewer is not None:
        canvas_title(viewer, title)
    return limits


def canvas_title(viewer, text: str) -> None:
    """Write ``text`` on the canvas (napari's text overlay, top left)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    overlay = overlays.text if overlays is not None else viewer.text_overlay  # napari < 0.9
    overlay.text = text
    overlay.visible = bool(text)
    width = float(viewer.canvas.size[1]) if canvas is not None else 1000.0
    overlay.font_size = 12 if width >= 800 else 10  # a laptop's narrow canvas
    overlay.position = "top_left"


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of the finite pairs (NaN when fewer than 3 or either is constant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def slide_of(viewer, points):
    """The slide Image layer a spots layer lies on (same path; else the only/first slide layer)."""
    path = spots_info(points).get("slide_path")
    slides = [
        lyr
        for lyr in viewer.layers
        if isinstance(lyr.metadata, dict) and lyr.metadata.get(META_KEY, {}).get("kind") == "slide"
    ]
    for lyr in slides:
        if path and lyr.metadata[META_KEY].get("path") == path:
            return lyr
    return slides[0] if slides else None


def spots_crop(points, slide) -> tuple[int, int, int, int]:
    """The slide's level-0 px box around the spots (two spot diameters of margin), its corners on
    multiples of the coarsest level's downsample so every pyramid level crops the same area."""
    mpp = float(slide.scale[-1])
    offset = (np.asarray(points.translate, float)[-2:] - np.asarray(slide.translate, float)[-2:]) / mpp
    yx = np.asarray(points.data, dtype=float)[:, -2:] + offset
    r = np.nanmax(points.features["radius_px"].to_numpy(dtype=float)) if len(yx) else 0.0
    margin = 5.0 * (r if np.isfinite(r) else 0.0)
    h, w = level0_shape(slide)
    levels = list(slide.data) if slide.multiscale else [slide.data]
    step = int(round(levels[0].shape[1] / levels[-1].shape[1]))
    lo = np.floor((yx.min(axis=0) - margin) / step) * step
    hi = np.ceil((yx.max(axis=0) + margin) / step) * step
    y0, x0 = (max(0, int(v)) for v in lo)
    y1, x1 = min(h, int(hi[0])), min(w, int(hi[1]))
    return x0, y0, x1, y1


def frame_beside(viewer, points) -> None:
    """Centre the camera on the predicted spots and their measured copy, both in view."""
    from ._common import viewer_camera

    shown = [
        points,
        *[lyr for lyr in _beside_layers(viewer, points) if spots_info(lyr).get("kind") == "measured"],
    ]
    world = np.concatenate(
        [
            np.asarray(lyr.data, float)[:, -2:] * np.asarray(lyr.scale)[-2:] + np.asarray(lyr.translate)[-2:]
            for lyr in shown
        ]
    )
    pad = 2.0 * float(np.nanmax(points.features["radius_px"])) * float(points.scale[-1])
    lo, hi = world.min(axis=0) - pad, world.max(axis=0) + pad
    cam = viewer_camera(viewer)
    cam.center = (*(tuple(cam.center)[:-2]), *((lo + hi) / 2.0))
    h, w = viewer.canvas.size
    cam.zoom = float(min(h / (hi[0] - lo[0]), w / (hi[1] - lo[1])))


def _beside_layers(viewer, points) -> list:
    base = spots_base_name(points)
    return [
        lyr
        for lyr in viewer.layers
        if isinstance(lyr.metadata, dict) and lyr.metadata.get(META_KEY, {}).get("beside") == base
    ]


def remove_measured_beside(viewer, points) -> None:
    for lyr in _beside_layers(viewer, points):
        viewer.layers.remove(lyr)


def show_measured_beside(viewer, points, gene: str, colormap: str = "viridis") -> tuple[float, int]:
    """The measured log1p(CP10k) of ``gene`` beside the predicted spots: a copy of the slide and a
    spots layer ``<section> measured: <gene>, log1p(CP10k)`` placed to the right of the slide (one
    camera shows both, side by side), coloured with the same colormap. Returns the section's
    Pearson r between measured and predicted over the predicted spots, and their number.

    Raises ValueError (a message for the user) when the spots carry no counts or not this gene."""
    info = spots_info(points)
    counts = info.get("counts")
    if counts is None:
        raise ValueError(
            f"{section_name(points)} has no measured counts (open a her2st section or a Visium folder "
            "with its counts to compare)"
        )
    if gene not in measured_genes(counts):
        raise ValueError(f"{gene} is not in the measured counts of {section_name(points)}: pick another gene")
    measured = measured_expression(counts, [gene])[:, 0]
    predicted = points.features[gene].to_numpy(dtype=float)
    done = np.isfinite(predicted)
    r, n = pearson_r(predicted[done], measured[done]), int(done.sum())
    slide = slide_of(viewer, points)
    if slide is None:
        raise ValueError("no slide layer to place the measured spots beside: open the slide first")
    mpp = float(slide.scale[-1])
    levels = list(slide.data) if slide.multiscale else [slide.data]
    x0, y0, x1, y1 = spots_crop(points, slide)
    gap = 0.02 * (x1 - x0)
    dx = (x1 - x0 + gap) * mpp  # the copy starts right of the spots' crop, in um
    base = spots_base_name(points)
    layers = {lyr.metadata[META_KEY].get("kind"): lyr for lyr in _beside_layers(viewer, points)}
    tr_slide = np.asarray(slide.translate, dtype=float)[-2:] + np.r_[y0 * mpp, x0 * mpp + dx]
    tr_points = np.asarray(points.translate, dtype=float) + np.r_[0.0, dx]
    if "slide_view" not in layers:
        width0 = levels[0].shape[1]
        crops = []
        for lvl in levels:
            ds = width0 / lvl.shape[1]
            crops.append(lvl[int(y0 / ds) : int(np.ceil(y1 / ds)), int(x0 / ds) : int(np.ceil(x1 / ds))])
        layers["slide_view"] = viewer.add_image(
            crops if len(crops) > 1 else crops[0],
            name=f"{slide.name} (measured side)",
            rgb=True,
            multiscale=len(crops) > 1,
            contrast_limits=(0, 255),
            scale=slide.scale,
            translate=tr_slide,
            units=slide.units,
            metadata={META_KEY: {"kind": "slide_view", "beside": base, "crop_px": [x0, y0, x1, y1]}},
        )
    import pandas as pd

    features = pd.DataFrame(
        {
            "barcode": (
                points.features["barcode"].to_numpy() if "barcode" in points.features else np.arange(n)
            ),
            "radius_px": points.features["radius_px"].to_numpy(dtype=float),
            gene: measured.astype(np.float32),
        }
    )
    meta = {
        META_KEY: {
            "kind": "measured",
            "beside": base,
            "library_id": section_name(points),
            "base_name": f"{base} (measured)",
            "mpp": info.get("mpp"),
            "genes": [],
            "measured_genes": [gene],
            "r": r,
        }
    }
    lyr = layers.get("measured")
    if lyr is None:
        lyr = viewer.add_points(
            np.asarray(points.data),
            features=features,
            size=points.size,
            scale=points.scale,
            translate=tr_points,
            units=points.units,
            opacity=points.opacity,
            name=f"{section_name(points)} measured",
            metadata=meta,
        )
    else:
        lyr.features = features
        lyr.metadata = meta
    style_spots(lyr, gene, colormap)
    return r, n


# --------------------------------------------------------------------------------------------
# the dock's colour bar
# --------------------------------------------------------------------------------------------
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

    Predicted genes and spot radiomics are listed apart (``show``). Genes carry the validation r the
    checkpoint stores (sorted by it by default, flagged below a threshold, optionally hidden). With
    measured counts on the spots, the measured expression can be shown beside the prediction with the
    section's r. The gene list follows the layer: it is refreshed when another layer is picked and
    when the layer's features change (e.g. when a prediction lands in them).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        keep_units_consistent(viewer)
        self._layer = create_widget(annotation="napari.layers.Points", label="spots")
        self._show = ComboBox(label="show", choices=[PREDICTED, RADIOMICS], value=PREDICTED)
        self._search = LineEdit(label="search", value="")
        self._order = ComboBox(label="order", choices=[BY_R, MODEL_ORDER, BY_NAME], value=BY_R)
        self._threshold = FloatSpinBox(label="flag r below", value=R_THRESHOLD, min=-1.0, max=1.0, step=0.05)
        self._hide_low = CheckBox(text="hide flagged genes", value=False)
        self._gene = ComboBox(label="gene", choices=self._gene_choices)
        self._cmap = ComboBox(label="colormap", choices=COLORMAPS, value="viridis")
        self._auto = CheckBox(text="auto contrast (1st-99th percentile)", value=True)
        self._lo = FloatSpinBox(label="min", value=0.0, min=-1e6, max=1e6, step=0.05)
        self._hi = FloatSpinBox(label="max", value=1.0, min=-1e6, max=1e6, step=0.05)
        self._opacity = FloatSlider(
            label="spot fill opacity", value=SPOT_OPACITY, min=0.0, max=1.0, step=0.05
        )
        self._measured = CheckBox(text="measured beside predicted", value=False, enabled=False)
        self._napari_bar = CheckBox(text="napari colour bars on the canvas", value=canvas_colour_bars())
        self._legend = Label(value="")
        self._legend.native.setWordWrap(True)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        super().__init__(
            widgets=[
                self._layer,
                self._show,
                self._search,
                self._order,
                self._threshold,
                self._hide_low,
                self._gene,
                self._cmap,
                self._auto,
                self._lo,
                self._hi,
                self._opacity,
                self._measured,
                self._napari_bar,
                self._legend,
                self._status,
            ]
        )
        self.colorbar = _colorbar_widget()
        self.native.layout().addWidget(self.colorbar)
        self._watched = None
        self._busy = False
        self._limits = (0.0, 1.0)
        self.r_measured: tuple[float, int] | None = None  # (r, spots) of the gene shown beside
        self._layer.changed.connect(self._watch_layer)
        self._search.changed.connect(self._on_search)
        for w in (self._show, self._order, self._threshold, self._hide_low):
            w.changed.connect(self._on_list)
        self._gene.changed.connect(self._recolor)
        self._cmap.changed.connect(self._recolor)
        self._auto.changed.connect(self._recolor)
        self._lo.changed.connect(self._on_limits)
        self._hi.changed.connect(self._on_limits)
        self._opacity.changed.connect(self._on_opacity)
        self._measured.changed.connect(self._recolor)
        self._napari_bar.changed.connect(self._recolor)
        self._watch_layer()

    @property
    def limits(self) -> tuple[float, float]:
        """The contrast limits in use (the spin boxes show them rounded)."""
        return self._limits

    @property
    def status(self) -> str:
        return str(self._status.value)

    @property
    def legend(self) -> str:
        return str(self._legend.value)

    # -- the list -----------------------------------------------------------------------------
    def _names(self) -> list[str]:
        """The columns of the chosen kind, ordered and filtered (search excluded)."""
        layer = self._layer.value
        if self._show.value == RADIOMICS:
            names = radiomics_features(layer)
            return sorted(names, key=str.lower) if self._order.value == BY_NAME else names
        names = predicted_genes(layer)
        rel = gene_reliability(layer)
        if rel and self._hide_low.value:
            names = [g for g in names if np.isfinite(rel.get(g, np.nan)) and rel[g] >= self._threshold.value]
        if self._order.value == BY_NAME:
            names = sorted(names, key=str.lower)
        elif self._order.value == BY_R and rel:
            names = sorted(names, key=lambda g: -rel[g] if np.isfinite(rel.get(g, np.nan)) else np.inf)
        return names

    def _choice_label(self, name: str, rel: dict[str, float] | None) -> str:
        if not rel or name not in rel:
            return name
        r = rel[name]
        if not np.isfinite(r):
            return f"{name}   (no r: constant on validation)"
        flag = f"  ! below {self._threshold.value:.2f}" if r < self._threshold.value else ""
        return f"{name}   r {r:.2f}{flag}"

    def _gene_choices(self, _w=None) -> list:
        names = self._names()
        text = str(self._search.value or "").strip().lower()
        if text:
            names = [g for g in names if text in g.lower()]
        rel = gene_reliability(self._layer.value) if self._show.value == PREDICTED else None
        return [(self._choice_label(g, rel), g) for g in names]

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
                with self._opacity.changed.blocked():
                    self._opacity.value = float(layer.opacity)
            self._watched = layer
        self._on_features()

    def _on_features(self, *_):
        """New columns (a prediction, radiomics) refresh the list without recolouring the spots."""
        self._busy = True
        try:
            self._gene.reset_choices()
        finally:
            self._busy = False
        layer = self._layer.value
        self._order.enabled = self._threshold.enabled = self._hide_low.enabled = bool(gene_reliability(layer))
        self._measured.enabled = layer is not None and spots_info(layer).get("counts") is not None
        if layer is not None and predicted_genes(layer) and not gene_reliability(layer):
            self._status.value = NO_SCORES
        self._sync_from_layer()
        self._update_legend()

    def _on_list(self, *_):
        self._on_features()
        self._on_search()

    def _sync_from_layer(self, *_):
        """Show what the spots are coloured by (another widget, e.g. Predict, may have coloured them)."""
        layer = self._layer.value
        if self._busy or layer is None:
            return
        gene = colored_by(layer)
        if gene is None:
            return
        if gene not in self._gene.choices:
            other = RADIOMICS if gene in radiomics_features(layer) else PREDICTED
            if other == self._show.value or gene not in gene_columns(layer):
                return
            with self._show.changed.blocked():
                self._show.value = other
            self._busy = True
            try:
                self._gene.reset_choices()
            finally:
                self._busy = False
            if gene not in self._gene.choices:
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
        self.colorbar.set(cmap or "viridis", limits, title=self._bar_title(gene))
        self._update_legend()

    def _bar_title(self, gene: str) -> str:
        return f"{gene}, {EXPRESSION_UNIT}" if gene in predicted_genes(self._layer.value) else gene

    def _update_legend(self):
        layer = self._layer.value
        if layer is None:
            self._legend.value = ""
            return
        n = len(layer.data)
        gene = colored_by(layer)
        parts = []
        if gene is not None and gene in layer.features:
            done = int(np.isfinite(layer.features[gene].to_numpy(dtype=float)).sum())
            parts.append(f"filled discs: {done}/{n} spots with a value; grey rings: not predicted yet")
        else:
            parts.append(f"grey rings: {n} spots, none predicted yet")
        diameter = spot_diameter_um(layer)
        if diameter is not None:
            parts.append(f"spot diameter {diameter:.0f} µm")
        self._legend.value = "; ".join(parts)

    def _on_search(self, *_):
        self._gene.reset_choices()
        text = str(self._search.value or "").strip()
        n = len(self._gene.choices)
        if not text:
            old = str(self._status.value)
            if "match" in old or "not predicted by this model" in old:
                layer = self._layer.value
                scores = layer is None or not predicted_genes(layer) or gene_reliability(layer)
                self._status.value = "" if scores else NO_SCORES
            return
        if n:
            self._status.value = f"{n} match{'es' if n != 1 else ''}"
            return
        self._status.value = self._not_found(text)

    def _not_found(self, text: str) -> str:
        """What the search answers when nothing in the list matches ``text``."""
        layer = self._layer.value
        if layer is None:
            return "choose a spots layer first"
        if self._show.value == RADIOMICS:
            return f"no spot radiomics column matches {text!r} (run Cells with radiomics on these spots)"
        genes = predicted_genes(layer)
        if not genes:
            return f"no predictions in {spots_base_name(layer)} yet: run Predict, then search for {text}"
        rel = gene_reliability(layer)
        shown = most_reliable_first(genes, rel)[:12]
        more = f", ... ({len(genes)} genes in all; clear the search to see them)" if len(genes) > 12 else ""
        hidden = ""
        if rel and self._hide_low.value and any(text.lower() in g.lower() for g in genes):
            hidden = f" ({text} is hidden: its validation r is below {self._threshold.value:.2f})"
            return f"no shown gene matches {text}{hidden}; untick 'hide flagged genes' to see it"
        return f"{text.upper()} is not predicted by this model; these are: {', '.join(shown)}{more}"

    # -- colours -------------------------------------------------------------------------------
    def _on_limits(self, *_):
        if self._busy:
            return
        with self._auto.changed.blocked():
            self._auto.value = False  # typed limits override the automatic ones
        self._recolor()

    def _on_opacity(self, *_):
        layer = self._layer.value
        if layer is None:
            return
        layer.opacity = float(self._opacity.value)
        for lyr in _beside_layers(self._viewer, layer):
            if spots_info(lyr).get("kind") == "measured":
                lyr.opacity = float(self._opacity.value)

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
            bar = bool(self._napari_bar.value)
            style_spots(layer, gene, cmap, limits, viewer=self._viewer, colour_bar=bar)
        finally:
            self._busy = False
        bars = bool(self._napari_bar.value)
        if hasattr(layer, "face_colorbar"):
            layer.face_colorbar.visible = bars
        self._show_measured(layer, gene, cmap, bars)
        base = spots_base_name(layer)
        maps = dense_layers(self._viewer, base)
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
        self.colorbar.set(cmap, limits, title=self._bar_title(gene))
        self._update_legend()

    def _show_measured(self, layer, gene: str, cmap: str, bars: bool) -> None:
        """Measured beside predicted (when ticked and the gene is predicted), else nothing beside."""
        self.r_measured = None
        if not self._measured.value or gene not in predicted_genes(layer):
            remove_measured_beside(self._viewer, layer)
            if self._measured.value:
                self._status.value = f"{gene} is not a predicted gene: pick a gene to compare with its counts"
            return
        first = not _beside_layers(self._viewer, layer)
        try:
            r, n = show_measured_beside(self._viewer, layer, gene, cmap)
        except ValueError as exc:
            remove_measured_beside(self._viewer, layer)
            self._status.value = str(exc)
            return
        self.r_measured = (r, n)
        rtext = f"r = {r:.2f}" if np.isfinite(r) else "r undefined (constant values)"
        text = (
            f"{section_name(layer)}: {gene}, {EXPRESSION_UNIT} - left predicted, right measured; "
            f"{rtext} over {n} predicted spots"
        )
        beside = [b for b in _beside_layers(self._viewer, layer) if spots_info(b).get("kind") == "measured"]
        ranges = ["{:.2f}-{:.2f}".format(*lyr.face_contrast_limits) for lyr in (layer, *beside)]
        pred_range, meas_range = (ranges + ["", ""])[:2]
        canvas_title(
            self._viewer,
            f"{section_name(layer)}: {gene}, {EXPRESSION_UNIT}; {rtext} ({n} spots)\n"
            f"left: predicted {pred_range}\nright: measured {meas_range}",
        )
        self._status.value = text
        if first:
            frame_beside(self._viewer, layer)
        for lyr in _beside_layers(self._viewer, layer):
            if spots_info(lyr).get("kind") == "measured" and hasattr(lyr, "face_colorbar"):
                lyr.face_colorbar.visible = bars


def most_reliable_first(genes: list[str], reliability: dict[str, float] | None) -> list[str]:
    """``genes`` by validation r, best first (model order without scores)."""
    if not reliability:
        return list(genes)
    return sorted(genes, key=lambda g: -reliability[g] if np.isfinite(reliability.get(g, np.nan)) else np.inf)
