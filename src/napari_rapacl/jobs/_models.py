"""Models for prediction: a checkpoint or a registry model, with what provenance says about it."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Registry names ending like this are test variants: available to code, kept out of user interfaces.
TEST_VARIANT_SUFFIX = "_tiny"
#: Files of an installed model, in ``<models_dir()>/<name>/``.
INSTALLED_CHECKPOINT = "model.pt"
INSTALLED_CARD = "card.json"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def models_dir() -> Path:
    """The user's model folder: ``$NAPARI_RAPACL_MODELS_DIR``, else
    ``$XDG_DATA_HOME/napari-rapacl/models`` (``~/.local/share/napari-rapacl/models``). Trained
    models installed there (:func:`install_model`; the main job installs its model) are listed by
    name in the Predict widget."""
    value = os.environ.get("NAPARI_RAPACL_MODELS_DIR")
    if value:
        return Path(value).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(data).expanduser() / "napari-rapacl" / "models"


def installed_models() -> dict[str, dict[str, Any]]:
    """``{name: card}`` of the models installed in :func:`models_dir` (sorted by name). A card says
    what the model is (registry model, genes, validation scores, training data, checkpoint and its
    SHA-256); folders without a readable card and checkpoint are skipped."""
    root = models_dir()
    out: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        card_path, ckpt = folder / INSTALLED_CARD, folder / INSTALLED_CHECKPOINT
        if folder.name.startswith(".") or not (card_path.is_file() and ckpt.is_file()):
            continue
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("skipping installed model %s: unreadable %s (%s)", folder.name, INSTALLED_CARD, exc)
            continue
        card["checkpoint"] = str(ckpt)
        out[folder.name] = card
    return out


def install_model(
    checkpoint: str | os.PathLike,
    name: str,
    *,
    description: str = "",
    training: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Install a checkpoint in the user's model folder as ``name`` (atomically: the new folder is
    renamed into place whole); returns the installed checkpoint's path.

    The card beside it records the registry model, the genes, the validation scores (``validation``;
    default: the checkpoint's ``best_score``/``select_on`` and gene reliability summary), the training
    data (``training``; default: the checkpoint's training config's data section) and the SHA-256."""
    import shutil
    import tempfile

    from .._atomic import replace_dir
    from .._errors import RapaclInputError
    from ..export import checkpoint_sha256
    from ..models import list_models
    from ..models.checkpoint import config_path_for, gene_reliability, read_checkpoint

    if not _NAME_OK.match(name or ""):
        raise RapaclInputError(
            f"model name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
            "or digit)"
        )
    if name in list_models():
        raise RapaclInputError(f"model name {name!r} is a registry model's name; choose another name")
    src = Path(checkpoint)
    payload = read_checkpoint(src)
    genes = [str(g) for g in payload["genes"]]
    rel = gene_reliability(payload)
    if validation is None:
        validation = {}
        if payload.get("select_on") and payload.get("best_score") is not None:
            validation[str(payload["select_on"])] = float(payload["best_score"])
    if rel:
        import numpy as np

        values = np.array(list(rel.values()), dtype=np.float64)
        entry = payload["gene_reliability"]
        validation = {
            **validation,
            "section": entry.get("section"),
            "metric": entry.get("metric"),
            "mean_gene_r": float(np.nanmean(values)) if np.isfinite(values).any() else None,
            "genes_r_above_0.3": int(np.sum(values > 0.3)),
        }
    if training is None:
        data = (payload.get("train_config") or {}).get("data") or {}
        training = {k: data.get(k) for k in ("dataset", "train", "val", "test", "genes") if k in data}
    card = {
        "name": name,
        "model": str(payload["model"]),
        "description": description,
        "n_genes": len(genes),
        "genes_preview": genes[:10],
        "validation": validation,
        "training": training or {},
        "config": dict(payload["config"]),
        "checkpoint_sha256": checkpoint_sha256(src),
        "source": str(src.resolve()),
        "installed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.exists() and not overwrite:
        raise RapaclInputError(f"a model named {name!r} is already installed in {root}; choose another name")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".installing"))
    try:
        shutil.copyfile(src, tmp / INSTALLED_CHECKPOINT)
        if config_path_for(src).is_file():
            shutil.copyfile(config_path_for(src), tmp / config_path_for(INSTALLED_CHECKPOINT).name)
        (tmp / INSTALLED_CARD).write_text(json.dumps(card, indent=2, default=str) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target / INSTALLED_CHECKPOINT


def user_models() -> list[str]:
    """What a user can pick by name: the installed trained models (:func:`installed_models`) first,
    then the registered production models (random weights; the ``*_tiny`` test variants left out)."""
    from ..models import list_models

    installed = list(installed_models())
    return installed + [
        n for n in list_models() if not n.endswith(TEST_VARIANT_SUFFIX) and n not in installed
    ]


@dataclass
class LoadedModel:
    """A model ready to predict, with what provenance needs to say about it."""

    model: Any
    genes: list[str]
    name: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    config: dict
    key: tuple  # identity: a different key means cached tiles and earlier predictions are stale
    installed_name: str | None = None  # chosen by name from the user's model folder

    @property
    def is_dense(self) -> bool:
        """PixNet-like models also give a dense (per-pixel) map."""
        return hasattr(self.model, "predict_map")

    @property
    def gene_reliability(self) -> dict[str, float] | None:
        """``{gene: validation Pearson r}`` recorded in the checkpoint (NaN for genes constant on the
        validation section), or None (no checkpoint, or one that records none)."""
        return getattr(self.model, "gene_reliability", None)

    @property
    def recipe(self) -> Any:
        """The radiomics recipe of a radiomics-fed model (RaPaCL-ST), else None."""
        return getattr(self.model, "radiomics_recipe", None)

    def provenance(self) -> dict[str, Any]:
        prov: dict[str, Any] = {"model": self.name, "config": self.config}
        if self.installed_name:
            prov["installed_model"] = self.installed_name
        if self.checkpoint:
            prov["checkpoint"] = self.checkpoint
            prov["checkpoint_sha256"] = self.checkpoint_sha256
        else:
            prov["checkpoint"] = "none (random initial weights)"
        if self.recipe is not None:
            prov["radiomics_recipe"] = self.recipe.to_dict()
            prov["radiomics"] = self.recipe.describe()
        return prov


def default_genes(n_genes: int) -> list[str]:
    """Gene names for a model without a checkpoint: the her2st 785 when they fit, else ``gene_<i>``."""
    try:
        from ..datasets import her2st_genes

        genes = her2st_genes(download=False)
        if len(genes) == n_genes:
            return genes
    except Exception:  # no local gene list: numbered names
        pass
    return [f"gene_{i}" for i in range(n_genes)]


def load_model_choice(name: str | None, checkpoint: str | Path | None) -> LoadedModel:
    """A checkpoint defines the model (its registry name, config, weights, genes and, for RaPaCL-ST,
    the radiomics recipe); without one, the registry model ``name`` is built with its default config
    and random initial weights (RaPaCL-ST as a Stage 2 model fed with the default, un-z-scored
    radiomics recipe), for trying the plugin out. A ``name`` of an installed model
    (:func:`installed_models`) loads its checkpoint."""
    if checkpoint is None and name:
        card = installed_models().get(name)
        if card is not None:
            loaded = load_model_choice(None, card["checkpoint"])
            loaded.installed_name = name
            return loaded
    if checkpoint is not None:
        from ..export import checkpoint_sha256
        from ..models.checkpoint import load_model

        path = Path(checkpoint)
        sha = checkpoint_sha256(path)
        model, ckpt = load_model(path)
        return LoadedModel(
            model=model,
            genes=[str(g) for g in ckpt["genes"]],
            name=str(ckpt["model"]),
            checkpoint=str(path),
            checkpoint_sha256=sha,
            config=dict(ckpt["config"]),
            key=("checkpoint", str(path.resolve()), sha),
        )
    if not name:
        raise ValueError("choose a model or a checkpoint file")
    from ..models import create_model, get_entry

    entry = get_entry(name)
    overrides: dict[str, Any] = {}
    if "stage" in entry.config_cls.__dataclass_fields__:
        overrides["stage"] = 2  # a model that predicts (Stage 1 has no gene head)
    model = create_model(name, **overrides).eval()
    if "radiomics" in getattr(model, "predict_inputs", ()):
        from ..radiomics import RadiomicsRecipe

        model.radiomics_recipe = RadiomicsRecipe()  # the default recipe, no fitted statistics
    return LoadedModel(
        model=model,
        genes=default_genes(model.config.n_genes),
        name=name,
        checkpoint=None,
        checkpoint_sha256=None,
        config=model.config.to_dict(),
        key=("registry", name, id(model)),
    )


_PRELOADER: ThreadPoolExecutor | None = None


def preload_model(name: str | None, checkpoint: str | Path | None) -> Future:
    """:func:`load_model_choice` in a background thread (one at a time, in order), with the model's
    cache key (:func:`napari_rapacl.tiled.model_key`) computed and, without a GPU, its frozen CPU
    predictor (:func:`napari_rapacl.inference.frozen_image_predictor`) built; a radiomics-fed model
    also starts the radiomics worker processes. Returns the Future of the :class:`LoadedModel` (its
    exception, if loading fails)."""
    global _PRELOADER
    if _PRELOADER is None:
        _PRELOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-rapacl-preload")
    return _PRELOADER.submit(_load_with_key, name, checkpoint)


def _load_with_key(name: str | None, checkpoint: str | Path | None) -> LoadedModel:
    import os

    import torch

    from ..inference import frozen_image_predictor
    from ..tiled import model_key

    loaded = load_model_choice(name, checkpoint)
    model_key(loaded.model)  # memoised on the model
    if not torch.cuda.is_available():
        frozen_image_predictor(loaded.model, "cpu")  # memoised per model and weights
    if loaded.recipe is not None and (os.cpu_count() or 1) > 1:
        try:  # the worker processes import pyradiomics once, now rather than on the first click
            from ..radiomics import require_radiomics
            from ..radiomics._pool import get_pool

            require_radiomics()
            pool = get_pool(2)
            for _ in range(2):
                pool.submit(_warm_radiomics_worker)
        except Exception as exc:  # no pyradiomics: prediction says so
            log.debug("radiomics workers not started: %s", exc)
    return loaded


def _warm_radiomics_worker() -> None:
    """Run in a radiomics worker process: import what measuring a spot needs."""
    import radiomics.featureextractor  # noqa: F401  (pyradiomics)

    from .. import segmentation  # noqa: F401
    from ..radiomics import _core  # noqa: F401
