"""Model registry. ``create_model(name, **config)`` builds any registered model.

Importing this package does not import torch; building a model does.
"""

from __future__ import annotations

from .config import ModelConfig
from .registry import create_model, get_entry, list_models, make_config, register_model
from .stnet_config import STNetConfig

register_model(
    "stnet",
    STNetConfig,
    "napari_rapacl.models.stnet:build",
    "Image-only baseline: timm encoder + linear gene head (ST-Net style).",
)
register_model(
    "stnet_tiny",
    STNetConfig,
    "napari_rapacl.models.stnet:build",
    "Tiny image-only baseline for tests (timm test_resnet, 32 px patches).",
    backbone="test_resnet",
    patch_size=32,
    mpp=4.0,
)

__all__ = [
    "ModelConfig",
    "STNetConfig",
    "create_model",
    "get_entry",
    "list_models",
    "make_config",
    "register_model",
]
