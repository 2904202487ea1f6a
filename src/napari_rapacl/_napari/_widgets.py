"""Dock widgets. They only wire napari layers to the package's jobs (:mod:`napari_rapacl.jobs`, the same
functions the command line runs).

Long work runs as a generator in a ``thread_worker`` (a progress bar in napari's activity dock; the UI
thread never waits on it). *Cancel* calls ``worker.quit()``, which stops the generator at its next
``yield``, between tiles; results are written into layers only by the ``returned`` handler, in one
assignment, so a cancelled job leaves every layer as it was (the tile cache keeps the whole tiles
computed before the cancel, which is consistent and makes the next run faster). One exception, by
design: *Predict* shows the spots of the requested region as soon as they are all predicted (one
assignment, from a progress value carrying them), before it completes the tiles around the region for
the cache; a cancel after that keeps exactly those spots.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    create_widget,
)

from ..jobs._cells import BASE_COLUMNS
from .layers import (
    META_KEY,
    SPOT_COLUMNS,
    dense_layer_data,
    labels_layer_data,
    level0_shape,
    merge_columns,
    robust_limits,
    shapes_box,
    slide_from_layer,
    spots_from_layer_data,
    spots_in_box,
    view_rect,
    visible_box,
)

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

COLORMAPS = ["viridis", "magma", "inferno", "plasma", "turbo", "gray"]
VISIBLE, ROI, ALL = "visible region", "selected ROI", "all spots"


# --------------------------------------------------------------------------------------------
# helpers (no Qt)
# --------------------------------------------------------------------------------------------
def gene_columns(layer) -> list[str]:
    """Colourable columns of a spots layer: the predicted genes (prediction order), then the other
    numeric features (e.g. spot radiomics such as ``n_nuclei``)."""
    if layer is None:
        return []
    features = layer.features
    genes = [g for g in layer.metadata.get(META_KEY, {}).get("genes") or [] if g in features.columns]
    known = set(genes)
    others = [
        c
        for c in features.columns
        if c not in known and c not in SPOT_COLUMNS and features[c].dtype.kind in "fiu"
    ]
    return genes + others


def apply_gene_colors(layer, gene: str, colormap: str = "viridis", limits=None) -> tuple[float, float]:
    """Colour a spots layer's faces by the ``gene`` feature column; ``limits`` default to the 1st-99th
    percentile of its values (spots without a value, NaN, are left transparent). Returns the limits."""
    if gene not in layer.features.columns:
        raise KeyError(f"{gene!r} is not among the spots' features")
    if limits is None:
        limits = robust_limits(layer.features[gene].to_numpy(dtype=float))
    layer.face_colormap = colormap
    layer.face_contrast_limits = (float(limits[0]), float(limits[1]))
    layer.face_color = gene
    layer.refresh()
    return float(limits[0]), float(limits[1])


def colored_by(layer) -> str | None:
    """The feature column a Points layer's faces are coloured by, if any."""
    props = getattr(getattr(layer, "_face", None), "color_properties", None)
    return props.name if props is not None else None


def dense_layers(viewer, spots_name: str | None = None) -> list:
    """Dense-map Image layers (made by the Predict widget), optionally only those of one spots layer."""
    out = []
    for lyr in viewer.layers:
        info = lyr.metadata.get(META_KEY, {}) if isinstance(lyr.metadata, dict) else {}
        if info.get("kind") == "dense" and (spots_name is None or info.get("spots") == spots_name):
            out.append(lyr)
    return out


def viewer_camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    cam = getattr(scene, "camera", None) if scene is not None else None
    return cam if cam is not None else viewer.camera


def camera_view(viewer) -> np.ndarray:
    """The world rectangle the viewer's camera shows."""
    cam = viewer_camera(viewer)
    return view_rect(cam.center, cam.zoom, viewer.canvas.size)


@functools.lru_cache(maxsize=1)
def gl_renderer() -> str:
    """The OpenGL renderer Qt gets here (e.g. ``"llvmpipe (LLVM 15.0.6, 256 bits)"``), or ``""``."""
    try:
        from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

        ctx = QOpenGLContext()
        if not ctx.create():
            return ""
        surface = QOffscreenSurface()
        surface.setFormat(ctx.format())
        surface.create()
        if not ctx.makeCurrent(surface):
            return ""
        try:
            return str(ctx.functions().glGetString(0x1F01) or "")  # GL_RENDERER
        finally:
            ctx.doneCurrent()
    except Exception:  # no OpenGL at all: nothing to say
        return ""


def software_rendering() -> bool:
    """Whether OpenGL is rendered on the CPU (Mesa llvmpipe/softpipe/swrast, Windows' GDI Generic)."""
    name = gl_renderer().lower()
    return any(k in name for k in ("llvmpipe", "softpipe", "swrast", "software", "gdi generic"))


def _unit_names(layer) -> tuple[str, ...]:
    return tuple(str(u) for u in getattr(layer, "units", ()) or ())


def adopt_world_units(layer, others) -> bool:
    """Give ``layer`` the units of the ``others`` when it has napari's default (pixel) units and the
    others all share one other unit (the um of our slide layers). A Shapes layer made with napari's
    *new layer* button has pixel units while its coordinates are world coordinates (um here): without
    this napari drops the units (the scale bar's um) and warns "Inconsistent units across layers"
    whenever the layers change (it still does once, while the layer is inserted, before this runs).
    Returns True when it changed the units."""
    mine = _unit_names(layer)
    if not mine or set(mine) != {"pixel"}:
        return False
    theirs = {_unit_names(o) for o in others if o is not layer and _unit_names(o)}
    if len(theirs) != 1:
        return False
    (units,) = theirs
    if set(units) == {"pixel"} or len(units) != len(mine):
        return False
    layer.units = units
    return True


_UNITS_HOOKED: weakref.WeakSet = weakref.WeakSet()


def keep_units_consistent(viewer) -> None:
    """Once per viewer: layers with default pixel units (those there now, and new ones) adopt the
    slide's world units (:func:`adopt_world_units`)."""
    if viewer in _UNITS_HOOKED:
        return
    for layer in list(viewer.layers):
        adopt_world_units(layer, list(viewer.layers))

    def on_inserted(event):
        adopt_world_units(event.value, list(viewer.layers))

    viewer.layers.events.inserted.connect(on_inserted)
    _UNITS_HOOKED.add(viewer)


def _nullable(annotation: str, label: str):
    return create_widget(annotation=annotation, label=label, options={"nullable": True})


@dataclass
class JobFailed:
    """What :func:`_guarded` returns when the job raised: the exception (traceback logged)."""

    error: BaseException


def _guarded(gen_fn, *args, **kwargs):
    """Run the job generator ``gen_fn(*args, **kwargs)``; an exception ends it with a
    :class:`JobFailed` result instead of propagating (a cancel, GeneratorExit, still propagates)."""
    try:
        return (yield from gen_fn(*args, **kwargs))
    except Exception as exc:
        log.error("%s failed", getattr(gen_fn, "__name__", "job"), exc_info=True)
        return JobFailed(exc)


# --------------------------------------------------------------------------------------------
# base: a widget that runs one generator job at a time
# --------------------------------------------------------------------------------------------
class _JobWidget(Container):
    """Run/Cancel buttons, a status line, and one ``thread_worker`` job at a time."""

    run_text = "Run"
    #: a progress bar in napari's activity dock for each job (False: the status line only). ``None``:
    #: yes, unless OpenGL renders on the CPU: while a bar is active napari animates a loading GIF in
    #: its status bar, and with a software renderer every frame recomposites the whole window on the
    #: CPU -- measured at about 3/4 of a 2-core machine, making a prediction ~4x slower
    #: (benchmarks/README.md, "Viewer responsiveness").
    show_progress: bool | None = None

    def _init_job(self):
        self._run = PushButton(text=self.run_text)
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        self._worker = None
        self._job_desc = ""
        self._stage = None
        self._run.changed.connect(self.start)
        self._cancel.changed.connect(self.cancel)
        return [self._run, self._cancel, self._status]

    @property
    def status(self) -> str:
        return str(self._status.value)

    @property
    def busy(self) -> bool:
        """A job is running (until its ``finished`` signal has been handled)."""
        return self._worker is not None

    def _say(self, text: str) -> None:
        self._status.value = text

    def _launch(self, gen_fn, *args, desc: str, on_done, **kwargs):
        from napari.qt.threading import thread_worker

        if self._refuse_if_busy():
            return None

        show = self.show_progress if self.show_progress is not None else not software_rendering()
        progress = {"desc": desc} if show else None
        # an exception in the job comes back as a returned JobFailed (see _guarded), not through the
        # worker's ``errored`` signal: napari 0.9.2 connects a status callback to ``errored`` that
        # takes the wrong number of arguments and raises in the event loop
        worker = thread_worker(_guarded, progress=progress, start_thread=False, ignore_errors=True)(
            gen_fn, *args, **kwargs
        )

        def returned(result):
            self._settled()
            if isinstance(result, JobFailed):
                self._on_error(result.error)
            else:
                on_done(result)

        worker.yielded.connect(self._on_progress)
        worker.returned.connect(returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker, self._job_desc, self._stage = worker, desc, None
        self._job_open = True
        self._run.enabled, self._cancel.enabled = False, True
        self._say(f"{desc}: starting")
        worker.start()
        return worker

    def _refuse_if_busy(self) -> bool:
        """One job at a time: says so and returns True while one runs (checked before a new job
        overwrites what the running one will need when it ends)."""
        if self._worker is not None:
            self._say(f"busy: {self._job_desc} is still running")
            return True
        return False

    def cancel(self, *_):
        """Stop the job at its next tile boundary; nothing it computed is written to a layer or file."""
        if self._worker is not None:
            self._worker.quit()
            self._say(f"{self._job_desc}: cancelling...")

    def _settled(self, *_):
        self._job_open = False  # queued progress arriving after the result must not overwrite the status

    def _on_progress(self, progress):
        if not getattr(self, "_job_open", False):
            return
        pbar = getattr(self._worker, "pbar", None)
        if pbar is not None and progress.total:
            if progress.stage != self._stage or pbar.total != progress.total:
                self._stage = progress.stage
                pbar.n = 0
                pbar.total = progress.total
                pbar.set_description(f"{self._job_desc}: {progress.stage}")
            if progress.done > pbar.n:
                pbar.update(progress.done - pbar.n)
        # napari's activity dock may process queued events (even the result) while the bar updates
        if self._job_open:
            self._say(f"{progress.stage}: {progress.done}/{progress.total}")

    def _on_error(self, exc):
        self._job_open = False
        self._say(f"error: {exc}")

    def _on_aborted(self):
        self._job_open = False
        self._say(f"{self._job_desc}: cancelled (no result was written)")

    def _on_finished(self):
        self._run.enabled, self._cancel.enabled = True, False
        self._worker = None

    def _region(self, scope: str, image, shapes):
        """The level-0 px box for a scope, or raise ValueError saying what is missing."""
        if scope == VISIBLE:
            return visible_box(image, view=camera_view(self._viewer))
        if scope == ROI:
            if shapes is None:
                raise ValueError("choose a Shapes layer holding the ROI (draw a rectangle)")
            return shapes_box(shapes, image)
        h, w = level0_shape(image)
        return 0, 0, w, h


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
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
class PredictWidget(_JobWidget):
    """Predict expression at the spots of a region (visible / ROI / all) from the slide under them.

    A checkpoint defines the model (its registry name, config, weights, genes); without one the chosen
    registry model runs with random initial weights (for trying the plugin out). Inference is tiled and
    cached per widget (panning back and predicting again costs only cache lookups); predictions are
    merged into the spots layer's ``features`` (NaN for spots not predicted yet). PixNet also adds a dense
    map of the coloured gene as an Image layer ``"<gene> (dense)"`` placed on the slide.
    """

    run_text = "Predict"
    #: side of the tile grid (level-0 px). A tile is predicted whole (all its spots), so a view costs
    #: the spots of the tiles it touches: smaller tiles waste less outside the view (a 2048 px view
    #: touches at most 3 x 3 tiles of 1024 px, i.e. 2.25 x its area, against 4 x with 2048 px tiles).
    tile_px = 1024

    def __init__(self, viewer: napari.viewer.Viewer):
        from ..jobs import user_models
        from ..tiled import TileCache

        self._viewer = viewer
        keep_units_consistent(viewer)
        self._image = create_widget(annotation="napari.layers.Image", label="slide")
        self._spots = create_widget(annotation="napari.layers.Points", label="spots")
        models = user_models()  # the *_tiny test variants stay out of the user interface
        self._checkpoint_model: str | None = None  # the model a chosen checkpoint holds
        self._model = ComboBox(
            label="model", choices=self._model_choices, value="stnet" if "stnet" in models else models[0]
        )
        self._checkpoint = FileEdit(label="checkpoint", filter="*.pt", mode="r")
        self._scope = ComboBox(label="region", choices=[VISIBLE, ROI, ALL], value=VISIBLE)
        self._roi = _nullable("napari.layers.Shapes", "ROI")
        self._device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self._dense = CheckBox(text="dense map (PixNet)", value=True)
        super().__init__(
            widgets=[
                self._image,
                self._spots,
                self._model,
                self._checkpoint,
                self._scope,
                self._roi,
                self._device,
                self._dense,
                *self._init_job(),
            ]
        )
        self.cache = TileCache()
        self._loaded = None
        self._loaded_choice = None
        self._preload_key = None
        self.preloaded = None  # a Future of the chosen model, built in the background
        self._shown = None  # the partial result of the running job already written to the layer
        self.last_result = None
        self._checkpoint.changed.connect(self._on_checkpoint)
        self._checkpoint.changed.connect(self._preload_model)
        self._model.changed.connect(self._preload_model)
        self._preload_model()

    # -- model -------------------------------------------------------------------------------
    def _choice(self):
        from ._env import checkpoint_path

        ckpt = checkpoint_path(self._checkpoint.value)
        if ckpt is not None:
            if not ckpt.is_file():
                raise FileNotFoundError(f"checkpoint not found: {ckpt}")
            return ("checkpoint", str(ckpt.resolve()), ckpt.stat().st_mtime_ns), (None, ckpt)
        return ("registry", self._model.value), (self._model.value, None)

    def _model_choices(self, _widget=None) -> list[str]:
        """The production models, plus the model of the chosen checkpoint (whatever it is)."""
        from ..jobs import user_models

        models = user_models()
        extra = self._checkpoint_model
        return models + [extra] if extra and extra not in models else models

    def _on_checkpoint(self, *_):
        """A checkpoint names its model: show it in the model picker (read from the YAML beside it)."""
        from ..models.checkpoint import config_path_for
        from ._env import checkpoint_path

        ckpt = checkpoint_path(self._checkpoint.value)
        self._model.enabled = ckpt is None
        name = None
        if ckpt is not None and config_path_for(ckpt).is_file():
            import yaml

            name = (yaml.safe_load(config_path_for(ckpt).read_text()) or {}).get("model")
        self._checkpoint_model = name if isinstance(name, str) and name else None
        self._model.reset_choices()
        if self._checkpoint_model is not None:
            self._model.value = self._checkpoint_model

    def _preload_model(self, *_):
        """Build the chosen model in the background (imports, weights, the hash that keys its cached
        tiles), so that a click on Predict starts predicting at once; the job waits for it in its
        worker thread when it is not ready yet. A choice that cannot load is reported by Predict."""
        from ..jobs import preload_model
        from ._env import avoid_llvm_clash

        try:
            key, choice = self._choice()
        except Exception:  # a missing checkpoint: Predict says so
            return
        if key in (self._loaded_choice, self._preload_key):
            return
        avoid_llvm_clash()  # before the preloading thread imports torch
        self._preload_key, self.preloaded = key, preload_model(*choice)

    # -- run ---------------------------------------------------------------------------------
    def start(self, *_):
        """Start predicting in a worker thread; returns the worker (tests wait on it), or None."""
        from ..jobs import iter_predict
        from ._env import avoid_llvm_clash

        if self._refuse_if_busy():
            return None
        image, points = self._image.value, self._spots.value
        if image is None or points is None:
            self._say("choose a slide and a spots layer")
            return None
        try:
            key, choice = self._choice()
            box = self._region(self._scope.value, image, self._roi.value)
            slide = slide_from_layer(image)
            slide.require_mpp("spot prediction")
        except Exception as exc:  # a message for the user, not a traceback
            self._say(f"cannot predict: {exc}")
            return None
        avoid_llvm_clash()  # before the worker imports torch
        spots = spots_from_layer_data(points.data, points.features, slide.mpp)
        if self._loaded is not None and key == self._loaded_choice:
            model = self._loaded
        elif key == self._preload_key and self.preloaded is not None:
            model = self.preloaded  # a Future: the worker waits for it
        else:
            model = choice
        self._pending = (points, box, key, slide.mpp, self._device.value, time.perf_counter())
        self._shown = None
        return self._launch(
            iter_predict,
            model,
            slide,
            spots,
            box,
            cache=self.cache,
            device=self._device.value,
            dense=bool(self._dense.value),
            dense_gene=colored_by(points),  # the map of the gene the spots show (else the first)
            tile_px=self.tile_px,
            view_first=True,  # show the region's spots first, then complete the tiles around it
            desc=f"predict {box}",
            on_done=self._on_done,
        )

    def _on_progress(self, progress):
        super()._on_progress(progress)
        part = progress.result
        if part is not None and getattr(part, "partial", False) and getattr(self, "_job_open", False):
            self._show_spots(part)  # the region's spots, before the tiles around them are complete
            self._shown = part
            self._say(
                f"{part.loaded.name}: {len(part.index)} spots shown in "
                f"{time.perf_counter() - self._pending[-1]:.1f} s; completing the tiles for the cache..."
            )

    def _on_aborted(self):
        shown = self._shown
        if shown is None:
            return super()._on_aborted()
        self._job_open = False
        self._say(
            f"{self._job_desc}: cancelled after the {len(shown.index)} spots of the region were shown "
            "(the tiles around them were not completed, so nothing was cached)"
        )

    def _on_done(self, res):
        points = self._pending[0]
        shown = self._shown
        same = (
            shown is not None
            and np.array_equal(shown.index, res.index)
            and np.array_equal(shown.values, res.values)
        )
        if not same:
            self._show_spots(res)
        if res.dense is not None:
            self._show_dense(res, points, self._pending[3])
        self.last_result = res
        genes = res.loaded.genes
        n_done = int(np.isfinite(points.features[genes[0]].to_numpy(dtype=float)).sum())
        self._say(
            f"{res.loaded.name}: {len(res.index)} spots in {time.perf_counter() - self._pending[-1]:.1f} s "
            f"({res.tiles_computed} tiles computed, {res.tiles_cached} cached); "
            f"{n_done}/{len(points.data)} predicted"
        )

    def _show_spots(self, res):
        """Merge predictions into the spots layer's features (one assignment) and colour the spots."""
        from ..jobs import LoadedModel

        points, box, key, mpp, device, t0 = self._pending
        loaded: LoadedModel = res.loaded
        self._loaded, self._loaded_choice = loaded, key
        genes = loaded.genes
        info = dict(points.metadata.get(META_KEY, {}))
        model_id = repr(loaded.key)
        reset = info.get("model_id") != model_id  # another model: earlier predictions are stale
        base = points.features
        if reset:  # drop the previous model's genes (this model's are reset to NaN below)
            base = base.drop(columns=[g for g in info.get("genes") or [] if g in base and g not in genes])
        features = merge_columns(base, res.index, res.values, genes, reset=reset)
        rad_cols = list(info.get("radiomics_columns") or [])
        if res.radiomics is not None:  # the spot radiomics that fed the model (RaPaCL-ST)
            cols = [str(c) for c in res.radiomics.columns]
            features = merge_columns(features, res.index, res.radiomics.to_numpy(np.float32), cols)
            rad_cols = list(dict.fromkeys([*rad_cols, *cols]))
        prov = {} if reset else dict(info.get("provenance") or {})
        regions = [] if reset else list(prov.get("regions", []))
        regions.append([int(v) for v in box])
        prov.update(loaded.provenance())
        prov.update(regions=regions, device=device, tile_px=self.tile_px)
        gene = colored_by(points)
        cmap = getattr(points.face_colormap, "name", "viridis")
        points.features = features
        info.update(genes=list(genes), provenance=prov, model_id=model_id, radiomics_columns=rad_cols)
        points.metadata = {**points.metadata, META_KEY: info}
        if gene not in genes:  # first prediction: colour by the first gene
            gene, cmap = genes[0], "viridis"
        apply_gene_colors(points, gene, cmap if cmap in COLORMAPS else "viridis")

    def _show_dense(self, res, points, mpp):
        dense = res.dense
        gene = res.dense_gene
        meta = {"spots": points.name, "region": list(res.box), "model": res.loaded.name}
        data, kwargs, _ = dense_layer_data(
            dense.values[0], dense.translate_px, dense.px_size, mpp, gene=gene, metadata=meta
        )
        name = kwargs["name"]
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            layer.data = data
            for key in ("scale", "translate", "contrast_limits", "metadata"):
                setattr(layer, key, kwargs[key])
        else:
            layer = self._viewer.add_image(data, **kwargs)
            # keep the spots above the map
            self._viewer.layers.move(self._viewer.layers.index(layer), self._viewer.layers.index(points))
        if hasattr(layer, "colorbar"):
            layer.colorbar.visible = True


# --------------------------------------------------------------------------------------------
# Genes: search, colormap, contrast, colour bar
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
            self._say("choose a nuclei layer (made by Cells)")
            return None
        if path is None or path.suffix.lower() not in (".h5ad", ".csv"):
            self._say("choose a .h5ad or .csv file to write")
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
            self._say("choose a spots layer")
            return None
        if path is None or path.suffix.lower() != ".h5ad":
            self._say("choose a .h5ad file to write")
            return None
        extra: dict[str, Any] = {"export_scope": self._scope.value}
        rows = None
        if self._scope.value == ROI:
            try:
                if self._roi.value is None:
                    raise ValueError("choose a Shapes layer holding the ROI")
                box = shapes_box(self._roi.value, points)
            except ValueError as exc:
                self._say(f"cannot export: {exc}")
                return None
            rows = spots_in_box(points.data, box)
            extra["roi"] = list(box)
        meta = {"name": points.name, "features": points.features, "metadata": points.metadata}
        try:
            args = export_arguments(np.asarray(points.data), meta, rows=rows)  # copies: the job owns them
        except ValueError as exc:
            self._say(f"cannot export: {exc} (run Predict)")
            return None
        args["provenance"].update(extra)
        values, genes, spots = args.pop("values"), args.pop("genes"), args.pop("spots")
        return self._launch(
            iter_export, path, values, genes, spots, **args, desc=f"export {path.name}", on_done=self._on_done
        )

    def _on_done(self, written):
        self.written = Path(written)
        self._say(f"wrote {written}")
