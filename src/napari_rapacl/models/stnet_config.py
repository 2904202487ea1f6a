"""Config of the image-only baseline (torch-free, so the registry can import it)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass
class STNetConfig(ModelConfig):
    """Config of :class:`STNet`.

    Attributes
    ----------
    backbone
        A timm model name (``resnet18``, ``densenet121``, ...).
    pretrained
        ``None`` (random init), a local weights file, or ``"hub"``; see :mod:`.backbones`.
    dropout
        Dropout before the gene head.
    """

    backbone: str = "resnet18"
    pretrained: str | None = None
    dropout: float = 0.1
