"""A small, honest trainer for patch -> expression models on in-memory patches.

Used by the demo and tests. Model selection uses an inner validation set only (never the test
section): the epoch with the best mean per-gene Pearson r on validation is kept.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..metrics import pearson_per_gene

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int
    best_val_pcc: float
    history: list[dict] = field(default_factory=list)


def _augment(batch):
    """Random flips and 90-degree rotations (histology has no canonical orientation)."""
    import torch

    if torch.rand(()) < 0.5:
        batch = batch.flip(-1)
    if torch.rand(()) < 0.5:
        batch = batch.flip(-2)
    return torch.rot90(batch, int(torch.randint(0, 4, ())), dims=(-2, -1))


def fit_patch_regressor(
    model,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    augment: bool = True,
    device: str = "cpu",
    patience: int | None = None,
) -> FitResult:
    """Train with MSE on (N, H, W, 3) uint8 patches and (N, G) targets; keep the best validation epoch.

    The output bias starts at the training mean (when the model has a ``head`` Linear), so the first
    epochs learn deviations from the mean rather than the mean itself.
    """
    import torch

    from ..inference import images_to_tensor

    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = model.to(device)
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.bias.copy_(torch.from_numpy(train_y.mean(axis=0)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    ty = torch.from_numpy(train_y.astype(np.float32))
    best_state, best_pcc, best_epoch, history = None, -np.inf, -1, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = gen.permutation(len(train_x))
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = images_to_tensor(train_x[idx], device)
            if augment:
                xb = _augment(xb)
            loss = torch.nn.functional.mse_loss(model(xb), ty[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        val_pred = predict_patches(model, val_x, batch_size=batch_size * 2, device=device)
        val_pcc = float(np.nan_to_num(pearson_per_gene(val_pred, val_y)).mean())
        row = {
            "epoch": epoch,
            "train_mse": float(np.mean(losses)),
            "val_mse": float(((val_pred - val_y) ** 2).mean()),
            "val_pcc": val_pcc,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info("epoch %d train_mse %.4f val_mse %.4f val_pcc %.4f (%.1fs)", *row.values())
        if val_pcc > best_pcc:
            best_pcc, best_epoch = val_pcc, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif patience is not None and epoch - best_epoch >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch=best_epoch, best_val_pcc=best_pcc, history=history)


def predict_patches(model, patches: np.ndarray, *, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Predictions for in-memory (N, H, W, 3) uint8 patches, in eval mode."""
    import torch

    from ..inference import images_to_tensor

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            out.append(model(images_to_tensor(patches[i : i + batch_size], device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_genes), np.float32)
