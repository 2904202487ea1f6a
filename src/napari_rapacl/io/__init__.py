"""Slide and spot I/O: ``open_slide`` (lazy multiscale) and ``read_spots`` (one type for all formats)."""

from __future__ import annotations

from .slide import Slide, open_slide, write_ome_tiff
from .spots import Spots, read_spots

__all__ = ["Slide", "Spots", "open_slide", "place_spots", "read_spots", "write_ome_tiff"]


def place_spots(slide: Slide, spots: Spots) -> Slide:
    """Put spots on their slide: every centre must lie in the slide's level-0 pixels
    (:class:`~napari_rapacl._errors.SpotsOutsideImageError` naming both files otherwise), and a slide
    whose file gives no pixel size takes the spots' own (Visium scale factors, the ST array pitch;
    ``mpp_source == "spot-grid"``). The one place where a pixel size is adopted from spots: the CLI,
    the viewer and the her2st loader all go through it. Returns the slide (a new one when its pixel
    size was adopted)."""
    spots.check_inside(slide.shape, name=str(slide.path) if slide.path is not None else slide.name)
    if slide.mpp is None and spots.mpp is not None:
        slide = slide.with_mpp(spots.mpp, "spot-grid")
    return slide
