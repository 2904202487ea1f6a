"""The *Export* widget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    FileEdit,
    create_widget,
)

from ._common import ROI, _JobWidget, _nullable, keep_units_consistent
from .layers import (
    META_KEY,
    shapes_box,
    spots_in_box,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


SPOTS_EXPORT, CELLS_EXPORT = "spot predictions (.h5ad)", "nuclei: cell table (.h5ad / .csv)"


class ExportWidget(_JobWidget):
    """Write, atomically, either the predictions of a spots layer (all predicted spots, or those inside
    a Shapes ROI) to an AnnData ``.h5ad`` with provenance (model, checkpoint sha256, regions, genes) and
    the spot radiomics that fed the model in ``obsm['radiomics']``, or the cell table of a nuclei layer
    (one row per nucleus, features with units) to ``.h5ad`` or ``.csv`` -- with the same functions as
    ``napari-rapacl predict`` and ``napari-rapacl segment``."""

    run_text = "Export"

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        keep_units_consistent(viewer)
        self._what = ComboBox(label="export", choices=[SPOTS_EXPORT, CELLS_EXPORT], value=SPOTS_EXPORT)
        self._spots = create_widget(annotation="napari.layers.Points", label="spots")
        self._cells = _nullable("napari.layers.Labels", "nuclei")
        self._scope = ComboBox(label="scope", choices=["all predicted", ROI], value="all predicted")
        self._roi = _nullable("napari.layers.Shapes", "ROI")
        self._path = FileEdit(label="file", mode="w", filter="*.h5ad *.csv")
        super().__init__(
            widgets=[
                self._what,
                self._spots,
                self._cells,
                self._scope,
                self._roi,
                self._path,
                *self._init_job(),
            ]
        )
        self._what.changed.connect(self._on_what)
        self._on_what(self._what.value)
        self.written: Path | None = None

    def _on_what(self, value):
        spots = value == SPOTS_EXPORT
        for w in (self._spots, self._scope, self._roi):
            w.visible = spots
        self._cells.visible = not spots

    def start(self, *_):
        """Export in a worker thread; returns the worker, or None (the status says why)."""
        from ._env import checkpoint_path

        path = checkpoint_path(self._path.value)
        if self._what.value == CELLS_EXPORT:
            return self._start_cells(path)
        return self._start_spots(path)

    def _start_cells(self, path):
        from ..jobs import iter_write_cells

        layer = self._cells.value
        if layer is None or layer.metadata.get(META_KEY, {}).get("kind") != "nuclei":
            self._say("choose a nuclei layer: run Cells (Segment) first, then pick its layer here")
            return None
        if path is None or path.suffix.lower() not in (".h5ad", ".csv"):
            self._say("choose a file to write, ending in .h5ad (AnnData) or .csv (a table)")
            return None
        cells = layer.features.drop(columns=["index"], errors="ignore").copy()
        info = layer.metadata.get(META_KEY, {})
        provenance = dict(info.get("provenance") or {})
        return self._launch(
            iter_write_cells, path, cells, provenance, desc=f"export {path.name}", on_done=self._on_done
        )

    def _start_spots(self, path):
        from ..jobs import iter_export
        from .layers import export_arguments

        points = self._spots.value
        if points is None:
            self._say("choose a spots layer (open a slide with its spots, then Predict)")
            return None
        if path is None or path.suffix.lower() != ".h5ad":
            self._say("choose a file to write, ending in .h5ad (AnnData for scanpy/squidpy)")
            return None
        extra: dict[str, Any] = {"export_scope": self._scope.value}
        rows = None
        if self._scope.value == ROI:
            try:
                if self._roi.value is None:
                    raise ValueError(
                        "choose a Shapes layer holding the ROI (draw a rectangle), or 'all predicted'"
                    )
                box = shapes_box(self._roi.value, points)
            except ValueError as exc:
                self._say(f"cannot export: {exc}")
                return None
            rows = spots_in_box(points.data, box)
            extra["roi"] = list(box)
        meta = {"name": points.name, "features": points.features, "metadata": points.metadata}
        if rows is not None and len(rows) == 0:
            self._say("cannot export: no spots in this ROI: draw it over the predicted spots")
            return None
        try:
            args = export_arguments(np.asarray(points.data), meta, rows=rows)  # copies: the job owns them
        except ValueError as exc:
            self._say(f"cannot export: {exc}")
            return None
        args["provenance"].update(extra)
        values, genes, spots = args.pop("values"), args.pop("genes"), args.pop("spots")
        return self._launch(
            iter_export, path, values, genes, spots, **args, desc=f"export {path.name}", on_done=self._on_done
        )

    def _on_done(self, written):
        self.written = Path(written)
        self._say(f"wrote {written}")
