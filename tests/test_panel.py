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
    qtbot.waitUntil(lambda: not load.busy, timeout=120_000)
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


def test_progress_bar_with_elapsed_and_time_left_and_questions_before_long_jobs(make_napari_viewer, qtbot):
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
