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
    from napari_rapacl.datasets import HER2ST_MARKERS

    # the 785 benchmark genes, then the clinical markers the training sections' counts hold
    n = adata.n_vars
    assert adata.n_obs == 187 and n > 785 and adata.X.dtype == np.float32
    assert set(adata.var_names[785:]) <= set(HER2ST_MARKERS)
    assert {"ERBB2", "GRB7", "MKI67"} <= set(adata.var_names)
    assert adata.layers["measured"].shape == adata.shape
    assert adata.uns["napari_rapacl"]["model"] == "stnet"
    ckpt = torch.load(out / "stnet_her2st.pt", weights_only=True)
    assert ckpt["training"]["val"] == "C6" and "C2" not in ckpt["training"]["train"]
    assert "held-out section C2: mean PCC" in result.stdout
    # each gene's validation r (on C6, the inner validation section) is stored
    rel = ckpt["gene_reliability"]
    assert rel["metric"] == "pearson_r" and rel["section"] == ["C6"] and len(rel["values"]) == n
    finite = [v for v in rel["values"] if math.isfinite(v)]
    # the r of what the viewer shows: the selected weights with the spot smoothing chosen on C6 (the
    # mean is that width's validation score; constant genes count as 0 there)
    post = ckpt["postprocess"]
    assert post["chosen_on"] == ["C6"]
    chosen = post["val_pcc_by_sigma"][f"{post['smooth_sigma_um']:g}"]
    assert chosen == max(post["val_pcc_by_sigma"].values())
    assert len(finite) > 700 and sum(finite) / n == pytest.approx(chosen, abs=1e-4)
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
    expected = ["her2st-stnet", f"['C3', 'C4', 'C5'] ['C6'] {n}", f"{n} True"]
    assert listed.stdout.split("\n")[:3] == expected, listed
