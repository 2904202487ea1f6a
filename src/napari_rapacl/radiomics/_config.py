"""Settings of the radiomics engine, the RaPaCL-ST 72 feature names, and the pyradiomics import."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .._errors import RapaclInputError

#: Bumped whenever a change here changes any feature value; part of every cache key.
FEATURES_VERSION = "1"

#: pyradiomics image types that make sense on a 2-D image (LBP3D is 3-D only).
IMAGE_TYPES = (
    "Original",
    "Wavelet",
    "LoG",
    "Square",
    "SquareRoot",
    "Logarithm",
    "Exponential",
    "Gradient",
    "LBP2D",
)
#: pyradiomics feature classes usable on a 2-D image (``shape`` is 3-D only; use ``shape2D``).
FEATURE_CLASSES = ("shape2D", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
TEXTURE_CLASSES = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")
GREY_MODES = ("luminance", "haematoxylin")

#: pyradiomics shape2D features (non-deprecated), in pyradiomics' order.
SHAPE2D_FEATURES = (
    "Elongation",
    "MajorAxisLength",
    "MaximumDiameter",
    "MeshSurface",
    "MinorAxisLength",
    "Perimeter",
    "PerimeterSurfaceRatio",
    "PixelSurface",
    "Sphericity",
)

#: Statistics of a per-nucleus shape distribution (``morph_<shape>_<stat>``); see ``_core.morph_stats``.
MORPH_STATS = (
    "minimum",
    "maximum",
    "range",
    "mean",
    "median",
    "p10",
    "p25",
    "p75",
    "p90",
    "interquartilerange",
    "standarddeviation",
    "variance",
    "meanabsolutedeviation",
    "robustmeanabsolutedeviation",
    "rootmeansquared",
    "energy",
    "entropy",
    "uniformity",
    "skewness",
    "kurtosis",
)

INSTALL_HINT = (
    'pip install "napari-rapacl[radiomics]" -- pyradiomics ships no wheels for Python >= 3.10: install '
    "numpy, SimpleITK, PyWavelets, pykwalify and six first, then "
    '"pip install --no-build-isolation pyradiomics==3.0.1" (needs gcc and the Python headers)'
)

_log_configured = False


def require_radiomics() -> Any:
    """Import pyradiomics (and SimpleITK) or raise an ImportError that says how to install them.

    Also sets the ``radiomics`` logger to WARNING: pyradiomics logs a lot at INFO, and napari's
    pytest plugin / log handlers break its ``%``-formatting (``TypeError: not all arguments
    converted``).

    Returns
    -------
    module
        The ``radiomics`` package (pyradiomics, not this module).
    """
    global _log_configured
    try:
        import radiomics
        import SimpleITK  # noqa: F401
        from radiomics import featureextractor  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"radiomics features need pyradiomics and SimpleITK ({exc}). {INSTALL_HINT}"
        ) from exc
    if not _log_configured:
        logging.getLogger("radiomics").setLevel(logging.WARNING)
        _log_configured = True
    return radiomics


@lru_cache(maxsize=1)
def rapacl72_names() -> tuple[str, ...]:
    """The RaPaCL-ST 72 per-spot feature names, in the order of methods.md 1.3.

    Read from ``napari_rapacl/data/rapacl_radiomics_72.txt`` (one name a line), the single source
    of this list.
    """
    text = resources.files("napari_rapacl").joinpath("data/rapacl_radiomics_72.txt").read_text()
    names = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if len(names) != 72 or len(set(names)) != 72:
        raise RuntimeError(f"rapacl_radiomics_72.txt must hold 72 unique names, found {len(names)}")
    return names


def _canonical(value: str, allowed: tuple[str, ...], what: str) -> str:
    lookup = {a.lower(): a for a in allowed}
    key = str(value).strip().lower()
    if key not in lookup:
        raise RapaclInputError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    return lookup[key]


@dataclass(frozen=True)
class CompositionRule:
    """Thresholds of the morphology rule that gives a spot its cell-composition class.

    Without a cell-type classifier (none runs offline) every nucleus is typed by its size and
    shape, using textbook nuclear morphology at H&E:

    * *inflammatory-like*: small and round -- lymphocyte nuclei are 5-7 um across
      (area < ``small_area_um2``, elongation >= ``round_elongation``);
    * *neoplastic-like*: large and not spindle-shaped -- carcinoma nuclei are typically
      >= 9-10 um across (area >= ``large_area_um2``, elongation >= ``spindle_elongation``);
    * *stromal/connective-like*: spindle-shaped -- fibroblast nuclei are elongated
      (elongation < ``spindle_elongation``; pyradiomics' Elongation = minor / major axis, 1 = round);
    * anything else is *indeterminate* (counts in the total, votes for no class).

    Classes of a spot (five, like RaPaCL's classification head, whose label is the dominant
    CellViT class of the patch): ``0`` sparse / no nuclei (fewer than ``sparse_per_mm2`` nuclei per
    mm^2 of patch); else the most frequent type -- ``1`` inflammatory-like, ``2`` neoplastic-like,
    ``3`` stromal-like -- when it is strictly the most frequent of the three and holds at least
    ``min_share`` of all the patch's nuclei; else ``4`` mixed.

    Defaults were set on her2st (0.5 um/px patches, classical segmentation): per-nucleus types
    rarely make up half of a patch (per-spot shares are about 0.1-0.5), so a plurality with a
    minimum share of 0.3 separates stroma-rich, tumour-rich and lymphocyte-rich patches while
    patches without a clear leader stay ``mixed``.
    """

    sparse_per_mm2: float = 400.0
    small_area_um2: float = 40.0
    large_area_um2: float = 70.0
    round_elongation: float = 0.65
    spindle_elongation: float = 0.5
    min_share: float = 0.3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise RapaclInputError(f"CompositionRule.{f.name}={v!r} must be a finite number >= 0")
            object.__setattr__(self, f.name, float(v))
        if self.small_area_um2 > self.large_area_um2:
            raise RapaclInputError(
                f"CompositionRule: small_area_um2={self.small_area_um2} exceeds "
                f"large_area_um2={self.large_area_um2}"
            )
        if not 0 < self.min_share <= 1:
            raise RapaclInputError(f"CompositionRule.min_share={self.min_share} must be in (0, 1]")


#: Class codes of the composition label.
COMPOSITION_CLASSES = ("sparse", "inflammatory-like", "neoplastic-like", "stromal-like", "mixed")


@dataclass(frozen=True)
class RadiomicsConfig:
    """Every setting that changes a radiomics value; saved with every result (``to_dict``).

    Attributes
    ----------
    bin_width
        pyradiomics ``binWidth`` on the 0-255 grey image (25, pyradiomics' default, gives about 10
        grey levels; methods.md 5.1).
    grey
        How RGB becomes the grey image the features see: ``"luminance"`` (ITU-R BT.601,
        ``0.299 R + 0.587 G + 0.114 B``, rounded to integers 0-255, i.e. an 8-bit grey PNG) or
        ``"haematoxylin"`` (the H channel of ``skimage.color.rgb2hed`` on ``max(rgb, 1)``, scaled by a
        fixed factor so that the largest H value any 8-bit pixel can have maps to 255, then rounded;
        fixed so that values compare across patches and slides; nuclei are bright).
    image_types
        pyradiomics image types and their settings, e.g. ``{"Original": {}}`` (default) or
        ``{"Original": {}, "LoG": {"sigma": [1.0, 2.0]}, "Wavelet": {}}``. A sequence of names is
        accepted too. Always 2-D: images are true 2-D SimpleITK images (no ``force2D``).
    cell_classes
        Feature classes of the per-cell table (:func:`cell_features`); ``shape2D`` and
        ``firstorder`` by default, texture classes on request.
    spot_classes
        Texture / first-order classes of the ``"full"`` per-spot set (union-of-nuclei and whole
        patch masks).
    min_nucleus_area_px
        Nuclei with fewer pixels are ignored (they are segmentation noise; pyradiomics refuses a
        1-pixel ROI). Nuclei one pixel thin (bounding box of height or width 1) are always ignored:
        pyradiomics' 2-D check (``minimumROIDimensions=2``) refuses them.
    morph_bin_count
        Number of equal-width bins between the smallest and largest value of a shape feature over
        the nuclei of a patch, for the ``entropy`` and ``uniformity`` morph statistics (pyradiomics
        ``binCount``: a fixed bin width makes no sense for quantities in different units).
    composition
        The morphology rule of the cell-composition label.
    version
        :data:`FEATURES_VERSION` of the code that made the values (part of the cache key).
    """

    bin_width: float = 25.0
    grey: str = "luminance"
    image_types: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"Original": {}})
    cell_classes: tuple[str, ...] = ("shape2D", "firstorder")
    spot_classes: tuple[str, ...] = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
    min_nucleus_area_px: int = 10
    morph_bin_count: int = 10
    composition: CompositionRule = field(default_factory=CompositionRule)
    version: str = FEATURES_VERSION

    def __post_init__(self) -> None:
        bw = self.bin_width
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw <= 0:
            raise RapaclInputError(f"bin_width={bw!r} must be a finite number > 0")
        object.__setattr__(self, "bin_width", float(bw))
        object.__setattr__(self, "grey", _canonical(self.grey, GREY_MODES, "grey conversion"))
        types = self.image_types
        if isinstance(types, str):
            types = {types: {}}
        elif not isinstance(types, Mapping):
            types = {t: {} for t in types}
        norm: dict[str, dict[str, Any]] = {}
        for name, settings in types.items():
            if settings is None:
                settings = {}
            if not isinstance(settings, Mapping):
                raise RapaclInputError(f"image type {name!r}: settings must be a mapping, got {settings!r}")
            norm[_canonical(name, IMAGE_TYPES, "image type")] = {
                str(k): (list(v) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()
            }
        if not norm:
            raise RapaclInputError("image_types is empty; use {'Original': {}}")
        if "LoG" in norm and not norm["LoG"].get("sigma"):
            raise RapaclInputError("image type LoG needs settings {'sigma': [...]} (in pixels)")
        object.__setattr__(self, "image_types", norm)
        cells = tuple(_canonical(c, FEATURE_CLASSES, "feature class") for c in self.cell_classes)
        if not cells:
            raise RapaclInputError("cell_classes is empty")
        object.__setattr__(self, "cell_classes", tuple(dict.fromkeys(cells)))
        spots = tuple(_canonical(c, FEATURE_CLASSES, "feature class") for c in self.spot_classes)
        if "shape2D" in spots:
            raise RapaclInputError(
                "spot_classes cannot hold shape2D (nucleus shape enters as morph_* statistics)"
            )
        object.__setattr__(self, "spot_classes", tuple(dict.fromkeys(spots)))
        for name in ("min_nucleus_area_px", "morph_bin_count"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int,))
                and not (isinstance(v, float) and v.is_integer())
            ):
                raise RapaclInputError(f"{name}={v!r} must be a positive integer")
            if int(v) < 1:
                raise RapaclInputError(f"{name}={v!r} must be >= 1")
            object.__setattr__(self, name, int(v))
        comp = self.composition
        if isinstance(comp, Mapping):
            comp = CompositionRule(**comp)
        if not isinstance(comp, CompositionRule):
            raise RapaclInputError(f"composition must be a CompositionRule, got {type(comp).__name__}")
        object.__setattr__(self, "composition", comp)
        object.__setattr__(self, "version", str(self.version))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # ---- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON / YAML safe)."""
        return {
            "bin_width": self.bin_width,
            "grey": self.grey,
            "image_types": {k: dict(v) for k, v in self.image_types.items()},
            "cell_classes": list(self.cell_classes),
            "spot_classes": list(self.spot_classes),
            "min_nucleus_area_px": self.min_nucleus_area_px,
            "morph_bin_count": self.morph_bin_count,
            "composition": dataclasses.asdict(self.composition),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RadiomicsConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`RapaclInputError`."""
        if not isinstance(data, Mapping):
            raise RapaclInputError(f"a radiomics config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise RapaclInputError(f"unknown radiomics config key(s) {extra}; known: {sorted(known)}")
        kwargs = dict(data)
        for key in ("cell_classes", "spot_classes"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> RadiomicsConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    def pyradiomics_settings(self) -> dict[str, Any]:
        """The pyradiomics settings (extractor / feature-class keyword arguments) these stand for."""
        return {
            "binWidth": self.bin_width,
            "minimumROIDimensions": 2,
            "minimumROISize": None,
            "normalize": False,
            "removeOutliers": None,
            "resampledPixelSpacing": None,
            "preCrop": False,
            "distances": [1],
            "force2D": False,
            "resegmentRange": None,
            "voxelArrayShift": 0,
            "additionalInfo": False,
            "label": 1,
        }


def check_config(config: RadiomicsConfig | Mapping[str, Any] | None) -> RadiomicsConfig:
    """``None`` -> defaults; a mapping -> :meth:`RadiomicsConfig.from_dict`; else must be a config."""
    if config is None:
        return RadiomicsConfig()
    if isinstance(config, RadiomicsConfig):
        return config
    if isinstance(config, Mapping):
        return RadiomicsConfig.from_dict(config)
    raise RapaclInputError(f"config must be a RadiomicsConfig (or a dict), got {type(config).__name__}")
