"""Build an ensemble checkpoint from finished runs: ``python -m training.ensemble``.

    python -m training.ensemble --members outputs/runs/stnet/best.pt outputs/runs/pixnet/best.pt \\
        outputs/runs/rapacl_stage2/best.pt --out outputs/runs/ensemble

The ensemble (model ``ensemble``, :mod:`napari_rapacl.models.ensemble`) predicts the mean of its
members over the genes they all predict. Its ``best.pt`` holds every member's weights and config, the
gene list, the members' input statistics (the radiomics z-scoring and recipe when a member is fed
radiomics) and, chosen or computed on the members' common INNER VALIDATION section(s) only: the member
weights (``--weights auto``; equal by default), the spot smoothing of the ensemble's predictions and
each gene's validation r of the smoothed ensemble. It loads with ``load_model`` (weights_only=True)
and predicts through ``jobs.iter_predict`` (the Predict widget, the CLI) like any model.

Members must read the same patch (``patch_size`` / ``mpp``) and be trained on the same validation
sections; at most one radiomics recipe (members fed radiomics must share their z-scoring).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_rapacl._atomic import write_text_atomic
from napari_rapacl._errors import RapaclInputError

log = logging.getLogger("training")

__all__ = ["build_ensemble", "choose_weights", "main"]


def _member_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def choose_weights(
    member_preds: Sequence[np.ndarray], target: np.ndarray, grid: Sequence[float] = (0.0, 1.0, 2.0)
) -> tuple[list[float], float]:
    """Member weights (from ``grid`` per member, not all 0) with the best mean per-gene r of the
    weighted mean on the validation ``target``; equal weights win ties. Returns (weights, score)."""
    from napari_rapacl.inference import mean_pcc

    n = len(member_preds)
    best_w, best = [1.0] * n, mean_pcc(np.mean(member_preds, axis=0), target)
    for w in itertools.product(grid, repeat=n):
        if sum(w) <= 0:
            continue
        pred = sum(wi * p for wi, p in zip(w, member_preds, strict=True)) / sum(w)
        score = mean_pcc(pred, target)
        if score > best + 1e-6:
            best_w, best = [float(v) for v in w], score
    return best_w, float(best)


def build_ensemble(
    members: Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights: str | Sequence[float] = "equal",
    val: Sequence[str] | None = None,
    smooth: bool = True,
    data_dir: str | None = None,
) -> Path:
    """Write ``out_dir/best.pt`` (+ ``best.yaml``, ``metrics.json``) for the ensemble of ``members``.

    ``weights``: ``"equal"``, ``"auto"`` (chosen on the validation sections, :func:`choose_weights`)
    or one number per member. ``val``: the validation sections (default: the members' own, which must
    agree). ``smooth``: choose the spot smoothing of the ensemble on them (else none). Returns the
    checkpoint path.
    """
    from napari_rapacl.models import EnsembleConfig, create_model
    from napari_rapacl.models.checkpoint import load_model, read_checkpoint, save_checkpoint

    from .postprocess import fit_smoothing_and_reliability, write_postprocess
    from .run import predict_checkpoint

    t0 = time.perf_counter()
    paths = [Path(p) for p in members]
    if len(paths) < 2:
        raise RapaclInputError(f"an ensemble needs at least two member checkpoints, got {len(paths)}")
    payloads = [read_checkpoint(p) for p in paths]
    for p, payload in zip(paths, payloads, strict=True):
        if payload["model"] == "ensemble":
            raise RapaclInputError(f"{p}: is itself an ensemble; pass its member checkpoints instead")
        if "train_config" not in payload:
            raise RapaclInputError(
                f"{p}: holds no training config (not written by python -m training.run), so its "
                "validation section and inputs are unknown; retrain it with training.run"
            )
    norms = {str(payload.get("normalization")) for payload in payloads}
    if len(norms) > 1:
        raise RapaclInputError(f"the members predict different quantities: {sorted(norms)}")
    # the validation section(s): chosen on them, never on a test section
    vals = [list((payload["train_config"].get("data") or {}).get("val") or []) for payload in payloads]
    if val is None:
        if any(v != vals[0] for v in vals) or not vals[0]:
            raise RapaclInputError(
                "the members were validated on different (or no) sections: "
                + "; ".join(f"{_member_name(p)}: {v}" for p, v in zip(paths, vals, strict=True))
                + "; pass --val SECTION (a section none of them was trained or tested on)"
            )
        val = vals[0]
    val = [str(v) for v in val]
    # one patch feeds all members
    geometry = [(int(pl["config"]["patch_size"]), float(pl["config"]["mpp"])) for pl in payloads]
    if len(set(geometry)) > 1:
        raise RapaclInputError(
            "the members read different patches ("
            + ", ".join(
                f"{_member_name(p)}: {g[0]} px at {g[1]} um/px" for p, g in zip(paths, geometry, strict=True)
            )
            + "); an ensemble feeds one patch per spot to all members: leave out or retrain the odd ones"
        )
    # genes all members predict, in the first member's order
    member_genes = [[str(g) for g in pl["genes"]] for pl in payloads]
    common = set(member_genes[0]).intersection(*member_genes[1:])
    genes = [g for g in member_genes[0] if g in common]
    if not genes:
        raise RapaclInputError("the members predict no gene in common")
    gene_index = [[mg.index(g) for g in genes] for mg in member_genes]
    # input statistics: the radiomics z-scoring / recipe of the member(s) fed radiomics
    models = [load_model(p)[0] for p in paths]
    input_stats: dict[str, Any] = {}
    train_config = dict(payloads[0]["train_config"])
    rad_members = [i for i, m in enumerate(models) if "radiomics" in getattr(m, "predict_inputs", ())]
    for i, payload in enumerate(payloads):
        for key, value in (payload.get("input_stats") or {}).items():
            if key in input_stats and _differs(input_stats[key], value):
                if key == "radiomics" and i in rad_members:
                    raise RapaclInputError(
                        f"{_member_name(paths[i])}: its radiomics are z-scored (or made) differently from "
                        "another member's; an ensemble carries one radiomics recipe: keep one of them"
                    )
                continue  # statistics a member does not predict with
            if key == "radiomics" and i not in rad_members:
                continue
            input_stats.setdefault(key, value)
    if rad_members:
        train_config = dict(payloads[rad_members[0]]["train_config"])  # its radiomics tables
    train_config["data"] = {**dict(train_config.get("data") or {}), "val": val}
    member_specs = []
    for pl in payloads:
        cfg = dict(pl["config"])
        if cfg.get("pretrained") is not None:
            cfg["pretrained"] = None  # the weights are in the ensemble
        member_specs.append({"model": str(pl["model"]), "config": cfg})

    # member weights (on the validation sections only)
    val_by_member = None
    if isinstance(weights, str) and weights == "auto":
        val_by_member = [predict_checkpoint(p, val, data_dir=data_dir) for p in paths]
        preds = [
            np.concatenate([vm[s]["pred"][:, idx] for s in val])
            for vm, idx in zip(val_by_member, gene_index, strict=True)
        ]
        target = np.concatenate([val_by_member[0][s]["target"][:, gene_index[0]] for s in val])
        w, score = choose_weights(preds, target)
        log.info("ensemble weights chosen on %s: %s (val mean r %.4f, unsmoothed)", val, w, score)
    elif isinstance(weights, str) and weights == "equal":
        w = None
    else:
        w = [float(v) for v in weights]
    config = EnsembleConfig(
        n_genes=len(genes),
        patch_size=geometry[0][0],
        mpp=geometry[0][1],
        members=member_specs,
        gene_index=gene_index,
        weights=w,
    )
    ensemble = create_model("ensemble", config=config)
    for i, (m, payload) in enumerate(zip(ensemble.members, payloads, strict=True)):
        try:
            m.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise RapaclInputError(f"{paths[i]}: its weights do not fit its config: {exc}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "best.pt"
    members_info = [
        {"checkpoint": str(p), "model": str(pl["model"])} for p, pl in zip(paths, payloads, strict=True)
    ]
    save_checkpoint(
        ckpt,
        ensemble,
        genes=genes,
        normalization=norms.pop(),
        input_stats=input_stats,
        train_config=train_config,
        ensemble={"members": members_info, "weights": w, "chosen_on": val},
    )
    if smooth:
        setting = fit_smoothing_and_reliability(ckpt, val, data_dir=data_dir)
    else:
        setting = {"smooth_sigma_um": 0.0, "chosen_on": val}
        write_postprocess(ckpt, setting)
    metrics = {
        "model": "ensemble",
        "members": [str(p) for p in paths],
        "weights": w,
        "genes": len(genes),
        "val": val,
        "best_epoch": None,
        "spot_smoothing": setting,
        "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    log.info("ensemble of %d members (%d genes) written to %s", len(paths), len(genes), ckpt)
    return ckpt


def _differs(a: Any, b: Any) -> bool:
    try:
        return json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str)
    except TypeError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.ensemble",
        description="Build one ensemble checkpoint (mean of the members' predictions) from finished runs; "
        "weights and spot smoothing are chosen on the members' inner validation section(s).",
    )
    parser.add_argument("--members", nargs="+", required=True, help="member checkpoints (best.pt of runs)")
    parser.add_argument("--out", required=True, help="output folder (best.pt, best.yaml, metrics.json)")
    parser.add_argument(
        "--weights", default="equal", help="'equal' (default), 'auto' (chosen on validation) or w1,w2,..."
    )
    parser.add_argument("--val", nargs="+", default=None, help="validation sections (default: the members')")
    parser.add_argument("--no-smooth", action="store_true", help="no test-time spot smoothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    weights: Any = args.weights
    if weights not in ("equal", "auto"):
        try:
            weights = [float(v) for v in weights.split(",")]
        except ValueError:
            print(
                f"error: --weights must be equal, auto or numbers like 1,1,2; got {args.weights!r}",
                file=sys.stderr,
            )
            return 2
    try:
        ckpt = build_ensemble(
            args.members, args.out, weights=weights, val=args.val, smooth=not args.no_smooth
        )
    except (RapaclInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(ckpt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
