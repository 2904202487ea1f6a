"""Checks made when a slide and its spots are opened, before any work (Qt-free).

:func:`spot_fit` tells whether a spot file belongs to the slide it was opened on: spots measured on
this section lie on its tissue (her2st: 2-6 % of a section's own spots fall on glass, against 12-84 %
when the spot file of another section of the same patient is opened on it). The tissue mask comes
from an overview of at most 1,024 px (the slide's smallest sufficient level), so the check costs a
fraction of a second even for a whole slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..io.slide import Slide
    from ..io.spots import Spots

__all__ = ["MISFIT_FRACTION", "SpotFit", "spot_fit", "tissue_mask"]

#: warn when at least this fraction of the spots falls on glass or outside the slide
MISFIT_FRACTION = 0.15
#: longest side of the overview the tissue mask is computed on (px)
OVERVIEW_PX = 1024


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of an H&E overview: stained (saturation > 25 of 255) or dark (grey < 180), small
    specks removed and small holes closed (2-3 overview px)."""
    from scipy import ndimage as ndi

    img = np.asarray(rgb)
    if img.ndim == 2:
        img = img[..., None]
    img = img[..., :3].astype(np.int16)
    saturation = img.max(axis=-1) - img.min(axis=-1)
    grey = img.mean(axis=-1)
    mask = (saturation > 25) | (grey < 180)
    mask = ndi.binary_opening(mask, iterations=2)
    return ndi.binary_closing(mask, iterations=3)


@dataclass(frozen=True)
class SpotFit:
    """How well spots fit a slide: counts of spots whose centre lies outside the image, and of spots
    inside it whose disc is mostly glass (less than half of it on tissue)."""

    n_spots: int
    n_outside: int
    n_on_glass: int
    spots_name: str
    slide_name: str

    @property
    def fraction(self) -> float:
        """Fraction of the spots on glass or outside the slide."""
        return (self.n_outside + self.n_on_glass) / self.n_spots if self.n_spots else 0.0

    @property
    def fits(self) -> bool:
        return self.fraction < MISFIT_FRACTION

    @property
    def warning(self) -> str | None:
        """A message for people when the spots do not fit, else None."""
        if self.fits:
            return None
        pct = round(100 * self.fraction)
        where = "on glass or outside" if self.n_outside else "on glass in"
        return (
            f"{pct} % of the spots of {self.spots_name} ({self.n_on_glass + self.n_outside} of "
            f"{self.n_spots}) fall {where} {self.slide_name}: they probably belong to another section "
            "(or the slide is flipped or at another scale). Check that the spot file and the slide are "
            "the same section before predicting."
        )


def _name(path, fallback: str) -> str:
    return Path(path).name if path else fallback


def spot_fit(slide: Slide, spots: Spots, *, overview_px: int = OVERVIEW_PX) -> SpotFit:
    """Measure how many of ``spots`` lie on glass or outside ``slide`` (level-0 px both), on a tissue
    mask of the slide's overview (:func:`tissue_mask`). A spot is on glass when less than half of its
    disc's bounding square (at least 3 x 3 overview px) is tissue."""
    height, width = slide.shape
    x = np.asarray(spots.x, dtype=np.float64)
    y = np.asarray(spots.y, dtype=np.float64)
    inside = (x >= 0) & (y >= 0) & (x < width) & (y < height)
    overview, scale = slide.thumbnail(overview_px)
    mask = tissue_mask(overview)
    # integral image: the tissue fraction of each spot's square in O(1)
    integral = np.pad(mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    radius = np.asarray(spots.radius, dtype=np.float64)
    med = np.nanmedian(radius) if np.isfinite(radius).any() else 0.0
    r = np.where(np.isfinite(radius), radius, med) * scale
    r = np.maximum(1, np.round(r)).astype(np.int64)
    rows = np.clip(np.floor(y[inside] * scale).astype(np.int64), 0, mh - 1)
    cols = np.clip(np.floor(x[inside] * scale).astype(np.int64), 0, mw - 1)
    rr = r[inside]
    r0, r1 = np.clip(rows - rr, 0, mh), np.clip(rows + rr + 1, 0, mh)
    c0, c1 = np.clip(cols - rr, 0, mw), np.clip(cols + rr + 1, 0, mw)
    tissue = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = np.maximum(1, (r1 - r0) * (c1 - c0))
    on_glass = int(np.count_nonzero(tissue / area < 0.5))
    return SpotFit(
        n_spots=len(x),
        n_outside=int(np.count_nonzero(~inside)),
        n_on_glass=on_glass,
        spots_name=_name(spots.source, "the spots"),
        slide_name=_name(slide.path, slide.name if hasattr(slide, "name") else "slide"),
    )
