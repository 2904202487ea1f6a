"""Tests for napari_rapacl.export: AnnData layout, provenance sanitiser, atomic h5ad writing, plots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from napari_rapacl import __version__
from napari_rapacl._errors import (
    CorruptFileError,
    DuplicateBarcodeError,
    RapaclInputError,
    UnsupportedFormatError,
)
from napari_rapacl.export import (
    PROVENANCE_KEY,
    checkpoint_sha256,
    read_prediction_h5ad,
    sanitize_uns,
    to_anndata,
    write_h5ad,
)
from napari_rapacl.io.spots import Spots


def _spots(n=5, **kw) -> Spots:
    return Spots(
        barcode=[f"b{i}" for i in range(n)],
        x=np.arange(n) * 10.0 + 5,
        y=np.arange(n) * 7.0 + 3,
        radius=np.full(n, 4.0),
        array_row=np.arange(n),
        array_col=np.arange(n) * 2,
        **kw,
    )


# --------------------------------------------------------------------------------------------
# sanitiser
# --------------------------------------------------------------------------------------------
CONFIG = {
    "lr": 1e-4,
    "epochs": np.int64(30),
    "scheduler": None,
    "size": (224, 224),
    "encoder_weights": Path("/models/resnet18.pt"),
    "nested": {"dropout": np.float32(0.25), "head": None, "dims": [512, 256]},
    "augment": [{"name": "flip", "p": 0.5}, {"name": "rot90"}],
    "names": ("a", "b"),
    "mixed": [1, "two"],
    "flags": [True, False],
    "use_amp": False,
    "tags": {"b", "a"},
    "empty": [],
    "a/b": 1,
    7: "int key",
}


def test_sanitize_uns_rules():
    s = sanitize_uns(CONFIG)
    assert s["scheduler"] == "None" and s["nested"]["head"] == "None"
    assert isinstance(s["encoder_weights"], str) and s["encoder_weights"] == "/models/resnet18.pt"
    np.testing.assert_array_equal(s["size"], [224, 224])
    assert type(s["epochs"]) is int and type(s["nested"]["dropout"]) is float
    assert s["augment"]["0"] == {"name": "flip", "p": 0.5} and s["augment"]["1"] == {"name": "rot90"}
    assert list(s["names"]) == ["a", "b"] and list(s["mixed"]) == ["1", "two"]
    assert s["flags"].dtype == bool and list(s["tags"]) == ["a", "b"]
    assert "a_b" in s and "a/b" not in s and s["7"] == "int key"
    assert s["empty"].shape == (0,)


def test_sanitized_provenance_survives_h5ad(tmp_path):
    a = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    # unsanitised, anndata refuses it (None / Path / list of dicts)
    a.uns["config"] = CONFIG
    with pytest.raises(Exception):  # noqa: B017 - anndata raises various types here
        a.write_h5ad(tmp_path / "raw.h5ad")
    a.uns["config"] = sanitize_uns(CONFIG)
    write_h5ad(a, tmp_path / "ok.h5ad")
    back = ad.read_h5ad(tmp_path / "ok.h5ad").uns["config"]
    assert back["scheduler"] == "None"
    assert back["encoder_weights"] == "/models/resnet18.pt"
    assert list(back["size"]) == [224, 224]
    assert back["nested"]["dropout"] == pytest.approx(0.25)
    assert list(back["nested"]["dims"]) == [512, 256]
    assert back["augment"]["0"]["name"] == "flip" and back["augment"]["1"]["name"] == "rot90"
    assert bool(back["use_amp"]) is False and back["a_b"] == 1 and back["7"] == "int key"


# --------------------------------------------------------------------------------------------
# to_anndata: layout and validation (no slide)
# --------------------------------------------------------------------------------------------
def test_to_anndata_layout_without_slide():
    spots = _spots(mpp=0.5)
    pred = np.arange(15, dtype=np.float64).reshape(5, 3)
    a = to_anndata(pred, ["G1", "G2", "G3"], spots, library_id="lib1", provenance={"model": "baseline"})
    assert a.X.dtype == np.float32 and a.shape == (5, 3)
    np.testing.assert_array_equal(a.X, pred.astype(np.float32))
    assert list(a.obs_names) == [f"b{i}" for i in range(5)] and list(a.var_names) == ["G1", "G2", "G3"]
    assert list(a.obs["spot_id"]) == list(a.obs_names)
    assert a.obs["library_id"].dtype == "category" and set(a.obs["library_id"]) == {"lib1"}
    assert (a.obs["in_tissue"] == 1).all()
    np.testing.assert_array_equal(a.obs["array_col"], np.arange(5) * 2)
    assert a.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(a.obsm["spatial"], np.column_stack([spots.x, spots.y]))
    lib = a.uns["spatial"]["lib1"]
    assert lib["images"] == {}
    assert lib["scalefactors"] == {"spot_diameter_fullres": 8.0, "microns_per_pixel": 0.5}
    prov = a.uns[PROVENANCE_KEY]
    assert prov["model"] == "baseline" and prov["package_version"] == __version__
    assert prov["normalisation"] == "log1p(CP10k)" and prov["mpp"] == 0.5


def test_to_anndata_validation():
    spots = _spots()
    genes = ["G1", "G2"]
    ok = np.zeros((5, 2))
    with pytest.raises(RapaclInputError, match="4 rows but there are 5 spots"):
        to_anndata(np.zeros((4, 2)), genes, spots)
    with pytest.raises(RapaclInputError, match="3 columns but 2 gene names"):
        to_anndata(np.zeros((5, 3)), genes, spots)
    with pytest.raises(RapaclInputError, match="2-D"):
        to_anndata(np.zeros(5), genes, spots)
    bad = ok.copy()
    bad[1, 1] = np.nan
    with pytest.raises(RapaclInputError, match="1 NaN or infinite"):
        to_anndata(bad, genes, spots)
    with pytest.raises(RapaclInputError, match="listed twice: G1"):
        to_anndata(ok, ["G1", "G1"], spots)
    with pytest.raises(RapaclInputError, match="measured layer 'm' has shape"):
        to_anndata(ok, genes, spots, measured={"m": np.zeros((5, 3))})
    with pytest.raises(RapaclInputError, match="library_id"):
        to_anndata(ok, genes, spots, library_id="a/b")

    class FakeSpots:  # duplicated barcodes (Spots itself refuses them, so use a stand-in)
        barcode = np.array(["a", "a"])
        x = y = radius = np.ones(2)

    with pytest.raises(DuplicateBarcodeError, match="a"):
        to_anndata(np.zeros((2, 2)), genes, FakeSpots())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def test_checkpoint_sha256_streams(tmp_path):
    data = np.random.default_rng(0).bytes(300_001)
    p = tmp_path / "model.pt"
    p.write_bytes(data)
    assert checkpoint_sha256(p, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    assert checkpoint_sha256(p) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint_sha256(tmp_path / "missing.pt")


def _failing_write(self, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\x89HDF\r\n partial")  # write a bit, then fail
    raise OSError("disk full (simulated)")


def test_write_h5ad_is_atomic(tmp_path, monkeypatch):
    a = to_anndata(np.ones((5, 2)), ["G1", "G2"], _spots())
    target = tmp_path / "out" / "pred.h5ad"
    monkeypatch.setattr(ad.AnnData, "write_h5ad", _failing_write)
    with pytest.raises(OSError, match="simulated"):
        write_h5ad(a, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temp file left behind
    monkeypatch.undo()

    # an existing file survives a failed overwrite unchanged
    write_h5ad(a, target)
    before = target.read_bytes()
    monkeypatch.setattr(ad.AnnData, "write_h5ad", _failing_write)
    with pytest.raises(OSError):
        write_h5ad(a, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["pred.h5ad"]


def test_write_h5ad_compression_and_reader_checks(tmp_path):
    a = to_anndata(np.random.default_rng(0).random((5, 2)), ["G1", "G2"], _spots(), provenance={"x": 1})
    p = write_h5ad(a, tmp_path / "gz.h5ad", compression="gzip")
    assert p == tmp_path / "gz.h5ad"
    back = read_prediction_h5ad(p)
    np.testing.assert_array_equal(back.X, a.X)
    with pytest.raises(RapaclInputError, match="compression"):
        write_h5ad(a, tmp_path / "x.h5ad", compression="zstd-ish")
    plain = tmp_path / "plain.h5ad"
    ad.AnnData(np.zeros((2, 2), dtype=np.float32)).write_h5ad(plain)
    with pytest.raises(UnsupportedFormatError, match="obsm\\['spatial'\\]"):
        read_prediction_h5ad(plain)
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(CorruptFileError, match="junk.h5ad"):
        read_prediction_h5ad(junk)
    with pytest.raises(FileNotFoundError):
        read_prediction_h5ad(tmp_path / "nope.h5ad")


# --------------------------------------------------------------------------------------------
# real data: her2st C2 -> h5ad -> scanpy / squidpy
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def c2_h5ad(data_dir, tmp_path_factory):
    from napari_rapacl.datasets import her2st, her2st_genes
    from napari_rapacl.preprocess import normalize_log1p_cp10k

    sec = her2st("C2", data_dir=data_dir)
    genes = her2st_genes(data_dir=data_dir)[:40]
    measured = normalize_log1p_cp10k(sec.spots.counts, genes, name="C2")
    rng = np.random.default_rng(42)
    pred = (measured + rng.normal(0, 0.3, measured.shape)).astype(np.float32)
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.pt"
    ckpt.write_bytes(b"weights")
    prov = {
        "model": "test-model",
        "checkpoint_sha256": checkpoint_sha256(ckpt),
        "config": CONFIG,
        "patch_size": 112,
        "patch_mpp": 1.0,
    }
    adata = to_anndata(
        pred,
        genes,
        sec.spots,
        slide=sec.slide,
        library_id="C2",
        measured={"measured": measured},
        provenance=prov,
    )
    path = write_h5ad(adata, tmp_path_factory.mktemp("h5ad") / "C2_pred.h5ad")
    return sec, genes, pred, measured, path


def test_her2st_roundtrip(c2_h5ad):
    sec, genes, pred, measured, path = c2_h5ad
    a = ad.read_h5ad(path)
    assert a.X.dtype == np.float32 and a.X.tobytes() == pred.tobytes()  # bit-for-bit
    assert list(a.var_names) == genes
    assert list(a.obs_names) == list(sec.spots.barcode) == list(a.obs["spot_id"])
    np.testing.assert_array_equal(a.obsm["spatial"], np.column_stack([sec.spots.x, sec.spots.y]))
    np.testing.assert_array_equal(a.layers["measured"], measured)
    np.testing.assert_array_equal(a.obs["array_row"], sec.spots.array_row)
    lib = a.uns["spatial"]["C2"]
    sf = lib["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(2 * np.median(sec.spots.radius))
    assert sf["microns_per_pixel"] == pytest.approx(sec.slide.mpp)
    h, w = sec.slide.shape
    hires, lowres = lib["images"]["hires"], lib["images"]["lowres"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) == 2000 and hires.shape[2] == 3
    assert max(lowres.shape[:2]) == 600
    assert sf["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / w, rel=2e-3)
    assert sf["tissue_lowres_scalef"] == pytest.approx(lowres.shape[1] / w, rel=5e-3)
    assert lib["metadata"]["source_image_path"] == str(sec.slide.path)
    prov = a.uns[PROVENANCE_KEY]
    assert prov["model"] == "test-model"
    assert prov["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert prov["config"]["scheduler"] == "None" and list(prov["config"]["size"]) == [224, 224]
    assert prov["patch_size"] == 112 and prov["mpp"] == pytest.approx(sec.slide.mpp)
    assert prov["normalisation"] == "log1p(CP10k)" and prov["package_version"] == __version__
    assert "T" in prov["created"]
    # spots sit on tissue in the hires image: darker under the spots than in the image corners
    s = sf["tissue_hires_scalef"]
    xs = np.clip(np.round(a.obsm["spatial"][:, 0] * s).astype(int), 0, hires.shape[1] - 1)
    ys = np.clip(np.round(a.obsm["spatial"][:, 1] * s).astype(int), 0, hires.shape[0] - 1)
    under = hires[ys, xs].mean(axis=1)
    corners = np.concatenate([hires[:50, :50], hires[:50, -50:], hires[-50:, :50], hires[-50:, -50:]])
    assert np.median(under) < corners.mean() - 30
    json.dumps({k: str(v) for k, v in prov.items()})  # plain enough to show in a GUI
    assert read_prediction_h5ad(path).n_obs == len(sec.spots)


def _n_points(ax) -> int:
    return sum(len(c.get_paths()) for c in ax.collections)


def test_her2st_plots_scanpy_squidpy(c2_h5ad, artifacts_dir, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = pytest.importorskip("scanpy")
    sec, genes, pred, measured, path = c2_h5ad
    a = ad.read_h5ad(path)
    gene = genes[int(np.argmax(measured.var(axis=0)))]

    axes = sc.pl.spatial(a, color=gene, library_id="C2", img_key="hires", show=False)
    ax = axes[0]
    assert _n_points(ax) == a.n_obs
    assert len(ax.images) == 1  # the H&E is drawn under the spots
    ax.figure.savefig(artifacts_dir / "export_C2_scanpy_spatial.png", dpi=90)
    plt.close("all")

    sq = pytest.importorskip("squidpy")
    ax = sq.pl.spatial_scatter(a, color=gene, library_id="C2", img_res_key="hires", return_ax=True)
    ax = ax[0] if isinstance(ax, (list, tuple, np.ndarray)) else ax
    assert _n_points(ax) == a.n_obs
    assert len(ax.images) == 1
    ax.figure.savefig(artifacts_dir / "export_C2_squidpy_spatial_scatter.png", dpi=90)
    plt.close("all")


def test_write_atomic_leaves_the_old_file_or_the_new_one_never_a_half(tmp_path):
    from napari_rapacl._atomic import write_atomic, write_text_atomic

    path = tmp_path / "out.txt"
    write_text_atomic(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert write_atomic(path, lambda tmp: tmp.write_text("new"), suffix=".tmp.txt") == path
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_writes_honour_the_umask_and_clean_stale_temporaries(tmp_path):
    """#14 items 3 and 9: outputs get 0666 less the umask (not mkstemp's 0600), a replaced file keeps
    its permissions, and temporary files that killed writes left beside a target are removed by the
    next write to it once they are stale (a fresh one, perhaps another writer's, is kept)."""
    import os
    import time

    from napari_rapacl import _atomic
    from napari_rapacl._atomic import write_text_atomic

    old = os.umask(0o002)
    try:
        new = write_text_atomic(tmp_path / "new.txt", "x")
        assert new.stat().st_mode & 0o777 == 0o664
        shared = tmp_path / "shared.txt"
        shared.write_text("old")
        shared.chmod(0o644)
        write_text_atomic(shared, "new")
        assert shared.stat().st_mode & 0o777 == 0o644 and shared.read_text() == "new"
    finally:
        os.umask(old)
    stale, fresh = tmp_path / ".shared.txt.abc123.tmp", tmp_path / ".shared.txt.def456.tmp"
    stale.write_text("killed mid-write")
    fresh.write_text("being written")
    t = time.time() - _atomic.STALE_SECONDS - 60
    os.utime(stale, (t, t))
    write_text_atomic(shared, "again")
    assert not stale.exists() and fresh.exists() and shared.read_text() == "again"


def test_replace_dir_never_leaves_neither(tmp_path, monkeypatch):
    """#14 item 3 (``segment --overwrite`` of a .zarr): the old folder is renamed aside, the new one
    renamed in, then the old one deleted; if the rename-in fails the old folder is put back."""
    import os

    from napari_rapacl import _atomic

    target, new = tmp_path / "cells.zarr", tmp_path / ".cells.zarr.new.tmp"
    target.mkdir()
    (target / "old").write_text("old labels")
    new.mkdir()
    (new / "new").write_text("new labels")
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", fail_second)
    with pytest.raises(OSError, match="No space"):
        _atomic.replace_dir(new, target)
    monkeypatch.undo()
    assert (target / "old").read_text() == "old labels" and new.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cells.zarr.new.tmp", "cells.zarr"]
    _atomic.replace_dir(new, target)
    assert (target / "new").read_text() == "new labels" and not (target / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr"]


def test_gene_reliability_goes_into_var_and_survives_h5ad(tmp_path):
    """Per-gene validation r from the checkpoint lands in var['val_pearson_r'] (NaN where unknown or
    constant), with a note in uns; None gives no column at all."""
    from napari_rapacl.jobs._export import RELIABILITY_KEY, prediction_adata

    spots = _spots(mpp=0.5)
    pred = np.arange(15, dtype=np.float32).reshape(5, 3)
    genes = ["ERBB2", "GATA3", "KRT5"]
    reliability = {"ERBB2": 0.61, "GATA3": float("nan"), "OTHER": 0.9}  # KRT5 missing, OTHER not a gene
    a = prediction_adata(pred, genes, spots, library_id="lib", gene_reliability=reliability)
    out = write_h5ad(a, tmp_path / "p.h5ad")
    back = read_prediction_h5ad(out)
    r = back.var[RELIABILITY_KEY].to_numpy()
    assert r.dtype == np.float64 and r[0] == pytest.approx(0.61)
    assert np.isnan(r[1]) and np.isnan(r[2])
    note = back.uns[PROVENANCE_KEY]["gene_reliability"]
    assert "validation" in note and RELIABILITY_KEY in note
    plain = prediction_adata(pred, genes, spots, library_id="lib", gene_reliability=None)
    assert RELIABILITY_KEY not in plain.var and "gene_reliability" not in plain.uns[PROVENANCE_KEY]
    empty = prediction_adata(pred, genes, spots, library_id="lib", gene_reliability={})
    assert RELIABILITY_KEY not in empty.var
