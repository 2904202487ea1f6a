"""npe2 readers: slides as multiscale images, spot files as Points layers.

napari 0.9 gives a file to the reader the user's preference names (``settings.plugins.extension2reader``,
a filename pattern -> plugin) and otherwise, when several plugins match (napari's builtin reader
matches every image), asks which one. :func:`prefer_plugin_readers` makes this plugin's reader the
default for slide files the user has not assigned: the panel and the *Open* widget call it, so
after the plugin is used once, *File > Open* and drag-and-drop of a slide give the multiscale µm
pyramid. A user's own choice (made in napari's dialog or *Preferences > Plugins*) is never changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .layers import META_KEY, slide_layer_data, spots_layer_data

log = logging.getLogger(__name__)

PLUGIN_NAME = "napari-rapacl"
#: the slide files this plugin reads (the manifest's filename patterns say the same)
SLIDE_PATTERNS = (
    "*.svs",
    "*.ndpi",
    "*.tif",
    "*.tiff",
    "*.ome.tif",
    "*.ome.tiff",
    "*.jpg",
    "*.jpeg",
    "*.png",
)
SLIDE_SUFFIXES = tuple(p[1:] for p in SLIDE_PATTERNS)
#: what napari matches (case-sensitively on Linux): scanners often write ``.SVS`` / ``.JPG``
SLIDE_PATTERNS_ANY_CASE = SLIDE_PATTERNS + tuple(p.upper() for p in SLIDE_PATTERNS)

#: ``ask_pixel_size(question) -> float | None``: asked when a slide without a pixel size is opened
#: through napari's *File > Open*; None (the default) shows a number dialog in a running viewer (never
#: under pytest or with ``NAPARI_RAPACL_NO_DIALOGS=1``). Tests replace it.
ask_pixel_size: Callable[[str], float | None] | None = None


def prefer_plugin_readers(settings=None) -> list[str]:
    """Make this plugin napari's reader for the slide patterns the user has not assigned to a reader
    (``settings``: napari's settings, default ``napari.settings.get_settings()``). Returns the
    patterns it assigned (empty when every one was already assigned)."""
    if settings is None:
        from napari.settings import get_settings

        settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    added = [p for p in SLIDE_PATTERNS_ANY_CASE if p not in current]
    if added:
        settings.plugins.extension2reader = {**current, **dict.fromkeys(added, PLUGIN_NAME)}
        log.info("napari-rapacl now opens %s by default (Preferences > Plugins to change)", ", ".join(added))
    return added


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


def _dialog_pixel_size(question: str) -> float | None:
    if os.environ.get("PYTEST_CURRENT_TEST") or os.environ.get("NAPARI_RAPACL_NO_DIALOGS"):
        return None
    try:
        from qtpy.QtWidgets import QApplication, QInputDialog
    except Exception:  # no Qt: nobody to ask
        return None
    app = QApplication.instance()
    if app is None or not any(w.isVisible() for w in app.topLevelWidgets()):
        return None
    value, ok = QInputDialog.getDouble(app.activeWindow(), "Pixel size", question, 0.5, 0.05, 50.0, 4)
    return float(value) if ok else None


def read_slide(path: str | list[str]):
    """A slide as a multiscale Image layer in µm; a slide without a pixel size (JPEG/PNG) asks for one
    (:data:`ask_pixel_size`) and, without an answer, opens in pixels with a warning saying how to
    give it."""
    from ..io.slide import open_slide
    from ..jobs._open import missing_pixel_size

    path = _one_path(path)
    slide = open_slide(path)
    question = missing_pixel_size(slide, field="µm / px")
    if question is not None:
        ask = ask_pixel_size or _dialog_pixel_size
        value = ask(question)
        if value:
            slide = slide.with_mpp(float(value), "caller")
        else:
            _warn(
                f"{slide.path.name} opened in pixels (no pixel size): open it in the RaPaCL panel's "
                "'Open slide and spots' with its spot file, or type its µm / px there"
            )
    return [slide_layer_data(slide)]


def _warn(text: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(text)
    except Exception:
        log.warning(text)


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


# --------------------------------------------------------------------------------------------
# SpatialData written by napari-rapacl (``predict --out x.zarr``)
# --------------------------------------------------------------------------------------------
def _zarr_attrs(group: Path) -> dict:
    """A zarr group's attributes (zarr v3 ``zarr.json`` or v2 ``.zattrs``); {} when unreadable."""
    import json

    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        file = group / name
        if file.is_file():
            try:
                meta = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            meta = meta.get(key, {}) if key else meta
            return meta if isinstance(meta, dict) else {}
    return {}


def _is_group(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def is_rapacl_spatialdata(path: str | Path) -> bool:
    """Whether ``path`` is a SpatialData store written by napari-rapacl: a folder whose root zarr
    attributes carry ``spatialdata_attrs`` and whose spot table (``tables/spots``) holds our provenance
    (``uns/napari_rapacl``). Cheap: a few small JSON files, no array read, spatialdata not imported."""
    from ..export import PROVENANCE_KEY
    from ..export_spatialdata import SPOTS_TABLE

    path = Path(path)
    if not path.is_dir() or "spatialdata_attrs" not in _zarr_attrs(path):
        return False
    return _is_group(path / "tables" / SPOTS_TABLE / "uns" / PROVENANCE_KEY)


def get_spatialdata_reader(path: str | list[str]):
    """Return a reader for a napari-rapacl SpatialData ``.zarr`` folder; None for any other path (other
    SpatialData or OME-Zarr stores are left to their own readers, e.g. napari-spatialdata, ome-zarr)."""
    path = _one_path(path)
    if path is None or not is_rapacl_spatialdata(str(path).rstrip("/")):
        return None
    return read_spatialdata


def _image_levels(element: Path) -> list:
    """The levels of a multiscale ``(c, y, x)`` image element as lazy ``(y, x, c)`` dask arrays,
    largest first (the OME-NGFF ``multiscales`` datasets, else the ``s0``, ``s1``... arrays)."""
    import dask.array as da

    attrs = _zarr_attrs(element)
    multiscales = (attrs.get("ome") or attrs).get("multiscales") or []
    paths = [d["path"] for d in multiscales[0].get("datasets", [])] if multiscales else []
    if not paths:
        paths = sorted((p.name for p in element.iterdir() if p.name[1:].isdigit()), key=lambda n: int(n[1:]))
    levels = [da.from_zarr(str(element / p)) for p in paths]
    levels = [lvl.transpose(1, 2, 0) if lvl.ndim == 3 and lvl.shape[0] in (3, 4) else lvl for lvl in levels]
    return sorted(levels, key=lambda lvl: -int(lvl.shape[1]))


def read_spatialdata(path: str | list[str]):
    """Our SpatialData store as the layers a fresh prediction gives: the slide (its multiscale image
    in the store) as an RGB Image in µm, and the spots as a Points layer in µm with one feature column
    per predicted gene, coloured by the most reliable gene (the checkpoint's validation r, else the
    first gene), named and described (``metadata['napari_rapacl']``: genes, provenance, gene
    reliability, library id) as the Predict widget names and describes its own, so that the Genes and
    Export widgets work on it."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from ..export import PROVENANCE_KEY
    from ..export_spatialdata import SPOTS_TABLE, _element_name, _library_id
    from ..io.slide import Slide
    from ..io.spots import Spots
    from ..jobs._export import RADIOMICS_KEY, RELIABILITY_KEY
    from ._genes import most_reliable
    from .layers import EXPRESSION_UNIT, color_kwargs

    path = Path(_one_path(path))
    table = ad.read_zarr(path / "tables" / SPOTS_TABLE)
    lib = _library_id(table)
    prov = dict(table.uns.get(PROVENANCE_KEY) or {})
    scalefactors = (table.uns.get("spatial") or {}).get(lib, {}).get("scalefactors", {})
    mpp = prov.get("mpp", scalefactors.get("microns_per_pixel"))
    mpp = float(mpp) if mpp is not None else None
    layers = []

    images = path / "images"
    wsi = images / _element_name(lib, "wsi")
    if not wsi.is_dir() and images.is_dir():  # a single image element under another name
        found = [p for p in images.iterdir() if _is_group(p)]
        wsi = found[0] if len(found) == 1 else wsi
    if wsi.is_dir():
        levels = _image_levels(wsi)
        width0 = int(levels[0].shape[1])
        slide = Slide(
            tuple(levels),
            tuple(width0 / int(lvl.shape[1]) for lvl in levels),
            mpp=mpp,
            mpp_source="file" if mpp else "unknown",
        )
        data, kwargs, kind = slide_layer_data(slide, name=lib)
        kwargs["metadata"][META_KEY]["source"] = str(path)  # the store the pixels come from
        layers.append((data, kwargs, kind))

    genes = [str(g) for g in table.var_names]
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    spots = Spots(
        barcode=np.asarray(table.obs_names, dtype=str),
        x=xy[:, 0],
        y=xy[:, 1],
        radius=np.asarray(table.obs["radius"], dtype=np.float64),
        mpp=mpp,
        source=path,
    )
    values = np.asarray(table.X, dtype=np.float32)
    reliability = None
    if RELIABILITY_KEY in table.var:
        r = table.var[RELIABILITY_KEY].to_numpy(dtype=np.float64)
        reliability = {g: float(v) for g, v in zip(genes, r, strict=True) if np.isfinite(v)} or None
    gene = most_reliable(genes, reliability) or genes[0]  # as the Predict widget opens a prediction
    source_image = (table.uns.get("spatial") or {}).get(lib, {}).get("metadata", {}).get("source_image_path")
    base = f"{lib} spots"
    data, kwargs, kind = spots_layer_data(
        spots,
        mpp=mpp,
        name=f"{lib} predicted: {gene}, {EXPRESSION_UNIT}",
        values=values,
        genes=genes,
        color_by=gene,
        library_id=lib,
        slide_path=source_image if source_image and Path(source_image).exists() else None,
        provenance={k: v for k, v in prov.items() if k != "genes"},
    )
    info = kwargs["metadata"][META_KEY]
    info.update(base_name=base, gene_reliability=reliability, source=str(path))
    if RADIOMICS_KEY in table.obsm:  # the spot radiomics that fed a RaPaCL-ST prediction
        frame = pd.DataFrame(table.obsm[RADIOMICS_KEY]).reset_index(drop=True)
        frame.columns = [str(c) for c in frame.columns]
        kwargs["features"] = pd.concat([kwargs["features"], frame.astype(np.float32)], axis=1)
        info["radiomics_columns"] = list(frame.columns)
        kwargs.update(color_kwargs(kwargs["features"], gene))
    layers.append((data, kwargs, kind))
    return layers
