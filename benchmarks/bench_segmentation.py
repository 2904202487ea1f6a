"""Nucleus segmentation speed and nucleus statistics on real her2st crops.

Measured in one process, each against a reference run in the same process:

1. **Classical segmenter** (``segment_nuclei(method="classical")``) on level-0 crops around her2st spots
   (C2, C3 by default; the crops nearest the tissue centre): Mpx/s, best of ``--repeats`` runs. The
   references, timed on the same crops: the classical segmenter of git revision ``--reference-rev``
   (version 1, before issue #11; loaded from git by ``bench_tnbc.reference_segmenter``), version 2
   (``segment_nuclei(..., version="2")``, what RaPaCL-ST's session-5 tables were made with) and the
   textbook scikit-image pipeline (``rgb2hed`` -> Gaussian -> Otsu -> Euclidean distance transform ->
   ``peak_local_max(labels=...)`` -> ``watershed`` -> size filter with ``regionprops``). All three are
   also scored on synthetic H&E with known nuclei (object F1 at IoU 0.5). Accuracy on real annotations
   is ``bench_tnbc.py``'s.
2. **Tiled path** (``segment_region``, 1024 px tiles) on a larger C2 region, against one untiled
   ``segment_nuclei`` call on the same pixels.
3. **cellpose on the CPU** (the real ``CellposeModel.eval``) on a 512 x 512 crop, with a randomly
   initialised network built and saved by cellpose itself (no download; ``diam_mean=17`` like the
   built-in ``nuclei`` model, so the image is rescaled as it would be for that model), against the
   classical segmenter on the same crop.

The nucleus density (per mm^2 of tissue) and size distribution (median area, IQR) of every crop are
printed as well.

    python benchmarks/bench_segmentation.py [--sections C2 C3] [--crops 3] [--size 1024] [--repeats 3]
        [--reference-rev acde915] [--no-cellpose] [--json benchmarks/results/segmentation_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench_tnbc import REFERENCE_REV, reference_segmenter  # benchmarks/ is on sys.path (run as a script)
from napari_rapacl import segmentation as seg
from napari_rapacl.datasets import her2st
from napari_rapacl.metrics import match_labels, nucleus_statistics
from napari_rapacl.testing import synthetic_he_nuclei

DIAMETER_UM = seg.DEFAULT_DIAMETER_UM
MIN_AREA_UM2 = seg.DEFAULT_MIN_AREA_UM2
MAX_AREA_UM2 = seg.DEFAULT_MAX_AREA_UM2


def best_time(fn, repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def skimage_reference(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """The textbook scikit-image nucleus watershed (per-object loops in peak_local_max/regionprops)."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.segmentation import watershed

    h = gaussian(rgb2hed(rgb)[..., 0], sigma=0.7 / mpp)
    fg = h > threshold_otsu(h)
    dist = ndi.distance_transform_edt(fg)
    radius = 0.5 * DIAMETER_UM / mpp
    coords = peak_local_max(dist, min_distance=max(1, int(0.5 * radius)), labels=label(fg))
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    labels = watershed(-dist, markers, mask=fg)
    lo, hi = MIN_AREA_UM2 / mpp**2, MAX_AREA_UM2 / mpp**2
    for region in regionprops(labels):
        if not lo <= region.area <= hi:
            labels[labels == region.label] = 0
    return labels.astype(np.int32)


def crops(section: str, n: int, size: int) -> tuple[list[dict[str, Any]], Any]:
    """``n`` level-0 crops centred on spots near the tissue centre (every 10th spot by distance)."""
    sec = her2st(section)
    x, y = sec.spots.x, sec.spots.y
    order = np.argsort(np.hypot(x - np.median(x), y - np.median(y)))
    out = []
    for i in order[: 10 * n : 10]:
        cx, cy = int(round(x[i])), int(round(y[i]))
        half = size // 2
        region = sec.slide.read_region(cx - half, cy - half, cx - half + size, cy - half + size)
        out.append({"section": section, "spot": str(sec.spots.barcode[i]), "x": cx, "y": cy, "rgb": region})
    return out, sec.slide


def bench_classical(items: list[dict], mpp: float, repeats: int, v1: Any) -> list[dict]:
    rows = []
    for it in items:
        rgb = it["rgb"]
        mpx = rgb.shape[0] * rgb.shape[1] / 1e6
        t_ours, labels = best_time(lambda rgb=rgb: seg.segment_nuclei(rgb, mpp), repeats)
        t_v1, labels_v1 = best_time(lambda rgb=rgb: v1(rgb, mpp), repeats)
        t_v2, labels_v2 = best_time(lambda rgb=rgb: seg.segment_nuclei(rgb, mpp, version="2"), repeats)
        stats_v2 = nucleus_statistics(labels_v2, mpp, rgb)
        t_ref, _ = best_time(lambda rgb=rgb: skimage_reference(rgb, mpp), max(1, repeats // 2))
        stats = nucleus_statistics(labels, mpp, rgb)
        rows.append(
            {
                "section": it["section"],
                "spot": it["spot"],
                "x": it["x"],
                "y": it["y"],
                "mpx": mpx,
                "classical_mpx_per_s": mpx / t_ours,
                "v1_mpx_per_s": mpx / t_v1,
                "v1_n": int(labels_v1.max()),
                "v2_mpx_per_s": mpx / t_v2,
                "v2_n": int(labels_v2.max()),
                "v2_median_area_um2": stats_v2["median_area_um2"],
                "reference_mpx_per_s": mpx / t_ref,
                "speedup": t_ref / t_ours,
                **{
                    k: stats[k]
                    for k in (
                        "n",
                        "tissue_mm2",
                        "density_per_tissue_mm2",
                        "median_area_um2",
                        "q25_area_um2",
                        "q75_area_um2",
                        "iqr_area_um2",
                    )
                },
            }
        )
        r = rows[-1]
        print(
            f"{r['section']} spot {r['spot']:>6} ({r['x']}, {r['y']}): "
            f"classical {r['classical_mpx_per_s']:5.2f} Mpx/s (v1 {r['v1_mpx_per_s']:5.2f}, "
            f"{r['v1_n']} nuclei; v2 {r['v2_mpx_per_s']:5.2f}, {r['v2_n']} nuclei, median "
            f"{r['v2_median_area_um2']:.1f} um^2), skimage reference {r['reference_mpx_per_s']:5.2f} Mpx/s "
            f"(x{r['speedup']:.1f}); "
            f"{int(r['n'])} nuclei, {r['density_per_tissue_mm2']:.0f}/mm^2 tissue, median area "
            f"{r['median_area_um2']:.1f} um^2 (IQR {r['q25_area_um2']:.1f}-{r['q75_area_um2']:.1f})",
            flush=True,
        )
    return rows


def bench_synthetic_quality(v1: Any) -> dict[str, float]:
    f1_ours, f1_v1, f1_v2, f1_ref = [], [], [], []
    for mpp, s in ((0.5, 1), (0.5, 2), (0.69, 3), (0.69, 4)):
        rgb, truth = synthetic_he_nuclei((768, 768), mpp=mpp, n_nuclei=80, n_touching_pairs=15, seed=s)
        f1_ours.append(match_labels(truth, seg.segment_nuclei(rgb, mpp)).f1)
        f1_v1.append(match_labels(truth, v1(rgb, mpp)).f1)
        f1_v2.append(match_labels(truth, seg.segment_nuclei(rgb, mpp, version="2")).f1)
        f1_ref.append(match_labels(truth, skimage_reference(rgb, mpp)).f1)
    out = {
        "classical_f1": float(np.mean(f1_ours)),
        "v1_f1": float(np.mean(f1_v1)),
        "v2_f1": float(np.mean(f1_v2)),
        "reference_f1": float(np.mean(f1_ref)),
    }
    print(
        f"synthetic H&E (4 images, 110 nuclei each incl. 15 touching pairs), object F1 @ IoU 0.5: "
        f"classical {out['classical_f1']:.3f}, v1 {out['v1_f1']:.3f}, v2 {out['v2_f1']:.3f}, "
        f"skimage reference {out['reference_f1']:.3f}",
        flush=True,
    )
    return out


def bench_tiled(slide, cx: int, cy: int, size: int, mpp: float) -> dict[str, float]:
    x0, y0 = cx - size // 2, cy - size // 2
    mpx = size * size / 1e6
    t = time.perf_counter()
    tiled = seg.segment_region(slide, x0, y0, x0 + size, y0 + size, tile=1024)
    tiled_n = int(tiled.max().compute())
    t_tiled = time.perf_counter() - t
    rgb = slide.read_region(x0, y0, x0 + size, y0 + size)  # the untiled call gets its pixels for free
    t = time.perf_counter()
    whole = seg.segment_nuclei(rgb, mpp)
    t_whole = time.perf_counter() - t
    agree = match_labels(whole, np.asarray(tiled))
    out = {
        "size": size,
        "tiled_mpx_per_s": mpx / t_tiled,
        "untiled_mpx_per_s": mpx / t_whole,
        "ratio": t_whole / t_tiled,
        "nuclei_tiled": tiled_n,
        "nuclei_untiled": int(whole.max()),
        "f1_tiled_vs_untiled": agree.f1,
    }
    print(
        f"tiled {size}x{size} (1024 px tiles, read + threshold pass + segment + zarr write): "
        f"{out['tiled_mpx_per_s']:.2f} Mpx/s vs untiled single call {out['untiled_mpx_per_s']:.2f} Mpx/s "
        f"(ratio {out['ratio']:.2f}); {tiled_n} vs {int(whole.max())} nuclei, F1 {agree.f1:.3f}",
        flush=True,
    )
    return out


def bench_cellpose(rgb: np.ndarray, mpp: float, repeats: int) -> dict[str, Any]:
    from importlib.metadata import version

    import torch
    from cellpose import models

    if seg.cellpose_major_version() != 3:
        print("cellpose 4.x cannot build a random network offline (cpsam only): cellpose skipped", flush=True)
        return {"skipped": f"cellpose {version('cellpose')}"}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CELLPOSE_LOCAL_MODELS_PATH"] = tmp  # nothing can be downloaded into the user's folder
        torch.manual_seed(0)
        net = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=17.0)
        path = Path(tmp) / "random_cp"
        net.net.save_model(str(path))
        tile = rgb[:512, :512]
        mpx = tile.shape[0] * tile.shape[1] / 1e6
        t_cp, labels = best_time(
            lambda: seg.segment_nuclei(tile, mpp, "cellpose", model=path, diameter_um=DIAMETER_UM), repeats
        )
        t_cl, _ = best_time(lambda: seg.segment_nuclei(tile, mpp), max(3, repeats))
    out = {
        "cellpose_version": version("cellpose"),
        "tile": list(tile.shape[:2]),
        "diameter_px": DIAMETER_UM / mpp,
        "rescale": 17.0 / (DIAMETER_UM / mpp),
        "torch_threads": torch.get_num_threads(),
        "cellpose_mpx_per_s": mpx / t_cp,
        "classical_mpx_per_s": mpx / t_cl,
        "classical_over_cellpose": t_cp / t_cl,
        "cellpose_nuclei_random_net": int(labels.max()),
    }
    print(
        f"cellpose CPU (random-init net, diam_mean 17, {tile.shape[0]}x{tile.shape[1]} her2st crop, "
        f"diameter {out['diameter_px']:.1f} px -> rescale {out['rescale']:.2f}, {out['torch_threads']} torch "
        f"threads): {out['cellpose_mpx_per_s']:.3f} Mpx/s; classical on the same crop "
        f"{out['classical_mpx_per_s']:.2f} Mpx/s (x{out['classical_over_cellpose']:.0f})",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=["C2", "C3"])
    parser.add_argument("--crops", type=int, default=3, help="crops per section")
    parser.add_argument("--size", type=int, default=1024, help="crop side (level-0 px)")
    parser.add_argument("--tiled-size", type=int, default=3072, help="side of the tiled region (level-0 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-rev", default=REFERENCE_REV, help="git revision of classical v1")
    parser.add_argument("--no-cellpose", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "load_average_start": list(os.getloadavg()),
        "segmentation_version": seg.SEGMENTATION_VERSION,
        "command": "python benchmarks/bench_segmentation.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v not in (None, False)
        ),
    }
    print(results["machine"], flush=True)
    items, slides = [], {}
    for section in args.sections:
        got, slide = crops(section, args.crops, args.size)
        items += got
        slides[section] = slide
    mpp = float(slides[args.sections[0]].mpp)
    print(f"her2st level 0: {mpp:.4f} um/px (from the spot grid); crops {args.size}x{args.size}", flush=True)
    v1 = reference_segmenter(args.reference_rev)
    rows = bench_classical(items, mpp, args.repeats, v1)
    results["classical"] = rows
    results["classical_summary"] = {
        "median_mpx_per_s": float(np.median([r["classical_mpx_per_s"] for r in rows])),
        "min_mpx_per_s": float(np.min([r["classical_mpx_per_s"] for r in rows])),
        "median_v1_mpx_per_s": float(np.median([r["v1_mpx_per_s"] for r in rows])),
        "median_v2_mpx_per_s": float(np.median([r["v2_mpx_per_s"] for r in rows])),
        "median_reference_mpx_per_s": float(np.median([r["reference_mpx_per_s"] for r in rows])),
        "median_speedup": float(np.median([r["speedup"] for r in rows])),
        "median_density_per_tissue_mm2": float(np.median([r["density_per_tissue_mm2"] for r in rows])),
        "median_area_um2": float(np.median([r["median_area_um2"] for r in rows])),
    }
    s = results["classical_summary"]
    print(
        f"classical: median {s['median_mpx_per_s']:.2f} Mpx/s (min {s['min_mpx_per_s']:.2f}), "
        f"v1 {s['median_v1_mpx_per_s']:.2f} Mpx/s, v2 {s['median_v2_mpx_per_s']:.2f} Mpx/s, "
        f"skimage reference {s['median_reference_mpx_per_s']:.2f} Mpx/s, speed-up x{s['median_speedup']:.1f}",
        flush=True,
    )
    results["synthetic_quality"] = bench_synthetic_quality(v1)
    first = items[0]
    results["tiled"] = bench_tiled(slides[first["section"]], first["x"], first["y"], args.tiled_size, mpp)
    if not args.no_cellpose:
        results["cellpose"] = bench_cellpose(first["rgb"], mpp, max(1, args.repeats // 2))
    results["load_average_end"] = list(os.getloadavg())
    print(f"load average {results['load_average_start']} -> {results['load_average_end']}", flush=True)
    if args.json:
        from napari_rapacl._atomic import write_text_atomic

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_text_atomic(path, json.dumps(results, indent=2) + chr(10))}")


if __name__ == "__main__":
    main()
