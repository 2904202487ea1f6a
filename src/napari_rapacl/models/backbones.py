"""Image backbones from timm, with offline-safe pretrained weights.

``pretrained`` is one of:

* ``None`` (default): random initialisation; never touches the network.
* a local file (``.pth``, ``.bin``, ``.safetensors``): loaded through timm's
  ``pretrained_cfg_overlay=dict(file=...)``, so timm applies its usual key filtering/adaptation.
* ``"hub"``: timm's own pretrained weights for that architecture (downloaded on a connected
  machine). Refused at once when ``HF_HUB_OFFLINE`` or ``NAPARI_RAPACL_OFFLINE`` is set, so an offline
  machine gets a clear error instead of a long retry loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._errors import RapaclInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def offline() -> bool:
    """True when downloads are disabled by the environment."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "NAPARI_RAPACL_OFFLINE"))


def create_backbone(name: str, pretrained: str | None = None, **kwargs):
    """``timm.create_model(name, ...)`` with the weight policy described in the module docstring.

    Extra keyword arguments go to timm (e.g. ``num_classes=0`` for pooled features or
    ``features_only=True, out_indices=(1, 2, 3, 4)`` for a feature pyramid).
    """
    import timm

    if pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "hub":
        if offline():
            raise RapaclInputError(
                f"pretrained='hub' for backbone {name!r} needs a download, but this machine is offline "
                "(HF_HUB_OFFLINE / NAPARI_RAPACL_OFFLINE is set); pass a local weights file instead"
            )
        return timm.create_model(name, pretrained=True, **kwargs)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file for backbone {name!r} not found: {path}")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
