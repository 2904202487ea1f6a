"""Config of the frozen-encoder probe (torch-free, so the registry can import it)."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import RapaclInputError
from .config import ModelConfig

PROBE_HEADS = ("ridge", "mlp")


@dataclass
class ProbeConfig(ModelConfig):
    """Config of :class:`~napari_rapacl.models.probe.Probe` (HEST-Bench style linear/MLP probe).

    Attributes
    ----------
    backbone
        Any timm encoder name, including the ``hf-hub:`` foundation encoders built offline
        (:data:`napari_rapacl.models.backbones.FOUNDATION_ENCODERS`, e.g. ``hf-hub:MahmoodLab/uni``).
    pretrained
        ``None`` (random init: only for tests), a local weights file, or ``"hub"``; see
        :mod:`.backbones`.
    head
        ``ridge`` (a linear map with an L2 penalty ``ridge_alpha * sum(W**2) / n_genes`` in the loss)
        or ``mlp`` (Linear - GELU - dropout - Linear, ``hidden`` units).
    hidden, dropout
        The MLP head's width and dropout.
    ridge_alpha
        Strength of the ridge penalty on the last layer's weights (both heads).
    embedding_cache
        Folder of the on-disk embedding cache (``"auto"``: ``<napari-rapacl cache>/embeddings``; None:
        no cache). Keyed by the encoder name, the SHA-256 of the encoder's weights, the patch size and
        µm/px, and each patch's pixel content (which identifies the slide region it was cut from).
    freeze_backbone
        Always true: the probe's encoder is frozen by definition.
    """

    patch_size: int = 224
    mpp: float = 0.5
    freeze_backbone: bool = True
    backbone: str = "hf-hub:MahmoodLab/uni"
    pretrained: str | None = None
    head: str = "ridge"
    hidden: int = 256
    dropout: float = 0.1
    ridge_alpha: float = 1e-3
    embedding_cache: str | None = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.freeze_backbone:
            raise RapaclInputError(
                "probe: freeze_backbone must be true (a probe trains a head on a frozen encoder); to "
                "fine-tune an encoder use stnet with backbone and pretrained set"
            )
        if self.head not in PROBE_HEADS:
            raise RapaclInputError(f"probe: head must be one of {', '.join(PROBE_HEADS)}; got {self.head!r}")
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0 or self.ridge_alpha < 0:
            raise RapaclInputError(
                f"probe: hidden >= 1, 0 <= dropout < 1 and ridge_alpha >= 0 are needed; got hidden="
                f"{self.hidden}, dropout={self.dropout}, ridge_alpha={self.ridge_alpha}"
            )
