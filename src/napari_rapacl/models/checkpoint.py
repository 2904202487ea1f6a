"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

``model`` (registry name), ``config`` (the typed config as a dict), ``state_dict``, ``genes``,
``normalization`` (a description of the target transform), and optionally ``optimizer``, ``epoch``,
``metrics`` and anything else a trainer adds under ``extra``. The config is also written as YAML next
to the checkpoint (``<name>.yaml``), so a person can read what a file holds without Python.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._atomic import write_atomic
from .._errors import CorruptFileError, RapaclInputError
from .config import save_config_yaml
from .registry import create_model, get_entry

if TYPE_CHECKING:
    import torch

NORMALIZATION = "log1p(CP10k): library size over all genes, natural log"


def config_path_for(checkpoint: str | os.PathLike) -> Path:
    """The YAML written beside a checkpoint: ``model.pt`` -> ``model.yaml``."""
    return Path(checkpoint).with_suffix(".yaml")


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    genes: list[str],
    normalization: str = NORMALIZATION,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> Path:
    """Save ``model`` (built by :func:`create_model`) atomically, plus its config YAML beside it."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(genes) != model.config.n_genes:
        raise RapaclInputError(
            f"{len(genes)} gene names given for a model with n_genes={model.config.n_genes}"
        )
    payload: dict[str, Any] = {
        "format": "napari-rapacl-checkpoint/1",
        "model": model.model_name,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "genes": list(genes),
        "normalization": normalization,
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    payload.update(extra)
    write_atomic(path, lambda tmp: torch.save(payload, tmp))
    save_config_yaml(model.config, config_path_for(path), model=model.model_name)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load the checkpoint dict with ``weights_only=True`` (no pickled code is ever executed)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CorruptFileError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = [k for k in ("model", "config", "state_dict", "genes") if k not in payload]
    if missing:
        raise CorruptFileError(f"{path} is not a napari-rapacl checkpoint (missing {missing})")
    return payload


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint; returns ``(model in eval mode, checkpoint dict)``.

    A model fed with radiomics (RaPaCL-ST) gets ``model.radiomics_recipe``: the
    :class:`~napari_rapacl.radiomics.RadiomicsRecipe` its checkpoint records (None, with
    ``model.radiomics_recipe_error`` saying why, when it records none or one this code cannot
    reproduce; prediction from a slide then refuses with that message)."""
    payload = read_checkpoint(path, map_location)
    entry = get_entry(payload["model"])
    config = entry.config_cls.from_dict(payload["config"], source=str(path))
    if getattr(config, "pretrained", None) is not None:
        # the weights come from the state dict: do not look for the original pretrained file
        config = dataclasses.replace(config, pretrained=None)
    model = create_model(payload["model"], config=config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CorruptFileError(
            f"{path}: its weights do not fit the {payload['model']!r} architecture its config describes "
            f"(e.g. a wrong gene count or a damaged file): {str(exc).splitlines()[0][:300]}"
        ) from None
    if len(payload["genes"]) != config.n_genes:
        raise CorruptFileError(
            f"{path}: lists {len(payload['genes'])} genes for a model with n_genes={config.n_genes}"
        )
    model.eval()
    if "radiomics" in getattr(model, "predict_inputs", ()):
        # how its radiomics were made, so prediction from a slide reproduces them (or says why not)
        from ..radiomics import recipe_from_checkpoint

        try:
            model.radiomics_recipe = recipe_from_checkpoint(payload, str(path))
        except RapaclInputError as exc:
            model.radiomics_recipe = None
            model.radiomics_recipe_error = str(exc)
    return model, payload
