"""How long a job will take, before it starts (Qt-free): seconds from the work's size and measured rates.

The viewer asks before a job whose estimate exceeds :data:`ASK_ABOVE_S` (e.g. Cells on a whole
slide); while a job runs, its progress bar extrapolates from the work done so far instead
(:func:`eta_seconds`). The rates are medians measured on the 2-core development machine (no GPU)
and written down in ``benchmarks/README.md``; a faster machine only makes the estimate pessimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ASK_ABOVE_S",
    "RATES",
    "Estimate",
    "estimate",
    "eta_seconds",
    "format_duration",
]

#: jobs estimated to take longer than this ask first (seconds)
ASK_ABOVE_S = 30.0

#: measured throughputs (units per second) on the 2-core development machine, CPU only
RATES: dict[str, float] = {
    # whole-slide Cells on her2st C2 (9,270 x 9,920 px = 92 Mpx level 0): 93 s for segmentation and
    # cell radiomics together with classical v2 (issue #13's run), ~21 s of it segmentation; v3 (the
    # default since session 6) segments 1.55x slower than v2 on her2st (benchmarks/README.md,
    # Segmentation: 1.85 vs 2.88 Mpx/s measured in the same process), so ~93 + 0.55 x 21 = 105 s
    "cells_px": 92.0e6 / 105.0,
    # classical nuclei alone, tiled path with slide reads and zarr writes: 4.38 Mpx/s with v2
    # (benchmarks/README.md, Segmentation, "Tiled path"), / 1.55 for v3
    "segment_px": 4.38e6 / 1.55,
    # spot radiomics of RaPaCL-ST (2 worker processes): 80 spots/s (benchmarks/README.md, Viewer)
    "radiomics_spots": 80.0,
    # image models' forward on 224 px patches, frozen CPU path: stnet ~29 spots/s eager, up to
    # 1.7x frozen; the slower models (rapacl 9.3 spots/s) take the conservative rate
    "predict_spots": 20.0,
    "predict_spots_rapacl": 9.3,
    # AnnData export with the slide's images: dominated by the thumbnail read; per spot it is cheap
    "export_spots": 5000.0,
}

#: a job's fixed start-up cost (model build, pools), seconds
OVERHEAD_S: dict[str, float] = {"cells": 2.0, "segment": 1.0, "predict": 3.0, "export": 2.0}


@dataclass(frozen=True)
class Estimate:
    """A job's expected duration: ``seconds`` and what it is based on (``basis``, for people)."""

    job: str
    seconds: float
    basis: str

    @property
    def text(self) -> str:
        return f"about {format_duration(self.seconds)} ({self.basis})"

    def needs_confirmation(self, threshold_s: float = ASK_ABOVE_S) -> bool:
        return self.seconds > threshold_s


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"1 min 30 s"``, ``"2 h 05 min"`` (whole seconds; ``"< 1 s"`` below one)."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = int(round(max(0.0, float(seconds))))
    if seconds < 1:
        return "< 1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s:02d} s" if s else f"{m} min"
    h, rest = divmod(s, 3600)
    return f"{h} h {rest // 60:02d} min"


def _mpx(area_px: float) -> str:
    return f"{area_px / 1e6:.1f} Mpx"


def estimate(
    job: str,
    *,
    area_px: float = 0.0,
    n_spots: int = 0,
    model: str | None = None,
    radiomics: bool = False,
) -> Estimate:
    """Seconds ``job`` will take: ``"cells"`` (segmentation + cell radiomics) and ``"segment"`` from
    the level-0 ``area_px``; ``"predict"`` from ``n_spots`` (plus spot radiomics when ``radiomics``
    or the model is RaPaCL-ST); ``"export"`` from ``n_spots``."""
    if area_px < 0 or n_spots < 0:
        raise ValueError(f"area_px={area_px} and n_spots={n_spots} must be >= 0")
    if job in ("cells", "segment"):
        rate = RATES["cells_px" if job == "cells" else "segment_px"]
        seconds = OVERHEAD_S[job] + area_px / rate
        if job == "cells" and radiomics and n_spots:
            seconds += n_spots / RATES["radiomics_spots"]
        return Estimate(job, seconds, f"{_mpx(area_px)} at {rate / 1e6:.1f} Mpx/s")
    if job == "predict":
        is_rapacl = bool(model) and "rapacl" in str(model).lower()
        rate = RATES["predict_spots_rapacl" if is_rapacl else "predict_spots"]
        seconds = OVERHEAD_S[job] + n_spots / rate
        basis = f"{n_spots:,} spots at {rate:g} spots/s"
        if radiomics and not is_rapacl:
            seconds += n_spots / RATES["radiomics_spots"]
            basis += " + spot radiomics"
        return Estimate(job, seconds, basis)
    if job == "export":
        rate = RATES["export_spots"]
        return Estimate(job, OVERHEAD_S[job] + n_spots / rate, f"{n_spots:,} spots")
    raise ValueError(f"unknown job {job!r}: expected cells, segment, predict or export")


def eta_seconds(elapsed_s: float, done: int, total: int) -> float | None:
    """Remaining seconds extrapolated from the rate so far (None before the first unit is done)."""
    if total <= 0 or done <= 0 or elapsed_s <= 0:
        return None
    done = min(done, total)
    return elapsed_s / done * (total - done)
