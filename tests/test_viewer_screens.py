"""What a pathologist sees, as screenshots under Xvfb at 1920x1080 and 1366x768 (``test-artifacts/``):

* a prediction on her2st C2 named on the canvas by section, gene and unit (layer name, canvas title,
  napari's colour bar), opening on the gene with the best validation r, tissue visible under the spots;
* the measured expression of the same gene beside the prediction, with the section's Pearson r
  (checked against r computed here from the counts);
* nucleus outlines of a small ROI with their count and median area in µm²; Cells on glass adds no
  layer and says so.

The checkpoint is a tiny baseline trained here for one epoch on C3 patches, its per-gene validation r
measured on C4 and stored the way training stores it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")  # before any GL context (see _napari._env.avoid_llvm_clash)
pytest.importorskip("napari")

from helpers import look_at, train_tiny_stnet  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.realdata]

SIZES = ((1920, 1080), (1366, 768))


@pytest.fixture(scope="module")
def reliable_checkpoint(tmp_path_factory, data_dir):
    """stnet_tiny over the her2st genes, one epoch on 120 C3 spots, validated on 120 C4 spots; the
    checkpoint stores each gene's validation r (``gene_reliability``)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_r.pt"
    return train_tiny_stnet(path, epochs=1, max_spots=120, reliability=True)


def _wait(qtbot, widget, timeout=300_000):
    t = time.perf_counter()
    assert widget.start() is not None, widget.status
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
    return time.perf_counter() - t


def _resize(viewer, qtbot, size):
    viewer.window._qt_window.resize(*size)
    qtbot.wait(300)


def _shot(viewer, qtbot, artifacts_dir, name, size, dock=None):
    if dock is not None:
        dock.raise_()
    qtbot.wait(600)
    path = artifacts_dir / f"{name}_{size[0]}x{size[1]}.png"
    img = viewer.screenshot(str(path), canvas_only=False, flash=False)
    assert img.std() > 10, f"{path.name} is blank"
    return img


def test_screens_prediction_measured_beside_and_nuclei(
    make_napari_viewer, qtbot, reliable_checkpoint, artifacts_dir, data_dir
):
    from napari_rapacl._napari._genes import frame_beside
    from napari_rapacl._napari._widgets import CellsWidget, GeneWidget, PredictWidget
    from napari_rapacl.datasets import her2st
    from napari_rapacl.models.checkpoint import load_model
    from napari_rapacl.preprocess import normalize_log1p_cp10k

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*SIZES[0])
    viewer.open_sample("napari-rapacl", "her2st_c2")
    image = next(lyr for lyr in viewer.layers if lyr.metadata["napari_rapacl"].get("kind") == "slide")
    points = next(lyr for lyr in viewer.layers if lyr.metadata["napari_rapacl"].get("kind") == "spots")
    mpp = image.metadata["napari_rapacl"]["mpp"]
    # before any prediction: hollow grey rings, the tissue shows through
    assert points.opacity == pytest.approx(0.6)
    np.testing.assert_allclose(points.border_color[:, :3], 180 / 255, atol=0.01)
    assert np.all(points.face_color[:, 3] == 0)

    predict, genes_w, cells = PredictWidget(viewer), GeneWidget(viewer), CellsWidget(viewer)
    docks = {
        name: viewer.window.add_dock_widget(w, name=name, tabify=True)
        for w, name in ((cells, "Cells"), (predict, "Predict"), (genes_w, "Genes"))
    }
    predict._image.value, predict._spots.value = image, points
    predict._checkpoint.value = str(reliable_checkpoint)
    predict._scope.value, predict._device.value = "all spots", "cpu"
    assert not predict._dense.enabled and not predict._dense.value  # stnet has no dense head
    _wait(qtbot, predict)
    assert "spots predicted" in predict.status, predict.status

    # the default gene is the one with the best validation r stored in the checkpoint
    rel = load_model(reliable_checkpoint)[0].gene_reliability
    best = max((r, g) for g, r in rel.items() if np.isfinite(r))[1]
    title = f"C2 predicted: {best}, log1p(CP10k)"
    assert points.name == title
    qtbot.waitUntil(lambda: viewer.canvas.overlays.text.text == title, timeout=5000)
    assert points.opacity == pytest.approx(0.6)
    genes_w._layer.value = points
    genes_w._napari_bar.value = True  # napari's colour bar (off by default under software OpenGL)
    assert points.face_colorbar.visible
    assert genes_w._gene.value == best and list(genes_w._gene.choices)[0] == best
    assert genes_w.colorbar.title.text() == f"{best}, log1p(CP10k)"
    label = genes_w._gene.native.currentText()
    assert label.startswith(f"{best}   r {rel[best]:.2f}"), label
    n_low = sum(1 for r in rel.values() if not r >= 0.1)
    low = next(g for g, r in rel.items() if np.isfinite(r) and r < 0.1)
    labels = {v: k for k, v in genes_w._gene._default_choices(genes_w._gene)}
    assert labels[low].endswith("! below 0.10"), labels[low]
    genes_w._hide_low.value = True
    assert len(genes_w._gene.choices) == len(rel) - n_low
    genes_w._search.value = low
    assert "untick 'hide flagged genes'" in genes_w.status
    genes_w._search.value = ""
    genes_w._hide_low.value = False
    genes_w._search.value = "ERBB2"
    if "ERBB2" not in rel:
        assert genes_w.status.startswith("ERBB2 is not predicted by this model; these are: ")

    genes_w._search.value = ""
    xy = np.asarray(points.data)
    centre = np.median(xy, axis=0)
    for size in SIZES:
        _resize(viewer, qtbot, size)
        look_at(viewer, qtbot, centre, 3000, mpp, wait_ms=500)
        _shot(viewer, qtbot, artifacts_dir, "screen_predicted", size, docks["Genes"])

    # measured beside predicted, with the section's r for that gene
    genes_w._measured.value = True
    r, n = genes_w.r_measured
    sec = her2st("C2")
    measured = normalize_log1p_cp10k(sec.spots.counts, [best], missing="zero")[:, 0]
    predicted = points.features[best].to_numpy(dtype=float)
    assert n == len(points.data) == np.isfinite(predicted).sum()
    assert r == pytest.approx(np.corrcoef(predicted, measured)[0, 1], abs=1e-5)
    assert f"r = {r:.2f} over {n} predicted spots" in genes_w.status
    side = [lyr for lyr in viewer.layers if lyr.metadata.get("napari_rapacl", {}).get("beside")]
    names = {f"{image.name} (measured side)", f"C2 measured: {best}, log1p(CP10k)"}
    assert {lyr.name for lyr in side} == names
    lo_p, hi_p = points.face_contrast_limits
    measured_layer = next(lyr for lyr in side if lyr.metadata["napari_rapacl"]["kind"] == "measured")
    lo_m, hi_m = measured_layer.face_contrast_limits
    assert viewer.canvas.overlays.text.text == (
        f"C2: {best}, log1p(CP10k); r = {r:.2f} ({n} spots)\n"
        f"left: predicted {lo_p:.2f}-{hi_p:.2f}\nright: measured {lo_m:.2f}-{hi_m:.2f}"
    )
    for size in SIZES:
        _resize(viewer, qtbot, size)
        frame_beside(viewer, points)
        _shot(viewer, qtbot, artifacts_dir, "screen_measured_beside", size, docks["Genes"])
    genes_w._measured.value = False
    assert not [lyr for lyr in viewer.layers if lyr.metadata.get("napari_rapacl", {}).get("beside")]

    # nuclei of a small ROI on tissue, drawn as outlines, with count and median area
    cy, cx = xy[np.argmin(np.abs(xy - centre).sum(axis=1))]
    half = 250
    roi = viewer.add_shapes(
        [np.array([[cy - half, cx - half], [cy + half, cx + half]]) * mpp],
        shape_type="rectangle",
        name="ROI",
        face_color="transparent",
        edge_color="cyan",
        edge_width=2,
        scale=None,
        units=image.units,
    )
    cells._image.value, cells._scope.value, cells._roi.value = image, "selected ROI", roi
    cells._radiomics.value = False
    _wait(qtbot, cells)
    nuclei = cells.labels_layer
    assert nuclei is not None and nuclei.name == "C2 nuclei (ROI 1)" and nuclei.contour == 2
    assert "nuclei, median area" in cells.status and "µm²" in cells.status, cells.status
    assert " in 357 x 357 µm" in cells.status or "µm at (" in cells.status
    assert nuclei.colormap.color_dict[None].tolist() == pytest.approx([0.2, 1.0, 0.3, 1.0])
    for size in SIZES:
        _resize(viewer, qtbot, size)
        look_at(viewer, qtbot, (cy, cx), 2 * half + 100, mpp, wait_ms=500)
        _shot(viewer, qtbot, artifacts_dir, "screen_nuclei", size, docks["Cells"])
    # coloured by a per-cell feature: the largest nucleus yellow, the smallest red
    cells._colour.value = "area_um2"
    area = nuclei.features.set_index("index")["area_um2"]
    np.testing.assert_allclose(nuclei.colormap.color_dict[int(area.idxmax())][:3], [1, 1, 0], atol=0.01)
    np.testing.assert_allclose(nuclei.colormap.color_dict[int(area.idxmin())][:3], [1, 0, 0], atol=0.01)
    assert cells._colour_legend.value.startswith("area_um2: red ")
    _shot(viewer, qtbot, artifacts_dir, "screen_nuclei_by_area", SIZES[-1], docks["Cells"])

    # on glass: no layer, a message saying so
    n_layers = len(viewer.layers)
    roi.data = [np.array([[10, 10], [300, 300]]) * mpp]
    roi.selected_data = set()
    _wait(qtbot, cells)
    assert len(viewer.layers) == n_layers and cells.labels_layer is None
    assert cells.status.startswith("no nuclei: the region (") and "glass or background" in cells.status
    assert "no layer was added" in cells.status
