"""Dock widgets. They only wire napari layers to the package's jobs (:mod:`napari_rapacl.jobs`, the same
functions the command line runs); one module per widget, re-exported here for the manifest.

Long work runs as a generator in a ``thread_worker`` (the UI thread never waits on it). *Cancel* calls
``worker.quit()``, which stops the generator at its next ``yield``, between tiles; results are written
into layers only by the ``returned`` handler, in one assignment, so a cancelled job leaves every layer as
it was (the tile cache keeps the whole tiles computed before the cancel, which is consistent and makes
the next run faster). One exception, by design: *Predict* shows the spots of the requested region as
soon as they are all predicted (one assignment, from a progress value carrying them), before it
completes the tiles around the region for the cache; a cancel after that keeps exactly those spots.
"""

from ._cells import CellsWidget
from ._common import (
    ALL,
    COLORMAPS,
    ROI,
    VISIBLE,
    JobFailed,
    apply_gene_colors,
    camera_view,
    colored_by,
    dense_layers,
    gene_columns,
    gl_renderer,
    keep_units_consistent,
    software_rendering,
    viewer_camera,
)
from ._export import CELLS_EXPORT, SPOTS_EXPORT, ExportWidget
from ._genes import GeneWidget
from ._load import FILES, SAMPLE, LoadWidget
from ._predict import PredictWidget

__all__ = [
    "ALL",
    "CELLS_EXPORT",
    "COLORMAPS",
    "FILES",
    "ROI",
    "SAMPLE",
    "SPOTS_EXPORT",
    "VISIBLE",
    "CellsWidget",
    "ExportWidget",
    "GeneWidget",
    "JobFailed",
    "LoadWidget",
    "PredictWidget",
    "apply_gene_colors",
    "camera_view",
    "colored_by",
    "dense_layers",
    "gene_columns",
    "gl_renderer",
    "keep_units_consistent",
    "software_rendering",
    "viewer_camera",
]
