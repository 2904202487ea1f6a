"""Scale (#14 item 10): a Visium HD-like section of a million 8 um bins.

Three measurements, each in a fresh child process so that its peak RSS (``ru_maxrss``) is its own:

* ``export``: 1M spots x 785 genes written as ``.h5ad`` by ``export.to_anndata`` + ``write_h5ad`` from
  predictions held out of core (an HDF5 file, as a long prediction would spill them), time and peak RSS;
* ``export-reference``: the same AnnData written the way the export did before (dense float32 ``X`` in
  memory, a NaN mask of its size, anndata's own writer), the reference of the ratio, beside the new export
  at ``--ref-spots`` (200k: the old way needs about twice X, which a shared machine cannot spare at 1M);
* ``predict`` at two sizes (a square box of the 1M-spot layout holding N spots, the full 1M ``Spots`` in
  memory, ``jobs.iter_predict`` with ``cache=False`` as the CLI runs it, model ``stnet`` with random weights):
  time and peak RSS, per 100k spots from the difference of the two sizes, the longest gap between two
  progress reports, and the model's own forward rate on random batches in the same process (the
  reference: pipeline time / forward time); the million-spot predict with ``stnet`` is projected from it;
* ``cli`` (``--cli-spots N``, default the full ``--spots``): the whole ``napari-rapacl predict`` measured end
  to end in a fresh process (``cli.main``: read the slide, a pyramidal zlib OME-TIFF of the section written
  beforehand by another process, and a CSV of the N spots; predict every spot; write the ``.h5ad``) with
  ``--cli-model`` (default ``stnet_tiny`` at 0.5 um/px: the registry's smallest image model, whose 32 px
  patch is then 16 um, the 8 um bin and half a bin around it; ``stnet``'s ResNet-18 at 224 px would take
  ~35 h on one CPU thread). Wall time, peak RSS (the values go to a temporary HDF5 file, never all in
  memory), the number of progress reports of the predict stage and the longest gap between two reports
  (the CLI prints at most every 5 s; the job reports per batch), and the reference in the same process:
  the same predictor (frozen TorchScript) on as many random batches as the predict ran (pipeline time /
  forward time).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--spots 1000000] [--genes 785]
        [--ref-spots 200000] [--predict 256 2048] [--cli-spots N] [--threads 1]
        [--json benchmarks/results/bench_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN_UM, MPP = 8.0, 0.5  # Visium HD 8 um bins on a 0.5 um/px scan


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    """This process's resident memory now (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def hd_spots(n: int):
    """``n`` 8 um bins on a square grid (row-major), 4 um radius, at 0.5 um/px."""
    from napari_rapacl.io.spots import Spots

    side = int(np.ceil(np.sqrt(n)))
    step = BIN_UM / MPP
    idx = np.arange(n)
    row, col = idx // side, idx % side
    barcode = np.char.add(
        np.char.add("s_", np.char.zfill(row.astype(str), 5)),
        np.char.add("_", np.char.zfill(col.astype(str), 5)),
    )
    return (
        Spots(
            barcode=barcode,
            x=(col + 0.5) * step + 64,
            y=(row + 0.5) * step + 64,
            radius=np.full(n, BIN_UM / 2 / MPP),
            mpp=MPP,
        ),
        side,
        step,
    )


def hd_slide(side_px: int):
    """A lazy synthetic H&E-like slide of ``side_px``^2 at 0.5 um/px (generated per chunk, never stored)."""
    import dask.array as da

    from napari_rapacl.io.slide import Slide

    chunk = 1024
    n = -(-side_px // chunk)

    def block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        rng = np.random.default_rng(y0 * 7919 + x0)
        base = np.array([200, 150, 190], np.uint8)
        out = np.broadcast_to(base, (y1 - y0, x1 - x0, 3)).copy()
        out[rng.random((y1 - y0, x1 - x0)) < 0.1] = (90, 40, 120)  # sparse "nuclei"
        return out

    level0 = da.map_blocks(block, dtype=np.uint8, chunks=((chunk,) * n, (chunk,) * n, (3,)))
    return Slide((level0,), (1.0,), mpp=MPP, mpp_source="caller")


# ---- children -----------------------------------------------------------------------------------------


def child_export(n: int, genes: int, tmp: Path, reference: bool) -> dict:
    import h5py

    from napari_rapacl import export

    names = [f"GENE{i:04d}" for i in range(genes)]
    spots, _, _ = hd_spots(n)
    src = tmp / "pred.h5"
    if not src.exists():  # predictions spilled to disk, written a block at a time
        rng = np.random.default_rng(0)
        with h5py.File(src, "w") as f:
            d = f.create_dataset("pred", shape=(n, genes), dtype=np.float32, chunks=(4096, genes))
            for a in range(0, n, 65536):
                d[a : a + 65536] = rng.random((min(n, a + 65536) - a, genes), dtype=np.float32)
    base = _peak_rss_mb()
    t = time.perf_counter()
    out = tmp / ("ref.h5ad" if reference else "new.h5ad")
    with h5py.File(src, "r") as f:
        if reference:  # the export before #14 item 10: X in memory, a mask of its size, anndata's writer
            import anndata as ad

            values = f["pred"][()]
            assert np.all(np.isfinite(values))
            adata = export.to_anndata(values[:1], names, spots.subset(np.arange(1)), library_id="hd")
            full = ad.AnnData(X=np.ascontiguousarray(values, dtype=np.float32), obs=None)
            full.obs_names = spots.barcode
            full.var_names = names
            full.obsm["spatial"] = np.column_stack([spots.x, spots.y])
            full.obs["radius"] = spots.radius
            full.uns["spatial"] = adata.uns["spatial"]
            full.write_h5ad(out)
        else:
            adata = export.to_anndata(f["pred"], names, spots, library_id="hd")
            export.write_h5ad(adata, out)
    seconds = time.perf_counter() - t
    size = out.stat().st_size
    out.unlink()
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": base, "file_mb": size / 2**20}


def child_predict(n_total: int, n_predict: int, model: str, threads: int) -> dict:
    import torch

    from napari_rapacl.jobs import iter_predict, load_model_choice

    torch.set_num_threads(threads)
    spots, side, step = hd_spots(n_total)
    slide = hd_slide(int(side * step + 128))
    loaded = load_model_choice(model, None)
    k = max(1, int(round(np.sqrt(n_predict))))  # a k x k block of bins in the corner, one whole tile
    side_px = 64 + k * step  # (the tiled job predicts whole tiles: the tile is the box)
    box = (0.0, 0.0, side_px, side_px)
    inside = int(((spots.x >= box[0]) & (spots.x < box[2]) & (spots.y >= box[1]) & (spots.y < box[3])).sum())
    base = _peak_rss_mb()
    gaps, last = [], time.perf_counter()
    t0 = last
    gen = iter_predict(
        loaded, slide, spots, box, cache=False, device="cpu", batch_size=64, tile_px=int(side_px)
    )
    try:
        while True:
            next(gen)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    except StopIteration as stop:
        result = stop.value
    seconds = time.perf_counter() - t0
    assert len(result.index) == inside, (len(result.index), inside)
    # reference: the predictor the pipeline runs (the frozen TorchScript one on a CPU, else the eager
    # forward) on random batches of the same patch size, same process
    from napari_rapacl.inference import frozen_image_predictor

    net = loaded.model.eval()
    fast = frozen_image_predictor(net, "cpu")
    forward_fn = fast if fast is not None else (lambda x: net.predict({"image": x}))
    size = int(net.config.patch_size)
    batch = torch.rand(64, 3, size, size)
    with torch.inference_mode():
        forward_fn(batch)
        t = time.perf_counter()
        reps = 3
        for _ in range(reps):
            forward_fn(batch)
        forward = (time.perf_counter() - t) / (reps * 64)
    return {
        "spots": inside,
        "genes": len(loaded.genes),
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": base,
        "max_progress_gap_s": max(gaps) if gaps else None,
        "progress_reports": len(gaps),
        "forward_s_per_spot": forward,
    }


def child_prepare(n: int, genes: int, tmp: Path, model: str) -> dict:
    """The CLI run's inputs: the section as a pyramidal zlib OME-TIFF, its spots as CSV, a checkpoint of
    ``model`` with random weights and ``genes`` outputs (stnet_tiny at the slide's 0.5 um/px)."""
    import pandas as pd
    import torch

    from napari_rapacl.io.slide import write_ome_tiff
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    t = time.perf_counter()
    spots, side, step = hd_spots(n)
    slide = hd_slide(int(side * step + 128))
    write_ome_tiff(tmp / "section.ome.tif", slide.levels[0], mpp=MPP, tile=512, compression="zlib")
    pd.DataFrame({"barcode": spots.barcode, "x": spots.x, "y": spots.y, "radius": spots.radius}).to_csv(
        tmp / "spots.csv", index=False
    )
    torch.manual_seed(0)
    overrides = {"mpp": MPP} if model == "stnet_tiny" else {}
    net = create_model(model, n_genes=genes, **overrides)
    save_checkpoint(tmp / "model.pt", net, genes=[f"GENE{i:04d}" for i in range(genes)])
    return {
        "seconds": time.perf_counter() - t,
        "slide_mb": (tmp / "section.ome.tif").stat().st_size / 2**20,
        "slide_px": int(side * step + 128),
        "spots_csv_mb": (tmp / "spots.csv").stat().st_size / 2**20,
    }


def child_cli(tmp: Path, threads: int, batch_size: int, suffix: str = ".h5ad") -> dict:
    """``napari-rapacl predict`` of every spot to an ``.h5ad``, in this fresh process (``cli.main``), with
    every progress report of its jobs timed; then the reference: the predictor alone on as many random
    batches."""
    import torch

    from napari_rapacl import cli

    torch.set_num_threads(threads)
    reports: list[tuple[float, str, str, int, int]] = []
    marks: dict[str, float] = {}
    real_logger = cli._progress_logger

    def timed_logger(what: str):
        log = real_logger(what)

        def report(p) -> None:
            reports.append((time.perf_counter(), what, p.stage, int(p.done), int(p.total)))
            if what == "predict" and p.stage == "predict" and p.done == p.total:
                marks["peak_rss_predict_mb"] = _peak_rss_mb()  # the peak up to the end of the predict
                marks["rss_end_of_predict_mb"] = _rss_mb()
            log(p)

        return report

    cli._progress_logger = timed_logger
    out = tmp / f"out{suffix}"
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    code = cli.main(
        ["predict", "--slide", str(tmp / "section.ome.tif"), "--spots", str(tmp / "spots.csv"),
         "--checkpoint", str(tmp / "model.pt"), "--out", str(out), "--device", "cpu",
         "--batch-size", str(batch_size), "--overwrite"]
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    assert code == 0
    if suffix == ".zarr":  # SpatialData: the table's X read back through zarr
        import shutil

        import zarr

        x = zarr.open_array(str(out / "tables" / "spots" / "X"), mode="r")
        n_obs, n_genes = x.shape
        sample = x[: min(n_obs, 1000)]
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shutil.rmtree(out)
    else:
        import h5py

        with h5py.File(out, "r") as f:
            n_obs, n_genes = f["X"].shape
            sample = f["X"][:: max(1, n_obs // 1000)]
        size = out.stat().st_size
        out.unlink()
    assert np.isfinite(sample).all() and float(sample.std()) > 0
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("."))
    pred = [r for r in reports if r[1] == "predict" and r[2] == "predict"]
    gaps = np.diff([r[0] for r in pred])  # between two reports of the predict stage (start-up apart)
    first_predict = pred[0][0] if pred else t0
    last_predict = pred[-1][0] if pred else t0
    export = [r for r in reports if r[1] in ("export", "SpatialData")]
    export_gaps = np.diff([last_predict] + [r[0] for r in export]) if export else np.zeros(0)
    # reference: the same frozen predictor on as many random batches as the predict ran
    from napari_rapacl.inference import frozen_image_predictor
    from napari_rapacl.models.checkpoint import load_model

    model, _ = load_model(tmp / "model.pt")
    model.eval()
    fast = frozen_image_predictor(model, "cpu")
    size_px = int(model.config.patch_size)
    n_batches = -(-n_obs // batch_size)
    batch = torch.rand(batch_size, 3, size_px, size_px)
    with torch.inference_mode():
        (fast or (lambda x: model.predict({"image": x})))(batch)
        t = time.perf_counter()
        for _ in range(n_batches):
            (fast or (lambda x: model.predict({"image": x})))(batch)
        forward = time.perf_counter() - t
    return {
        "spots": int(n_obs),
        "genes": int(n_genes),
        "seconds": seconds,
        "predict_seconds": last_predict - t0,
        "before_predict_seconds": first_predict - t0,
        "export_seconds": t0 + seconds - last_predict,
        "peak_rss_mb": peak,
        "rss_before_mb": base,
        **marks,
        "file_mb": size / 2**20,
        "predict_progress_reports": len(pred),
        "max_predict_progress_gap_s": float(gaps.max()) if len(gaps) else None,
        "export_progress_reports": len(export),
        "max_export_progress_gap_s": float(export_gaps.max()) if len(export_gaps) else None,
        "forward_seconds_same_batches": forward,
        "pipeline_over_forward": seconds / forward,
        "predict_over_forward": (last_predict - t0) / forward,
        "temporaries_left": left,
        "batch_size": batch_size,
        "patch_px": size_px,
        "patch_mpp": float(model.config.mpp),
    }


def run_child(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spots", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=785)
    p.add_argument("--predict", type=int, nargs=2, default=(256, 2048), help="two predict sizes (spots)")
    p.add_argument("--model", default="stnet")
    p.add_argument("--skip-predict", action="store_true", help="skip the two stnet predict sizes")
    p.add_argument("--cli-spots", type=int, default=None, help="spots of the end-to-end CLI run (0: skip)")
    p.add_argument("--cli-model", default="stnet_tiny")
    p.add_argument("--batch-size", type=int, default=256, help="--batch-size of the CLI run")
    p.add_argument("--cli-out", choices=(".h5ad", ".zarr"), default=".h5ad", help="the CLI run's output")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--ref-spots", type=int, default=200_000, help="size of the new-vs-old export comparison (0: skip)"
    )
    p.add_argument("--skip-export", action="store_true", help="only the predict measurements")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "export":
            out = child_export(int(rest[0]), int(rest[1]), Path(rest[2]), rest[3] == "ref")
        elif kind == "prepare":
            out = child_prepare(int(rest[0]), int(rest[1]), Path(rest[2]), rest[3])
        elif kind == "cli":
            out = child_cli(Path(rest[0]), int(rest[1]), int(rest[2]), rest[3] if len(rest) > 3 else ".h5ad")
        else:
            out = child_predict(int(rest[0]), int(rest[1]), rest[2], int(rest[3]))
        print(json.dumps(out))
        return

    print(f"load average before: {os.getloadavg()}")
    results: dict = {"spots": args.spots, "genes": args.genes, "load_before": os.getloadavg()}
    for n, key in ((args.spots, "export"), (args.ref_spots, "export_small")):
        if n <= 0 or args.skip_export:
            continue
        with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
            new = run_child(["export", str(n), str(args.genes), tmp, "new"], args.threads)
            results[key] = new
            print(
                f"export {n:,} x {args.genes}: {new['seconds']:.1f} s, peak RSS {new['peak_rss_mb']:.0f} MB"
            )
            if key == "export_small":  # the reference only where its dense X fits beside everyone else's
                ref = run_child(["export", str(n), str(args.genes), tmp, "ref"], args.threads)
                results["export_reference"] = ref
                print(
                    f"  reference (dense X, anndata writer): {ref['seconds']:.1f} s, peak RSS "
                    f"{ref['peak_rss_mb']:.0f} MB -> peak ratio new/ref "
                    f"{new['peak_rss_mb'] / ref['peak_rss_mb']:.2f}, "
                    f"time ratio {new['seconds'] / ref['seconds']:.2f}"
                )
    n_cli = args.spots if args.cli_spots is None else args.cli_spots
    if n_cli > 0:
        with tempfile.TemporaryDirectory(prefix="bench_scale_cli_", dir=os.environ.get("BENCH_TMP")) as tmp:
            prep = run_child(["prepare", str(n_cli), str(args.genes), tmp, args.cli_model], args.threads)
            print(
                f"inputs: {prep['slide_px']}^2 px OME-TIFF ({prep['slide_mb']:.0f} MB), spots CSV "
                f"({prep['spots_csv_mb']:.0f} MB), written in {prep['seconds']:.0f} s"
            )
            r = run_child(["cli", tmp, str(args.threads), str(args.batch_size), args.cli_out], args.threads)
        r["model"], r["prepare"], r["load_after"], r["out"] = (
            args.cli_model,
            prep,
            os.getloadavg(),
            args.cli_out,
        )
        results["cli"] = r
        predict_s = r["predict_seconds"] - r["before_predict_seconds"]
        n_batches = -(-r["spots"] // r["batch_size"])
        print(
            f"napari-rapacl predict --out {args.cli_out}, {r['spots']:,} spots x {r['genes']} genes "
            f"({args.cli_model}, "
            f"{r['patch_px']} px at {r['patch_mpp']} um/px, batch {r['batch_size']}, {args.threads} thread)"
        )
        print(
            f"  end to end {r['seconds']:.0f} s (before predicting {r['before_predict_seconds']:.1f} s, "
            f"predict {predict_s:.0f} s, export {r['export_seconds']:.0f} s), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (up to the end of the predict "
            f"{r.get('peak_rss_predict_mb', float('nan')):.0f} MB; "
            f"torch imported, before the command: {r['rss_before_mb']:.0f} MB)"
        )
        print(
            f"  progress: {r['predict_progress_reports']} predict reports, longest gap "
            f"{r['max_predict_progress_gap_s']:.2f} s; export {r['export_progress_reports']} reports, "
            f"longest gap {r['max_export_progress_gap_s'] or 0:.2f} s"
        )
        print(
            f"  reference, same process: the predictor on {n_batches} random batches "
            f"{r['forward_seconds_same_batches']:.0f} s -> end to end / forward "
            f"{r['pipeline_over_forward']:.2f}x; temporaries left: {r['temporaries_left']}"
        )
    if args.skip_predict:
        results["load_after"] = os.getloadavg()
        print(f"load average after: {os.getloadavg()}")
        if args.json:
            from napari_rapacl._atomic import write_text_atomic

            write_text_atomic(args.json, json.dumps(results, indent=2))
        return
    runs = [run_child(["predict", str(args.spots), str(n), args.model, str(args.threads)], args.threads)
            for n in args.predict]  # fmt: skip
    results["predict"] = runs
    (a, b) = runs
    d_spots = b["spots"] - a["spots"]
    s100k = (b["seconds"] - a["seconds"]) / d_spots * 1e5
    rss_diff = b["peak_rss_mb"] - a["peak_rss_mb"]  # small sizes: batches and the traced model dominate
    ratio = (b["seconds"] / b["spots"]) / b["forward_s_per_spot"]
    results["predict_per_100k"] = {"seconds": s100k, "pipeline_over_forward": ratio}
    results["predict_peak_rss_difference_mb"] = rss_diff
    for r in runs:
        print(
            f"predict {r['spots']:,} of {args.spots:,} spots ({r['genes']} genes, {args.model}, "
            f"{args.threads} thread): {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(before predicting {r['rss_before_mb']:.0f}), "
            f"{r['progress_reports']} progress reports, longest gap {r['max_progress_gap_s']:.1f} s"
        )
    print(
        f"per 100k spots: {s100k:.0f} s ({s100k / 3600:.2f} h); peak RSS {rss_diff:+.0f} MB from "
        f"{a['spots']} to {b['spots']} spots; "
        f"pipeline / model forward (same process) {ratio:.2f}x; projected 1M: {s100k * 10 / 3600:.1f} h"
    )
    results["load_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        from napari_rapacl._atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
