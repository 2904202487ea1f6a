from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr

from napari_rapacl.metrics import pearson_per_gene, summarize


def test_pearson_matches_scipy_and_flags_constant_genes():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(50, 4))
    pred = true + rng.normal(scale=[0.1, 1.0, 3.0, 1.0], size=(50, 4))
    pred[:, 3] = 2.0  # a constant prediction has no correlation
    r = pearson_per_gene(pred, true)
    for g in range(3):
        assert r[g] == pytest.approx(pearsonr(pred[:, g], true[:, g])[0], abs=1e-12)
    assert np.isnan(r[3])


def test_summary_scores_constant_genes_as_zero_and_reports_quantiles():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(40, 8))
    pred = true.copy()
    pred[:, :2] = 0.0  # two constant genes
    s = summarize(pred, true, genes=[f"g{i}" for i in range(8)], top_k=4)
    assert s["n_constant"] == 2 and s["n_genes"] == 8
    assert s["pcc_m"] == pytest.approx(6 / 8)
    assert s["pcc_f"] == pytest.approx(np.quantile([0, 0] + [1] * 6, 0.25))
    assert s["pcc_s"] == 1.0
    assert s["mse"] == pytest.approx(float((true[:, :2] ** 2).sum() / true.size))
    assert "pcc_top4" in s and s["best_genes"].startswith("g2=1.00")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="n_spots, n_genes"):
        pearson_per_gene(np.zeros((3, 2)), np.zeros((3, 3)))
