"""End to end on real data in a real, shown napari viewer (run under Xvfb by scripts/test.sh).

her2st C2 sample -> Cells (segment + radiomics of the visible region) -> Predict (the visible region,
tiled and cached; the same numbers as the CLI) -> pan away and back (cache) -> Genes (search, colour)
-> Export (.h5ad read back) -> the napari writer; and PixNet's dense map placed on the slide.
Screenshots of each state go to the ``artifacts_dir`` fixture (``test-artifacts/`` by default).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")  # imported here, before any GL context (see _napari._jobs.avoid_llvm_clash)
pytest.importorskip("napari")

from helpers import look_at, train_tiny_stnet  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.realdata]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, data_dir):
    """A tiny baseline trained briefly on her2st C3 (validated on C4): real weights, made here."""
    return train_tiny_stnet(tmp_path_factory.mktemp("ckpt") / "tiny.pt", epochs=2)


@pytest.fixture(scope="module")
def pixnet_checkpoint(tmp_path_factory, data_dir):
    """A tiny PixNet (random weights) over the first 50 her2st genes."""
    from napari_rapacl.datasets import her2st_genes
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    genes = her2st_genes()[:50]
    model = create_model("pixnet_tiny", n_genes=len(genes))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "pixnet_tiny.pt", model, genes=genes)


def _run(qtbot, widget, timeout=300_000):
    """Start the widget's job and wait until it has finished (the widget's own ``finished`` handler ran:
    waiting on the worker's signal from here could miss a job that ends before we connect)."""
    t = time.perf_counter()
    assert widget.start() is not None, widget.status
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
    print(f"[e2e] {type(widget).__name__} took {time.perf_counter() - t:.1f} s", flush=True)


def _shot(viewer, qtbot, artifacts_dir, name, dock=None):
    if dock is not None:
        dock.raise_()  # the tab whose state the screenshot documents
    qtbot.wait(300)
    img = viewer.screenshot(str(artifacts_dir / name), canvas_only=False, flash=False)
    assert img.std() > 10, f"{name} is blank"
    return img


def _slide_grey(image_layer, box):
    from napari_rapacl._napari.layers import slide_from_layer

    return slide_from_layer(image_layer).read_region(*box).astype(float).mean(axis=2)


def test_her2st_segment_predict_genes_export(
    make_napari_viewer, qtbot, tiny_checkpoint, artifacts_dir, tmp_path, data_dir
):
    import anndata as ad

    from napari_rapacl._napari._widgets import CellsWidget, ExportWidget, GeneWidget, PredictWidget
    from napari_rapacl._napari.layers import spots_in_box
    from napari_rapacl.export import checkpoint_sha256

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 1000)
    viewer.open_sample("napari-rapacl", "her2st_c2")
    image, points = viewer.layers["her2st C2"], viewer.layers["her2st C2 spots"]
    assert image.multiscale and image.rgb
    mpp = image.metadata["napari_rapacl"]["mpp"]
    assert 0.6 < mpp < 0.8 and tuple(image.scale) == pytest.approx((mpp, mpp))
    assert tuple(points.scale) == pytest.approx((mpp, mpp))
    assert 170 < len(points.data) < 200 and {"barcode", "radius_px"} <= set(points.features.columns)
    np.testing.assert_allclose(points.size, 2 * points.features["radius_px"].to_numpy())

    cells = CellsWidget(viewer)
    predict = PredictWidget(viewer)
    genes_w = GeneWidget(viewer)
    export = ExportWidget(viewer)
    docks = {
        name: viewer.window.add_dock_widget(w, name=name, tabify=True)
        for w, name in ((cells, "Cells"), (predict, "Predict"), (genes_w, "Genes"), (export, "Export"))
    }

    # a view of ~900 level-0 px around the spot nearest the tissue's centre
    centre = points.data[np.argmin(np.linalg.norm(points.data - np.median(points.data, 0), axis=1))]
    look_at(viewer, qtbot, centre, 900, mpp)
    _shot(viewer, qtbot, artifacts_dir, "e2e_01_loaded.png", docks["Cells"])

    # ---- Cells: segment the visible region, radiomics per cell and per spot --------------------
    cells._image.value, cells._spots.value = image, points
    _run(qtbot, cells)
    labels = cells.labels_layer
    x0, y0, x1, y1 = box = tuple(labels.metadata["napari_rapacl"]["box"])
    assert 600 < x1 - x0 < 1000, box  # the view, not napari's chunk-rounded corners
    assert tuple(labels.scale) == pytest.approx((mpp, mpp))
    assert tuple(labels.translate) == pytest.approx((y0 * mpp, x0 * mpp))
    lab = np.asarray(labels.data)
    assert lab.shape == (y1 - y0, x1 - x0) and lab.max() > 200, (lab.shape, lab.max())
    # the labels sit on nuclei: the slide under them is much darker than around them
    grey = _slide_grey(image, box)
    assert grey[lab > 0].mean() < grey[lab == 0].mean() - 30
    feats = labels.features
    assert (
        "index" in feats
        and "original_shape2D_MeshSurface_um2" in feats
        and "original_firstorder_Mean_grey" in feats
        and "area_um2" in feats
    )
    assert len(feats) > 0.9 * lab.max() and set(feats["index"]) <= set(np.unique(lab))
    # per-cell first-order mean (luminance) of the nuclei is dark, like the slide under them
    assert feats["original_firstorder_Mean_grey"].median() < grey[lab == 0].mean()
    inside = spots_in_box(points.data, box)
    assert len(inside) >= 3
    n_nuclei = points.features["n_nuclei"].to_numpy()
    assert np.all(np.isfinite(n_nuclei[inside])) and n_nuclei[inside].min() > 0
    assert np.isnan(np.delete(n_nuclei, inside)).all()
    assert "nuclei" in cells.status and "spot radiomics" in cells.status
    look_at(viewer, qtbot, ((y0 + y1) / 2, (x0 + x1) / 2), 300, mpp)
    _shot(viewer, qtbot, artifacts_dir, "e2e_02_nuclei.png", docks["Cells"])

    # ---- Predict the visible region --------------------------------------------------------------
    look_at(viewer, qtbot, centre, 900, mpp)
    predict._image.value, predict._spots.value = image, points
    predict._checkpoint.value = str(tiny_checkpoint)
    assert predict._model.value == "stnet_tiny" and not predict._model.enabled  # named by the checkpoint
    predict._device.value = "cpu"
    _run(qtbot, predict)
    res = predict.last_result
    pbox = res.box
    assert 600 < pbox[2] - pbox[0] < 1000
    genes = points.metadata["napari_rapacl"]["genes"]
    assert len(genes) == 785 and set(genes) <= set(points.features.columns)
    values = points.features[genes].to_numpy()
    done = np.flatnonzero(np.isfinite(values).all(axis=1))
    np.testing.assert_array_equal(done, spots_in_box(points.data, pbox))
    assert np.isnan(np.delete(values, done, axis=0)).all()  # not predicted yet: NaN
    assert values[done].std(axis=0).max() > 0
    prov = points.metadata["napari_rapacl"]["provenance"]
    assert prov["checkpoint_sha256"] == checkpoint_sha256(tiny_checkpoint)
    assert prov["model"] == "stnet_tiny" and prov["regions"] == [list(pbox)]
    # coloured by the first gene; spots without a prediction are transparent
    assert points._face.color_properties.name == genes[0]
    assert len(np.unique(points.face_color[done].round(3), axis=0)) >= min(3, len(done))
    assert (points.face_color[np.delete(np.arange(len(values)), done), 3] == 0).all()
    look_at(viewer, qtbot, centre, 2500, mpp)
    _shot(viewer, qtbot, artifacts_dir, "e2e_03_predicted.png", docks["Predict"])

    # the CLI gives the same numbers for the same region
    from napari_rapacl import cli

    cli_out = tmp_path / "cli.h5ad"
    sec_dir = data_dir / "her2st" / "data"
    assert (
        cli.main(
            [
                "predict",
                "--slide",
                str(sec_dir / "ST-imgs/C/C2/5714_HE_BT_C2.jpg"),
                "--spots",
                str(sec_dir / "ST-spotfiles/C2_selection.tsv"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(cli_out),
                "--roi",
                ",".join(str(v) for v in pbox),
                "--device",
                "cpu",
                "--mpp",
                str(mpp),
            ]
        )
        == 0
    )
    cli_ad = ad.read_h5ad(cli_out)
    barcodes = list(points.features["barcode"].to_numpy()[done])
    assert sorted(cli_ad.obs_names) == sorted(barcodes)
    np.testing.assert_allclose(cli_ad[barcodes].X, values[done], rtol=1e-4, atol=1e-4)

    # ---- a drawn ROI (a rectangle around two spots just outside the view) ---------------------------
    outside = np.setdiff1d(np.arange(len(points.data)), done)
    near = outside[np.argsort(np.linalg.norm(points.data[outside] - centre, axis=1))[:2]]
    lo_rc, hi_rc = points.data[near].min(0) - 50, points.data[near].max(0) + 50
    rect = np.array([lo_rc, [lo_rc[0], hi_rc[1]], hi_rc, [hi_rc[0], lo_rc[1]]]) * mpp  # um
    roi = viewer.add_shapes([rect], shape_type="rectangle", name="ROI", face_color="transparent")
    predict._scope.value, predict._roi.value = "selected ROI", roi
    _run(qtbot, predict)
    roi_box = predict.last_result.box
    roi_spots = spots_in_box(points.data, roi_box)
    assert set(near) <= set(roi_spots) and set(predict.last_result.index) == set(roi_spots)
    assert np.isfinite(points.features[genes].to_numpy()[near]).all()
    assert np.isfinite(points.features[genes].to_numpy()[done]).all()  # the first region is kept
    predict._scope.value = "visible region"

    # ---- pan away, predict, pan back: the second look at a region costs only cache lookups -------
    other = points.data[np.argmax(np.linalg.norm(points.data - centre, axis=1))]
    look_at(viewer, qtbot, other, 900, mpp)
    _run(qtbot, predict)
    assert predict.last_result.tiles_computed >= 1
    look_at(viewer, qtbot, centre, 900, mpp)
    t0 = time.perf_counter()
    _run(qtbot, predict)
    assert predict.last_result.tiles_computed == 0 and predict.last_result.tiles_cached >= 1
    assert time.perf_counter() - t0 < 5.0
    assert len(points.metadata["napari_rapacl"]["provenance"]["regions"]) == 4
    values = points.features[genes].to_numpy()
    done = np.flatnonzero(np.isfinite(values).all(axis=1))

    # ---- Genes: search, switch, colour bar --------------------------------------------------------
    genes_w._layer.value = points
    genes_w._search.value = "col"
    choices = list(genes_w._gene.choices)
    assert choices and all("col" in g.lower() for g in choices)
    gene = choices[-1]
    genes_w._gene.value = gene
    assert points._face.color_properties.name == gene
    assert genes_w.colorbar.title.text() == f"{gene}, log1p(CP10k)"
    assert not genes_w.colorbar.bar.pixmap().isNull()
    assert points.name == f"C2 predicted: {gene}, log1p(CP10k)"
    lo, hi = genes_w.limits
    assert lo == pytest.approx(np.percentile(values[done, genes.index(gene)], 1), rel=1e-3, abs=1e-4)
    assert hi > lo
    look_at(viewer, qtbot, centre, 2500, mpp)
    _shot(viewer, qtbot, artifacts_dir, "e2e_04_gene.png", docks["Genes"])

    # ---- Export (widget) and the napari writer -------------------------------------------------------
    export._spots.value = points
    out = tmp_path / "c2_prediction.h5ad"
    export._path.value = str(out)
    _run(qtbot, export, timeout=120_000)
    assert export.written == out and str(out) in export.status
    adata = ad.read_h5ad(out)
    assert adata.n_obs == len(done) and list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X, values[done].astype(np.float32))
    np.testing.assert_allclose(adata.obsm["spatial"], points.data[done][:, ::-1])
    uns = adata.uns["napari_rapacl"]
    assert uns["model"] == "stnet_tiny" and uns["checkpoint_sha256"] == checkpoint_sha256(tiny_checkpoint)
    assert len(uns["regions"]) == 4 and list(uns["genes"]) == genes
    lib = adata.uns["spatial"]
    assert len(lib) == 1 and "hires" in next(iter(lib.values()))["images"]

    _shot(viewer, qtbot, artifacts_dir, "e2e_06_exported.png", docks["Export"])

    # only the spots inside the ROI
    export._scope.value, export._roi.value = "selected ROI", roi
    out_roi = tmp_path / "roi.h5ad"
    export._path.value = str(out_roi)
    _run(qtbot, export, timeout=120_000)
    roi_ad = ad.read_h5ad(out_roi)
    assert sorted(roi_ad.obs_names) == sorted(points.features["barcode"].to_numpy()[roi_spots])
    assert list(roi_ad.uns["napari_rapacl"]["roi"]) == list(roi_box)

    saved = tmp_path / "writer.h5ad"
    assert points.save(str(saved), plugin="napari-rapacl")
    np.testing.assert_array_equal(ad.read_h5ad(saved).X, adata.X)


def test_pixnet_dense_map_on_the_slide(
    make_napari_viewer, qtbot, pixnet_checkpoint, tiny_checkpoint, artifacts_dir
):
    from napari_rapacl._napari._widgets import GeneWidget, PredictWidget

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 1000)
    viewer.open_sample("napari-rapacl", "her2st_c2")
    image, points = viewer.layers["her2st C2"], viewer.layers["her2st C2 spots"]
    mpp = image.metadata["napari_rapacl"]["mpp"]
    predict, genes_w = PredictWidget(viewer), GeneWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict")
    viewer.window.add_dock_widget(genes_w, name="Genes", tabify=True)
    centre = points.data[np.argmin(np.linalg.norm(points.data - np.median(points.data, 0), axis=1))]
    look_at(viewer, qtbot, centre, 1200, mpp)
    predict._image.value, predict._spots.value = image, points
    predict._checkpoint.value = str(pixnet_checkpoint)
    predict._device.value = "cpu"
    _run(qtbot, predict)
    res = predict.last_result
    genes = points.metadata["napari_rapacl"]["genes"]
    assert res.dense is not None and res.dense_gene == genes[0]
    dense = viewer.layers[f"C2 {genes[0]} (dense)"]
    # placed on the slide: the map covers the predicted box (to within one map pixel), in um
    x0, y0, x1, y1 = res.box
    ext = np.asarray(dense.extent.world)  # [[ymin, xmin], [ymax, xmax]]
    s = res.dense.px_size
    lo = np.array([y0, x0]) * mpp
    hi = np.array([y1, x1]) * mpp
    assert np.all(np.abs(ext[0] - lo) <= 1.01 * s * mpp) and np.all(np.abs(ext[1] - hi) <= 1.01 * s * mpp)
    assert tuple(dense.scale) == pytest.approx((s * mpp, s * mpp))
    data = np.asarray(dense.data)
    assert np.isfinite(data).all() and data.std() > 0
    assert viewer.layers.index(dense) < viewer.layers.index(points)  # spots drawn above the map
    assert dense.colorbar.visible
    # the Genes widget recolours the map of its gene, with the spots
    genes_w._layer.value = points
    genes_w._gene.value = genes[0]
    genes_w._cmap.value = "magma"
    assert dense.colormap.name == "magma" and dense.visible
    assert points._face.color_properties.name == genes[0]
    # another gene: its map does not exist yet (hidden map, a hint); Predict computes it, the spots
    # coming from the tile cache
    genes_w._gene.value = genes[1]
    assert not dense.visible and f"no dense map of {genes[1]} yet" in genes_w._status.value
    _run(qtbot, predict)
    assert predict.last_result.tiles_computed == 0 and predict.last_result.dense_gene == genes[1]
    second = viewer.layers[f"C2 {genes[1]} (dense)"]
    assert second.visible and not dense.visible
    # another gene's map, on the same grid: compare where the two regions overlap
    assert tuple(second.scale) == tuple(dense.scale)
    off = np.round((np.asarray(second.translate) - np.asarray(dense.translate)) / np.asarray(dense.scale))
    oy, ox = off.astype(int)
    d2 = np.asarray(second.data)
    y0c, x0c = max(0, oy), max(0, ox)
    y1c, x1c = min(data.shape[0], oy + d2.shape[0]), min(data.shape[1], ox + d2.shape[1])
    assert y1c - y0c > 10 and x1c - x0c > 10
    first_part, second_part = data[y0c:y1c, x0c:x1c], d2[y0c - oy : y1c - oy, x0c - ox : x1c - ox]
    assert np.isfinite(second_part).all() and not np.allclose(first_part, second_part)
    genes_w._gene.value = genes[0]
    assert dense.visible and not second.visible and "no dense map" not in genes_w._status.value

    look_at(viewer, qtbot, centre, 1400, mpp)
    _shot(viewer, qtbot, artifacts_dir, "e2e_05_pixnet_dense.png")

    # another model: the earlier predictions are dropped, not mixed with the new ones
    other = points.data[np.argmax(np.linalg.norm(points.data - centre, axis=1))]
    look_at(viewer, qtbot, other, 900, mpp)
    predict._checkpoint.value = str(tiny_checkpoint)
    _run(qtbot, predict)
    info = points.metadata["napari_rapacl"]
    assert info["provenance"]["model"] == "stnet_tiny" and len(info["provenance"]["regions"]) == 1
    new_genes = info["genes"]
    values = points.features[new_genes].to_numpy()
    done = np.flatnonzero(np.isfinite(values).all(axis=1))
    np.testing.assert_array_equal(done, np.sort(predict.last_result.index))
    assert not set(genes) - set(new_genes) & set(points.features.columns)

    # a second slide opens beside the first: its map is its own layer, on its own tissue, and the
    # first slide's maps stay as they are
    from napari_rapacl._napari._common import dense_layers

    c2_maps = {lyr.name: np.asarray(lyr.data).copy() for lyr in dense_layers(viewer, "her2st C2 spots")}
    assert c2_maps
    viewer.open_sample("napari-rapacl", "her2st_c3")
    image3, points3 = viewer.layers["her2st C3"], viewer.layers["her2st C3 spots"]
    mpp3 = image3.metadata["napari_rapacl"]["mpp"]
    tr3 = np.asarray(image3.translate, float)[-2:]
    assert tr3[1] > ext[1][1]  # right of C2
    centre3 = points3.data[np.argmin(np.linalg.norm(points3.data - np.median(points3.data, 0), axis=1))]
    look_at(viewer, qtbot, centre3 + tr3 / mpp3, 1200, mpp3)
    predict._image.value, predict._spots.value = image3, points3
    predict._checkpoint.value = str(pixnet_checkpoint)
    _run(qtbot, predict)
    res3 = predict.last_result
    dense3 = viewer.layers[f"C3 {res3.dense_gene} (dense)"]
    after = {lyr.name: np.asarray(lyr.data) for lyr in dense_layers(viewer, "her2st C2 spots")}
    assert after.keys() == c2_maps.keys()
    for name, values in c2_maps.items():
        np.testing.assert_array_equal(after[name], values)
    bx0, by0, bx1, by1 = res3.box
    ext3 = np.asarray(dense3.extent.world)
    s3 = res3.dense.px_size * mpp3
    assert np.all(np.abs(ext3[0] - (tr3 + np.array([by0, bx0]) * mpp3)) <= 1.01 * s3)
    assert np.all(np.abs(ext3[1] - (tr3 + np.array([by1, bx1]) * mpp3)) <= 1.01 * s3)
    assert dense3.metadata["napari_rapacl"]["spots"] == "her2st C3 spots"
