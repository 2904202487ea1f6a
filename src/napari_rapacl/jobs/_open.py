"""Opening a slide and its spots, placed together (one pixel size, spots checked to lie on it)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import Progress

if TYPE_CHECKING:
    from ..io.slide import Slide
    from ..io.spots import Spots


@dataclass
class Opened:
    """A slide and (optionally) its spots, in one pixel size.

    ``name`` names the slide for people (layer names, AnnData library ids); ``library_id`` is the
    spots' library (the spot file's name, or the her2st section)."""

    slide: Slide
    spots: Spots | None
    name: str
    library_id: str | None = None
    #: messages for people about the inputs (e.g. spots that do not fit the slide), shown before any work
    warnings: tuple[str, ...] = ()


def spots_library_id(path: str | Path) -> str:
    """A library id from a spot file or Space Ranger folder name (``C2_selection.tsv`` -> ``C2``)."""
    path = Path(path)
    name = path.name
    if name.endswith("_selection.tsv"):
        return name[: -len("_selection.tsv")]
    # Space Ranger's fixed names say nothing about the sample: take the folder above them
    generic = {"outs", "spatial", "tissue_positions", "tissue_positions_list", "binned_outputs"}
    stem = path.stem if path.suffix else name
    parent = path.resolve().parent
    while stem.lower() in generic and parent.name:
        stem, parent = parent.name, parent.parent
    return stem


def open_inputs(
    slide_path: str | Path,
    spots_path: str | Path | None = None,
    *,
    mpp: float | None = None,
    radius: float | None = None,
) -> Opened:
    """Open a slide lazily and, optionally, its spots, placed together with
    :func:`napari_rapacl.io.place_spots`: ``mpp`` (um per level-0 px) overrides the slide's metadata,
    else the slide's own, else the spots' (Visium scale factors, ST array pitch); spots whose centres
    lie outside the slide raise an error naming both files; spots that fall mostly on glass give a
    warning in ``Opened.warnings`` (:func:`~napari_rapacl.jobs._checks.spot_fit`)."""
    from ..io import open_slide, place_spots, read_spots
    from ._checks import spot_fit

    slide = open_slide(slide_path, mpp=mpp)
    spots = None
    library_id = None
    warnings: tuple[str, ...] = ()
    if spots_path is not None:
        spots = read_spots(spots_path, radius=radius)
        slide = place_spots(slide, spots)
        library_id = spots_library_id(spots_path)
        fit = spot_fit(slide, spots)
        warnings = (fit.warning,) if fit.warning else ()
    name = slide.path.stem if slide.path is not None else "slide"
    return Opened(slide, spots, name, library_id, warnings)


def iter_open(
    slide_path: str | Path,
    spots_path: str | Path | None = None,
    *,
    mpp: float | None = None,
    radius: float | None = None,
) -> Generator[Progress, None, Opened]:
    """:func:`open_inputs` as a job (the viewer runs it in a worker thread)."""
    yield Progress("open", 0, 1)
    opened = open_inputs(slide_path, spots_path, mpp=mpp, radius=radius)
    yield Progress("open", 1, 1)
    return opened


def iter_open_sample(section: str) -> Generator[Progress, None, Opened]:
    """The her2st ``section`` (slide and spots, with counts), from the local mirror or the cache
    (downloaded once, with a checksum, when neither has it)."""
    from ..datasets import her2st

    yield Progress("open sample", 0, 1)
    sec = her2st(section)
    yield Progress("open sample", 1, 1)
    return Opened(sec.slide, sec.spots, f"her2st {sec.name}", sec.name)


#: where a slide's pixel size came from, for people
MPP_SOURCE_TEXT = {
    "metadata": "from the file",
    "caller": "typed",
    "spot-grid": "from the spot grid",
    "layer-scale": "from the layer's scale",
}


def pixel_size_text(slide: Slide) -> str:
    """``"0.7351 µm/px (from the spot grid)"`` or ``"pixel size unknown"``."""
    if slide.mpp is None:
        return "pixel size unknown"
    source = MPP_SOURCE_TEXT.get(slide.mpp_source, slide.mpp_source)
    return f"{slide.mpp:.4g} µm/px ({source})"


def missing_pixel_size(slide: Slide, *, field: str = "um / px") -> str | None:
    """None when ``slide`` has a pixel size; else what to tell people (JPEG/PNG carry none): the file,
    why it matters and the two ways to give it (``field``: the name of the input, e.g. ``"--mpp"``)."""
    if slide.mpp is not None:
        return None
    name = slide.path.name if slide.path is not None else "this slide"
    return (
        f"{name} carries no pixel size: without it nuclei, spots and scale bars cannot be in µm. "
        f"Give its {field} (about 0.25 for a 40x scan, 0.5 for 20x), or open it with its spot file, "
        "which gives the pixel size."
    )
