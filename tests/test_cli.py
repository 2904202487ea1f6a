"""``napari-rapacl predict``: the headless path gives the library's predictions, and bad input a message."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.realdata


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
