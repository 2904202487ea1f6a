"""Model registry. ``create_model(name, **config)`` builds any registered model.

Importing this package does not import torch; building a model does.
"""

from __future__ import annotations

from .config import ModelConfig
from .ensemble_config import EnsembleConfig
from .nh2st_config import NH2STConfig
from .pixnet_config import PixNetConfig
from .probe_config import ProbeConfig
from .rapacl_config import RaPaCLConfig
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
register_model(
    "rapacl",
    RaPaCLConfig,
    "napari_rapacl.models.rapacl:build",
    "RaPaCL-ST: timm image encoder + radiomics tabular transformer; Stage 1 contrastive pre-alignment, "
    "Stage 2 fused gene head (needs per-spot radiomics).",
)
register_model(
    "rapacl_tiny",
    RaPaCLConfig,
    "napari_rapacl.models.rapacl:build",
    "Tiny RaPaCL-ST for tests (timm test_resnet, 32 px patches, width 32).",
    backbone="test_resnet",
    patch_size=32,
    mpp=4.0,
    embed_dim=32,
    path_hidden=64,
    rad_hidden=32,
    rad_heads=4,
    rad_ffn=64,
    recon_hidden=64,
    cls_hidden=32,
    gene_hidden=32,
)
register_model(
    "nh2st",
    NH2STConfig,
    "napari_rapacl.models.nh2st:build",
    "NH2ST: query + neighbour branches, multi-token cross-attention over the K nearest spots and "
    "symmetric InfoNCE against an expression encoder at training; predicts from the image only.",
)
register_model(
    "nh2st_tiny",
    NH2STConfig,
    "napari_rapacl.models.nh2st:build",
    "Tiny NH2ST for tests (timm test_resnet, 32 px patches, K=3, width 32).",
    backbone="test_resnet",
    patch_size=32,
    mpp=4.0,
    embed_dim=32,
    decoder_hidden=32,
    k_neighbors=3,
    heads=4,
    graph_k=2,
)
register_model(
    "pixnet",
    PixNetConfig,
    "napari_rapacl.models.pixnet:build",
    "PixNet: ResNet pyramid -> U-Net decoder -> per-pixel count density; a spot is the log1p(CP10k) "
    "of the counts summed over its disc (any radius at test time).",
)
register_model(
    "pixnet_tiny",
    PixNetConfig,
    "napari_rapacl.models.pixnet:build",
    "Tiny PixNet for tests (timm test_resnet, 32 px patches, width 32).",
    backbone="test_resnet",
    patch_size=32,
    mpp=4.0,
    hidden=32,
)
register_model(
    "probe",
    ProbeConfig,
    "napari_rapacl.models.probe:build",
    "Frozen-encoder probe (HEST-Bench style): a frozen foundation encoder (UNI, H-optimus, Virchow, ...; "
    "any timm name) with an on-disk embedding cache and a ridge or small MLP gene head.",
)
register_model(
    "probe_tiny",
    ProbeConfig,
    "napari_rapacl.models.probe:build",
    "Tiny probe for tests (timm test_resnet, 32 px patches, no embedding cache unless set).",
    backbone="test_resnet",
    patch_size=32,
    mpp=4.0,
    hidden=16,
    embedding_cache=None,
)

register_model(
    "ensemble",
    EnsembleConfig,
    "napari_rapacl.models.ensemble:build",
    "Ensemble saved as one checkpoint: the mean of trained members' predictions (built from finished "
    "runs by `python -m training.ensemble`; not trained itself).",
    checkpoint_only=True,
)

__all__ = [
    "EnsembleConfig",
    "ModelConfig",
    "ProbeConfig",
    "RaPaCLConfig",
    "STNetConfig",
    "create_model",
    "get_entry",
    "list_models",
    "make_config",
    "register_model",
]
