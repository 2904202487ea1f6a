"""Viewer responsiveness: from a click on *Predict* to the first rendered prediction, in a real napari viewer.

A shown viewer (run it under ``xvfb-run``) opens the her2st sample (C2 by default); the camera shows a
``--view`` x ``--view`` level-0 px square (2048 px by default; the canvas is made square) around the
tissue centre; the Predict widget (scope "visible region", the baseline ``stnet`` with its default
config and random weights -- the time does not depend on the weights --, CPU) is clicked through its
button. Timed, each in the same process:

1. **cold**: the first click. The widget builds the chosen model and hashes its weights for the tile
   cache in the background as soon as it opens (``PredictWidget.preloaded``); the click waits for
   that if it is not done (recorded: ``model_ready_at_click``), then predicts with the first torch
   call of the process;
2. **first view** (the model loaded, the tile cache empty): median of ``--repeats`` clicks;
3. **pan back**: predict a view far away, pan back to the first view and click again (cache hits only):
   median of ``--repeats``; the ratio first view / pan back is printed.

"Rendered" is the first draw of the canvas after the widget wrote the view's predictions into the spots
layer and coloured them (vispy's ``draw`` event of the viewer's canvas). The widget predicts the view's
own spots first and shows them (``view_first``), then completes the tiles around the view for the
cache; the time to that end is recorded too (``seconds_to_result``). Also recorded: the spots in the view,
the tiles computed / cached, the OpenGL renderer, the load average, and a reference measured in the same
process: ``predict_spots`` on the view's spots alone (untiled, no viewer, no cache).

Progress bars: by default the widgets put one in napari's activity dock unless OpenGL renders on the
CPU (Xvfb's llvmpipe): napari then animates a loading GIF in its status bar, and each frame is a
CPU-rendered recomposition of the window. ``--also-progress-on`` runs the whole measurement again in a
fresh process with the bars forced on, to show what they cost there.

    xvfb-run -a -s "-screen 0 1800x1400x24" python benchmarks/bench_viewer.py \\
        [--view 2048] [--repeats 3] [--tile-px 1024] [--progress auto|on|off] [--also-progress-on] \\
        [--json benchmarks/results/viewer_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--section", default="C2", choices=["C2", "C3"], help="her2st sample section")
    parser.add_argument("--view", type=int, default=2048, help="side of the viewed square, level-0 px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="stnet", help="registry model (random weights)")
    parser.add_argument("--tile-px", type=int, default=None, help="tile grid (default: the widget's)")
    parser.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="activity-dock progress bars (auto: the widget's default, off with a software OpenGL renderer)",
    )
    parser.add_argument(
        "--also-progress-on",
        action="store_true",
        help="then run again in a fresh process with activity-dock bars forced on, and record both",
    )
    parser.add_argument("--screenshot", default=None, help="save the viewer after the first prediction")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    # torch/timm first: Mesa's llvmpipe (Xvfb) and triton each carry an LLVM (see _jobs.avoid_llvm_clash)
    import timm  # noqa: F401, I001
    import torch

    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_rapacl._napari._widgets import PredictWidget, gl_renderer, software_rendering
    from napari_rapacl._napari.layers import spots_in_box

    load_start = list(os.getloadavg())
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1700, 1200)
    viewer.open_sample("napari-rapacl", f"her2st_{args.section.lower()}")
    image = viewer.layers[f"her2st {args.section}"]
    points = viewer.layers[f"her2st {args.section} spots"]
    mpp = float(image.metadata["napari_rapacl"]["mpp"])

    def pump(seconds: float = 0.0, until=None, timeout: float = 600.0) -> None:
        """Run the Qt event loop (idle between events, like napari's own) until ``until()`` holds or for
        ``seconds``; polling with processEvents in a busy loop would steal a core from the worker."""
        t0 = time.perf_counter()
        done = until if until is not None else (lambda: time.perf_counter() - t0 >= seconds)
        if done():
            return
        loop, timer = QEventLoop(), QTimer()
        timer.setInterval(20)  # the measured times come from the handlers, not from this polling

        def check():
            if done() or time.perf_counter() - t0 > timeout:
                loop.quit()

        timer.timeout.connect(check)
        timer.start()
        loop.exec()
        timer.stop()
        if not done():
            raise TimeoutError("the viewer did not get there in time")

    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Predict expression")
    widget._image.value, widget._spots.value = image, points
    widget._model.value, widget._device.value = args.model, "cpu"
    if args.tile_px:
        widget.tile_px = args.tile_px
    widget.show_progress = {"auto": None, "on": True, "off": False}[args.progress]
    pump(0.5)
    # a square canvas, so that the view is a square of --view px
    for _ in range(3):
        h, w = viewer.canvas.size
        if h == w:
            break
        viewer.window.resize(viewer.window._qt_window.width() - (w - h), viewer.window._qt_window.height())
        pump(0.3)

    draws: list[float] = []
    viewer.window._qt_viewer.canvas._scene_canvas.events.draw.connect(
        lambda _e: draws.append(time.perf_counter())
    )
    done_at: list[float] = []
    shown_at: list[float] = []
    on_done, show_spots = widget._on_done, widget._show_spots

    def timed_on_done(res):
        on_done(res)
        done_at.append(time.perf_counter())

    def timed_show_spots(res):
        show_spots(res)
        shown_at.append(time.perf_counter())

    widget._on_done = timed_on_done  # _launch looks it up at each click
    widget._show_spots = timed_show_spots  # the view's spots written and coloured (partial or final)

    def show(center_px) -> tuple[int, int, int, int]:
        from napari_rapacl._napari._widgets import viewer_camera

        cam = viewer_camera(viewer)
        cam.center = (0, *(np.asarray(center_px, float) * mpp))
        cam.zoom = viewer.canvas.size[1] / (args.view * mpp)
        pump(0.5)
        from napari_rapacl._napari._widgets import camera_view
        from napari_rapacl._napari.layers import visible_box

        return visible_box(image, view=camera_view(viewer))

    def click() -> dict:
        n_draws, n_done, n_shown = len(draws), len(done_at), len(shown_at)
        cpu0, pcpu0 = time.thread_time(), time.process_time()
        t0 = time.perf_counter()
        widget._run.native.click()  # the button: PredictWidget.start -> a thread_worker
        pump(until=lambda: len(shown_at) > n_shown)
        t_shown = shown_at[n_shown]  # the first time the view's predictions were in the layer
        pump(until=lambda: any(d > t_shown for d in draws[n_draws:]))
        t_draw = next(d for d in draws[n_draws:] if d > t_shown)
        ui_cpu, p_cpu = time.thread_time() - cpu0, time.process_time() - pcpu0
        pump(until=lambda: len(done_at) > n_done and not widget.busy)
        t_result = done_at[-1]
        res = widget.last_result
        return {
            "seconds_to_render": t_draw - t0,
            # CPU seconds of the UI thread and of the whole process until that render
            "ui_thread_cpu_seconds": ui_cpu,
            "process_cpu_seconds": p_cpu,
            "seconds_to_shown": t_shown - t0,
            "shown_before_the_end": len(shown_at) > n_shown and t_shown < t_result - 1e-6,
            # the job's end: the tiles around the view complete in the cache
            "seconds_to_result": t_result - t0,
            "tiles_computed": res.tiles_computed,
            "tiles_cached": res.tiles_cached,
            "spots_in_view": int(len(res.index)),
            "job_seconds": {k: round(v, 4) for k, v in res.seconds.items()},
        }

    centre = points.data[np.argmin(np.linalg.norm(points.data - np.median(points.data, 0), axis=1))]
    far = points.data[np.argmax(np.linalg.norm(points.data - centre, axis=1))]
    box = show(centre)
    in_view = spots_in_box(points.data, box)
    size = f"{box[2] - box[0]} x {box[3] - box[1]} px"
    print(f"view {box} ({size}, {len(in_view)} spots); tile {widget.tile_px} px")

    ready = bool(widget.preloaded is not None and widget.preloaded.done())
    cold = click()
    cold["model_ready_at_click"] = ready
    genes = points.metadata["napari_rapacl"]["genes"]
    coloured = points.face_color[in_view]
    assert np.isfinite(points.features[genes[0]].to_numpy()[in_view]).all(), "view not predicted"
    assert len(np.unique(coloured.round(3), axis=0)) > 1, "spots not coloured"
    if args.screenshot:
        viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
    print(f"cold click: {cold['seconds_to_render']:.2f} s to render {cold}")

    first, back = [], []
    for _ in range(args.repeats):
        widget.cache.clear()
        show(centre)
        first.append(click())
        show(far)
        click()  # predict somewhere else
        show(centre)
        back.append(click())
        assert back[-1]["tiles_computed"] == 0
    med = lambda runs, key="seconds_to_render": float(np.median([r[key] for r in runs]))  # noqa: E731
    t_first, t_back = med(first), med(back)
    t_first_min = float(min(r["seconds_to_render"] for r in first))
    t_complete = med(first, "seconds_to_result")
    print(
        f"first view (model loaded, cache empty): {t_first:.3f} s to render "
        f"(median of {args.repeats}, best {t_first_min:.3f} s); tiles complete after {t_complete:.3f} s"
    )
    print(f"pan back (cache): {t_back:.3f} s to render; first / pan back = {t_first / t_back:.1f}x")
    # reference, same process: the model alone on the view's spots (untiled, no viewer, no cache)
    from napari_rapacl._napari.layers import slide_from_layer
    from napari_rapacl.inference import predict_spots

    slide = slide_from_layer(image)
    xs, ys = points.data[in_view, 1], points.data[in_view, 0]
    ref = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        predict_spots(widget._loaded.model, slide, xs, ys, device="cpu")
        ref.append(time.perf_counter() - t)
    t_ref = float(np.median(ref))
    print(
        f"reference: predict_spots on the view's {len(in_view)} spots, no viewer: {t_ref:.3f} s "
        f"(first view / reference = {t_first / t_ref:.2f})"
    )
    target = 2.0
    print(
        f"target < {target} s: cold {'met' if cold['seconds_to_render'] < target else 'NOT met'}, "
        f"first view {'met' if t_first < target else 'NOT met'}"
    )

    result = {
        "benchmark": "bench_viewer",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": list(os.getloadavg()),
            "gpu": False,
        },
        "versions": {"napari": napari.__version__, "torch": torch.__version__},
        "section": args.section,
        "model": args.model,
        "view_px": args.view,
        "view_box": list(box),
        "canvas_size": list(viewer.canvas.size),
        "tile_px": widget.tile_px,
        "progress_setting": args.progress,
        "activity_progress_bar": bool(
            widget.show_progress if widget.show_progress is not None else not software_rendering()
        ),
        "gl_renderer": gl_renderer(),
        "spots_in_view": int(len(in_view)),
        "load_average_at_start": load_start,
        "cold_click": cold,
        "first_view_runs": first,
        "pan_back_runs": back,
        "first_view_seconds_median": t_first,
        "first_view_seconds_best": t_first_min,
        "first_view_tiles_complete_seconds_median": t_complete,
        "pan_back_seconds_median": t_back,
        "ratio_first_over_pan_back": t_first / t_back,
        "reference_untiled_predict_spots_seconds_median": t_ref,
        "ratio_first_over_reference": t_first / t_ref,
        "target_seconds": target,
    }
    viewer.close()
    if args.also_progress_on and args.progress != "on":
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            other = Path(tmp) / "on.json"
            cmd = [sys.executable, __file__, "--progress", "on", "--json", str(other)]
            cmd += ["--section", args.section, "--view", str(args.view), "--repeats", str(args.repeats)]
            cmd += ["--model", args.model] + (["--tile-px", str(args.tile_px)] if args.tile_px else [])
            print("again with activity-dock progress bars on (a fresh process):", flush=True)
            subprocess.run(cmd, check=True)
            on = json.loads(other.read_text())
        keys = ("cold_click", "first_view_seconds_median", "first_view_seconds_best")
        keys += ("pan_back_seconds_median", "reference_untiled_predict_spots_seconds_median")
        result["activity_bars_on"] = {k: on[k] for k in (*keys, "load_average_at_start", "machine")}
        print(
            f"cold click: {cold['seconds_to_render']:.2f} s without bars, "
            f"{on['cold_click']['seconds_to_render']:.2f} s with; first view {t_first:.2f} s vs "
            f"{on['first_view_seconds_median']:.2f} s"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
