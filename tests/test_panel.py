"""The RaPaCL panel in a real napari window (issue #13): one dock that fits 1366 x 768 and 1920 x 1080
beside napari's layer list, progress bars with an estimate inside it, questions before long jobs,
opening like napari users expect (File > Open, pixel size asked), mistakes caught at open, and the
messages people read. Screenshots go to test-artifacts/ (look at them).

GUI tests need a display: ``xvfb-run -a -s "-screen 0 1920x1200x24"`` (scripts/test.sh uses Xvfb).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

try:  # torch's stack before any viewer's GL context exists (see _napari._env.avoid_llvm_clash)
    import timm  # noqa: F401
except ImportError:
    timm = None

pytestmark = pytest.mark.gui

SIZES = [(1366, 768), (1920, 1080)]


def _save(viewer, path):
    from PIL import Image

    Image.fromarray(np.asarray(viewer.screenshot(canvas_only=False, flash=False))).save(path)
    return path


@pytest.fixture
def quiet_settings():
    """napari's settings kept in memory: the reader preference the panel sets is not saved to disk."""
    from napari.settings import get_settings

    settings = get_settings()
    settings._save_on_change = False
    yield settings
    settings._save_on_change = True


def _window(make_napari_viewer, size):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*size)
    return viewer


def _panel(viewer, qtbot):
    from napari_rapacl._napari._panel import RapaclPanel

    panel = RapaclPanel(viewer)
    dock = viewer.window.add_dock_widget(panel, name="RaPaCL panel", area="right")
    qtbot.wait(50)
    return panel, dock


def _inside(inner, outer) -> bool:
    return (
        inner.left() >= outer.left()
        and inner.top() >= outer.top()
        and inner.right() <= outer.right()
        and inner.bottom() <= outer.bottom()
    )


def _open(panel, qtbot, slide=None, spots=None, sample=None):
    from napari_rapacl._napari._widgets import FILES, SAMPLE

    load = panel.show_tab("Open")
    if sample is not None:
        load._source.value, load._section.value = SAMPLE, sample
    else:
        load._source.value = FILES
        load._slide.value, load._spots.value = str(slide), str(spots) if spots else ""
    assert load.start() is not None, load.status
    panel._mark_running()  # (what the panel's timer does every 0.3 s)
    assert panel.tabs.tabText(0) == "Open ●"  # a running job is marked on its tab
    qtbot.waitUntil(lambda: not load.busy, timeout=120_000)
    panel._mark_running()
    assert panel.tabs.tabText(0) == "Open"
    return load


# --------------------------------------------------------------------------------------------
# one panel that fits the screen
# --------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_panel_fits_the_window_beside_the_layer_list(
    make_napari_viewer, qtbot, data_dir, artifacts_dir, quiet_settings, size
):
    viewer = _window(make_napari_viewer, size)
    panel, dock = _panel(viewer, qtbot)
    _open(panel, qtbot, sample="C2")
    window = viewer.window._qt_window
    qtbot.wait(200)
    assert (window.width(), window.height()) == size  # the window really has the screen's size
    assert list(panel.widgets) == ["Open", "Cells", "Predict", "Genes", "Export"]
    # the whole dock lies inside the window, and napari's layer list is still shown beside it
    frame = window.rect()
    dock_rect = dock.geometry()
    assert _inside(dock_rect, frame), (dock_rect, frame)
    layer_list = viewer.window._qt_viewer.dockLayerList
    assert layer_list.isVisible() and not dock_rect.intersects(layer_list.geometry())
    assert dock_rect.width() <= 0.4 * size[0]  # the canvas keeps most of the width
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.4 * size[0] and canvas.height() >= 0.5 * size[1]
    # every tab is reachable: its content fits the dock or scrolls (no control cut off)
    for i, (title, widget) in enumerate(panel.widgets.items()):
        panel.tabs.setCurrentIndex(i)
        qtbot.wait(30)
        scroll = panel.tabs.currentWidget()
        need, have = widget.native.sizeHint().height(), scroll.viewport().height()
        bar = scroll.verticalScrollBar()
        assert need <= have or bar.maximum() > 0, (title, need, have)
        assert _inside(scroll.geometry(), panel.tabs.rect())
        assert scroll.horizontalScrollBar().maximum() == 0  # nothing hidden to the right
        if size == SIZES[0]:
            _save(viewer, artifacts_dir / f"panel_{size[0]}x{size[1]}_{title.lower()}.png")
    panel.show_tab("Open")
    qtbot.wait(300)
    path = _save(viewer, artifacts_dir / f"panel_{size[0]}x{size[1]}.png")
    assert path.stat().st_size > 10_000
    # the Open tab's controls fit without scrolling at either size
    load = panel.widgets["Open"]
    assert load.native.sizeHint().height() <= panel.tabs.currentWidget().viewport().height()
    assert "her2st C2" in viewer.layers and "her2st C2 spots" in viewer.layers


def test_each_widget_still_reachable_alone_from_the_plugins_menu():
    import yaml

    from napari_rapacl._napari import _panel

    manifest = yaml.safe_load(
        (__import__("pathlib").Path(_panel.__file__).parents[1] / "napari.yaml").read_text()
    )
    names = [w["display_name"] for w in manifest["contributions"]["widgets"]]
    assert names[0] == "RaPaCL panel"
    assert names[1:] == ["Open slide and spots", "Cells", "Predict expression", "Gene colours", "Export"]
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    assert commands["napari-rapacl.panel_widget"] == "napari_rapacl._napari._panel:RapaclPanel"


# --------------------------------------------------------------------------------------------
# progress you can see; long jobs ask first
# --------------------------------------------------------------------------------------------
def _slow_job(n, delay):
    from napari_rapacl.progress import Progress

    for i in range(n):
        time.sleep(delay)
        yield Progress("segment", i + 1, n)
    return n


def test_progress_bar_with_elapsed_and_time_left_and_questions_before_long_jobs(
    make_napari_viewer, qtbot, artifacts_dir
):
    from napari_rapacl._napari._common import _JobWidget
    from napari_rapacl.jobs._estimate import estimate

    class Job(_JobWidget):  # the base class's mechanism, as Cells/Predict/Export use it
        def __init__(self, viewer):
            self._viewer = viewer
            super().__init__(widgets=self._init_job())
            self.done, self.seen = [], []

        def _say(self, text):  # what the status line shows, with the bar's state at that moment
            super()._say(text)
            self.seen.append((text, self.progress_bar.value, self.progress_bar.max))

        def start(self, *_):
            return None

    viewer = make_napari_viewer(show=True)
    job = Job(viewer)
    viewer.window.add_dock_widget(job, name="job")
    qtbot.waitUntil(lambda: job.native.isVisible(), timeout=5000)
    seen = job.seen
    assert not job.progress_bar.visible
    worker = job._launch(_slow_job, 8, 0.15, desc="nuclei", on_done=job.done.append)
    assert worker is not None and job.progress_bar.visible
    qtbot.waitUntil(lambda: job.progress_bar.value >= 4, timeout=20_000)
    _save(viewer, artifacts_dir / "panel_progress.png")
    qtbot.waitUntil(lambda: not job.busy, timeout=20_000)
    assert job.done == [8] and not job.progress_bar.visible
    texts = [t for t, _, _ in seen if t.startswith("segment:")]
    assert texts, seen
    assert any("elapsed" in t and "left" in t for t in texts), texts  # an estimate while it runs
    assert texts[-1].startswith("segment: 8/8") and "left" not in texts[-1]
    assert any(m == 8 and 0 < v < 8 for _, v, m in seen)  # the bar moved through the job
    # a whole-slide job asks first with its estimate: No starts nothing and says what to do instead
    questions = []
    job.confirm = lambda q: questions.append(q) or False
    whole = estimate("cells", area_px=9270 * 9920)
    assert (
        job._launch(
            _slow_job, 2, 0.01, desc="nuclei in the whole slide", on_done=job.done.append, estimate=whole
        )
        is None
    )
    assert questions == [f"nuclei in the whole slide will take {whole.text}. Start it now?"]
    assert "not started" in job.status and "visible region or a drawn ROI" in job.status and not job.busy
    job.confirm = lambda q: True  # Yes: it runs
    assert job._launch(_slow_job, 2, 0.01, desc="whole", on_done=job.done.append, estimate=whole)
    qtbot.waitUntil(lambda: not job.busy, timeout=20_000)
    assert job.done == [8, 2]
    # a short job does not ask
    job.confirm = lambda q: pytest.fail("asked about a short job")
    assert job._launch(
        _slow_job, 1, 0.01, desc="view", on_done=job.done.append, estimate=estimate("cells", area_px=1e6)
    )
    qtbot.waitUntil(lambda: not job.busy, timeout=20_000)


# --------------------------------------------------------------------------------------------
# opening like napari users expect
# --------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_file_open_uses_the_plugin_reader_and_asks_for_a_pixel_size(
    make_napari_viewer, qtbot, data_dir, quiet_settings, monkeypatch
):
    from napari_rapacl._napari import _reader

    jpg = data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    viewer = make_napari_viewer(show=True)
    # before the plugin is used, napari has two readers for a JPEG (its own and ours) and asks
    from napari.errors import MultipleReaderError

    with pytest.raises(MultipleReaderError):  # (the GUI shows napari's reader dialog here)
        viewer.open(str(jpg), plugin=None)
    _panel(viewer, qtbot)  # using the plugin makes it the default for slides the user has not assigned
    prefs = quiet_settings.plugins.extension2reader
    assert {p: prefs[p] for p in ("*.svs", "*.ndpi", "*.ome.tif", "*.jpg", "*.png")} == dict.fromkeys(
        ("*.svs", "*.ndpi", "*.ome.tif", "*.jpg", "*.png"), "napari-rapacl"
    )
    assert prefs["*.SVS"] == prefs["*.JPG"] == "napari-rapacl"  # scanners' upper-case names too
    questions = []
    monkeypatch.setattr(_reader, "ask_pixel_size", lambda q: questions.append(q) or 0.7)
    # what File > Open and drag-and-drop call (no reader dialog: the preference decides)
    viewer.window._qt_viewer._qt_open([str(jpg)], stack=False)
    layer = viewer.layers[-1]
    assert layer.multiscale and tuple(layer.scale) == (0.7, 0.7)
    assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
    assert questions == [
        "5714_HE_BT_C2.jpg carries no pixel size: without it nuclei, spots and scale bars cannot be in µm. "
        "Give its µm / px (about 0.25 for a 40x scan, 0.5 for 20x), or open it with its spot file, which "
        "gives the pixel size."
    ]
    # no answer: opened in pixels, and a warning says so and what to do
    monkeypatch.setattr(_reader, "ask_pixel_size", lambda q: None)
    shown = []
    monkeypatch.setattr(_reader, "_warn", shown.append)
    [bare] = viewer.open(str(jpg), plugin=None)
    assert tuple(bare.scale) == (1.0, 1.0) and bare.metadata["napari_rapacl"]["mpp"] is None
    assert shown == [
        "5714_HE_BT_C2.jpg opened in pixels (no pixel size): open it in the RaPaCL panel's 'Open slide "
        "and spots' with its spot file, or type its µm / px there"
    ]
    # a choice the user made stays theirs
    quiet_settings.plugins.extension2reader = {**prefs, "*.png": "napari"}
    assert "*.png" not in _reader.prefer_plugin_readers()
    assert quiet_settings.plugins.extension2reader["*.png"] == "napari"


@pytest.mark.realdata
def test_load_asks_for_a_pixel_size_when_a_jpeg_opens_without_spots(
    make_napari_viewer, qtbot, data_dir, quiet_settings
):
    jpg = data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    viewer = make_napari_viewer(show=True)
    panel, _ = _panel(viewer, qtbot)
    load = panel.widgets["Open"]
    asked = []
    load.ask_pixel_size = lambda q: asked.append(q) or 0.5
    _open(panel, qtbot, slide=jpg)
    assert len(asked) == 1 and asked[0].startswith("5714_HE_BT_C2.jpg carries no pixel size")
    image = viewer.layers["5714_HE_BT_C2"]
    assert tuple(image.scale) == (0.5, 0.5) and "0.5 µm/px (typed)" in load.status
    load.ask_pixel_size = lambda q: None  # cancelled: shown in pixels, said in the status line
    _open(panel, qtbot, slide=jpg)
    assert tuple(viewer.layers["5714_HE_BT_C2"].scale) == (1.0, 1.0)
    assert "⚠ 5714_HE_BT_C2.jpg is shown in pixels (no pixel size): type its µm / px and press Open" in (
        load.status
    )
    assert "pixel size unknown" in load.status


# --------------------------------------------------------------------------------------------
# mistakes caught at open; a second slide beside the first; messages in µm
# --------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_spots_of_another_section_are_warned_at_open_and_a_second_slide_opens_beside(
    make_napari_viewer, qtbot, data_dir, artifacts_dir, quiet_settings
):
    img_dir, spotfiles = data_dir / "her2st/data/ST-imgs/C", data_dir / "her2st/data/ST-spotfiles"
    viewer = _window(make_napari_viewer, (1366, 768))
    panel, dock = _panel(viewer, qtbot)
    load = _open(panel, qtbot, slide=img_dir / "C2/5714_HE_BT_C2.jpg", spots=spotfiles / "C5_selection.tsv")
    assert len(load.warnings) == 1
    pct = load.warnings[0].split(" %")[0]
    assert 60 <= int(pct) <= 90
    assert load.status.startswith(f"⚠ {pct} % of the spots of C5_selection.tsv (")
    assert "fall on glass in 5714_HE_BT_C2.jpg: they probably belong to another section" in load.status
    # named after the slide (not C5, which it is not), the layers are there for the user to see the misfit
    assert "5714_HE_BT_C2" in viewer.layers and "5714_HE_BT_C2 spots" in viewer.layers
    qtbot.wait(300)
    status = load._status.native
    from qtpy.QtCore import QPoint, QRect

    assert status.isVisible()
    assert _inside(QRect(status.mapTo(dock, QPoint(0, 0)), status.size()), dock.rect())
    assert status.height() >= status.heightForWidth(status.width())  # every line of it shown
    _save(viewer, artifacts_dir / "panel_mismatch_1366x768.png")

    # the right spots on the next section: no warning, named by section, beside the first slide
    load = _open(panel, qtbot, slide=img_dir / "C4/5714_HE_BT_D2.jpg", spots=spotfiles / "C4_selection.tsv")
    assert load.warnings == [] and not load.status.startswith("⚠")
    first, second = viewer.layers["5714_HE_BT_C2"], viewer.layers["C4"]
    right_of_first = first.translate[1] + first.data[0].shape[1] * first.scale[1]
    assert (
        second.translate[1] > right_of_first and viewer.layers["C4 spots"].translate[1] == second.translate[1]
    )
    assert "placed to the right of the slides already open (at x = " in load.status
    # a ROI drawn on the second slide maps to its own pixels (its translate undone)
    from napari_rapacl._napari._common import ROI

    cells = panel.widgets["Cells"]
    mpp = second.scale[1]
    cy, cx = np.median(viewer.layers["C4 spots"].data, axis=0) * mpp  # µm in the slide: on tissue
    y0, x0 = second.translate[0] + cy, second.translate[1] + cx
    roi = viewer.add_shapes([[[y0, x0], [y0 + 200, x0 + 300]]], shape_type="rectangle", name="ROI C4")
    box = cells._region(ROI, second, roi)
    assert box == pytest.approx((cx / mpp, cy / mpp, (cx + 300) / mpp, (cy + 200) / mpp), abs=1.0)
    # nuclei found there sit on the second slide (the layer follows the slide's translate)
    pytest.importorskip("skimage")
    cells._image.value, cells._scope.value, cells._roi.value = second, ROI, roi
    cells._spots.value = None
    cells.confirm = lambda q: pytest.fail(f"asked about a small ROI: {q}")
    assert cells.start() is not None, cells.status
    qtbot.waitUntil(lambda: not cells.busy, timeout=120_000)
    [nuclei] = [lyr for lyr in viewer.layers if lyr.metadata.get("napari_rapacl", {}).get("kind") == "nuclei"]
    x0_um = nuclei.translate[1]
    assert x0_um == pytest.approx(second.translate[1] + box[0] * mpp, abs=2 * mpp)
    assert nuclei.translate[0] == pytest.approx(second.translate[0] + box[1] * mpp, abs=2 * mpp)


def test_region_refusals_speak_rounded_microns_with_a_next_step(make_napari_viewer, qtbot):
    from napari_rapacl._napari._common import ALL, ROI, VISIBLE, _JobWidget

    class Job(_JobWidget):
        def __init__(self, viewer):
            self._viewer = viewer
            super().__init__(widgets=self._init_job())

        def start(self, *_):
            return None

    viewer = make_napari_viewer()
    image = viewer.add_image(
        np.zeros((1000, 2000, 3), np.uint8), rgb=True, scale=(0.5, 0.5), units=("um", "um"), name="C2"
    )
    job = Job(viewer)
    with pytest.raises(ValueError) as err:
        job._region(ROI, image, None)
    assert str(err.value) == (
        "choose a Shapes layer holding the ROI: add a Shapes layer, draw a rectangle over the tissue, "
        "and pick that layer as ROI"
    )
    empty = viewer.add_shapes(name="ROI", units=("um", "um"))
    with pytest.raises(ValueError, match="the Shapes layer 'ROI' holds no ROI: draw a rectangle in it"):
        job._region(ROI, image, empty)
    far = viewer.add_shapes(
        [[[-3000.0001171, -2999.9998829875985], [-2500.2, -2000.4]]], shape_type="rectangle", name="far"
    )
    with pytest.raises(ValueError) as err:
        job._region(ROI, image, far)
    assert str(err.value) == (
        "the ROI in 'far' (x -3,000 to -2,000 µm, y -3,000 to -2,500 µm) lies outside 'C2' "
        "(x 0 to 1,000 µm, y 0 to 500 µm): draw the rectangle over the tissue"
    )
    cam = viewer.camera
    cam.center, cam.zoom = (0, 90_000.4, 50_000.7), 1.0
    with pytest.raises(ValueError) as err:
        job._region(VISIBLE, image, None)
    text = str(err.value)
    assert (
        text.startswith("the view (x ") and "µm, y " in text and "shows none of 'C2' (x 0 to 1,000 µm" in text
    )
    assert text.endswith("pan or zoom to the slide (View > Reset view), or choose 'all spots'")
    assert "." not in text.split("(x ")[1].split(")")[0].replace("View > Reset view", "")  # rounded
    assert job._region(ALL, image, None) == (0, 0, 2000, 1000)
    # a slide opened without a pixel size: the refusal says how to give one (not "pass mpp=...")
    bare = viewer.add_image(
        np.zeros((100, 200, 3), np.uint8),
        rgb=True,
        name="slide",
        metadata={"napari_rapacl": {"kind": "slide", "mpp": None, "path": "/data/scan.jpg"}},
    )
    with pytest.raises(ValueError) as err:
        job._region(ALL, bare, None)
    assert str(err.value) == (
        "scan.jpg has no pixel size, and nuclei and spots are measured in µm: open it again in "
        "'Open slide and spots' with its spot file or its µm / px"
    )


@pytest.mark.realdata
def test_load_refusals_name_the_file_and_the_next_step(
    make_napari_viewer, qtbot, data_dir, tmp_path, quiet_settings
):
    from napari_rapacl._napari._widgets import FILES, LoadWidget

    viewer = make_napari_viewer()
    load = LoadWidget(viewer)
    load._source.value = FILES
    assert load.start() is None
    assert load.status == "choose a slide file (.svs, .tif, .ndpi, .jpg, .png) next to 'slide'"
    load._slide.value = str(tmp_path / "absent.svs")
    assert load.start() is None
    assert load.status == (
        f"cannot open: slide not found: {tmp_path / 'absent.svs'}. Check the path, or choose the file again"
    )
    jpg = data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    load._slide.value, load._spots.value = str(jpg), str(tmp_path)
    assert load.start() is None
    assert load.status == f"cannot open: {tmp_path} is a folder; tick 'spots are a Space Ranger folder'"
    assert load._mpp.label == "µm / px (0: from file)"  # the field's name as the user sees it
    # spots in another image's pixels: the job's refusal names both files and what the coordinates must be
    far = tmp_path / "far.csv"
    far.write_text("x,y,radius\n10,10,5\n99999,20,5\n")
    load._spots.value = str(far)
    assert load.start() is not None
    qtbot.waitUntil(lambda: not load.busy, timeout=60_000)
    assert load.status.startswith("cannot open: 1 of 2 spots from ") and "far.csv lie outside" in load.status
    assert "5714_HE_BT_C2.jpg" in load.status and "must be level-0 pixels of this image" in load.status
    assert not len(viewer.layers)
    # one job at a time
    load._spots.value = str(data_dir / "her2st/data/ST-spotfiles/C2_selection.tsv")
    assert load.start() is not None and load.start() is None
    assert load.status == "busy: open 5714_HE_BT_C2.jpg is still running; wait for it or press Cancel"
    qtbot.waitUntil(lambda: not load.busy, timeout=60_000)


@pytest.mark.realdata
def test_cells_on_the_whole_slide_asks_first_with_its_estimate(
    make_napari_viewer, qtbot, data_dir, quiet_settings
):
    pytest.importorskip("skimage")
    from napari_rapacl.jobs._estimate import estimate

    viewer = _window(make_napari_viewer, (1366, 768))
    panel, _ = _panel(viewer, qtbot)
    _open(panel, qtbot, sample="C2")  # the view shows the whole section (reset view)
    cells = panel.show_tab("Cells")
    cells._image.value, cells._spots.value = viewer.layers["her2st C2"], None
    cells._radiomics.value = True
    questions = []
    cells.confirm = lambda q: questions.append(q) or False
    assert cells.start() is None and not cells.busy
    [question] = questions
    # the view shows the whole section: ~92 Mpx at the 0.9 Mpx/s of whole-slide Cells (jobs/_estimate.py)
    assert question.startswith("nuclei in ") and " will take about 1 min " in question, question
    assert question.endswith(" Mpx at 0.9 Mpx/s). Start it now?"), question
    mpx = float(question.split(" Mpx at")[0].split("(")[-1])
    assert 80 < mpx <= 92.0 and estimate("cells", area_px=mpx * 1e6).needs_confirmation()
    assert "not started" in cells.status and "visible region or a drawn ROI" in cells.status
    assert not [lyr for lyr in viewer.layers if lyr.metadata.get("napari_rapacl", {}).get("kind") == "nuclei"]


@pytest.mark.realdata
def test_a_second_sample_opens_beside_the_first(make_napari_viewer, data_dir):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-rapacl", "her2st_c2")
    viewer.open_sample("napari-rapacl", "her2st_c3")
    c2, c3 = viewer.layers["her2st C2"], viewer.layers["her2st C3"]
    assert tuple(c2.translate) == (0.0, 0.0)
    right_of_c2 = c2.data[0].shape[1] * c2.scale[1]
    assert c3.translate[0] == 0.0 and c3.translate[1] > right_of_c2
    assert tuple(viewer.layers["her2st C3 spots"].translate) == tuple(c3.translate)
