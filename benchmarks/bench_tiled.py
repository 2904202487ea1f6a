"""Tiled inference: peak memory over a large lazy slide, and the cost of panning back to a predicted view.

(a) Memory. A synthetic 50,000 x 50,000 px pyramidal slide (0.5 um/px; levels at 1, 1/4 and 1/16,
    each a lazy ``dask.array.map_blocks`` texture of 512 px chunks computed from level-0 coordinates,
    so no level is ever held whole) and spots on a 100 um grid over the whole slide (62,500 spots;
    ``--region-px N`` limits them to an N x N px square from the origin). ``iter_predict_region``
    predicts every spot with ``stnet_tiny`` (32 px patches at 4 um/px) and a :class:`TileCache`. It
    runs in a child process, so that its peak resident set size
    (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark of the whole process,
    imports included) belongs to this job alone; a psutil thread also samples RSS every 20 ms during
    the prediction. The reference, measured in the same child, is its RSS just before predicting
    (after torch, the model and the lazy slide are loaded); the bytes the region would take as one
    level-0 RGB array are printed beside it.

(b) Pan back. The baseline ``stnet`` (ResNet-18, 224 px patches at 0.5 um/px, 785 genes, random weights:
    the timing does not depend on them) predicts a 2048 x 2048 px view of the same slide (about 100
    spots), the view placed across four cells of the 2048 px tile grid, as a viewer's view usually is.
    Timed: the first prediction of the view (four whole tiles computed), the same view again (pan back:
    cache hits only), and, as the in-process reference, ``predict_spots`` on just the view's spots
    (what an untiled, uncached viewer pays on every visit). Then a pan: the view moves right by half
    its width three times and jumps back, tiled (fresh cache) against untiled (each view's spots).

    python benchmarks/bench_tiled.py [--region-px N] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from napari_rapacl._atomic import write_text_atomic

SIZE = 50_000
MPP = 0.5
GRID_UM = 100.0
CHUNK = 512


def _texture_block(block_info=None, ds: float = 1.0) -> np.ndarray:
    """One chunk of a smooth H&E-coloured texture, a function of level-0 coordinates."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
    y = ((np.arange(y0, y1, dtype=np.float32) + 0.5) * ds)[:, None]
    x = ((np.arange(x0, x1, dtype=np.float32) + 0.5) * ds)[None, :]
    a = np.sin(x / 97.0) * np.cos(y / 61.0)
    b = np.sin((x + y) / 143.0)
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    out[..., 0] = 150 + 80 * a
    out[..., 1] = 110 + 70 * b
    out[..., 2] = 170 + 50 * a * b
    return out


def synthetic_slide(size: int = SIZE, mpp: float = MPP, downsamples=(1, 4, 16)):
    """A lazy pyramidal :class:`Slide`: each level is generated chunk by chunk on demand."""
    import dask.array as da

    from napari_rapacl.io.slide import Slide

    levels = []
    for ds in downsamples:
        n = -(-size // ds)
        chunks = (CHUNK,) * (n // CHUNK) + ((n % CHUNK,) if n % CHUNK else ())
        levels.append(
            da.map_blocks(
                _texture_block,
                chunks=(chunks, chunks, (3,)),
                dtype=np.uint8,
                meta=np.empty((0, 0, 0), np.uint8),
                ds=float(ds),
                name=f"bench-texture-{size}-{ds}",
            )
        )
    return Slide(tuple(levels), tuple(float(d) for d in downsamples), mpp=mpp)


def grid_spots(x0: float, y0: float, x1: float, y1: float, mpp: float = MPP) -> tuple[np.ndarray, np.ndarray]:
    step = GRID_UM / mpp
    ys, xs = np.mgrid[y0 + step / 2 : y1 : step, x0 + step / 2 : x1 : step]
    return xs.ravel(), ys.ravel()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# ---- (a) memory, in a child process ----------------------------------------------------------------


def child_memory(region_px: int, device: str) -> dict:
    import torch

    from napari_rapacl.models import create_model
    from napari_rapacl.tiled import TileCache, iter_predict_region

    torch.manual_seed(0)
    model = create_model("stnet_tiny", n_genes=50).eval()
    slide = synthetic_slide()
    x, y = grid_spots(0, 0, region_px, region_px)
    cache = TileCache()
    baseline = _rss()
    peak = {"rss": baseline}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    gen = iter_predict_region(model, slide, x, y, tile_px=2048, cache=cache, device=device, batch_size=64)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            result = done.value
            break
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    assert result.values.shape == (len(x), 50) and np.isfinite(result.values).all()
    return {
        "slide_px": [SIZE, SIZE],
        "slide_level0_bytes": SIZE * SIZE * 3,
        "region_px": region_px,
        "region_level0_bytes": region_px * region_px * 3,
        "n_spots": len(x),
        "n_tiles": result.tiles_computed,
        "model": "stnet_tiny (50 genes)",
        "seconds": seconds,
        "spots_per_s": len(x) / seconds,
        "rss_before_predict_bytes": baseline,
        "rss_peak_sampled_during_predict_bytes": peak["rss"],
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cache_bytes": cache.nbytes,
    }


# ---- (b) pan back, in this process -------------------------------------------------------------------


def pan_back(device: str, repeats: int = 3) -> dict:
    import torch

    from napari_rapacl.inference import predict_spots
    from napari_rapacl.models import create_model
    from napari_rapacl.tiled import TileCache, predict_region

    torch.manual_seed(0)
    model = create_model("stnet").eval()
    slide = synthetic_slide()
    # spots on the 100 um grid over a 6 x 6 tile neighbourhood; the view straddles four tiles
    x, y = grid_spots(8192, 8192, 8192 + 3 * 2048, 8192 + 3 * 2048)
    view = (8192 + 1024, 8192 + 1024, 8192 + 1024 + 2048, 8192 + 1024 + 2048)
    inside = (x >= view[0]) & (x < view[2]) & (y >= view[1]) & (y < view[3])
    cache = TileCache()

    predict_spots(model, slide, x[:2], y[:2], device=device)  # warm-up (allocator, first dask read)
    t = time.perf_counter()
    direct = predict_spots(model, slide, x[inside], y[inside], device=device)
    t_direct = time.perf_counter() - t

    t = time.perf_counter()
    first = predict_region(model, slide, x, y, box=view, cache=cache, device=device)
    t_first = time.perf_counter() - t
    backs = []
    for _ in range(repeats):
        t = time.perf_counter()
        back = predict_region(model, slide, x, y, box=view, cache=cache, device=device)
        backs.append(time.perf_counter() - t)
    assert back.tiles_computed == 0 and back.tiles_cached == first.tiles_computed
    np.testing.assert_allclose(first.values, direct, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(back.values, first.values)
    n_tile_spots = int(sum(((x // 2048) == tx) & ((y // 2048) == ty) for ty in (4, 5) for tx in (4, 5)).sum())
    t_back = float(np.median(backs))

    # a pan: the view moves right by half its width three times, then jumps back to the start
    walk = [view[0] + k * 1024 for k in (0, 1, 2, 3, 0)]
    walk_cache = TileCache()
    t_tiled, t_untiled, tiles_walk = [], [], []
    for vx in walk:
        box = (vx, view[1], vx + 2048, view[3])
        t = time.perf_counter()
        res = predict_region(model, slide, x, y, box=box, cache=walk_cache, device=device)
        t_tiled.append(time.perf_counter() - t)
        tiles_walk.append(res.tiles_computed)
        sel = (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])
        t = time.perf_counter()
        predict_spots(model, slide, x[sel], y[sel], device=device)
        t_untiled.append(time.perf_counter() - t)
    return {
        "model": "stnet (resnet18, 224 px @ 0.5 um/px, 785 genes)",
        "view_px": [2048, 2048],
        "n_view_spots": int(inside.sum()),
        "tiles_first": first.tiles_computed,
        "spots_predicted_first": n_tile_spots,
        "seconds_view_spots_untiled": t_direct,
        "seconds_first": t_first,
        "seconds_pan_back_median": t_back,
        "seconds_pan_back_all": backs,
        "ratio_first_over_pan_back": t_first / t_back,
        "ratio_untiled_over_pan_back": t_direct / t_back,
        "ratio_first_over_untiled": t_first / t_direct,
        "walk_view_x0": walk,
        "walk_tiles_computed": tiles_walk,
        "walk_seconds_tiled": t_tiled,
        "walk_seconds_untiled": t_untiled,
        "walk_ratio_untiled_over_tiled": sum(t_untiled) / sum(t_tiled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--region-px", type=int, default=SIZE, help="side of the predicted region (a)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="benchmarks/results/tiled_cpu.json")
    parser.add_argument("--skip", choices=["memory", "pan"], default=None)
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(json.dumps(child_memory(args.region_px, args.device)))
        return

    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
            "note": "shared machine: other jobs ran at the same time",
        },
        "device": args.device,
    }
    if args.skip != "memory":
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-memory",
                "--region-px",
                str(args.region_px),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        mem = json.loads(proc.stdout.strip().splitlines()[-1])
        results["memory"] = mem
        gb, m = 2**30, mem
        increment = m["rss_peak_sampled_during_predict_bytes"] - m["rss_before_predict_bytes"]
        side = m["region_px"]
        print(
            f"(a) {m['n_spots']} spots over {side} x {side} px of a {SIZE} x {SIZE} px lazy slide, "
            f"{m['n_tiles']} tiles, {m['seconds']:.0f} s ({m['spots_per_s']:.0f} spots/s)\n"
            f"    peak RSS (ru_maxrss, whole process) {m['ru_maxrss_bytes'] / gb:.2f} GiB; RSS before "
            f"predicting {m['rss_before_predict_bytes'] / gb:.2f} GiB, sampled peak while predicting "
            f"{m['rss_peak_sampled_during_predict_bytes'] / gb:.2f} GiB (+{increment / 2**20:.0f} MiB)\n"
            f"    reference: the region as one level-0 array would be "
            f"{m['region_level0_bytes'] / gb:.1f} GiB, the slide's level 0 "
            f"{m['slide_level0_bytes'] / gb:.1f} GiB; peak / slide level 0 = "
            f"{m['ru_maxrss_bytes'] / m['slide_level0_bytes']:.3f}"
        )
    if args.skip != "pan":
        pan = pan_back(args.device)
        results["pan_back"] = pan
        q = pan
        print(
            f"(b) {q['model']}, a 2048 x 2048 px view with {q['n_view_spots']} spots:\n"
            f"    first prediction {q['seconds_first']:.2f} s ({q['tiles_first']} tiles, "
            f"{q['spots_predicted_first']} spots); pan back {q['seconds_pan_back_median'] * 1e3:.2f} ms "
            f"(median of 3); untiled predict_spots on the view's spots "
            f"{q['seconds_view_spots_untiled']:.2f} s\n"
            f"    first / pan back = {q['ratio_first_over_pan_back']:.0f}x; untiled / pan back = "
            f"{q['ratio_untiled_over_pan_back']:.0f}x; "
            f"first / untiled = {q['ratio_first_over_untiled']:.2f}x\n"
            f"    a pan (right by half a view x3, then back): tiles computed {q['walk_tiles_computed']}, "
            f"tiled {sum(q['walk_seconds_tiled']):.1f} s vs untiled {sum(q['walk_seconds_untiled']):.1f} s "
            f"(untiled / tiled = {q['walk_ratio_untiled_over_tiled']:.2f}x)"
        )
    results["load_avg_at_end"] = os.getloadavg()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
