"""Evaluation metrics: predicted expression, and nucleus label images (numpy only at import).

Pearson r is computed per gene across the spots of one section. A gene whose measured or predicted
values are constant has no defined correlation: it is counted (``n_constant``) and scored 0 in the
summaries, so a model cannot gain by predicting a constant.

Label images (:func:`match_labels`, :func:`aggregated_jaccard_index`, :func:`nucleus_statistics`):
object-level agreement of a predicted segmentation with a reference one, and the count, density and
size distribution of nuclei.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import RapaclInputError


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


@dataclass(frozen=True)
class MatchResult:
    """Object-level agreement of a predicted label image with a reference one."""

    n_true: int
    n_pred: int
    tp: int
    iou_threshold: float
    mean_matched_iou: float

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        denom = self.n_pred + self.n_true
        return 2.0 * self.tp / denom if denom else 1.0


def _label_ids(true: Any, pred: Any) -> tuple[np.ndarray, ...]:
    """Both label images as arrays of one shape, with their label ids and each pixel's id index."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise RapaclInputError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    t_ids, t_inv = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    return true, pred, t_ids, t_inv, p_ids, p_inv


def match_labels(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> MatchResult:
    """Match objects of two label images by intersection over union.

    A reference object and a predicted object match when their IoU exceeds ``iou_threshold``; for
    thresholds >= 0.5 such a match is unique on both sides, so no assignment problem is solved (for
    lower thresholds the best IoU partner is taken greedily). Fully vectorised (one ``np.unique`` over
    the overlapping pixels).
    """
    true, pred, t_ids, t_inv, p_ids, p_inv = _label_ids(true, pred)
    t_area = np.bincount(t_inv, minlength=len(t_ids))
    p_area = np.bincount(p_inv, minlength=len(p_ids))
    t_obj = t_ids != 0
    p_obj = p_ids != 0
    n_true, n_pred = int(t_obj.sum()), int(p_obj.sum())
    both = (true.ravel() != 0) & (pred.ravel() != 0)
    if not both.any():
        return MatchResult(n_true, n_pred, 0, float(iou_threshold), 0.0)
    pair = t_inv[both].astype(np.int64) * len(p_ids) + p_inv[both]
    pairs, inter = np.unique(pair, return_counts=True)
    ti, pi = pairs // len(p_ids), pairs % len(p_ids)
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    # best partner for each reference object, then keep pairs that are mutual bests above threshold
    order = np.lexsort((-iou, ti))
    ti, pi, iou = ti[order], pi[order], iou[order]
    first = np.ones(len(ti), dtype=bool)
    first[1:] = ti[1:] != ti[:-1]
    ti, pi, iou = ti[first], pi[first], iou[first]
    order = np.lexsort((-iou, pi))
    ti, pi, iou = ti[order], pi[order], iou[order]
    first = np.ones(len(pi), dtype=bool)
    first[1:] = pi[1:] != pi[:-1]
    iou = iou[first]
    good = iou > iou_threshold
    tp = int(good.sum())
    return MatchResult(n_true, n_pred, tp, float(iou_threshold), float(iou[good].mean()) if tp else 0.0)


def aji_sums(true: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """The two sums of the aggregated Jaccard index (Kumar et al. 2017): ``(intersection, union)`` in
    pixels, so that a data set's AJI is ``sum(intersections) / sum(unions)`` over its images.

    Every reference object is paired with the predicted object of highest IoU among those it overlaps
    (ties: the lowest label); the pair adds its intersection to the first sum and its union to the
    second. A reference object that overlaps no prediction adds its area to the union, and so does
    every predicted object paired with no reference object. As in the original definition, one
    prediction can be the partner of several reference objects (a merge), and is then counted in each
    of their unions. Fully vectorised, like :func:`match_labels`.
    """
    true, pred, t_ids, t_inv, p_ids, p_inv = _label_ids(true, pred)
    t_area = np.bincount(t_inv, minlength=len(t_ids)).astype(np.int64)
    p_area = np.bincount(p_inv, minlength=len(p_ids)).astype(np.int64)
    t_area[t_ids == 0] = 0  # background is no object
    p_area[p_ids == 0] = 0
    both = (true.ravel() != 0) & (pred.ravel() != 0)
    pair = t_inv[both].astype(np.int64) * len(p_ids) + p_inv[both]
    pairs, inter = np.unique(pair, return_counts=True)
    ti, pi = pairs // len(p_ids), pairs % len(p_ids)
    union = t_area[ti] + p_area[pi] - inter
    iou = inter / union
    # best partner of every reference object: highest IoU, then lowest predicted label
    order = np.lexsort((pi, -iou, ti))
    ti, pi, inter, union = ti[order], pi[order], inter[order], union[order]
    first = np.ones(len(ti), dtype=bool)
    first[1:] = ti[1:] != ti[:-1]
    ti, pi, inter, union = ti[first], pi[first], inter[first], union[first]
    paired_t = np.zeros(len(t_ids), dtype=bool)
    paired_t[ti] = True
    paired_p = np.zeros(len(p_ids), dtype=bool)
    paired_p[pi] = True
    total_inter = int(inter.sum())
    total_union = int(union.sum()) + int(t_area[~paired_t].sum()) + int(p_area[~paired_p].sum())
    return total_inter, total_union


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard index (AJI, Kumar et al., IEEE TMI 2017) of a predicted label image against a
    reference one: ``intersection / union`` of :func:`aji_sums`, in [0, 1].

    Unlike the object F1 of :func:`match_labels`, it has no IoU cut-off: it weighs every pixel of every
    object, so it penalises merges, splits, missed and spurious objects, and loose outlines alike.
    Two empty label images agree perfectly (1.0); one empty and one not give 0.0.
    """
    inter, union = aji_sums(true, pred)
    return inter / union if union else 1.0


def nucleus_statistics(labels: Any, mpp: float, region: Any | None = None) -> dict[str, float]:
    """Count, density and size distribution of the nuclei in a label image.

    Parameters
    ----------
    labels
        ``(H, W)`` integer labels (numpy or dask).
    mpp
        Microns per pixel of ``labels``.
    region
        The RGB region, optional: adds the tissue area and the density per mm^2 of tissue.

    Returns
    -------
    dict
        ``n``, ``area_mm2``, ``density_per_mm2`` (per region area), ``median_area_um2``,
        ``q25_area_um2``, ``q75_area_um2``, ``iqr_area_um2``, ``mean_area_um2``, and with ``region``
        ``tissue_mm2`` and ``density_per_tissue_mm2``. NaN-free: sizes are 0.0 when there is no nucleus.
    """
    from .segmentation import tissue_mask
    from .segmentation._common import _positive

    mpp = _positive(mpp, "mpp")
    lab = np.asarray(labels)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    areas = counts * mpp**2
    area_mm2 = lab.size * mpp**2 * 1e-6
    q25, q50, q75 = np.percentile(areas, [25, 50, 75]) if len(areas) else (0.0, 0.0, 0.0)
    stats = {
        "n": float(len(ids)),
        "area_mm2": float(area_mm2),
        "density_per_mm2": float(len(ids) / area_mm2) if area_mm2 else 0.0,
        "median_area_um2": float(q50),
        "q25_area_um2": float(q25),
        "q75_area_um2": float(q75),
        "iqr_area_um2": float(q75 - q25),
        "mean_area_um2": float(areas.mean()) if len(areas) else 0.0,
    }
    if region is not None:
        tissue_mm2 = float(tissue_mask(region).sum()) * mpp**2 * 1e-6
        stats["tissue_mm2"] = tissue_mm2
        stats["density_per_tissue_mm2"] = float(len(ids) / tissue_mm2) if tissue_mm2 else 0.0
    return stats
