"""RaPaCL-ST from the slide: nuclei and radiomics of each tile computed with the checkpoint's recipe.

On real her2st sections (``rapacl_run`` in conftest.py trains a tiny RaPaCL-ST on tables written by
``training.radiomics_tables``):

* the checkpoint records the recipe (segmentation method, parameters and version, patch geometry,
  feature set and settings, z-scoring statistics) and prediction refuses checkpoints without it, of
  another segmentation version, or of Stage 1 -- with a message, never a traceback;
* the 72 features the prediction path computes equal the training table's (1e-6) and its predictions
  equal the training module's own test-time predictions (1e-4);
* the spot radiomics are computed once per recipe: panning back, the Cells job's spots and the
  scheduler's workers all feed one cache; the dask schedulers give the same predictions;
* ``napari-rapacl predict`` runs it on the section and on a pyramidal OME-TIFF, writing the spot
  radiomics in ``obsm['radiomics']``.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("radiomics")

from conftest import REPO  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _cli(argv):
    from napari_rapacl.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def _drain(gen):
    from napari_rapacl.progress import run_to_completion

    return run_to_completion(gen)


def _ome_tiff_crop(c2, folder, size, margin):
    """A ``size`` px crop of C2 around its median spot as a pyramidal OME-TIFF (its pixel size), and a
    CSV of the spots at least ``margin`` px inside it, in the crop's pixels."""
    from napari_rapacl.io import write_ome_tiff

    s = c2.spots
    x0, y0 = int(np.median(s.x)) - size // 2, int(np.median(s.y)) - size // 2
    crop = np.asarray(c2.slide.levels[0][y0 : y0 + size, x0 : x0 + size])
    tif = write_ome_tiff(folder / "crop.ome.tif", crop, mpp=c2.slide.mpp, tile=256)
    lo, hi = margin, size - margin
    keep = np.flatnonzero((s.x >= x0 + lo) & (s.x < x0 + hi) & (s.y >= y0 + lo) & (s.y < y0 + hi))
    csv = folder / "spots.csv"
    pd.DataFrame(
        {"x": s.x[keep] - x0, "y": s.y[keep] - y0, "radius": s.radius[keep], "barcode": s.barcode[keep]}
    ).to_csv(csv, index=False)
    return tif, csv, keep, (x0 + lo, y0 + lo, x0 + hi, y0 + hi)


@pytest.fixture
def fresh_radiomics():
    """An empty process-wide radiomics cache (so a test sees what it computes itself)."""
    from napari_rapacl.radiomics import MEMORY_CACHE

    MEMORY_CACHE.clear()
    yield MEMORY_CACHE
    MEMORY_CACHE.clear()


@pytest.fixture(scope="module")
def c2():
    from napari_rapacl.datasets import her2st

    return her2st("C2")


@pytest.fixture(scope="module")
def reference(rapacl_run):
    """The training module's own test-time predictions of the Stage 2 checkpoint on C2."""
    from training.run import predict_checkpoint

    return predict_checkpoint(rapacl_run.stage2, ["C2"])["C2"]


def test_checkpoint_records_the_radiomics_recipe(rapacl_run):
    from napari_rapacl.jobs import load_model_choice
    from napari_rapacl.models.checkpoint import read_checkpoint
    from napari_rapacl.radiomics import FEATURES_VERSION, rapacl72_names
    from napari_rapacl.segmentation import SEGMENTATION_VERSION

    stats = read_checkpoint(rapacl_run.stage2)["input_stats"]["radiomics"]
    recipe = stats["recipe"]
    assert recipe["segmenter"] == {
        "method": "classical",
        "diameter_um": 8.0,
        "model": None,
        "version": SEGMENTATION_VERSION,
    }
    assert (recipe["size"], recipe["mpp"], recipe["feature_set"]) == (224, 0.5, "rapacl72")
    assert recipe["radiomics_config"]["version"] == FEATURES_VERSION
    assert stats["columns"] == list(rapacl72_names()) and stats["fitted_on"] == ["C3"]
    loaded = load_model_choice(None, rapacl_run.stage2)
    text = loaded.recipe.describe()
    assert "72 rapacl72 features on 224 px patches at 0.5 um/px" in text and "z-scored on C3" in text
    assert loaded.provenance()["radiomics_recipe"]["segmenter"]["method"] == "classical"


def test_prediction_from_the_slide_equals_training(rapacl_run, reference, c2, fresh_radiomics):
    """The whole section through the prediction path: the 72 features equal the training table's
    (1e-6) and the predictions equal the training module's test-time predictions (1e-4)."""
    from napari_rapacl.jobs import iter_predict, load_model_choice

    loaded = load_model_choice(None, rapacl_run.stage2)
    res = _drain(iter_predict(loaded, c2.slide, c2.spots, None, cache=False, device="cpu"))
    np.testing.assert_array_equal(res.index, np.arange(len(c2.spots)))
    table = pd.read_parquet(rapacl_run.tables.format(section="C2"))
    columns = loaded.recipe.raw_columns()
    expected = table.loc[list(c2.spots.barcode), columns].to_numpy(np.float64)
    got = res.radiomics[columns].to_numpy(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert (expected[:, columns.index("n_nuclei")] > 0).mean() > 0.9  # nuclei were found
    pos = {b: i for i, b in enumerate(c2.spots.barcode)}
    rows = np.array([pos[b] for b in reference["barcodes"]])
    assert len(rows) == 40
    np.testing.assert_allclose(res.values[rows], reference["pred"], rtol=0, atol=1e-4)
    assert np.std(res.values[:, 0]) > 0  # the spots differ: the radiomics reach the model


def test_refusals_are_messages(rapacl_run, c2, tmp_path, capsys):
    from napari_rapacl._errors import RapaclInputError
    from napari_rapacl.jobs import iter_predict, load_model_choice

    box = (5000, 5000, 6000, 6000)
    stage1 = load_model_choice(None, rapacl_run.stage1)
    with pytest.raises(RapaclInputError, match="Stage 1 model.*never trained.*Train Stage 2"):
        _drain(iter_predict(stage1, c2.slide, c2.spots, box, cache=False, device="cpu"))
    args = [
        "predict",
        "--slide",
        str(c2.slide.path),
        "--spots",
        str(c2.spots.source),
        "--out",
        str(tmp_path / "a.h5ad"),
    ]
    code = _cli([*args, "--checkpoint", str(rapacl_run.stage1)])
    err = capsys.readouterr().err
    assert code == 2 and "Stage 1" in err and "Traceback" not in err and not (tmp_path / "a.h5ad").exists()

    # a checkpoint that does not record its recipe, and one of another segmentation version
    payload = torch.load(rapacl_run.stage2, map_location="cpu", weights_only=True)
    del payload["input_stats"]["radiomics"]["recipe"]
    torch.save(payload, tmp_path / "norecipe.pt")
    bare = load_model_choice(None, tmp_path / "norecipe.pt")
    with pytest.raises(RapaclInputError, match="does not record how its radiomics were made"):
        _drain(iter_predict(bare, c2.slide, c2.spots, box, cache=False, device="cpu"))
    payload = torch.load(rapacl_run.stage2, map_location="cpu", weights_only=True)
    payload["input_stats"]["radiomics"]["recipe"]["segmenter"]["version"] = "0-old"
    torch.save(payload, tmp_path / "old.pt")
    old = load_model_choice(None, tmp_path / "old.pt")
    with pytest.raises(RapaclInputError, match="segmentation version 0-old.*training.radiomics_tables"):
        _drain(iter_predict(old, c2.slide, c2.spots, box, cache=False, device="cpu"))
    code = _cli([*args, "--checkpoint", str(tmp_path / "norecipe.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "does not record how its radiomics were made" in err and "Traceback" not in err


def test_radiomics_are_computed_once_per_spot(rapacl_run, c2, fresh_radiomics, monkeypatch):
    """Cells measured a region's spots: predicting it computes no radiomics again; nor does panning
    back (prediction cache) or another model with the same recipe (radiomics cache)."""
    import napari_rapacl.radiomics._pipeline as pipeline
    from napari_rapacl.jobs import iter_cells, iter_predict, load_model_choice
    from napari_rapacl.tiled import TileCache

    calls = []
    real = pipeline._spot_job
    monkeypatch.setattr(pipeline, "_spot_job", lambda *a, **k: calls.append(1) or real(*a, **k))
    tile = 1024
    s = c2.spots
    # a box of whole tiles holding spots
    tx, ty = int(np.median(s.x) // tile), int(np.median(s.y) // tile)
    box = (tx * tile, ty * tile, (tx + 2) * tile, (ty + 2) * tile)
    inside = np.flatnonzero((s.x >= box[0]) & (s.x < box[2]) & (s.y >= box[1]) & (s.y < box[3]))
    assert len(inside) >= 8
    cells = _drain(iter_cells(c2.slide, box, spots=s, spot_index=inside, n_jobs=1))
    assert len(calls) == len(inside) and cells.n_cells > 100
    loaded = load_model_choice(None, rapacl_run.stage2)
    cache = TileCache()
    calls.clear()
    res = _drain(
        iter_predict(loaded, c2.slide, s, box, cache=cache, device="cpu", tile_px=tile, radiomics_jobs=1)
    )
    assert calls == [] and res.tiles_computed >= 1  # the Cells job's spot radiomics were reused
    np.testing.assert_array_equal(res.radiomics.to_numpy(), cells.spot_table.to_numpy())
    again = _drain(iter_predict(loaded, c2.slide, s, box, cache=cache, device="cpu", tile_px=tile))
    assert again.tiles_computed == 0 and calls == []  # panning back: the prediction cache
    np.testing.assert_array_equal(again.values, res.values)
    twin = load_model_choice(None, rapacl_run.stage2)  # another model object, the same recipe
    _drain(iter_predict(twin, c2.slide, s, box, cache=TileCache(), device="cpu", tile_px=tile))
    assert calls == []


@pytest.mark.parametrize("scheduler", ["threads", "processes", "distributed"])
def test_schedulers_give_the_same_predictions(rapacl_run, c2, fresh_radiomics, scheduler):
    from napari_rapacl.jobs import iter_predict, load_model_choice

    s = c2.spots
    box = (
        float(np.median(s.x)) - 700,
        float(np.median(s.y)) - 700,
        float(np.median(s.x)) + 700,
        float(np.median(s.y)) + 700,
    )
    loaded = load_model_choice(None, rapacl_run.stage2)
    ref = _drain(iter_predict(loaded, c2.slide, s, box, cache=False, device="cpu", tile_px=1024))
    fresh_radiomics.clear()
    if scheduler == "distributed":
        distributed = pytest.importorskip("distributed")
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            got = _drain(
                iter_predict(
                    loaded,
                    c2.slide,
                    s,
                    box,
                    cache=False,
                    device="cpu",
                    tile_px=1024,
                    scheduler=cluster.scheduler_address,
                )
            )
    else:
        got = _drain(
            iter_predict(
                loaded, c2.slide, s, box, cache=False, device="cpu", tile_px=1024, scheduler=scheduler
            )
        )
    np.testing.assert_array_equal(got.index, ref.index)
    np.testing.assert_allclose(got.values, ref.values, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.radiomics.to_numpy(), ref.radiomics.to_numpy(), rtol=1e-9)
    # measured on the workers, kept here: this process's cache holds every spot of the tiles
    assert len(fresh_radiomics) >= len(ref.index)


def test_cli_predicts_rapacl_on_a_section_and_an_ome_tiff(rapacl_run, c2, tmp_path, fresh_radiomics):
    import anndata as ad

    from napari_rapacl.jobs import RADIOMICS_KEY, iter_predict, load_model_choice

    s = c2.spots
    tif, csv, keep, box = _ome_tiff_crop(c2, tmp_path, 3000, 200)
    out = tmp_path / "crop.h5ad"
    code = _cli(["predict", "--slide", tif, "--spots", csv, "--checkpoint", rapacl_run.stage2, "--out", out])
    assert code == 0
    adata = ad.read_h5ad(out)
    assert adata.n_obs == len(keep) and RADIOMICS_KEY in adata.obsm
    rad = adata.obsm[RADIOMICS_KEY]
    assert isinstance(rad, pd.DataFrame) and rad.shape[1] == 74 and "n_nuclei" in rad.columns
    # the same pixels as the section's JPEG at level 0: the same radiomics
    loaded = load_model_choice(None, rapacl_run.stage2)
    ref = _drain(iter_predict(loaded, c2.slide, s, box, cache=False, device="cpu"))
    order = {b: i for i, b in enumerate(s.barcode[ref.index])}
    rows = [order[b] for b in adata.obs_names]
    np.testing.assert_allclose(rad.to_numpy(), ref.radiomics.to_numpy()[rows], rtol=1e-6, atol=1e-9)
    assert np.isfinite(adata.X).all()
    prov = adata.uns["napari_rapacl"]
    assert prov["model"] == "rapacl_tiny" and "224 px patches at 0.5 um/px" in prov["radiomics"]


@pytest.mark.gui
def test_viewer_predicts_rapacl_like_training_and_like_the_cli(
    rapacl_run, reference, make_napari_viewer, qtbot, tmp_path, fresh_radiomics, artifacts_dir
):
    """In a real viewer: Predict with the RaPaCL-ST checkpoint over all spots of her2st C2 gives the
    training module's test-time predictions (1e-4); the spot radiomics that fed it are in the layer
    and in the exported .h5ad, which equals what ``napari-rapacl predict`` writes; the Cells widget's
    cell table, exported, equals ``napari-rapacl segment``'s for the same ROI."""
    pytest.importorskip("napari")
    import anndata as ad

    from napari_rapacl._napari._widgets import CELLS_EXPORT, ROI, CellsWidget, ExportWidget, PredictWidget
    from napari_rapacl._napari.layers import shapes_box

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-rapacl", "her2st_c2")
    image, points = viewer.layers["her2st C2"], viewer.layers["her2st C2 spots"]
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict expression")
    predict._image.value, predict._spots.value = image, points
    predict._checkpoint.value = str(rapacl_run.stage2)
    assert predict._model.value == "rapacl_tiny" and not predict._model.enabled
    predict._scope.value, predict._device.value = "all spots", "cpu"
    assert predict.start() is not None
    qtbot.waitUntil(lambda: not predict.busy, timeout=600_000)
    assert "error" not in predict.status, predict.status
    info = points.metadata["napari_rapacl"]
    genes = info["genes"]
    barcodes = points.features["barcode"].astype(str).tolist()
    rows = [barcodes.index(b) for b in reference["barcodes"]]
    np.testing.assert_allclose(points.features[genes].to_numpy()[rows], reference["pred"], rtol=0, atol=1e-4)
    rad_cols = info["radiomics_columns"]
    assert len(rad_cols) == 74 and points.features[rad_cols].notna().all().all()

    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export")
    export._spots.value, export._path.value = points, str(tmp_path / "viewer.h5ad")
    assert export.start() is not None
    qtbot.waitUntil(lambda: not export.busy, timeout=120_000)
    cli_out = tmp_path / "cli.h5ad"
    args = [
        "predict",
        "--slide",
        image.metadata["napari_rapacl"]["path"],
        "--spots",
        str(points.metadata["napari_rapacl"]["source"]),
    ]
    assert _cli([*args, "--checkpoint", rapacl_run.stage2, "--out", cli_out]) == 0
    from_viewer, from_cli = ad.read_h5ad(tmp_path / "viewer.h5ad"), ad.read_h5ad(cli_out)
    assert list(from_viewer.obs_names) == list(from_cli.obs_names) and list(from_viewer.var_names) == genes
    np.testing.assert_allclose(from_viewer.X, from_cli.X, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(from_viewer.obsm["radiomics"], from_cli.obsm["radiomics"])
    np.testing.assert_array_equal(from_viewer.obsm["spatial"], from_cli.obsm["spatial"])

    # cells: the same ROI in the viewer and on the command line give the same table
    mpp = image.metadata["napari_rapacl"]["mpp"]
    cx, cy = np.median(points.data[:, 1]), np.median(points.data[:, 0])
    rect = (
        np.array([[cy - 300, cx - 400], [cy - 300, cx + 400], [cy + 300, cx + 400], [cy + 300, cx - 400]])
        * mpp
    )
    shapes = viewer.add_shapes([rect], shape_type="rectangle", name="ROI")
    box = shapes_box(shapes, image)
    cells = CellsWidget(viewer)
    viewer.window.add_dock_widget(cells, name="Cells")
    cells._image.value, cells._scope.value, cells._roi.value, cells._spots.value = image, ROI, shapes, points
    assert cells.start() is not None
    qtbot.waitUntil(lambda: not cells.busy, timeout=600_000)
    assert "nuclei" in cells.status and "error" not in cells.status, cells.status
    export._what.value = CELLS_EXPORT
    export._cells.value, export._path.value = cells.labels_layer, str(tmp_path / "cells_viewer.h5ad")
    assert export.start() is not None
    qtbot.waitUntil(lambda: not export.busy, timeout=120_000)
    roi = ",".join(str(int(v)) for v in box)
    out = tmp_path / "cells_cli.h5ad"
    seg = ["segment", "--slide", args[2], "--mpp", repr(mpp), "--roi", roi, "--features", "--out", out]
    assert _cli(seg) == 0  # the JPEG has no pixel size: the viewer's came from the spot grid
    viewer_cells, cli_cells = ad.read_h5ad(tmp_path / "cells_viewer.h5ad"), ad.read_h5ad(out)
    assert viewer_cells.n_obs > 100 and list(viewer_cells.obs_names) == list(cli_cells.obs_names)
    assert list(viewer_cells.var_names) == list(cli_cells.var_names)
    np.testing.assert_array_equal(viewer_cells.X, cli_cells.X)
    np.testing.assert_array_equal(viewer_cells.obsm["spatial"], cli_cells.obsm["spatial"])
    pd.testing.assert_frame_equal(viewer_cells.obs, cli_cells.obs)
    viewer.reset_view()
    qtbot.wait(300)
    viewer.screenshot(str(artifacts_dir / "rapacl_c2_viewer.png"), canvas_only=False, flash=False)


@pytest.mark.gui
def test_viewer_predicts_rapacl_on_a_pyramidal_ome_tiff(rapacl_run, c2, make_napari_viewer, qtbot, tmp_path):
    """The Load widget opens a pyramidal OME-TIFF and a CSV of spots; Predict with the RaPaCL-ST
    checkpoint gives what the jobs give on the same file (predictions and spot radiomics)."""
    pytest.importorskip("napari")
    from napari_rapacl._napari._widgets import LoadWidget, PredictWidget
    from napari_rapacl.jobs import iter_predict, load_model_choice, open_inputs

    tif, csv, keep, _ = _ome_tiff_crop(c2, tmp_path, 2400, 150)
    viewer = make_napari_viewer(show=True)
    load = LoadWidget(viewer)
    viewer.window.add_dock_widget(load, name="Open")
    load._slide.value, load._spots.value = str(tif), str(csv)
    assert load.start() is not None
    qtbot.waitUntil(lambda: not load.busy, timeout=120_000)
    image = next(layer for layer in viewer.layers if layer._type_string == "image")
    points = next(layer for layer in viewer.layers if layer._type_string == "points")
    assert points.name == f"{image.name} spots", (image.name, points.name)
    assert image.multiscale and len(image.data) > 1 and len(points.data) == len(keep)
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict")
    predict._image.value, predict._spots.value = image, points
    predict._checkpoint.value = str(rapacl_run.stage2)
    predict._scope.value, predict._device.value = "all spots", "cpu"
    assert predict.start() is not None
    qtbot.waitUntil(lambda: not predict.busy, timeout=600_000)
    assert "error" not in predict.status, predict.status
    info = points.metadata["napari_rapacl"]
    opened = open_inputs(tif, csv)
    ref = _drain(
        iter_predict(
            load_model_choice(None, rapacl_run.stage2), opened.slide, opened.spots, None, device="cpu"
        )
    )
    np.testing.assert_allclose(points.features[info["genes"]].to_numpy(), ref.values, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        points.features[info["radiomics_columns"]].to_numpy(np.float64), ref.radiomics.to_numpy(), rtol=1e-6
    )
