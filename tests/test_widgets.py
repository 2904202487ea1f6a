"""The dock widgets and their Qt-free helpers.

* region helpers (``layers.visible_box`` / ``shapes_box``), feature merging and dense-map placement:
  plain napari layers, no viewer;
* the Genes widget (search, colormap, limits, colour bar) on a synthetic spots layer in a real viewer;
* on a her2st section (``data_dir``): Predict cancelled mid-run leaves no feature, no layer and no
  file; the UI thread keeps running while a prediction runs; Export cancelled before writing leaves
  no file.

GUI tests need a display: run them under ``xvfb-run`` (scripts/test.sh does).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

napari = pytest.importorskip("napari")

try:  # torch's stack before any viewer's GL context exists (see _napari._jobs.avoid_llvm_clash)
    import timm  # noqa: F401
except ImportError:  # the tests that predict are skipped
    timm = None

from napari_rapacl._napari.layers import (  # noqa: E402
    NOT_PREDICTED_BORDER,
    SPOT_BORDER,
    clip_box,
    dense_layer_data,
    merge_columns,
    robust_limits,
    shapes_box,
    spots_in_box,
    view_rect,
    visible_box,
)


# --------------------------------------------------------------------------------------------
# Qt-free helpers
# --------------------------------------------------------------------------------------------
def _pyramid(h=1024, w=2048, levels=3):
    return [np.zeros((h >> i, w >> i, 3), np.uint8) for i in range(levels)]


def test_visible_box_of_a_multiscale_layer_at_a_coarse_level():
    from napari.layers import Image

    mpp = 0.5
    layer = Image(_pyramid(), multiscale=True, rgb=True, scale=(mpp, mpp), contrast_limits=(0, 255))
    # what the canvas does on a draw: world corners of the view (um), shape threshold = canvas px
    layer._update_draw(1.0, np.array([[100.0, 200.0], [300.0, 600.0]]), (100, 100))
    assert layer.data_level == 1  # 800 x 400 level-0 px on a 100 px canvas: a coarser level
    c = np.asarray(layer.corner_pixels)
    # corners are level-1 indices: level-0 px = index * 2, the last index inclusive
    assert visible_box(layer) == (c[0, 1] * 2, c[0, 0] * 2, (c[1, 1] + 1) * 2, (c[1, 0] + 1) * 2)
    x0, y0, x1, y1 = visible_box(layer)
    assert x0 <= 400 and y0 <= 200 and x1 >= 1200 and y1 >= 600  # covers the view (200..600 um / 0.5)
    # the camera's rectangle gives what is on screen, whatever napari has loaded
    view = np.array([[100.0, 200.0], [300.0, 600.0]])
    assert visible_box(layer, view=view) == (400, 200, 1200, 600)
    layer._update_draw(1.0, np.array([[120.0, 220.0], [140.0, 260.0]]), (100, 100))
    assert visible_box(layer, view=[[120.0, 220.0], [140.0, 260.0]]) == (440, 240, 520, 280)
    # a view reaching past the slide is clipped to it (2048 x 1024 px at level 0)
    assert visible_box(layer, view=[[-50.0, 900.0], [10.0, 5000.0]]) == (1800, 0, 2048, 20)
    with pytest.raises(ValueError, match="does not overlap"):
        visible_box(layer, view=[[-50.0, -50.0], [-10.0, -10.0]])


def test_visible_box_single_scale():
    from napari.layers import Image

    layer = Image(np.zeros((300, 500, 3), np.uint8), rgb=True, scale=(2.0, 2.0))
    assert visible_box(layer) == (0, 0, 500, 300)  # napari's corners before any draw: everything
    layer._update_draw(1.0, np.array([[20.0, 40.0], [100.0, 300.0]]), (1000, 1000))
    assert visible_box(layer) == (20, 10, 151, 51)
    assert visible_box(layer, view=[[20.0, 40.0], [100.0, 300.0]]) == (20, 10, 150, 50)


def test_view_rect_from_camera():
    rect = view_rect((0.0, 50.0, 80.0), zoom=2.0, canvas_size=(100, 200))
    np.testing.assert_allclose(rect, [[25.0, 30.0], [75.0, 130.0]])


def test_shapes_box_maps_a_roi_between_scales():
    from napari.layers import Image, Shapes

    image = Image(_pyramid(), multiscale=True, rgb=True, scale=(0.5, 0.5), contrast_limits=(0, 255))
    # a rectangle drawn on a Shapes layer in um (scale 1): rows 50..100 um, cols 20..60 um
    rect = np.array([[50.0, 20.0], [50.0, 60.0], [100.0, 60.0], [100.0, 20.0]])
    shapes = Shapes([rect], shape_type="rectangle")
    assert shapes_box(shapes, image) == (40, 100, 120, 200)
    # the same ROI on a Shapes layer with the slide's own scale and an offset
    shifted = Shapes([rect * 2 - [10, 10]], shape_type="rectangle", scale=(0.5, 0.5), translate=(5, 5))
    assert shapes_box(shifted, image) == (40, 100, 120, 200)
    # several shapes: the selected ones count; none selected is an error
    both = Shapes([rect, rect + [200, 500]], shape_type="rectangle")
    with pytest.raises(ValueError, match="select"):
        shapes_box(both, image)
    both.selected_data = {1}
    assert shapes_box(both, image) == (1040, 500, 1120, 600)
    with pytest.raises(ValueError, match="no shape"):
        shapes_box(Shapes(), image)
    # a ROI reaching past the slide is clipped; one outside it is refused
    big = Shapes([np.array([[-10.0, -10.0], [-10.0, 5000.0], [10.0, 5000.0], [10.0, -10.0]])])
    assert shapes_box(big, image) == (0, 0, 2048, 20)
    # against a spots layer (data in level-0 px too): clipped only at the origin
    pts = napari.layers.Points(np.array([[0.0, 0.0]]), scale=(0.5, 0.5))
    assert shapes_box(big, pts) == (0, 0, 10000, 20)


def test_spots_in_box_and_clip_box():
    data = np.array([[10.0, 5.0], [10.0, 15.0], [30.0, 5.0], [19.99, 9.99]])  # (row, col)
    np.testing.assert_array_equal(spots_in_box(data, (0, 0, 10, 20)), [0, 3])
    assert clip_box((-3.5, 2.2, 50.1, 60.0), (40, 30)) == (0, 2, 30, 40)
    with pytest.raises(ValueError):
        clip_box((40, 0, 50, 10), (40, 30))


def test_merge_columns_fills_nan_keeps_and_resets():
    features = pd.DataFrame({"barcode": list("abcd"), "radius_px": 1.0, "other": [1, 2, 3, 4]})
    first = merge_columns(features, np.array([1, 3]), np.array([[1, 2], [3, 4]], np.float32), ["G1", "G2"])
    assert list(first.columns) == ["barcode", "radius_px", "other", "G1", "G2"]
    np.testing.assert_array_equal(first["G1"].to_numpy(), [np.nan, 1, np.nan, 3])
    assert first["G1"].dtype == np.float32 and list(first["other"]) == [1, 2, 3, 4]
    second = merge_columns(first, np.array([0]), np.array([[9, 9]], np.float32), ["G1", "G2"])
    np.testing.assert_array_equal(second["G2"].to_numpy(), [9, 2, np.nan, 4])  # earlier values kept
    reset = merge_columns(first, np.array([0]), np.array([[9, 9]], np.float32), ["G1", "G2"], reset=True)
    np.testing.assert_array_equal(reset["G2"].to_numpy(), [9, np.nan, np.nan, np.nan])
    with pytest.raises(ValueError):
        merge_columns(features, np.array([0]), np.zeros((2, 2)), ["G1", "G2"])


def test_dense_layer_sits_on_the_slide():
    """Map pixel (i, j) covers level-0 px [y0 + i s, y0 + (i + 1) s): its centre lands, in world um,
    where the slide layer puts the centre of that level-0 area."""
    from napari.layers import Image

    mpp, s = 0.5, 8.0
    corner = (100.0, 40.0)  # top-left of map pixel (0, 0), continuous level-0 px
    translate_px = (corner[0] + (s - 1) / 2, corner[1] + (s - 1) / 2)  # centre, napari convention
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    data, kwargs, kind = dense_layer_data(values, translate_px, s, mpp, gene="G1", colormap="magma")
    layer = Image(data, **kwargs)
    assert kind == "image" and layer.name == "G1 (dense)" and layer.colormap.name == "magma"
    slide = Image(np.zeros((400, 400, 3), np.uint8), rgb=True, scale=(mpp, mpp))
    # level-0 pixels 100..107 (rows) are map row 0: their mean centre is 103.5 in napari's convention
    world = np.asarray(layer.data_to_world((0, 0)))
    np.testing.assert_allclose(world, np.asarray(slide.data_to_world((103.5, 43.5))))
    world = np.asarray(layer.data_to_world((2, 3)))
    np.testing.assert_allclose(world, np.asarray(slide.data_to_world((100 + 2 * s + 3.5, 40 + 3 * s + 3.5))))
    lo, hi = kwargs["contrast_limits"]
    assert lo < hi and kwargs["metadata"]["napari_rapacl"]["gene"] == "G1"


def test_robust_limits():
    assert robust_limits([np.nan, np.nan]) == (0.0, 1.0)
    lo, hi = robust_limits(np.r_[np.arange(100.0), np.nan])
    assert 0.9 < lo < 1.1 and 97.9 < hi < 98.1
    lo, hi = robust_limits([3.0, 3.0])
    assert hi > lo == 3.0


@pytest.mark.gui
def test_gl_renderer_is_detected(qapp, monkeypatch):
    """Xvfb gives Mesa's llvmpipe: software rendering (the widgets then skip napari's animated
    activity bars, see _JobWidget.show_progress); a GPU driver's name is not software."""
    from napari_rapacl._napari import _common

    name = _common.gl_renderer()
    assert name, "no OpenGL renderer found"
    assert _common.software_rendering() == ("llvmpipe" in name.lower() or "swrast" in name.lower())
    for fake, soft in (("NVIDIA H200/PCIe/SSE2", False), ("llvmpipe (LLVM 15.0.6, 256 bits)", True)):
        monkeypatch.setattr(_common, "gl_renderer", lambda fake=fake: fake)
        assert _common.software_rendering() is soft


# --------------------------------------------------------------------------------------------
# Genes widget (synthetic spots, real viewer)
# --------------------------------------------------------------------------------------------
@pytest.mark.gui
def test_gene_widget_search_colours_limits_and_colour_bar(make_napari_viewer, qtbot):
    from napari_rapacl._napari._widgets import GeneWidget

    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(0)
    n = 50
    features = pd.DataFrame(
        {
            "barcode": [f"s{i}" for i in range(n)],
            "radius_px": 5.0,
            "ERBB2": np.linspace(0, 10, n).astype(np.float32),
            "GAPDH": rng.normal(size=n).astype(np.float32),
            "COL1A1": np.r_[np.full(n - 5, np.nan), np.arange(5.0)].astype(np.float32),
            "n_nuclei": rng.integers(0, 30, n).astype(float),
        }
    )
    points = viewer.add_points(
        rng.uniform(0, 500, (n, 2)),
        features=features,
        size=10,
        metadata={"napari_rapacl": {"genes": ["ERBB2", "GAPDH", "COL1A1"]}},
    )
    widget = GeneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._layer.value = points
    # the predicted genes (model order: no validation scores); spot radiomics under their own heading
    assert list(widget._gene.choices) == ["ERBB2", "GAPDH", "COL1A1"]
    assert widget.status.startswith("no validation scores stored in this checkpoint")
    widget._show.value = "spot radiomics"
    assert list(widget._gene.choices) == ["n_nuclei"]
    widget._show.value = "predicted genes"
    widget._search.value = "gap"
    assert list(widget._gene.choices) == ["GAPDH"] and widget._gene.value == "GAPDH"
    assert points._face.color_properties.name == "GAPDH"
    widget._search.value = "E"
    assert list(widget._gene.choices) == ["ERBB2"]
    # a gene the model does not predict is answered as such, with the genes it does predict
    widget._search.value = "esr1"
    assert widget.status == "ESR1 is not predicted by this model; these are: ERBB2, GAPDH, COL1A1"
    widget._search.value = "E"
    widget._gene.value = "ERBB2"
    lo, hi = widget.limits
    assert lo == pytest.approx(0.1, abs=0.01) and hi == pytest.approx(9.9, abs=0.01)  # 1st/99th pct
    assert points.face_contrast_limits == pytest.approx((lo, hi), abs=1e-6)
    top = points.face_color[np.argmax(features["ERBB2"])]
    np.testing.assert_allclose(top[:3], [0.993, 0.906, 0.144], atol=0.01)  # viridis' yellow end

    # typed limits override the automatic ones; the colour bar follows colormap and limits
    widget._cmap.value = "magma"
    widget._hi.value = 20.0
    assert not widget._auto.value and points.face_contrast_limits[1] == pytest.approx(20.0)
    bar = widget.colorbar
    assert bar.hi.text() == "20" and bar.title.text() == "ERBB2, log1p(CP10k)"
    assert not bar.bar.pixmap().isNull()
    np.testing.assert_array_equal(bar.rgb[0, 0], [0, 0, 4])  # magma starts black
    np.testing.assert_array_equal(bar.rgb[0, -1], [252, 253, 191])  # ... and ends pale yellow
    widget._auto.value = True
    assert widget.limits[1] == pytest.approx(9.9, abs=0.01)

    # spots without a value are hollow grey rings, the others filled with a white outline (outside
    # viridis); napari's own colour bar is on by default and toggles; the name says gene and unit
    widget._search.value = ""
    widget._cmap.value = "viridis"
    widget._gene.value = "COL1A1"
    assert np.all(points.face_color[: n - 5, 3] == 0) and np.all(points.face_color[n - 5 :, 3] == 1)
    np.testing.assert_allclose(points.border_color[: n - 5, :3], 180 / 255, atol=0.01)
    np.testing.assert_allclose(points.border_color[n - 5 :], 1.0)
    # the rings are thicker than the outlines of the filled discs (visible at whole-slide zoom)
    assert points.border_width_is_relative
    np.testing.assert_allclose(points.border_width[: n - 5], NOT_PREDICTED_BORDER)
    np.testing.assert_allclose(points.border_width[n - 5 :], SPOT_BORDER)
    assert NOT_PREDICTED_BORDER >= 2.5 * SPOT_BORDER
    assert points.name == "Points predicted: COL1A1, log1p(CP10k)"
    text = viewer.canvas.overlays.text
    assert text.visible and text.text == points.name
    assert widget.legend == "filled discs: 5/50 spots with a value; grey rings: not predicted yet"
    widget._napari_bar.value = True  # on by default unless OpenGL renders on the CPU
    assert points.face_colorbar.visible
    widget._napari_bar.value = False
    assert not points.face_colorbar.visible
    widget._napari_bar.value = True
    assert points.face_colorbar.visible
    # fill opacity: 0.6 by default here too (the tissue shows), changed from the widget
    assert widget._opacity.value == pytest.approx(points.opacity)
    widget._opacity.value = 0.3
    assert points.opacity == pytest.approx(0.3)
    # hovering a spot shows its id and the coloured gene's value only (not every feature column)
    i = n - 1
    status = points.get_status(tuple(points.data[i]), world=False)["coordinates"]
    assert f"spot s{i}" in status and "COL1A1 predicted = 4 log1p(CP10k)" in status
    assert "GAPDH" not in status and "n_nuclei" not in status and "radius_px" not in status
    status = points.get_status(tuple(points.data[0]), world=False)["coordinates"]
    assert "COL1A1: not predicted yet" in status

    # spots coloured elsewhere (the Predict widget) show up here, colour bar included
    from napari_rapacl._napari._widgets import apply_gene_colors

    apply_gene_colors(points, "GAPDH", "plasma", (-1.0, 1.0))
    assert widget._gene.value == "GAPDH" and widget._cmap.value == "plasma"
    assert widget.limits == (-1.0, 1.0) and widget.colorbar.title.text() == "GAPDH, log1p(CP10k)"
    # the list follows the layer's features (a prediction landing in them) without recolouring
    points.metadata = {"napari_rapacl": {"genes": ["MKI67", "ERBB2", "GAPDH", "COL1A1"]}}
    points.features = features.assign(MKI67=np.ones(n, np.float32))
    assert "MKI67" in widget._gene.choices
    assert points._face.color_properties.name == "GAPDH" and widget._gene.value == "GAPDH"


# --------------------------------------------------------------------------------------------
# Predict / Export on a real section: cancel, responsiveness
# --------------------------------------------------------------------------------------------
@pytest.fixture
def her2st_viewer(make_napari_viewer, data_dir):
    if timm is None:
        pytest.skip("prediction needs torch and timm (pip install 'napari-rapacl[torch]')")
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 1000)
    viewer.open_sample("napari-rapacl", "her2st_c2")
    return viewer, viewer.layers["her2st C2"], viewer.layers["her2st C2 spots"]


def _predict_widget(viewer, image, points, scope="all spots", model="stnet"):
    from napari_rapacl._napari._widgets import PredictWidget

    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Predict expression")
    widget._image.value, widget._spots.value = image, points
    widget._model.value, widget._scope.value, widget._device.value = model, scope, "cpu"
    return widget


@pytest.mark.gui
@pytest.mark.realdata
def test_cancel_predict_mid_run_leaves_nothing(her2st_viewer, qtbot, tmp_path):
    """Cancel after the first tile of a whole-slide prediction with the baseline (resnet18, 224 px):
    the spots keep their features, no dense layer appears, no metadata changes; the cache holds whole
    tiles only."""
    viewer, image, points = her2st_viewer
    before = points.features.copy()
    meta_before = dict(points.metadata["napari_rapacl"])
    n_layers = len(viewer.layers)
    widget = _predict_widget(viewer, image, points)
    seen = []

    def on_progress(p):
        seen.append(p)
        if p.stage == "predict" and p.done >= 1:
            widget.cancel()

    widget.show_progress = True  # napari's activity dock, whatever the OpenGL renderer
    worker = widget.start()
    assert worker is not None
    worker.yielded.connect(on_progress)
    assert worker.pbar is not None  # the job's bar in the activity dock
    aborted = []
    worker.aborted.connect(lambda: aborted.append(True))
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    total = max(p.total for p in seen if p.stage == "predict")
    assert total >= 4, "the test needs several tiles to cancel between them"
    assert aborted and widget.last_result is None
    assert max(p.done for p in seen if p.stage == "predict") < total
    pd.testing.assert_frame_equal(points.features, before)
    assert points.metadata["napari_rapacl"] == meta_before
    assert len(viewer.layers) == n_layers
    assert "cancelled" in widget.status
    assert 1 <= len(widget.cache) < total and widget._run.enabled
    assert worker.pbar.total == total and 1 <= worker.pbar.n < total  # the bar followed the tiles

    # exporting the layer (nothing predicted) fails cleanly and writes no file
    from napari_rapacl._napari._widgets import ExportWidget

    export = ExportWidget(viewer)
    export._spots.value = points
    out = tmp_path / "nothing.h5ad"
    export._path.value = str(out)
    assert export.start() is None
    assert not out.exists() and "no predicted genes" in export.status
    assert not list(tmp_path.iterdir())


@pytest.mark.gui
@pytest.mark.realdata
def test_export_cancelled_before_writing_leaves_no_file(her2st_viewer, qtbot, tmp_path):
    from napari_rapacl._napari._widgets import ExportWidget

    viewer, image, points = her2st_viewer
    genes = ["G1", "G2"]
    values = np.random.default_rng(0).normal(size=(len(points.data), 2)).astype(np.float32)
    points.features = merge_columns(points.features, np.arange(len(values)), values, genes)
    points.metadata = {
        **points.metadata,
        "napari_rapacl": {**points.metadata["napari_rapacl"], "genes": genes},
    }
    widget = ExportWidget(viewer)
    widget._spots.value = points
    out = tmp_path / "cancelled.h5ad"
    widget._path.value = str(out)
    assert widget.start() is not None
    widget.cancel()  # before the worker reaches its second yield (the AnnData is built in between)
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert not out.exists() and widget.written is None and "cancelled" in widget.status
    assert not list(tmp_path.iterdir()), "a temporary file was left behind"
    # the same export, not cancelled, writes the file
    out2 = tmp_path / "done.h5ad"
    widget._path.value = str(out2)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert out2.is_file() and widget.written == out2 and str(out2) in widget.status
    assert [p.name for p in tmp_path.iterdir()] == ["done.h5ad"]


@pytest.mark.gui
@pytest.mark.realdata
def test_ui_thread_keeps_running_while_predicting(her2st_viewer, qtbot):
    """A QTimer ticking every 20 ms in the UI thread keeps firing while the baseline predicts the
    spots of a 1500 px view in the worker."""
    from qtpy.QtCore import QTimer

    from napari_rapacl._napari._widgets import software_rendering

    viewer, image, points = her2st_viewer
    mpp = image.metadata["napari_rapacl"]["mpp"]
    from napari_rapacl._napari._widgets import viewer_camera

    cam = viewer_camera(viewer)
    cam.center = (0, *(np.median(points.data, axis=0) * mpp))
    cam.zoom = viewer.canvas.size[1] / (1500 * mpp)
    qtbot.wait(300)
    widget = _predict_widget(viewer, image, points, scope="visible region")
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    worker = widget.start()
    # the default: an activity-dock bar unless OpenGL renders on the CPU (see _JobWidget.show_progress)
    assert (getattr(worker, "pbar", None) is None) == software_rendering()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    t1 = time.perf_counter()
    timer.stop()
    during = np.array([t for t in ticks if t0 <= t <= t1])
    duration = t1 - t0
    assert duration > 1.0, "the prediction was too short to tell anything"
    gaps = np.diff(np.r_[t0, during, t1])
    print(f"UI ticks: {len(during)} in {duration:.2f} s, longest gap {gaps.max():.3f} s")
    assert len(during) >= 5 * duration, (len(during), duration)  # >= 5 ticks per second of work
    assert gaps.max() < 1.0, f"the UI thread was blocked for {gaps.max():.2f} s"
    genes = points.metadata["napari_rapacl"]["genes"]
    done = np.isfinite(points.features[genes].to_numpy()).all(axis=1)
    assert done.sum() == len(widget.last_result.index) >= 10  # the view's spots were predicted


@pytest.mark.gui
@pytest.mark.realdata
def test_predict_shows_the_view_before_completing_its_tiles(her2st_viewer, qtbot):
    """The view's spots are coloured as soon as they are predicted, before the other spots of the
    tiles around the view; a cancel then keeps them (consistent: every spot of the view) and caches no
    incomplete tile; a full run gives the same values and fills the cache."""
    from napari_rapacl._napari._widgets import viewer_camera
    from napari_rapacl._napari.layers import spots_in_box

    viewer, image, points = her2st_viewer
    widget = _predict_widget(viewer, image, points, scope="visible region")
    qtbot.wait(300)  # the dock settles the canvas size, then the view is set: it stays for every run
    mpp = image.metadata["napari_rapacl"]["mpp"]
    cam = viewer_camera(viewer)
    cam.center = (0, *(np.median(points.data, axis=0) * mpp))
    cam.zoom = viewer.canvas.size[1] / (1500 * mpp)
    qtbot.wait(300)
    from qtpy.QtCore import Qt

    shown, cached_then = [], []

    def on_progress(p):  # queued, in the UI thread: the widget's slot (connected first) has applied it
        if p.result is not None:
            genes = points.metadata["napari_rapacl"]["genes"]
            shown.append((p.result, points.features[genes].to_numpy().copy()))

    def in_worker(p):  # direct, in the worker thread, before it goes on: what "Cancel" does, at once
        if p.result is not None:
            cached_then.append(len(widget.cache))
            worker.quit()

    worker = widget.start()
    worker.yielded.connect(in_worker, Qt.ConnectionType.DirectConnection)
    worker.yielded.connect(on_progress)
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert len(shown) == 1, "no partial result was shown"
    part, values = shown[0]
    box = part.box
    in_view = spots_in_box(points.data, box)
    np.testing.assert_array_equal(part.index, in_view)
    assert len(in_view) >= 10 and part.partial
    finite = np.isfinite(values).all(axis=1)
    assert finite[in_view].all() and finite.sum() == len(in_view)  # exactly the view, nothing else
    np.testing.assert_array_equal(values[in_view], part.values)
    assert cached_then == [0]  # handed out before the first tile was complete
    assert "cancelled after the" in widget.status and widget.last_result is None
    assert len(widget.cache) == 0  # the tiles around the view were not completed: none cached
    # kept after the cancel: the view, coloured
    kept = points.features[points.metadata["napari_rapacl"]["genes"]].to_numpy()
    np.testing.assert_array_equal(kept[in_view], part.values)
    assert len(np.unique(points.face_color[in_view].round(3), axis=0)) > 1

    # the same view to the end: same values, the tiles complete in the cache, a rerun only reads it
    n_cached = len(widget.cache)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    res = widget.last_result
    np.testing.assert_array_equal(res.index, in_view)
    np.testing.assert_allclose(res.values, part.values, atol=1e-5, rtol=0)
    assert res.tiles_computed + res.tiles_cached >= 1 and res.tiles_cached == n_cached
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert widget.last_result.tiles_computed == 0 and "0 tiles computed" in widget.status


@pytest.mark.gui
@pytest.mark.realdata
def test_load_widget_opens_files_and_the_sample(make_napari_viewer, qtbot, data_dir, tmp_path):
    from napari_rapacl._napari._widgets import SAMPLE, LoadWidget

    viewer = make_napari_viewer(show=True)
    widget = LoadWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Open slide and spots")
    jpg = data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    selection = data_dir / "her2st/data/ST-spotfiles/C2_selection.tsv"

    widget._slide.value = str(tmp_path / "absent.svs")
    assert widget.start() is None and "slide not found" in widget.status and not len(viewer.layers)
    widget._slide.value, widget._spots.value = str(jpg), str(selection)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    image, points = viewer.layers["C2"], viewer.layers["C2 spots"]  # named by section (#13)
    assert image.multiscale and image.rgb and len(points.data) == 187
    mpp = image.metadata["napari_rapacl"]["mpp"]
    assert tuple(image.scale) == tuple(points.scale) == (mpp, mpp) and 0.5 < mpp < 2
    assert tuple(str(u) for u in image.units) == ("micrometer", "micrometer")
    np.testing.assert_allclose(points.size, 2 * points.features["radius_px"].to_numpy())  # data px
    assert "187 spots" in widget.status and "µm/px (from the spot grid)" in widget.status
    # the spots sit on the tissue: mean intensity under them darker than the slide's background
    level = image.data[-1]
    ds = image.downsample_factors[-1][0]
    r, c = (points.data / ds).astype(int).T
    under = np.asarray(level)[r, c].mean()
    assert under < np.asarray(level).mean(), "spots not on the tissue"
    # a ROI drawn in a new Shapes layer (napari's default: pixel units) takes the slide's um, so
    # napari keeps the units (no "Inconsistent units across layers"); explicit units are left alone
    roi = viewer.add_shapes([[[0, 0], [100, 100]]], shape_type="rectangle", name="ROI")
    assert tuple(str(u) for u in roi.units) == ("micrometer", "micrometer")
    assert viewer.layers.extent.units is not None
    other = viewer.add_shapes(name="mm", units=("mm", "mm"))
    assert tuple(str(u) for u in other.units) == ("millimeter", "millimeter")
    viewer.layers.remove(other)

    # a typed pixel size (four decimals kept) wins over the spots' one, for both layers
    widget._mpp.value = 0.2527
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    image, points = viewer.layers["C2"], viewer.layers["C2 spots"]  # named by section (#13)
    assert tuple(image.scale) == tuple(points.scale) == pytest.approx((0.2527, 0.2527))
    assert image.metadata["napari_rapacl"]["mpp_source"] == "caller"

    # the her2st sample
    widget._source.value = SAMPLE
    assert not widget._slide.visible and widget._section.visible
    widget._section.value = "C3"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert "her2st C3" in viewer.layers and "her2st C3 spots" in viewer.layers
    assert viewer.layers["her2st C3"].metadata["napari_rapacl"]["mpp_source"] == "spot-grid"


@pytest.mark.gui
@pytest.mark.realdata
def test_cells_widget_runs_cellpose_from_a_local_model_on_a_roi(her2st_viewer, qtbot, tmp_path, monkeypatch):
    """The Cells widget's cellpose option: a local model file (random weights, saved with cellpose's
    own tools; nothing is downloaded) runs through the real cellpose API on a drawn ROI."""
    pytest.importorskip("cellpose")
    import torch
    from cellpose import models

    import napari_rapacl.segmentation as seg
    from napari_rapacl._napari._widgets import ROI, CellsWidget
    from napari_rapacl.segmentation import _cellpose

    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "cellpose-models"))
    monkeypatch.setenv("NAPARI_RAPACL_OFFLINE", "1")
    torch.manual_seed(0)
    model_file = tmp_path / "random_cp"
    models.CellposeModel(gpu=False, pretrained_model=False).net.save_model(str(model_file))
    seg.clear_cellpose_cache()
    loaded = []
    real = seg.load_cellpose_model
    # patched where segment_nuclei's cellpose path looks it up
    monkeypatch.setattr(
        _cellpose, "load_cellpose_model", lambda m, *a, **k: loaded.append(m) or real(m, *a, **k)
    )

    viewer, image, points = her2st_viewer
    mpp = image.metadata["napari_rapacl"]["mpp"]
    cy, cx = np.median(points.data, axis=0)
    x0, y0 = int(cx) - 128, int(cy) - 128
    rect = np.array([[y0, x0], [y0 + 256, x0 + 256]], float) * mpp  # world (um)
    widget = CellsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cells")
    roi = viewer.add_shapes([rect], shape_type="rectangle", name="ROI", face_color="transparent")
    assert viewer.layers.extent.units is not None  # the ROI took the slide's um
    widget._image.value, widget._scope.value, widget._roi.value = image, ROI, roi
    assert widget._cp_model.native.isHidden()
    from napari_rapacl._napari._cells import CELLPOSE_FILE

    widget._method.value = CELLPOSE_FILE
    assert not widget._cp_model.native.isHidden()  # the model file picker shows for a cellpose file
    widget._radiomics.value = False

    widget._cp_model.value = str(tmp_path / "no_such_model")
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert "error" in widget.status and "no_such_model" in widget.status
    assert not [lyr for lyr in viewer.layers if lyr.name.startswith("nuclei")]

    widget._cp_model.value = str(model_file)
    n_layers = len(viewer.layers)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert [str(m) for m in loaded] and all(str(m) == str(model_file) for m in loaded)
    # random weights find no nucleus on this tissue: said so, with other methods to try; no layer
    assert widget.labels_layer is None and len(viewer.layers) == n_layers
    assert (
        widget.status.startswith("no nuclei found on tissue (")
        and "segmentation failed here" in widget.status
    )
    assert "Try the classical method, another cellpose model" in widget.status

    # the classical method on the same ROI: outlines placed on the slide, named by section and ROI
    widget._method.value = "classical"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    layer = widget.labels_layer
    assert layer is not None, widget.status
    info = layer.metadata["napari_rapacl"]
    bx0, by0, bx1, by1 = info["box"]  # the ROI, to the pixel (um -> px rounding)
    assert info["method"] == "classical"
    np.testing.assert_allclose(info["box"], (x0, y0, x0 + 256, y0 + 256), atol=1)
    lab = np.asarray(layer.data)
    assert lab.shape == (by1 - by0, bx1 - bx0) and lab.dtype == np.int32
    assert tuple(layer.translate) == pytest.approx((by0 * mpp, bx0 * mpp))
    assert "nuclei, median area" in widget.status and "µm²" in widget.status
    assert layer.name == "C2 nuclei (ROI 1)" and layer.contour == 2


@pytest.mark.gui
@pytest.mark.realdata
def test_predict_widget_builds_the_chosen_model_in_the_background(
    her2st_viewer, qtbot, tmp_path, monkeypatch
):
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    viewer, image, points = her2st_viewer
    widget = _predict_widget(viewer, image, points, scope="visible region")
    # the picker offers what a user can run: the production models, not the *_tiny test variants
    from napari_rapacl.jobs import user_models

    choices = set(widget._model.choices)
    assert choices == set(user_models()) and {"nh2st", "pixnet", "rapacl", "stnet"} <= choices
    assert not [c for c in choices if c.endswith("_tiny")]
    ckpt = save_checkpoint(tmp_path / "tiny.pt", create_model("stnet_tiny", n_genes=3), genes=["A", "B", "C"])
    widget._checkpoint.value = str(ckpt)
    first = widget.preloaded  # started when the checkpoint was chosen
    assert widget._preload_key[:2] == ("checkpoint", str(ckpt.resolve()))
    qtbot.waitUntil(first.done, timeout=120_000)
    loaded = first.result()
    assert loaded.name == "stnet_tiny" and hasattr(loaded.model, "_rapacl_model_key")  # hashed too
    import torch

    from napari_rapacl.inference import _FROZEN

    # and, for a CPU, its frozen predictor built
    assert (loaded.model in _FROZEN) == (not torch.cuda.is_available())
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    res = widget.last_result
    assert res.loaded is loaded and res.seconds["load"] < 0.5  # the click did not build a model
    # another model: built in the background as soon as it is picked
    widget._checkpoint.value = ""
    widget._model.value = "nh2st"
    widget._model.value = "stnet"
    assert widget.preloaded is not first and widget._preload_key == ("registry", "stnet")
    # a checkpoint that is not there: nothing is built, Predict says why
    widget._checkpoint.value = str(tmp_path / "missing.pt")
    assert widget._preload_key == ("registry", "stnet")
    assert widget.start() is None and "checkpoint not found" in widget.status
    qtbot.waitUntil(widget.preloaded.done, timeout=120_000)
    # a model installed in the user's folder (the main job's) is what a new Predict widget opens on
    from napari_rapacl._napari._widgets import PredictWidget
    from napari_rapacl.jobs import install_model

    monkeypatch.setenv("NAPARI_RAPACL_MODELS_DIR", str(tmp_path / "models"))
    install_model(ckpt, "my-her2st-model", description="test", training={"train": ["C3"]})
    again = PredictWidget(viewer)
    assert again._model.value == "my-her2st-model" and again._model.choices[0] == "my-her2st-model"
    qtbot.waitUntil(again.preloaded.done, timeout=120_000)
    assert again.preloaded.result().genes == ["A", "B", "C"]


@pytest.mark.gui
@pytest.mark.realdata
def test_widget_messages_speak_to_people(her2st_viewer, qtbot, tmp_path):
    """The refusals a pathologist reads: rounded µm, the field names shown, a next step each."""
    import torch

    from napari_rapacl._napari._widgets import ROI, ExportWidget

    viewer, image, points = her2st_viewer
    mpp = image.metadata["napari_rapacl"]["mpp"]
    widget = _predict_widget(viewer, image, points, scope=ROI)
    # an ROI on glass: no job, "no spots in this ROI" with its size and place in µm, and what to do
    roi = viewer.add_shapes(
        [np.array([[10, 10], [310, 410]], float) * mpp], shape_type="rectangle", name="ROI", units=image.units
    )
    widget._roi.value = roi
    assert widget.start() is None
    import re

    m = re.fullmatch(
        r"no spots in this ROI \((\d+) x (\d+) µm at \((\d+), (\d+)\) µm\): draw the ROI over the spots, "
        r"or choose 'all spots'",
        widget.status,
    )
    assert m, widget.status
    w, h, x, y = (int(v) for v in m.groups())
    assert abs(w - 400 * mpp) <= 2 and abs(h - 300 * mpp) <= 2
    assert abs(x - 10 * mpp) <= 1 and abs(y - 10 * mpp) <= 1
    assert "(-" not in widget.status and "." not in widget.status.split("µm")[0]
    # the dense-map box follows the model: off and disabled for a model without a dense head
    widget._model.value = "stnet"
    assert not widget._dense.enabled and not widget._dense.value
    widget._model.value = "pixnet"
    assert widget._dense.enabled and widget._dense.value
    widget._model.value = "stnet"

    # a .pt that is not a napari-rapacl checkpoint: named, with the reason and a next step
    bogus = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, bogus)
    widget._scope.value = "all spots"
    widget._checkpoint.value = str(bogus)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.status.startswith("prediction failed: ") and "weights.pt" in widget.status
    assert "is not a napari-rapacl checkpoint" in widget.status and "training.run" in widget.status

    # Export: each refusal names the field and the next step
    export = ExportWidget(viewer)
    export._spots.value = points
    assert export.start() is None
    assert export.status == "choose a file to write, ending in .h5ad (AnnData for scanpy/squidpy)"
    export._path.value = str(tmp_path / "out.h5ad")
    assert export.start() is None
    assert export.status == (
        f"cannot export: layer {points.name!r} holds no predicted genes yet: run Predict on it first"
    )
    export._what.value = "nuclei: cell table (.h5ad / .csv)"
    assert export.start() is None
    assert export.status == "choose a nuclei layer: run Cells (Segment) first, then pick its layer here"


@pytest.mark.gui
@pytest.mark.realdata
def test_cells_widget_offers_and_builds_the_project_nucleus_model(
    make_napari_viewer, qtbot, data_dir, tmp_path, monkeypatch, cellpose_models
):
    """Offline with no model built: the method list names the project's model as not built, Segment
    refuses it with the next step, 'Build the nucleus model' runs the real build job (a few steps on
    three TNBC crops here), after which the model is chosen by name and segments a ROI."""
    pytest.importorskip("cellpose")
    from napari_rapacl import segmentation as seg
    from napari_rapacl._napari import _cells
    from napari_rapacl._napari._widgets import ROI, CellsWidget
    from napari_rapacl.segmentation import _cellpose_train as ct

    tnbc = data_dir / "tnbc_nuclei"
    if not (tnbc / "Slide_01").is_dir():
        pytest.skip(f"TNBC nuclei data not found in {tnbc}")
    monkeypatch.setattr(_cells, "_NAMES", None)  # the cellpose names listed once per process

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-rapacl", "her2st_c2")
    image = next(lyr for lyr in viewer.layers if lyr.metadata["napari_rapacl"].get("kind") == "slide")
    points = next(lyr for lyr in viewer.layers if lyr.metadata["napari_rapacl"].get("kind") == "spots")
    mpp = image.metadata["napari_rapacl"]["mpp"]
    widget = CellsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cells")
    name = seg.PROJECT_NUCLEI_MODEL
    not_built = f"cellpose: {name} (not built yet)"
    assert list(widget._method.choices) == ["classical", not_built, "cellpose: a model file..."]
    assert widget._build.native.isHidden()
    widget._method.value = not_built
    assert not widget._build.native.isHidden()
    assert f"{name}, the project's nucleus model, is not built yet" in widget.status
    cy, cx = np.median(points.data, axis=0)
    rect = np.array([[cy - 128, cx - 128], [cy + 128, cx + 128]], float) * mpp
    roi = viewer.add_shapes([rect], shape_type="rectangle", name="ROI", units=image.units)
    widget._image.value, widget._scope.value, widget._roi.value = image, ROI, roi
    widget._radiomics.value = False
    assert widget.start() is None
    assert widget.status == (
        f"cannot segment: {name} is not built yet: click 'Build the nucleus model' first, or choose classical"
    )

    tiles = ct.tnbc_tiles(tnbc, (1, 2))[:3]
    widget.build_settings = {
        "epochs": 1,
        "threads": 1,
        "tiles": tiles,
        "crop": 96,
        "images_per_epoch": 4,
        "batch_size": 2,
        "bsize": 64,
        "stain_copies": 1,
    }
    assert widget.build_model() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert widget.status.startswith("nucleus model built: "), widget.status
    assert seg.project_nuclei_model_built() and widget._method.value == f"cellpose: {name}"
    assert widget._build.native.isHidden()
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    # a few training steps segment little: either outlines with their count, or the failure said
    assert "nuclei, median area" in widget.status or "segmentation failed here" in widget.status, (
        widget.status
    )


def test_export_arguments_carry_validation_r_and_the_counts_measured():
    """A spots layer's validation r (stored by Predict) reaches the exported ``var``; its counts give
    the measured log1p(CP10k) of the predicted genes (what 'measured beside predicted' shows)."""
    import anndata as ad

    from napari_rapacl._napari.layers import export_arguments, measured_expression
    from napari_rapacl.jobs import prediction_adata
    from napari_rapacl.preprocess import normalize_log1p_cp10k

    rng = np.random.default_rng(1)
    n = 6
    counts = ad.AnnData(
        rng.poisson(3.0, size=(n, 4)).astype(np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=["ERBB2", "CD74", "GAPDH", "XIST"]),
    )
    genes = ["CD74", "ERBB2", "MKI67"]  # MKI67 is not in the counts: zeros
    values = rng.normal(size=(n, 3)).astype(np.float32)
    values[0] = np.nan  # spot 0 not predicted yet
    features = pd.DataFrame(
        {"barcode": [f"s{i}" for i in range(n)], "radius_px": 5.0, **dict(zip(genes, values.T, strict=True))}
    )
    info = {
        "genes": genes,
        "mpp": 0.5,
        "library_id": "C9",
        "counts": counts,
        "gene_reliability": {"CD74": 0.4, "ERBB2": 0.21, "MKI67": float("nan"), "OTHER": 0.9},
    }
    meta = {"name": "C9 spots", "features": features, "metadata": {"napari_rapacl": info}}
    data = rng.uniform(0, 100, (n, 2))
    args = export_arguments(data, meta)
    rel = {"CD74": 0.4, "ERBB2": 0.21, "MKI67": np.nan}
    assert args["gene_reliability"] == pytest.approx(rel, nan_ok=True)
    expected = normalize_log1p_cp10k(counts, ["CD74", "ERBB2"])
    measured = measured_expression(counts, genes)
    np.testing.assert_allclose(measured[:, :2], expected, rtol=1e-6)
    assert np.all(measured[:, 2] == 0)
    values_, genes_, spots = args.pop("values"), args.pop("genes"), args.pop("spots")
    adata = prediction_adata(values_, genes_, spots, **args)
    assert list(adata.obs_names) == [f"s{i}" for i in range(1, n)]
    np.testing.assert_allclose(adata.var["val_pearson_r"].to_numpy(), [0.4, 0.21, np.nan])


def test_export_writes_measured_beside_predicted(tmp_path):
    """When the spots' counts hold every predicted gene, the export of a spots layer carries the measured
    log1p(CP10k) in ``layers['measured']`` beside the predictions in ``X`` (read back from the file)."""
    import anndata as ad

    from napari_rapacl._napari.layers import export_arguments
    from napari_rapacl.jobs import iter_export
    from napari_rapacl.preprocess import normalize_log1p_cp10k
    from napari_rapacl.progress import run_to_completion

    rng = np.random.default_rng(2)
    n = 5
    counts = ad.AnnData(
        rng.poisson(4.0, size=(n, 3)).astype(np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=["ERBB2", "CD74", "GAPDH"]),
    )
    genes = ["CD74", "ERBB2"]
    values = rng.normal(size=(n, 2)).astype(np.float32)
    features = pd.DataFrame(
        {"barcode": [f"s{i}" for i in range(n)], "radius_px": 5.0, **dict(zip(genes, values.T, strict=True))}
    )
    info = {"genes": genes, "mpp": 0.5, "library_id": "C9", "counts": counts}
    args = export_arguments(
        rng.uniform(0, 100, (n, 2)),
        {"name": "C9 spots", "features": features, "metadata": {"napari_rapacl": info}},
    )
    out = run_to_completion(iter_export(tmp_path / "c9.h5ad", **args))
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.X, values, rtol=1e-6)
    np.testing.assert_allclose(back.layers["measured"], normalize_log1p_cp10k(counts, genes), rtol=1e-5)
