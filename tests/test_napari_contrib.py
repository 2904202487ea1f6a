"""Readers, writer and layer conventions of the plugin (no viewer needed)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from napari_rapacl._napari import _reader, _writer
from napari_rapacl._napari.layers import (
    slide_from_layer,
    slide_layer_data,
    spots_from_layer_data,
    spots_layer_data,
)


def test_slide_reader_accepts_slides_and_declines_others(tmp_path, data_dir):
    jpg = data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    assert _reader.get_slide_reader(str(jpg)) is not None
    assert _reader.get_slide_reader(str(tmp_path / "notes.txt")) is None
    assert _reader.get_slide_reader([str(jpg), str(jpg)]) is None
    [(data, kwargs, kind)] = _reader.get_slide_reader(str(jpg))(str(jpg))
    assert kind == "image" and kwargs["rgb"] and kwargs["multiscale"]
    assert data[0].shape[-1] == 3 and all(a.shape[0] > b.shape[0] for a, b in itertools.pairwise(data))
    assert kwargs["scale"] == (1.0, 1.0)  # a JPEG carries no pixel size: shown in pixels, not um
    assert kwargs["metadata"]["napari_rapacl"]["mpp"] is None


def test_spots_reader_on_real_formats(data_dir, tmp_path):
    visium = data_dir / "visium_mouse_brain_crop"
    selection = data_dir / "her2st/data/ST-spotfiles/C2_selection.tsv"
    for path, n in ((visium, 100), (selection, 187), (visium / "test_data.h5ad", 49)):
        reader = _reader.get_spots_reader(str(path))
        assert reader is not None, path
        [(data, kwargs, kind)] = reader(str(path))
        assert kind == "points" and data.shape == (n, 2)
        np.testing.assert_allclose(kwargs["size"], 2 * kwargs["features"]["radius_px"].to_numpy())
    csv = tmp_path / "other.csv"
    csv.write_text("a,b\n1,2\n")
    assert _reader.get_spots_reader(str(csv)) is None
    assert _reader.get_spots_reader(str(tmp_path / "absent.h5ad")) is None


def test_slide_layer_round_trip(tmp_path):
    from napari_rapacl.io import open_slide, write_ome_tiff

    img = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    slide = open_slide(write_ome_tiff(tmp_path / "s.ome.tif", img, mpp=0.5, tile=256))
    data, kwargs, _ = slide_layer_data(slide)
    assert kwargs["scale"] == (0.5, 0.5) and kwargs["units"] == ("um", "um")

    class FakeLayer:  # the attributes slide_from_layer reads from a napari Image layer
        multiscale = kwargs["multiscale"]
        metadata = kwargs["metadata"]
        scale = np.array(kwargs["scale"])

    FakeLayer.data = data
    back = slide_from_layer(FakeLayer)
    assert back.mpp == 0.5 and back.downsamples == pytest.approx(slide.downsamples)
    np.testing.assert_array_equal(back.read_region(100, 50, 300, 250), img[50:250, 100:300])


def test_writer_exports_predictions_and_refuses_a_layer_without_them(tmp_path, data_dir):
    import anndata as ad

    from napari_rapacl.datasets import her2st

    sec = her2st("C2")
    genes = ["ERBB2", "GAPDH", "ACTB"]
    values = np.random.default_rng(1).normal(size=(len(sec.spots), 3)).astype(np.float32)
    data, kwargs, _ = spots_layer_data(
        sec.spots,
        mpp=sec.slide.mpp,
        values=values,
        genes=genes,
        color_by="ERBB2",
        library_id="C2",
        slide_path=str(sec.slide.path),
        provenance={"model": "test"},
    )
    assert kwargs["face_color"] == "ERBB2"
    meta = {"name": "spots", **kwargs}
    out = tmp_path / "pred.h5ad"
    assert _writer.write_spots_h5ad(str(out), data, meta) == [str(out)]
    adata = ad.read_h5ad(out)
    np.testing.assert_array_equal(adata.X, values)
    np.testing.assert_allclose(adata.obsm["spatial"], np.column_stack([sec.spots.x, sec.spots.y]))
    assert list(adata.obs_names) == list(sec.spots.barcode)
    assert "C2" in adata.uns["spatial"] and adata.uns["napari_rapacl"]["model"] == "test"

    _, bare, _ = spots_layer_data(sec.spots)
    with pytest.raises(ValueError, match="no predicted genes"):
        _writer.write_spots_h5ad(str(tmp_path / "none.h5ad"), data, {"name": "bare", **bare})
    assert not (tmp_path / "none.h5ad").exists()


def test_spots_from_layer_data_restores_positions():
    data = np.array([[10.0, 20.0], [30.0, 40.0]])
    features = pd.DataFrame({"barcode": ["a", "b"], "radius_px": [5.0, 6.0]})
    spots = spots_from_layer_data(data, features, mpp=0.5)
    np.testing.assert_array_equal(spots.x, [20, 40])
    np.testing.assert_array_equal(spots.y, [10, 30])
    assert list(spots.barcode) == ["a", "b"] and spots.mpp == 0.5


# --------------------------------------------------------------------------------------------
# the jobs the widgets and the CLI share (napari_rapacl.jobs): Qt-free generators, drained here
# --------------------------------------------------------------------------------------------
def _drain(gen):
    from napari_rapacl.progress import run_to_completion

    return run_to_completion(gen)


def test_cells_job_labels_and_radiomics_on_a_her2st_crop(data_dir):
    pytest.importorskip("skimage")
    pytest.importorskip("radiomics")
    from napari_rapacl._napari.layers import spots_in_box
    from napari_rapacl.datasets import her2st
    from napari_rapacl.jobs import iter_cells

    sec = her2st("C2")
    s = sec.spots
    i = int(np.argmin(np.hypot(s.x - np.median(s.x), s.y - np.median(s.y))))
    box = (int(s.x[i]) - 200, int(s.y[i]) - 200, int(s.x[i]) + 200, int(s.y[i]) + 200)
    data = np.column_stack([s.y, s.x])
    inside = spots_in_box(data, box)
    assert len(inside) == 1
    stages = []
    gen = iter_cells(sec.slide, box, spots=s, spot_index=inside, tile=256)
    while True:
        try:
            stages.append(next(gen).stage)
        except StopIteration as stop:
            res = stop.value
            break
    assert {"segment", "cell radiomics", "radiomics"} <= set(stages)
    assert res.labels.shape == (400, 400) and res.labels.dtype == np.int32 and res.n_cells > 50
    assert res.origin == (box[0], box[1]) and res.level == 0
    cells = res.cells
    # one row per nucleus, measured whole and once: the tile seams (tile=256) cut or duplicate none
    assert cells["label"].is_unique and set(cells["label"]) == set(np.unique(res.labels)) - {0}
    assert cells["original_shape2D_Perimeter_um"].notna().mean() > 0.9  # units in the column names
    assert {"area_um2", "original_firstorder_Mean_grey", "original_shape2D_Elongation"} <= set(cells)
    np.testing.assert_allclose(
        cells["area_um2"], cells["n_pixels"] * sec.slide.mpp**2, rtol=1e-12
    )  # the pixel count of each label
    whole = _drain(iter_cells(sec.slide, box, features=True, tile=1024))  # one tile, no seams
    # centroids: continuous level-0 px of the slide (pixel p covers [p, p + 1)), on their own label
    cy = np.floor(cells["centroid_y_px"].to_numpy() - box[1]).astype(int)
    cx = np.floor(cells["centroid_x_px"].to_numpy() - box[0]).astype(int)
    assert np.mean(res.labels[cy, cx] == cells["label"].to_numpy()) > 0.8
    assert res.spot_table.shape[0] == 1 and res.spot_table["n_nuclei"].iloc[0] > 0
    assert list(res.spot_index) == list(inside)
    assert abs(len(whole.cells) - len(cells)) <= 0.05 * len(cells)


def test_cells_job_without_pyradiomics_still_gives_labels(data_dir, monkeypatch):
    pytest.importorskip("skimage")
    import napari_rapacl.radiomics as rad
    from napari_rapacl.datasets import her2st
    from napari_rapacl.jobs import BASE_COLUMNS, iter_cells

    def missing():
        raise ImportError("radiomics features need pyradiomics (test)")

    monkeypatch.setattr(rad, "require_radiomics", missing)
    sec = her2st("C2")
    res = _drain(iter_cells(sec.slide, (5000, 6000, 5300, 6300)))
    assert res.n_cells > 10 and list(res.cells.columns) == list(BASE_COLUMNS) and res.spot_table is None
    assert any("pyradiomics" in m for m in res.messages)


def test_predict_job_registry_and_checkpoint(tmp_path, data_dir):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from napari_rapacl._napari._env import checkpoint_path
    from napari_rapacl.datasets import her2st
    from napari_rapacl.export import checkpoint_sha256
    from napari_rapacl.inference import predict_spots
    from napari_rapacl.jobs import iter_predict, load_model_choice
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint
    from napari_rapacl.tiled import TileCache

    assert checkpoint_path(".") is None and checkpoint_path("") is None and checkpoint_path(tmp_path) is None
    sec = her2st("C2")
    s = sec.spots
    model = create_model("stnet_tiny", n_genes=4)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, genes=["A", "B", "C", "D"])
    loaded = load_model_choice(None, ckpt)
    assert loaded.name == "stnet_tiny" and loaded.genes == ["A", "B", "C", "D"] and not loaded.is_dense
    assert loaded.checkpoint_sha256 == checkpoint_sha256(ckpt)
    assert loaded.provenance()["checkpoint_sha256"] == loaded.checkpoint_sha256
    box = (4500, 5000, 6000, 6500)
    cache = TileCache()
    res = _drain(iter_predict((None, ckpt), sec.slide, s, box, cache=cache, device="cpu", tile_px=1024))
    inside = np.flatnonzero((s.x >= 4500) & (s.x < 6000) & (s.y >= 5000) & (s.y < 6500))
    np.testing.assert_array_equal(res.index, inside)
    ref = predict_spots(loaded.model, sec.slide, s.x[inside], s.y[inside], device="cpu")
    np.testing.assert_allclose(res.values, ref, rtol=1e-4, atol=1e-5)
    assert res.tiles_computed >= 1 and res.tiles_cached == 0
    again = _drain(iter_predict(res.loaded, sec.slide, s, box, cache=cache, device="cpu", tile_px=1024))
    assert again.tiles_computed == 0 and again.tiles_cached == res.tiles_computed
    np.testing.assert_array_equal(again.values, res.values)
    # no checkpoint: the registry model with random weights and the her2st gene names when they fit
    rand = load_model_choice("stnet_tiny", None)
    assert rand.checkpoint is None and len(rand.genes) == rand.model.config.n_genes
    assert "random" in rand.provenance()["checkpoint"]


def test_pixnet_job_gives_a_dense_map_of_the_chosen_gene(tmp_path, data_dir):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from napari_rapacl.datasets import her2st
    from napari_rapacl.jobs import iter_predict
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    sec = her2st("C2")
    model = create_model("pixnet_tiny", n_genes=3)
    ckpt = save_checkpoint(tmp_path / "p.pt", model, genes=["A", "B", "C"])
    box = (5000, 6000, 5600, 6500)
    res = _drain(
        iter_predict((None, ckpt), sec.slide, sec.spots, box, device="cpu", dense=True, dense_gene="B")
    )
    assert res.dense_gene == "B" and res.dense.values.shape[0] == 1
    h, w = res.dense.values.shape[1:]
    s = res.dense.px_size
    assert abs(h * s - 500) <= 2 * s and abs(w * s - 600) <= 2 * s
    no_dense = _drain(iter_predict(res.loaded, sec.slide, sec.spots, box, device="cpu", dense_gene="B"))
    assert no_dense.dense is None
    first = _drain(iter_predict(res.loaded, sec.slide, sec.spots, box, device="cpu", dense=True))
    assert first.dense_gene == "A"


def test_export_job_writes_only_predicted_rows(tmp_path, data_dir):
    import anndata as ad

    from napari_rapacl._napari.layers import export_arguments, merge_columns
    from napari_rapacl.datasets import her2st
    from napari_rapacl.export import write_h5ad
    from napari_rapacl.jobs import iter_export, predicted_rows, prediction_adata

    def export_spots(path, data, meta, rows=None, provenance=None):
        args = export_arguments(data, meta, rows=rows)
        args["provenance"].update(provenance or {})
        values, genes, spots = args.pop("values"), args.pop("genes"), args.pop("spots")
        return write_h5ad(prediction_adata(values, genes, spots, **args), path)

    sec = her2st("C2")
    data, kwargs, _ = spots_layer_data(sec.spots, mpp=sec.slide.mpp, slide_path=str(sec.slide.path))
    rows = np.arange(10, 30)
    values = np.random.default_rng(0).normal(size=(len(rows), 2)).astype(np.float32)
    features = merge_columns(kwargs["features"], rows, values, ["G1", "G2"])
    np.testing.assert_array_equal(predicted_rows(features, ["G1", "G2"]), rows)
    meta = {
        "name": "spots",
        "features": features,
        "metadata": {
            "napari_rapacl": {
                **kwargs["metadata"]["napari_rapacl"],
                "genes": ["G1", "G2"],
                "provenance": {"model": "m"},
            }
        },
    }
    out = export_spots(
        tmp_path / "a.h5ad", data, meta, rows=np.arange(0, 20), provenance={"roi": [1, 2, 3, 4]}
    )
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 10 and list(adata.obs_names) == list(sec.spots.barcode[10:20])
    np.testing.assert_array_equal(adata.X, values[:10])
    prov = adata.uns["napari_rapacl"]
    assert prov["model"] == "m" and list(prov["roi"]) == [1, 2, 3, 4] and list(prov["genes"]) == ["G1", "G2"]
    # a cancel at the job's yields writes nothing
    args = export_arguments(data, meta)
    gen = iter_export(tmp_path / "b.h5ad", args.pop("values"), args.pop("genes"), args.pop("spots"), **args)
    next(gen)
    next(gen)
    gen.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad"]
    with pytest.raises(ValueError, match="predicted"):
        export_spots(tmp_path / "c.h5ad", data, meta, rows=np.arange(50, 60))
    assert not (tmp_path / "c.h5ad").exists()


def test_avoid_llvm_clash_blocks_triton_only_when_llvm_is_loaded(monkeypatch):
    import builtins
    import io
    import sys

    from napari_rapacl._napari import _env as _jobs

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    real_open = builtins.open

    def fake_open(maps):
        def opener(path, *a, **k):
            return io.StringIO(maps) if path == "/proc/self/maps" else real_open(path, *a, **k)

        return opener

    monkeypatch.setattr(builtins, "open", fake_open("7f00 r-xp /usr/lib/libc.so.6\n"))
    assert not _jobs.avoid_llvm_clash() and "triton" not in sys.modules
    monkeypatch.setattr(builtins, "open", fake_open("7f00 r-xp /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"))
    assert _jobs.avoid_llvm_clash() and sys.modules["triton"] is None
    assert not _jobs.avoid_llvm_clash()  # once is enough
    monkeypatch.delitem(sys.modules, "triton")


def test_open_job_places_a_slide_and_its_spots_together(data_dir, tmp_path):
    from napari_rapacl._errors import SpotsOutsideImageError
    from napari_rapacl._napari.layers import opened_layer_data
    from napari_rapacl.datasets import her2st
    from napari_rapacl.jobs import iter_open

    jpg = data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    selection = data_dir / "her2st/data/ST-spotfiles/C2_selection.tsv"
    [(img, ikw, ikind), (pts, pkw, pkind)] = opened_layer_data(_drain(iter_open(jpg, selection)))
    assert (ikind, pkind) == ("image", "points")
    # the JPEG has no pixel size: the ST array pitch gives it, to both layers (as the her2st sample)
    sample = her2st("C2")
    info = ikw["metadata"]["napari_rapacl"]
    assert info["mpp"] == pytest.approx(sample.slide.mpp) and info["mpp_source"] == "spot-grid"
    assert ikw["scale"] == pkw["scale"] == (info["mpp"], info["mpp"]) and ikw["units"] == ("um", "um")
    np.testing.assert_allclose(pts, np.column_stack([sample.spots.y, sample.spots.x]))
    np.testing.assert_allclose(pkw["size"], 2 * sample.spots.radius)
    assert pkw["metadata"]["napari_rapacl"]["slide_path"] == str(jpg)
    assert pkw["metadata"]["napari_rapacl"]["library_id"] == "C2"
    assert list(pkw["features"].columns[:2]) == ["barcode", "radius_px"]
    # a pixel size given by the user wins; the slide alone opens too
    [(_, ikw2, _), (_, pkw2, _)] = opened_layer_data(_drain(iter_open(jpg, selection, mpp=0.25)))
    assert ikw2["scale"] == pkw2["scale"] == (0.25, 0.25)
    [(_, alone, _)] = opened_layer_data(_drain(iter_open(jpg)))
    assert alone["metadata"]["napari_rapacl"]["mpp"] is None
    # spots that are not in this slide's pixels: an error naming the slide, nothing returned
    csv = tmp_path / "far.csv"
    csv.write_text("x,y,radius\n10,10,5\n99999,20,5\n")
    with pytest.raises(SpotsOutsideImageError, match=r"1 of 2 spots.*5714_HE_BT_C2\.jpg"):
        opened_layer_data(_drain(iter_open(jpg, csv)))


# --------------------------------------------------------------------------------------------
# open-time checks, estimates, layer names (issue #13 items 4, 6)
# --------------------------------------------------------------------------------------------
def test_spot_fit_warns_when_the_spots_belong_to_another_section(data_dir):
    from napari_rapacl.io import open_slide, read_spots
    from napari_rapacl.jobs._checks import MISFIT_FRACTION, spot_fit

    spotfiles = data_dir / "her2st/data/ST-spotfiles"
    c2 = open_slide(data_dir / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg")
    with pytest.warns(UserWarning):  # the C5 counts lack two spots (said by read_spots)
        c5 = read_spots(spotfiles / "C5_selection.tsv")
    own = spot_fit(c2, read_spots(spotfiles / "C2_selection.tsv"))
    assert own.fits and own.warning is None and own.fraction < 0.08 and own.n_spots == 187
    other = spot_fit(c2, c5)
    assert not other.fits and other.fraction > 0.6 > MISFIT_FRACTION
    pct = round(100 * other.fraction)
    assert other.warning.startswith(f"{pct} % of the spots of C5_selection.tsv (")
    assert "fall on glass in 5714_HE_BT_C2.jpg" in other.warning
    assert "probably belong to another section" in other.warning and "before predicting" in other.warning


def test_spot_fit_counts_spots_outside_the_slide_and_a_blank_slide(tmp_path):
    from napari_rapacl.io import open_slide, write_ome_tiff
    from napari_rapacl.io.spots import Spots
    from napari_rapacl.jobs._checks import spot_fit

    img = np.full((400, 600, 3), 240, np.uint8)
    img[100:300, 100:300] = (180, 90, 160)  # a pink "tissue" square on white glass
    slide = open_slide(write_ome_tiff(tmp_path / "s.ome.tif", img, mpp=1.0, tile=256))
    xs = np.array([150.0, 200, 250, 500, 550, 900])  # 3 on tissue, 2 on glass, 1 beyond the image
    spots = Spots(
        barcode=np.array([f"s{i}" for i in range(6)], dtype=object),
        x=xs,
        y=np.full(6, 200.0),
        radius=np.full(6, 20.0),
        source=tmp_path / "mine.csv",
    )
    fit = spot_fit(slide, spots)
    assert (fit.n_spots, fit.n_outside, fit.n_on_glass) == (6, 1, 2)
    assert fit.warning.startswith("50 % of the spots of mine.csv (3 of 6) fall on glass or outside s.ome.tif")


def test_estimates_and_durations_for_people():
    from napari_rapacl.jobs._estimate import ASK_ABOVE_S, estimate, eta_seconds, format_duration

    durations = [format_duration(s) for s in (0.2, 45, 90, 3600 + 5 * 60)]
    assert durations == ["< 1 s", "45 s", "1 min 30 s", "1 h 05 min"]
    whole = estimate("cells", area_px=9270 * 9920)  # her2st C2: 93 s measured
    assert 80 < whole.seconds < 110 and whole.needs_confirmation()
    assert whole.text.startswith("about 1 min") and "92.0 Mpx" in whole.text
    view = estimate("cells", area_px=1500 * 1000)
    assert view.seconds < ASK_ABOVE_S and not view.needs_confirmation()
    assert estimate("predict", n_spots=187, model="rapacl").seconds > estimate("predict", n_spots=187).seconds
    assert estimate("predict", n_spots=62_500).needs_confirmation()
    with pytest.raises(ValueError, match="unknown job 'train'"):
        estimate("train")
    assert eta_seconds(10.0, 0, 100) is None and eta_seconds(10.0, 25, 100) == pytest.approx(30.0)


def test_opened_layers_are_named_by_section_and_can_sit_beside_another(data_dir):
    from napari_rapacl._napari.layers import opened_layer_data
    from napari_rapacl.jobs import iter_open, iter_open_sample

    img_dir, spotfiles = data_dir / "her2st/data/ST-imgs/C", data_dir / "her2st/data/ST-spotfiles"
    opened = _drain(iter_open(img_dir / "C4/5714_HE_BT_D2.jpg", spotfiles / "C4_selection.tsv"))
    assert opened.warnings == ()
    [(_, ikw, _), (_, pkw, _)] = opened_layer_data(opened, translate=(0.0, 7000.0))
    assert (ikw["name"], pkw["name"]) == ("C4", "C4 spots")
    assert ikw["translate"] == pkw["translate"] == (0.0, 7000.0)
    # spots of another section: named after the slide file, and the warning is there before any work
    with pytest.warns(UserWarning):
        wrong = _drain(iter_open(img_dir / "C2/5714_HE_BT_C2.jpg", spotfiles / "C5_selection.tsv"))
    assert len(wrong.warnings) == 1 and "C5_selection.tsv" in wrong.warnings[0]
    assert [kw["name"] for _, kw, _ in opened_layer_data(wrong)] == ["5714_HE_BT_C2", "5714_HE_BT_C2 spots"]
    sample = opened_layer_data(_drain(iter_open_sample("C3")))
    assert [kw["name"] for _, kw, _ in sample] == ["her2st C3", "her2st C3 spots"]
    assert "translate" not in sample[0][1]


def test_cli_predict_warns_about_spots_of_another_section_before_any_work(data_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from napari_rapacl.cli import main
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", create_model("stnet_tiny", n_genes=1), genes=["ERBB2"])
    root = data_dir / "her2st/data"
    slide = root / "ST-imgs/C/C2/5714_HE_BT_C2.jpg"

    def run(spots):  # an ROI without spots: the run stops right after opening (exit 2), nothing computed
        args = ["predict", "--slide", slide, "--spots", spots, "--checkpoint", ckpt]
        args += ["--out", tmp_path / "x.h5ad", "--roi", "0,0,10,10"]
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err

    code, err = run(root / "ST-spotfiles/C5_selection.tsv")
    assert code == 2 and err.startswith("warning: ")
    # every warning is one line (C5's counts lack two spots: said too), the misfit among them
    [fit] = [line for line in err.splitlines() if "fall on glass in 5714_HE_BT_C2.jpg" in line]
    assert fit.startswith("warning: ") and "% of the spots of C5_selection.tsv (" in fit
    assert err.index(fit) < err.index("no spot of")  # said before anything else
    code, err = run(root / "ST-spotfiles/C2_selection.tsv")
    assert code == 2 and "warning:" not in err and "no spot of" in err
    assert not (tmp_path / "x.h5ad").exists()
