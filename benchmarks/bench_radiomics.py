"""Radiomics speed on real her2st patches, against plain pyradiomics loops run in the same process.

    NAPARI_RAPACL_DATA_DIR=../shared/data python benchmarks/bench_radiomics.py

Measures (patches: 224 px at 0.5 um/px around her2st spots, nuclei from the classical segmenter):

1. per-cell shape2D + first order: nuclei/s of the plain loop (one
   ``RadiomicsFeatureExtractor.execute(image, mask, label=i)`` per nucleus on the whole patch) and of
   :func:`napari_rapacl.radiomics.cell_features` (serial), their ratio, and the largest relative
   difference of the values; then a large region (about 1.1 x 1.1 mm) with 1 and 2 processes;
2. the RaPaCL-ST 72-feature set: patches/s of a plain loop (one extractor call per nucleus for the
   shape features behind ``morph_*``, one on the union of nuclei, pyradiomics' classes on the
   whole patch), of the previous implementation of :func:`spot_features` (``--previous``, a git
   revision: its ``radiomics/_core.py`` is loaded from git and run in this process), of
   :func:`spot_features`, and end to end (read + segment + features) with
   :func:`iter_spot_features` on 1 and 2 processes, and from its cache.

Ratios are the point (the machine is shared, absolute numbers move with its load): each reference
runs in the same process, interleaved with the code it is compared with, best of several runs.
Writes ``benchmarks/results/radiomics.json``. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _proc_cpu(pids: list[int]) -> list[float]:
    """CPU seconds (user + system) used so far by each process (Linux /proc; NaN elsewhere)."""
    out = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError, IndexError):
            out.append(float("nan"))
    return out


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _interleaved_best(fns: dict, repeat: int) -> dict[str, float]:
    """Best time of each function over ``repeat`` rounds, the functions taking turns in each round
    (so a change in the machine's load hits them alike)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def _previous_core(rev: str):
    """``napari_rapacl/radiomics/_core.py`` of git revision ``rev`` as a module (None if git or the
    revision is not there). Its relative imports resolve in today's package (``_config`` etc.)."""
    path = "src/napari_rapacl/radiomics/_core.py"
    try:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  (previous implementation {rev} not available: {exc})")
        return None
    tmp = Path(tempfile.mkdtemp()) / "_core_previous.py"
    tmp.write_text(text)
    spec = importlib.util.spec_from_file_location("napari_rapacl.radiomics._core_previous", tmp)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # it may no longer match today's package
        print(f"  (previous implementation {rev} does not load: {exc!r})")
        return None
    return module


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["C2", "C5"])
    ap.add_argument("--patches", type=int, default=12, help="patches per section")
    ap.add_argument(
        "--plain-nuclei", type=int, default=200, help="nuclei timed in the plain per-nucleus loop"
    )
    ap.add_argument("--e2e-spots", type=int, default=36, help="spots of the end-to-end runs")
    ap.add_argument("--region-px", type=int, default=2240, help="side of the large region (px at 0.5 um/px)")
    ap.add_argument(
        "--previous",
        default="2a7ee66",
        help="git revision whose spot_features is the reference (the implementation before the "
        "speed-up of the 72-feature set); '' to skip",
    )
    ap.add_argument("--repeat", type=int, default=5, help="rounds of the interleaved 72-feature timing")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "radiomics.json")
    args = ap.parse_args()

    import SimpleITK as sitk

    from napari_rapacl import radiomics as rad
    from napari_rapacl.datasets import her2st
    from napari_rapacl.preprocess import extract_patches
    from napari_rapacl.radiomics._core import _parse_names
    from napari_rapacl.segmentation import segment_nuclei

    rad.require_radiomics()
    import radiomics
    from radiomics import featureextractor

    mpp = 0.5
    cfg = rad.RadiomicsConfig()
    settings = cfg.pyradiomics_settings()
    sections = [her2st(s) for s in args.sections]
    patches = []
    for sec in sections:
        idx = np.linspace(0, len(sec.spots) - 1, args.patches).round().astype(int)
        patches.append(extract_patches(sec.slide, sec.spots.x[idx], sec.spots.y[idx], size=224, mpp=mpp))
    patches = np.concatenate(patches)
    labels = [segment_nuclei(p, mpp) for p in patches]
    n_nuclei = [len(rad.find_nuclei(lab, cfg.min_nucleus_area_px)[0]) for lab in labels]
    print(
        f"{len(patches)} patches (224 px at {mpp} um/px) from her2st {' '.join(args.sections)}, "
        f"{sum(n_nuclei)} usable nuclei (mean {np.mean(n_nuclei):.1f}/patch)"
    )

    # ---- 1. per-cell shape2D + first order ---------------------------------------------------
    ext = featureextractor.RadiomicsFeatureExtractor(**settings)
    ext.disableAllFeatures()
    ext.enableFeatureClassByName("shape2D")
    ext.enableFeatureClassByName("firstorder")
    rad.cell_features(patches[0], labels[0], cfg)  # warm-up (imports, caches)
    plain_values: dict[tuple[int, int], dict[str, float]] = {}

    def run_plain() -> None:
        plain_values.clear()
        for k, (patch, lab) in enumerate(zip(patches, labels, strict=True)):
            image = sitk.GetImageFromArray(rad.to_grey(patch))
            mask = sitk.GetImageFromArray(lab.astype(np.uint32))
            for label_id in rad.find_nuclei(lab, cfg.min_nucleus_area_px)[0]:
                out = ext.execute(image, mask, label=int(label_id))
                plain_values[(k, int(label_id))] = {key: float(v) for key, v in out.items()}
                if len(plain_values) >= args.plain_nuclei:
                    return

    t_plain = _best(run_plain)  # best of 3, like the fast path: the machine is shared
    plain_rate = len(plain_values) / t_plain

    tables = []

    def run_fast() -> None:
        tables.clear()
        tables.extend(rad.cell_features(p, lab, cfg) for p, lab in zip(patches, labels, strict=True))

    t_fast = _best(run_fast)
    fast_rate = sum(len(t) for t in tables) / t_fast
    worst = 0.0
    for (k, label_id), ref in plain_values.items():
        row = tables[k].loc[label_id]
        for key, v in ref.items():
            worst = max(worst, abs(row[key] - v) / max(abs(v), 1e-12))
    print("\nper-cell shape2D + first order (18 + 9 features)")
    print(f"  plain extractor loop : {plain_rate:8.1f} nuclei/s ({len(plain_values)} nuclei)")
    print(f"  cell_features serial : {fast_rate:8.1f} nuclei/s  -> {fast_rate / plain_rate:.1f}x the loop")
    print(f"  max relative difference to the loop: {worst:.2e}")

    # a large region, serial and 2 processes
    sec = sections[0]
    cx, cy = float(np.median(sec.spots.x)), float(np.median(sec.spots.y))
    region = extract_patches(sec.slide, [cx], [cy], size=args.region_px, mpp=mpp)[0]
    region_labels = segment_nuclei(region, mpp)
    rad.cell_features(region[:300, :300], region_labels[:300, :300], cfg, n_jobs=2)  # warm the code
    big: list = []
    big1 = _best(lambda: big.append(rad.cell_features(region, region_labels, cfg, n_jobs=1)), repeat=2)
    n_big = len(big[-1])
    from napari_rapacl.radiomics._pool import get_pool

    pool = get_pool(2)
    list(pool.map(abs, range(4)))  # start the workers outside the timing
    pids = list(getattr(pool, "_processes", {}))
    big2 = _best(lambda: rad.cell_features(region, region_labels, cfg, n_jobs=2), repeat=2)
    # CPU accounting of one parallel run: shows the split even when other tenants take the cores
    w0, m0 = _proc_cpu(pids), _self_cpu()
    t0 = time.perf_counter()
    rad.cell_features(region, region_labels, cfg, n_jobs=2)
    wall2 = time.perf_counter() - t0
    workers_cpu = [b - a for a, b in zip(w0, _proc_cpu(pids), strict=True)]
    main_cpu = _self_cpu() - m0
    idle_estimate = max(workers_cpu, default=float("nan")) + main_cpu
    print(
        f"  large region {args.region_px}^2 px, {n_big} nuclei: {n_big / big1:8.1f} nuclei/s serial, "
        f"{n_big / big2:8.1f} nuclei/s on 2 processes ({big1 / big2:.2f}x)"
    )
    print(
        f"    one 2-process run: wall {wall2:.2f} s, CPU main {main_cpu:.2f} s + workers "
        f"{' + '.join(f'{c:.2f}' for c in workers_cpu)} s; on 2 idle cores about "
        f"{n_big / idle_estimate:.0f} nuclei/s ({big1 / idle_estimate:.2f}x serial)"
    )

    # ---- 2. the 72-feature set -----------------------------------------------------------------
    names = list(rad.rapacl72_names())
    union_req, patch_req, morph_req = _parse_names(names)
    ext_shape = featureextractor.RadiomicsFeatureExtractor(**settings)
    ext_shape.disableAllFeatures()
    ext_shape.enableFeatureClassByName("shape2D")
    ext_union = featureextractor.RadiomicsFeatureExtractor(**settings)
    ext_union.disableAllFeatures()
    ext_union.enableFeaturesByName(**union_req["original"])

    def plain72(patch: np.ndarray, lab: np.ndarray) -> dict[str, float]:
        """The 72 with plain pyradiomics calls: one extractor call per nucleus, one on the union."""
        ids = rad.find_nuclei(lab, cfg.min_nucleus_area_px)[0]
        grey = rad.to_grey(patch)
        image = sitk.GetImageFromArray(grey)
        mask = sitk.GetImageFromArray(lab.astype(np.uint32))
        shapes: dict[str, list[float]] = {}
        for label_id in ids:
            for key, v in ext_shape.execute(image, mask, label=int(label_id)).items():
                shapes.setdefault(key.split("_")[-1], []).append(float(v))
        union = sitk.GetImageFromArray(np.isin(lab, ids).astype(np.uint32))
        out = {f"cellseg_all_{k}": float(v) for k, v in ext_union.execute(image, union, label=1).items()}
        # the whole-patch mask cannot go through the extractor (an all-one mask "has no labels"):
        # pyradiomics' classes on it
        ones = sitk.GetImageFromArray(np.ones(lab.shape, np.uint32))
        for cls_name, feats in patch_req["original"].items():
            fc = radiomics.getFeatureClasses()[cls_name](image, ones, **settings)
            for f in feats:
                fc.enableFeatureByName(f)
            out.update({f"patch_original_{cls_name}_{k}": float(v) for k, v in fc.execute().items()})
        out.update(
            rad.morph_stats({k: np.array(v) for k, v in shapes.items()}, morph_req, cfg.morph_bin_count)
        )
        return out

    n72 = min(len(patches), 6)
    plain_rows: list = []

    def run_plain72() -> None:
        plain_rows.clear()
        plain_rows.extend(plain72(patches[k], labels[k]) for k in range(n72))

    t_plain72 = _best(run_plain72, 2)
    previous = _previous_core(args.previous) if args.previous else None
    impls = {"current": rad.spot_features}
    if previous is not None:
        impls["previous"] = previous.spot_features
    rows: dict[str, list] = {k: [] for k in impls}

    def runner(key: str):
        def run() -> None:
            rows[key] = [impls[key](p, lab, cfg, mpp=mpp) for p, lab in zip(patches, labels, strict=True)]

        return run

    for key in impls:  # warm-up
        impls[key](patches[0], labels[0], cfg, mpp=mpp)
    t72 = _interleaved_best({k: runner(k) for k in impls}, args.repeat)
    worst72 = max(
        abs(rows["current"][k][c] - plain_rows[k][c]) / max(abs(plain_rows[k][c]), 1e-12)
        for k in range(n72)
        for c in names
    )
    plain72_rate, fast72_rate = n72 / t_plain72, len(patches) / t72["current"]
    print("\nRaPaCL-ST 72-feature set (features only, nuclei given)")
    print(f"  plain pyradiomics loop : {plain72_rate:7.2f} patches/s ({n72} patches)")
    prev72_rate = worst_prev = None
    if previous is not None:
        prev72_rate = len(patches) / t72["previous"]
        worst_prev = max(
            float(np.max(np.abs(a.to_numpy() - b.to_numpy()) / np.maximum(np.abs(b.to_numpy()), 1e-12)))
            for a, b in zip(rows["current"], rows["previous"], strict=True)
        )
        print(
            f"  previous implementation: {prev72_rate:7.2f} patches/s "
            f"(spot_features of {args.previous}, same process, interleaved)"
        )
    vs_loop = f"{fast72_rate / plain72_rate:.1f}x the loop"
    vs_prev = f", {fast72_rate / prev72_rate:.2f}x the previous" if prev72_rate else ""
    print(f"  spot_features serial   : {fast72_rate:7.2f} patches/s  -> {vs_loop}{vs_prev}")
    if prev72_rate:
        print(f"  max relative difference to the previous implementation: {worst_prev:.2e}")
    print(f"  max relative difference to the plain loop: {worst72:.2e}")

    # end to end: read + segment + 72 features, serial / 2 processes / cached
    from napari_rapacl.radiomics import _pipeline

    memory = getattr(_pipeline, "MEMORY_CACHE", None)  # process-wide cache of spot vectors

    def fresh(fn):
        """``fn`` with the in-memory cache emptied first (else every run after the first is a hit)."""

        def run() -> None:
            if memory is not None:
                memory.clear()
            fn()

        return run

    sec0 = sections[0]
    spots = sec0.spots.subset(np.linspace(0, len(sec0.spots) - 1, args.e2e_spots).round().astype(int))
    slide = sections[0].slide
    e2e: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"size": 224, "mpp": mpp, "config": cfg, "segment": "classical"}
        fresh(lambda: rad.spot_feature_table(slide, spots.subset([0, 1]), n_jobs=1, **kw))()  # warm-up
        e2e["serial"] = len(spots) / _best(
            fresh(lambda: rad.spot_feature_table(slide, spots, n_jobs=1, **kw)), 3
        )
        e2e["2 processes"] = len(spots) / _best(
            fresh(lambda: rad.spot_feature_table(slide, spots, n_jobs=2, **kw)), 3
        )
        rad.spot_feature_table(slide, spots, n_jobs=1, cache_dir=tmp, **kw)
        e2e["cached (disk)"] = len(spots) / _best(
            fresh(lambda: rad.spot_feature_table(slide, spots, cache_dir=tmp, **kw)), 3
        )
        if memory is not None:
            e2e["cached (memory)"] = len(spots) / _best(
                lambda: rad.spot_feature_table(slide, spots, cache_dir=tmp, **kw), 3
            )
    what = "read + classical segmentation + 72 features"
    print(f"\nend to end, {len(spots)} spots of {sections[0].name} ({what})")
    for k, v in e2e.items():
        print(f"  {k:15s}: {v:8.2f} patches/s")

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in load)} (1, 5, 15 min)")
    result = {
        "command": "NAPARI_RAPACL_DATA_DIR=../shared/data python benchmarks/bench_radiomics.py "
        + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_name(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in load],
        },
        "data": {
            "sections": args.sections,
            "patches": len(patches),
            "patch": "224 px at 0.5 um/px",
            "segmentation": "classical",
            "usable_nuclei": int(sum(n_nuclei)),
        },
        "per_cell_shape_firstorder": {
            "plain_loop_nuclei_per_s": round(plain_rate, 1),
            "cell_features_serial_nuclei_per_s": round(fast_rate, 1),
            "ratio": round(fast_rate / plain_rate, 2),
            "max_rel_diff": worst,
            "large_region": {
                "two_process_run_cpu_s": {
                    "main": round(main_cpu, 2),
                    "workers": [round(c, 2) for c in workers_cpu],
                },
                "two_processes_idle_cores_estimate_nuclei_per_s": round(n_big / idle_estimate, 1),
                "side_px": args.region_px,
                "nuclei": n_big,
                "serial_nuclei_per_s": round(n_big / big1, 1),
                "two_processes_nuclei_per_s": round(n_big / big2, 1),
            },
        },
        "rapacl72": {
            "plain_loop_patches_per_s": round(plain72_rate, 2),
            "spot_features_serial_patches_per_s": round(fast72_rate, 2),
            "ratio": round(fast72_rate / plain72_rate, 2),
            "max_rel_diff": worst72,
            "previous_implementation": None
            if prev72_rate is None
            else {
                "revision": args.previous,
                "patches_per_s": round(prev72_rate, 2),
                "ratio": round(fast72_rate / prev72_rate, 2),
                "max_rel_diff": worst_prev,
            },
            "end_to_end_patches_per_s": {k: round(v, 2) for k, v in e2e.items()},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
