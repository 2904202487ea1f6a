"""Build the project's cellpose nucleus model: the job behind ``python -m training.cellpose_nuclei``,
``napari-rapacl segment --build-model`` and the Cells widget's "Build the nucleus model" button."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from ..progress import Progress


def iter_build_nuclei_model(
    data_dir: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    epochs: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    **settings: Any,
) -> Generator[Progress, None, Path]:
    """Train and install the project's nucleus model (``rapacl_nuclei_tnbc``); yields
    :class:`~napari_rapacl.progress.Progress`, returns the installed model file.

    Parameters
    ----------
    data_dir
        The data folder holding ``tnbc_nuclei/`` (default ``$NAPARI_RAPACL_DATA_DIR``).
    out
        The model file (default: ``rapacl_nuclei_tnbc`` in the cellpose models folder, usable by name).
    epochs, seed, threads
        Training epochs (None: the default of
        :func:`~napari_rapacl.segmentation.iter_train_nuclei_model`), the seed, torch CPU threads.
    settings
        Further settings of :func:`~napari_rapacl.segmentation.iter_train_nuclei_model`.

    Closing the generator (a cancelled GUI worker) stops the training at its next batch and installs
    nothing.
    """
    from ..segmentation import iter_train_nuclei_model

    if epochs is not None:
        settings["epochs"] = epochs
    return (yield from iter_train_nuclei_model(data_dir, out=out, seed=seed, threads=threads, **settings))
