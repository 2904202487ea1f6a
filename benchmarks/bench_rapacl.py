"""RaPaCL-ST from the slide: first view, pan back and a whole section, against the image-only baseline.

    NAPARI_RAPACL_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_rapacl.py [--device cuda]

On her2st C2 (JPEG, 0.688 um/px), with the registry models as the Predict widget builds them (random
weights: speed does not depend on them): ``rapacl`` (DenseNet-121 on 224 px at 0.5 um/px, Stage 2, the
default radiomics recipe: classical nuclei + the 72 features of 224 px patches at 0.5 um/px) and
``stnet`` (ResNet-18, the image-only baseline), both through ``jobs.iter_predict`` (what the viewer
and ``napari-rapacl predict`` run). Prints, in one process:

* first view: a 2048 x 2048 px region around the section's median spot, caches empty, model and
  radiomics workers preloaded (as the widget does), ``view_first`` -- time until the view's spots are
  known, and how it splits (the view's radiomics alone, the model alone on known radiomics);
* pan back: the same region again (tile cache);
* the whole section: ``rapacl`` against ``stnet`` (no caches), as a ratio;
* reference: ``predict_spots`` of ``stnet`` on the view's spots (the image-only first view).

Results go to ``benchmarks/results/rapacl_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--view-px", type=int, default=2048)
    parser.add_argument(
        "--backbone",
        default=None,
        help="image encoder of rapacl (timm name; default: the registry's, densenet121 as in the paper)",
    )
    parser.add_argument(
        "--lookahead",
        choices=["auto", "on", "off", "ab"],
        default="auto",
        help="measure the next tile's radiomics while predicting (auto: only with a GPU or spare cores; "
        "ab: first views with it off and on, interleaved, reported apart)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import pandas as pd
    import torch

    import napari_rapacl.tiled as tiled
    from napari_rapacl.datasets import her2st
    from napari_rapacl.inference import predict_spots
    from napari_rapacl.jobs import iter_predict
    from napari_rapacl.jobs._models import _load_with_key
    from napari_rapacl.progress import run_to_completion
    from napari_rapacl.radiomics import MEMORY_CACHE, iter_spot_features
    from napari_rapacl.tiled import TileCache

    auto_overlap = tiled._overlap_pays
    mode = {"now": args.lookahead}

    def overlap(tasks) -> bool:
        return auto_overlap(tasks) if mode["now"] == "auto" else mode["now"] == "on"

    tiled._overlap_pays = overlap
    sec = her2st("C2")
    slide, spots = sec.slide, sec.spots
    cx, cy = float(np.median(spots.x)), float(np.median(spots.y))
    half = args.view_px / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    inside = np.flatnonzero(
        (spots.x >= box[0]) & (spots.x < box[2]) & (spots.y >= box[1]) & (spots.y < box[3])
    )
    rapacl = _load_with_key("rapacl", None)  # the widget's background build (+ radiomics workers)
    if args.backbone:  # the same model with another image encoder (random weights, default recipe)
        import dataclasses

        from napari_rapacl.models import create_model
        from napari_rapacl.radiomics import RadiomicsRecipe
        from napari_rapacl.tiled import model_key

        model = create_model("rapacl", stage=2, backbone=args.backbone).eval()
        model.radiomics_recipe = RadiomicsRecipe()
        model_key(model)
        rapacl = dataclasses.replace(
            rapacl, model=model, config=model.config.to_dict(), key=("registry", "rapacl", id(model))
        )
    stnet = _load_with_key("stnet", None)
    recipe = rapacl.recipe
    time.sleep(3.0)  # the radiomics workers finish importing (the widget builds while the user looks)
    print(
        f"her2st C2, rapacl with {rapacl.model.config.backbone}; view {args.view_px} px around the "
        f"median spot: {len(inside)} spots; "
        f"device {args.device}; torch threads {torch.get_num_threads()}; cores {os.cpu_count()}; "
        f"load {os.getloadavg()[0]:.2f}"
    )

    def first_view() -> dict:
        MEMORY_CACHE.clear()
        cache = TileCache()
        t0 = time.perf_counter()
        shown = None
        gen = iter_predict(
            rapacl, slide, spots, box, cache=cache, device=args.device, tile_px=1024, view_first=True
        )
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                final = stop.value
                break
            if p.result is not None and shown is None:
                shown = time.perf_counter() - t0
        complete = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = run_to_completion(
            iter_predict(
                rapacl, slide, spots, box, cache=cache, device=args.device, tile_px=1024, view_first=True
            )
        )
        pan_back = time.perf_counter() - t1
        assert again.tiles_computed == 0 and np.array_equal(again.values, final.values)
        return {"view": shown, "tiles_complete": complete, "pan_back": pan_back, "n_view": len(final.index)}

    if args.lookahead == "ab":  # interleaved: off, on, off, on, ...
        ab: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeats):
            for which in ("off", "on"):
                mode["now"] = which
                ab[which].append(first_view()["view"])
        mode["now"] = "auto"
        for which, times in ab.items():
            print(f"first view, look-ahead {which}: median {np.median(times):.2f} s, runs {sorted(times)}")
    runs = [first_view() for _ in range(args.repeats)]
    view = sorted(r["view"] for r in runs)
    pan = sorted(r["pan_back"] for r in runs)

    # how the first view splits: the view's radiomics alone (2 worker processes), the model alone
    table = pd.DataFrame({"x": spots.x[inside], "y": spots.y[inside], "barcode": spots.barcode[inside]})

    def radiomics_only():
        MEMORY_CACHE.clear()
        return run_to_completion(iter_spot_features(slide, table, n_jobs=2, **recipe.spot_feature_kwargs()))

    t_rad, raw = _best(radiomics_only, args.repeats)
    z = recipe.transform(raw[recipe.raw_columns()].to_numpy())
    t_model, _ = _best(
        lambda: predict_spots(
            rapacl.model, slide, spots.x[inside], spots.y[inside], device=args.device, inputs={"radiomics": z}
        ),
        args.repeats,
    )
    t_ref, _ = _best(
        lambda: predict_spots(stnet.model, slide, spots.x[inside], spots.y[inside], device=args.device),
        args.repeats,
    )

    # the whole section, no caches: rapacl against stnet
    def whole(loaded):
        MEMORY_CACHE.clear()
        return run_to_completion(iter_predict(loaded, slide, spots, None, cache=False, device=args.device))

    t_whole_r, _ = _best(lambda: whole(rapacl), max(1, args.repeats - 1))
    t_whole_s, _ = _best(lambda: whole(stnet), max(1, args.repeats - 1))

    res = {
        "device": args.device,
        "rapacl_backbone": rapacl.model.config.backbone,
        "lookahead": args.lookahead,
        "lookahead_ab_first_view_s": ab if args.lookahead == "ab" else None,
        "cores": os.cpu_count(),
        "load_average_end": os.getloadavg()[0],
        "view_px": args.view_px,
        "n_view_spots": int(len(inside)),
        "first_view_s": view,
        "first_view_median_s": float(np.median(view)),
        "view_tiles_complete_s": sorted(r["tiles_complete"] for r in runs),
        "pan_back_s": pan,
        "split_view_radiomics_s": t_rad,
        "split_view_model_s": t_model,
        "reference_stnet_view_s": t_ref,
        "whole_section_rapacl_s": t_whole_r,
        "whole_section_stnet_s": t_whole_s,
        "n_section_spots": len(spots),
    }
    print(
        f"first view (radiomics + model, {len(inside)} spots): median {np.median(view):.2f} s, "
        f"runs {', '.join(f'{v:.2f}' for v in view)}"
    )
    print(
        f"  split: radiomics of the view's spots {t_rad:.2f} s ({len(inside) / t_rad:.1f} spots/s, "
        f"2 workers), model {t_model:.2f} s"
    )
    print(
        f"  reference, stnet on the same spots: {t_ref:.2f} s "
        f"(first view / reference = {np.median(view) / t_ref:.2f})"
    )
    print(f"pan back: median {np.median(pan) * 1000:.0f} ms")
    print(
        f"whole section ({len(spots)} spots): rapacl {t_whole_r:.1f} s, stnet {t_whole_s:.1f} s "
        f"(rapacl / stnet = {t_whole_r / t_whole_s:.2f})"
    )
    suffix = (f"_{args.backbone}" if args.backbone else "") + (
        f"_lookahead_{args.lookahead}" if args.lookahead != "auto" else ""
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"rapacl_{args.device}{suffix}.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
