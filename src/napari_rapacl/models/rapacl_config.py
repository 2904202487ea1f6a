"""Config of RaPaCL-ST (torch-free, so the registry can import it without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import RapaclInputError
from .config import ModelConfig

MMCL_LOSSES = ("infonce", "multipos")
RADIOMICS_ABLATIONS = ("none", "shuffle", "zero")

# Fields that shape the state dict: a Stage 1 checkpoint initialises a Stage 2 model only if they agree.
ARCHITECTURE_FIELDS = (
    "backbone",
    "embed_dim",
    "path_hidden",
    "n_radiomics",
    "n_classes",
    "rad_hidden",
    "rad_layers",
    "rad_heads",
    "rad_ffn",
    "recon_hidden",
    "cls_hidden",
    "gene_hidden",
)


@dataclass
class RaPaCLConfig(ModelConfig):
    """Config of :class:`~napari_rapacl.models.rapacl.RaPaCL` (methods.md section 1).

    Attributes
    ----------
    backbone
        timm name of the pathomics encoder (pooled features), e.g. ``densenet121`` (the paper figure).
    pretrained
        ``None`` (random init), a local weights file, or ``"hub"``; see :mod:`.backbones`.
    embed_dim
        Width ``D`` of the shared embedding space (``z_img``, ``z_rad``).
    path_hidden
        Hidden width of the pathomics projection MLP (encoder features -> path_hidden -> D).
    n_radiomics
        Number ``F`` of radiomics features per spot (z-scored, in a fixed column order).
    radiomics_features
        Optional names of the ``F`` columns, in order; recorded in checkpoints so a Stage 2 model (and
        inference) can check that it is fed the columns its column embeddings were learned for.
    n_classes
        Number of cell-composition classes of the Stage 1 classification head.
    rad_hidden, rad_layers, rad_heads, rad_ffn
        Tabular transformer width, depth, attention heads and gated-FFN width.
    recon_hidden, cls_hidden, gene_hidden
        Hidden widths of the reconstruction, classification and gene heads.
    stage
        ``1``: contrastive pre-alignment (+ reconstruction + classification); ``2``: gene prediction
        with the radiomics branch frozen.
    mmcl
        Stage 1 contrastive loss: ``"infonce"`` (symmetric CLIP loss between ``z_img`` and the
        contrastive token's ``z_rad``; default) or ``"multipos"`` (the reference's SupCon-style
        multi-positive NT-Xent over ``{z_img} + {per-feature token projections}``).
    temperature
        Softmax temperature of the contrastive loss.
    multipos_chunk
        Rows of the ``N x N`` similarity matrix computed at a time by the multi-positive loss
        (memory ~ ``multipos_chunk * N`` floats, recomputed in backward).
    warmup_epochs
        Stage 1 epochs with the reconstruction loss only.
    ramp_epochs
        Length of the cosine ramp of the contrastive weight after the warm-up.
    mmcl_weight, recon_weight, cls_weight
        Weights of the Stage 1 terms (the contrastive one at the end of the ramp).
    freeze_encoder_stage1
        Keep the image encoder frozen (eval mode, no gradients) in Stage 1, as the reference does.
    train_encoder_stage2
        Fine-tune the image encoder in Stage 2 (the reference does, for DenseNet).
    path_proj_lr_scale, encoder_lr_scale
        Learning-rate multipliers used by :meth:`RaPaCL.parameter_groups` (reference: 0.3 and 1).
    dropout
        Dropout of the transformer and of every head.
    rad_skip
        Also feed the z-scored radiomics themselves (not only the transformer's ``z_rad``) to the gene
        head: ``gene_head([z_img ; z_rad ; radiomics])`` (a lever of issue #12: "radiomics features into
        the head"; the Stage 1 gene head is never trained, so Stage 1 may differ here).
    pcc_weight
        Stage 2 loss ``MSE + pcc_weight * (1 - PCC)`` (PCC per gene across the batch's spots, as
        PixNet's loss; 0 = the paper's MSE only).
    radiomics_ablation
        ``"none"``; ``"shuffle"`` (the radiomics rows are permuted within every batch, in training and
        prediction, so no spot sees its own) or ``"zero"`` (all radiomics replaced by 0, the training
        mean): the ablation that shows what the radiomics branch adds, with the same encoder and budget.
    init_checkpoint
        Stage 2 only: the Stage 1 checkpoint to start from. Read by the trainer, which calls
        ``model.init_from_stage1()``; building a model never reads it, so a saved Stage 2 model
        reloads without the Stage 1 file.
    """

    backbone: str = "densenet121"
    pretrained: str | None = None
    embed_dim: int = 384
    path_hidden: int = 512
    n_radiomics: int = 72
    radiomics_features: list[str] | None = None
    n_classes: int = 5
    rad_hidden: int = 128
    rad_layers: int = 2
    rad_heads: int = 8
    rad_ffn: int = 256
    recon_hidden: int = 512
    cls_hidden: int = 256
    gene_hidden: int = 256
    stage: int = 1
    mmcl: str = "infonce"
    temperature: float = 0.25
    multipos_chunk: int = 2048
    warmup_epochs: int = 5
    ramp_epochs: int = 20
    mmcl_weight: float = 1.0
    recon_weight: float = 25.0
    cls_weight: float = 1.0
    freeze_encoder_stage1: bool = True
    train_encoder_stage2: bool = True
    path_proj_lr_scale: float = 0.3
    encoder_lr_scale: float = 1.0
    dropout: float = 0.1
    rad_skip: bool = False
    pcc_weight: float = 0.0
    radiomics_ablation: str = "none"
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise RapaclInputError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.radiomics_ablation not in RADIOMICS_ABLATIONS:
            raise RapaclInputError(
                f"radiomics_ablation must be one of {RADIOMICS_ABLATIONS}, got {self.radiomics_ablation!r}"
            )
        if self.mmcl not in MMCL_LOSSES:
            raise RapaclInputError(f"mmcl must be one of {MMCL_LOSSES}, got {self.mmcl!r}")
        for name in (
            "embed_dim",
            "path_hidden",
            "n_radiomics",
            "rad_hidden",
            "rad_layers",
            "rad_heads",
            "rad_ffn",
            "recon_hidden",
            "cls_hidden",
            "gene_hidden",
            "multipos_chunk",
            "ramp_epochs",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RapaclInputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_classes < 2:
            raise RapaclInputError(f"n_classes must be >= 2, got {self.n_classes!r}")
        if self.rad_hidden % self.rad_heads:
            raise RapaclInputError(
                f"rad_hidden ({self.rad_hidden}) must be divisible by rad_heads ({self.rad_heads})"
            )
        if self.warmup_epochs < 0:
            raise RapaclInputError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if not self.temperature > 0:
            raise RapaclInputError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.dropout < 1:
            raise RapaclInputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("mmcl_weight", "recon_weight", "cls_weight", "pcc_weight"):
            if not getattr(self, name) >= 0:
                raise RapaclInputError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("path_proj_lr_scale", "encoder_lr_scale"):
            if not getattr(self, name) > 0:
                raise RapaclInputError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.radiomics_features is not None:
            self.radiomics_features = [str(n) for n in self.radiomics_features]
            if len(self.radiomics_features) != self.n_radiomics:
                raise RapaclInputError(
                    f"radiomics_features lists {len(self.radiomics_features)} names but "
                    f"n_radiomics={self.n_radiomics}"
                )
            if len(set(self.radiomics_features)) != self.n_radiomics:
                raise RapaclInputError("radiomics_features contains duplicate names")
        if self.init_checkpoint is not None and self.stage != 2:
            raise RapaclInputError(
                f"init_checkpoint={self.init_checkpoint!r} is only used in stage 2, but stage={self.stage}"
            )
