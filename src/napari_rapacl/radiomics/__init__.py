"""Radiomics of segmented nuclei with pyradiomics: per cell, per spot (RaPaCL-ST's 72), cached.

* :class:`RadiomicsConfig` -- every setting (2-D, bin width, image types, grey conversion,
  feature classes, minimum nucleus size, composition rule, version); ``to_dict`` / ``to_yaml``
  are saved with every result (``attrs["radiomics_config"]``).
* :func:`cell_features` -- shape2D + first-order (+ optional texture) per nucleus, a table keyed by
  label id; pyradiomics' values, computed much faster than one extractor call per nucleus.
* :func:`spot_features` -- the per-patch set: RaPaCL-ST's 72 (:func:`rapacl72_names`) or
  ``"full"``; ``n_nuclei`` and the composition ``cell_label``.
* :func:`iter_spot_features` -- all spots of a slide, parallel over processes and cached on disk.
* :func:`composition_from_morphology` -- the documented morphology rule behind ``cell_label``.
* :class:`RadiomicsRecipe` / :class:`NucleusSegmenter` -- how a radiomics-fed model's inputs are
  made (segmentation, patch geometry, features, z-scoring), recorded in its checkpoint so that
  prediction from a slide reproduces the training tables.

pyradiomics is an optional dependency (``pip install "napari-rapacl[radiomics]"``; see the
README for the no-build-isolation step). Importing this module does not need it; calling a
function that computes features raises an ImportError that says how to install it.

Note: this module is ``napari_rapacl.radiomics``; inside it ``import radiomics`` (absolute)
is pyradiomics.
"""

from __future__ import annotations

from ._config import (
    COMPOSITION_CLASSES,
    FEATURE_CLASSES,
    FEATURES_VERSION,
    IMAGE_TYPES,
    INSTALL_HINT,
    MORPH_STATS,
    SHAPE2D_FEATURES,
    CompositionRule,
    RadiomicsConfig,
    rapacl72_names,
    require_radiomics,
)
from ._core import (
    FEATURE_SETS,
    as_rgb_uint8,
    batch_firstorder,
    cell_feature_columns,
    cell_features,
    composition_from_morphology,
    find_nuclei,
    morph_stats,
    nucleus_types,
    spot_feature_names,
    spot_features,
    to_grey,
)
from ._pipeline import (
    MEMORY_CACHE,
    SpotFeatureCache,
    iter_spot_features,
    labels_from_cells,
    segment_identity,
    slide_content_hash,
    spot_feature_table,
)
from ._pool import shutdown_pools
from ._recipe import (
    DEFAULT_PATCH_MPP,
    DEFAULT_PATCH_SIZE,
    NucleusSegmenter,
    RadiomicsRecipe,
    recipe_from_checkpoint,
    signed_log,
)

__all__ = [
    "COMPOSITION_CLASSES",
    "DEFAULT_PATCH_MPP",
    "DEFAULT_PATCH_SIZE",
    "MEMORY_CACHE",
    "NucleusSegmenter",
    "RadiomicsRecipe",
    "SpotFeatureCache",
    "recipe_from_checkpoint",
    "signed_log",
    "FEATURES_VERSION",
    "FEATURE_CLASSES",
    "FEATURE_SETS",
    "IMAGE_TYPES",
    "INSTALL_HINT",
    "MORPH_STATS",
    "SHAPE2D_FEATURES",
    "CompositionRule",
    "RadiomicsConfig",
    "as_rgb_uint8",
    "batch_firstorder",
    "cell_feature_columns",
    "cell_features",
    "composition_from_morphology",
    "find_nuclei",
    "iter_spot_features",
    "labels_from_cells",
    "morph_stats",
    "nucleus_types",
    "rapacl72_names",
    "require_radiomics",
    "segment_identity",
    "shutdown_pools",
    "slide_content_hash",
    "spot_feature_names",
    "spot_feature_table",
    "spot_features",
    "to_grey",
]
