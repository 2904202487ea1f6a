"""The image-only baseline (ST-Net style): a timm image encoder and a linear gene head."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from .base import IMAGE_ONLY, mse_loss_dict
from .stnet_config import STNetConfig


class STNet(nn.Module):
    """Image encoder (global-average pooled) -> dropout -> Linear(features -> genes).

    Input: float images in [0, 1], shape (B, 3, H, W); ImageNet normalisation happens inside, so the
    same tensors feed every model. Output: (B, n_genes) predicted log1p(CP10k).
    """

    def __init__(self, config: STNetConfig):
        super().__init__()
        self.encoder = create_backbone(config.backbone, config.pretrained, num_classes=0)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.encoder.num_features, config.n_genes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    required_inputs = ("image", "target")
    predict_inputs = IMAGE_ONLY
    #: image-only prediction without data-dependent control flow: frozen with TorchScript for CPU
    #: inference (:func:`napari_rapacl.inference.frozen_image_predictor`)
    freeze_for_inference = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder((images - self.mean) / self.std)
        return self.head(self.dropout(features))

    def compute_loss(self, batch: dict[str, torch.Tensor], epoch: int = 0) -> dict[str, torch.Tensor]:
        return mse_loss_dict(self(batch["image"]), batch["target"])

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["image"])


def build(config: STNetConfig) -> STNet:
    return STNet(config)
