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
