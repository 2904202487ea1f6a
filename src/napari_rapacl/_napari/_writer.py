"""npe2 writer: a spots layer with predicted genes -> AnnData ``.h5ad`` (scanpy/squidpy layout)."""

from __future__ import annotations

from typing import Any


def write_spots_h5ad(path: str, data: Any, meta: dict) -> list[str]:
    """Write the layer's predicted spots and genes (``metadata['napari_rapacl']['genes']``) to ``path``.

    Spots not predicted yet (NaN, e.g. outside the regions predicted so far) are left out. The slide
    named in the layer metadata (when it still exists) provides the hires/lowres images that scanpy's
    and squidpy's spatial plots draw under the spots. The file is written atomically.
    """
    from ..export import write_h5ad
    from ..jobs import prediction_adata
    from .layers import export_arguments

    try:
        args = export_arguments(data, meta)
    except ValueError as exc:
        raise ValueError(f"cannot write {path}: {exc}") from exc
    values, genes, spots = args.pop("values"), args.pop("genes"), args.pop("spots")
    return [str(write_h5ad(prediction_adata(values, genes, spots, **args), path))]
