"""Command line: ``napari-rapacl demo``, ``predict``, ``segment`` and ``convert``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from ._errors import RapaclInputError


def _demo(args: argparse.Namespace) -> int:
    from .datasets import HER2ST_SECTIONS
    from .demo import DemoConfig, run_demo

    if args.section not in HER2ST_SECTIONS:  # checked before any training
        raise RapaclInputError(
            f"--section {args.section!r}: not a her2st section of the benchmark; choose one of "
            f"{', '.join(HER2ST_SECTIONS)}"
        )

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
    if result.installed is not None:
        print(f"installed model:       {cfg.install_as} ({result.installed}); Predict lists it by name")
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


#: The CLI logs a job's progress at every 10 % and at least this often (seconds) while it reports.
LOG_SECONDS = 5.0


def _progress_logger(what: str):
    """A callback that logs a :class:`Progress` about every 10 %, and at least every
    :data:`LOG_SECONDS` while the job reports (a long stage never looks stuck)."""
    import time

    log = logging.getLogger("napari_rapacl.cli")
    state = {"last": -1, "stage": None, "at": time.monotonic()}

    def report(p) -> None:
        if not p.total:
            return
        tenth = p.done * 10 // p.total
        now = time.monotonic()
        if p.stage != state["stage"]:
            state["stage"], state["last"] = p.stage, -1
        if p.done == p.total or tenth > state["last"] or now - state["at"] >= LOG_SECONDS:
            state["last"], state["at"] = tenth, now
            log.info("%s: %s %d/%d", what, p.stage, p.done, p.total)

    return report


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    text: str,
    *,
    suffixes: tuple[str, ...],
    inputs: list[str | Path],
    overwrite: bool,
    flag: str = "--out",
    folder: bool = False,
) -> Path:
    """An output path checked before any work: its extension is one of ``suffixes``; it is not one
    of the ``inputs`` (the same file, also through a link); it is not a folder (unless the output is one,
    ``folder``: a zarr store); an existing output is replaced only with ``--overwrite``; the folder
    it goes in exists and is writable."""
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise RapaclInputError(
            f"{flag} {text}: expected a {' or '.join(suffixes)} file, got {suffix or 'no extension'!r}"
        )
    for given in inputs:
        src = Path(given).expanduser()
        if _same_file(path, src) or path.resolve() == src.resolve():
            raise RapaclInputError(
                f"{flag} {text}: that is an input of this command ({src}); writing there would destroy it. "
                "Choose another output file"
            )
    if path.is_dir() and not folder:
        example = path / f"out{suffixes[0]}"
        raise RapaclInputError(f"{flag} {text}: is a folder; give a file name, e.g. {example}")
    if path.exists() and not overwrite:
        raise RapaclInputError(f"{flag} {text}: {path} already exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {text}: output folder not found: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RapaclInputError(f"{flag} {text}: the folder {parent} is not writable; choose another output")
    return path


def _predict(args: argparse.Namespace) -> int:
    from .jobs import iter_predict, load_model_choice, open_inputs, result_adata
    from .jobs._export import iter_write_h5ad
    from .progress import run_to_completion

    out_path = check_output(
        args.out,
        suffixes=(".h5ad", ".zarr"),
        inputs=[args.slide, args.spots, args.checkpoint, Path(args.checkpoint).with_suffix(".yaml")],
        overwrite=args.overwrite,
        folder=Path(args.out).suffix.lower() == ".zarr",  # a SpatialData store is a folder
    )
    if args.library_id is not None and (not args.library_id.strip() or "/" in args.library_id):
        raise RapaclInputError(f"--library-id {args.library_id!r}: must be a non-empty name without '/'")
    from .inference import resolve_device

    resolve_device(args.device)  # --device cuda without a GPU: refused before reading anything
    opened = open_inputs(args.slide, args.spots, mpp=args.mpp, radius=args.radius)
    for message in opened.warnings:  # e.g. spots of another section (jobs._checks.spot_fit), before any work
        print(f"warning: {message}", file=sys.stderr)
    slide, spots = opened.slide, opened.spots
    if args.roi is not None:
        x0, y0, x1, y1 = args.roi
        if not ((spots.x >= x0) & (spots.x < x1) & (spots.y >= y0) & (spots.y < y1)).any():
            raise RapaclInputError(f"--roi {args.roi}: no spot of {args.spots} lies inside it")
    loaded = load_model_choice(None, args.checkpoint)
    if args.model is not None and args.model != loaded.name:
        raise RapaclInputError(f"--model {args.model!r} but {args.checkpoint} holds a {loaded.name!r} model")
    # one pass over the spots: no tile cache; the values go tile by tile into a temporary HDF5 file
    # beside the output (removed at the end, also on failure), which the writers read a chunk at a time,
    # so memory does not grow with spots x genes (1M x 785 float32 = 3.1 GB)
    from .export import PredictionSpill

    with PredictionSpill(out_path) as spill:
        result = run_to_completion(
            iter_predict(
                loaded,
                slide,
                spots,
                args.roi,
                cache=False,
                device=args.device,
                tile_px=args.tile_px,
                batch_size=args.batch_size,
                scheduler=args.scheduler,
                out=spill.array,
            ),
            _progress_logger("predict"),
        )
        from ._memory import release_freed_memory

        release_freed_memory()  # the batches' memory back to the system before the writer's own
        adata = result_adata(
            result,
            spots,
            slide=slide,
            library_id=args.library_id or opened.name,
            provenance={
                "roi": list(args.roi) if args.roi else "whole slide",
                "tile_px": args.tile_px,
                "scheduler": args.scheduler or "none",
            },
        )
        if out_path.suffix.lower() == ".zarr":
            from .export_spatialdata import iter_write_spatialdata

            out = run_to_completion(
                iter_write_spatialdata(adata, out_path, slide, overwrite=args.overwrite),
                _progress_logger("SpatialData"),
            )
        else:
            out = run_to_completion(iter_write_h5ad(adata, out_path), _progress_logger("export"))
    extra = " with their spot radiomics" if result.radiomics is not None else ""
    print(
        f"predicted {len(result.genes)} genes at {len(result.index)} spots{extra} "
        f"({result.tiles_computed} tiles) -> {out}"
    )
    return 0


# ---- segment -----------------------------------------------------------------------------------

SEGMENT_OUTPUTS = (".zarr", ".h5ad", ".csv")


def _segment_outputs(paths: list[str], overwrite: bool, inputs: list[str]) -> dict[str, Path]:
    outs: dict[str, Path] = {}
    for text in paths:
        suffix = Path(text).suffix.lower()
        if suffix not in SEGMENT_OUTPUTS:
            raise RapaclInputError(
                f"--out {text}: unknown output type {suffix or '(no extension)'!r}; use cells.zarr (labels), "
                "cells.h5ad or cells.csv (per-cell table)"
            )
        if suffix in outs:
            raise RapaclInputError(f"--out {text}: a {suffix} output is already given ({outs[suffix]})")
        zarr = suffix == ".zarr"  # a zarr store is a folder
        outs[suffix] = check_output(text, suffixes=(suffix,), inputs=inputs, overwrite=overwrite, folder=zarr)
    return outs


def _segment_cellpose_model(model: str | None, build: bool) -> str:
    """The cellpose model ``segment`` runs (named, so the provenance says which); the project's nucleus
    model is built first when ``build`` is set and it is missing. A model that cannot be had is an
    error that names the command that builds the project's model."""
    from .progress import run_to_completion
    from .segmentation import PROJECT_NUCLEI_MODEL, project_nuclei_model_built, resolve_cellpose_model

    if build and model in (None, PROJECT_NUCLEI_MODEL) and not project_nuclei_model_built():
        from .jobs import iter_build_nuclei_model

        path = run_to_completion(iter_build_nuclei_model(), _progress_logger("nucleus model"))
        print(f"built the nucleus model {PROJECT_NUCLEI_MODEL!r} -> {path}")
    if model is None and project_nuclei_model_built():
        return PROJECT_NUCLEI_MODEL
    resolve_cellpose_model(model)  # fails here, before any work, with what to do
    if model is None:
        from .segmentation import cellpose_major_version

        model = "nuclei" if cellpose_major_version() == 3 else "cpsam"
    return model


def _segment(args: argparse.Namespace) -> int:
    import shutil
    import uuid

    from ._atomic import remove_stale_dirs, replace_dir
    from .jobs import iter_cells, open_inputs, write_cells
    from .progress import run_to_completion
    from .radiomics import NucleusSegmenter

    outs = _segment_outputs(args.out, args.overwrite, [args.slide])
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
    if args.build_model and args.method != "cellpose":
        raise RapaclInputError("--build-model builds the cellpose nucleus model: add --method cellpose")
    if args.method == "cellpose":
        args.model = _segment_cellpose_model(args.model, args.build_model)
    slide = open_inputs(args.slide, mpp=args.mpp).slide
    if not 0 <= args.level < len(slide.levels):
        raise RapaclInputError(f"--level {args.level}: {args.slide} has levels 0..{len(slide.levels) - 1}")
    segmenter = NucleusSegmenter(
        args.method,
        **({"diameter_um": args.diameter_um} if args.diameter_um is not None else {}),
        model=args.model,
    )
    zarr_out = outs.get(".zarr")
    tmp = None
    if zarr_out is not None:
        remove_stale_dirs(zarr_out)  # stores that killed runs left beside it free their space first
        tmp = zarr_out.parent / f".{zarr_out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            result = run_to_completion(
                iter_cells(
                    slide,
                    args.roi,
                    level=args.level,
                    segmenter=segmenter,
                    features=args.features,
                    tile=args.tile,
                    out=tmp,
                    scheduler=args.scheduler,
                    gpu=args.device == "cuda",
                    hold_labels=False,
                ),
                _progress_logger("segment"),
            )
        except RapaclInputError as exc:
            if str(args.slide) in str(exc) or Path(args.slide).name in str(exc):
                raise
            raise RapaclInputError(f"{args.slide}: {exc}") from exc
        if zarr_out is not None:
            import zarr

            arr = zarr.open_array(str(tmp), mode="r+")
            arr.attrs.update({"napari_rapacl": result.provenance})
            replace_dir(tmp, zarr_out)
            tmp = None
        for suffix in (".csv", ".h5ad"):
            if suffix in outs:
                write_cells(outs[suffix], result.cells, result.provenance)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    written = ", ".join(str(p) for p in outs.values())
    print(f"segmented {result.n_cells} cells ({segmenter.describe()}) -> {written}")
    return 0


# ---- convert -----------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    from .io.slide import open_slide, write_ome_tiff

    out = check_output(args.out, suffixes=(".tif", ".tiff"), inputs=[args.slide], overwrite=args.overwrite)
    if not out.name.lower().endswith((".ome.tif", ".ome.tiff")):
        raise RapaclInputError(f"{args.out}: name the output *.ome.tif (it is written as an OME-TIFF)")
    if args.tile % 16:
        raise RapaclInputError(f"--tile {args.tile}: must be a multiple of 16 pixels (e.g. 256 or 512)")
    slide = open_slide(args.slide, mpp=args.mpp)
    if slide.mpp is None:
        raise RapaclInputError(
            f"{args.slide}: the file does not say its pixel size; pass --mpp (microns per pixel, e.g. 0.5 "
            "for a 20x scan, 0.25 for 40x) so that the pyramid carries its size in um"
        )
    height, width = slide.shape
    log = logging.getLogger("napari_rapacl.cli")
    log.info("converting %s (%d x %d px, %.4g um/px)", args.slide, width, height, slide.mpp)
    compression = None if args.compression == "none" else args.compression
    write_ome_tiff(
        out,
        slide.levels[0],
        mpp=slide.mpp,
        tile=args.tile,
        compression=compression,
        progress=lambda done, total: log.info("convert: level %d/%d written", done, total),
    )
    print(f"wrote a tiled pyramidal OME-TIFF of {width} x {height} px at {slide.mpp:.4g} um/px -> {out}")
    return 0


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help="JPEG/PNG slides: the most pixels decoded whole (default 500 million, or "
        "$NAPARI_RAPACL_MAX_PIXELS)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-rapacl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="her2st: train the baseline, predict a held-out section, export")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--section", default="C2", help="held-out her2st section (default: C2)")
    demo.add_argument("--epochs", type=_positive_int, default=15, help="training epochs (>= 1)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.set_defaults(func=_demo)

    pred = sub.add_parser("predict", help="predict expression at the spots of a slide with a checkpoint")
    pred.add_argument("--slide", required=True, help="slide image (TIFF/OME-TIFF/SVS/JPEG/PNG)")
    pred.add_argument("--spots", required=True, help="spot file or Space Ranger folder")
    pred.add_argument("--checkpoint", required=True, help="a napari-rapacl checkpoint (.pt)")
    pred.add_argument("--model", default=None, help="expected registry name (checked against the checkpoint)")
    pred.add_argument(
        "--out",
        required=True,
        help="output .h5ad (AnnData) or .zarr (SpatialData: slide, spot circles, table); never an input",
    )
    pred.add_argument("--overwrite", action="store_true", help="replace an existing output file")
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
    _add_max_pixels(pred)
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
    seg.add_argument(
        "--model",
        default=None,
        help="cellpose model name or file (with --method cellpose; default: the project's rapacl_nuclei_tnbc "
        "when built, else cellpose's 'nuclei')",
    )
    seg.add_argument(
        "--build-model",
        action="store_true",
        help="build the project's cellpose nucleus model first if it is missing (python -m "
        "training.cellpose_nuclei; needs $NAPARI_RAPACL_DATA_DIR/tnbc_nuclei)",
    )
    seg.add_argument("--diameter-um", type=float, default=None, help="typical nucleus diameter in um")
    seg.add_argument("--level", type=int, default=0, help="pyramid level to segment at (default 0)")
    seg.add_argument("--tile", type=_positive_int, default=1024, help="tile core side in level px")
    seg.add_argument("--mpp", type=float, default=None, help="microns per pixel, if the slide does not say")
    seg.add_argument(
        "--features", action="store_true", help="add pyradiomics features per cell (table outputs)"
    )
    seg.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cellpose device")
    seg.add_argument(
        "--scheduler",
        type=parse_scheduler,
        default=None,
        help="where the tile windows are segmented and the cells measured: none (this process, default), "
        "threads, processes, synchronous, or a dask scheduler address (tcp://host:8786)",
    )
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_max_pixels(seg)
    seg.set_defaults(func=_segment)

    conv = sub.add_parser(
        "convert", help="write a slide (JPEG/PNG/flat TIFF/...) as a tiled pyramidal OME-TIFF with its um"
    )
    conv.add_argument("slide", help="slide image (TIFF/OME-TIFF/SVS/JPEG/PNG)")
    conv.add_argument("out", help="output *.ome.tif (never the input)")
    conv.add_argument("--mpp", type=float, default=None, help="microns per pixel, if the slide does not say")
    conv.add_argument("--tile", type=_positive_int, default=512, help="tile side in px (multiple of 16)")
    conv.add_argument(
        "--compression", default="zlib", choices=["zlib", "jpeg", "zstd", "none"], help="tile compression"
    )
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_max_pixels(conv)
    conv.set_defaults(func=_convert)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr: ``warning: <message>`` (our warnings speak to people; the
    category is named for others')."""
    kind = "" if issubclass(category, UserWarning) else f" ({category.__name__})"
    print(f"warning{kind}: {message}", file=sys.stderr if file is None else file)


def _os_error_line(exc: OSError, out: object) -> str:
    """One line for an operating-system error: a full disk names the output and what to do (HDF5
    reports it as a multi-line text without an errno, numpy as a short write); others give the reason
    and the file."""
    import errno
    import re

    text = " ".join(str(exc).split())
    short_write = re.search(r"\d+ requested and \d+ written", text)  # numpy's tofile on a full disk
    if exc.errno == errno.ENOSPC or "No space left on device" in text or short_write:
        outs = [str(o) for o in (out if isinstance(out, list) else [out]) if o is not None]
        target = f" while writing {', '.join(outs)}" if outs else ""
        return (
            f"no space left on the disk{target} (no half-written file is left; an output that existed "
            "is as it was). Free some space there or choose an output on another disk, then run again"
        )
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return f"{' '.join((exc.strerror or text).split())}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if getattr(args, "max_pixels", None) is not None:  # also for worker processes that reopen the slide
        from .io.slide import MAX_PIXELS_ENV

        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line, not Python's file:line + source
            return args.func(args)
    except (RapaclInputError, FileNotFoundError, FileExistsError, ImportError) as exc:  # a message
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except OSError as exc:  # a full disk, a read-only folder, a permission: the file and the reason
        parser.exit(2, f"{parser.prog}: error: {_os_error_line(exc, getattr(args, 'out', None))}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted (nothing half-written was left)\n")
    except Exception as exc:  # a bug of ours: one line, the traceback with -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        hint = "" if args.verbose else "; run again with -v for the traceback"
        parser.exit(1, f"{parser.prog}: internal error: {type(exc).__name__}: {exc}{hint}\n")


if __name__ == "__main__":
    sys.exit(main())
