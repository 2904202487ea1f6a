"""One registry for every model: ``create_model(name, **config)``.

Entries are registered with their typed config class and the dotted path of a builder, so listing
models and validating configs needs no torch; the builder module (and torch) is imported only when a
model is actually built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import RapaclInputError
from .config import ModelConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[ModelConfig]
    builder: str  # "package.module:function", called as builder(config) -> nn.Module
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides that define a variant (e.g. tiny)
    checkpoint_only: bool = False  # built only from a checkpoint (e.g. an ensemble of trained members)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    config_cls: type[ModelConfig],
    builder: str,
    description: str,
    *,
    checkpoint_only: bool = False,
    **defaults: Any,
) -> None:
    """Register a model (or a variant of one: same builder, different default config values).
    ``checkpoint_only``: the model has no default config to build from (an ensemble is made of trained
    members), so it is left out of :func:`list_models` unless asked for; it still loads from a checkpoint."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(name, config_cls, builder, description, dict(defaults), checkpoint_only)


def list_models(include_checkpoint_only: bool = False) -> list[str]:
    """Names of the registered models that can be built from their default config, sorted (with
    ``include_checkpoint_only``: also those that only load from a checkpoint, e.g. ``ensemble``)."""
    return sorted(n for n, e in _REGISTRY.items() if include_checkpoint_only or not e.checkpoint_only)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RapaclInputError(
            f"unknown model {name!r}; registered models: {list_models(include_checkpoint_only=True)}"
        ) from None


def make_config(name: str, **overrides: Any) -> ModelConfig:
    """The typed config of ``name`` with its variant defaults and ``overrides`` applied (validated)."""
    entry = get_entry(name)
    return entry.config_cls.from_dict({**entry.defaults, **overrides}, source=f"model {name!r}")


def create_model(name: str, config: ModelConfig | None = None, **overrides: Any) -> torch.nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name
        A name from :func:`list_models`, e.g. ``"stnet"`` or ``"stnet_tiny"``.
    config
        A ready config (e.g. restored from a checkpoint); ``overrides`` are applied on top.
    **overrides
        Config fields, e.g. ``n_genes=250, backbone="resnet50"``.

    Returns
    -------
    torch.nn.Module
        The model, with ``model.config`` (the typed config) and ``model.model_name`` set; its
        ``encoder`` frozen when ``config.freeze_backbone``.

    Examples
    --------
    >>> model = create_model("stnet_tiny", n_genes=10)  # doctest: +SKIP
    """
    entry = get_entry(name)
    if config is None:
        config = make_config(name, **overrides)
    else:
        if not isinstance(config, entry.config_cls):
            raise RapaclInputError(
                f"model {name!r} takes a {entry.config_cls.__name__}, got {type(config).__name__}"
            )
        if overrides:
            config = entry.config_cls.from_dict({**config.to_dict(), **overrides}, source=f"model {name!r}")
    module_name, func_name = entry.builder.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    model = builder(config)
    model.config = config
    model.model_name = name
    if getattr(config, "freeze_backbone", False):
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise RapaclInputError(f"model {name!r} has no image encoder to freeze (freeze_backbone=true)")
        from .backbones import freeze_encoder

        freeze_encoder(encoder)
    return model
