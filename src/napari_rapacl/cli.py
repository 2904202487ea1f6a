"""Command line: ``napari-rapacl demo``, ``napari-rapacl predict`` and ``napari-rapacl segment``."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(epochs=args.epochs, device=args.device, test_section=args.section, seed=args.seed)
    if args.section in cfg.train_sections or args.section == cfg.val_section:
        others = [s for s in ("C2", "C3", "C4", "C5", "C6") if s != args.section]
        cfg.train_sections, cfg.val_section = tuple(others[:3]), others[3]
    result = run_demo(args.out, cfg)
    m = result.metrics
    print(
        f"\nheld-out section {cfg.test_section}: mean PCC {m['pcc_m']:.3f}, median {m['pcc_s']:.3f}, "
        f"Q1 {m['pcc_f']:.3f}, top-50 {m['pcc_top50']:.3f}, MSE {m['mse']:.3f} over {m['n_genes']} genes "
        f"and {m['n_spots']} spots ({m['n_constant']} constant genes scored 0)"
    )
    print(f"predictions (AnnData): {result.h5ad}")
    print(f"figure:                {result.figure}")
    print(f"checkpoint:            {result.checkpoint}")
    print(f"done in {result.seconds:.0f} s")
    return 0


def parse_roi(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` (level-0 px) -> a tuple, checked."""
    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--roi {text!r}: expected four numbers x0,y0,x1,y1") from None
    if not (x1 > x0 and y1 > y0):
        raise argparse.ArgumentTypeError(f"--roi {text!r}: needs x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def parse_scheduler(text: str | None) -> str | None:
    """``--scheduler``: none (this thread), threads, processes, synchronous or a scheduler address."""
    if text is None or text.lower() in ("", "none"):
        return None
    from .tiled import LOCAL_SCHEDULERS

    if text in LOCAL_SCHEDULERS or "://" in text or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"--scheduler {text!r}: expected one of none, {', '.join(LOCAL_SCHEDULERS)} or a dask scheduler "
        "address such as tcp://127.0.0.1:8786"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _progress_logger(what: str):
    """A callback that logs a :class:`Progress` about every 10 %."""
    log = logging.getLogger("napari_rapacl.cli")
    state = {"last": -1}

    def report(p) -> None:
        if p.total and (p.done == p.total or p.done * 10 // p.total > state["last"]):
            state["last"] = p.done * 10 // p.total
            log.info("%s: %s %d/%d", what, p.stage, p.done, p.total)

    return report


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from ._errors import RapaclInputError
    from .export import checkpoint_sha256, to_anndata, write_h5ad
    from .io import open_slide, read_spots
    from .models.checkpoint import load_model
    from .progress import run_to_completion
    from .tiled import iter_predict_region

    slide = open_slide(args.slide, mpp=args.mpp)
    spots = read_spots(args.spots, radius=args.radius)
    if slide.mpp is None and spots.mpp is not None:
        slide = slide.with_mpp(spots.mpp, "spot-grid")
    spots.check_inside(slide.shape, name=str(args.slide))
    if args.roi is not None:
        x0, y0, x1, y1 = args.roi
        keep = (spots.x >= x0) & (spots.x < x1) & (spots.y >= y0) & (spots.y < y1)
        if not keep.any():
            raise RapaclInputError(f"--roi {args.roi}: no spot of {args.spots} lies inside it")
        spots = spots.subset(np.flatnonzero(keep))
    model, ckpt = load_model(args.checkpoint)
    if args.model is not None and args.model != ckpt["model"]:
        raise RapaclInputError(
            f"--model {args.model!r} but {args.checkpoint} holds a {ckpt['model']!r} model"
        )
    # the spots are already restricted to the ROI: tile them all, no cache needed for one pass
    result = run_to_completion(
        iter_predict_region(
            model,
            slide,
            spots.x,
            spots.y,
            radius=spots.radius,
            tile_px=args.tile_px,
            cache=False,
            device=args.device,
            batch_size=args.batch_size,
            scheduler=args.scheduler,
        ),
        _progress_logger("predict"),
    )
    pred = result.values
    adata = to_anndata(
        pred,
        list(ckpt["genes"]),
        spots,
        slide=slide,
        library_id=args.library_id or slide.path.stem,
        provenance={
            "model": ckpt["model"],
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
            "config": ckpt["config"],
            "roi": list(args.roi) if args.roi else "whole slide",
            "tile_px": args.tile_px,
            "scheduler": args.scheduler or "none",
        },
    )
    out = write_h5ad(adata, args.out)
    print(
        f"predicted {pred.shape[1]} genes at {pred.shape[0]} spots ({result.tiles_computed} tiles) -> {out}"
    )
    return 0


# ---- segment -----------------------------------------------------------------------------------

SEGMENT_OUTPUTS = (".zarr", ".h5ad", ".csv")


def _segment_outputs(paths: list[str], overwrite: bool) -> dict[str, Path]:
    from ._errors import RapaclInputError

    outs: dict[str, Path] = {}
    for text in paths:
        path = Path(text).expanduser()
        suffix = path.suffix.lower()
        if suffix not in SEGMENT_OUTPUTS:
            raise RapaclInputError(
                f"--out {text}: unknown output type {suffix or '(no extension)'!r}; use cells.zarr (labels), "
                "cells.h5ad or cells.csv (per-cell table)"
            )
        if suffix in outs:
            raise RapaclInputError(f"--out {text}: a {suffix} output is already given ({outs[suffix]})")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"--out {text}: output folder not found: {path.parent}")
        if path.exists() and not overwrite:
            raise RapaclInputError(f"--out {text}: {path} already exists; pass --overwrite to replace it")
        outs[suffix] = path
    return outs


def _cell_table(labels, level_ds: float, origin: tuple[int, int], mpp_level: float):
    """Per-cell label, centroid (level-0 px) and area from a dask label image, one chunk at a time.

    ``origin``: ``(x, y)`` of the label image's first pixel, in pixels of the segmented level.
    """
    import numpy as np
    import pandas as pd

    n = int(labels.max().compute())
    count = np.zeros(n + 1, dtype=np.int64)
    sum_y = np.zeros(n + 1, dtype=np.float64)
    sum_x = np.zeros(n + 1, dtype=np.float64)
    y = 0
    for i, ch in enumerate(labels.chunks[0]):
        x = 0
        for j, cw in enumerate(labels.chunks[1]):
            block = np.asarray(labels.blocks[i, j].compute(scheduler="synchronous"))
            ys, xs = np.nonzero(block)
            if len(ys):
                ids = block[ys, xs]
                count += np.bincount(ids, minlength=n + 1)
                sum_y += np.bincount(ids, weights=ys + y, minlength=n + 1)
                sum_x += np.bincount(ids, weights=xs + x, minlength=n + 1)
            x += cw
        y += ch
    ids = np.flatnonzero(count[1:] > 0) + 1
    cy = sum_y[ids] / count[ids]  # level px in the region, pixel centres at integers
    cx = sum_x[ids] / count[ids]
    return pd.DataFrame(
        {
            "label": ids.astype(np.int64),
            # continuous level-0 coordinates (level pixel p covers [p, p + 1) * ds)
            "x": (origin[0] + cx + 0.5) * level_ds,
            "y": (origin[1] + cy + 0.5) * level_ds,
            "area_px": count[ids],
            "area_um2": count[ids] * mpp_level**2,
        }
    )


def _cell_radiomics(slide, labels, table, origin, level: int, mpp_level: float, max_area_um2: float):
    """pyradiomics features per cell, computed in windows around tile cores (bounded memory)."""
    import numpy as np
    import pandas as pd

    from .radiomics import cell_features, require_radiomics

    require_radiomics()
    ds = slide.downsamples[level]
    bx0, by0 = origin
    h, w = labels.shape
    margin = int(math.ceil(2.0 * math.sqrt(max_area_um2 / math.pi) / mpp_level)) + 8
    core = 2048
    # each cell belongs to the core holding its centroid (level px in the region)
    cy = np.floor(table["y"].to_numpy() / ds - by0).astype(int)  # the level pixel holding the centroid
    cx = np.floor(table["x"].to_numpy() / ds - bx0).astype(int)
    frames = []
    for ty in range(0, h, core):
        for tx in range(0, w, core):
            mine = (cy >= ty) & (cy < ty + core) & (cx >= tx) & (cx < tx + core)
            if not mine.any():
                continue
            wy0, wy1 = max(0, ty - margin), min(h, ty + core + margin)
            wx0, wx1 = max(0, tx - margin), min(w, tx + core + margin)
            lab = np.asarray(labels[wy0:wy1, wx0:wx1].compute(scheduler="synchronous"))
            lab = np.where(np.isin(lab, table["label"].to_numpy()[mine]), lab, 0).astype(np.int32)
            rgb = np.asarray(
                slide.levels[level][by0 + wy0 : by0 + wy1, bx0 + wx0 : bx0 + wx1].compute(scheduler="threads")
            )
            feats = cell_features(rgb, lab, mpp=mpp_level)
            frames.append(feats.drop(columns=["centroid_y", "centroid_x", "area"], errors="ignore"))
    if not frames:
        return pd.DataFrame(index=pd.Index([], name="label"))
    return pd.concat(frames).sort_index()


def _segment(args: argparse.Namespace) -> int:
    import os
    import shutil
    import uuid

    import anndata as ad
    import numpy as np

    from ._atomic import write_atomic
    from ._errors import RapaclInputError
    from .export import write_h5ad
    from .io import open_slide
    from .progress import run_to_completion
    from .segmentation import DEFAULT_MAX_AREA_UM2, SEGMENTATION_VERSION, iter_segment_region

    outs = _segment_outputs(args.out, args.overwrite)
    if args.features and ".zarr" in outs and len(outs) == 1:
        raise RapaclInputError("--features needs a table output: add --out cells.h5ad or --out cells.csv")
    if args.features:
        from .radiomics import require_radiomics

        try:
            require_radiomics()
        except ImportError as exc:
            raise RapaclInputError(f"--features: {exc}") from None
    if args.diameter_um is not None and not args.diameter_um > 0:
        raise RapaclInputError(f"--diameter-um {args.diameter_um}: must be > 0 (microns)")
    if args.model is not None and args.method != "cellpose":
        raise RapaclInputError(f"--model {args.model!r} is only used with --method cellpose")
    slide = open_slide(args.slide, mpp=args.mpp)
    height, width = slide.shape
    if not 0 <= args.level < len(slide.levels):
        raise RapaclInputError(f"--level {args.level}: {args.slide} has levels 0..{len(slide.levels) - 1}")
    box = args.roi if args.roi is not None else (0.0, 0.0, float(width), float(height))
    kwargs = {}
    if args.diameter_um is not None:
        kwargs["diameter_um"] = args.diameter_um
    if args.method == "cellpose":
        kwargs["model"] = args.model
        kwargs["gpu"] = args.device == "cuda"
    zarr_out = outs.get(".zarr")
    tmp = None
    if zarr_out is not None:
        tmp = zarr_out.parent / f".{zarr_out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            labels = run_to_completion(
                iter_segment_region(
                    slide, *box, level=args.level, method=args.method, tile=args.tile, out=tmp, **kwargs
                ),
                _progress_logger("segment"),
            )
        except RapaclInputError as exc:
            raise RapaclInputError(f"{args.slide}: {exc}") from exc
        mpp_level = slide.require_mpp("segmentation") * slide.downsamples[args.level]
        ds = slide.downsamples[args.level]
        level_h, level_w = slide.levels[args.level].shape[:2]  # as segmentation._level_box does
        origin = (min(math.floor(box[0] / ds), level_w - 1), min(math.floor(box[1] / ds), level_h - 1))
        table = _cell_table(labels, ds, origin, mpp_level)
        provenance = {
            "slide": str(args.slide),
            "roi": [float(v) for v in box],
            "level": int(args.level),
            "mpp_level": float(mpp_level),
            "method": args.method,
            "model": args.model or "",
            "diameter_um": args.diameter_um if args.diameter_um is not None else "default",
            "segmentation_version": SEGMENTATION_VERSION,
            "n_cells": len(table),
        }
        if args.features:
            feats = _cell_radiomics(slide, labels, table, origin, args.level, mpp_level, DEFAULT_MAX_AREA_UM2)
            table = table.join(feats, on="label", how="left")
        if zarr_out is not None:
            import zarr

            arr = zarr.open_array(str(tmp), mode="r+")
            arr.attrs.update({"napari_rapacl": provenance})
            if zarr_out.exists():
                shutil.rmtree(zarr_out) if zarr_out.is_dir() else zarr_out.unlink()
            os.replace(tmp, zarr_out)
            tmp = None
        if ".csv" in outs:
            write_atomic(outs[".csv"], lambda tmp: table.to_csv(tmp, index=False))
        if ".h5ad" in outs:
            import pandas as pd

            base = ["label", "x", "y", "area_px", "area_um2"]
            feature_cols = [c for c in table.columns if c not in base]
            obs = table[base].copy()
            obs.index = pd.Index([f"cell_{v}" for v in table["label"]], name="cell_id")
            X = (
                table[feature_cols].to_numpy(np.float32)
                if feature_cols
                else np.zeros((len(table), 0), np.float32)
            )
            adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(feature_cols, dtype=str)))
            adata.obsm["spatial"] = table[["x", "y"]].to_numpy(np.float64)
            adata.uns["napari_rapacl"] = provenance
            write_h5ad(adata, outs[".h5ad"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    written = ", ".join(str(p) for p in outs.values())
    print(f"segmented {len(table)} cells ({args.method}) -> {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-rapacl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="her2st: train the baseline, predict a held-out section, export")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--section", default="C2", help="held-out her2st section (default: C2)")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.set_defaults(func=_demo)

    pred = sub.add_parser("predict", help="predict expression at the spots of a slide with a checkpoint")
    pred.add_argument("--slide", required=True, help="slide image (TIFF/OME-TIFF/SVS/JPEG/PNG)")
    pred.add_argument("--spots", required=True, help="spot file or Space Ranger folder")
    pred.add_argument("--checkpoint", required=True, help="a napari-rapacl checkpoint (.pt)")
    pred.add_argument("--model", default=None, help="expected registry name (checked against the checkpoint)")
    pred.add_argument("--out", required=True, help="output .h5ad")
    pred.add_argument(
        "--roi", type=parse_roi, default=None, help="x0,y0,x1,y1 in level-0 px: only spots inside"
    )
    pred.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pred.add_argument("--mpp", type=float, default=None, help="microns per pixel, if the slide does not say")
    pred.add_argument(
        "--radius", type=float, default=None, help="spot radius in px, if the spot file lacks it"
    )
    pred.add_argument("--library-id", default=None, help="library id in uns['spatial'] (default: slide name)")
    pred.add_argument("--batch-size", type=_positive_int, default=64)
    pred.add_argument(
        "--tile-px",
        type=_positive_int,
        default=2048,
        help="side of the tile grid in level-0 px (default 2048)",
    )
    pred.add_argument(
        "--scheduler",
        type=parse_scheduler,
        default=None,
        help="where tiles run: none (this process, default), threads, processes, synchronous, or a dask "
        "scheduler address (tcp://host:8786; needs napari-rapacl[distributed])",
    )
    pred.set_defaults(func=_predict)

    seg = sub.add_parser("segment", help="segment nuclei in a slide region; write labels and/or a cell table")
    seg.add_argument("--slide", required=True, help="slide image (TIFF/OME-TIFF/SVS/JPEG/PNG)")
    seg.add_argument(
        "--out",
        required=True,
        action="append",
        help="cells.zarr (label image), cells.h5ad or cells.csv (one row per cell); repeat for several",
    )
    seg.add_argument("--roi", type=parse_roi, default=None, help="x0,y0,x1,y1 in level-0 px (default: all)")
    seg.add_argument("--method", default="classical", choices=["classical", "cellpose"])
    seg.add_argument("--model", default=None, help="cellpose model name or file (with --method cellpose)")
    seg.add_argument("--diameter-um", type=float, default=None, help="typical nucleus diameter in um")
    seg.add_argument("--level", type=int, default=0, help="pyramid level to segment at (default 0)")
    seg.add_argument("--tile", type=_positive_int, default=1024, help="tile core side in level px")
    seg.add_argument("--mpp", type=float, default=None, help="microns per pixel, if the slide does not say")
    seg.add_argument(
        "--features", action="store_true", help="add pyradiomics features per cell (table outputs)"
    )
    seg.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cellpose device")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.set_defaults(func=_segment)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._errors import RapaclInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (RapaclInputError, FileNotFoundError, FileExistsError, ImportError) as exc:  # a message
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
