"""Slide and spot I/O: ``open_slide`` (lazy multiscale) and ``read_spots`` (one type for all formats)."""

from __future__ import annotations

from .slide import Slide, open_slide, write_ome_tiff
from .spots import Spots, read_spots

__all__ = ["Slide", "Spots", "open_slide", "read_spots", "write_ome_tiff"]
