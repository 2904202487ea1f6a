"""Test-time post-processing chosen on the inner validation section and stored in the checkpoint.

Spot smoothing (:func:`napari_rapacl.inference.smooth_over_spots`): each spot's prediction becomes a
Gaussian-weighted mean over the spot grid. Its width is chosen on the VALIDATION sections only (the
mean per-gene Pearson r over ``score_genes``), from a small grid that includes 0 (off), and written
into the checkpoint as ``postprocess = {"smooth_sigma_um": s, ...}``; prediction from a slide
(:func:`napari_rapacl.jobs.iter_predict`) applies the same setting.

    from training.postprocess import fit_smoothing
    fit_smoothing("outputs/runs/x/best.pt", ["C4"])   # -> {"smooth_sigma_um": 100.0, ...}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_rapacl.inference import SMOOTH_GRID_UM, choose_sigma, mean_pcc, smoothing_setting

log = logging.getLogger("training")

__all__ = [
    "SMOOTH_GRID_UM",
    "choose_sigma",
    "fit_smoothing",
    "fit_smoothing_and_reliability",
    "mean_pcc",
    "section_xy_um",
    "write_postprocess",
]


def section_xy_um(name: str, x: np.ndarray, y: np.ndarray, data_dir: str | None = None) -> np.ndarray:
    """``(n, 2)`` spot centres in um of her2st section ``name`` (level-0 px x the slide's um/px)."""
    from napari_rapacl.datasets import her2st

    mpp = float(her2st(name, data_dir=data_dir).slide.require_mpp("spot smoothing"))
    return np.stack([np.asarray(x, np.float64), np.asarray(y, np.float64)], axis=1) * mpp


def write_postprocess(
    checkpoint: str | Path, setting: dict[str, Any], reliability: Any | None = None
) -> None:
    """Store ``setting`` as the checkpoint's ``postprocess`` and, when given, ``reliability`` (per-gene
    validation r in gene order) as its ``gene_reliability`` (one atomic rewrite, weights untouched)."""
    import torch

    from napari_rapacl._atomic import write_atomic
    from napari_rapacl.models.checkpoint import gene_reliability_entry, read_checkpoint

    payload = read_checkpoint(checkpoint)
    payload["postprocess"] = dict(setting)
    if reliability is not None:
        sections = list(setting.get("chosen_on") or [])
        payload["gene_reliability"] = gene_reliability_entry(reliability, list(payload["genes"]), sections)
    write_atomic(Path(checkpoint), lambda tmp: torch.save(payload, tmp))


def fit_smoothing(
    checkpoint: str | Path,
    val_sections: Sequence[str],
    *,
    score_genes: Sequence[str] | None = None,
    grid: Sequence[float] = SMOOTH_GRID_UM,
    data_dir: str | None = None,
    predictions: dict[str, dict[str, Any]] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Choose the spot-smoothing width on ``val_sections`` and (``write``) store it in ``checkpoint``.

    ``predictions`` are :func:`training.run.predict_checkpoint` outputs when already computed.
    ``score_genes`` (default: all the checkpoint's genes) are the genes the choice is scored on.
    Returns the setting ``{"smooth_sigma_um", "chosen_on", "val_pcc_by_sigma"}``.
    """
    from napari_rapacl.models.checkpoint import read_checkpoint

    from .run import predict_checkpoint

    genes = [str(g) for g in read_checkpoint(checkpoint)["genes"]]
    cols = np.arange(len(genes)) if score_genes is None else np.array([genes.index(g) for g in score_genes])
    if predictions is None:
        predictions = predict_checkpoint(checkpoint, list(val_sections), data_dir=data_dir)
    preds = []
    for name in val_sections:
        p = predictions[name]
        xy = section_xy_um(name, p["x"], p["y"], data_dir)
        preds.append((p["pred"][:, cols], p["target"][:, cols], xy))
    setting = smoothing_setting(preds, val_sections, grid)
    log.info("spot smoothing chosen on %s: %s", list(val_sections), setting)
    if write:
        write_postprocess(checkpoint, setting)
    return setting


def main(argv: list[str] | None = None) -> int:
    """``python -m training.postprocess CHECKPOINT [--val C4 ...]``: choose and store the smoothing."""
    import argparse

    from napari_rapacl.models.checkpoint import read_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m training.postprocess",
        description="Choose a checkpoint's test-time spot smoothing on its inner validation section(s) "
        "and store it in the checkpoint (prediction from a slide then applies it).",
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--val", nargs="+", default=None, help="validation sections (default: the run's)")
    parser.add_argument("--grid", nargs="+", type=float, default=list(SMOOTH_GRID_UM), help="widths in um")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    val = args.val
    if val is None:
        cfg = read_checkpoint(args.checkpoint).get("train_config") or {}
        val = list((cfg.get("data") or {}).get("val") or [])
        if not val:
            raise SystemExit(f"{args.checkpoint} records no validation section: pass --val SECTION")
    setting = fit_smoothing(args.checkpoint, val, grid=args.grid)
    print(f"{args.checkpoint}: smooth_sigma_um = {setting['smooth_sigma_um']:g} (chosen on {val})")
    return 0


def fit_smoothing_and_reliability(
    checkpoint: str | Path, val_sections: Sequence[str], *, data_dir: str | None = None
) -> dict[str, Any]:
    """:func:`fit_smoothing` on ``val_sections``, and each gene's validation r recomputed WITH the chosen
    smoothing (mean over the sections): both written into ``checkpoint`` in one atomic rewrite, so the
    reliability the viewer shows beside a gene is that of the values it shows. Returns the setting."""
    from napari_rapacl.inference import postprocess_spots
    from napari_rapacl.metrics import pearson_per_gene

    from .run import predict_checkpoint

    predictions = predict_checkpoint(checkpoint, list(val_sections), data_dir=data_dir)
    setting = fit_smoothing(checkpoint, val_sections, data_dir=data_dir, predictions=predictions, write=False)
    per_section = []
    for name in val_sections:
        p = predictions[name]
        xy = section_xy_um(name, p["x"], p["y"], data_dir)
        per_section.append(pearson_per_gene(postprocess_spots(p["pred"], xy, setting), p["target"]))
    with np.errstate(all="ignore"):
        r = np.nanmean(np.stack(per_section), axis=0) if len(per_section) > 1 else per_section[0]
    write_postprocess(checkpoint, setting, reliability=r)
    return setting


if __name__ == "__main__":
    raise SystemExit(main())
