"""Build the project's cellpose nucleus model (``rapacl_nuclei_tnbc``) from the TNBC nuclei annotations.

    python -m training.cellpose_nuclei                        # default settings, installs by name
    python -m training.cellpose_nuclei --data-dir ../shared/data --epochs 200 --threads 1
    python -m training.cellpose_nuclei --out /tmp/my_model    # a file elsewhere (not usable by name)

A thin command line over :func:`napari_rapacl.jobs.iter_build_nuclei_model` (the same job the Cells
widget's build button runs): cellpose 3.x's ``train_seg`` on TNBC patients 01-08 (09-11 stay the
held-out test), from a random initialisation (nothing is downloaded), the haematoxylin channel as
input, colour-jittered copies of every tile, at 0.3 um/px. The model goes into the cellpose models
folder (``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``) with its settings beside it
(``rapacl_nuclei_tnbc.rapacl.json``), written atomically; then ``napari-rapacl segment --method
cellpose`` uses it by default and ``--model rapacl_nuclei_tnbc`` names it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("training.cellpose_nuclei")


def main(argv: list[str] | None = None) -> int:
    from napari_rapacl.segmentation._cellpose_train import (
        PROJECT_NBASE,
        TRAIN_MPP,
    )

    parser = argparse.ArgumentParser(
        prog="python -m training.cellpose_nuclei",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding tnbc_nuclei/ (default: $NAPARI_RAPACL_DATA_DIR)"
    )
    parser.add_argument(
        "--out", default=None, help="model file (default: rapacl_nuclei_tnbc in the models folder)"
    )
    parser.add_argument("--epochs", type=int, default=200, help="epochs of --images-per-epoch images (200)")
    parser.add_argument("--images-per-epoch", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--bsize", type=int, default=128, help="training crop side in px (128)")
    parser.add_argument(
        "--nbase",
        type=int,
        nargs="+",
        default=list(PROJECT_NBASE),
        help=f"U-Net channels per level, input channels first (default {' '.join(map(str, PROJECT_NBASE))})",
    )
    parser.add_argument("--stain-copies", type=int, default=3, help="colour-jittered copies per tile (3)")
    parser.add_argument("--train-mpp", type=float, default=TRAIN_MPP, help=f"um/px of training ({TRAIN_MPP})")
    parser.add_argument(
        "--cellprob-threshold", type=float, default=0.0, help="cellpose mask setting stored with the model"
    )
    parser.add_argument(
        "--flow-threshold", type=float, default=0.4, help="cellpose mask setting stored with the model"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from napari_rapacl._errors import RapaclInputError
    from napari_rapacl.jobs import iter_build_nuclei_model
    from napari_rapacl.progress import run_to_completion

    t0 = time.perf_counter()
    state = {"last": None}

    def report(p) -> None:
        key = (p.stage, p.done * 20 // max(p.total, 1))
        if key != state["last"] or p.done == p.total:
            state["last"] = key
            log.info("%s %d/%d (%.0f s)", p.stage, p.done, p.total, time.perf_counter() - t0)

    try:
        path = run_to_completion(
            iter_build_nuclei_model(
                args.data_dir,
                out=args.out,
                epochs=args.epochs,
                seed=args.seed,
                threads=args.threads,
                images_per_epoch=args.images_per_epoch,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                weight_decay=args.weight_decay,
                bsize=args.bsize,
                nbase=args.nbase,
                stain_copies=args.stain_copies,
                train_mpp=args.train_mpp,
                cellprob_threshold=args.cellprob_threshold,
                flow_threshold=args.flow_threshold,
            ),
            report,
        )
    except (RapaclInputError, FileNotFoundError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"nucleus model -> {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
