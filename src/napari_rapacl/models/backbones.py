"""Image backbones from timm, with offline-safe pretrained weights and foundation encoders.

``name`` is any timm model name (``resnet18``, ``vit_large_patch16_224``, ...) or an ``hf-hub:``
name. The pathology foundation encoders of :data:`FOUNDATION_ENCODERS` (UNI, UNI2-h, H-optimus-0,
Virchow2, Prov-GigaPath, Phikon as timm port) are built OFFLINE from the timm architecture and
keyword arguments their hub configs name, so only the weights file is needed;
``hf-hub:timm/<arch>.<tag>`` names are built as timm's ``<arch>``. Other ``hf-hub:`` names need the
hub for their config.

``pretrained`` is one of:

* ``None`` (default): random initialisation; never touches the network.
* a local file (``.pth``, ``.bin``, ``.safetensors``): for encoders with a classifier-free
  output (``num_classes=0``: every model but PixNet) the state dict is read with
  ``weights_only=True``, passed through timm's own checkpoint filter of that architecture
  (position-embedding resizing etc.) and loaded; a file whose tensors do not match the
  architecture is refused, naming the missing/unexpected tensors (never a silent partial load).
  For feature pyramids (PixNet) timm's ``pretrained_cfg_overlay=dict(file=...)`` loads it.
* ``"hub"``: the weights from the Hugging Face hub / timm. A file already placed in the encoder
  folder (:func:`encoder_weights_dir`) is used first. Refused at once when ``HF_HUB_OFFLINE`` or
  ``NAPARI_RAPACL_OFFLINE`` is set, or when the hub cannot be reached within a few seconds, with the
  file to download and where to put it.

Freezing (``freeze_backbone`` in every model config, applied by ``create_model``):
:func:`freeze_encoder` turns gradients off and keeps the encoder in eval mode through every
``model.train()`` (BatchNorm running statistics and dropout frozen; LayerNorm has no statistics
and its affine parameters are frozen like every other weight).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import RapaclInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HUB_HOST = "huggingface.co"
HUB_TIMEOUT_S = 3.0
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")


@dataclass(frozen=True)
class EncoderFamily:
    """How to build an ``hf-hub:`` encoder without the hub: timm architecture + keyword arguments.

    ``kwargs`` values given as ``"timm:<dotted path>"`` (a layer class) are resolved when the model is
    built. ``note`` is the licence / access note shown in errors and the README table."""

    hub: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    url: str = ""
    #: the RGB mean/std the encoder was trained with, when not ImageNet's (the models feed
    #: ImageNet-normalised images; a forward pre-hook converts them, see :func:`create_backbone`)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


#: ``hf-hub:`` names built offline. Architecture and kwargs follow each repository's timm
#: ``config.json``; the pooled embedding is the class token (``global_pool="token"``).
FOUNDATION_ENCODERS: dict[str, EncoderFamily] = {}


def register_encoder(family: EncoderFamily) -> None:
    """Add (or replace) an ``hf-hub:`` encoder family that can be built offline."""
    FOUNDATION_ENCODERS[family.hub] = family


for _family in (
    EncoderFamily(
        "hf-hub:MahmoodLab/uni",
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        "UNI (ViT-L/16, 1024-d): CC-BY-NC-ND 4.0, gated (accept the terms on the hub, log in)",
        "https://huggingface.co/MahmoodLab/UNI",
    ),
    EncoderFamily(
        "hf-hub:MahmoodLab/UNI2-h",
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "timm:timm.layers.SwiGLUPacked",
            "act_layer": "timm:torch.nn.SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        "UNI2-h (ViT-H/14, 1536-d): CC-BY-NC-ND 4.0, gated",
        "https://huggingface.co/MahmoodLab/UNI2-h",
    ),
    EncoderFamily(
        "hf-hub:bioptimus/H-optimus-0",
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        "H-optimus-0 (ViT-g/14, 1536-d): Apache-2.0; its own RGB mean/std (applied here)",
        "https://huggingface.co/bioptimus/H-optimus-0",
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
    ),
    EncoderFamily(
        "hf-hub:paige-ai/Virchow2",
        "vit_huge_patch14_224",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "mlp_layer": "timm:timm.layers.SwiGLUPacked",
            "act_layer": "timm:torch.nn.SiLU",
            "dynamic_img_size": True,
        },
        "Virchow2 (ViT-H/14, 1280-d class token; the card adds the mean patch token): CC-BY-NC-ND 4.0, gated",
        "https://huggingface.co/paige-ai/Virchow2",
    ),
    EncoderFamily(
        "hf-hub:prov-gigapath/prov-gigapath",
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.33334},
        "Prov-GigaPath tile encoder (ViT-g/14, 1536-d): Apache-2.0, gated",
        "https://huggingface.co/prov-gigapath/prov-gigapath",
    ),
    EncoderFamily(
        "hf-hub:1aurent/vit_base_patch16_224.owkin_pancancer",
        "vit_base_patch16_224",
        {"dynamic_img_size": True},
        "Phikon v1 (ViT-B/16, 768-d) as a timm port: Owkin non-commercial licence. Phikon-v2 is a "
        "transformers (not timm) checkpoint: not loadable here",
        "https://huggingface.co/1aurent/vit_base_patch16_224.owkin_pancancer",
    ),
):
    register_encoder(_family)


def offline() -> bool:
    """True when downloads are disabled by the environment."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "NAPARI_RAPACL_OFFLINE"))


def encoder_weights_dir() -> Path:
    """Where downloaded encoder weights may be placed: ``$NAPARI_RAPACL_ENCODERS_DIR``, else
    ``<napari-rapacl cache>/encoders`` (``$NAPARI_RAPACL_CACHE_DIR`` or ``~/.cache/napari-rapacl``).
    An ``hf-hub:org/repo`` encoder's file goes to ``<this>/org/repo/pytorch_model.bin`` (or
    ``model.safetensors``)."""
    value = os.environ.get("NAPARI_RAPACL_ENCODERS_DIR")
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("NAPARI_RAPACL_CACHE_DIR")
    return (Path(cache).expanduser() if cache else Path("~/.cache/napari-rapacl").expanduser()) / "encoders"


def placed_weights(name: str) -> Path | None:
    """The weights file of ``hf-hub:org/repo`` placed in :func:`encoder_weights_dir`, if any."""
    if not name.startswith("hf-hub:"):
        return None
    folder = encoder_weights_dir() / name[len("hf-hub:") :]
    for fname in WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    return None


def _download_hint(name: str) -> str:
    family = FOUNDATION_ENCODERS.get(name)
    where = encoder_weights_dir() / name[len("hf-hub:") :] if name.startswith("hf-hub:") else None
    repo = f"https://huggingface.co/{name[7:]}" if where else f"timm's {name!r}"
    if family and family.url:
        repo = family.url
    text = f"download its weights file (pytorch_model.bin or model.safetensors) from {repo}"
    if family and family.note:
        text += f" ({family.note})"
    if where is not None:
        text += f", put it at {where / 'pytorch_model.bin'} (found there automatically), or"
    return text + " set pretrained: /path/to/that/file"


def _hub_reachable() -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def resolve_architecture(name: str) -> tuple[str, dict[str, Any]]:
    """The timm architecture and keyword arguments that build ``name`` without the hub."""
    family = FOUNDATION_ENCODERS.get(name)
    if family is not None:
        return family.arch, _resolve_kwargs(family.kwargs)
    if name.startswith("hf-hub:timm/"):
        return name[len("hf-hub:timm/") :].split(".")[0], {}
    return name, {}


def _resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    import importlib

    out = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value.startswith("timm:"):
            module, _, attr = value[len("timm:") :].rpartition(".")
            value = getattr(importlib.import_module(module), attr)
        out[key] = value
    return out


def _known_offline(name: str) -> bool:
    return not name.startswith("hf-hub:") or name in FOUNDATION_ENCODERS or name.startswith("hf-hub:timm/")


def create_backbone(name: str, pretrained: str | None = None, **kwargs):
    """``timm.create_model`` for ``name`` with the weight policy described in the module docstring.

    Extra keyword arguments go to timm (e.g. ``num_classes=0`` for pooled features or
    ``features_only=True, out_indices=(1, 2, 3, 4)`` for a feature pyramid); for a foundation
    encoder they are added to (and override) its family's arguments. The models feed
    ImageNet-normalised images; an encoder trained with another mean/std
    (:attr:`EncoderFamily.mean`) gets a forward pre-hook that converts them.
    """
    model = _create_backbone(name, pretrained, **kwargs)
    family = FOUNDATION_ENCODERS.get(name)
    if family is not None and family.mean is not None and family.std is not None:
        scale = tuple(si / so for si, so in zip(IMAGENET_STD, family.std, strict=True))
        pairs = zip(IMAGENET_MEAN, family.mean, family.std, strict=True)
        shift = tuple((mi - mo) / so for mi, mo, so in pairs)
        model.register_forward_pre_hook(functools.partial(_renormalize, scale, shift))
    return model


def _renormalize(scale: tuple, shift: tuple, module, args):
    """Forward pre-hook: ImageNet-normalised input -> the encoder's own normalisation."""
    import torch

    x = args[0]
    a = torch.tensor(scale, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    b = torch.tensor(shift, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * a + b, *args[1:])


def _create_backbone(name: str, pretrained: str | None = None, **kwargs):
    import timm

    if pretrained == "hub":
        placed = placed_weights(name)
        if placed is not None:
            pretrained = str(placed)
        elif offline():
            raise RapaclInputError(
                f"pretrained='hub' for backbone {name!r} needs a download, but this machine is offline "
                f"(HF_HUB_OFFLINE / NAPARI_RAPACL_OFFLINE is set): {_download_hint(name)}"
            )
        elif not _hub_reachable():
            raise RapaclInputError(
                f"pretrained='hub' for backbone {name!r}: the hub ({HUB_HOST}) is not reachable from this "
                f"machine within {HUB_TIMEOUT_S:.0f} s: {_download_hint(name)}"
            )
        else:
            return timm.create_model(name, pretrained=True, **kwargs)
    if not _known_offline(name):
        if offline() or not _hub_reachable():
            raise RapaclInputError(
                f"backbone {name!r}: its architecture is read from the hub, which is not reachable "
                f"(offline). Name its timm architecture instead (e.g. vit_large_patch16_224) with "
                f"pretrained: /path/to/weights, or one of the encoders built offline: "
                f"{sorted(FOUNDATION_ENCODERS)}"
            )
        arch, family_kwargs = name, {}
    else:
        arch, family_kwargs = resolve_architecture(name)
    build_kwargs = {**family_kwargs, **kwargs}
    if pretrained is None:
        return timm.create_model(arch, pretrained=False, **build_kwargs)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file for backbone {name!r} not found: {path}; {_download_hint(name)}"
        )
    if build_kwargs.get("features_only"):
        return timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **build_kwargs
        )
    model = timm.create_model(arch, pretrained=False, **build_kwargs)
    load_encoder_weights(model, path, name)
    return model


def load_encoder_weights(model, path: str | os.PathLike, name: str = "") -> None:
    """Load a weights file into a timm model: timm's reader (safetensors or ``torch.load`` with
    ``weights_only=True``, ``state_dict``/``model`` keys, ``module.`` prefixes), the architecture's
    own checkpoint filter, the classifier dropped when the model has none; any other missing or
    unexpected tensor is an error that names a few."""
    import sys

    from timm.models import load_state_dict

    path = Path(path)
    label = f"backbone {name!r}" if name else type(model).__name__
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:
        raise RapaclInputError(
            f"{path}: cannot read encoder weights for {label} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); expected a .bin/.pth/.safetensors "
            "state dict"
        ) from None
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            state = filter_fn(state, model)
        except TypeError:
            state = filter_fn(state)
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        for suffix in (".weight", ".bias"):
            if head + suffix not in own:
                state.pop(head + suffix, None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise RapaclInputError(
            f"{path}: its tensors do not fit {label} (a different architecture or size?): "
            f"{str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()[:300]}"
        ) from None
    missing = [k for k in result.missing_keys if k in own]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise RapaclInputError(
            f"{path} does not hold the weights of {label}: {len(missing)} of its {len(own)} tensors "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); check "
            "that the backbone name matches the file"
        )


def _keep_eval(module, args) -> None:
    """Forward pre-hook of a frozen encoder: back to eval mode if a ``train()`` call switched it."""
    if module.training:
        module.eval()


def freeze_encoder(encoder) -> None:
    """Freeze ``encoder`` in place: no gradients, eval mode kept through every ``train()`` call
    (BatchNorm statistics and dropout frozen; the trainer's optimiser skips it)."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.eval()
    if not getattr(encoder, "_napari_rapacl_frozen", False):
        encoder.register_forward_pre_hook(_keep_eval)
        encoder._napari_rapacl_frozen = True


def is_frozen(encoder) -> bool:
    return bool(getattr(encoder, "_napari_rapacl_frozen", False))


def weights_hash(module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, values): the identity of weights."""
    import torch

    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
