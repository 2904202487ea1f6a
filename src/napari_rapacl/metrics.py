"""Evaluation metrics for predicted expression (numpy only).

Pearson r is computed per gene across the spots of one section. A gene whose measured or predicted
values are constant has no defined correlation: it is counted (``n_constant``) and scored 0 in the
summaries, so a model cannot gain by predicting a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-gene Pearson r across spots; NaN where either column is constant. Shapes (n_spots, n_genes)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} must both be (n_spots, n_genes)")
    pc = pred - pred.mean(axis=0)
    tc = true - true.mean(axis=0)
    denom = np.sqrt((pc**2).sum(axis=0) * (tc**2).sum(axis=0))
    scale = np.maximum(np.abs(pred).max(axis=0), np.abs(true).max(axis=0)) + 1e-30
    constant = (np.ptp(pred, axis=0) <= 1e-12 * scale) | (np.ptp(true, axis=0) <= 1e-12 * scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(axis=0) / denom
    r[constant | ~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def summarize(
    pred: np.ndarray, true: np.ndarray, genes: Sequence[str] | None = None, top_k: int = 50
) -> dict[str, float | int]:
    """PCC@F/S/M (first quartile, median, mean of per-gene r), MSE, MAE and the mean r over the
    ``top_k`` most expressed genes (by measured mean), with constant genes counted and scored 0."""
    r = pearson_per_gene(pred, true)
    n_constant = int(np.isnan(r).sum())
    r0 = np.nan_to_num(r, nan=0.0)
    true = np.asarray(true, dtype=np.float64)
    err = np.asarray(pred, dtype=np.float64) - true
    top = np.argsort(-true.mean(axis=0), kind="stable")[:top_k]
    out: dict[str, float | int] = {
        "pcc_f": float(np.quantile(r0, 0.25)),
        "pcc_s": float(np.median(r0)),
        "pcc_m": float(r0.mean()),
        f"pcc_top{top_k}": float(r0[top].mean()),
        "mse": float((err**2).mean()),
        "mae": float(np.abs(err).mean()),
        "n_genes": int(r.size),
        "n_constant": n_constant,
        "n_spots": int(true.shape[0]),
    }
    if genes is not None:
        best = np.argsort(-r0, kind="stable")[:5]
        out["best_genes"] = ", ".join(f"{genes[i]}={r0[i]:.2f}" for i in best)
    return out
