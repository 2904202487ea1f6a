"""The project's cellpose nucleus model: trained with cellpose's own API on annotated H&E (TNBC 01-08).

:func:`iter_train_nuclei_model` trains a cellpose 3.x network (the CP residual U-Net, random
initialisation: nothing is downloaded) with ``cellpose.train.train_seg`` and installs it in the
user's cellpose models folder (:func:`~napari_rapacl.segmentation.cellpose_models_dir`) under
:data:`PROJECT_NUCLEI_MODEL`, with a small JSON sidecar (``<model>.rapacl.json``) that records how the
model must be fed: the training pixel size (``train_mpp``; any slide is resampled to it at
inference), the input (the haematoxylin optical density, one channel, normalised per image by
cellpose) and the default size filter. The file, the sidecar and cellpose's ``gui_models.txt``
listing are written atomically.

Training data: the TNBC nuclei tiles (``<data>/tnbc_nuclei``, ~0.25 um/px) of patients 01-08 only
(09-11 are the held-out test), resampled to ``train_mpp`` so that a median nucleus is about
cellpose's ``diam_mean`` (17 px) across. Stain handling that is not tuned to one patient: the input is
the haematoxylin channel (colour deconvolution), normalised per image by cellpose's 1-99 percentile
normalisation, and every tile is also used in ``stain_copies`` colour-jittered versions (random
scaling and shift of the haematoxylin, eosin and DAB optical densities before the deconvolution).
cellpose adds rotations, flips and a +-25 % scale jitter.

Deterministic for a seed on the CPU (torch's initialisation, the colour jitter and cellpose's
per-epoch ``np.random.seed(epoch)``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import RapaclInputError
from ..progress import Progress

#: The name of the project's nucleus model in the cellpose models folder.
PROJECT_NUCLEI_MODEL = "rapacl_nuclei_tnbc"
#: The sidecar written beside a model file by :func:`iter_train_nuclei_model`.
SIDECAR_SUFFIX = ".rapacl.json"
#: The command that builds the project model (and how long it took on 2 CPU cores, see training/README.md).
BUILD_COMMAND = "python -m training.cellpose_nuclei"
BUILD_TIME = "about 75 minutes on 2 busy CPU cores"
#: TNBC patients used for training (09-11 are the held-out test set and never used here).
DEV_PATIENTS = tuple(range(1, 9))
HELD_OUT_PATIENTS = (9, 10, 11)
TNBC_MPP = 0.25
#: Pixel size (um/px) the network is trained and run at: TNBC's median nucleus (~5.2 um) is then ~17 px.
TRAIN_MPP = 0.3
#: cellpose's nominal object diameter (px) of the network (17 px as cellpose's own nuclei model).
DIAM_MEAN = 17.0
#: Default size filter of the project model (um^2): TNBC's annotations have 20 % of nuclei below 12 um^2
#: (lymphocytes and nuclei cut by the tile edge).
PROJECT_MIN_AREA_UM2 = 4.0
#: Channels of the U-Net's levels (input channels first). cellpose's own is (2, 32, 64, 128, 256); half
#: the width trains ~2.5x faster on a CPU, which makes a from-scratch model buildable there.
PROJECT_NBASE = (2, 16, 32, 64, 128)

log = logging.getLogger(__name__)


class _Cancelled(Exception):
    """Raised inside the training thread when the generator is closed."""


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The JSON sidecar of a cellpose model file (``<file>.rapacl.json``)."""
    return Path(str(model_path) + SIDECAR_SUFFIX)


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``model_path`` as a dict, None when there is none; a damaged one is an error."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RapaclInputError(
            f"{path}: cannot read the model's settings ({exc}); rebuild the model with `{BUILD_COMMAND}`"
        ) from None
    mpp = data.get("train_mpp") if isinstance(data, dict) else None
    if not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        raise RapaclInputError(
            f"{path}: 'train_mpp' must be a pixel size > 0 (um/px), got {mpp!r}; rebuild the model with "
            f"`{BUILD_COMMAND}`"
        )
    return data


def project_nuclei_model_path(models_dir: str | os.PathLike | None = None) -> Path:
    """Where the project model lives (it may not exist): ``<cellpose models folder>/rapacl_nuclei_tnbc``."""
    from ._cellpose import cellpose_models_dir

    return Path(models_dir) if models_dir is not None else cellpose_models_dir() / PROJECT_NUCLEI_MODEL


def project_nuclei_model_built() -> bool:
    """Whether the project's nucleus model (file and sidecar) is installed in the cellpose models folder."""
    path = project_nuclei_model_path()
    return path.is_file() and sidecar_path(path).is_file()


def not_built_message() -> str:
    """What to do when the project model is needed but not built."""
    return (
        f"the project's nucleus model {PROJECT_NUCLEI_MODEL!r} is not built yet: build it with "
        f"`{BUILD_COMMAND}` ({BUILD_TIME}; needs the TNBC nuclei data in <data>/tnbc_nuclei), or add "
        "--build-model to `napari-rapacl segment`"
    )


# ---- data --------------------------------------------------------------------------------------


def tnbc_tiles(root: str | os.PathLike, patients: Sequence[int]) -> list[dict[str, Any]]:
    """TNBC tiles of ``patients``: name, patient, RGB (RGBA over white) and 8-connected instance labels.

    ``root`` is the ``tnbc_nuclei`` folder (``Slide_PP/*.png`` images, ``GT_PP/*.png`` masks).
    """
    from PIL import Image
    from scipy import ndimage as ndi

    from .._image import as_rgb_uint8

    root = Path(root)
    tiles = []
    for patient in patients:
        folder = root / f"Slide_{int(patient):02d}"
        images = sorted(folder.glob("*.png"))
        if not images:
            raise FileNotFoundError(
                f"no TNBC tiles in {folder}: point --data-dir (or $NAPARI_RAPACL_DATA_DIR) at the folder "
                "that holds tnbc_nuclei/"
            )
        for image in images:
            mask_path = root / f"GT_{int(patient):02d}" / image.name
            if not mask_path.is_file():
                raise FileNotFoundError(f"{image}: its annotation {mask_path} is missing")
            rgb = as_rgb_uint8(np.asarray(Image.open(image)))
            mask = np.asarray(Image.open(mask_path))
            if mask.ndim == 3:
                mask = mask[..., 0]
            if mask.shape != rgb.shape[:2]:
                raise RapaclInputError(f"{mask_path}: mask {mask.shape} does not match image {rgb.shape[:2]}")
            labels, _ = ndi.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
            tiles.append(
                {"name": image.stem, "patient": int(patient), "rgb": rgb, "labels": labels.astype(np.int32)}
            )
    return tiles


def resample_tile(rgb: np.ndarray, labels: np.ndarray | None, mpp: float, target_mpp: float):
    """``rgb`` (bilinear, antialiased) and ``labels`` (nearest) resampled from ``mpp`` to ``target_mpp``."""
    from skimage.transform import resize

    scale = mpp / target_mpp
    if abs(scale - 1.0) < 1e-6:
        return rgb, labels
    shape = (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale)))
    out = resize(rgb, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    lab = None
    if labels is not None:
        lab = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return out, lab


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 0.3) -> np.ndarray:
    """``rgb`` re-stained: the H, E and DAB optical densities scaled by ``1 +- strength`` and shifted.

    Models lab-to-lab stain differences (paler or darker haematoxylin, more or less eosin) so that
    the network does not learn one patient's stain.
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    alpha = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    beta = rng.uniform(-0.05 * strength, 0.05 * strength, size=3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def model_input(rgb: np.ndarray) -> np.ndarray:
    """The network's input: the haematoxylin optical density (float32, bright nuclei)."""
    from ._stain import _haematoxylin

    return np.ascontiguousarray(_haematoxylin(rgb), dtype=np.float32)


# ---- training ----------------------------------------------------------------------------------


def _install(trained: Path, target: Path, sidecar: dict[str, Any]) -> None:
    """Copy ``trained`` to ``target`` atomically, write its sidecar and list it in gui_models.txt."""
    from .._atomic import write_atomic, write_text_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sidecar_path(target), json.dumps(sidecar, indent=2) + "\n")
    write_atomic(target, lambda tmp: shutil.copyfile(trained, tmp))
    listing = target.parent / "gui_models.txt"
    try:
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    except OSError:
        names = []
    if target.name not in names:
        write_text_atomic(listing, "\n".join([*names, target.name]) + "\n")


def iter_train_nuclei_model(
    data_dir: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    patients: Sequence[int] = DEV_PATIENTS,
    epochs: int = 200,
    batch_size: int = 8,
    images_per_epoch: int = 16,
    learning_rate: float = 0.005,
    weight_decay: float = 1e-4,
    bsize: int = 128,
    nbase: Sequence[int] = PROJECT_NBASE,
    stain_copies: int = 3,
    train_mpp: float = TRAIN_MPP,
    seed: int = 0,
    threads: int | None = None,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    crop: int | None = None,
    tiles: list[dict[str, Any]] | None = None,
) -> Generator[Progress, None, Path]:
    """Train the project's cellpose nucleus model; yields :class:`Progress`, returns the model file.

    Parameters
    ----------
    data_dir
        The shared data folder holding ``tnbc_nuclei/`` (default ``$NAPARI_RAPACL_DATA_DIR``), or the
        ``tnbc_nuclei`` folder itself.
    out
        The model file to write (default: :data:`PROJECT_NUCLEI_MODEL` in the cellpose models folder,
        where it is then usable by name).
    patients
        TNBC patients to train on (default 01-08; 09-11 are refused: they are the held-out test).
    epochs, batch_size, images_per_epoch, learning_rate, weight_decay, bsize
        ``cellpose.train.train_seg`` settings (AdamW; one epoch = ``images_per_epoch`` randomly drawn
        images, so ``epochs * images_per_epoch / batch_size`` optimiser steps; ``bsize``: the side of the
        random training crops in px; the learning rate warms up over 10 epochs and is halved 10 times over
        the last 50 when ``epochs > 100``).
    nbase
        The U-Net's channels per level (input channels first; recorded in the sidecar).
    stain_copies
        Colour-jittered copies of each tile (:func:`stain_jitter`) besides the original.
    train_mpp
        Pixel size (um/px) the network is trained at (and every slide is resampled to at inference).
    seed
        Seeds torch's initialisation and the colour jitter.
    cellprob_threshold, flow_threshold
        cellpose's mask settings stored in the sidecar (``eval``) and used at inference (chosen on the
        training patients).
    threads
        torch CPU threads (``torch.set_num_threads``; None leaves torch's setting).
    crop, tiles
        For tests: crop every tile to ``crop`` x ``crop`` px; or give the tiles (dicts with ``rgb``,
        ``labels``, ``name``; at 0.25 um/px) instead of reading TNBC.
    """
    if tiles is None:
        bad = sorted({int(p) for p in patients} & set(HELD_OUT_PATIENTS))
        if bad:
            raise RapaclInputError(
                f"TNBC patients {bad} are the held-out test set: train on patients 01-08 only"
            )
    if int(epochs) < 1:
        raise RapaclInputError(f"epochs={epochs!r} must be >= 1")
    if not train_mpp > 0:
        raise RapaclInputError(f"train_mpp={train_mpp!r} must be > 0 (um/px)")
    from ._cellpose import cellpose_major_version

    major = cellpose_major_version()
    if major != 3:
        raise ImportError(
            f"the project's nucleus model is trained with cellpose 3.x (the CP U-Net); cellpose {major}.x is "
            "installed: pip install 'cellpose>=3.1,<4'"
        )
    target = Path(out).expanduser() if out is not None else project_nuclei_model_path()
    if target.exists() and not target.is_file():
        raise RapaclInputError(f"--out {target}: is a folder; give a model file path")

    t_start = time.perf_counter()
    if tiles is None:
        root = Path(data_dir) if data_dir is not None else _default_data_dir()
        tnbc = root if (root / "Slide_01").is_dir() or root.name == "tnbc_nuclei" else root / "tnbc_nuclei"
        yield Progress("reading TNBC tiles", 0, 1)
        tiles = tnbc_tiles(tnbc, patients)
        source = {"dataset": "tnbc_nuclei", "folder": str(tnbc), "patients": [int(p) for p in patients]}
    else:
        source = {"dataset": "given tiles", "tiles": [str(t.get("name", i)) for i, t in enumerate(tiles)]}
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    label_images: list[np.ndarray] = []
    for k, tile in enumerate(tiles):
        rgb, lab = tile["rgb"], tile["labels"]
        if crop is not None:
            rgb, lab = rgb[:crop, :crop], lab[:crop, :crop]
        rgb, lab = resample_tile(rgb, lab, TNBC_MPP, train_mpp)
        images.append(model_input(rgb))
        label_images.append(lab)
        for _ in range(int(stain_copies)):
            images.append(model_input(stain_jitter(rgb, rng)))
            label_images.append(lab)
        yield Progress("preparing tiles", k + 1, len(tiles))

    import torch
    from cellpose import dynamics, train
    from cellpose.resnet_torch import CPnet

    n_copies = 1 + int(stain_copies)
    # flows once per tile (the copies share the labels)
    yield Progress("computing flows", 0, len(tiles))
    flows0 = dynamics.labels_to_flows(
        [label_images[i] for i in range(0, len(images), n_copies)], device=torch.device("cpu")
    )
    flows = [flows0[i // n_copies] for i in range(len(images))]

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    nbase = [int(c) for c in nbase]
    if nbase[0] != 2 or len(nbase) < 3:
        raise RapaclInputError(f"nbase={nbase}: the first entry is the 2 input channels, then >= 2 levels")
    net = CPnet(nbase, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=DIAM_MEAN)
    n_per_epoch = int(images_per_epoch)
    batches_per_epoch = math.ceil(n_per_epoch / batch_size)
    total = int(epochs) * batches_per_epoch
    state = {"batches": 0, "cancel": False, "loss": float("nan")}
    events: queue.Queue = queue.Queue()

    def hook(module: Any, inputs: Any) -> None:
        if state["cancel"]:
            raise _Cancelled()
        if module.training:
            state["batches"] += 1
            events.put(state["batches"])

    handle = net.register_forward_pre_hook(hook)
    result: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix=".rapacl-cellpose-train-"))

    def run() -> None:
        try:
            result["out"] = train.train_seg(
                net,
                train_data=images,
                train_labels=flows,
                channels=[0, 0],
                normalize=True,
                batch_size=batch_size,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                n_epochs=int(epochs),
                nimg_per_epoch=n_per_epoch,
                rescale=False,
                scale_range=0.5,
                bsize=bsize,
                min_train_masks=1,
                save_path=str(work),
                save_every=10**9,
                model_name="model",
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the generator
            result["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=run, name="cellpose-train", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if item is None:
                break
            if item % batches_per_epoch == 0 or item == total:
                yield Progress("training cellpose", min(item, total), total)
        thread.join()
        if "error" in result:
            raise result["error"]
        trained = Path(result["out"][0])
        losses = np.asarray(result["out"][1], dtype=float)
        seconds = time.perf_counter() - t_start
        sidecar = {
            "name": target.name,
            "format": "napari-rapacl cellpose nucleus model",
            "cellpose": _cellpose_version(),
            "train_mpp": float(train_mpp),
            "diam_mean": DIAM_MEAN,
            "input": "haematoxylin",
            "channels": [0, 0],
            "nbase": nbase,
            "min_area_um2": PROJECT_MIN_AREA_UM2,
            "eval": {
                "cellprob_threshold": float(cellprob_threshold),
                "flow_threshold": float(flow_threshold),
            },
            "source": source,
            "settings": {
                "epochs": int(epochs),
                "batch_size": int(batch_size),
                "images_per_epoch": int(images_per_epoch),
                "learning_rate": float(learning_rate),
                "weight_decay": float(weight_decay),
                "bsize": int(bsize),
                "stain_copies": int(stain_copies),
                "seed": int(seed),
                "crop": crop,
                "threads": torch.get_num_threads(),
            },
            "final_loss": float(losses[-1]) if losses.size else None,
            "train_seconds": round(seconds, 1),
        }
        yield Progress("installing model", 0, 1)
        _install(trained, target, sidecar)
        from ._cellpose import clear_cellpose_cache

        clear_cellpose_cache()  # a model of the same name loaded before is stale now
        log.info("trained %s in %.0f s -> %s", target.name, seconds, target)
        yield Progress("installing model", 1, 1)
        return target
    finally:
        if thread.is_alive():  # closed early: stop the training thread at its next batch
            state["cancel"] = True
            thread.join()
        handle.remove()
        if threads is not None:
            torch.set_num_threads(old_threads)
        shutil.rmtree(work, ignore_errors=True)


def _cellpose_version() -> str:
    from importlib.metadata import version

    return version("cellpose")


def _default_data_dir() -> Path:
    value = os.environ.get("NAPARI_RAPACL_DATA_DIR")
    if value:
        return Path(value).expanduser()
    raise RapaclInputError(
        "where is the TNBC nuclei data? pass --data-dir <folder holding tnbc_nuclei/> or set "
        "$NAPARI_RAPACL_DATA_DIR"
    )
