"""The contract between models and the trainer/inference code.

Every registered model is an ``nn.Module`` with:

``required_inputs``
    Class attribute: the batch keys it needs at training time, from
    ``"image"``        (B, 3, H, W) float in [0, 1] — the spot patch (``config.patch_size``, ``config.mpp``);
    ``"target"``       (B, G) float — log1p(CP10k) of the spot's measured counts;
    ``"radiomics"``    (B, F) float — z-scored per-spot radiomics (RaPaCL);
    ``"cell_label"``   (B,) long — per-spot cell-composition class (RaPaCL Stage 1);
    ``"neighbors"``    (B, K, 3, H, W) float — patches of the K nearest spots (NH2ST, training only);
    ``"neighbor_target"`` (B, K, G) float — their measured expression (NH2ST, training only);
    ``"radius_px"``    (B,) float — spot radius in patch pixels (PixNet).
``predict_inputs``
    Class attribute: the keys :meth:`predict` needs (never measured expression).
``compute_loss(batch, epoch) -> dict[str, Tensor]``
    Training losses; the key ``"loss"`` is the one to back-propagate, others are logged.
``predict(batch) -> Tensor``
    (B, G) predictions in eval mode; deterministic.
"""

from __future__ import annotations

from typing import Any

IMAGE_ONLY = ("image",)


def mse_loss_dict(pred, target) -> dict[str, Any]:
    import torch.nn.functional as F

    loss = F.mse_loss(pred, target)
    return {"loss": loss, "mse": loss.detach()}
