"""#14 item 10 at a reduced scale: exporting many spots x genes keeps memory bounded (no dense copy of X,
in memory or out of core) and reports progress in several steps; a cancel mid-write leaves nothing."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pytest

from napari_rapacl import export
from napari_rapacl._errors import RapaclInputError
from napari_rapacl.io.spots import Spots

N, G = 100_000, 300  # X is 120 MB of float32


def _spots(n: int = N) -> Spots:
    rng = np.random.default_rng(0)
    return Spots(
        barcode=np.array([f"s_{i:07d}" for i in range(n)]),
        x=rng.uniform(0, 5e4, n),
        y=rng.uniform(0, 5e4, n),
        radius=np.full(n, 8.0),
        mpp=0.5,
    )


@pytest.fixture(scope="module")
def values():
    return np.random.default_rng(1).normal(size=(N, G)).astype(np.float32)


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_of_many_spots_makes_no_dense_copy(values, tmp_path):
    genes = [f"G{i}" for i in range(G)]
    spots = _spots()
    adata, peak_build = _peak(lambda: export.to_anndata(values, genes, spots, library_id="hd"))
    assert adata.X is values  # float32 C-contiguous: used as it is
    out, peak_write = _peak(lambda: export.write_h5ad(adata, tmp_path / "big.h5ad"))
    x_bytes = values.nbytes
    # obs (100k barcodes) costs ~25 MB; any copy of X (or a bool mask of its size) would add >= 30 MB
    mb = 2**20
    assert peak_build < 0.4 * x_bytes, f"build peak {peak_build / mb:.0f} MB for X of {x_bytes / mb:.0f}"
    assert peak_write < 0.25 * x_bytes, f"write peak {peak_write / mb:.0f} MB for X of {x_bytes / mb:.0f}"
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.X, values)
    assert list(back.var_names) == genes and back.obs_names[-1] == f"s_{N - 1:07d}"


def test_out_of_core_predictions_are_checked_and_written_chunk_by_chunk(values, tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    genes = [f"G{i}" for i in range(G)]
    src = tmp_path / "pred.h5"
    with h5py.File(src, "w") as f:
        f["pred"] = values
    monkeypatch.setattr(export, "CHUNK_BYTES", 4 * 2**20)
    calls = []
    with h5py.File(src, "r") as f:
        adata = export.to_anndata(f["pred"], genes, _spots(), library_id="hd")

        def write():
            return export.write_h5ad(adata, tmp_path / "ooc.h5ad", progress=lambda d, t: calls.append((d, t)))

        out, peak = _peak(write)
    assert peak < 0.3 * values.nbytes, f"peak {peak / 2**20:.0f} MB"
    done = [d for d, _ in calls]
    assert len(calls) >= 10 and calls[-1][0] == calls[-1][1] and done == sorted(done)
    np.testing.assert_array_equal(ad.read_h5ad(out).X, values)

    # a NaN somewhere in the source: refused while writing, nothing left behind
    with h5py.File(src, "r+") as f:
        f["pred"][N - 5, 7] = np.nan
    with h5py.File(src, "r") as f:
        adata = export.to_anndata(f["pred"], genes, _spots(), library_id="hd")
        with pytest.raises(RapaclInputError, match="NaN"):
            export.write_h5ad(adata, tmp_path / "nan.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ooc.h5ad", "pred.h5"]


def test_export_job_reports_progress_in_steps_and_a_cancel_writes_nothing(values, tmp_path, monkeypatch):
    from napari_rapacl.jobs import _export as jobs_export
    from napari_rapacl.progress import run_to_completion

    monkeypatch.setattr(export, "CHUNK_BYTES", 4 * 2**20)
    genes = [f"G{i}" for i in range(G)]
    spots = _spots()
    seen = []
    out = run_to_completion(
        jobs_export.iter_export(tmp_path / "job.h5ad", values, genes, spots, library_id="hd"), seen.append
    )
    writes = [p for p in seen if p.stage == "export write"]
    assert len(writes) >= 20 and writes[-1].done == writes[-1].total >= 20
    np.testing.assert_array_equal(ad.read_h5ad(out).X, values)

    gen = jobs_export.iter_export(tmp_path / "cancel.h5ad", values, genes, spots, library_id="hd")
    for p in gen:
        if p.stage == "export write" and p.done >= 3:
            break
    gen.close()  # the viewer's cancel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.h5ad"]


def test_chunked_write_keeps_the_dtype_of_other_tables(tmp_path, monkeypatch):
    """Cell tables (float64 features) and integer X go through the same chunked writer unchanged."""
    monkeypatch.setattr(export, "CHUNK_BYTES", 1024)
    for dtype in (np.float64, np.int32, np.float32):
        x = (np.arange(3000 * 7).reshape(3000, 7) / 3).astype(dtype)
        out = export.write_h5ad(ad.AnnData(X=x), tmp_path / f"{np.dtype(dtype).name}.h5ad")
        back = ad.read_h5ad(out).X
        assert back.dtype == dtype
        np.testing.assert_array_equal(back, x)
