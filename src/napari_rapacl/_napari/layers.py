"""Slides and spots as napari layer-data tuples (Qt-free, so it is testable without a viewer).

Conventions shared by every layer this plugin makes:

* layer ``data`` is in level-0 pixels, (row, col) order, and ``scale = (mpp, mpp)`` puts every layer in
  microns (``units = "um"``), so spots, cells and dense maps line up with the slide whatever the
  pyramid level on screen;
* ``metadata["napari_rapacl"]`` carries what is needed to go back to our own types: the slide path and
  its mpp, the library id, the predicted gene names and the provenance of the prediction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ..io.slide import Slide
    from ..io.spots import Spots

META_KEY = "napari_rapacl"
#: feature columns that describe a spot rather than a predicted gene
SPOT_COLUMNS = ("barcode", "radius_px")


def _scale(mpp: float | None) -> tuple[tuple[float, float], tuple[str, str] | None]:
    if mpp:
        return (float(mpp), float(mpp)), ("um", "um")
    return (1.0, 1.0), None


def slide_layer_data(slide: Slide, name: str | None = None) -> tuple[list, dict[str, Any], str]:
    """A multiscale RGB Image layer for ``slide`` (lazy: napari reads only the visible tiles)."""
    scale, units = _scale(slide.mpp)
    kwargs: dict[str, Any] = {
        "name": name or (slide.path.stem if slide.path else "slide"),
        "rgb": True,
        "multiscale": len(slide.levels) > 1,
        "contrast_limits": (0, 255),  # avoids computing them from the data
        "scale": scale,
        "metadata": {
            META_KEY: {
                "kind": "slide",
                "path": str(slide.path) if slide.path else None,
                "mpp": slide.mpp,
                "mpp_source": slide.mpp_source,
                "downsamples": list(slide.downsamples),
            }
        },
    }
    if units:
        kwargs["units"] = units
    data = list(slide.levels) if len(slide.levels) > 1 else slide.levels[0]
    return data, kwargs, "image"


def slide_from_layer(layer) -> Slide:
    """Rebuild our :class:`Slide` from an Image layer made by :func:`slide_layer_data`
    (or any RGB image layer; its scale is then taken as microns per pixel if it is not 1)."""
    from ..io.slide import Slide

    meta = layer.metadata.get(META_KEY, {})
    levels = tuple(layer.data) if layer.multiscale else (layer.data,)
    import dask.array as da

    levels = tuple(lvl if isinstance(lvl, da.Array) else da.asarray(lvl) for lvl in levels)
    width0 = levels[0].shape[1]
    downsamples = tuple(width0 / lvl.shape[1] for lvl in levels)
    mpp = meta.get("mpp")
    source = meta.get("mpp_source", "unknown")
    if mpp is None and float(layer.scale[-1]) != 1.0:
        mpp, source = float(layer.scale[-1]), "layer-scale"
    path = meta.get("path")
    from pathlib import Path

    return Slide(
        levels=levels,
        downsamples=downsamples,
        mpp=mpp,
        mpp_source=source if mpp else "unknown",
        path=Path(path) if path else None,
    )


def spots_features(
    spots: Spots, values: np.ndarray | None = None, genes: list[str] | None = None
) -> pd.DataFrame:
    """The Points ``features`` table: barcode, radius and one column per predicted gene."""
    columns: dict[str, Any] = {
        "barcode": np.asarray(spots.barcode, dtype=str),
        "radius_px": np.asarray(spots.radius, dtype=float),
    }
    frame = pd.DataFrame(columns)
    if values is not None:
        genes = list(genes or [])
        if values.shape != (len(spots), len(genes)):
            raise ValueError(f"values {values.shape} do not match {len(spots)} spots x {len(genes)} genes")
        frame = pd.concat([frame, pd.DataFrame(values.astype(np.float32), columns=genes)], axis=1)
    return frame


def spots_layer_data(
    spots: Spots,
    *,
    mpp: float | None = None,
    name: str = "spots",
    values: np.ndarray | None = None,
    genes: list[str] | None = None,
    color_by: str | None = None,
    colormap: str = "viridis",
    library_id: str | None = None,
    slide_path: str | None = None,
    provenance: dict | None = None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A Points layer of spots: size = spot diameter, features = barcode, radius and predicted genes.

    With ``color_by`` (a gene in ``genes``) the faces are coloured by that feature column.
    """
    mpp = mpp if mpp is not None else spots.mpp
    scale, units = _scale(mpp)
    features = spots_features(spots, values, genes)
    kwargs: dict[str, Any] = {
        "name": name,
        "features": features,
        "size": 2.0 * np.asarray(spots.radius, dtype=float),
        "scale": scale,
        "border_width": 0.05,
        "border_color": "white",
        "opacity": 0.9,
        "metadata": {
            META_KEY: {
                "kind": "spots",
                "mpp": mpp,
                "library_id": library_id or name,
                "genes": list(genes or []),
                "slide_path": slide_path,
                "source": str(spots.source) if spots.source else None,
                "provenance": provenance or {},
            }
        },
    }
    if units:
        kwargs["units"] = units
    if color_by is not None:
        kwargs.update(color_kwargs(features, color_by, colormap))
    else:
        kwargs["face_color"] = "transparent"
        kwargs["border_color"] = "yellow"
    data = np.column_stack([spots.y, spots.x]).astype(np.float64)
    return data, kwargs, "points"


def color_kwargs(features: pd.DataFrame, gene: str, colormap: str = "viridis") -> dict[str, Any]:
    """Points keyword arguments that colour faces by the ``gene`` feature column."""
    if gene not in features.columns:
        raise KeyError(f"gene {gene!r} is not among the spots' features ({len(features.columns)} columns)")
    values = features[gene].to_numpy(dtype=float)
    lo, hi = np.nanpercentile(values, [1, 99]) if values.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1e-6
    return {
        "face_color": gene,
        "face_colormap": colormap,
        "face_contrast_limits": (float(lo), float(hi)),
    }


def spots_from_layer_data(data: np.ndarray, features: pd.DataFrame, mpp: float | None = None) -> Spots:
    """Back from a Points layer (data in level-0 px, (row, col)) to :class:`Spots`."""
    from ..io.spots import Spots

    n = len(data)
    barcode = (
        features["barcode"].astype(str).to_numpy()
        if "barcode" in features
        else np.array([f"spot_{i}" for i in range(n)])
    )
    radius = features["radius_px"].to_numpy(dtype=float) if "radius_px" in features else np.full(n, np.nan)
    return Spots(
        barcode=barcode,
        x=np.asarray(data[:, 1], dtype=np.float64),
        y=np.asarray(data[:, 0], dtype=np.float64),
        radius=radius,
        mpp=mpp,
    )
