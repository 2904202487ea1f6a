"""SpatialData export (#14 item 11): slide as a multiscale r,g,b image, spots as circles with radius, the
prediction table linked by region/instance_id; written atomically and read back with spatialdata.read_zarr."""

from __future__ import annotations

import numpy as np
import pytest

sd = pytest.importorskip("spatialdata")
from helpers import small_prediction  # noqa: E402


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    return small_prediction(folder, ["ERBB2", "GATA3", "KRT5"], {"ERBB2": 0.4, "GATA3": 0.2})[:4]


def test_spatialdata_round_trip(prediction, tmp_path):
    from spatialdata.transformations import get_transformation

    from napari_rapacl.export_spatialdata import read_spatialdata_prediction, write_spatialdata

    adata, slide, spots, values = prediction
    out = write_spatialdata(adata, tmp_path / "pred.zarr", slide)
    sdata = sd.read_zarr(out)

    # image: multiscale (c, y, x) with r,g,b channels, level 0 equal to the slide, levels by 2
    image = sdata.images["C2_wsi"]
    scale0 = image["scale0"]["image"]
    assert scale0.dims == ("c", "y", "x") and list(scale0.coords["c"].values) == ["r", "g", "b"]
    np.testing.assert_array_equal(np.asarray(scale0).transpose(1, 2, 0), np.asarray(slide.levels[0]))
    assert image["scale1"]["image"].shape == (3, 1150, 1300)
    # the um system scales level-0 px by the slide's pixel size, for the image and the circles alike
    for element in (image, sdata.shapes["C2_spots"]):
        assert (
            get_transformation(element, to_coordinate_system="global")
            .to_affine_matrix(("x", "y"), ("x", "y"))
            .tolist()
            == np.eye(3).tolist()
        )
        um = get_transformation(element, to_coordinate_system="um").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(np.diag(um)[:2], [0.5, 0.5])

    # circles: centres and radii in level-0 px
    circles = sdata.shapes["C2_spots"]
    np.testing.assert_allclose(circles.geometry.x, spots.x)
    np.testing.assert_allclose(circles.geometry.y, spots.y)
    np.testing.assert_allclose(circles["radius"], 55.0)

    # table: annotates the circles through region / instance_id, genes in var
    table = sdata.tables["spots"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "C2_spots" and attrs["region_key"] == "region"
    assert attrs["instance_key"] == "instance_id"
    assert table.obs["region"].dtype == "category"
    np.testing.assert_array_equal(table.obs["instance_id"], circles.index)
    assert list(table.var_names) == ["ERBB2", "GATA3", "KRT5"]
    np.testing.assert_allclose(table.var["val_pearson_r"].to_numpy()[:2], [0.4, 0.2])
    np.testing.assert_array_equal(np.asarray(table.X), values)
    assert list(table.obs_names) == list(spots.barcode)
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([spots.x, spots.y]))
    assert "hires" in table.uns["spatial"]["C2"]["images"]  # the legacy scanpy/squidpy view is kept

    back, back_table = read_spatialdata_prediction(out)
    assert back_table.n_obs == 40 and "C2_spots" in back.shapes


def test_spatialdata_write_is_atomic_and_refuses_bad_targets(prediction, tmp_path, monkeypatch):
    from napari_rapacl._errors import CorruptFileError, RapaclInputError, UnsupportedFormatError
    from napari_rapacl.export_spatialdata import read_spatialdata_prediction, write_spatialdata

    adata, _, _, _ = prediction
    out = write_spatialdata(adata, tmp_path / "p.zarr")  # no slide: no image element
    assert not sd.read_zarr(out).images
    with pytest.raises(RapaclInputError, match="already exists"):
        write_spatialdata(adata, out)
    with pytest.raises(RapaclInputError, match=r"\*\.zarr"):
        write_spatialdata(adata, tmp_path / "p.h5ad")

    # a failure while writing leaves the old store in place and no temporary folder
    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        write_spatialdata(adata, out, overwrite=True)
    monkeypatch.undo()
    assert read_spatialdata_prediction(out)[1].n_obs == adata.n_obs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]

    with pytest.raises(FileNotFoundError):
        read_spatialdata_prediction(tmp_path / "none.zarr")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises((CorruptFileError, UnsupportedFormatError)):
        read_spatialdata_prediction(tmp_path / "junk.zarr")


def test_the_slide_image_reports_progress_while_it_is_written(prediction, tmp_path, monkeypatch):
    """The slide's pyramid is one spatialdata call: its chunks are counted (dask callbacks) and reported
    while it runs; a failure inside it, or a cancel, leaves no temporary folder."""
    import napari_rapacl.export_spatialdata as esd

    adata, slide, _, _ = prediction
    monkeypatch.setattr(esd, "IMAGE_PROGRESS_S", 0.005)
    steps = list(esd.iter_write_spatialdata(adata, tmp_path / "p.zarr", slide))
    image = [p for p in steps if p.stage == "spatialdata image"]
    assert len(image) >= 2 and image[-1].done > image[0].done and image[-1].total > 1, image
    assert all(p.done <= p.total for p in image)
    assert sd.read_zarr(tmp_path / "p.zarr").images

    def boom(self, name, *a, **k):
        raise OSError(f"disk full while writing {name}")

    monkeypatch.setattr(sd.SpatialData, "write_element", boom)
    with pytest.raises(OSError, match="disk full while writing C2_wsi"):
        list(esd.iter_write_spatialdata(adata, tmp_path / "q.zarr", slide))
    monkeypatch.undo()
    monkeypatch.setattr(esd, "IMAGE_PROGRESS_S", 0.005)
    gen = esd.iter_write_spatialdata(adata, tmp_path / "r.zarr", slide)
    for p in gen:
        if p.stage == "spatialdata image":
            gen.close()  # cancelled while the image is written
            break
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]
