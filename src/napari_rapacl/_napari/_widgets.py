"""Dock widgets. They only wire napari layers to the package's compute functions; long work runs in
a ``thread_worker`` generator that reports progress and can be cancelled between batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, create_widget

from .layers import META_KEY, SPOT_COLUMNS, color_kwargs, slide_from_layer, spots_from_layer_data

if TYPE_CHECKING:
    import napari

COLORMAPS = ["viridis", "magma", "inferno", "plasma", "turbo", "gray"]


def gene_columns(layer) -> list[str]:
    """Predicted genes of a spots layer, in prediction order."""
    if layer is None:
        return []
    genes = layer.metadata.get(META_KEY, {}).get("genes") or []
    if genes:
        return [g for g in genes if g in layer.features.columns]
    return [
        c for c in layer.features.columns if c not in SPOT_COLUMNS and layer.features[c].dtype.kind == "f"
    ]


def apply_gene_colors(layer, gene: str, colormap: str = "viridis") -> None:
    """Colour a spots layer by one gene's feature column (contrast = 1st-99th percentile)."""
    for key, value in color_kwargs(layer.features, gene, colormap).items():
        setattr(layer, key, value)
    layer.refresh()


class GeneWidget(Container):
    """Pick a spots layer and a gene; the spots are coloured by that gene's predicted value.

    The gene list follows the layer: it is refreshed when another layer is picked and when the
    layer's features change (e.g. when a prediction lands in them).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        self._layer = create_widget(annotation="napari.layers.Points", label="spots")
        self._gene = ComboBox(label="gene", choices=lambda _w: gene_columns(self._layer.value))
        self._cmap = ComboBox(label="colormap", choices=COLORMAPS, value="viridis")
        super().__init__(widgets=[self._layer, self._gene, self._cmap])
        self._watched = None
        self._layer.changed.connect(self._watch_layer)
        self._gene.changed.connect(self._recolor)
        self._cmap.changed.connect(self._recolor)
        self._watch_layer()

    def reset_choices(self, *_):
        super().reset_choices()
        self._watch_layer()

    def _watch_layer(self, *_):
        layer = self._layer.value
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.features.disconnect(self._gene.reset_choices)
            if layer is not None:
                layer.events.features.connect(self._gene.reset_choices)
            self._watched = layer
        self._gene.reset_choices()

    def _recolor(self, *_):
        layer, gene = self._layer.value, self._gene.value
        if layer is not None and gene:
            apply_gene_colors(layer, gene, self._cmap.value)


class PredictWidget(Container):
    """Predict expression at every spot of a Points layer from the slide under it, with a checkpoint."""

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        self._image = create_widget(annotation="napari.layers.Image", label="slide")
        self._spots = create_widget(annotation="napari.layers.Points", label="spots")
        self._checkpoint = FileEdit(label="checkpoint", filter="*.pt", mode="r")
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self._run = PushButton(text="Predict")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        super().__init__(
            widgets=[
                self._image,
                self._spots,
                self._checkpoint,
                self._device,
                self._run,
                self._cancel,
                self._status,
            ]
        )
        self._worker = None
        self._run.changed.connect(self.start)
        self._cancel.changed.connect(self.cancel)

    def start(self, *_):
        """Start the prediction in a worker thread; returns the worker (tests wait on it)."""
        from napari.qt.threading import thread_worker

        from ..inference import iter_predict_spots
        from ..models.checkpoint import load_model

        image, points = self._image.value, self._spots.value
        if image is None or points is None:
            self._status.value = "choose a slide and a spots layer"
            return None
        model, ckpt = load_model(self._checkpoint.value)
        slide = slide_from_layer(image)
        spots = spots_from_layer_data(points.data, points.features, slide.mpp)
        gen_fn = thread_worker(
            iter_predict_spots,
            progress={"total": len(spots), "desc": f"predicting {len(spots)} spots"},
            connect={"yielded": self._on_progress, "returned": self._on_done, "errored": self._on_error},
            start_thread=False,
        )
        worker = gen_fn(model, slide, spots.x, spots.y, radius=spots.radius, device=self._device.value)
        worker.finished.connect(self._on_finished)
        self._pending = (points, list(ckpt["genes"]), ckpt)
        self._worker = worker
        self._run.enabled, self._cancel.enabled = False, True
        worker.start()
        return worker

    def cancel(self, *_):
        if self._worker is not None:
            self._worker.quit()  # stops at the next batch; no partial result is written to the layer
            self._status.value = "cancelled"

    def _on_progress(self, progress):
        self._status.value = f"{progress.stage}: {progress.done}/{progress.total}"

    def _on_done(self, prediction):
        import pandas as pd

        points, genes, ckpt = self._pending
        features = points.features.drop(columns=[g for g in genes if g in points.features.columns])
        points.features = pd.concat([features, pd.DataFrame(prediction, columns=genes)], axis=1)
        info = dict(points.metadata.get(META_KEY, {}))
        info.update(genes=genes, provenance={"model": ckpt["model"], "config": ckpt["config"]})
        points.metadata = {**points.metadata, META_KEY: info}
        apply_gene_colors(points, genes[0])
        self._status.value = f"predicted {len(genes)} genes at {len(prediction)} spots"

    def _on_error(self, exc):
        self._status.value = f"error: {exc}"

    def _on_finished(self):
        self._run.enabled, self._cancel.enabled = True, False
        self._worker = None
