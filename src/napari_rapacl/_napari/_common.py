"""Shared pieces of the dock widgets: layer helpers and the job-runner base class."""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    Container,
    Label,
    ProgressBar,
    PushButton,
    create_widget,
)

from ..jobs._estimate import Estimate, eta_seconds, format_duration
from .layers import (
    META_KEY,
    SPOT_COLUMNS,
    level0_shape,
    robust_limits,
    shapes_box,
    view_rect,
    visible_box,
)

if TYPE_CHECKING:
    pass

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
    info = layer.metadata.get(META_KEY, {}) if isinstance(getattr(layer, "metadata", None), dict) else {}
    if info.get("kind") in ("slide", "spots") and not info.get("mpp"):
        return False  # a slide without a pixel size really is in pixels
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


def um_range(lo: float, hi: float) -> str:
    """``"-3,000 to -2,500 µm"``: a world interval rounded to whole microns, for people."""
    return f"{lo:,.0f} to {hi:,.0f} µm"


def world_box_text(ymin: float, xmin: float, ymax: float, xmax: float, units: str = "µm") -> str:
    """A world rectangle for people: ``"x 120 to 860 µm, y 40 to 300 µm"`` (rounded)."""
    if units == "µm":
        return f"x {um_range(xmin, xmax)}, y {um_range(ymin, ymax)}"
    return f"x {xmin:,.0f} to {xmax:,.0f} {units}, y {ymin:,.0f} to {ymax:,.0f} {units}"


def _world_units(layer) -> str:
    names = _unit_names(layer)
    return "µm" if names and names[-1] in ("micrometer", "um", "µm") else "px"


def image_world_box(image) -> tuple[float, float, float, float]:
    """``(ymin, xmin, ymax, xmax)`` of an Image layer's level 0 in world units (scale and translate)."""
    h, w = level0_shape(image)
    sy, sx = (float(v) for v in np.asarray(image.scale, dtype=float)[-2:])
    ty, tx = (float(v) for v in np.asarray(image.translate, dtype=float)[-2:])
    return ty, tx, ty + h * sy, tx + w * sx


def beside_offset(viewer, gap_fraction: float = 0.05) -> tuple[float, float] | None:
    """Where a new slide goes so that it does not cover those already open: ``(0, x)`` in world units,
    right of the rightmost slide plus a gap (``gap_fraction`` of its width), or None when no slide is
    open."""
    right, width = None, 0.0
    for layer in viewer.layers:
        info = layer.metadata.get(META_KEY, {}) if isinstance(layer.metadata, dict) else {}
        if info.get("kind") != "slide":
            continue
        _, x0, _, x1 = image_world_box(layer)
        if right is None or x1 > right:
            right, width = x1, x1 - x0
    if right is None:
        return None
    return 0.0, right + gap_fraction * width


def fit_label_height(label, fallback_width: int = 280) -> None:
    """Make a word-wrapped QLabel tall enough for all its lines at its current width (magicgui's row
    layouts do not pass Qt's height-for-width on, so a long message would be cut off)."""
    width = label.width() if label.isVisible() and label.width() >= 200 else fallback_width
    label.setMinimumHeight(max(0, label.heightForWidth(width)))


def ask_yes_no(parent, title: str, text: str) -> bool:
    """A modal Yes/No question (No by default)."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(parent, title, text, QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


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
    """Run/Cancel buttons, a progress bar with the time elapsed and left, a status line, and one
    ``thread_worker`` job at a time.

    The bar is the widget's own (it works without napari's activity dock, which stays off under
    software OpenGL): each :class:`~napari_rapacl.progress.Progress` the job yields sets it, and the
    line under it reads ``"segment: 56/100 · 52 s elapsed · about 40 s left"`` (the time left is
    extrapolated from the current stage's rate). A job whose :class:`~napari_rapacl.jobs._estimate.Estimate`
    is above its threshold asks first through :attr:`confirm` (a Yes/No dialog; tests replace it).
    """

    run_text = "Run"
    #: a progress bar in napari's activity dock for each job (False: the status line only). ``None``:
    #: yes, unless OpenGL renders on the CPU: while a bar is active napari animates a loading GIF in
    #: its status bar, and with a software renderer every frame recomposites the whole window on the
    #: CPU -- measured at about 3/4 of a 2-core machine, making a prediction ~4x slower
    #: (benchmarks/README.md, "Viewer responsiveness").
    show_progress: bool | None = None
    #: ``confirm(question) -> bool``: asked before a job estimated above its threshold; the default
    #: shows a Yes/No dialog. Replace it on an instance (tests answer programmatically).
    confirm: Callable[[str], bool] | None = None

    def _init_job(self):
        self._run = PushButton(text=self.run_text)
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._bar = ProgressBar(value=0, min=0, max=1, visible=False, label="")
        self._bar.native.setTextVisible(True)
        self._bar.native.setFormat("%v / %m")
        self._status = Label(value="")
        self._status.native.setWordWrap(True)
        from qtpy.QtWidgets import QSizePolicy

        # the width comes from the dock, never from the message (a long one would widen the panel)
        self._status.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Minimum)
        self._worker = None
        self._job_desc = ""
        self._stage = None
        self._t0 = self._stage_t0 = 0.0
        self.last_question: str | None = None
        self._run.changed.connect(self.start)
        self._cancel.changed.connect(self.cancel)
        return [self._run, self._cancel, self._bar, self._status]

    @property
    def status(self) -> str:
        return str(self._status.value)

    @property
    def busy(self) -> bool:
        """A job is running (until its ``finished`` signal has been handled)."""
        return self._worker is not None

    @property
    def progress_bar(self):
        """The job's progress bar (magicgui ``ProgressBar``; hidden when no job runs)."""
        return self._bar

    def _say(self, text: str) -> None:
        self._status.value = text
        fit_label_height(self._status.native)

    def _ask(self, question: str) -> bool:
        self.last_question = question
        if self.confirm is not None:
            return bool(self.confirm(question))
        return ask_yes_no(self.native, "Long job", question)

    def _launch(self, gen_fn, *args, desc: str, on_done, estimate: Estimate | None = None, **kwargs):
        """Run ``gen_fn(*args, **kwargs)`` in a worker thread; ``on_done(result)`` in the UI thread.

        With an ``estimate`` above its threshold the user is asked first (:attr:`confirm`); a No
        starts nothing and returns None."""
        from napari.qt.threading import thread_worker

        if self._refuse_if_busy():
            return None
        if estimate is not None and estimate.needs_confirmation():
            question = f"{desc} will take {estimate.text}. Start it now?"
            if not self._ask(question):
                self._say(
                    f"{desc}: not started ({estimate.text}). Choose a smaller region (visible region or "
                    "a drawn ROI) to try it quickly."
                )
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
        self._worker, self._job_desc, self._stage, self._pbar_stage = worker, desc, None, None
        self._job_open = True
        self._run.enabled, self._cancel.enabled = False, True
        self._t0 = self._stage_t0 = time.perf_counter()
        self._bar.max, self._bar.value, self._bar.visible = 1, 0, True
        self._bar.native.setFormat(f"{desc}: starting")
        self._say(f"{desc}: starting" + (f" ({estimate.text})" if estimate is not None else ""))
        worker.start()
        return worker

    def _refuse_if_busy(self) -> bool:
        """One job at a time: says so and returns True while one runs (checked before a new job
        overwrites what the running one will need when it ends)."""
        if self._worker is not None:
            self._say(f"busy: {self._job_desc} is still running; wait for it or press Cancel")
            return True
        return False

    def cancel(self, *_):
        """Stop the job at its next tile boundary; nothing it computed is written to a layer or file."""
        if self._worker is not None:
            self._worker.quit()
            self._say(f"{self._job_desc}: cancelling...")

    def _settled(self, *_):
        self._job_open = False  # queued progress arriving after the result must not overwrite the status

    def progress_text(self, progress, now: float | None = None) -> str:
        """``"segment: 56/100 · 52 s elapsed · about 40 s left"`` for a :class:`Progress` value."""
        now = time.perf_counter() if now is None else now
        text = f"{progress.stage}: {progress.done}/{progress.total}"
        text += f" · {format_duration(now - self._t0)} elapsed"
        left = eta_seconds(now - self._stage_t0, progress.done, progress.total)
        if left is not None and progress.done < progress.total:
            text += " · less than a second left" if left < 1 else f" · about {format_duration(left)} left"
        return text

    def _on_progress(self, progress):
        if not getattr(self, "_job_open", False):
            return
        if progress.stage != self._stage:
            self._stage, self._stage_t0 = progress.stage, time.perf_counter()
        total = max(1, int(progress.total))
        if self._bar.max != total:
            self._bar.max = total
        self._bar.value = min(int(progress.done), total)
        self._bar.native.setFormat(f"{progress.stage}: %v / %m")
        pbar = getattr(self._worker, "pbar", None)
        if pbar is not None and progress.total:
            if getattr(self, "_pbar_stage", None) != progress.stage or pbar.total != progress.total:
                self._pbar_stage = progress.stage
                pbar.n = 0
                pbar.total = progress.total
                pbar.set_description(f"{self._job_desc}: {progress.stage}")
            if progress.done > pbar.n:
                pbar.update(progress.done - pbar.n)
        # napari's activity dock may process queued events (even the result) while the bar updates
        if self._job_open:
            self._say(self.progress_text(progress))

    def _on_error(self, exc):
        self._job_open = False
        self._say(f"error: {exc}")

    def _on_aborted(self):
        self._job_open = False
        self._say(f"{self._job_desc}: cancelled (no result was written)")

    def _on_finished(self):
        self._run.enabled, self._cancel.enabled = True, False
        self._bar.visible = False
        self._worker = None

    def _region(self, scope: str, image, shapes):
        """The level-0 px box for a scope, or raise ValueError saying, in rounded µm, what is wrong
        and what to do."""
        info = image.metadata.get(META_KEY, {}) if isinstance(image.metadata, dict) else {}
        if info.get("kind") == "slide" and not info.get("mpp") and float(image.scale[-1]) == 1.0:
            from pathlib import Path

            name = Path(info["path"]).name if info.get("path") else repr(image.name)
            raise ValueError(
                f"{name} has no pixel size, and nuclei and spots are measured in µm: open it again in "
                "'Open slide and spots' with its spot file or its µm / px"
            )
        units = _world_units(image)
        slide = world_box_text(*image_world_box(image), units=units)
        if scope == VISIBLE:
            view = camera_view(self._viewer)
            try:
                return visible_box(image, view=view)
            except ValueError:
                (y0, x0), (y1, x1) = view
                raise ValueError(
                    f"the view ({world_box_text(y0, x0, y1, x1, units)}) shows none of {image.name!r} "
                    f"({slide}): pan or zoom to the slide (View > Reset view), or choose 'all spots'"
                ) from None
        if scope == ROI:
            if shapes is None:
                raise ValueError(
                    "choose a Shapes layer holding the ROI: add a Shapes layer, draw a rectangle over "
                    "the tissue, and pick that layer as ROI"
                )
            if len(shapes.data) == 0:
                raise ValueError(f"the Shapes layer {shapes.name!r} holds no ROI: draw a rectangle in it")
            try:
                return shapes_box(shapes, image)
            except ValueError:
                verts = np.concatenate([np.asarray(d, dtype=float)[:, -2:] for d in shapes.data])
                world = (
                    verts * np.asarray(shapes.scale, dtype=float)[-2:]
                    + np.asarray(shapes.translate, dtype=float)[-2:]
                )
                (y0, x0), (y1, x1) = world.min(axis=0), world.max(axis=0)
                raise ValueError(
                    f"the ROI in {shapes.name!r} ({world_box_text(y0, x0, y1, x1, units)}) lies outside "
                    f"{image.name!r} ({slide}): draw the rectangle over the tissue"
                ) from None
        h, w = level0_shape(image)
        return 0, 0, w, h


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
