"""The work behind the command line and the napari widgets: one Qt-free, napari-free layer.

Every long job is a generator that yields :class:`~napari_rapacl.progress.Progress` and returns one
result object: the CLI drains it (:func:`~napari_rapacl.progress.run_to_completion`), a widget runs it
in a ``thread_worker`` (progress, cancel between yields) and writes the result into layers in the UI
thread. The CLI only parses arguments and the widgets only wire layers; neither computes anything of
its own.

* open (:mod:`._open`): a slide and its spots placed together (:func:`open_inputs`, :func:`iter_open`,
  :func:`iter_open_sample`; the pixel size is adopted from the spots in one place,
  :func:`napari_rapacl.io.place_spots`).
* models (:mod:`._models`): a checkpoint or a registry model with its provenance
  (:func:`load_model_choice`, :func:`preload_model`, :func:`user_models`).
* cells (:mod:`._cells`): segmentation, the one cell table (:func:`iter_cell_table`), spot radiomics
  (:func:`iter_cells`), cell AnnData/CSV (:func:`cells_adata`, :func:`write_cells`).
* predict (:mod:`._predict`): :func:`iter_predict` over a region or all spots, RaPaCL-ST's radiomics
  computed on the fly with its checkpoint's recipe.
* export (:mod:`._export`): :func:`prediction_adata`, the AnnData of spot predictions (with the spot
  radiomics in ``obsm['radiomics']``) for the CLI and the viewer alike.
"""

from __future__ import annotations

from ..tiled import run_tasks
from ._cells import (
    BASE_COLUMNS,
    CellsResult,
    cells_adata,
    feature_column,
    iter_cell_table,
    iter_cells,
    iter_write_cells,
    write_cells,
)
from ._export import RADIOMICS_KEY, iter_export, predicted_rows, prediction_adata, result_adata
from ._models import (
    LoadedModel,
    default_genes,
    install_model,
    installed_models,
    load_model_choice,
    models_dir,
    preload_model,
    user_models,
)
from ._nuclei_model import iter_build_nuclei_model
from ._open import Opened, iter_open, iter_open_sample, open_inputs, spots_library_id
from ._predict import PredictResult, iter_predict

__all__ = [
    "BASE_COLUMNS",
    "RADIOMICS_KEY",
    "CellsResult",
    "LoadedModel",
    "Opened",
    "PredictResult",
    "cells_adata",
    "default_genes",
    "feature_column",
    "install_model",
    "installed_models",
    "iter_cell_table",
    "iter_build_nuclei_model",
    "iter_cells",
    "iter_export",
    "iter_open",
    "iter_open_sample",
    "iter_predict",
    "iter_write_cells",
    "load_model_choice",
    "models_dir",
    "open_inputs",
    "predicted_rows",
    "prediction_adata",
    "preload_model",
    "result_adata",
    "run_tasks",
    "spots_library_id",
    "user_models",
    "write_cells",
]
