"""Command line: ``napari-rapacl demo`` (more subcommands come with the plugin issue)."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
