"""Config of NH2ST (torch-free, so the registry can import it without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import RapaclInputError
from .config import ModelConfig


@dataclass
class NH2STConfig(ModelConfig):
    """Config of :class:`~napari_rapacl.models.nh2st.NH2ST` (methods.md section 2).

    Attributes
    ----------
    backbone
        timm name of the shared image encoder (global-average pooled features), e.g. ``resnet18``.
    pretrained
        ``None`` (random init), a local weights file, or ``"hub"``; see :mod:`.backbones`.
    embed_dim
        Width ``D`` of the image and expression embeddings (and of the attention tokens).
    decoder_hidden
        Hidden width of the gene decoder ``D -> decoder_hidden -> n_genes`` (GELU between).
    k_neighbors
        ``K``, the number of nearest spots (the spot itself excluded) in the training batch's
        ``neighbors`` / ``neighbor_target``. The trainer reads it as ``n_neighbors``. Any ``K >= 1``
        is accepted at training time; it does not shape the weights.
    heads
        Attention heads of the neighbour cross-attention (``embed_dim`` must be divisible by it).
    graph_k
        Hypergraph mixing of the K neighbour tokens before the attention: hyperedge ``i`` joins
        neighbour ``i`` and its ``graph_k`` most cosine-similar neighbours (on the image tokens; the
        same incidence is used for the expression tokens). ``0`` disables the mixing.
    temperature
        InfoNCE temperature ``T`` (logits are ``cos / T``).
    learn_temperature
        ``False`` (default): ``T`` is fixed. ``True``: ``log(1 / T)`` is a learned scalar starting at
        ``temperature`` and clamped to ``1 / T <= 100`` (as in CLIP).
    w_query
        Weight of the query InfoNCE (target image embedding vs target expression embedding).
    w_neighbor
        Weight of the neighbour InfoNCE (attention summary of the neighbour images vs of their
        expression).
    dropout
        Dropout in the projections, the expression encoder, the attention and the decoder (off in
        eval mode).

    Notes
    -----
    Loss weights: the reference used 1.0 (query) and 0.5 (neighbour) with its negative logits
    multiplied by 0.1 (which weakens the contrastive terms). Our InfoNCE is the plain symmetric one,
    at full strength, so the defaults keep the reference's 2 : 1 ratio scaled by 0.1: the MSE stays
    the main objective and the contrastive terms regularise the shared image encoder.
    """

    backbone: str = "resnet18"
    pretrained: str | None = None
    embed_dim: int = 512
    decoder_hidden: int = 256
    k_neighbors: int = 8
    heads: int = 8
    graph_k: int = 3
    temperature: float = 0.07
    learn_temperature: bool = False
    w_query: float = 0.1
    w_neighbor: float = 0.05
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("embed_dim", "decoder_hidden", "k_neighbors", "heads"):
            if int(getattr(self, name)) < 1:
                raise RapaclInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.heads:
            raise RapaclInputError(f"embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads})")
        if self.graph_k < 0:
            raise RapaclInputError(f"graph_k must be >= 0 (0 disables the mixing), got {self.graph_k}")
        if not self.temperature > 0:
            raise RapaclInputError(f"temperature must be > 0, got {self.temperature}")
        for name in ("w_query", "w_neighbor"):
            if not getattr(self, name) >= 0:
                raise RapaclInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise RapaclInputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_neighbors(self) -> int:
        """``k_neighbors`` under the name the trainer's neighbour builder reads."""
        return self.k_neighbors
