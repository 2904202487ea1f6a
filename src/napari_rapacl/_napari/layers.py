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
    from ..jobs import Opened

META_KEY = "napari_rapacl"
#: feature columns that describe a spot rather than a predicted gene
SPOT_COLUMNS = ("barcode", "radius_px")
#: the unit of predicted (and measured) expression: ln(1 + 10^4 x / library size)
EXPRESSION_UNIT = "log1p(CP10k)"
#: fill opacity of spots (the tissue shows through); the Gene widget lets the user change it
SPOT_OPACITY = 0.6
#: outline width of spots, relative to their diameter (thin)
SPOT_BORDER = 0.04
#: outline of spots that have no value yet (hollow grey rings), and its width relative to the diameter:
#: thicker than a coloured spot's, so that the rings stay visible at whole-slide zoom (a 100 um spot is
#: ~10 screen px across there: 0.04 of it is under a pixel)
NOT_PREDICTED_EDGE = "#b4b4b4"
NOT_PREDICTED_BORDER = 0.12
#: outline of coloured spots, chosen outside each colormap (viridis ends in yellow, magma in white)
EDGE_COLOURS = {
    "viridis": "white",
    "plasma": "white",
    "turbo": "white",
    "magma": "black",
    "inferno": "black",
    "gray": "#ff3b30",
}


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
        "border_width": SPOT_BORDER,
        "border_color": EDGE_COLOURS.get(colormap, "white"),
        "opacity": SPOT_OPACITY,
        "metadata": {
            META_KEY: {
                "kind": "spots",
                "mpp": mpp,
                "library_id": library_id or name,
                "base_name": name,
                "genes": list(genes or []),
                "slide_path": slide_path,
                "source": str(spots.source) if spots.source else None,
                "provenance": provenance or {},
                # raw counts of the spots (her2st, Visium), rows in the layer's order: the Gene widget
                # shows the measured expression beside the predicted one and export writes both
                "counts": getattr(spots, "counts", None),
            }
        },
    }
    if units:
        kwargs["units"] = units
    if color_by is not None:
        kwargs.update(color_kwargs(features, color_by, colormap))
    else:
        kwargs["face_color"] = "transparent"
        kwargs["border_color"] = NOT_PREDICTED_EDGE
        kwargs["border_width"] = NOT_PREDICTED_BORDER
    data = np.column_stack([spots.y, spots.x]).astype(np.float64)
    return data, kwargs, "points"


def opened_layer_data(opened: Opened, *, translate: tuple[float, float] | None = None) -> list[tuple]:
    """Layer-data tuples of a slide and its spots opened together (:class:`~napari_rapacl.jobs.Opened`):
    a multiscale Image in um and, when there are spots, a Points layer on it.

    Layers are named for people by the section: the her2st sample's own name (``her2st C4``), else the
    spots' library id (``C4`` from ``C4_selection.tsv``, a Space Ranger folder's name) when the spots
    fit the slide, else the slide file's stem; the spots layer is ``"<name> spots"``. ``translate``
    (world units, (y, x)) moves both layers, e.g. beside a slide already open."""
    name = opened.name
    # spots that do not fit (warnings) would name the slide after another section
    fits = opened.spots is not None and not opened.warnings
    if not name.startswith("her2st ") and fits and opened.library_id:
        name = str(opened.library_id)
    layers = [slide_layer_data(opened.slide, name=name)]
    if opened.spots is not None:
        layers.append(
            spots_layer_data(
                opened.spots,
                mpp=opened.slide.mpp,
                name=f"{name} spots",
                library_id=opened.library_id or opened.name,
                slide_path=str(opened.slide.path) if opened.slide.path else None,
            )
        )
    if translate is not None:
        for _, kwargs, _ in layers:
            kwargs["translate"] = (float(translate[0]), float(translate[1]))
    return layers


def radiomics_columns(meta: dict) -> list[str]:
    """The spot-radiomics columns a spots layer's features hold (Cells widget, RaPaCL-ST prediction)."""
    info = meta.get("metadata", {}).get(META_KEY, {})
    return [c for c in info.get("radiomics_columns") or [] if c in meta["features"].columns]


def export_arguments(data: np.ndarray, meta: dict, *, rows: np.ndarray | None = None) -> dict[str, Any]:
    """The arguments of :func:`napari_rapacl.jobs.prediction_adata` for a spots layer's predictions
    (``meta``: the layer's ``features``, ``metadata`` and ``name``): its predicted genes at the spots
    that have a value for every gene (within ``rows`` when given), their spot radiomics when every one
    of those spots has them, the slide's path for the images, the library id and the provenance.

    Raises ValueError when the layer holds no prediction (in the chosen rows).
    """
    from ..jobs import predicted_rows

    info = meta.get("metadata", {}).get(META_KEY, {})
    features = meta["features"]
    genes = [g for g in info.get("genes", []) if g in features.columns]
    if not genes:
        raise ValueError(f"layer {meta.get('name')!r} holds no predicted genes yet: run Predict on it first")
    ready = predicted_rows(features, genes)
    rows = ready if rows is None else np.intersect1d(np.asarray(rows, dtype=np.int64), ready)
    if len(rows) == 0:
        raise ValueError(
            f"layer {meta.get('name')!r}: none of the chosen spots has been predicted yet: "
            "run Predict on them first"
        )
    spots = spots_from_layer_data(np.asarray(data), features, info.get("mpp")).subset(rows)
    radiomics = None
    cols = radiomics_columns(meta)
    if cols:
        frame = features[cols].iloc[rows].reset_index(drop=True)
        if np.isfinite(frame.to_numpy(dtype=np.float64)).all():
            radiomics = frame
    args = {
        "values": features[genes].to_numpy(dtype=np.float32)[rows],
        "genes": genes,
        "spots": spots,
        "slide": info.get("slide_path"),
        "mpp": info.get("mpp"),
        "library_id": str(info.get("library_id") or meta.get("name") or "sample"),
        "provenance": dict(info.get("provenance") or {}),
        "radiomics": radiomics,
    }
    # what the job's builder accepts of the rest: the genes' validation r (checkpoint) and the
    # measured log1p(CP10k) of the same spots and genes (spots with counts)
    extra: dict[str, Any] = {}
    if info.get("gene_reliability"):
        extra["gene_reliability"] = {g: float(r) for g, r in info["gene_reliability"].items() if g in genes}
    counts = info.get("counts")
    # only when the counts hold every gene (an absent gene would read as measured zeros)
    measured = measured_expression(counts, genes) if set(genes) <= measured_genes(counts) else None
    if measured is not None:
        extra["measured"] = {"measured": measured[rows]}
    args.update(_accepted(extra))
    return args


def _accepted(extra: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``extra`` that :func:`napari_rapacl.jobs.prediction_adata` takes."""
    import inspect

    from ..jobs import prediction_adata

    params = inspect.signature(prediction_adata).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return extra
    return {k: v for k, v in extra.items() if k in params}


def measured_expression(counts, genes: list[str]) -> np.ndarray | None:
    """The measured log1p(CP10k) of ``genes`` (spots x genes, float32; zeros for genes absent from the
    counts) from a spots layer's raw ``counts`` (AnnData, rows in the layer's order), or None."""
    if counts is None or not genes:
        return None
    import warnings

    from ..preprocess import normalize_log1p_cp10k

    with warnings.catch_warnings():  # absent genes are zeros, said elsewhere (measured_genes)
        warnings.simplefilter("ignore")
        return np.asarray(normalize_log1p_cp10k(counts, list(genes), missing="zero"), dtype=np.float32)


def measured_genes(counts) -> set[str]:
    """The gene names a spots layer's raw ``counts`` hold (empty without counts)."""
    if counts is None:
        return set()
    return {str(g) for g in counts.var_names}


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


# --------------------------------------------------------------------------------------------
# regions: what is on screen, what a Shapes ROI covers (level-0 px boxes)
# --------------------------------------------------------------------------------------------
#: a half-open box ``(x0, y0, x1, y1)`` in level-0 pixels (x = column, y = row)
Box = tuple[int, int, int, int]


def level0_shape(layer) -> tuple[int, int]:
    """``(height, width)`` of an Image layer's level 0 (its data's first two axes; RGB excluded)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return int(data.shape[0]), int(data.shape[1])


def clip_box(box, shape: tuple[int, int] | None) -> Box:
    """``box`` rounded outwards to whole pixels and clipped to a slide of ``shape = (h, w)`` (with
    ``shape=None`` only to the slide's origin).

    Raises ``ValueError`` when nothing of the box is left.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    cx1, cy1 = int(np.ceil(x1)), int(np.ceil(y1))
    if shape is not None:
        cx1, cy1 = min(int(shape[1]), cx1), min(int(shape[0]), cy1)
    if cx1 <= cx0 or cy1 <= cy0:
        size = f" ({int(shape[1])} x {int(shape[0])} px)" if shape is not None else ""
        raise ValueError(f"the region {tuple(float(v) for v in box)} does not overlap the slide{size}")
    return cx0, cy0, cx1, cy1


def view_rect(center, zoom: float, canvas_size) -> np.ndarray:
    """The world rectangle ``[[ymin, xmin], [ymax, xmax]]`` a 2-D camera shows: ``center`` (last two
    values = y, x), ``zoom`` (canvas px per world unit) and ``canvas_size = (height, width)`` in px
    (the camera's ``center`` and ``zoom``, ``viewer.canvas.size``)."""
    c = np.asarray(center, dtype=float)[-2:]
    half = np.asarray(canvas_size, dtype=float)[-2:] / float(zoom) / 2.0
    return np.stack([c - half, c + half])


def visible_box(layer, shape: tuple[int, int] | None = None, view=None) -> Box:
    """The part of an Image layer on screen, as a level-0 px box ``(x0, y0, x1, y1)`` clipped to the
    slide (``shape``, default the layer's level-0 shape).

    Without ``view`` it comes from napari's ``layer.corner_pixels``: the first and last data index
    (inclusive) on the displayed axes at the current ``layer.data_level``, scaled by that level's
    ``downsample_factors`` to level 0. napari >= 0.9 widens these corners to whole data chunks, does not
    shrink them when zooming in, and updates them only when the canvas draws, so they bound what napari
    has loaded rather than what is seen. With ``view`` (the camera's world rectangle, :func:`view_rect`;
    always current) the box is the camera's rectangle mapped to level-0 px through the layer's scale and
    translate.
    """
    if view is not None:
        rc = _world_to_level0(np.asarray(view, dtype=float)[:, -2:], layer)
        (vy0, vx0), (vy1, vx1) = rc.min(axis=0), rc.max(axis=0)
        return clip_box((vx0, vy0, vx1, vy1), shape or level0_shape(layer))
    corners = np.asarray(layer.corner_pixels, dtype=float)
    if corners.shape[0] != 2 or corners.shape[1] < 2:
        raise ValueError(f"unexpected corner_pixels {corners.tolist()} of layer {layer.name!r}")
    if getattr(layer, "multiscale", False):
        ds = np.asarray(layer.downsample_factors[layer.data_level], dtype=float)[-2:]
    else:
        ds = np.ones(2)
    (r0, c0), (r1, c1) = corners[0, -2:], corners[1, -2:]
    box = (c0 * ds[1], r0 * ds[0], (c1 + 1) * ds[1], (r1 + 1) * ds[0])
    return clip_box(box, shape or level0_shape(layer))


def _world_to_level0(points_world: np.ndarray, image) -> np.ndarray:
    """World (um) -> level-0 px of ``image``: undo its translate and scale (last two axes)."""
    scale = np.asarray(image.scale, dtype=float)[-2:]
    translate = np.asarray(image.translate, dtype=float)[-2:]
    return (points_world - translate) / scale


def shapes_box(shapes, image, shape: tuple[int, int] | None = None) -> Box:
    """Level-0 px box of a Shapes ROI over ``image``: the bounding box of the selected shapes.

    With nothing selected, a layer holding exactly one shape uses it. The shapes' vertices (data
    coordinates of the Shapes layer) go to world coordinates with the Shapes layer's scale and
    translate, then to level-0 px with ``image``'s (``scale = (mpp, mpp)``), so a ROI drawn on a layer
    of another scale still lands on the right pixels. ``image`` may also be a spots (Points) layer,
    whose data are level-0 px too. The box is clipped to ``shape`` (default: the image's level 0;
    for a non-image reference only to the origin).
    """
    n = len(shapes.data)
    if n == 0:
        raise ValueError(f"the Shapes layer {shapes.name!r} holds no shape: draw a rectangle or polygon")
    picked = sorted(int(i) for i in shapes.selected_data)
    if not picked:
        if n != 1:
            raise ValueError(
                f"the Shapes layer {shapes.name!r} holds {n} shapes: select the one to use as ROI"
            )
        picked = [0]
    verts = np.concatenate([np.asarray(shapes.data[i], dtype=float)[:, -2:] for i in picked])
    world = (
        verts * np.asarray(shapes.scale, dtype=float)[-2:] + np.asarray(shapes.translate, dtype=float)[-2:]
    )
    rc = _world_to_level0(world, image)
    box = (rc[:, 1].min(), rc[:, 0].min(), rc[:, 1].max(), rc[:, 0].max())
    if shape is None and hasattr(image, "rgb"):  # an Image layer: clip to its level 0
        shape = level0_shape(image)
    return clip_box(box, shape)


def box_um(box, mpp: float | None) -> str:
    """A level-0 px box as people read it: ``"1,234 x 987 µm at (2,000, 3,100) µm"`` (rounded; in px
    when the pixel size is unknown)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if mpp:
        s = float(mpp)
        return f"{(x1 - x0) * s:,.0f} x {(y1 - y0) * s:,.0f} µm at ({x0 * s:,.0f}, {y0 * s:,.0f}) µm"
    return f"{x1 - x0:,.0f} x {y1 - y0:,.0f} px at ({x0:,.0f}, {y0:,.0f}) px"


def spots_in_box(data: np.ndarray, box) -> np.ndarray:
    """Row indices of Points ``data`` (level-0 px, (row, col)) whose centre lies in the half-open box."""
    x0, y0, x1, y1 = box
    y, x = np.asarray(data, dtype=float)[:, -2], np.asarray(data, dtype=float)[:, -1]
    return np.flatnonzero((x >= x0) & (x < x1) & (y >= y0) & (y < y1))


# --------------------------------------------------------------------------------------------
# results as layers / features
# --------------------------------------------------------------------------------------------
def merge_columns(
    features: pd.DataFrame, rows: np.ndarray, values: np.ndarray, columns: list[str], *, reset: bool = False
) -> pd.DataFrame:
    """A copy of ``features`` with ``values`` (``(len(rows), len(columns))``) written at ``rows``.

    Missing columns are created as float32 NaN (spots not computed yet); with ``reset`` existing
    ones are cleared to NaN first (e.g. when the model changed). Other columns are kept as they are.
    """
    values = np.asarray(values)
    rows = np.asarray(rows, dtype=np.int64)
    if values.shape != (len(rows), len(columns)):
        raise ValueError(f"values {values.shape} do not match {len(rows)} rows x {len(columns)} columns")
    n = len(features)
    kept = features.drop(columns=[c for c in columns if c in features.columns and reset])
    block = np.full((n, len(columns)), np.nan, dtype=np.float32)
    present = [i for i, c in enumerate(columns) if c in kept.columns]
    if present:
        block[:, present] = kept[[columns[i] for i in present]].to_numpy(dtype=np.float32)
    block[rows] = values
    rest = kept.drop(columns=[c for c in columns if c in kept.columns])
    new = pd.DataFrame(block, columns=list(columns), index=features.index)
    return pd.concat([rest, new], axis=1)


def labels_layer_data(
    labels,
    box: Box,
    mpp: float | None,
    *,
    name: str = "nuclei",
    features: pd.DataFrame | None = None,
    metadata: dict | None = None,
) -> tuple[Any, dict[str, Any], str]:
    """A Labels layer of a region's nuclei placed on the slide: data in level-0 px of the region,
    ``scale = (mpp, mpp)`` and ``translate`` = the region's top-left corner in um."""
    scale, units = _scale(mpp)
    x0, y0 = box[0], box[1]
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": scale,
        "translate": (y0 * scale[0], x0 * scale[1]),
        "opacity": 0.6,
        "metadata": {META_KEY: {"kind": "nuclei", "mpp": mpp, "box": list(box), **(metadata or {})}},
    }
    if units:
        kwargs["units"] = units
    if features is not None:
        kwargs["features"] = features
    return labels, kwargs, "labels"


def dense_layer_data(
    values: np.ndarray,
    translate_px,
    px_size: float,
    mpp: float | None,
    *,
    gene: str,
    colormap: str = "viridis",
    contrast_limits: tuple[float, float] | None = None,
    metadata: dict | None = None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A single-gene dense map as an Image layer on the slide.

    ``values`` ``(H, W)``; ``translate_px = (y0, x0)`` is where the centre of map pixel ``(0, 0)`` lies in
    level-0 px with napari's convention (level-0 pixel ``p`` centred on ``p``, as
    :class:`napari_rapacl.tiled.DenseMap` gives it) and ``px_size`` the level-0 px per map pixel, so the
    layer's ``scale`` is ``px_size * mpp`` and its ``translate`` ``translate_px * mpp`` (um).
    """
    (sy, sx), units = _scale(mpp)
    y0, x0 = (float(v) for v in translate_px)
    s = float(px_size)
    values = np.asarray(values, dtype=np.float32)
    if contrast_limits is None:
        contrast_limits = robust_limits(values)
    kwargs: dict[str, Any] = {
        "name": f"{gene} (dense)",
        "scale": (s * sy, s * sx),
        "translate": (y0 * sy, x0 * sx),
        "colormap": colormap,
        "contrast_limits": contrast_limits,
        "blending": "translucent",
        "opacity": 0.7,
        "metadata": {
            META_KEY: {
                "kind": "dense",
                "gene": gene,
                "mpp": mpp,
                "translate_px": [y0, x0],
                "px_size": s,
                **(metadata or {}),
            }
        },
    }
    if units:
        kwargs["units"] = units
    return values, kwargs, "image"


def robust_limits(values, q: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Contrast limits from the ``q`` percentiles of the finite values (a non-empty range)."""
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(arr, q))
    if not hi > lo:
        hi = lo + max(abs(lo) * 1e-3, 1e-6)
    return lo, hi
