"""npe2 readers: slides as multiscale images, spot files as Points layers."""

from __future__ import annotations

import os
from pathlib import Path

from .layers import slide_layer_data, spots_layer_data

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".jpg", ".jpeg", ".png")


def _one_path(path):
    if isinstance(path, list):
        return path[0] if len(path) == 1 else None
    return path


def get_slide_reader(path: str | list[str]):
    """Return a reader for a slide file, or None when the path is not one we read."""
    path = _one_path(path)
    if path is None or not str(path).lower().endswith(SLIDE_SUFFIXES):
        return None
    return read_slide


def read_slide(path: str | list[str]):
    from ..io.slide import open_slide

    path = _one_path(path)
    return [slide_layer_data(open_slide(path))]


def _looks_like_spots(path: Path) -> bool:
    if path.is_dir():
        return (
            (path / "spatial").is_dir() or path.name == "spatial" or any(path.glob("tissue_positions*.csv"))
        )
    name = path.name.lower()
    if name.endswith((".h5ad", "_selection.tsv", ".tsv.gz")):
        return True
    if name.endswith(".csv"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = [c.strip().lower() for c in fh.readline().split(",")]
        return {"x", "y"} <= set(header) or name.startswith("tissue_positions")
    return False


def get_spots_reader(path: str | list[str]):
    """Return a reader for spot coordinates (Space Ranger folder, legacy ST, HEST .h5ad, CSV), or None."""
    path = _one_path(path)
    if path is None or not os.path.exists(path) or not _looks_like_spots(Path(path)):
        return None
    return read_spots_layer


def read_spots_layer(path: str | list[str]):
    from ..io.spots import read_spots

    path = _one_path(path)
    spots = read_spots(path)
    return [spots_layer_data(spots, name=f"{Path(path).stem} spots", slide_path=None)]
