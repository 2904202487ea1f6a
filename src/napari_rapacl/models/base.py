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

Losses that are statistics of the whole batch (contrastive InfoNCE, the per-gene PCC of PixNet) are
computed over the **global** batch under DDP: :func:`gather_batch` concatenates every process's rows
with a differentiable all-gather, each process evaluates the same global loss, and DDP's gradient
averaging then yields exactly the gradient of the one-process run with the same global batch
(the all-gather's backward sums the gradient copies, DDP divides by the world size).
"""

from __future__ import annotations

from typing import Any

IMAGE_ONLY = ("image",)


def gather_batch(x):
    """Rows of ``x`` from every process of the default process group, in rank order (differentiable).

    The identity outside ``torch.distributed`` (or with one process). Ranks may hold different
    numbers of rows (e.g. a last partial batch): rows are padded for the collective and trimmed.
    Every process must call it the same number of times (as DDP's own collectives require).
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return x
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(c) for c in sizes]
    longest = max(counts)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = all_gather(x.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def mse_loss_dict(pred, target) -> dict[str, Any]:
    import torch.nn.functional as F

    loss = F.mse_loss(pred, target)
    return {"loss": loss, "mse": loss.detach()}
