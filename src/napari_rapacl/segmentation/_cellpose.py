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

The project's own nucleus model (:data:`PROJECT_NUCLEI_MODEL`, built by ``python -m
training.cellpose_nuclei``, see :mod:`._cellpose_train`) is a cellpose 3.x model file with a JSON
sidecar: it is the default model when it is built (cellpose's pretrained names stay available by
name), the region is resampled to its training pixel size and fed its training input (the
haematoxylin channel), and its sidecar's size filter is the default one. Without it and without a
usable pretrained model, the error names the command that builds it.
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


def _project_model() -> tuple[str, Path]:
    from ._cellpose_train import PROJECT_NUCLEI_MODEL, project_nuclei_model_path

    return PROJECT_NUCLEI_MODEL, project_nuclei_model_path()


def resolve_cellpose_model(model: str | os.PathLike | None = None, *, local_only: bool = False) -> Path:
    """The local file of a cellpose model, downloading a named one only on a connected machine.

    Nothing is imported from cellpose unless a download is needed, so a missing model fails in
    milliseconds.

    Parameters
    ----------
    model
        A file path, or a cellpose model name (cellpose 3.x: ``"nuclei"``, ``"cyto3"``, ... and user
        models listed in ``gui_models.txt``, and the project's ``"rapacl_nuclei_tnbc"``; 4.x:
        ``"cpsam"``). ``None``: on 3.x the project's model when it is built, else ``"nuclei"``;
        ``"cpsam"`` on 4.x.

    local_only
        Never download: a named model that is not on this machine raises ``FileNotFoundError``.

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
    project_name, project_path = _project_model()
    default = model is None
    if model is None:
        model = "nuclei" if major == 3 else "cpsam"
        if major == 3 and project_path.is_file():
            model = project_name
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
    if local_only:  # never the network
        raise FileNotFoundError(f"cellpose model {name!r} is not in {' or '.join(str(d) for d in dirs)}")
    if name == project_name:
        from ._cellpose_train import not_built_message

        if major != 3:
            raise CellposeModelUnavailableError(
                f"cellpose model {name!r} is a cellpose 3.x model and cellpose {major}.x is installed: "
                "pip install 'cellpose>=3.1,<4', or use model='cpsam'"
            )
        raise CellposeModelUnavailableError(f"{not_built_message()} (looked in {dirs[0]})")
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
        build = ""
        if major == 3:
            from ._cellpose_train import BUILD_COMMAND, BUILD_TIME

            build = f", build the project's model {project_name!r} with `{BUILD_COMMAND}` ({BUILD_TIME})"
            if default:
                build += " (it is then the default)"
        raise CellposeModelUnavailableError(
            f"cellpose model {name!r} (file {filename}) is not in {where} and {reason}, so it cannot be "
            "downloaded; copy the file there (or point CELLPOSE_LOCAL_MODELS_PATH at its folder), pass "
            f"model=<path to a model file>{build}, or use method='classical' (no weights needed)"
        )
    # connected: let cellpose download it into its own models folder
    models = _import_cellpose()  # pragma: no cover - needs the network
    path = Path(models.model_path(name)) if major == 3 else Path(models.cache_CPSAM_model_path())
    if not path.is_file():  # pragma: no cover
        raise CellposeModelUnavailableError(f"cellpose could not download model {name!r} to {path}")
    return path  # pragma: no cover


_SETTINGS_CACHE: dict[tuple[str, int], dict[str, Any] | None] = {}


def cellpose_model_settings(model: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The project sidecar of a cellpose model (training pixel size, input, size filter), or None.

    None for cellpose's own models, any model file without a ``<file>.rapacl.json`` beside it, and a
    model that is not on this machine (never looked up on the network).
    """
    from ._cellpose_train import read_sidecar, sidecar_path

    try:
        path = resolve_cellpose_model(model, local_only=True)
    except FileNotFoundError:  # not on this machine: not a project model (the caller's lookup will say)
        return None
    side = sidecar_path(path)
    try:
        stamp = side.stat().st_mtime_ns
    except OSError:
        return None
    key = (str(side), stamp)
    if key not in _SETTINGS_CACHE:
        _SETTINGS_CACHE[key] = read_sidecar(path)
    return _SETTINGS_CACHE[key]


def cellpose_model_choices(probe_network: bool = True, timeout: float = 1.0) -> list[str]:
    """cellpose model names usable now, for a model picker; never waits more than ``timeout`` s.

    The project's model first when it is built, then the user's models in the cellpose models folder
    (``gui_models.txt`` entries whose file exists), then cellpose's pretrained models: those whose file
    is already on this machine, and (3.x ``nuclei``, ``cyto3``; 4.x ``cpsam``) those that can be
    downloaded, only when the machine is online (not ``$NAPARI_RAPACL_OFFLINE`` / ``$HF_HUB_OFFLINE``,
    and the download host answers within ``timeout`` s; ``probe_network=False`` skips the probe and
    offers only local files). An empty list when cellpose is not installed.
    """
    try:
        major = cellpose_major_version()
    except ImportError:
        return []
    models_dir = cellpose_models_dir()
    names: list[str] = []
    project_name, project_path = _project_model()
    if major == 3 and project_path.is_file():
        names.append(project_name)
    for name in _user_models(models_dir):
        if name not in names and name != project_name and (models_dir / name).is_file():
            names.append(name)
    builtin = _CP3_MODEL_NAMES if major == 3 else _CP4_MODEL_NAMES
    for name in builtin:
        filename = _CP3_FILENAMES.get(name, name) if major == 3 else name
        if name not in names and (models_dir / filename).is_file():
            names.append(name)
    online = (
        probe_network
        and _offline_reason() is None
        and _host_reachable(_CELLPOSE_HOSTS[major], timeout=max(0.1, timeout - 0.5))
    )
    if online:
        for name in ("nuclei", "cyto3") if major == 3 else ("cpsam",):
            if name not in names:
                names.append(name)
    return names


def _load_project_net(models: Any, path: Path, settings: dict[str, Any], use_gpu: bool) -> Any:
    """A ``CellposeModel`` whose network is the project's U-Net (its width from the sidecar)."""
    import torch
    from cellpose.resnet_torch import CPnet

    class ProjectNet(CPnet):
        """cellpose's U-Net whose style vector is zero-padded to the 256 values ``cellpose.core`` expects
        (a narrower net's last level has fewer channels; the style is not used for segmentation)."""

        def forward(self, data):
            out = super().forward(data)
            style = out[1]
            if style.shape[1] < 256:
                style = torch.nn.functional.pad(style, (0, 256 - style.shape[1]))
            return (out[0], style, *out[2:])

    nbase = [int(c) for c in settings.get("nbase", (2, 32, 64, 128, 256))]
    diam_mean = float(settings.get("diam_mean", 30.0))
    net = models.CellposeModel(gpu=use_gpu, pretrained_model=False, diam_mean=diam_mean, nchan=nbase[0])
    cpnet = ProjectNet(nbase, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=diam_mean)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    cpnet.load_state_dict(state)
    net.net = cpnet.to(net.device)
    net.net.eval()
    net.diam_mean = float(cpnet.diam_mean.data.cpu().numpy()[0])
    net.diam_labels = float(cpnet.diam_labels.data.cpu().numpy()[0])
    net.pretrained_model = str(path)
    return net


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
        settings = cellpose_model_settings(path)
        try:
            if settings is not None:
                net = _load_project_net(models, path, settings, use_gpu)
            elif major == 3:
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
    """Forget every cellpose model loaded by :func:`load_cellpose_model` (and the sidecars read)."""
    with _CELLPOSE_LOCK:
        _CELLPOSE_CACHE.clear()
        _SETTINGS_CACHE.clear()


def _cellpose(
    rgb: np.ndarray,
    p: _Params,
    model: str | os.PathLike | None,
    gpu: bool,
    cellpose_input: str,
    cellpose_kwargs: dict[str, Any] | None,
) -> np.ndarray:
    major = cellpose_major_version()
    settings = cellpose_model_settings(model)
    mode = cellpose_input
    if mode == "auto":
        mode = "haematoxylin" if major == 3 else "rgb"
        if settings is not None:
            mode = str(settings.get("input", mode))
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
    if settings is not None:  # run at the training pixel size: rescale instead of a diameter
        kwargs["diameter"] = None
        kwargs["rescale"] = p.mpp / float(settings["train_mpp"])
        kwargs.update(settings.get("eval") or {})  # its mask thresholds
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
