"""Spot-level inference as a generator: it yields :class:`Progress` between batches and returns the
predictions, so a GUI can show progress and cancel between batches (``thread_worker``), and a script
can simply call :func:`predict_spots`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from .io.slide import Slide


@dataclass(frozen=True)
class Progress:
    """One step of a long job: ``done`` of ``total`` units of ``stage`` are finished.

    ``result`` optionally carries something usable before the job ends (a partial result, e.g. the
    predictions of a viewer's view before the tiles around it are complete); it takes no part in
    comparisons.
    """

    stage: str
    done: int
    total: int
    result: Any = field(default=None, compare=False, repr=False)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def images_to_tensor(patches: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] on ``device``."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(patches)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def check_spot_model(model: Any, radius: Any) -> set[str]:
    """The model's ``predict_inputs``, checked for prediction from the slide alone (image, and the spot
    radius for models that aggregate over the spot); raises :class:`RapaclInputError` otherwise."""
    from ._errors import RapaclInputError

    name = getattr(model, "model_name", type(model).__name__)
    needs = set(getattr(model, "predict_inputs", ("image",)))
    unsupported = needs - {"image", "radius_px"}
    if unsupported:
        raise RapaclInputError(
            f"model {name!r} needs {sorted(unsupported)} at prediction time, which spot inference from the "
            "slide alone does not provide"
        )
    if "radius_px" in needs and radius is None:
        raise RapaclInputError(f"model {name!r} aggregates over each spot: pass radius= (level-0 px)")
    return needs


def iter_predict_spots(
    model: torch.nn.Module,
    slide: Slide,
    x: np.ndarray,
    y: np.ndarray,
    *,
    radius: np.ndarray | float | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> Generator[Progress, None, np.ndarray]:
    """Predict expression at spot centres ``(x, y)`` (level-0 px).

    Patches of ``model.config.patch_size`` px at ``model.config.mpp`` um/px are read through the lazy
    slide batch by batch and passed to ``model.predict``. Models that aggregate over the spot
    (``"radius_px"`` in ``model.predict_inputs``, e.g. PixNet) need ``radius`` (level-0 px). Yields a
    :class:`Progress` after every batch; returns ``(n_spots, n_genes)`` float32 predictions (the
    generator's return value).
    """
    import torch

    from .preprocess import iter_patches

    device = resolve_device(device)
    model = model.to(device).eval()
    cfg = model.config
    needs = check_spot_model(model, radius)
    n = len(x)
    radius_px = None
    if "radius_px" in needs:
        # spot radius in the model's patch pixels
        scale = slide.require_mpp("spot-size aware prediction") / cfg.mpp
        radius_px = np.broadcast_to(np.asarray(radius, dtype=np.float32) * scale, (n,)).copy()
    out = np.empty((n, cfg.n_genes), dtype=np.float32)
    yield Progress("predict", 0, n)
    for start, stop, patches in iter_patches(
        slide, x, y, size=cfg.patch_size, mpp=cfg.mpp, batch_size=batch_size
    ):
        batch = {"image": images_to_tensor(patches, device)}
        if radius_px is not None:
            batch["radius_px"] = torch.from_numpy(np.ascontiguousarray(radius_px[start:stop])).to(device)
        with torch.inference_mode():
            out[start:stop] = model.predict(batch).float().cpu().numpy()
        yield Progress("predict", stop, n)
    return out


def run_to_completion(gen: Generator[Progress, None, np.ndarray]) -> np.ndarray:
    """Drain a progress generator and return its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def predict_spots(model, slide, x, y, **kwargs) -> np.ndarray:
    """Blocking form of :func:`iter_predict_spots`."""
    return run_to_completion(iter_predict_spots(model, slide, x, y, **kwargs))
