"""npe2 writer: a spots layer with predicted genes -> AnnData ``.h5ad`` (scanpy/squidpy layout)."""

from __future__ import annotations

from typing import Any

from .layers import META_KEY, spots_from_layer_data


def write_spots_h5ad(path: str, data: Any, meta: dict) -> list[str]:
    """Write the layer's spots and predicted genes (``metadata['napari_rapacl']['genes']``) to ``path``.

    The slide named in the layer metadata (when it still exists) provides the hires/lowres images
    that scanpy's and squidpy's spatial plots draw under the spots.
    """
    import numpy as np

    from ..export import to_anndata, write_h5ad

    info = meta.get("metadata", {}).get(META_KEY, {})
    features = meta["features"]
    genes = [g for g in info.get("genes", []) if g in features.columns]
    if not genes:
        raise ValueError(
            f"cannot write {path}: layer {meta.get('name')!r} holds no predicted genes "
            "(run a prediction first; metadata['napari_rapacl']['genes'] is empty)"
        )
    spots = spots_from_layer_data(np.asarray(data), features, info.get("mpp"))
    slide = None
    if info.get("slide_path"):
        from pathlib import Path

        from ..io.slide import open_slide

        if Path(info["slide_path"]).exists():
            slide = open_slide(info["slide_path"], mpp=info.get("mpp"))
    adata = to_anndata(
        features[genes].to_numpy(dtype=np.float32),
        genes,
        spots,
        slide=slide,
        library_id=str(info.get("library_id") or meta.get("name") or "sample"),
        provenance=info.get("provenance") or None,
    )
    return [str(write_h5ad(adata, path))]
