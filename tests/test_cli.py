"""The CLI: ``predict`` and ``segment`` give the library's results, and bad input a message (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("stnet_tiny", n_genes=3)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny.pt", model, genes=["ERBB2", "GAPDH", "ACTB"]
    )


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "napari_rapacl", "predict", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.realdata
def test_predict_roi_matches_the_library(data_dir, checkpoint, tmp_path):
    import anndata as ad

    from napari_rapacl.datasets import her2st
    from napari_rapacl.inference import predict_spots
    from napari_rapacl.models.checkpoint import load_model

    root = data_dir / "her2st/data"
    slide_path = root / "ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    spots_path = root / "ST-spotfiles/C2_selection.tsv"
    sec = her2st("C2")
    x0, y0 = np.percentile(sec.spots.x, 25), np.percentile(sec.spots.y, 25)
    x1, y1 = np.percentile(sec.spots.x, 75), np.percentile(sec.spots.y, 75)
    roi = f"{x0},{y0},{x1},{y1}"
    out = tmp_path / "roi.h5ad"
    result = _run("--slide", slide_path, "--spots", spots_path, "--checkpoint", checkpoint, "--out", out,
                  "--roi", roi, "--device", "cpu", "--model", "stnet_tiny")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    adata = ad.read_h5ad(out)
    inside = (sec.spots.x >= x0) & (sec.spots.x < x1) & (sec.spots.y >= y0) & (sec.spots.y < y1)
    assert 10 < adata.n_obs == inside.sum() < len(sec.spots)
    assert list(adata.obs_names) == list(sec.spots.barcode[inside])
    model, _ = load_model(checkpoint)
    expected = predict_spots(model, sec.slide, sec.spots.x[inside], sec.spots.y[inside], device="cpu")
    np.testing.assert_allclose(adata.X, expected, rtol=1e-5, atol=1e-6)
    assert adata.uns["napari_rapacl"]["model"] == "stnet_tiny"
    assert list(adata.uns["napari_rapacl"]["roi"]) == pytest.approx([x0, y0, x1, y1])


@pytest.mark.realdata
def test_predict_bad_input_is_a_message(data_dir, checkpoint, tmp_path):
    root = data_dir / "her2st/data"
    slide_path = root / "ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    spots_path = root / "ST-spotfiles/C2_selection.tsv"
    common = ("--slide", slide_path, "--spots", spots_path, "--out", tmp_path / "x.h5ad")
    missing = _run(*common, "--checkpoint", tmp_path / "nope.pt")
    assert missing.returncode == 2 and "nope.pt" in missing.stderr and "Traceback" not in missing.stderr
    wrong = _run(*common, "--checkpoint", checkpoint, "--model", "pixnet")
    assert wrong.returncode == 2 and "'stnet_tiny'" in wrong.stderr
    empty = _run(*common, "--checkpoint", checkpoint, "--roi", "0,0,10,10")
    assert empty.returncode == 2 and "no spot" in empty.stderr
    bad_roi = _run(*common, "--checkpoint", checkpoint, "--roi", "5,5,1,1")
    assert bad_roi.returncode == 2 and "x1 > x0" in bad_roi.stderr
    assert not (tmp_path / "x.h5ad").exists()


# ---- synthetic slides: tiled predict and segment ------------------------------------------------


_main = run_cli


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 600 x 800 px pyramidal OME-TIFF at 1 um/px and a spot CSV (x, y, radius, barcode)."""
    import pandas as pd

    from napari_rapacl.io.slide import write_ome_tiff

    folder = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:800].astype(np.float32)
    img = np.stack(
        [128 + 90 * np.sin(xx / 31.0), 128 + 90 * np.cos(yy / 17.0), 128 + 60 * np.sin((xx - yy) / 41.0)], -1
    )
    img = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
    slide = write_ome_tiff(folder / "slide.ome.tif", img, mpp=1.0, tile=128)
    gy, gx = np.mgrid[30:600:90, 30:800:90]
    spots = folder / "spots.csv"
    pd.DataFrame(
        {"barcode": [f"s{i}" for i in range(gx.size)], "x": gx.ravel(), "y": gy.ravel(), "radius": 25.0}
    ).to_csv(spots, index=False)
    return slide, spots


def test_tiled_predict_matches_the_library(synthetic, checkpoint, tmp_path, capsys):
    import anndata as ad

    from napari_rapacl.inference import predict_spots
    from napari_rapacl.io import open_slide, read_spots
    from napari_rapacl.models.checkpoint import load_model

    slide_path, spots_path = synthetic
    slide, spots = open_slide(slide_path), read_spots(spots_path)
    model, _ = load_model(checkpoint)
    expected = predict_spots(model, slide, spots.x, spots.y, device="cpu")
    common = (
        "predict",
        "--slide",
        slide_path,
        "--spots",
        spots_path,
        "--checkpoint",
        checkpoint,
        "--device",
        "cpu",
    )
    for scheduler in ("none", "threads"):
        out = tmp_path / f"{scheduler}.h5ad"
        code, stdout, err = _main(capsys, *common, "--out", out, "--tile-px", 128, "--scheduler", scheduler)
        assert code == 0, err
        n_tiles = len(set(zip(spots.x // 128, spots.y // 128, strict=True)))  # 128 px cells holding spots
        assert f"at {len(spots)} spots ({n_tiles} tiles)" in stdout and n_tiles == 30
        adata = ad.read_h5ad(out)
        assert list(adata.obs_names) == list(spots.barcode)
        np.testing.assert_allclose(adata.X, expected, atol=1e-5, rtol=0)
        assert adata.uns["napari_rapacl"]["tile_px"] == 128
    # --roi with a dask.distributed scheduler given by address
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cl:
        out = tmp_path / "roi.h5ad"
        code, _, err = _main(
            capsys, *common, "--out", out, "--roi", "100,100,500,400", "--scheduler", cl.scheduler_address
        )
    assert code == 0, err
    inside = (spots.x >= 100) & (spots.x < 500) & (spots.y >= 100) & (spots.y < 400)
    adata = ad.read_h5ad(out)
    assert list(adata.obs_names) == list(spots.barcode[inside])
    np.testing.assert_allclose(adata.X, expected[inside], atol=1e-5, rtol=0)


def test_predict_scheduler_and_tile_size_are_checked(synthetic, checkpoint, tmp_path, capsys):
    slide_path, spots_path = synthetic
    common = ("predict", "--slide", slide_path, "--spots", spots_path, "--checkpoint", checkpoint)
    code, _, err = _main(capsys, *common, "--out", tmp_path / "x.h5ad", "--scheduler", "thread")
    assert code == 2 and "--scheduler 'thread'" in err and "Traceback" not in err
    code, _, err = _main(capsys, *common, "--out", tmp_path / "x.h5ad", "--tile-px", "0")
    assert code == 2 and "'0' must be >= 1" in err
    code, _, err = _main(capsys, *common, "--out", tmp_path / "x.h5ad", "--tile-px", "8")
    assert code == 2 and "tile_px=8" in err
    assert not (tmp_path / "x.h5ad").exists()


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """A 512 x 640 px synthetic H&E with known nuclei at 0.5 um/px, as a pyramidal OME-TIFF."""
    from napari_rapacl.io.slide import write_ome_tiff
    from napari_rapacl.testing import synthetic_he_nuclei

    rgb, _ = synthetic_he_nuclei((512, 640), mpp=0.5, n_nuclei=50, n_touching_pairs=5, seed=3)
    return write_ome_tiff(tmp_path_factory.mktemp("nuclei") / "he.ome.tif", rgb, mpp=0.5, tile=128), rgb


def test_segment_writes_labels_and_a_cell_table(nuclei, tmp_path, capsys):
    import anndata as ad
    import pandas as pd
    import zarr

    from napari_rapacl.io import open_slide
    from napari_rapacl.segmentation import segment_region

    path, _ = nuclei
    roi = (64, 32, 576, 480)
    outs = [tmp_path / "cells.zarr", tmp_path / "cells.csv", tmp_path / "cells.h5ad"]
    args = ["segment", "--slide", path, "--roi", ",".join(map(str, roi)), "--diameter-um", 8]
    code, stdout, err = _main(capsys, *args, *sum((["--out", o] for o in outs), []))
    assert code == 0, err
    expected = np.asarray(segment_region(open_slide(path), *roi, diameter_um=8.0))
    labels = zarr.open_array(str(outs[0]), mode="r")
    np.testing.assert_array_equal(labels[:], expected)
    assert labels.attrs["napari_rapacl"]["roi"] == list(roi)
    n = int(expected.max())
    assert n > 20 and f"segmented {n} cells" in stdout
    table = pd.read_csv(outs[1])
    assert list(table["label"]) == list(range(1, n + 1))
    ys, xs = np.nonzero(expected == 7)
    row = table.set_index("label").loc[7]
    assert row["n_pixels"] == len(ys) and row["area_um2"] == pytest.approx(len(ys) * 0.25)
    # centroids in continuous level-0 px: region offset + pixel centre
    assert row["centroid_x_px"] == pytest.approx(roi[0] + xs.mean() + 0.5)
    assert row["centroid_y_px"] == pytest.approx(roi[1] + ys.mean() + 0.5)
    adata = ad.read_h5ad(outs[2])
    assert adata.n_obs == n and adata.n_vars == 0
    np.testing.assert_allclose(adata.obsm["spatial"], table[["centroid_x_px", "centroid_y_px"]].to_numpy())
    assert adata.uns["napari_rapacl"]["segmenter"]["method"] == "classical"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # at pyramid level 1: labels on that level's grid, centroids still in level-0 px
    code, _, err = _main(capsys, *args, "--level", 1, "--out", tmp_path / "level1.csv")
    assert code == 0, err
    expected1 = np.asarray(segment_region(open_slide(path), *roi, level=1, diameter_um=8.0))
    table1 = pd.read_csv(tmp_path / "level1.csv").set_index("label")
    ys, xs = np.nonzero(expected1 == 3)
    assert table1.loc[3, "n_pixels"] == len(ys) and table1.loc[3, "area_um2"] == pytest.approx(len(ys))
    assert table1.loc[3, "centroid_x_px"] == pytest.approx((roi[0] // 2 + xs.mean() + 0.5) * 2)
    assert table1.loc[3, "centroid_y_px"] == pytest.approx((roi[1] // 2 + ys.mean() + 0.5) * 2)
    # an existing output is not replaced without --overwrite
    code, _, err = _main(capsys, *args, "--out", outs[1])
    assert code == 2 and "cells.csv" in err and "--overwrite" in err
    code, _, err = _main(capsys, *args, "--out", outs[1], "--overwrite")
    assert code == 0, err


def test_segment_features_match_cell_features(nuclei, tmp_path, capsys):
    pytest.importorskip("radiomics")
    import pandas as pd

    from napari_rapacl.io import open_slide
    from napari_rapacl.jobs import feature_column
    from napari_rapacl.radiomics import cell_features
    from napari_rapacl.segmentation import segment_region

    path, rgb = nuclei
    out = tmp_path / "cells.csv"
    code, _, err = _main(
        capsys, "segment", "--slide", path, "--roi", "0,0,320,256", "--out", out, "--features"
    )
    assert code == 0, err
    table = pd.read_csv(out).set_index("label")
    labels = np.asarray(segment_region(open_slide(path), 0, 0, 320, 256))
    expected = cell_features(rgb[:256, :320], labels, mpp=0.5)
    assert len(expected) > 5
    cols = [c for c in expected.columns if c.startswith("original_")]
    named = [feature_column(c) for c in cols]  # units in the names: lengths in um, grey levels
    assert "original_shape2D_Perimeter_um" in named and "original_firstorder_Mean_grey" in named
    assert set(named) <= set(table.columns)
    np.testing.assert_allclose(
        table.loc[expected.index, named].to_numpy(), expected[cols].to_numpy(), rtol=1e-6
    )


def test_segment_bad_input_is_a_message(nuclei, tmp_path, capsys):
    path, _ = nuclei
    seg = ("segment", "--slide", path)
    cases = [
        ((*seg, "--out", tmp_path / "cells.txt"), "cells.txt"),
        ((*seg, "--out", tmp_path / "nowhere" / "cells.csv"), "nowhere"),
        ((*seg, "--out", tmp_path / "c.csv", "--roi", "1000,1000,2000,2000"), "he.ome.tif"),
        ((*seg, "--out", tmp_path / "c.csv", "--roi", "5,5,1,1"), "x1 > x0"),
        (("segment", "--slide", tmp_path / "missing.tif", "--out", tmp_path / "c.csv"), "missing.tif"),
        ((*seg, "--out", tmp_path / "c.csv", "--model", "nuclei"), "--method cellpose"),
        ((*seg, "--out", tmp_path / "c.csv", "--diameter-um", "-3"), "--diameter-um -3"),
        ((*seg, "--out", tmp_path / "c.zarr", "--features"), "table output"),
        ((*seg, "--out", tmp_path / "c.csv", "--level", "9"), "--level 9"),
    ]
    for args, needle in cases:
        code, _, err = _main(capsys, *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_segment_on_a_scheduler_gives_the_same_cells(nuclei, tmp_path, capsys, scheduler):
    """--scheduler runs the tile windows and the cell measurements on workers; the labels are stitched
    in tile order here, so labels and cell table equal the in-process run's."""
    pytest.importorskip("radiomics")
    import pandas as pd
    import zarr

    path, _ = nuclei
    base = ["segment", "--slide", path, "--tile", 128, "--features"]
    ref = [tmp_path / "ref.zarr", tmp_path / "ref.csv"]
    code, _, err = _main(capsys, *base, "--out", ref[0], "--out", ref[1])
    assert code == 0, err
    got = [tmp_path / "got.zarr", tmp_path / "got.csv"]
    code, _, err = _main(capsys, *base, "--scheduler", scheduler, "--out", got[0], "--out", got[1])
    assert code == 0, err
    np.testing.assert_array_equal(zarr.open_array(str(got[0]))[:], zarr.open_array(str(ref[0]))[:])
    pd.testing.assert_frame_equal(pd.read_csv(got[1]), pd.read_csv(ref[1]))
    assert len(pd.read_csv(ref[1])) > 20


def test_outputs_never_replace_inputs_and_are_checked_first(
    synthetic, checkpoint, tmp_path, capsys, monkeypatch
):
    """#14 item 1: an output that is an input (here through a link), of the wrong type, a folder, an
    existing file without --overwrite or in a folder that cannot be written is refused before any
    work, and the input is left as it was."""
    import napari_rapacl.jobs as jobs

    slide_path, spots_path = synthetic
    before = checkpoint.read_bytes()
    link = tmp_path / "model.h5ad"
    link.symlink_to(checkpoint)

    def no_work(*a, **k):
        raise AssertionError("the inputs were opened before the output was checked")

    monkeypatch.setattr(jobs, "open_inputs", no_work)
    common = ("predict", "--slide", slide_path, "--spots", spots_path, "--checkpoint", checkpoint)
    (tmp_path / "old.h5ad").write_bytes(b"an earlier result")
    (tmp_path / "folder.h5ad").mkdir()
    cases = [
        ((*common, "--out", link, "--overwrite"), "is an input of this command"),
        ((*common, "--out", tmp_path / "pred.csv"), "expected a .h5ad or .zarr file"),
        ((*common, "--out", tmp_path / "old.h5ad"), "already exists; pass --overwrite"),
        ((*common, "--out", tmp_path / "folder.h5ad", "--overwrite"), "is a folder"),
        ((*common, "--out", tmp_path / "missing" / "p.h5ad"), "output folder not found"),
        ((*common, "--out", tmp_path / "p.h5ad", "--library-id", "a/b"), "--library-id 'a/b'"),
        (("segment", "--slide", slide_path, "--out", tmp_path / "old.h5ad"), "already exists"),
    ]
    for args, needle in cases:
        code, _, err = _main(capsys, *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert checkpoint.read_bytes() == before and (tmp_path / "old.h5ad").read_bytes() == b"an earlier result"
    # a folder that cannot be written (simulated: the tests run as root, for whom access() is always true)
    import napari_rapacl.cli as cli

    real_access = cli.os.access
    monkeypatch.setattr(
        cli.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    code, _, err = _main(capsys, *common, "--out", tmp_path / "p.h5ad")
    assert code == 2 and "is not writable" in err
    monkeypatch.undo()
    code, _, err = _main(capsys, *common, "--out", tmp_path / "old.h5ad", "--overwrite", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "old.h5ad").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # replaced by the prediction


def test_no_silent_nonsense_and_nothing_hangs(synthetic, checkpoint, tmp_path, capsys):
    """#14 items 6 and 7: an empty spot file, --mpp outside 0.05-50 um/px, demo --epochs 0 and an unknown
    demo --section are refused with a message before any work; a FIFO given as slide or spots is
    refused at once instead of blocking the read forever; a greyscale slide is read with a warning."""
    import os
    import warnings

    from PIL import Image

    from napari_rapacl.io import open_slide

    slide_path, spots_path = synthetic
    empty = tmp_path / "empty.csv"
    empty.write_text("x,y,radius\n")
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    fifo_spots = tmp_path / "pipe.csv"
    os.mkfifo(fifo_spots)
    out = ("--out", tmp_path / "p.h5ad", "--checkpoint", checkpoint)
    cases = [
        (("predict", "--slide", slide_path, "--spots", empty, *out), "holds no spots"),
        (("predict", "--slide", slide_path, "--spots", spots_path, "--mpp", "1e-6", *out), "plausible range"),
        (("predict", "--slide", slide_path, "--spots", spots_path, "--mpp", "1e6", *out), "1e+06 um/px"),
        (("predict", "--slide", fifo, "--spots", spots_path, *out), "named pipe (FIFO)"),
        (("predict", "--slide", slide_path, "--spots", fifo_spots, *out), "named pipe (FIFO)"),
        (("segment", "--slide", fifo, "--out", tmp_path / "c.csv"), "named pipe (FIFO)"),
        (("demo", "--epochs", "0", "--out", tmp_path / "demo"), "'0' must be >= 1"),
        (("demo", "--epochs", "-3", "--out", tmp_path / "demo"), "must be >= 1"),
        (("demo", "--section", "C9", "--out", tmp_path / "demo"), "--section 'C9'"),
    ]
    for args, needle in cases:
        code, _, err = _main(capsys, *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "p.h5ad").exists() and not (tmp_path / "demo").exists()
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 80), 128, np.uint8)).save(grey)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        slide = open_slide(grey, mpp=0.5)
    assert slide.levels[0].shape == (64, 80, 3)
    assert any("greyscale image" in str(w.message) and "all three channels" in str(w.message) for w in seen)


def test_plausible_bad_input_is_one_line_never_a_traceback(synthetic, checkpoint, tmp_path, capsys):
    """#14 item 5: malformed Space Ranger files, a truncated .h5ad, a binary CSV, a binary training
    config, a checkpoint whose weights do not fit its architecture or gene count and --device cuda
    without a GPU each give one line on stderr naming the file or value, exit 2; an internal error
    gives one line and exit 1, its traceback only with -v."""
    import json

    from conftest import REPO

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from training.run import main as train_main

    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    slide_path, spots_path = synthetic

    def spaceranger(name, factors=None, in_tissue="1"):
        spatial = tmp_path / name / "spatial"
        spatial.mkdir(parents=True)
        (spatial / "tissue_positions.csv").write_text(
            "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
            f"AAAC-1,{in_tissue},0,0,100,120\nAAAG-1,1,0,2,100,200\n"
        )
        if factors is not None:
            (spatial / "scalefactors_json.json").write_text(factors)
        return tmp_path / name

    truncated = tmp_path / "cut.h5ad"
    truncated.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    binary_csv = tmp_path / "binary.csv"
    binary_csv.write_bytes(bytes(range(256)) * 20)
    wrong_genes = create_model("stnet_tiny", n_genes=3)
    misfit = save_checkpoint(tmp_path / "misfit.pt", wrong_genes, genes=["A", "B", "C"])
    payload = torch.load(misfit, weights_only=True)
    payload["config"]["n_genes"] = 5  # the weights have 3 outputs
    torch.save(payload, misfit)
    out = ("--out", tmp_path / "p.h5ad")
    pred = ("predict", "--slide", slide_path, *out)
    ck = ("--checkpoint", checkpoint)
    factors = [
        ("a", "{not json", "1", "not valid JSON"),
        ("b", json.dumps({"tissue_hires_scalef": 0.1}), "1", "has no 'spot_diameter_fullres'"),
        ("c", json.dumps({"spot_diameter_fullres": 0}), "1", "spot_diameter_fullres=0 must be a positive"),
        ("e", json.dumps({"spot_diameter_fullres": 90, "microns_per_pixel": -1}), "1", "-1 must be positive"),
        ("d", json.dumps({"spot_diameter_fullres": 90}), "yes", "in_tissue must be 0 or 1"),
    ]
    cases = [((*pred, "--spots", spaceranger(n, f, t), *ck), needle) for n, f, t, needle in factors]
    cases += [
        ((*pred, "--spots", truncated, *ck), "cut.h5ad: cannot be read as spots"),
        ((*pred, "--spots", binary_csv, *ck), "binary.csv: cannot be read as spots"),
        ((*pred, "--spots", spots_path, "--checkpoint", misfit), "weights do not fit"),
    ]
    if not torch.cuda.is_available():
        cases.append(((*pred, "--spots", spots_path, *ck, "--device", "cuda"), "no CUDA GPU"))
    for args, needle in cases:
        code, _, err = _main(capsys, *args)
        assert code == 2 and needle in err and "Traceback" not in err and len(err.splitlines()) == 1, (
            args,
            err,
        )
    config = tmp_path / "config.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    assert train_main(["--config", str(config)]) == 2
    assert "not a text file" in capsys.readouterr().err
    import os

    fifo = tmp_path / "config_pipe.yaml"
    os.mkfifo(fifo)
    assert train_main(["--config", str(fifo)]) == 2
    assert "training config" in (err := capsys.readouterr().err) and "is a named pipe (FIFO)" in err, err
    # an internal error (a bug): one line and exit 1; the traceback with -v
    import napari_rapacl.jobs as jobs

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobs, "open_inputs", bug)
        code, _, err = _main(capsys, *pred, "--spots", spots_path, "--checkpoint", checkpoint)
        assert code == 1 and "internal error: ZeroDivisionError: a bug" in err and "-v" in err
        assert "Traceback" not in err
        code, _, err = _main(capsys, "-v", *pred, "--spots", spots_path, "--checkpoint", checkpoint)
        assert code == 1 and "Traceback" in err


def test_hostile_images_are_refused_before_decoding(synthetic, checkpoint, tmp_path, capsys, monkeypatch):
    """#14 item 2: a JPEG whose header claims 65500 x 65500 px (a 700-byte decompression bomb) and a
    valid PNG larger than the pixel budget are refused before any decode, with the size, the memory
    it would take and the override; the override (--max-pixels or the environment) lets them open."""
    import io

    from PIL import Image

    from napari_rapacl._errors import RapaclInputError
    from napari_rapacl.io.slide import MAX_PIXELS_ENV, open_slide

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 150)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: height and width follow the precision byte
    data[sof + 5 : sof + 9] = (65500).to_bytes(2, "big") * 2
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data))
    assert bomb.stat().st_size < 1000
    _, spots_path = synthetic
    code, _, err = _main(
        capsys, "predict", "--slide", bomb, "--spots", spots_path, "--checkpoint", checkpoint,
        "--out", tmp_path / "p.h5ad", "--mpp", "0.5",
    )  # fmt: skip
    assert code == 2 and "65500 x 65500 px JPEG" in err and "--max-pixels" in err and MAX_PIXELS_ENV in err
    assert "GB" in err and "Traceback" not in err
    png = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (230, 200, 220)).save(png)
    with pytest.raises(
        RapaclInputError, match=r"3000 x 2000 px PNG \(6 million pixels\).*limit is 5 million"
    ):
        open_slide(png, mpp=0.5, max_pixels=5_000_000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5e6")
    with pytest.raises(RapaclInputError, match="limit is 5 million"):
        open_slide(png, mpp=0.5)
    assert open_slide(png, mpp=0.5, max_pixels=6_000_000).shape == (2000, 3000)


# ---- convert -------------------------------------------------------------------------------------


def test_convert_jpeg_to_pyramidal_ome_tiff(tmp_path, capsys):
    """`napari-rapacl convert` writes a tiled pyramid (levels by 2) that io.slide opens with the um; no
    pixel size -> a message asking for --mpp; the input is never the output."""
    import tifffile
    from PIL import Image

    from napari_rapacl.cli import main
    from napari_rapacl.io.slide import open_slide

    yy, xx = np.mgrid[0:1100, 0:1500]
    rgb = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=2).astype(np.uint8)
    jpg = tmp_path / "he.jpg"
    Image.fromarray(rgb).save(jpg, quality=95)
    out = tmp_path / "he.ome.tif"

    assert main(["convert", str(jpg), str(out), "--mpp", "0.5", "--tile", "256"]) == 0
    assert "0.5 um/px" in capsys.readouterr().out
    slide = open_slide(out)
    assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
    assert slide.shape == (1100, 1500)
    assert [lv.shape[:2] for lv in slide.levels] == [(1100, 1500), (550, 750), (275, 375), (137, 187)]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        assert len(tif.series[0].levels) == 4
    with Image.open(jpg) as im:
        decoded = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(slide.read_region(0, 0, 1500, 1100), decoded)  # lossless (zlib)
    half = slide.read_region(0, 0, 1500, 1100, level=1).astype(int)
    assert np.abs(half - decoded[:1100:2, :1500:2].astype(int)).mean() < 8  # a 2 x 2 mean of level 0

    with pytest.raises(SystemExit) as err:  # a JPEG does not say its pixel size
        main(["convert", str(jpg), str(tmp_path / "b.ome.tif")])
    assert err.value.code == 2 and "--mpp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["convert", str(jpg), str(out), "--mpp", "0.5"])  # exists
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["convert", str(out), str(out), "--mpp", "0.5", "--overwrite"])  # the input itself
    assert err.value.code == 2 and "input" in capsys.readouterr().err
    assert open_slide(out).mpp == pytest.approx(0.5)  # untouched


def test_predict_writes_spatialdata_that_reads_back(synthetic, checkpoint, tmp_path, capsys):
    """`predict --out x.zarr` writes SpatialData (slide image, spot circles, prediction table) equal to the
    .h5ad of the same run; an existing store needs --overwrite; read back with spatialdata.read_zarr."""
    import anndata as ad

    sd = pytest.importorskip("spatialdata")
    slide_path, spots_path = synthetic
    common = ("predict", "--slide", slide_path, "--spots", spots_path, "--checkpoint", checkpoint)
    h5ad, store = tmp_path / "p.h5ad", tmp_path / "p.zarr"
    code, _, err = _main(capsys, *common, "--device", "cpu", "--out", h5ad)
    assert code == 0, err
    code, stdout, err = _main(capsys, *common, "--device", "cpu", "--out", store)
    assert code == 0, err
    assert str(store) in stdout
    sdata = sd.read_zarr(store)
    table, legacy = sdata.tables["spots"], ad.read_h5ad(h5ad)
    np.testing.assert_array_equal(np.asarray(table.X), np.asarray(legacy.X))
    assert list(table.var_names) == ["ERBB2", "GAPDH", "ACTB"]
    assert list(table.obs_names) == list(legacy.obs_names)
    (name,) = sdata.shapes
    np.testing.assert_allclose(sdata.shapes[name].geometry.x, legacy.obsm["spatial"][:, 0])
    (image,) = sdata.images
    assert sdata.images[image]["scale0"]["image"].shape == (3, 600, 800)
    code, _, err = _main(capsys, *common, "--device", "cpu", "--out", store)
    assert code == 2 and "--overwrite" in err
    code, _, err = _main(capsys, *common, "--device", "cpu", "--out", store, "--overwrite")
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
