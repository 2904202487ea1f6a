"""The *Cells* widget: segment nuclei and measure radiomics in a region."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    create_widget,
)

from ..jobs._cells import BASE_COLUMNS
from ._common import ROI, VISIBLE, _JobWidget, _nullable, keep_units_consistent
from .layers import (
    META_KEY,
    box_um,
    labels_layer_data,
    merge_columns,
    slide_from_layer,
    spots_from_layer_data,
    spots_in_box,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

CLASSICAL = "classical"
CELLPOSE_FILE = "cellpose: a model file..."
CELLPOSE_PREFIX = "cellpose: "
#: nuclei drawn as outlines this thick (level-0 px), as QuPath draws them
NUCLEI_CONTOUR = 2
#: how nuclei are coloured: one bright colour (default: outlines that stand out on H&E), one colour
#: per nucleus (napari's label colours), else by a per-cell feature (FEATURE_COLORMAP, red to yellow)
ONE_COLOUR = "outlines in one colour"
LABEL_COLOURS = "one colour per nucleus"
OUTLINE_COLOUR = (0.2, 1.0, 0.3, 1.0)
FEATURE_COLORMAP = "autumn"
#: plausible median nucleus areas on H&E (um^2): outside, the message asks to check the outlines
PLAUSIBLE_AREA_UM2 = (12.0, 150.0)
#: fraction of a region that must be tissue for "no nuclei" to mean a failed segmentation
TISSUE_FRACTION = 0.05


NOT_BUILT = " (not built yet)"
_NAMES: list[str] | None = None


def cellpose_names(refresh: bool = False) -> list[str]:
    """The cellpose models usable now by name (the project's model when built, user models,
    pretrained names when online or cached): ``segmentation.cellpose_model_choices()``, asked once
    per process (it may probe the network for up to a second; napari re-lists choices on every layer
    change) unless ``refresh``; empty when not available."""
    global _NAMES
    if _NAMES is not None and not refresh:
        return list(_NAMES)
    try:
        from ..segmentation import cellpose_model_choices
    except ImportError:
        return []
    try:
        _NAMES = [str(n) for n in cellpose_model_choices()]
    except Exception:  # never let a model listing break the panel
        log.warning("cannot list cellpose models", exc_info=True)
        _NAMES = []
    return list(_NAMES)


def project_model() -> tuple[str | None, bool]:
    """The project's nucleus model name and whether it is built (``(None, False)`` when the
    segmentation package does not offer one)."""
    try:
        from ..segmentation import PROJECT_NUCLEI_MODEL, project_nuclei_model_built
    except ImportError:
        return None, False
    try:
        return str(PROJECT_NUCLEI_MODEL), bool(project_nuclei_model_built())
    except Exception:
        log.warning("cannot tell whether the nucleus model is built", exc_info=True)
        return str(PROJECT_NUCLEI_MODEL), False


def section_of(image) -> str:
    """How a slide layer's section is called in layer names: ``her2st C4`` -> ``C4``."""
    name = str(image.name)
    return name[len("her2st ") :] if name.startswith("her2st ") else name


def tissue_fraction(slide, box) -> float:
    """The fraction of ``box`` (level-0 px) that is tissue, read at a coarse level (<= ~512 px)."""
    from ..segmentation._stain import tissue_mask

    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    level = 0
    for i, ds in enumerate(slide.downsamples):
        if side / ds >= 256:
            level = i
    rgb = slide.read_region(int(x0), int(y0), int(x1), int(y1), level=level)
    return float(tissue_mask(rgb).mean()) if rgb.size else 0.0


def nuclei_summary(cells, box, mpp) -> str:
    """``"412 nuclei, median area 31 µm², in a 512 x 384 µm region at (...) µm"`` and, when the median
    area is implausible for H&E nuclei, what to check."""
    n = len(cells)
    area = cells["area_um2"].to_numpy(dtype=float) if "area_um2" in cells else np.zeros(0)
    area = area[np.isfinite(area)]
    text = f"{n} nuclei in {box_um(box, mpp)}"
    if area.size:
        med = float(np.median(area))
        text = f"{n} nuclei, median area {med:.0f} µm², in {box_um(box, mpp)}"
        lo, hi = PLAUSIBLE_AREA_UM2
        if not lo <= med <= hi:
            text += (
                f"; check the outlines: a median of {med:.0f} µm² is unusual for H&E nuclei "
                f"(about {lo:.0f}-{hi:.0f} µm²): set 'diameter (µm)' closer to the nuclei or try cellpose"
            )
    return text


def feature_colours(labels_features, column: str, colormap: str = FEATURE_COLORMAP) -> dict:
    """``{label: RGBA}`` colouring each nucleus by a cell-table ``column`` (1st-99th percentile),
    label 0 and unknown labels transparent."""
    from napari.utils.colormaps import ensure_colormap

    from .layers import robust_limits

    labels = labels_features["index"].to_numpy(dtype=np.int64)
    values = labels_features[column].to_numpy(dtype=float)
    lo, hi = robust_limits(values)
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    rgba = np.asarray(ensure_colormap(colormap).map(np.nan_to_num(t)), dtype=np.float32)
    rgba[~np.isfinite(values), 3] = 0.0
    colours: dict = {None: np.zeros(4, np.float32), 0: np.zeros(4, np.float32)}
    colours.update({int(lab): c for lab, c in zip(labels, rgba, strict=True)})
    return colours


class CellsWidget(_JobWidget):
    """Segment the nuclei of the visible region (or a Shapes ROI) and measure them.

    Adds a Labels layer ``<section> nuclei (ROI n)`` placed on the slide (scale/translate in um),
    drawn as outlines, whose ``features`` hold per-cell radiomics (the outlines can be coloured by
    one); the spots inside the region get spot-level radiomics (``n_nuclei``, RaPaCL's 72) in their
    ``features``. The status says how many nuclei and their median area in µm²; no nuclei adds no
    layer and says whether the region is glass or segmentation failed on tissue.
    """

    run_text = "Segment"
    #: keyword arguments of ``jobs.iter_build_nuclei_model`` for 'Build the nucleus model' (its
    #: defaults: the full training on TNBC patients 01-08)
    build_settings: dict = {}

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        keep_units_consistent(viewer)
        self._image = create_widget(annotation="napari.layers.Image", label="slide")
        self._scope = ComboBox(label="region", choices=[VISIBLE, ROI], value=VISIBLE)
        self._roi = _nullable("napari.layers.Shapes", "ROI")
        self._method = ComboBox(label="method", choices=self._method_choices, value=CLASSICAL)
        self._cp_model = FileEdit(label="cellpose model file", mode="r", visible=False)
        self._build = PushButton(text="Build the nucleus model", visible=False)
        self._diameter = FloatSpinBox(label="diameter (µm)", value=8.0, min=2.0, max=60.0, step=0.5)
        self._radiomics = CheckBox(text="radiomics (cells and spots)", value=True)
        self._spots = _nullable("napari.layers.Points", "spots")
        self._colour = ComboBox(label="colour nuclei by", choices=self._colour_choices, value=ONE_COLOUR)
        super().__init__(
            widgets=[
                self._image,
                self._scope,
                self._roi,
                self._method,
                self._cp_model,
                self._build,
                self._diameter,
                self._radiomics,
                self._spots,
                *self._init_job(),
                self._colour,
                (legend := Label(value="")),
            ]
        )
        self._colour_legend = legend
        self.labels_layer = None
        self.last_summary = ""
        self._method.changed.connect(self._on_method)
        self._build.changed.connect(self.build_model)
        self._colour.changed.connect(self._on_colour)
        self._on_method(self._method.value)

    # -- method -------------------------------------------------------------------------------
    def _method_choices(self, _w=None) -> list[str]:
        names = [CELLPOSE_PREFIX + n for n in cellpose_names()]
        project, built = project_model()
        if project is not None and not built:
            names.insert(0, CELLPOSE_PREFIX + project + NOT_BUILT)
        return [CLASSICAL, *names, CELLPOSE_FILE]

    def _on_method(self, value):
        self._cp_model.visible = value == CELLPOSE_FILE
        not_built = str(value).endswith(NOT_BUILT)
        self._build.visible = not_built
        if not_built:
            self._say(
                f"{value[len(CELLPOSE_PREFIX) : -len(NOT_BUILT)]}, the project's nucleus model, is not "
                "built yet: 'Build the nucleus model' trains it here on the TNBC annotations (it takes "
                "a while; progress shows here), or choose classical"
            )

    def build_model(self, *_):
        """Train and install the project's nucleus model (``jobs.iter_build_nuclei_model``)."""
        try:
            from ..jobs import iter_build_nuclei_model
        except ImportError:
            self._say("this version cannot build the nucleus model: run 'python -m training.cellpose_nuclei'")
            return None
        from ._env import avoid_llvm_clash

        avoid_llvm_clash()  # cellpose imports torch
        return self._launch(
            iter_build_nuclei_model,
            **self.build_settings,
            desc="build the nucleus model",
            on_done=self._on_built,
        )

    def _on_built(self, path):
        cellpose_names(refresh=True)
        self._method.reset_choices()
        name, built = project_model()
        if name is not None and CELLPOSE_PREFIX + name in self._method.choices:
            self._method.value = CELLPOSE_PREFIX + name
        self._build.visible = not built and str(self._method.value).endswith(NOT_BUILT)
        self._say(f"nucleus model built: {path}; choose it as the method and Segment")

    def _segmenter_args(self) -> tuple[str, str | None]:
        from ._env import checkpoint_path

        value = self._method.value
        if value == CLASSICAL:
            return "classical", None
        if value == CELLPOSE_FILE:
            path = checkpoint_path(self._cp_model.value)
            if path is None:
                raise ValueError("choose the cellpose model file, or another method")
            return "cellpose", str(path)
        if value.endswith(NOT_BUILT):
            raise ValueError(
                f"{value[len(CELLPOSE_PREFIX) : -len(NOT_BUILT)]} is not built yet: click 'Build the "
                "nucleus model' first, or choose classical"
            )
        return "cellpose", value[len(CELLPOSE_PREFIX) :]

    # -- run ----------------------------------------------------------------------------------
    def start(self, *_):
        """Start segmenting in a worker thread; returns the worker (tests wait on it), or None."""
        from ..jobs import iter_cells
        from ..radiomics import NucleusSegmenter
        from ._env import avoid_llvm_clash

        if self._refuse_if_busy():
            return None
        image, points = self._image.value, self._spots.value
        if image is None:
            self._say("choose a slide layer (open one with 'Open slide and spots')")
            return None
        try:
            box = self._region(self._scope.value, image, self._roi.value)
            slide = slide_from_layer(image)
            slide.require_mpp("nucleus segmentation")
            method, model = self._segmenter_args()
            segmenter = NucleusSegmenter(method, float(self._diameter.value), model)
        except Exception as exc:  # a message for the user, not a traceback
            self._say(f"cannot segment: {exc}")
            return None
        if method == "cellpose":
            avoid_llvm_clash()  # cellpose imports torch
        spots = index = None
        if points is not None and self._radiomics.value:
            spots = spots_from_layer_data(points.data, points.features, slide.mpp)
            index = spots_in_box(points.data, box)
        self._pending = (image, points, box, slide, self._scope.value)
        from ..jobs._estimate import estimate

        x0, y0, x1, y1 = box
        cost = estimate(
            "cells" if self._radiomics.value else "segment",
            area_px=float(x1 - x0) * float(y1 - y0),
            n_spots=0 if index is None else len(index),
            radiomics=bool(self._radiomics.value),
        )
        return self._launch(
            iter_cells,
            slide,
            box,
            segmenter=segmenter,
            features=bool(self._radiomics.value),
            spots=spots,
            spot_index=index,
            desc=f"nuclei in {box_um(box, slide.mpp)}",
            on_done=self._on_done,
            estimate=cost,
        )

    def _layer_name(self, image, scope: str) -> str:
        what = "ROI" if scope == ROI else "view"
        prefix = f"{section_of(image)} nuclei ({what} "
        taken = {lyr.name for lyr in self._viewer.layers}
        k = 1
        while f"{prefix}{k})" in taken:
            k += 1
        return f"{prefix}{k})"

    def _on_done(self, res):
        image, points, box, slide, scope = self._pending
        mpp = slide.mpp
        if res.n_cells == 0:
            self.labels_layer = None
            try:
                tissue = tissue_fraction(slide, res.box)
            except Exception:  # the message still helps without the tissue check
                log.warning("tissue check failed", exc_info=True)
                tissue = float("nan")
            where = box_um(res.box, mpp)
            if tissue < TISSUE_FRACTION:
                text = (
                    f"no nuclei: the region ({where}) is glass or background ({tissue:.0%} tissue); "
                    "no layer was added. Pan to the tissue or draw the ROI on it"
                )
            else:
                other = (
                    "try the classical method, another cellpose model"
                    if self._method.value != CLASSICAL
                    else "try a cellpose method"
                )
                text = (
                    f"no nuclei found on tissue ({tissue:.0%} of {where}): segmentation failed here; "
                    f"no layer was added. {other[0].upper()}{other[1:]}, or a 'diameter (µm)' closer to "
                    f"the nuclei (now {float(self._diameter.value):.1f} µm)"
                )
            self.last_summary = text
            self._say(text)
            return
        name = self._layer_name(image, scope)
        meta = {"slide": image.name, "provenance": res.provenance, **res.segmenter.to_dict()}
        h, w = res.labels.shape
        region = (res.origin[0], res.origin[1], res.origin[0] + w, res.origin[1] + h)  # level 0
        cells = res.cells.copy()
        cells.insert(0, "index", cells["label"].to_numpy())  # napari: feature row <-> label id
        data, kwargs, _ = labels_layer_data(res.labels, region, mpp, name=name, features=cells, metadata=meta)
        kwargs["opacity"] = 0.9
        # at the slide's translate (a second slide may sit beside the first)
        kwargs["translate"] = tuple(np.asarray(kwargs["translate"]) + np.asarray(image.translate)[-2:])
        layer = self._viewer.add_labels(data, **kwargs)
        layer.contour = NUCLEI_CONTOUR  # outlines, as QuPath draws nuclei (above the spots)
        summary = nuclei_summary(res.cells, res.box, mpp)
        parts = [summary]
        if res.cells.shape[1] > len(BASE_COLUMNS):
            parts.append(f"radiomics of {res.n_cells} cells")
        if points is not None and res.spot_table is not None:
            cols = [str(c) for c in res.spot_table.columns]
            values = res.spot_table.to_numpy(dtype=np.float32)
            points.features = merge_columns(points.features, res.spot_index, values, cols)
            info = dict(points.metadata.get(META_KEY, {}))
            info["radiomics_columns"] = cols
            points.metadata = {**points.metadata, META_KEY: info}
            parts.append(f"spot radiomics of {len(res.spot_index)} spots")
        parts += res.messages
        self.last_summary = summary
        self._say("; ".join(parts))
        self.labels_layer = layer
        self._colour.reset_choices()
        self._on_colour(self._colour.value)

    # -- colour -------------------------------------------------------------------------------
    def _colour_choices(self, _w=None) -> list[str]:
        layer = getattr(self, "labels_layer", None)
        if layer is None:
            return [ONE_COLOUR, LABEL_COLOURS]
        feats = layer.features
        skip = ("index", "label", "centroid_x_px", "centroid_y_px")
        cols = [c for c in feats.columns if c not in skip and feats[c].dtype.kind in "fiu"]
        return [ONE_COLOUR, LABEL_COLOURS, *cols]

    def _on_colour(self, value):
        """Outlines in one colour per nucleus, or coloured by a per-cell feature (e.g. area_um2)."""
        layer = self.labels_layer
        if layer is None or layer not in self._viewer.layers:
            return
        from napari.utils.colormaps import DirectLabelColormap, label_colormap

        from .layers import robust_limits

        if value == LABEL_COLOURS:
            layer.colormap = label_colormap()
            self._colour_legend.value = ""
        elif value == ONE_COLOUR or value not in layer.features:
            clear = np.zeros(4, np.float32)
            colours = {None: np.asarray(OUTLINE_COLOUR, np.float32), 0: clear}
            layer.colormap = DirectLabelColormap(color_dict=colours)
            self._colour_legend.value = ""
        else:
            layer.colormap = DirectLabelColormap(color_dict=feature_colours(layer.features, value))
            lo, hi = robust_limits(layer.features[value].to_numpy(dtype=float))
            self._colour_legend.value = f"{value}: red {lo:.3g} to yellow {hi:.3g} (1st-99th percentile)"
