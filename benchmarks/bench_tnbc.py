"""Nucleus segmentation scored on real annotations (TNBC) and looked at on her2st.

1. **TNBC nuclei** (``<data>/tnbc_nuclei``: 50 breast H&E tiles of 512 x 512 px at ~0.25 um/px from 11
   patients, hand-drawn nucleus masks; Naylor et al., IEEE TMI 2019). Every method is run on every tile
   as ``segment_nuclei(rgb, 0.25)`` with default settings and scored against the masks (8-connected
   components = nuclei) per patient group: patients 01-08 (*development*: the classical segmenter's
   settings were chosen on these) and 09-11 (*held out*: never used to choose anything). Scores, pooled
   over the tiles of a group: object F1 at IoU > 0.5 with precision and recall
   (:func:`napari_rapacl.metrics.match_labels`), the mean IoU of the matched pairs, the aggregated
   Jaccard index (:func:`napari_rapacl.metrics.aji_sums` summed over the tiles; the mean of the per-tile
   AJI too), and speed (best of ``--repeats`` runs per tile after a warm-up: Mpx/s and found nuclei/s).
   Methods: ``classical-v1``, the classical segmenter of git revision ``--reference-rev`` (the version
   before issue #11: her2st-tuned fixed thresholds), loaded from git into the package namespace;
   ``classical-v2`` (``segment_nuclei(..., version="2")``, the version RaPaCL-ST's tables of session 5
   were made with); ``classical`` (this checkout's newest version, 3); ``cellpose`` only where a
   cellpose model is on this machine (offline; otherwise skipped with a note): ``--cellpose-model``
   (default: cellpose's default, the project's ``rapacl_nuclei_tnbc`` when built by ``python -m
   training.cellpose_nuclei``, which was trained on patients 01-08 only).
2. **her2st visual check**: a 512 x 512 level-0 crop of sections C2, C4 and C6 (centred on the spot
   nearest the median spot position), nucleus outlines of ``classical-v2`` (left, yellow), ``classical``
   (the newest version; middle, magenta) and cellpose (right, green, when a model is there) drawn on
   the H&E, written as palette PNGs to ``--overlays`` with the nucleus counts (v1's count in the JSON).

    python benchmarks/bench_tnbc.py [--data-dir ../shared/data] [--reference-rev acde915] [--repeats 3]
        [--json benchmarks/results/segmentation_tnbc.json] [--overlays benchmarks/results]
        [--cellpose-model rapacl_nuclei_tnbc] [--methods classical-v2,classical,cellpose]
        [--groups dev,held-out]

``NAPARI_RAPACL_DATA_DIR`` is used when ``--data-dir`` is not given (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_rapacl import segmentation as seg
from napari_rapacl._image import as_rgb_uint8
from napari_rapacl.metrics import aji_sums, match_labels

REPO = Path(__file__).resolve().parents[1]
TNBC_MPP = 0.25
DEV_PATIENTS = tuple(range(1, 9))
HELD_OUT_PATIENTS = (9, 10, 11)
#: The last commit before issue #11 changed the classical segmenter.
REFERENCE_REV = "acde915"

Segmenter = Callable[[np.ndarray, float], np.ndarray]


def data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("NAPARI_RAPACL_DATA_DIR", REPO.parent / "shared" / "data"))


def tnbc_tiles(root: Path, patients: tuple[int, ...]) -> list[dict[str, Any]]:
    """The tiles of ``patients``: name, patient, RGB (RGBA composited over white) and instance labels."""
    from PIL import Image
    from scipy import ndimage as ndi

    tiles = []
    for patient in patients:
        images = sorted((root / f"Slide_{patient:02d}").glob("*.png"))
        if not images:
            raise FileNotFoundError(f"no TNBC tiles in {root / f'Slide_{patient:02d}'}")
        for image in images:
            rgb = as_rgb_uint8(np.asarray(Image.open(image)))
            mask = np.asarray(Image.open(root / f"GT_{patient:02d}" / image.name)) > 0
            labels, _ = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
            tiles.append(
                {"name": image.stem, "patient": patient, "rgb": rgb, "labels": labels.astype(np.int32)}
            )
    return tiles


def load_reference(rev: str = REFERENCE_REV) -> types.ModuleType:
    """The classical segmenter module ``_classical.py`` of git revision ``rev``, imported as
    ``napari_rapacl.segmentation._classical_<rev>`` (its relative imports resolve in this checkout's
    package; the helpers it imports from ``_common`` and ``_stain`` are unchanged since)."""
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:src/napari_rapacl/segmentation/_classical.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = f"napari_rapacl.segmentation._classical_{rev}"
    module = types.ModuleType(name)
    module.__package__ = "napari_rapacl.segmentation"
    module.__file__ = f"{rev}:src/napari_rapacl/segmentation/_classical.py"
    sys.modules[name] = module
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module


def reference_segmenter(rev: str = REFERENCE_REV) -> Segmenter:
    """``segment_nuclei(rgb, mpp)`` (default settings) with the classical segmenter of revision ``rev``."""
    old = load_reference(rev)

    def run(rgb: np.ndarray, mpp: float) -> np.ndarray:
        p = old._make_params(mpp, seg.DEFAULT_DIAMETER_UM, seg.DEFAULT_MIN_AREA_UM2, seg.DEFAULT_MAX_AREA_UM2)
        return old._classical(as_rgb_uint8(rgb), p, None)

    return run


def cellpose_segmenter(model: str | None = None) -> tuple[Segmenter | None, str]:
    """cellpose with ``model`` (default: its default model, the project's ``rapacl_nuclei_tnbc`` when it
    is built) if that model is on this machine (offline), else (None, why). Default settings of
    ``segment_nuclei`` (a project model runs at its training pixel size with its size filter)."""
    os.environ.setdefault("NAPARI_RAPACL_OFFLINE", "1")
    try:
        path = seg.resolve_cellpose_model(model)
    except ImportError as exc:
        return None, f"cellpose is not installed ({exc})"
    except (FileNotFoundError, seg.CellposeModelUnavailableError) as exc:
        return None, f"no local cellpose model: {exc}"

    def run(rgb: np.ndarray, mpp: float) -> np.ndarray:
        return seg.segment_nuclei(rgb, mpp, "cellpose", model=path)

    settings = seg.cellpose_model_settings(path)
    extra = ""
    if settings is not None:
        extra = f", trained at {settings['train_mpp']} um/px in {settings.get('train_seconds', '?')} s"
    return run, f"cellpose {seg.cellpose_major_version()}.x, model {path}{extra}"


def score(fn: Segmenter, tiles: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Pooled scores and speed of one segmenter on a group of tiles."""
    tp = n_true = n_pred = 0
    iou_sum = 0.0
    inter = union = 0
    seconds = 0.0
    per_tile = []
    for tile in tiles:
        rgb, truth = tile["rgb"], tile["labels"]
        t = time.perf_counter()
        labels = fn(rgb, TNBC_MPP)  # warm-up (and the labels scored; timed only with --repeats 0)
        best = time.perf_counter() - t if repeats == 0 else math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            fn(rgb, TNBC_MPP)
            best = min(best, time.perf_counter() - t)
        seconds += best
        m = match_labels(truth, labels, iou_threshold=0.5)
        i, u = aji_sums(truth, labels)
        tp, n_true, n_pred = tp + m.tp, n_true + m.n_true, n_pred + m.n_pred
        iou_sum += m.mean_matched_iou * m.tp
        inter, union = inter + i, union + u
        per_tile.append(
            {
                "tile": tile["name"],
                "n_true": m.n_true,
                "n_pred": m.n_pred,
                "tp": m.tp,
                "f1": m.f1,
                "aji": i / u if u else 1.0,
            }
        )
    mpx = sum(t["rgb"].shape[0] * t["rgb"].shape[1] for t in tiles) / 1e6
    return {
        "tiles": len(tiles),
        "n_true": n_true,
        "n_pred": n_pred,
        "tp": tp,
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_true if n_true else 1.0,
        "f1": 2.0 * tp / (n_true + n_pred) if n_true + n_pred else 1.0,
        "mean_matched_iou": iou_sum / tp if tp else 0.0,
        "aji": inter / union if union else 1.0,
        "aji_mean_per_tile": float(np.mean([t["aji"] for t in per_tile])),
        "seconds": seconds,
        "mpx_per_s": mpx / seconds,
        "nuclei_per_s": n_pred / seconds,
        "per_tile": per_tile,
    }


def her2st_crop(section: str, size: int = 512) -> tuple[np.ndarray, float, dict[str, Any]]:
    """A ``size`` x ``size`` level-0 crop centred on the spot nearest the median spot position."""
    from napari_rapacl.datasets import her2st

    sec = her2st(section)
    x, y = np.asarray(sec.spots.x), np.asarray(sec.spots.y)
    i = int(np.argmin(np.hypot(x - np.median(x), y - np.median(y))))
    cx, cy = int(round(x[i])), int(round(y[i]))
    half = size // 2
    rgb = as_rgb_uint8(sec.slide.read_region(cx - half, cy - half, cx - half + size, cy - half + size))
    return (
        rgb,
        float(sec.slide.mpp),
        {"section": section, "spot": str(sec.spots.barcode[i]), "x": cx, "y": cy},
    )


def outline(rgb: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """The RGB image with the inner boundary pixels of every label painted ``colour``."""
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


def write_overlay(path: Path, panels: list[tuple[np.ndarray, str]]) -> int:
    """Panels side by side (6 px white gap), each captioned; saved as an adaptive-palette PNG. Bytes."""
    from PIL import Image, ImageDraw

    h = panels[0][0].shape[0]
    gap = np.full((h, 6, 3), 255, np.uint8)
    row = []
    for i, (img, _) in enumerate(panels):
        row += [img] if i == 0 else [gap, img]
    canvas = Image.fromarray(np.concatenate(row, axis=1))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for img, caption in panels:
        draw.rectangle([x, 0, x + 7 * len(caption) + 8, 16], fill=(255, 255, 255))
        draw.text((x + 4, 3), caption, fill=(0, 0, 0))
        x += img.shape[1] + gap.shape[1]
    canvas.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True
    )
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--reference-rev", default=REFERENCE_REV)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per tile after the scored one (0: time that one)"
    )
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--overlays", default="benchmarks/results")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--cellpose-model",
        default=None,
        help="cellpose model name or file (default: cellpose's default, rapacl_nuclei_tnbc when built)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of classical-v1,classical-v2,classical,cellpose (default: all)",
    )
    parser.add_argument("--groups", default="dev,held-out", help="dev, held-out or both (default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = data_root(args.data_dir)
    os.environ.setdefault("NAPARI_RAPACL_DATA_DIR", str(root))

    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "load_average_start": list(os.getloadavg()),
        "command": "python benchmarks/bench_tnbc.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
            for k, v in vars(args).items()
            if v not in (None, False) and k != "data_dir"
        ),
        "segmentation_version": seg.SEGMENTATION_VERSION,
        "tnbc_mpp": TNBC_MPP,
    }
    print(results["machine"], "load average", results["load_average_start"], flush=True)
    wanted = (
        set(args.methods.split(","))
        if args.methods
        else {"classical-v1", "classical-v2", "classical", "cellpose"}
    )
    v1_name = f"classical-v1 ({args.reference_rev})"
    v1 = reference_segmenter(args.reference_rev)
    methods: dict[str, Segmenter] = {}
    if "classical-v1" in wanted:
        methods[v1_name] = v1
    if "classical-v2" in wanted and seg.SEGMENTATION_VERSION != "2":
        methods["classical (v2)"] = lambda rgb, mpp: seg.segment_nuclei(rgb, mpp, version="2")
    if "classical" in wanted:
        methods[f"classical (v{seg.SEGMENTATION_VERSION})"] = lambda rgb, mpp: seg.segment_nuclei(rgb, mpp)
    cellpose, note = cellpose_segmenter(args.cellpose_model)
    results["cellpose"] = note
    print(f"cellpose: {note}", flush=True)
    cellpose_name = "cellpose"
    if cellpose is not None:
        cellpose_name = f"cellpose ({Path(seg.resolve_cellpose_model(args.cellpose_model)).name})"
        if "cellpose" in wanted:
            methods[cellpose_name] = cellpose

    tnbc = root / "tnbc_nuclei"
    groups = {"dev (patients 01-08)": DEV_PATIENTS, "held-out (patients 09-11)": HELD_OUT_PATIENTS}
    chosen = args.groups.split(",")
    groups = {k: v for k, v in groups.items() if k.split(" ")[0] in chosen}
    results["tnbc"] = {}
    print(
        "| method | patients | nuclei (true) | found | F1@0.5 | precision | recall | mean IoU | AJI | "
        "Mpx/s | nuclei/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    for group, patients in groups.items():
        tiles = tnbc_tiles(tnbc, patients)
        for method, fn in methods.items():
            r = score(fn, tiles, args.repeats)
            results["tnbc"].setdefault(method, {})[group] = r
            precision = f"{r['precision']:.3f}" if r["n_pred"] else "-"
            print(
                f"| {method} | {group} | {r['n_true']} | {r['n_pred']} | {r['f1']:.3f} | {precision} | "
                f"{r['recall']:.3f} | {r['mean_matched_iou']:.3f} | {r['aji']:.3f} | {r['mpx_per_s']:.2f} | "
                f"{r['nuclei_per_s']:.0f} |",
                flush=True,
            )

    if not args.no_overlays:
        out_dir = Path(args.overlays)
        out_dir.mkdir(parents=True, exist_ok=True)
        results["her2st_overlays"] = []
        for section in ("C2", "C4", "C6"):
            rgb, mpp, where = her2st_crop(section)
            v1_labels = v1(rgb, mpp)
            old, new = seg.segment_nuclei(rgb, mpp, version="2"), seg.segment_nuclei(rgb, mpp)
            path = out_dir / f"segmentation_her2st_{section}.png"
            panels = [
                (outline(rgb, old, (255, 255, 0)), f"{section} v2: {int(old.max())} nuclei"),
                (
                    outline(rgb, new, (255, 0, 255)),
                    f"{section} v{seg.SEGMENTATION_VERSION}: {int(new.max())} nuclei",
                ),
            ]
            if cellpose is not None:
                cp = cellpose(rgb, mpp)
                where["cellpose_nuclei"] = int(cp.max())
                panels.append((outline(rgb, cp, (0, 255, 0)), f"{section} {cellpose_name}: {int(cp.max())}"))
            size = write_overlay(path, panels)
            results["her2st_overlays"].append(
                {
                    **where,
                    "mpp": mpp,
                    "file": str(path),
                    "bytes": size,
                    "v1_nuclei": int(v1_labels.max()),
                    "v2_nuclei": int(old.max()),
                    f"v{seg.SEGMENTATION_VERSION}_nuclei": int(new.max()),
                }
            )
            print(
                f"{path}: {section} spot {where['spot']}: v1 {int(v1_labels.max())} / v2 {int(old.max())} / "
                f"v{seg.SEGMENTATION_VERSION} {int(new.max())} nuclei, {size / 1e3:.0f} kB",
                flush=True,
            )
    results["load_average_end"] = list(os.getloadavg())
    print("load average", results["load_average_end"], flush=True)
    if args.json:
        from napari_rapacl._atomic import write_text_atomic

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_text_atomic(path, json.dumps(results, indent=2) + chr(10))}")


if __name__ == "__main__":
    main()
