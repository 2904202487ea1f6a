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


# ---- predict to a file: the values never in memory at once (#14 item 10) ---------------------------------

N_PRED_GENES = 6000


@pytest.fixture(scope="module")
def dense_section(tmp_path_factory):
    """A 600 x 800 px OME-TIFF at 1 um/px with 3350 spots 12 px apart (a dense grid of small bins) and a
    stnet_tiny checkpoint of 6000 genes: the predictions are 3350 x 6000 float32 = 79 MB."""
    import pandas as pd
    import torch

    from napari_rapacl.io.slide import write_ome_tiff
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("dense")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:800].astype(np.float32)
    img = np.stack(
        [128 + 90 * np.sin(xx / 31.0), 128 + 90 * np.cos(yy / 17.0), 128 + 60 * np.sin(xx / 9.0)], -1
    )
    img = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
    slide = write_ome_tiff(folder / "slide.ome.tif", img, mpp=1.0, tile=128)
    gy, gx = np.mgrid[6:600:12, 6:800:12]
    spots = folder / "spots.csv"
    pd.DataFrame(
        {"barcode": [f"b{i:05d}" for i in range(gx.size)], "x": gx.ravel(), "y": gy.ravel(), "radius": 4.0}
    ).to_csv(spots, index=False)
    torch.manual_seed(0)
    model = create_model("stnet_tiny", n_genes=N_PRED_GENES)
    genes = [f"G{i:04d}" for i in range(N_PRED_GENES)]
    ckpt = save_checkpoint(folder / "wide.pt", model, genes=genes)
    return slide, spots, ckpt


def _cli_predict(slide, spots, ckpt, out, *extra):
    from napari_rapacl import cli

    args = ["predict", "--slide", slide, "--spots", spots, "--checkpoint", ckpt, "--out", out]
    return cli.main([str(a) for a in [*args, "--device", "cpu", "--tile-px", "128", *extra]])


def test_cli_predict_to_a_file_never_holds_the_values(dense_section, tmp_path, monkeypatch):
    """`predict --out x.h5ad` streams each tile into a temporary HDF5 file beside the output and the
    writer reads it a chunk at a time: the Python heap's peak stays far below the 79 MB of values (the
    gathered values alone were 79 MB before, plus the AnnData's float32 copy); the temporary is gone."""
    import os
    import time

    from napari_rapacl.export import SPILL_SUFFIX
    from napari_rapacl.inference import predict_spots
    from napari_rapacl.io import open_slide, read_spots
    from napari_rapacl.models.checkpoint import load_model

    slide_path, spots_path, ckpt = dense_section
    monkeypatch.setattr(export, "CHUNK_BYTES", 4 * 2**20)
    out = tmp_path / "pred.h5ad"
    stale = tmp_path / f".{out.name}.old12345{SPILL_SUFFIX}"  # left by a killed run an hour ago
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    code, peak = _peak(lambda: _cli_predict(slide_path, spots_path, ckpt, out))
    assert code == 0
    n = len(read_spots(spots_path))
    values_bytes = n * N_PRED_GENES * 4
    assert n == 3350 and values_bytes > 75 * 2**20
    print(f"h5ad: peak {peak / 2**20:.1f} MB for {values_bytes / 2**20:.1f} MB of values")
    assert peak < 0.3 * values_bytes, (
        f"peak {peak / 2**20:.0f} MB for {values_bytes / 2**20:.0f} MB of values"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad"]  # spill and stale spill removed
    back = ad.read_h5ad(out)
    assert back.shape == (n, N_PRED_GENES)
    model, _ = load_model(ckpt)
    spots = read_spots(spots_path)
    rows = np.arange(0, n, 7)  # a sample of the spots, against the library's own prediction
    expected = predict_spots(model, open_slide(slide_path), spots.x[rows], spots.y[rows], device="cpu")
    np.testing.assert_allclose(back.X[rows], expected, atol=1e-5, rtol=0)


def test_cli_predict_to_spatialdata_never_holds_the_values(dense_section, tmp_path, monkeypatch):
    """`predict --out x.zarr`: the same spill, and the table's X written a row chunk at a time (not by
    spatialdata's threaded dask store, which held several chunks at once), with progress per chunk."""
    import zarr

    from napari_rapacl import cli
    from napari_rapacl.inference import predict_spots
    from napari_rapacl.io import open_slide, read_spots
    from napari_rapacl.models.checkpoint import load_model

    slide_path, spots_path, ckpt = dense_section
    monkeypatch.setattr(export, "CHUNK_BYTES", 4 * 2**20)
    stages = []
    real_logger = cli._progress_logger

    def logger(what):
        log = real_logger(what)
        return lambda p: (stages.append((p.stage, p.done, p.total)), log(p))

    # a small run first: spatialdata, geopandas, xarray... are imported outside the measured run (their
    # import alone allocates ~50 MB of Python objects)
    (tmp_path / "warm").mkdir()
    assert (
        _cli_predict(slide_path, spots_path, ckpt, tmp_path / "warm" / "roi.zarr", "--roi", "0,0,60,60") == 0
    )
    monkeypatch.setattr(cli, "_progress_logger", logger)
    out = tmp_path / "pred.zarr"
    code, peak = _peak(lambda: _cli_predict(slide_path, spots_path, ckpt, out))
    assert code == 0
    values_bytes = 3350 * N_PRED_GENES * 4
    print(f"zarr: peak {peak / 2**20:.1f} MB for {values_bytes / 2**20:.1f} MB of values")
    assert peak < 0.3 * values_bytes, (
        f"peak {peak / 2**20:.0f} MB for {values_bytes / 2**20:.0f} MB of values"
    )
    x_steps = [d for s, d, _ in stages if s == "spatialdata X"]
    assert len(x_steps) >= 15 and x_steps == sorted(x_steps)  # 79 MB in chunks of 4 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr", "warm"]
    x = zarr.open_array(str(out / "tables" / "spots" / "X"), mode="r")
    assert x.shape == (3350, N_PRED_GENES) and x.attrs["encoding-type"] == "array"
    spots = read_spots(spots_path)
    rows = np.arange(0, 3350, 11)
    model, _ = load_model(ckpt)
    expected = predict_spots(model, open_slide(slide_path), spots.x[rows], spots.y[rows], device="cpu")
    np.testing.assert_allclose(x.oindex[rows], expected, atol=1e-5, rtol=0)


def test_cli_predict_failure_leaves_no_spill(dense_section, tmp_path, monkeypatch):
    import napari_rapacl.tiled as tiled

    slide_path, spots_path, ckpt = dense_section
    calls = []
    real = tiled._predict_tile

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(tiled, "_predict_tile", failing)
    with pytest.raises(SystemExit) as exit_:
        _cli_predict(slide_path, spots_path, ckpt, tmp_path / "x.h5ad")
    assert exit_.value.code == 1 and len(calls) == 5
    assert list(tmp_path.iterdir()) == []


def test_out_of_core_smoothing_equals_the_in_memory_one(dense_section, tmp_path, monkeypatch):
    """A checkpoint's spot smoothing applied chunk by chunk from the spilled values (stage "smooth")
    gives the in-memory smoothing's values."""
    from napari_rapacl.export import PredictionSpill
    from napari_rapacl.io import open_slide, read_spots
    from napari_rapacl.jobs import iter_predict, load_model_choice
    from napari_rapacl.progress import run_to_completion

    slide_path, spots_path, ckpt = dense_section
    monkeypatch.setattr(export, "CHUNK_BYTES", 2**20)  # several row and column blocks
    slide, spots = open_slide(slide_path), read_spots(spots_path)
    loaded = load_model_choice(None, ckpt)
    loaded.model.postprocess = {"smooth_sigma_um": 15.0}
    box = (0, 0, 400, 300)
    kwargs = {"cache": False, "device": "cpu", "tile_px": 128}
    in_memory = run_to_completion(iter_predict(loaded, slide, spots, box, **kwargs))
    seen = []
    with PredictionSpill(tmp_path / "x.h5ad") as spill:
        spilled = run_to_completion(
            iter_predict(loaded, slide, spots, box, out=spill.array, **kwargs), seen.append
        )
        assert not isinstance(spilled.values, np.ndarray) and spilled.values.shape == in_memory.values.shape
        np.testing.assert_array_equal(spilled.index, in_memory.index)
        np.testing.assert_allclose(spilled.values[()], in_memory.values, atol=1e-5, rtol=0)
        raw = spill._file["raw"][()]
    assert not np.allclose(raw, in_memory.values, atol=1e-3)  # the smoothing did change the values
    smooth = [p for p in seen if p.stage == "smooth"]
    assert len(smooth) >= 3 and smooth[-1].done == smooth[-1].total
    assert list(tmp_path.iterdir()) == []
