"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

``model`` (registry name), ``config`` (the typed config as a dict), ``state_dict``, ``genes``,
``normalization`` (a description of the target transform), and optionally ``optimizer``, ``epoch``,
``metrics`` and anything else a trainer adds under ``extra``. The config is also written as YAML next
to the checkpoint (``<name>.yaml``), so a person can read what a file holds without Python.

``gene_reliability`` (written by ``training.run`` and the main job): each gene's Pearson r between
prediction and measurement on the INNER validation section(s), in gene order (NaN where a gene is
constant there): ``{"metric": "pearson_r", "section": [...], "values": [...]}``. :func:`load_model`
exposes it as ``model.gene_reliability`` (gene -> r).
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
FORMAT = "napari-rapacl-checkpoint/1"
RELIABILITY_METRIC = "pearson_r"
_NOT_A_CHECKPOINT = (
    "{path}: this .pt is not a napari-rapacl checkpoint ({reason}); choose a file written by "
    "`python -m training.run` or the main job (`napari-rapacl demo`)"
)


def gene_reliability_entry(values: Any, genes: list[str], sections: list[str] | str) -> dict[str, Any]:
    """The checkpoint's ``gene_reliability`` value: per-gene validation r in gene order (NaN kept)."""
    import numpy as np

    r = np.asarray(values, dtype=np.float64).ravel()
    if r.shape[0] != len(genes):
        raise ValueError(f"{r.shape[0]} reliability values for {len(genes)} genes")
    return {
        "metric": RELIABILITY_METRIC,
        "section": [sections] if isinstance(sections, str) else [str(s) for s in sections],
        "values": [float(v) if np.isfinite(v) else float("nan") for v in r],
    }


def gene_reliability(payload: dict[str, Any]) -> dict[str, float] | None:
    """``{gene: validation r}`` from a checkpoint dict (NaN for genes constant on validation), or
    None when the checkpoint records none (older files, RaPaCL Stage 1) or records it badly."""
    entry = payload.get("gene_reliability")
    genes = payload.get("genes") or []
    if not isinstance(entry, dict) or not isinstance(entry.get("values"), (list, tuple)):
        return None
    values = entry["values"]
    if len(values) != len(genes):
        return None
    return {str(g): float(v) for g, v in zip(genes, values, strict=True)}


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
        "format": FORMAT,
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


def _state_dict_misfit(exc: Exception) -> str:
    """torch's ``load_state_dict`` error in one line: its first details (the tensor and the shapes that
    differ, or the missing / unexpected keys), not only its header "Error(s) in loading state_dict"."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip()]
    details = lines[1:3] if len(lines) > 1 else lines[:1]
    return "; ".join(details)[:400]


def check_weights_and_genes(model: Any, genes: list[str], path: Path) -> None:
    """Refuse, before any work, a checkpoint whose weights hold NaN or infinite values (a diverged or
    damaged training: the frozen CPU predictor turned them into the same value at every spot, exit 0)
    or whose gene list names a gene twice (refused before only by the export, after inference)."""
    import torch

    tensors = [(n, t, False) for n, t in model.named_parameters()]
    tensors += [(n, t, True) for n, t in model.named_buffers()]  # masks may hold -inf, never NaN
    for name, tensor, buffer in tensors:
        if not torch.is_floating_point(tensor):
            continue
        bad = int(torch.isnan(tensor).sum()) if buffer else int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CorruptFileError(
                f"{path}: {bad:,} of the {tensor.numel():,} weights of {name} are NaN or infinite, so "
                "every prediction would be meaningless (training diverged, or the file is damaged); "
                "use another checkpoint, e.g. the run's best.pt from an earlier epoch"
            )
    seen: set[str] = set()
    twice = sorted({g for g in genes if g in seen or seen.add(g)})
    if twice:
        raise CorruptFileError(
            f"{path}: lists the gene{'s' if len(twice) > 1 else ''} {', '.join(twice[:5])} twice; a "
            "checkpoint's genes must be unique (the file is damaged or was not written by napari-rapacl)"
        )


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load the checkpoint dict with ``weights_only=True`` (no pickled code is ever executed)."""
    import torch

    from ..io._paths import require_readable

    path = require_readable(Path(path), "checkpoint")  # a FIFO or device is named as such, never read
    if path.is_dir():
        raise CorruptFileError(f"checkpoint {path} is a folder: give the .pt file (e.g. {path / 'best.pt'})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CorruptFileError(
            _NOT_A_CHECKPOINT.format(path=path, reason=_load_failure_reason(path, exc))
        ) from exc
    if not isinstance(payload, dict):
        reason = f"it holds a {type(payload).__name__}, not a checkpoint dict"
        raise CorruptFileError(_NOT_A_CHECKPOINT.format(path=path, reason=reason))
    missing = [k for k in ("model", "config", "state_dict", "genes") if k not in payload]
    if missing:
        if all(hasattr(v, "shape") for v in payload.values()):
            reason = "it holds bare weights (a state dict), without the model name, config and genes"
        else:
            reason = f"it lacks {', '.join(missing)}"
        raise CorruptFileError(_NOT_A_CHECKPOINT.format(path=path, reason=reason))
    return payload


def _load_failure_reason(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed, in words (not the raw ``101``-style unpickler message)."""
    import zipfile

    text = str(exc)
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"PK" and not zipfile.is_zipfile(path):
        return "it is truncated (an incomplete PyTorch zip file)"
    if head != b"PK" and head[:1] != b"\x80":  # neither torch's zip container nor a pickle
        return "it is not a PyTorch file"
    if "Unsupported global" in text or "GLOBAL" in text:
        return "it holds pickled Python objects, which are not loaded for safety (weights_only=True)"
    return f"it is damaged or truncated ({text.splitlines()[0][:160] if text else type(exc).__name__})"


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint; returns ``(model in eval mode, checkpoint dict)``.

    ``model.gene_reliability`` is ``{gene: validation r}`` (:func:`gene_reliability`) or None.

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
            f"(e.g. a wrong gene count or a damaged file): {_state_dict_misfit(exc)}"
        ) from None
    if len(payload["genes"]) != config.n_genes:
        raise CorruptFileError(
            f"{path}: lists {len(payload['genes'])} genes for a model with n_genes={config.n_genes}"
        )
    check_weights_and_genes(model, [str(g) for g in payload["genes"]], path)
    model.eval()
    model.gene_reliability = gene_reliability(payload)
    if "radiomics" in getattr(model, "predict_inputs", ()):
        # how its radiomics were made, so prediction from a slide reproduces them (or says why not)
        from ..radiomics import recipe_from_checkpoint

        try:
            model.radiomics_recipe = recipe_from_checkpoint(payload, str(path))
        except RapaclInputError as exc:
            model.radiomics_recipe = None
            model.radiomics_recipe_error = str(exc)
    return model, payload
