"""cellpose behind ``segment_nuclei(..., method="cellpose")``: model lookup, offline detection, cache.

The real cellpose API (``cellpose.models.CellposeModel.eval``). cellpose 3.x (CI installs 3.1.1.3) and
4.x are supported behind a version check. The model is a local file, or a cellpose model name
(3.x: ``"nuclei"``, ``"cyto3"``, ...; 4.x: ``"cpsam"``) looked up *before* cellpose is called in
``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``; a named model that is not there is
downloaded by cellpose only on a connected machine: with ``$HF_HUB_OFFLINE`` or
``$NAPARI_RAPACL_OFFLINE`` set, or when the download host does not answer within 3 s, a
:class:`CellposeModelUnavailableError` is raised at once (never a hang). Loaded models are cached
in-process per (file, gpu). Input: on 3.x the haematoxylin image (bright nuclei, one channel),
on 4.x the RGB image (``cellpose_input=`` overrides). A region with no tissue is not sent to
cellpose (all-zero labels).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import RapaclInputError
from ._common import _relabel_by_size
from ._stain import _haematoxylin, _optical_density

if TYPE_CHECKING:  # pragma: no cover
    from ._classical import _Params


class CellposeModelUnavailableError(RapaclInputError):
    """A named cellpose model is not on this machine and cannot be downloaded (offline)."""


_CELLPOSE_CACHE: dict[tuple[str, bool], Any] = {}
_CELLPOSE_LOCK = threading.Lock()
_CELLPOSE_HOSTS = {3: "www.cellpose.org", 4: "huggingface.co"}
#: cellpose 3.x file names of the built-in models whose file name differs from the model name.
_CP3_FILENAMES = {"cyto": "cytotorch_0", "cyto2": "cyto2torch_0", "nuclei": "nucleitorch_0"}
#: Built-in model names (``cellpose.models.MODEL_NAMES`` of 3.1.1 and of 4.x).
_CP3_MODEL_NAMES = (
    "cyto3",
    "nuclei",
    "cyto2_cp3",
    "tissuenet_cp3",
    "livecell_cp3",
    "yeast_PhC_cp3",
    "yeast_BF_cp3",
    "bact_phase_cp3",
    "bact_fluor_cp3",
    "deepbacs_cp3",
    "cyto2",
    "cyto",
    "CPx",
    "transformer_cp3",
    "neurips_cellpose_default",
    "neurips_cellpose_transformer",
    "neurips_grayscale_cyto2",
    "CP",
    "TN1",
    "TN2",
    "TN3",
    "LC1",
    "LC2",
    "LC3",
    "LC4",
)
_CP4_MODEL_NAMES = ("cpsam",)


def _import_cellpose() -> Any:
    try:
        from cellpose import models
    except ImportError as exc:
        raise ImportError(
            "method='cellpose' needs cellpose: pip install 'napari-rapacl[cellpose]' (cellpose 3.x or 4.x)"
        ) from exc
    return models


def cellpose_major_version() -> int:
    """Major version of the installed cellpose (3 or 4); ``ImportError`` if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("cellpose")
    except PackageNotFoundError as exc:
        raise ImportError(
            "method='cellpose' needs cellpose: pip install 'napari-rapacl[cellpose]' (cellpose 3.x or 4.x)"
        ) from exc
    major = int(text.split(".")[0])
    if major not in (3, 4):
        raise ImportError(f"cellpose {text} is installed; napari-rapacl supports cellpose 3.x and 4.x")
    return major


def cellpose_models_dir() -> Path:
    """Where cellpose keeps named models: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``."""
    value = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(value).expanduser() if value else Path.home() / ".cellpose" / "models"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _offline_reason() -> str | None:
    for var in ("NAPARI_RAPACL_OFFLINE", "HF_HUB_OFFLINE"):
        if _truthy(var):
            return f"${var} is set"
    return None


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a TCP connection within ``timeout`` s (DNS included, in a thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _looks_like_path(model: str) -> bool:
    return (
        os.sep in model
        or "/" in model
        or (os.altsep is not None and os.altsep in model)
        or Path(model).suffix != ""
        or Path(model).exists()
    )


def _user_models(models_dir: Path) -> list[str]:
    """Names listed in cellpose's ``gui_models.txt`` (user-trained models in the models folder)."""
    listing = models_dir / "gui_models.txt"
    try:
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def resolve_cellpose_model(model: str | os.PathLike | None = None) -> Path:
    """The local file of a cellpose model, downloading a named one only on a connected machine.

    Nothing is imported from cellpose unless a download is needed, so a missing model fails in
    milliseconds.

    Parameters
    ----------
    model
        A file path, or a cellpose model name (cellpose 3.x: ``"nuclei"``, ``"cyto3"``, ... and user
        models listed in ``gui_models.txt``; 4.x: ``"cpsam"``). ``None``: ``"nuclei"`` on 3.x,
        ``"cpsam"`` on 4.x.

    Returns
    -------
    Path
        An existing file.

    Raises
    ------
    FileNotFoundError
        ``model`` is a path (or an unknown name) and no such file exists.
    CellposeModelUnavailableError
        A built-in model name that is not in :func:`cellpose_models_dir` while offline
        (``$NAPARI_RAPACL_OFFLINE`` / ``$HF_HUB_OFFLINE``) or with the download host unreachable (3 s).
    """
    major = cellpose_major_version()
    if model is None:
        model = "nuclei" if major == 3 else "cpsam"
    if isinstance(model, os.PathLike) or _looks_like_path(str(model)):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"cellpose model file not found: {path}")
        return path
    name = str(model)
    filename = _CP3_FILENAMES.get(name, name) if major == 3 else name
    dirs = [cellpose_models_dir()]
    loaded = sys.modules.get("cellpose.models")  # cellpose fixes its folder when first imported
    if loaded is not None and getattr(loaded, "MODEL_DIR", None) is not None:
        cp_dir = Path(loaded.MODEL_DIR)
        if cp_dir not in dirs:
            dirs.append(cp_dir)
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    builtin = _CP3_MODEL_NAMES if major == 3 else _CP4_MODEL_NAMES
    if name not in builtin:
        known = sorted(set(builtin) | {m for d in dirs for m in _user_models(d)})
        raise FileNotFoundError(
            f"cellpose model {name!r} is neither a file nor a model in {dirs[0]} (cellpose {major}.x "
            f"names: {', '.join(known)})"
        )
    where = " or ".join(str(d) for d in dirs)
    reason = _offline_reason()
    host = _CELLPOSE_HOSTS[major]
    if reason is None and not _host_reachable(host):
        reason = f"{host} cannot be reached"
    if reason is not None:
        raise CellposeModelUnavailableError(
            f"cellpose model {name!r} (file {filename}) is not in {where} and {reason}, so it cannot be "
            "downloaded; copy the file there (or point CELLPOSE_LOCAL_MODELS_PATH at its folder), pass "
            "model=<path to a model file>, or use method='classical' (no weights needed)"
        )
    # connected: let cellpose download it into its own models folder
    models = _import_cellpose()  # pragma: no cover - needs the network
    path = Path(models.model_path(name)) if major == 3 else Path(models.cache_CPSAM_model_path())
    if not path.is_file():  # pragma: no cover
        raise CellposeModelUnavailableError(f"cellpose could not download model {name!r} to {path}")
    return path  # pragma: no cover


def load_cellpose_model(model: str | os.PathLike | None = None, gpu: bool = False) -> Any:
    """A ``cellpose.models.CellposeModel`` for ``model`` (see :func:`resolve_cellpose_model`), cached.

    The cache key is (resolved file, gpu): loading the same file twice costs nothing the second time.
    On cellpose 4.x the network runs in float32 on the CPU (``use_bfloat16=False``) and in bfloat16 on
    a GPU (cellpose's default). ``gpu=True`` without a usable GPU falls back to the CPU with a warning.
    """
    path = resolve_cellpose_model(model)
    key = (str(path.resolve()), bool(gpu))
    with _CELLPOSE_LOCK:
        cached = _CELLPOSE_CACHE.get(key)
        if cached is not None:
            return cached
        models = _import_cellpose()
        major = cellpose_major_version()
        use_gpu = bool(gpu)
        if use_gpu:
            from cellpose import core

            if not core.use_gpu():
                warnings.warn("gpu=True but no usable GPU was found; cellpose runs on the CPU", stacklevel=2)
                use_gpu = False
        try:
            if major == 3:
                net = models.CellposeModel(gpu=use_gpu, pretrained_model=str(path))
            else:
                net = models.CellposeModel(gpu=use_gpu, pretrained_model=str(path), use_bfloat16=use_gpu)
        except Exception as exc:  # torch.load / state-dict errors of any kind: name the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RapaclInputError(
                f"{path} is not a cellpose {major}.x model file ({type(exc).__name__}: {first})"
            ) from exc
        _CELLPOSE_CACHE[key] = net
        return net


def clear_cellpose_cache() -> None:
    """Forget every cellpose model loaded by :func:`load_cellpose_model`."""
    with _CELLPOSE_LOCK:
        _CELLPOSE_CACHE.clear()


def _cellpose(
    rgb: np.ndarray,
    p: _Params,
    model: str | os.PathLike | None,
    gpu: bool,
    cellpose_input: str,
    cellpose_kwargs: dict[str, Any] | None,
) -> np.ndarray:
    major = cellpose_major_version()
    mode = cellpose_input
    if mode == "auto":
        mode = "haematoxylin" if major == 3 else "rgb"
    if mode not in ("haematoxylin", "rgb"):
        raise RapaclInputError(f"cellpose_input={cellpose_input!r} must be 'auto', 'haematoxylin' or 'rgb'")
    # no tissue -> nothing to segment (cellpose's percentile normalisation would amplify glass noise)
    nucleus_px = math.pi * (0.5 * p.diameter_um / p.mpp) ** 2
    if int((_optical_density(rgb) > p.tissue_od).sum()) < 2.0 * nucleus_px:
        return np.zeros(rgb.shape[:2], dtype=np.int32)
    net = load_cellpose_model(model, gpu=gpu)
    kwargs: dict[str, Any] = {
        "diameter": p.diameter_um / p.mpp,
        "min_size": max(1, int(math.floor(p.min_area_um2 / p.mpp**2))),
    }
    if mode == "haematoxylin":
        x = _haematoxylin(rgb)
        if major == 3:
            kwargs["channels"] = [0, 0]
    else:
        x = rgb
        kwargs["channel_axis"] = 2
        if major == 3:
            kwargs["channels"] = [0, 0]  # grey from RGB (3.x nets take one cytoplasm + one nuclear channel)
    kwargs.update(cellpose_kwargs or {})
    masks = net.eval(x, **kwargs)[0]
    masks = np.asarray(masks)
    if masks.shape != rgb.shape[:2]:  # pragma: no cover - defensive
        raise RuntimeError(f"cellpose returned masks of shape {masks.shape} for an image {rgb.shape[:2]}")
    masks = masks.astype(np.int32, copy=False)
    return _relabel_by_size(masks, p.min_area_um2 / p.mpp**2, p.max_area_um2 / p.mpp**2)
