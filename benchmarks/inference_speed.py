"""Inference speed of every registered model on this machine, against its measured matmul rate.

For each full-size model: spots/s in eval mode (batch of spot patches at the model's own patch size),
the FLOPs of one forward (counted with ``torch.utils.flop_counter``), and the fraction of this
machine's fp32 matmul rate (a 2048^3 ``torch.mm`` measured in the same process) that the model reaches.
For models that opt in to the frozen TorchScript CPU predictor (``inference.frozen_image_predictor``,
what ``predict_spots`` runs on a CPU), also its spots/s and its speed-up over the eager model, timed
interleaved in the same process.

    python benchmarks/inference_speed.py [--device cpu|cuda] [--batch 32] [--repeats 3] [--amp]

Prints one table row per model; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_rapacl.inference import frozen_image_predictor
from napari_rapacl.models import create_model, list_models


def matmul_rate(device: str, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def batch_for(model, batch: int, device: str) -> dict:
    cfg = model.config
    s = cfg.patch_size
    keys = {
        "image": lambda: torch.rand(batch, 3, s, s, device=device),
        "radiomics": lambda: torch.randn(batch, getattr(cfg, "n_radiomics", 72), device=device),
        "radius_px": lambda: torch.full((batch,), s / 4, device=device),
    }
    return {k: keys[k]() for k in model.predict_inputs}


def bench_model(name: str, device: str, batch: int, repeats: int, amp: bool) -> dict:
    model = create_model(name, **({"stage": 2} if name.startswith("rapacl") else {})).to(device).eval()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    inputs = batch_for(model, batch, device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model.predict(inputs)
        flops = counter.get_total_flops()
        times = []
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device_type=device, enabled=amp, dtype=torch.bfloat16):
                model.predict(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    best = min(times[1:])  # the first run warms caches and allocators
    row = {
        "model": name,
        "patch": model.config.patch_size,
        "batch": batch,
        "gflop_per_spot": flops / batch / 1e9,
        "spots_per_s": batch / best,
        "gflop_per_s": flops / best / 1e9,
    }
    # what predict_spots runs on a CPU for models that opt in: the frozen TorchScript predictor,
    # timed interleaved with the eager model so both see the same machine
    frozen = None if amp else frozen_image_predictor(model, device)
    if frozen is not None:
        eager_t, frozen_t = [], []
        with torch.inference_mode():
            frozen(inputs["image"])  # warm-up
            for _ in range(repeats):
                for fn, out in (
                    (lambda: model.predict(inputs), eager_t),
                    (lambda: frozen(inputs["image"]), frozen_t),
                ):
                    t = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t)
        row["frozen_spots_per_s"] = batch / min(frozen_t)
        row["frozen_over_eager_speed"] = min(eager_t) / min(frozen_t)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--models", nargs="*", default=[n for n in list_models() if not n.endswith("_tiny")])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    peak = matmul_rate(args.device)
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, "
        f"fp32 2048^3 matmul: {peak / 1e9:.1f} GFLOP/s (reference)"
    )
    print(f"{'model':<10} {'patch':>5} {'GFLOP/spot':>11} {'spots/s':>9} {'GFLOP/s':>8} {'of matmul':>9}")
    rows = []
    for name in args.models:
        row = bench_model(name, args.device, args.batch, args.repeats, args.amp)
        row["fraction_of_matmul"] = row["gflop_per_s"] * 1e9 / peak
        rows.append(row)
        frozen = (
            f"   frozen: {row['frozen_spots_per_s']:.1f} spots/s, {row['frozen_over_eager_speed']:.2f}x eager"
            if "frozen_spots_per_s" in row
            else ""
        )
        print(
            f"{name:<10} {row['patch']:>5} {row['gflop_per_spot']:>11.2f} {row['spots_per_s']:>9.1f} "
            f"{row['gflop_per_s']:>8.1f} {row['fraction_of_matmul']:>9.2f}{frozen}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": args.device, "matmul_gflop_s": peak / 1e9, "amp": args.amp, "rows": rows},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
