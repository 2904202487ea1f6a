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
    create_widget,
)

from ..jobs._cells import BASE_COLUMNS
from ._common import ROI, VISIBLE, _JobWidget, _nullable, keep_units_consistent
from .layers import (
    META_KEY,
    labels_layer_data,
    merge_columns,
    slide_from_layer,
    spots_from_layer_data,
    spots_in_box,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


class CellsWidget(_JobWidget):
    """Segment the nuclei of the visible region (or a Shapes ROI) and measure them.

    Adds a Labels layer placed on the slide (scale/translate in um) whose ``features`` hold per-cell
    radiomics; the spots inside the region get spot-level radiomics (``n_nuclei``, RaPaCL's 72) in
    their ``features``.
    """

    run_text = "Segment"

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        keep_units_consistent(viewer)
        self._image = create_widget(annotation="napari.layers.Image", label="slide")
        self._scope = ComboBox(label="region", choices=[VISIBLE, ROI], value=VISIBLE)
        self._roi = _nullable("napari.layers.Shapes", "ROI")
        self._method = ComboBox(label="method", choices=["classical", "cellpose"], value="classical")
        self._cp_model = FileEdit(label="cellpose model", mode="r", visible=False)
        self._diameter = FloatSpinBox(label="diameter (um)", value=8.0, min=2.0, max=60.0, step=0.5)
        self._radiomics = CheckBox(text="radiomics (cells and spots)", value=True)
        self._spots = _nullable("napari.layers.Points", "spots")
        super().__init__(
            widgets=[
                self._image,
                self._scope,
                self._roi,
                self._method,
                self._cp_model,
                self._diameter,
                self._radiomics,
                self._spots,
                *self._init_job(),
            ]
        )
        self._method.changed.connect(lambda v: setattr(self._cp_model, "visible", v == "cellpose"))

    def start(self, *_):
        """Start segmenting in a worker thread; returns the worker (tests wait on it), or None."""
        from ..jobs import iter_cells
        from ..radiomics import NucleusSegmenter
        from ._env import avoid_llvm_clash, checkpoint_path

        if self._refuse_if_busy():
            return None
        image, points = self._image.value, self._spots.value
        if image is None:
            self._say("choose a slide layer")
            return None
        try:
            box = self._region(self._scope.value, image, self._roi.value)
            slide = slide_from_layer(image)
            slide.require_mpp("nucleus segmentation")
            model = checkpoint_path(self._cp_model.value) if self._method.value == "cellpose" else None
            segmenter = NucleusSegmenter(self._method.value, float(self._diameter.value), model)
        except Exception as exc:  # a message for the user, not a traceback
            self._say(f"cannot segment: {exc}")
            return None
        if self._method.value == "cellpose":
            avoid_llvm_clash()  # cellpose imports torch
        spots = index = None
        if points is not None and self._radiomics.value:
            spots = spots_from_layer_data(points.data, points.features, slide.mpp)
            index = spots_in_box(points.data, box)
        self._pending = (image, points, box, slide.mpp)
        return self._launch(
            iter_cells,
            slide,
            box,
            segmenter=segmenter,
            features=bool(self._radiomics.value),
            spots=spots,
            spot_index=index,
            desc=f"nuclei in {box}",
            on_done=self._on_done,
        )

    def _on_done(self, res):
        image, points, box, mpp = self._pending
        name = f"nuclei {box[0]},{box[1]}-{box[2]},{box[3]}"
        meta = {"slide": image.name, "provenance": res.provenance, **res.segmenter.to_dict()}
        h, w = res.labels.shape
        region = (res.origin[0], res.origin[1], res.origin[0] + w, res.origin[1] + h)  # level 0
        cells = res.cells.copy()
        cells.insert(0, "index", cells["label"].to_numpy())  # napari: feature row <-> label id
        data, kwargs, _ = labels_layer_data(res.labels, region, mpp, name=name, features=cells, metadata=meta)
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        layer = self._viewer.add_labels(data, **kwargs)
        if points is not None and points in self._viewer.layers:  # spots stay on top of the nuclei
            self._viewer.layers.move(self._viewer.layers.index(layer), self._viewer.layers.index(points))
        parts = [f"{res.n_cells} nuclei in {tuple(int(v) for v in res.box)}"]
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
        self._say("; ".join(parts))
        self.labels_layer = layer


# --------------------------------------------------------------------------------------------
# Predict
# --------------------------------------------------------------------------------------------
