"""Config of PixNet (torch-free, so the registry can import it without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import RapaclInputError
from .config import ModelConfig


@dataclass
class PixNetConfig(ModelConfig):
    """Config of :class:`~napari_rapacl.models.pixnet.PixNet` (methods.md section 4).

    Attributes
    ----------
    backbone
        timm name of the encoder, used with ``features_only=True`` (its pyramid channels and strides
        are read from ``feature_info``), e.g. ``resnet18``.
    pretrained
        ``None`` (random init), a local weights file, or ``"hub"``; see :mod:`.backbones`.
    hidden
        Decoder width (512 in the paper).
    out_indices
        Encoder stages used as the pyramid, shallow to deep; for ResNets ``(1, 2, 3, 4)`` = layer1..4
        at strides 4..32. The dense map comes out at the stride of the first one.
    ffn_kernel
        Spatial kernel of the decoder's convolutional feed-forward block: ``3`` (depthwise 3 x 3
        between the two 1 x 1 convolutions) or ``1`` (no spatial mixing: a per-pixel two-layer FFN).
    ffn_expansion
        Width multiplier of the feed-forward block's inner layer.
    pcc_weight
        ``lambda`` of the loss ``MSE + lambda * (1 - PCC)`` (0.5 in the paper).
    clip_radius
        What a spot radius larger than the patch's half side means. ``False`` (default): a clear error
        (the disc would reach outside the patch). ``True``: the disc is clipped to the patch, so the
        prediction is that of the spot's visible part (exact for uniform tissue, a truncation
        otherwise).
    """

    backbone: str = "resnet18"
    pretrained: str | None = None
    hidden: int = 512
    out_indices: tuple[int, ...] = (1, 2, 3, 4)
    ffn_kernel: int = 3
    ffn_expansion: int = 1
    pcc_weight: float = 0.5
    clip_radius: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1:
            raise RapaclInputError(f"hidden must be >= 1, got {self.hidden}")
        indices = self.out_indices
        if isinstance(indices, int) or not all(isinstance(i, int) for i in indices):
            raise RapaclInputError(f"out_indices must be a list of ints, got {indices!r}")
        indices = tuple(int(i) for i in indices)
        if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0:
            raise RapaclInputError(
                f"out_indices must be non-negative, strictly increasing and non-empty, got {list(indices)}"
            )
        self.out_indices = indices  # YAML and checkpoints give a list back
        if self.ffn_kernel not in (1, 3):
            raise RapaclInputError(f"ffn_kernel must be 1 or 3, got {self.ffn_kernel}")
        if self.ffn_expansion < 1:
            raise RapaclInputError(f"ffn_expansion must be >= 1, got {self.ffn_expansion}")
        if not self.pcc_weight >= 0:
            raise RapaclInputError(f"pcc_weight must be >= 0, got {self.pcc_weight}")
