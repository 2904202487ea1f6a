"""The README's main job, shortened to one epoch: it must run end to end and write readable outputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_demo_command_writes_h5ad_png_and_checkpoint(data_dir, tmp_path):
    import anndata as ad
    import torch

    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_rapacl",
            "demo",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("C2_prediction.h5ad", "C2_prediction.png", "stnet_her2st.pt", "stnet_her2st.yaml"):
        assert (out / name).is_file(), name
        assert str(out / name) in result.stdout or name.endswith(".yaml")
    adata = ad.read_h5ad(out / "C2_prediction.h5ad")
    assert adata.shape == (187, 785) and adata.X.dtype == np.float32
    assert adata.layers["measured"].shape == adata.shape
    assert adata.uns["napari_rapacl"]["model"] == "stnet"
    ckpt = torch.load(out / "stnet_her2st.pt", weights_only=True)
    assert ckpt["training"]["val"] == "C6" and "C2" not in ckpt["training"]["train"]
    assert "held-out section C2: mean PCC" in result.stdout
