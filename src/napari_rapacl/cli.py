"""Command line: ``napari-rapacl demo`` and ``napari-rapacl predict``."""

from __future__ import annotations

import argparse
import logging
import sys


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


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from ._errors import RapaclInputError
    from .export import checkpoint_sha256, to_anndata, write_h5ad
    from .inference import predict_spots
    from .io import open_slide, read_spots
    from .models.checkpoint import load_model

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
    pred = predict_spots(
        model, slide, spots.x, spots.y, radius=spots.radius, device=args.device, batch_size=args.batch_size
    )
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
        },
    )
    out = write_h5ad(adata, args.out)
    print(f"predicted {pred.shape[1]} genes at {pred.shape[0]} spots -> {out}")
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
    pred.add_argument("--batch-size", type=int, default=64)
    pred.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._errors import RapaclInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (RapaclInputError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
