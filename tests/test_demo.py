"""The README's main job, shortened to one epoch: it must run end to end and write readable outputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_demo_command_writes_h5ad_png_and_checkpoint(data_dir, tmp_path):
    import math
    import os

    import anndata as ad
    import torch

    out = tmp_path / "demo"
    env = {**os.environ, "NAPARI_RAPACL_MODELS_DIR": str(tmp_path / "models")}
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
        env=env,
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
    # each gene's validation r (on C6, the inner validation section) is stored
    rel = ckpt["gene_reliability"]
    assert rel["metric"] == "pearson_r" and rel["section"] == ["C6"] and len(rel["values"]) == 785
    finite = [v for v in rel["values"] if math.isfinite(v)]
    # the same r as the epoch selection's val_pcc (constant genes counted as 0 there)
    best = ckpt["training"]["best_val_pcc"]
    assert len(finite) > 700 and sum(finite) / 785 == pytest.approx(best, abs=1e-4)
    # ... and the model is installed in the user's model folder, listed by name
    installed = tmp_path / "models" / "her2st-stnet" / "model.pt"
    assert installed.is_file() and "installed model:       her2st-stnet" in result.stdout
    code = (
        "from napari_rapacl.jobs import user_models, installed_models, load_model_choice;"
        "print(user_models()[0]); c = installed_models()['her2st-stnet'];"
        "print(c['training']['train'], c['validation']['section'], c['n_genes']);"
        "m = load_model_choice('her2st-stnet', None); print(len(m.genes), m.gene_reliability is not None)"
    )
    listed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    expected = ["her2st-stnet", "['C3', 'C4', 'C5'] ['C6'] 785", "785 True"]
    assert listed.stdout.split("\n")[:3] == expected, listed
