"""Spot-level inference as a generator: it yields :class:`Progress` between batches and returns the
predictions, so a GUI can show progress and cancel between batches (``thread_worker``), and a script
can simply call :func:`predict_spots`.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .progress import Progress, run_to_completion

if TYPE_CHECKING:
    import torch

    from .io.slide import Slide


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ._errors import RapaclInputError

        raise RapaclInputError(
            f"device {device!r} requested but no CUDA GPU is available here; use --device cpu (or auto)"
        )
    return device


def images_to_tensor(patches: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1] on ``device``."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(patches)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def param_versions(model: Any) -> tuple:
    """The version counters of a module's parameters and buffers: they grow with every in-place change
    (optimizer steps, ``load_state_dict``), so a different tuple means different weights."""
    return tuple(int(getattr(t, "_version", 0)) for t in model.state_dict(keep_vars=True).values())


def _image_predict_module(model: Any):
    """``model.predict({"image": x})`` as a module's forward, for tracing."""
    import torch

    class ImagePredict(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            return self.inner.predict({"image": image})

    return ImagePredict(model).eval()


_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FREEZE_LOCK = threading.Lock()


def frozen_image_predictor(model: Any, device: str) -> Any | None:
    """A TorchScript-frozen ``model.predict({"image": x})`` for CPU inference, or None.

    Only for models that opt in (class attribute ``freeze_for_inference = True``: image-only
    prediction without data-dependent Python control flow, e.g. ``stnet``, ``nh2st``) in eval mode on
    the CPU. ``torch.jit.freeze`` folds batch norms into the convolutions and
    ``optimize_for_inference`` lets oneDNN fuse convolution, addition and ReLU: the baseline's forward
    runs about 1.2x faster on a CPU, with outputs equal to the eager model's to ~1e-7. Built once per
    model (about 1 s for a ResNet-18; the Predict widget does it in the background) and rebuilt when
    the weights change in place. Set ``NAPARI_RAPACL_NO_FREEZE=1`` to use the eager model.
    """
    import os

    import torch

    if (
        not getattr(type(model), "freeze_for_inference", False)
        or not str(device).startswith("cpu")
        or model.training
        or os.environ.get("NAPARI_RAPACL_NO_FREEZE")
    ):
        return None
    versions = param_versions(model)
    with _FREEZE_LOCK:
        memo = _FROZEN.get(model)
        if memo is not None and memo[0] == versions:
            return memo[1]
        size = int(model.config.patch_size)
        example = torch.zeros(2, 3, size, size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of the encoders' shape checks
            traced = torch.jit.trace(_image_predict_module(model), example)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        _FROZEN[model] = (versions, frozen)
        return frozen


#: Per-spot inputs spot inference can provide: the patch, the spot radius (PixNet) and the spot's
#: radiomics computed from the slide with the model's recipe (RaPaCL-ST; :mod:`napari_rapacl.tiled`).
SPOT_INPUTS = ("image", "radius_px", "radiomics")


def radiomics_recipe(model: Any) -> Any:
    """The :class:`~napari_rapacl.radiomics.RadiomicsRecipe` a radiomics-fed model was trained with
    (attached by :func:`~napari_rapacl.models.checkpoint.load_model`), or a clear error."""
    from ._errors import RapaclInputError

    recipe = getattr(model, "radiomics_recipe", None)
    if recipe is None:
        name = getattr(model, "model_name", type(model).__name__)
        raise RapaclInputError(
            getattr(model, "radiomics_recipe_error", None)
            or f"model {name!r} needs radiomics, but it carries no radiomics recipe (how its training "
            "radiomics were made): load it from a checkpoint trained on tables written by "
            "`python -m training.radiomics_tables`"
        )
    return recipe


def check_spot_model(model: Any, radius: Any) -> set[str]:
    """The model's ``predict_inputs``, checked for prediction from the slide (image, the spot radius
    for models that aggregate over the spot, radiomics for models that carry their recipe); raises
    :class:`RapaclInputError` otherwise, e.g. for a RaPaCL-ST Stage 1 model (no gene head)."""
    from ._errors import RapaclInputError

    name = getattr(model, "model_name", type(model).__name__)
    needs = set(getattr(model, "predict_inputs", ("image",)))
    unsupported = needs - set(SPOT_INPUTS)
    if unsupported:
        raise RapaclInputError(
            f"model {name!r} needs {sorted(unsupported)} at prediction time, which spot inference from the "
            "slide does not provide"
        )
    check = getattr(model, "check_can_predict", None)
    if callable(check):
        check()
    if "radius_px" in needs and radius is None:
        raise RapaclInputError(f"model {name!r} aggregates over each spot: pass radius= (level-0 px)")
    if "radiomics" in needs:
        radiomics_recipe(model)
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
    optimize: bool = True,
    inputs: dict[str, np.ndarray] | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Predict expression at spot centres ``(x, y)`` (level-0 px).

    Patches of ``model.config.patch_size`` px at ``model.config.mpp`` um/px are read through the lazy
    slide batch by batch and passed to ``model.predict``. Models that aggregate over the spot
    (``"radius_px"`` in ``model.predict_inputs``, e.g. PixNet) need ``radius`` (level-0 px). Yields a
    :class:`Progress` after every batch; returns ``(n_spots, n_genes)`` float32 predictions (the
    generator's return value). With ``optimize`` (the default) models that opt in run through
    :func:`frozen_image_predictor` on the CPU, or, those with ``channels_last_inference = True``
    (RaPaCL-ST: DenseNet runs faster so, and slower frozen), in channels-last memory format.
    ``inputs`` holds other per-spot model inputs, one row per spot (e.g. ``{"radiomics": (n, F)
    float32}``, the model-ready values of :meth:`RadiomicsRecipe.transform`); a model that needs
    radiomics gets them only from here.
    """
    import torch

    from ._errors import RapaclInputError
    from .preprocess import iter_patches

    device = resolve_device(device)
    model = model.to(device).eval()
    cfg = model.config
    needs = check_spot_model(model, radius)
    n = len(x)
    extra: dict[str, np.ndarray] = {}
    for key in sorted(needs - {"image", "radius_px"}):
        value = None if inputs is None else inputs.get(key)
        if value is None or len(value) != n:
            raise RapaclInputError(
                f"model {getattr(model, 'model_name', type(model).__name__)!r} needs {key!r} for each of the "
                f"{n} spots: pass inputs={{{key!r}: array with one row per spot}}"
            )
        extra[key] = np.ascontiguousarray(value)
    fast = frozen_image_predictor(model, device) if optimize and not extra else None
    channels_last = (
        optimize
        and fast is None
        and str(device).startswith("cpu")
        and getattr(type(model), "channels_last_inference", False)
    )
    if channels_last:  # oneDNN's faster convolution layout (DenseNet on 2 cores: 1.4x)
        conv = next((p for p in model.parameters() if p.ndim == 4), None)
        if conv is not None and not conv.is_contiguous(memory_format=torch.channels_last):
            model = model.to(memory_format=torch.channels_last)
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
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        if radius_px is not None:
            batch["radius_px"] = torch.from_numpy(np.ascontiguousarray(radius_px[start:stop])).to(device)
        for key, value in extra.items():
            batch[key] = torch.from_numpy(np.ascontiguousarray(value[start:stop])).to(device)
        with torch.inference_mode():
            pred = fast(batch["image"]) if fast is not None else model.predict(batch)
            out[start:stop] = pred.float().cpu().numpy()
        yield Progress("predict", stop, n)
    return out


def predict_spots(model, slide, x, y, **kwargs) -> np.ndarray:
    """Blocking form of :func:`iter_predict_spots`."""
    return run_to_completion(iter_predict_spots(model, slide, x, y, **kwargs))


def spot_smoothing_matrix(xy_um: np.ndarray, sigma_um: float, *, reach: float = 2.5) -> Any:
    """Row-normalised Gaussian weights between spots: ``W[i, j] = exp(-d_ij^2 / 2 sigma^2)`` for spots
    within ``reach * sigma_um`` of each other (the spot itself has weight 1), as a scipy CSR matrix.

    ``xy_um`` are ``(n, 2)`` spot centres in micrometres; ``sigma_um <= 0`` gives the identity."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy_um must be (n, 2) spot centres in um, got shape {xy.shape}")
    n = xy.shape[0]
    if not np.all(np.isfinite(xy)):
        raise ValueError("xy_um holds NaN or infinite spot positions")
    if sigma_um is None or sigma_um <= 0 or n == 0:
        return sparse.identity(n, format="csr", dtype=np.float64)
    pairs = cKDTree(xy).query_pairs(reach * float(sigma_um), output_type="ndarray")
    d2 = ((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2).sum(1)
    w = np.exp(-d2 / (2.0 * float(sigma_um) ** 2))
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    vals = np.concatenate([w, w, np.ones(n)])
    mat = sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))
    return sparse.diags(1.0 / np.asarray(mat.sum(1)).ravel()) @ mat


def smooth_over_spots(
    pred: np.ndarray, xy_um: np.ndarray, sigma_um: float, *, reach: float = 2.5
) -> np.ndarray:
    """Test-time smoothing of spot predictions over the spot grid (a spot-graph lever: expression is
    spatially autocorrelated, per-spot image predictions are noisy): each spot's prediction becomes the
    Gaussian-weighted mean (``sigma_um``, up to ``reach * sigma_um`` away) of its own and its neighbours'.

    ``pred`` is ``(n, genes)``, ``xy_um`` ``(n, 2)`` spot centres in um (level-0 px x slide um/px).
    ``sigma_um <= 0`` returns ``pred`` unchanged. Models store their setting in the checkpoint
    (``postprocess: {"smooth_sigma_um": s}``, chosen on the inner validation section), and
    :func:`napari_rapacl.jobs.iter_predict` applies it over the spots predicted together."""
    pred = np.asarray(pred)
    if pred.ndim != 2 or pred.shape[0] != len(xy_um):
        raise ValueError(f"pred must be (n_spots, n_genes) with one row per spot, got {pred.shape}")
    if sigma_um is None or sigma_um <= 0:
        return pred
    mat = spot_smoothing_matrix(xy_um, sigma_um, reach=reach)
    return np.asarray(mat @ pred.astype(np.float64), dtype=pred.dtype)


#: Gaussian widths tried (um); her2st ST spots are ~190 um apart (centre to centre), Visium 100 um.
SMOOTH_GRID_UM = (0.0, 75.0, 100.0, 150.0, 200.0, 250.0, 300.0)


def mean_pcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean per-gene Pearson r (genes constant on the section count as 0, as in the benchmark)."""
    from .metrics import pearson_per_gene

    return float(np.nan_to_num(pearson_per_gene(pred, target)).mean())


def choose_sigma(
    preds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], grid: Sequence[float] = SMOOTH_GRID_UM
) -> tuple[float, dict[float, float]]:
    """The width with the best mean validation PCC over ``preds`` = ``[(pred, target, xy_um)]``
    (ties: the smaller width); returns ``(sigma, {sigma: score})``."""
    scores = {
        float(s): float(np.mean([mean_pcc(smooth_over_spots(p, xy, s), t) for p, t, xy in preds]))
        for s in grid
    }
    best = max(scores, key=lambda s: (round(scores[s], 6), -s))
    return best, scores


def smoothing_setting(
    preds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    chosen_on: Sequence[str],
    grid: Sequence[float] = SMOOTH_GRID_UM,
) -> dict[str, Any]:
    """The checkpoint's ``postprocess`` value for spot smoothing chosen on the validation ``preds``
    (:func:`choose_sigma`): ``{"smooth_sigma_um", "chosen_on", "val_pcc_by_sigma"}``."""
    sigma, scores = choose_sigma(preds, grid)
    return {
        "smooth_sigma_um": sigma,
        "chosen_on": [str(s) for s in chosen_on],
        "val_pcc_by_sigma": {f"{k:g}": v for k, v in scores.items()},
    }


def postprocess_setting(payload: dict | None) -> dict[str, Any]:
    """The test-time post-processing a checkpoint records (``{}`` when none)."""
    if not payload:
        return {}
    return dict(payload.get("postprocess") or {})


def model_postprocess(model: Any, checkpoint: str | None = None) -> dict[str, Any]:
    """The test-time post-processing of a loaded model (``postprocess`` of its checkpoint), read from
    ``checkpoint`` once and remembered on the model as ``model.postprocess``; ``{}`` without one."""
    setting = getattr(model, "postprocess", None)
    if setting is None:
        setting = {}
        if checkpoint is not None:
            from .models.checkpoint import read_checkpoint

            setting = postprocess_setting(read_checkpoint(checkpoint))
        model.postprocess = setting
    return setting


def postprocess_spots(values: np.ndarray, xy_um: np.ndarray | None, setting: dict[str, Any]) -> np.ndarray:
    """Apply a checkpoint's ``postprocess`` setting to spot predictions ``(n, genes)`` at ``xy_um``."""
    sigma = float(setting.get("smooth_sigma_um") or 0.0)
    if sigma <= 0 or xy_um is None or len(values) == 0:
        return values
    return smooth_over_spots(values, xy_um, sigma)
