"""Nucleus segmentation on H&E: a weight-free classical segmenter and cellpose, tiled over large regions.

Two segmenters share one entry point, :func:`segment_nuclei` (an RGB region in, an int32 label image
out, 0 = background, 1..n = nuclei): ``method="classical"`` (the offline default, no weights) and
``method="cellpose"`` (the real cellpose 3.x / 4.x API, local or offline-checked models). Large
regions of a lazy slide are segmented tile by tile and stitched by :func:`iter_segment_region` /
:func:`segment_region`.

The package's modules (import the public names from here):

``_api``
    :func:`segment_nuclei` and the input conventions.
``_common``
    Shared constants (:data:`SEGMENTATION_VERSION`, the versions reproduced
    :data:`SEGMENTATION_VERSIONS`, :data:`METHODS`, the default nucleus diameter and
    size filter) and small helpers.
``_stain``
    Haematoxylin optical density (:func:`haematoxylin`) and the tissue mask (:func:`tissue_mask`).
``_classical``
    The classical segmenter (histogram threshold, marker watershed); its docstring describes the
    algorithm.
``_cellpose``
    cellpose: model lookup (:func:`resolve_cellpose_model`), loading and cache
    (:func:`load_cellpose_model`), offline detection (:class:`CellposeModelUnavailableError`).
``_cellpose_train``
    The project's own cellpose nucleus model (:data:`PROJECT_NUCLEI_MODEL`), trained on TNBC patients
    01-08 with cellpose's training API (:func:`iter_train_nuclei_model`; ``python -m
    training.cellpose_nuclei``), and its sidecar of inference settings.
``_tiling``
    The tiled whole-slide path: a global threshold, overlapping tiles, stitching into zarr.

Label metrics (``match_labels``, ``nucleus_statistics``) are in :mod:`napari_rapacl.metrics`, the
synthetic H&E generator (``synthetic_he_nuclei``) in :mod:`napari_rapacl.testing`.
"""

from __future__ import annotations

from .._image import as_rgb_uint8
from ..progress import Progress
from ._api import segment_nuclei
from ._cellpose import (
    CellposeModelUnavailableError,
    cellpose_major_version,
    cellpose_model_choices,
    cellpose_model_settings,
    cellpose_models_dir,
    clear_cellpose_cache,
    load_cellpose_model,
    resolve_cellpose_model,
)
from ._cellpose_train import (
    PROJECT_NUCLEI_MODEL,
    iter_train_nuclei_model,
    project_nuclei_model_built,
    project_nuclei_model_path,
)
from ._classical import CLASSICAL_DEFAULTS, MIN_CONTRAST, MIN_THRESHOLD
from ._common import (
    DEFAULT_DIAMETER_UM,
    DEFAULT_MAX_AREA_UM2,
    DEFAULT_MIN_AREA_UM2,
    METHODS,
    SEGMENTATION_VERSION,
    SEGMENTATION_VERSIONS,
    Method,
)
from ._stain import TISSUE_OD, haematoxylin, tissue_mask
from ._tiling import iter_segment_region, region_origin, segment_region

__all__ = [
    "CLASSICAL_DEFAULTS",
    "DEFAULT_DIAMETER_UM",
    "DEFAULT_MAX_AREA_UM2",
    "DEFAULT_MIN_AREA_UM2",
    "METHODS",
    "MIN_CONTRAST",
    "MIN_THRESHOLD",
    "PROJECT_NUCLEI_MODEL",
    "SEGMENTATION_VERSION",
    "SEGMENTATION_VERSIONS",
    "TISSUE_OD",
    "CellposeModelUnavailableError",
    "Method",
    "Progress",
    "as_rgb_uint8",
    "cellpose_major_version",
    "cellpose_model_choices",
    "cellpose_model_settings",
    "cellpose_models_dir",
    "clear_cellpose_cache",
    "haematoxylin",
    "iter_segment_region",
    "iter_train_nuclei_model",
    "load_cellpose_model",
    "project_nuclei_model_built",
    "project_nuclei_model_path",
    "resolve_cellpose_model",
    "segment_nuclei",
    "region_origin",
    "segment_region",
    "tissue_mask",
]
