"""End to end on real data in a real, shown napari viewer (run under Xvfb by scripts/test.sh):
her2st sample -> image-only baseline -> Points coloured by gene via ``features`` -> exported .h5ad."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("napari")

pytestmark = [pytest.mark.gui, pytest.mark.realdata]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, data_dir):
    """A tiny baseline trained briefly on her2st C3 (validated on C4): real weights, made here."""
    from napari_rapacl.datasets import her2st, her2st_genes
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint
    from napari_rapacl.models.fit import fit_patch_regressor
    from napari_rapacl.preprocess import extract_patches, normalize_log1p_cp10k

    genes = her2st_genes()
    model = create_model("stnet_tiny", n_genes=len(genes))
    cfg = model.config
    data = []
    for name in ("C3", "C4"):
        sec = her2st(name)
        data.append(
            (
                extract_patches(sec.slide, sec.spots.x, sec.spots.y, size=cfg.patch_size, mpp=cfg.mpp),
                normalize_log1p_cp10k(sec.spots.counts, genes, missing="zero"),
            )
        )
    fit_patch_regressor(model, *data[0], *data[1], epochs=2, batch_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model, genes=genes)


def test_her2st_sample_predict_colour_export(
    make_napari_viewer, qtbot, tiny_checkpoint, artifacts_dir, tmp_path
):
    import anndata as ad

    from napari_rapacl._napari._widgets import GeneWidget, PredictWidget

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-rapacl", "her2st_c2")
    image, points = viewer.layers["her2st C2"], viewer.layers["her2st C2 spots"]
    assert image.multiscale and image.rgb
    mpp = image.metadata["napari_rapacl"]["mpp"]
    assert 0.6 < mpp < 0.8 and tuple(image.scale) == pytest.approx((mpp, mpp))
    assert tuple(points.scale) == pytest.approx((mpp, mpp))
    assert 170 < len(points.data) < 200 and {"barcode", "radius_px"} <= set(points.features.columns)
    np.testing.assert_allclose(points.size, 2 * points.features["radius_px"].to_numpy())

    # spots sit on tissue: the slide under spot centres is darker than the slide's background
    from napari_rapacl._napari.layers import slide_from_layer

    slide = slide_from_layer(image)
    thumb, f = slide.thumbnail(1000)
    grey = thumb.mean(axis=2)
    yx = np.clip(np.round(points.data * f).astype(int), 0, np.array(grey.shape) - 1)
    under_spots = grey[yx[:, 0], yx[:, 1]]
    background = np.median(grey[grey > np.percentile(grey, 50)])
    assert np.mean(under_spots < background - 15) > 0.9, (under_spots.mean(), background)

    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict expression")
    predict._image.value, predict._spots.value = image, points
    predict._checkpoint.value = str(tiny_checkpoint)
    predict._device.value = "cpu"
    with qtbot.waitSignal(predict.start().finished, timeout=180_000):
        pass
    qtbot.waitUntil(lambda: predict._run.enabled, timeout=10_000)
    genes = points.metadata["napari_rapacl"]["genes"]
    assert len(genes) == 785 and set(genes) <= set(points.features.columns)
    values = points.features[genes].to_numpy()
    assert np.isfinite(values).all() and values.std(axis=0).max() > 0
    assert points.face_color.shape == (len(points.data), 4)
    assert len(np.unique(points.face_color.round(3), axis=0)) > 10, "faces are not coloured by the gene"

    genes_widget = GeneWidget(viewer)
    viewer.window.add_dock_widget(genes_widget, name="Gene colours")
    genes_widget._layer.value = points
    gene = "ERBB2" if "ERBB2" in genes else genes[1]
    genes_widget._gene.value = gene
    assert points._face.color_properties.name == gene

    viewer.camera.center = (0, *np.mean(points.data * mpp, axis=0))
    viewer.camera.zoom = 0.08
    qtbot.wait(300)
    shot = viewer.screenshot(
        str(artifacts_dir / "e2e_her2st_c2_predicted.png"), canvas_only=True, flash=False
    )
    assert shot.std() > 10  # not a blank canvas

    out = tmp_path / "c2_prediction.h5ad"
    written = points.save(str(out), plugin="napari-rapacl")
    assert written and out.exists()
    adata = ad.read_h5ad(out)
    np.testing.assert_array_equal(adata.X, values.astype(np.float32))
    assert list(adata.var_names) == genes
    np.testing.assert_allclose(adata.obsm["spatial"], points.data[:, ::-1])
    lib = adata.uns["spatial"]
    assert len(lib) == 1 and "hires" in next(iter(lib.values()))["images"]
    assert adata.uns["napari_rapacl"]["model"] == "stnet_tiny"
