"""napari-rapacl: predict spatial gene expression from H&E slides.

The top-level import is deliberately light (no torch, no Qt, no dask): import the submodules you
need, e.g. ``from napari_rapacl.io import open_slide, read_spots``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
