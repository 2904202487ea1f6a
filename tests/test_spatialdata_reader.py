"""The napari reader of the SpatialData ``.zarr`` napari-rapacl writes (#14 item 11 -> napari): dragged into
a real viewer it opens as the slide (multiscale, µm) and the predicted spots, as a fresh prediction does;
other zarr stores are left to their own readers."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

napari = pytest.importorskip("napari")
sd = pytest.importorskip("spatialdata")

with contextlib.suppress(ImportError):  # torch's stack before any viewer's GL context (_env.avoid_llvm_clash)
    import timm  # noqa: F401

from helpers import small_prediction  # noqa: E402

GENES = ["ERBB2", "GATA3", "KRT5"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A prediction written by the real exporter (``write_spatialdata``, what ``predict --out x.zarr``
    runs): a 2300 x 2600 px slide at 0.5 µm/px, 40 spots, 3 genes, GATA3 the most reliable."""
    from napari_rapacl.export_spatialdata import write_spatialdata

    folder = tmp_path_factory.mktemp("sdata")
    reliability = {"ERBB2": 0.2, "GATA3": 0.45, "KRT5": 0.1}
    adata, slide, spots, values, img = small_prediction(folder, GENES, reliability, {"model": "stnet_tiny"})
    store = write_spatialdata(adata, folder / "pred.zarr", slide)
    return store, slide, spots, values, img


def test_reader_claims_only_our_spatialdata(written, tmp_path):
    from napari_rapacl._napari import _reader

    store = written[0]
    assert _reader.get_spatialdata_reader(str(store)) is _reader.read_spatialdata
    assert _reader.get_spatialdata_reader(str(store) + "/") is _reader.read_spatialdata
    # another tool's SpatialData (no napari-rapacl provenance in its table): not ours
    import anndata as ad
    import geopandas as gpd
    from shapely import points
    from spatialdata.models import ShapesModel, TableModel

    circles = gpd.GeoDataFrame({"radius": [3.0, 3.0]}, geometry=points([[1, 2], [3, 4]]))
    table = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    table.obs["region"] = "c"
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["instance_id"] = [0, 1]
    parsed = TableModel.parse(table, region="c", region_key="region", instance_key="instance_id")
    other = sd.SpatialData(shapes={"c": ShapesModel.parse(circles)}, tables={"spots": parsed})
    other.write(tmp_path / "other.zarr")
    assert _reader.get_spatialdata_reader(str(tmp_path / "other.zarr")) is None
    # a plain zarr group, an empty folder, a file, a path that does not exist: not ours
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "file.zarr").write_text("x")
    for name in ("plain.zarr", "empty.zarr", "file.zarr", "absent.zarr"):
        assert _reader.get_spatialdata_reader(str(tmp_path / name)) is None, name
    assert _reader.get_spatialdata_reader([str(store), str(store)]) is None


@pytest.mark.gui
def test_dragging_our_zarr_into_napari_gives_the_prediction_layers(written, make_napari_viewer, tmp_path):
    from napari_rapacl._napari._widgets import GeneWidget
    from napari_rapacl._napari.layers import export_arguments
    from napari_rapacl.jobs import prediction_adata

    store, slide, spots, values, img = written
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(store), plugin="napari-rapacl")
    assert [layer._type_string for layer in layers] == ["image", "points"]
    image, points = layers

    # the slide: multiscale RGB in µm, level 0 the slide's pixels, level 1 half of it
    assert image.name == "C2" and image.rgb and image.multiscale
    assert tuple(image.scale) == (0.5, 0.5) and tuple(str(u) for u in image.units) == ("micrometer",) * 2
    assert image.data[0].shape == (2300, 2600, 3) and image.data[1].shape == (1150, 1300, 3)
    np.testing.assert_array_equal(np.asarray(image.data[0][1000:1100, 2000:2100]), img[1000:1100, 2000:2100])
    assert image.metadata["napari_rapacl"]["mpp"] == 0.5

    # the spots: level-0 px (row, col) at the same scale, one feature per gene, values read back
    assert tuple(points.scale) == (0.5, 0.5)
    np.testing.assert_allclose(points.data, np.column_stack([spots.y, spots.x]))
    np.testing.assert_allclose(points.size, 110.0)  # the spot diameter in level-0 px
    assert list(points.features["barcode"]) == list(spots.barcode)
    np.testing.assert_array_equal(points.features[GENES].to_numpy(), values)
    info = points.metadata["napari_rapacl"]
    assert info["kind"] == "spots" and info["genes"] == GENES and info["library_id"] == "C2"
    assert info["base_name"] == "C2 spots" and info["mpp"] == 0.5
    assert info["gene_reliability"] == pytest.approx({"ERBB2": 0.2, "GATA3": 0.45, "KRT5": 0.1})
    assert info["provenance"]["model"] == "stnet_tiny"
    # coloured by the most reliable gene and named as a fresh prediction is
    assert points._face.color_properties.name == "GATA3"
    assert points.name == "C2 predicted: GATA3, log1p(CP10k)"

    # the Genes widget works on it (opens on the most reliable gene, recolours on demand)
    genes_w = GeneWidget(viewer)
    viewer.window.add_dock_widget(genes_w)
    genes_w._layer.value = points
    assert sorted(genes_w._gene.choices) == sorted(GENES)
    genes_w._gene.value = "KRT5"
    assert points._face.color_properties.name == "KRT5"

    # ... and the Export widget's arguments give back the same predictions
    meta = {"features": points.features, "metadata": points.metadata, "name": points.name}
    args = export_arguments(points.data, meta)
    adata = prediction_adata(**args)
    np.testing.assert_array_equal(adata.X, values)
    assert list(adata.obs_names) == list(spots.barcode) and list(adata.var_names) == GENES
    np.testing.assert_allclose(adata.var["val_pearson_r"], [0.2, 0.45, 0.1])
