"""Models for prediction: a checkpoint or a registry model, with what provenance says about it."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Registry names ending like this are test variants: available to code, kept out of user interfaces.
TEST_VARIANT_SUFFIX = "_tiny"


def user_models() -> list[str]:
    """The registered production models a user can pick (the ``*_tiny`` test variants left out)."""
    from ..models import list_models

    return [name for name in list_models() if not name.endswith(TEST_VARIANT_SUFFIX)]


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
    radiomics recipe), for trying the plugin out."""
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
