"""Leave-one-section-out accuracy on her2st C2-C6 with the 785 benchmark genes.

For each held-out TEST section, the next section (cyclically) is the INNER VALIDATION section (epoch
and hyper-parameter choice) and the remaining three are training sections. Every model is scored on
the test section with ``napari_rapacl.metrics.summarize`` (per-gene Pearson r across the section's
spots: PCC@F/S/M, MSE, MAE on log1p(CP10k)), beside Reg2ST's published mean PCC for that section.

Models:
* ``ridge``: the weight-free baseline: handcrafted colour / stain / texture / nucleus-proxy features
  (``napari_rapacl.features``), z-scored on the training sections, ridge regression with its penalty
  chosen on the validation section.
* ``stnet``, ``nh2st``, ``pixnet``: trained with the training module from
  ``training/configs/<model>_her2st.yaml`` (fold sections and ``--epochs`` etc. overridden).
* ``rapacl``: Stage 1 then Stage 2 (``rapacl_stage1_her2st.yaml`` / ``rapacl_stage2_her2st.yaml``);
  needs per-section radiomics tables (``--radiomics-dir``, written by ``napari_rapacl.radiomics``).

    python benchmarks/her2st_accuracy.py --models ridge stnet --out benchmarks/results/her2st_accuracy.json

Results: ``{model: {section: {pcc_m, pcc_s, pcc_f, mse, mae, ...}}}`` in the JSON file (merged with what
is already there, so models can be run one at a time) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from napari_rapacl.datasets import HER2ST_PUBLISHED_REG2ST, HER2ST_SECTIONS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the training module lives at the repository's top level
log = logging.getLogger("her2st_accuracy")


def folds(sections: tuple[str, ...] = HER2ST_SECTIONS) -> list[dict[str, list[str]]]:
    """Leave-one-section-out folds with the next section as inner validation."""
    out = []
    for i, test in enumerate(sections):
        val = sections[(i + 1) % len(sections)]
        out.append({"test": [test], "val": [val], "train": [s for s in sections if s not in (test, val)]})
    return out


def _section_arrays(name: str, genes: list[str], size: int, mpp: float):
    from napari_rapacl.datasets import her2st
    from napari_rapacl.features import patch_features
    from napari_rapacl.preprocess import extract_patches, normalize_log1p_cp10k

    sec = her2st(name)
    patches = extract_patches(sec.slide, sec.spots.x, sec.spots.y, size=size, mpp=mpp)
    return patch_features(patches), normalize_log1p_cp10k(sec.spots.counts, genes, missing="zero")


def run_ridge(fold_list, genes, *, size: int = 112, mpp: float = 1.0) -> dict[str, dict]:
    """The weight-free ridge baseline on every fold."""
    from sklearn.linear_model import Ridge
    from training.postprocess import choose_sigma, section_xy_um

    from napari_rapacl.datasets import her2st
    from napari_rapacl.inference import smooth_over_spots
    from napari_rapacl.metrics import pearson_per_gene, summarize

    data = {s: _section_arrays(s, genes, size, mpp) for f in fold_list for s in f["test"]}
    for f in fold_list:
        for s in f["train"] + f["val"]:
            data.setdefault(s, _section_arrays(s, genes, size, mpp))
    xy_um = {s: section_xy_um(s, her2st(s).spots.x, her2st(s).spots.y) for s in data}
    results = {}
    for f in fold_list:
        xtr = np.concatenate([data[s][0] for s in f["train"]])
        ytr = np.concatenate([data[s][1] for s in f["train"]])
        mean, std = xtr.mean(0), xtr.std(0) + 1e-8
        (xva, yva), (xte, yte) = data[f["val"][0]], data[f["test"][0]]
        best = None
        for alpha in (1e-1, 1, 10, 100, 1e3, 1e4, 1e5):
            model = Ridge(alpha=alpha).fit((xtr - mean) / std, ytr)
            score = np.nan_to_num(pearson_per_gene(model.predict((xva - mean) / std), yva)).mean()
            if best is None or score > best[0]:
                best = (score, alpha, model)
        pred = best[2].predict((xte - mean) / std)
        test, val = f["test"][0], f["val"][0]
        sigma, by_sigma = choose_sigma([(best[2].predict((xva - mean) / std), yva, xy_um[val])])
        raw = summarize(pred, yte, genes)
        results[test] = {
            **summarize(smooth_over_spots(pred, xy_um[test], sigma), yte, genes),
            "pcc_m_raw": raw["pcc_m"],
            "smooth_sigma_um": sigma,
            "alpha": best[1],
            "val_pcc": float(best[0]),
        }
        log.info("ridge %s: pcc_m %.3f (raw %.3f, alpha %g, sigma %g)", test,
                 results[test]["pcc_m"], raw["pcc_m"], best[1], sigma)  # fmt: skip
    return results


def _train(config: str, fold: dict, out_dir: Path, extra: list[str]) -> dict:
    from training import load_config, train

    overrides = [
        f"data.train=[{','.join(fold['train'])}]",
        f"data.val=[{','.join(fold['val'])}]",
        f"data.test=[{','.join(fold['test'])}]",
        f"run.out_dir={out_dir}",
        *extra,
    ]
    result = train(load_config(REPO / "training" / "configs" / config, overrides))
    return result


def overrides_for(model: str, overrides: list[str]) -> list[str]:
    """``key=value`` applies to every deep model, ``model:key=value`` to that model and its variants,
    ``model@tag:key=value`` to the variant ``model@tag`` only (e.g. ``rapacl@shuffle``, an ablation)."""
    out = []
    for item in overrides:
        head = item.split("=", 1)[0]
        if ":" in head:
            target, rest = item.split(":", 1)
            if target == model or target == model.split("@", 1)[0]:
                out.append(rest)
        else:
            out.append(item)
    return out


def _fold_result(run_dir: Path, fold: dict, smooth: bool = True) -> dict:
    """The test scores of a finished run on the 785 benchmark genes (whatever panel it was trained on),
    with the spot smoothing chosen on the validation section (stored in ``best.pt``), the unsmoothed
    score (``pcc_m_raw``) and each marker gene's r (``markers``)."""
    from training.data import HER2ST_MARKERS
    from training.postprocess import SMOOTH_GRID_UM, fit_smoothing, section_xy_um
    from training.run import predict_checkpoint

    from napari_rapacl.datasets import her2st_genes
    from napari_rapacl.inference import smooth_over_spots
    from napari_rapacl.metrics import pearson_per_gene, summarize
    from napari_rapacl.models.checkpoint import read_checkpoint

    test, val = fold["test"][0], fold["val"][0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "best.pt"
    preds = predict_checkpoint(ckpt, [val, test])
    genes = [str(g) for g in read_checkpoint(ckpt)["genes"]]
    bench = her2st_genes()
    cols = [genes.index(g) for g in bench]
    grid = SMOOTH_GRID_UM if smooth else (0.0,)
    setting = fit_smoothing(ckpt, [val], score_genes=bench, predictions=preds, grid=grid)
    p, t = preds[test]["pred"], preds[test]["target"]
    xy = section_xy_um(test, preds[test]["x"], preds[test]["y"])
    sm = smooth_over_spots(p, xy, setting["smooth_sigma_um"])
    out = {
        k: v for k, v in summarize(sm[:, cols], t[:, cols], bench).items() if not isinstance(v, (list, dict))
    }
    out["pcc_m_raw"] = summarize(p[:, cols], t[:, cols], bench)["pcc_m"]
    out["smooth_sigma_um"] = setting["smooth_sigma_um"]
    out["best_epoch"] = metrics.get("best_epoch")
    out["n_genes_trained"] = len(genes)
    markers = [g for g in HER2ST_MARKERS if g in genes]
    r = pearson_per_gene(sm[:, [genes.index(g) for g in markers]], t[:, [genes.index(g) for g in markers]])
    out["markers"] = {g: (None if not np.isfinite(v) else float(v)) for g, v in zip(markers, r, strict=True)}
    return out


def collect(model: str, fold_list, runs: Path, smooth: bool = True) -> dict:
    """Results of the folds whose runs finished (e.g. after an interrupted benchmark), from their
    ``metrics.json``; ``seconds`` is the runs' own recorded wall time (training + test)."""
    base, _, tag = model.partition("@")
    suffix = f"_{tag}" if tag else ""
    results = {}
    for f in fold_list:
        test = f["test"][0]
        last = runs / (f"rapacl_stage2{suffix}_{test}" if base == "rapacl" else f"{base}{suffix}_{test}")
        first = runs / f"rapacl_stage1{suffix}_{test}" if base == "rapacl" else last
        first = first if first.exists() else last
        if not (last / "metrics.json").exists():
            continue
        results[test] = _fold_result(last, f, smooth=smooth)
        # the runs' own wall times (Stage 1 + Stage 2 for RaPaCL-ST; an ensemble's build time), which
        # stay right when run folders are copied
        secs = [
            json.loads((d / "metrics.json").read_text()).get("seconds") for d in dict.fromkeys([first, last])
        ]
        if all(isinstance(v, (int, float)) for v in secs):
            results[test]["seconds"] = float(sum(secs))
        elif (first / "config.yaml").exists():
            start = (first / "config.yaml").stat().st_mtime
            results[test]["seconds"] = (last / "metrics.json").stat().st_mtime - start
    return results


def run_dir_of(model: str, test: str, runs: Path) -> Path:
    """The run folder of ``model`` (``name@tag``) on the fold testing ``test`` (RaPaCL: its Stage 2)."""
    base, _, tag = model.partition("@")
    suffix = f"_{tag}" if tag else ""
    return runs / (f"rapacl_stage2{suffix}_{test}" if base == "rapacl" else f"{base}{suffix}_{test}")


def run_ensemble(model: str, fold_list, runs: Path, members: list[str], save=None, smooth=True) -> dict:
    """The ensemble of the fold's finished ``members`` runs (``training.ensemble``: equal weights, or
    ``ensemble@auto``: weights chosen on the validation section), scored like any model."""
    from training.ensemble import build_ensemble

    tag = model.partition("@")[2]
    results = {}
    for f in fold_list:
        test = f["test"][0]
        paths = [run_dir_of(m, test, runs) / "best.pt" for m in members]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            log.warning("%s %s: skipped, member runs not finished: %s", model, test, missing)
            continue
        t0 = time.perf_counter()
        out = run_dir_of(model, test, runs)
        build_ensemble(paths, out, weights="auto" if tag == "auto" else "equal", val=f["val"], smooth=smooth)
        results[test] = _fold_result(out, f, smooth=smooth)
        results[test]["seconds"] = time.perf_counter() - t0
        results[test]["members"] = list(members)
        log.info("%s %s: pcc_m %.3f (unsmoothed %.3f)", model, test, results[test]["pcc_m"],
                 results[test]["pcc_m_raw"])  # fmt: skip
        if save is not None:
            save(results)
    return results


def run_deep(
    model: str,
    fold_list,
    runs: Path,
    extra: list[str],
    radiomics_dir: Path | None,
    save=None,
    smooth=True,
    reuse=False,
) -> dict:
    """Train and test ``model`` on every fold; ``save(results)`` is called after each fold. ``reuse``:
    a fold whose run already finished under ``runs`` is scored without training it again."""
    extra_all, extra = extra, overrides_for(model, extra)
    base, _, tag = model.partition("@")
    suffix = f"_{tag}" if tag else ""
    results = {}
    for f in fold_list:
        test = f["test"][0]
        t0 = time.perf_counter()
        if reuse and (run_dir_of(model, test, runs) / "metrics.json").is_file():
            # a finished run of this model and fold (e.g. a lever run earlier): scored, not retrained
            results.update(collect(model, [f], runs, smooth=smooth))
            log.info("%s %s: finished run reused: pcc_m %.3f", model, test, results[test]["pcc_m"])
            if save is not None:
                save(results)
            continue
        if base == "rapacl":
            if radiomics_dir is None:
                raise SystemExit("rapacl needs --radiomics-dir with her2st_<section>.parquet tables")
            tables = [f"data.radiomics_table={radiomics_dir}/her2st_{{section}}.parquet"]
            # stage1.KEY=VALUE / stage2.KEY=VALUE: for one stage only (e.g. rapacl:stage1.optim.epochs=6)
            one = {n: [e.split(".", 1)[1] for e in extra if e.startswith(f"stage{n}.")] for n in (1, 2)}
            both = [e for e in extra if not e.startswith(("stage1.", "stage2."))]
            # a variant (ablation) starts Stage 2 from the main model's Stage 1 when that exists, unless
            # it has Stage 1 overrides of its own (rapacl@tag:stage1.KEY=VALUE): then it trains its own
            own_stage1 = any(
                i.split(":", 1)[0] == model and i.split(":", 1)[1].startswith("stage1.")
                for i in extra_all
                if ":" in i.split("=", 1)[0]
            )
            stage1 = runs / f"rapacl_stage1_{test}"
            if not (tag and not own_stage1 and (stage1 / "best.pt").is_file()):
                stage1 = runs / f"rapacl_stage1{suffix}_{test}"
                _train("rapacl_stage1_her2st.yaml", f, stage1, tables + both + one[1])
            result = _train(
                "rapacl_stage2_her2st.yaml", f, runs / f"rapacl_stage2{suffix}_{test}",
                tables + [f"model.init_checkpoint={stage1 / 'best.pt'}", *both, *one[2]],
            )  # fmt: skip
        else:
            result = _train(f"{base}_her2st.yaml", f, runs / f"{base}{suffix}_{test}", extra)
        results[test] = _fold_result(Path(result.out_dir), f, smooth=smooth)
        results[test]["seconds"] = time.perf_counter() - t0
        r = results[test]
        log.info("%s %s: pcc_m %.3f (unsmoothed %.3f)", model, test, r["pcc_m"], r["pcc_m_raw"])
        if save is not None:
            save(results)
    return results


def table(results: dict) -> str:
    secs = list(HER2ST_SECTIONS)
    lines = [
        "| model | " + " | ".join(secs) + " | mean | mean of done folds | unsmoothed (same folds) |",
        "|---|" + "---|" * (len(secs) + 3),
        "| Reg2ST (published, 31 training sections) | "
        + " | ".join(f"{HER2ST_PUBLISHED_REG2ST[s]:.3f}" for s in secs)
        + f" | {np.mean([HER2ST_PUBLISHED_REG2ST[s] for s in secs]):.3f} | | |",
    ]
    for model, per in results.items():
        vals = [per.get(s, {}).get("pcc_m") for s in secs]
        raw = [per.get(s, {}).get("pcc_m_raw") for s in secs]
        shown = [f"{v:.3f}" if v is not None else "-" for v in vals]
        done = [v for v in vals if v is not None]
        mean = f"{np.mean(done):.3f}" if len(done) == len(secs) else "-"
        part = f"{np.mean(done):.3f} ({len(done)})" if done else "-"
        raw_done = [r for v, r in zip(vals, raw, strict=True) if v is not None and r is not None]
        unsm = f"{np.mean(raw_done):.3f}" if raw_done and len(raw_done) == len(done) else "-"
        lines.append(f"| {model} | " + " | ".join(shown) + f" | {mean} | {part} | {unsm} |")
    return "\n".join(lines)


def marker_table(results: dict) -> str:
    """Mean r of each marker gene over the finished folds, per model."""
    markers: list[str] = []
    for per in results.values():
        for res in per.values():
            markers += [g for g in res.get("markers") or {} if g not in markers]
    if not markers:
        return ""
    lines = ["| model | " + " | ".join(markers) + " |", "|---|" + "---|" * len(markers)]
    for model, per in results.items():
        cells = []
        for g in markers:
            vals = [
                res["markers"][g] for res in per.values() if (res.get("markers") or {}).get(g) is not None
            ]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ridge", "stnet", "nh2st", "pixnet", "rapacl"])
    parser.add_argument("--sections", nargs="+", default=list(HER2ST_SECTIONS), help="test sections to run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "her2st_accuracy.json"))
    parser.add_argument("--runs", default=str(REPO / "outputs" / "benchmark_runs"))
    parser.add_argument("--radiomics-dir", default=None)
    parser.add_argument(
        "--collect", action="store_true", help="only read the finished runs under --runs into --out"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="score a fold's finished run instead of training it again"
    )
    parser.add_argument(
        "--ensemble-members",
        nargs="+",
        default=["stnet", "pixnet", "rapacl@plain"],
        help="the runs the `ensemble` row averages (model names as in --models; run before it)",
    )
    parser.add_argument(
        "--no-smooth",
        action="store_true",
        help="no test-time spot smoothing (chosen on validation otherwise)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides for every deep run (e.g. optim.epochs=20), or model:key=value for one "
        "model (e.g. pixnet:model.config.hidden=128; rapacl: both stages)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from napari_rapacl.datasets import her2st_genes

    genes = her2st_genes()
    fold_list = [f for f in folds() if f["test"][0] in args.sections]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}

    def save(model: str, per: dict) -> None:
        # merged into the file's current content under a lock: benchmark processes running other
        # models or folds at the same time keep their results
        import fcntl

        out.parent.mkdir(parents=True, exist_ok=True)
        import hashlib
        import tempfile

        key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
        with open(Path(tempfile.gettempdir()) / f"her2st_accuracy_{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = json.loads(out.read_text()) if out.exists() else {}
            current.setdefault(model, {}).update(per)
            results.clear()
            results.update(current)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(out)

    for model in args.models:
        t0 = time.perf_counter()
        if args.collect:
            per = {} if model == "ridge" else collect(model, fold_list, Path(args.runs), not args.no_smooth)
        elif model == "ridge":
            per = run_ridge(fold_list, genes)
        elif model.partition("@")[0] == "ensemble":
            per = run_ensemble(
                model, fold_list, Path(args.runs), list(args.ensemble_members),
                lambda r, m=model: save(m, r), smooth=not args.no_smooth,
            )  # fmt: skip
        else:
            rad = Path(args.radiomics_dir) if args.radiomics_dir else None
            per = run_deep(
                model, fold_list, Path(args.runs), list(args.overrides), rad,
                lambda r, m=model: save(m, r), smooth=not args.no_smooth, reuse=args.reuse,
            )  # fmt: skip
        save(model, per)
        log.info("%s done in %.0f s", model, time.perf_counter() - t0)
    print(table(results))
    print()
    print(marker_table(results))


if __name__ == "__main__":
    main()
