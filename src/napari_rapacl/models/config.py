"""Typed model configurations (torch-free).

Every model has one dataclass config. It is validated on construction, saved as YAML next to every
checkpoint and inside it, and restored with :func:`config_from_dict`, which rejects unknown keys
so a typo in a YAML file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .._atomic import write_text_atomic
from .._errors import RapaclInputError

C = TypeVar("C", bound="ModelConfig")


@dataclass
class ModelConfig:
    """Fields shared by every model.

    Attributes
    ----------
    n_genes
        Number of predicted genes (the head's width).
    patch_size
        Side of the square input patch in pixels.
    mpp
        Microns per pixel of the input patch; patches are resampled to it from the slide.
    freeze_backbone
        Freeze the image encoder (``model.encoder``): no gradients, eval mode kept during training
        (BatchNorm statistics frozen), so only the rest of the model learns. For pretrained
        (foundation) encoders; see :func:`napari_rapacl.models.backbones.freeze_encoder`.
    """

    n_genes: int = 785
    patch_size: int = 224
    mpp: float = 0.5
    freeze_backbone: bool = False

    def __post_init__(self) -> None:
        if self.n_genes < 1:
            raise RapaclInputError(f"n_genes must be >= 1, got {self.n_genes}")
        if self.patch_size < 8:
            raise RapaclInputError(f"patch_size must be >= 8 px, got {self.patch_size}")
        if not self.mpp > 0:
            raise RapaclInputError(f"mpp (microns per pixel of the input patch) must be > 0, got {self.mpp}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RapaclInputError(
                f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(known)}"
            )
        return cls(**values)


def save_config_yaml(config: ModelConfig, path: str | os.PathLike, *, model: str) -> Path:
    """Write ``{model: name, config: {...}}`` as YAML, atomically."""
    path = Path(path)
    text = yaml.safe_dump({"model": model, "config": config.to_dict()}, sort_keys=False)
    return write_text_atomic(path, text)
