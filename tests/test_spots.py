"""Tests for napari_rapacl.io.spots: the four spot formats on real files, and bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_rapacl._errors import (
    DuplicateBarcodeError,
    InvalidCountsError,
    NoOverlapError,
    RapaclInputError,
    SpotsOutsideImageError,
    UnsupportedFormatError,
)
from napari_rapacl.io.spots import Spots, read_10x_h5, read_spots

VISIUM_DIAMETER = 89.42751063343188  # spot_diameter_fullres in the crop's scalefactors_json.json


def _raw_st_row(counts_gz: Path, barcode: str) -> dict[str, int]:
    """One spot's counts parsed straight from the tsv.gz, independent of the reader."""
    with gzip.open(counts_gz, "rt") as fh:
        genes = fh.readline().rstrip("\n").split("\t")[1:]
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if fields[0] == barcode:
                return dict(zip(genes, (int(v) for v in fields[1:]), strict=True))
    raise AssertionError(f"{barcode} not in {counts_gz}")


def _axis_neighbour_px(sel: pd.DataFrame) -> float:
    """Median pixel distance between spots one grid step apart (x+1 or y+1)."""
    pos = {(a, b): (px, py) for a, b, px, py in zip(sel.x, sel.y, sel.pixel_x, sel.pixel_y, strict=True)}
    d = [
        np.hypot(pos[n][0] - px, pos[n][1] - py)
        for (a, b), (px, py) in pos.items()
        for n in ((a + 1, b), (a, b + 1))
        if n in pos
    ]
    return float(np.median(d))


@pytest.fixture(scope="module")
def her2st_dir(data_dir: Path) -> Path:
    return data_dir / "her2st" / "data"


@pytest.fixture(scope="module")
def visium_dir(data_dir: Path) -> Path:
    return data_dir / "visium_mouse_brain_crop"


@pytest.fixture(scope="module")
def c2(her2st_dir: Path) -> Spots:
    return read_spots(her2st_dir / "ST-spotfiles" / "C2_selection.tsv")


# --------------------------------------------------------------------------------------------
# legacy ST (her2st)
# --------------------------------------------------------------------------------------------
def test_her2st_c2(c2: Spots, her2st_dir: Path):
    sel = pd.read_csv(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    assert 178 <= len(c2) <= 187
    assert c2.counts is not None
    assert c2.counts.shape[0] == len(c2) and c2.counts.shape[1] > 15000
    assert sp.issparse(c2.counts.X) and c2.counts.X.dtype == np.float32
    assert list(c2.counts.obs_names) == list(c2.barcode)
    assert c2.counts.var_names.is_unique
    # positions: pixel_x is the column, pixel_y the row; grid x/y go to array_col/array_row
    row = sel[(sel.x == 24) & (sel.y == 13)].iloc[0]
    i = list(c2.barcode).index("24x13")
    assert c2.x[i] == pytest.approx(row.pixel_x) and c2.y[i] == pytest.approx(row.pixel_y)
    assert (c2.array_col[i], c2.array_row[i]) == (24, 13)
    # barcode join: counts of this spot equal the raw tsv row
    raw = _raw_st_row(her2st_dir / "ST-cnts" / "C2.tsv.gz", "24x13")
    for gene in ("ERBB2", "GAPDH"):
        assert c2.counts[i, gene].X.toarray().item() == raw[gene]
    assert c2.counts.X[i].sum() == sum(raw.values())
    # pixel size from the grid: 200 um centre spacing (~290 px along the grid axes here)
    assert 0.65 < c2.mpp < 0.75
    assert 200.0 / c2.mpp == pytest.approx(_axis_neighbour_px(sel), rel=0.03)
    assert np.allclose(c2.radius, 50.0 / c2.mpp)
    assert 65 < c2.radius[0] < 78


def test_her2st_c4_drops_spots_without_counts(her2st_dir: Path):
    sel = her2st_dir / "ST-spotfiles" / "C4_selection.tsv"
    with pytest.warns(UserWarning, match=r"3 of 187 spots .* no counts"):
        spots = read_spots(sel)
    assert len(spots) == 184 == spots.counts.n_obs
    assert "17x14" not in set(spots.barcode)
    raw = _raw_st_row(her2st_dir / "ST-cnts" / "C4.tsv.gz", spots.barcode[100])
    assert spots.counts.X[100].sum() == sum(raw.values())
    # the counts file as the path finds its spot file by the her2st layout; counts= overrides nothing
    with pytest.warns(UserWarning):
        again = read_spots(her2st_dir / "ST-cnts" / "C4.tsv.gz")
    assert np.array_equal(again.barcode, spots.barcode)
    with pytest.warns(UserWarning):
        explicit = read_spots(sel, counts=her2st_dir / "ST-cnts" / "C4.tsv.gz", radius=10)
    assert np.array_equal(explicit.barcode, spots.barcode) and np.all(explicit.radius == 10)


def test_her2st_selection_without_counts(tmp_path: Path, her2st_dir: Path):
    sel = tmp_path / "C2_selection.tsv"
    shutil.copy(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sel)
    spots = read_spots(sel)
    assert spots.counts is None and len(spots) == 187 and spots.mpp is not None


# --------------------------------------------------------------------------------------------
# Space Ranger
# --------------------------------------------------------------------------------------------
def test_visium_folder(visium_dir: Path):
    spots = read_spots(visium_dir)
    assert len(spots) == 100
    assert spots.counts.shape == (100, 100)
    assert np.allclose(spots.radius, VISIUM_DIAMETER / 2)
    assert spots.mpp == pytest.approx(55.0 / VISIUM_DIAMETER)
    i = list(spots.barcode).index("AAACAAGTATCTCCCA-1")  # AAACAAGTATCTCCCA-1,1,50,102,8513,9811
    assert (spots.x[i], spots.y[i]) == (9811.0, 8513.0)
    assert (spots.array_row[i], spots.array_col[i]) == (50, 102)
    assert "gene_ids" in spots.counts.var and spots.counts.var_names.is_unique
    # the join: each spot's counts equal the h5 column of its barcode
    with h5py.File(visium_dir / "filtered_feature_bc_matrix.h5") as f:
        g = f["matrix"]
        n_feat, n_bc = g["shape"][:]
        raw = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_feat, n_bc))
        raw_bc = list(g["barcodes"][:].astype(str))
    for j in (0, 37, 99):
        col = raw[:, raw_bc.index(spots.barcode[j])].toarray().ravel()
        assert np.array_equal(spots.counts.X[j].toarray().ravel(), col)
    # the spatial/ subfolder and the positions CSV read the same
    for other in (visium_dir / "spatial", visium_dir / "spatial" / "tissue_positions_list.csv"):
        assert np.array_equal(read_spots(other).barcode, spots.barcode)


def test_spaceranger_new_layout_in_tissue_and_join(tmp_path: Path, visium_dir: Path):
    old = pd.read_csv(visium_dir / "spatial" / "tissue_positions_list.csv", header=None)
    old.columns = [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    old.loc[:9, "in_tissue"] = 0
    extra = old.iloc[:1].copy()
    extra["barcode"] = "NOTINH5-1"
    extra["in_tissue"] = 1
    new = pd.concat([old, extra], ignore_index=True)
    (tmp_path / "spatial").mkdir()
    new.to_csv(tmp_path / "spatial" / "tissue_positions.csv", index=False)
    shutil.copy(visium_dir / "spatial" / "scalefactors_json.json", tmp_path / "spatial")
    shutil.copy(visium_dir / "filtered_feature_bc_matrix.h5", tmp_path)
    with pytest.warns(UserWarning, match="1 of 91 spots"):
        spots = read_spots(tmp_path)
    assert len(spots) == 90 and spots.counts.n_obs == 90
    assert set(spots.barcode) == set(old.barcode[10:])
    # without the h5: in_tissue spots only, no counts
    (tmp_path / "filtered_feature_bc_matrix.h5").unlink()
    spots = read_spots(tmp_path)
    assert len(spots) == 91 and spots.counts is None


def test_read_10x_h5_gene_expression_only(tmp_path: Path, visium_dir: Path):
    path = tmp_path / "m.h5"
    shutil.copy(visium_dir / "filtered_feature_bc_matrix.h5", path)
    with h5py.File(path, "r+") as f:
        kinds = f["matrix/features/feature_type"][:]
        kinds[:5] = b"Antibody Capture"
        del f["matrix/features/feature_type"]
        f["matrix/features/feature_type"] = kinds
    assert read_10x_h5(path).n_vars == 95
    assert read_10x_h5(path, gene_expression_only=False).n_vars == 100


# --------------------------------------------------------------------------------------------
# AnnData (.h5ad)
# --------------------------------------------------------------------------------------------
def test_h5ad(visium_dir: Path):
    path = visium_dir / "test_data.h5ad"
    with pytest.warns(UserWarning, match="not integers"):
        spots = read_spots(path)
    src = ad.read_h5ad(path)
    assert len(spots) == 49 == spots.counts.n_obs
    assert np.array_equal(spots.barcode, np.asarray(src.obs_names))
    assert np.allclose(np.c_[spots.x, spots.y], src.obsm["spatial"])
    d = src.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"]["spot_diameter_fullres"]
    assert np.allclose(spots.radius, d / 2)
    assert spots.mpp == pytest.approx(55.0 / d)  # metadata says spaceranger -> Visium
    assert np.allclose(spots.counts.X.toarray(), src.X.toarray())


def _small_adata(n: int = 4) -> ad.AnnData:
    X = sp.csr_matrix(np.arange(n * 3, dtype=np.float32).reshape(n, 3))
    obs = pd.DataFrame(index=[f"b{i}" for i in range(n)])
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=list("ABC")))
    a.obsm["spatial"] = np.c_[np.arange(n) * 10.0 + 5, np.arange(n) * 20.0 + 5]
    return a


def test_h5ad_hest_layout_and_counts_layer(tmp_path: Path):
    a = _small_adata()
    a.layers["counts"] = a.X * 2
    a.obs["array_row"] = [0, 1, 2, 3]
    a.obs["array_col"] = [3, 2, 1, 0]
    a.uns["spatial"] = {
        "ST": {"scalefactors": {"spot_diameter_fullres": 30.0, "tissue_downscaled_fullres_scalef": 0.1}}
    }
    path = tmp_path / "hest.h5ad"
    a.write_h5ad(path)
    spots = read_spots(path)
    assert np.allclose(spots.radius, 15.0)
    assert spots.mpp is None  # not said to be Visium, no microns_per_pixel
    assert np.array_equal(spots.counts.X.toarray(), a.layers["counts"].toarray())
    assert list(spots.array_row) == [0, 1, 2, 3] and list(spots.array_col) == [3, 2, 1, 0]
    a.uns["spatial"]["ST"]["scalefactors"]["microns_per_pixel"] = 0.5
    a.write_h5ad(path)
    assert read_spots(path).mpp == 0.5


def test_h5ad_without_scalefactors_needs_radius(tmp_path: Path):
    path = tmp_path / "bare.h5ad"
    _small_adata().write_h5ad(path)
    with pytest.raises(RapaclInputError, match=r"bare\.h5ad.*radius="):
        read_spots(path)
    assert np.allclose(read_spots(path, radius=7).radius, 7)


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------
def test_csv_from_her2st_coordinates(tmp_path: Path, c2: Spots, her2st_dir: Path):
    table = pd.DataFrame({"Barcode": c2.barcode, "X": c2.x, "Y": c2.y})
    path = tmp_path / "spots.csv"
    table.to_csv(path, index=False)
    spots = read_spots(path, radius=70, counts=her2st_dir / "ST-cnts" / "C2.tsv.gz")
    assert np.array_equal(spots.barcode, c2.barcode)
    assert np.allclose(spots.x, c2.x) and np.allclose(spots.y, c2.y) and np.all(spots.radius == 70)
    assert (spots.counts.X != c2.counts.X).nnz == 0
    # radius column, no barcode column
    table = pd.DataFrame({"x": c2.x[:5], "y": c2.y[:5], "radius": np.arange(1, 6)})
    table.to_csv(path, index=False)
    spots = read_spots(path)
    assert list(spots.barcode) == [f"spot_{i}" for i in range(5)]
    assert list(spots.radius) == [1, 2, 3, 4, 5] and spots.counts is None


def test_spots_subset_and_dataframe(c2: Spots):
    mask = c2.x > np.median(c2.x)
    sub = c2.subset(mask)
    assert len(sub) == mask.sum() == sub.counts.n_obs
    assert list(sub.counts.obs_names) == list(sub.barcode)
    idx = np.array([5, 0, 3])
    sub = c2.subset(idx)
    assert list(sub.barcode) == list(c2.barcode[idx])
    assert (c2.counts.X[idx] != sub.counts.X).nnz == 0
    df = c2.to_dataframe()
    assert list(df.columns) == ["barcode", "x", "y", "radius", "array_row", "array_col"]
    assert list(df.index) == list(c2.barcode)
    c2.check_inside((10_000, 10_000))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _write_counts(path: Path, barcodes: list[str], values: list[list[str]]) -> Path:
    lines = ["\tG1\tG2"] + ["\t".join([b, *v]) for b, v in zip(barcodes, values, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_csv(path: Path, rows: list[tuple], header: str = "barcode,x,y,radius") -> Path:
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def test_duplicate_barcodes(tmp_path: Path):
    path = _write_csv(tmp_path / "dup.csv", [("a", 1, 1, 2), ("b", 2, 2, 2), ("a", 3, 3, 2)])
    with pytest.raises(DuplicateBarcodeError, match=r"dup\.csv.*'a'"):
        read_spots(path)
    ok = _write_csv(tmp_path / "ok.csv", [("a", 1, 1, 2), ("b", 2, 2, 2)])
    counts = _write_counts(tmp_path / "c.tsv", ["a", "a"], [["1", "2"], ["3", "4"]])
    with pytest.raises(DuplicateBarcodeError, match=r"c\.tsv"):
        read_spots(ok, counts=counts)


def test_no_overlap(tmp_path: Path):
    pos = _write_csv(tmp_path / "pos.csv", [("a", 1, 1, 2), ("b", 2, 2, 2)])
    counts = _write_counts(tmp_path / "c.tsv", ["x", "y"], [["1", "2"], ["3", "4"]])
    with pytest.raises(NoOverlapError, match=r"c\.tsv.*pos\.csv.*share no barcode"):
        read_spots(pos, counts=counts)


@pytest.mark.parametrize("bad", ["", "nan", "inf"])
def test_nan_counts(tmp_path: Path, bad: str):
    pos = _write_csv(tmp_path / "pos.csv", [("a", 1, 1, 2), ("b", 2, 2, 2)])
    counts = _write_counts(tmp_path / "c.tsv", ["a", "b"], [["1", bad], ["3", "4"]])
    with pytest.raises(InvalidCountsError, match=r"c\.tsv.*NaN or infinite"):
        read_spots(pos, counts=counts)


def test_negative_and_text_counts(tmp_path: Path):
    pos = _write_csv(tmp_path / "pos.csv", [("a", 1, 1, 2), ("b", 2, 2, 2)])
    counts = _write_counts(tmp_path / "c.tsv", ["a", "b"], [["1", "-2"], ["3", "4"]])
    with pytest.raises(InvalidCountsError, match=r"c\.tsv.*negative"):
        read_spots(pos, counts=counts)
    counts = _write_counts(tmp_path / "t.tsv", ["a", "b"], [["1", "two"], ["3", "4"]])
    with pytest.raises(InvalidCountsError, match=r"t\.tsv.*G2"):
        read_spots(pos, counts=counts)


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_spots(tmp_path / "nope.csv")
    pos = _write_csv(tmp_path / "pos.csv", [("a", 1, 1, 2)])
    with pytest.raises(FileNotFoundError, match="gone.tsv"):
        read_spots(pos, counts=tmp_path / "gone.tsv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tissue_positions"):
        read_spots(tmp_path / "empty")


def test_unsupported_format(tmp_path: Path):
    path = tmp_path / "spots.xyz"
    path.write_text("1 2 3\n")
    with pytest.raises(UnsupportedFormatError, match=r"spots\.xyz"):
        read_spots(path)
    path = _write_csv(tmp_path / "cols.csv", [(1, 2)], header="row,col")
    with pytest.raises(UnsupportedFormatError, match=r"cols\.csv.*x, y"):
        read_spots(path)


def test_csv_without_radius(tmp_path: Path):
    path = _write_csv(tmp_path / "norad.csv", [(1.0, 2.0), (3.0, 4.0)], header="x,y")
    with pytest.raises(RapaclInputError, match=r"norad\.csv.*radius="):
        read_spots(path)
    assert np.all(read_spots(path, radius=5).radius == 5)


def test_bad_coordinates_and_radius(tmp_path: Path):
    path = _write_csv(tmp_path / "nan.csv", [("a", 1, "", 2), ("b", 2, 2, 2)])
    with pytest.raises(RapaclInputError, match=r"nan\.csv.*NaN"):
        read_spots(path)
    path = _write_csv(tmp_path / "zero.csv", [("a", 1, 1, 0), ("b", 2, 2, 2)])
    with pytest.raises(RapaclInputError, match=r"zero\.csv.*radius"):
        read_spots(path)
    path = _write_csv(tmp_path / "ok.csv", [(1, 1), (2, 2)], header="x,y")
    with pytest.raises(RapaclInputError, match="radius"):
        read_spots(path, radius=-3)


def test_check_inside(tmp_path: Path):
    path = _write_csv(tmp_path / "s.csv", [("a", 10, 10, 2), ("b", 50, 10, 2), ("c", 10, 99.5, 2)])
    spots = read_spots(path)
    spots.check_inside((100, 51))
    with pytest.raises(SpotsOutsideImageError, match=r"2 of 3 spots from .*s\.csv.*'b'"):
        spots.check_inside((99, 50), name="slide.tif")


def test_counts_order_follows_spots(tmp_path: Path):
    pos = _write_csv(tmp_path / "pos.csv", [("b", 1, 1, 2), ("c", 2, 2, 2), ("a", 3, 3, 2)])
    values = [["1", "0"], ["2", "0"], ["3", "0"], ["9", "9"]]
    counts = _write_counts(tmp_path / "c.tsv", ["a", "b", "c", "z"], values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spots = read_spots(pos, counts=counts)
    assert list(spots.counts.obs_names) == ["b", "c", "a"]
    assert spots.counts.X[:, 0].toarray().ravel().tolist() == [2, 3, 1]


def test_spaceranger_positions_without_scalefactors(tmp_path: Path, visium_dir: Path):
    (tmp_path / "spatial").mkdir()
    shutil.copy(visium_dir / "spatial" / "tissue_positions_list.csv", tmp_path / "spatial")
    with pytest.raises(RapaclInputError, match="scalefactors_json.json.*radius="):
        read_spots(tmp_path)
    spots = read_spots(tmp_path, radius=40)
    assert spots.mpp is None and np.all(spots.radius == 40)
    json.dumps(spots.to_dataframe().iloc[0].to_dict(), default=str)


def test_visium_hd_binned_outputs(data_dir, tmp_path):
    """#14 item 11: a Visium HD bin folder (binned_outputs/square_008um: spatial/tissue_positions.parquet,
    scalefactors_json.json with microns_per_pixel and the bin size, filtered_feature_bc_matrix.h5) is
    read as spots; the outs folder with several bin sizes is refused with the choices. Built from the
    real Visium crop's files in the Visium HD layout."""
    import json
    import shutil

    import pandas as pd

    from napari_rapacl._errors import UnsupportedFormatError
    from napari_rapacl.io import read_spots

    crop = data_dir / "visium_mouse_brain_crop"
    visium = read_spots(crop)
    outs = tmp_path / "outs"
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    positions = pd.read_csv(crop / "spatial" / "tissue_positions_list.csv", header=None, names=cols)
    for size_um in (8, 16):
        folder = outs / "binned_outputs" / f"square_{size_um:03d}um"
        (folder / "spatial").mkdir(parents=True)
        positions.to_parquet(folder / "spatial" / "tissue_positions.parquet")
        shutil.copy(crop / "filtered_feature_bc_matrix.h5", folder / "filtered_feature_bc_matrix.h5")
        mpp = 0.2738
        factors = {"spot_diameter_fullres": size_um / mpp, "bin_size_um": size_um, "microns_per_pixel": mpp}
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    with pytest.raises(
        UnsupportedFormatError, match=r"several sizes: choose one.*square_008um.*square_016um"
    ):
        read_spots(outs)
    bins = read_spots(outs / "binned_outputs" / "square_008um")
    assert list(bins.barcode) == list(visium.barcode) and bins.counts is not None
    np.testing.assert_array_equal(bins.x, visium.x)
    assert bins.mpp == pytest.approx(0.2738) and np.allclose(bins.radius, 4 / 0.2738)

    def dense(counts):
        return counts.X.toarray() if hasattr(counts.X, "toarray") else np.asarray(counts.X)

    np.testing.assert_array_equal(dense(bins.counts), dense(visium.counts))
    assert list(bins.counts.var_names) == list(visium.counts.var_names)
    # the positions file itself also opens
    alone = read_spots(outs / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet")
    assert len(alone) == len(visium) and np.allclose(alone.radius, 8 / 0.2738)
