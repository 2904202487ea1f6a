"""How a radiomics-fed model's inputs are made: the same recipe at training and at prediction.

RaPaCL-ST needs, for every spot, the radiomics of the nuclei under it (methods.md 1.3, 1.11 item 14).
At training they come from per-section tables (``python -m training.radiomics_tables``); at
prediction they are computed from the slide, on the fly. Both must follow one recipe, or the model is
fed numbers it never saw:

* :class:`NucleusSegmenter` -- the segmentation method, its parameters and the segmentation code's
  version, as one picklable callable ``(patch_rgb, mpp) -> labels`` with a canonical identity;
* :class:`RadiomicsRecipe` -- that segmenter, the patch geometry (``patch_size`` px at ``patch_mpp``
  um/px), the feature set and :class:`RadiomicsConfig` (the *raw* features: what the tables hold),
  plus the model-side transform fitted on the training sections: the input columns in order, the
  signed-log columns and the z-scoring statistics.

The training tables carry the raw half in their parquet metadata (``attrs["napari_rapacl"]``); the
trainer adds the transform and saves the whole recipe in the checkpoint
(``input_stats["radiomics"]``), and :func:`recipe_from_checkpoint` rebuilds it, refusing a checkpoint
that lacks it or was made by another segmentation / features version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import RapaclInputError
from ._config import FEATURES_VERSION, RadiomicsConfig, check_config

__all__ = [
    "DEFAULT_PATCH_MPP",
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_SIGNED_LOG",
    "NucleusSegmenter",
    "RadiomicsRecipe",
    "recipe_from_checkpoint",
    "signed_log",
]

#: RaPaCL-ST's patch: 224 px at 0.5 um/px = 112 um (HEST-Bench, methods.md 1.2).
DEFAULT_PATCH_SIZE = 224
DEFAULT_PATCH_MPP = 0.5
#: Heavy-tailed families log-transformed before z-scoring (methods.md 1.11 item 6).
DEFAULT_SIGNED_LOG = ("Energy", "NonUniformity")

RETRAIN_HINT = (
    "write the radiomics tables with `python -m training.radiomics_tables` and train the model again "
    "with `python -m training.run` (the checkpoint then records how its radiomics were made)"
)


def _segmentation_version() -> str:
    from ..segmentation import SEGMENTATION_VERSION

    return str(SEGMENTATION_VERSION)


@dataclass(frozen=True)
class NucleusSegmenter:
    """A nucleus segmentation method with its parameters, callable as ``(patch_rgb, mpp) -> labels``.

    Picklable (worker processes and dask workers receive it) and with a canonical identity
    (:attr:`cache_key`, :meth:`to_dict`), so that results made with equal settings are recognised as
    equal wherever they were computed.

    Attributes
    ----------
    method
        ``"classical"`` (weight-free) or ``"cellpose"``.
    diameter_um
        Typical nucleus diameter in um (:func:`~napari_rapacl.segmentation.segment_nuclei`).
    model
        The cellpose model (name or file) for ``method="cellpose"``; None otherwise.
    version
        ``SEGMENTATION_VERSION`` of the code (filled in when None).
    """

    method: str = "classical"
    diameter_um: float = 8.0
    model: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        from ..segmentation import METHODS

        if self.method not in METHODS:
            raise RapaclInputError(f"segmentation method {self.method!r}: choose one of {list(METHODS)}")
        d = self.diameter_um
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not np.isfinite(d) or d <= 0:
            raise RapaclInputError(f"nucleus diameter {d!r} um must be a finite number > 0")
        object.__setattr__(self, "diameter_um", float(d))
        if self.method != "cellpose":
            object.__setattr__(self, "model", None)
        elif self.model is not None:
            object.__setattr__(self, "model", str(self.model))
        if self.version is None:
            object.__setattr__(self, "version", _segmentation_version())
        else:
            object.__setattr__(self, "version", str(self.version))

    def __call__(self, patch_rgb: Any, mpp: float) -> np.ndarray:
        from ..segmentation import segment_nuclei

        return segment_nuclei(patch_rgb, mpp, **self.segment_kwargs())

    def segment_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~napari_rapacl.segmentation.segment_nuclei` (and of the tiled
        ``segment_region``) that segment as this segmenter: method, diameter, the cellpose model and the
        recorded version (a table or checkpoint made with version 2 is reproduced by version 2)."""
        kwargs: dict[str, Any] = {"method": self.method, "diameter_um": self.diameter_um}
        kwargs["version"] = self.version
        if self.method == "cellpose":
            kwargs["model"] = self.model
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "diameter_um": self.diameter_um,
            "model": self.model,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "segmenter") -> NucleusSegmenter:
        if not isinstance(data, Mapping):
            raise RapaclInputError(f"{source}: the segmentation must be a mapping, got {data!r}")
        extra = sorted(set(data) - {"method", "diameter_um", "model", "version"})
        if extra:
            raise RapaclInputError(f"{source}: unknown segmentation key(s) {extra}")
        return cls(**dict(data))

    @property
    def cache_key(self) -> str:
        """The identity used in cache keys (``segment_identity`` reads it)."""
        return "nuclei:" + json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """One line for people: the method, what sets its scale, and the version.

        A cellpose model the project trained (one with a ``<model>.rapacl.json`` sidecar, such as
        ``rapacl_nuclei_tnbc``) runs at its training pixel size with its own size filter, not at
        :attr:`diameter_um`: the text says so, with the sidecar's numbers when the model is on this
        machine.
        """
        version = f"segmentation v{self.version}"
        if self.method != "cellpose":
            return f"{self.method} (diameter {self.diameter_um:g} um, {version})"
        from ..segmentation import PROJECT_NUCLEI_MODEL, cellpose_model_settings

        try:
            settings = cellpose_model_settings(self.model)
        except (ImportError, RapaclInputError):  # cellpose missing, or a damaged sidecar
            settings = None
        name = f"model {self.model}" if self.model else "cellpose's default model"
        if settings is not None:
            model = self.model or PROJECT_NUCLEI_MODEL
            scale = f"run at its training {float(settings['train_mpp']):g} um/px"
            if settings.get("min_area_um2") is not None:
                scale += f", nuclei >= {float(settings['min_area_um2']):g} um^2"
            return f"cellpose (model {model}, {scale}, {version})"
        if self.model == PROJECT_NUCLEI_MODEL:
            return (
                f"cellpose (model {self.model}, not built on this machine: it runs at the pixel size of its "
                f"training, recorded beside it, {version})"
            )
        return f"cellpose ({name}, diameter {self.diameter_um:g} um, {version})"


def signed_log(values: np.ndarray, columns: Sequence[str], patterns: Sequence[str]) -> np.ndarray:
    """``sign(v) * log1p(|v|)`` in the columns whose name contains one of ``patterns``."""
    mask = np.array([any(p in c for p in patterns) for c in columns], dtype=bool)
    if mask.any():
        values = np.array(values, dtype=np.float64, copy=True)
        values[:, mask] = np.sign(values[:, mask]) * np.log1p(np.abs(values[:, mask]))
    return values


@dataclass(frozen=True)
class RadiomicsRecipe:
    """Everything that makes a radiomics model input from a slide (see the module docstring).

    The raw part (``segmenter``, ``patch_size``, ``patch_mpp``, ``feature_set``, ``config``) says how
    the table values are computed (:meth:`raw_columns`, :meth:`raw_key`); the transform part
    (``columns``, ``signed_log``, ``mean``, ``std``) turns those raw values into the model's input
    (:meth:`transform`). ``mean``/``std`` are None for a model without fitted statistics (random
    weights): :meth:`transform` then only applies the signed log.
    """

    segmenter: NucleusSegmenter = field(default_factory=NucleusSegmenter)
    patch_size: int = DEFAULT_PATCH_SIZE
    patch_mpp: float = DEFAULT_PATCH_MPP
    feature_set: str = "rapacl72"
    config: RadiomicsConfig = field(default_factory=RadiomicsConfig)
    columns: tuple[str, ...] = ()
    signed_log: tuple[str, ...] = DEFAULT_SIGNED_LOG
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fitted_on: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from ._core import FEATURE_SETS, spot_feature_names

        if self.feature_set not in FEATURE_SETS:
            raise RapaclInputError(f"feature_set={self.feature_set!r}; choose one of {FEATURE_SETS}")
        size = self.patch_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
            raise RapaclInputError(f"radiomics patch_size={size!r} must be an integer >= 8 (px)")
        object.__setattr__(self, "patch_size", int(size))
        mpp = float(self.patch_mpp)
        if not (np.isfinite(mpp) and mpp > 0):
            raise RapaclInputError(f"radiomics patch_mpp={self.patch_mpp!r} must be > 0 (um/px)")
        object.__setattr__(self, "patch_mpp", mpp)
        object.__setattr__(self, "config", check_config(self.config))
        names = spot_feature_names(self.config, self.feature_set)
        columns = tuple(str(c) for c in self.columns) or tuple(names)
        unknown = [c for c in columns if c not in names + ["n_nuclei"]]
        if unknown:
            raise RapaclInputError(
                f"radiomics columns {unknown[:5]} are not made by the {self.feature_set!r} feature set"
            )
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "signed_log", tuple(str(p) for p in self.signed_log))
        object.__setattr__(self, "fitted_on", tuple(str(s) for s in self.fitted_on))
        if (self.mean is None) != (self.std is None):
            raise RapaclInputError("radiomics z-scoring needs both mean and std (or neither)")
        if self.mean is not None:
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
            if len(mean) != len(columns) or len(std) != len(columns):
                raise RapaclInputError(
                    f"radiomics z-scoring statistics have {len(mean)} / {len(std)} values for "
                    f"{len(columns)} columns"
                )
            if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
                raise RapaclInputError("radiomics z-scoring statistics must be finite, with std > 0")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)

    # -- raw features ---------------------------------------------------------------------------
    def raw_columns(self) -> list[str]:
        """Columns of the raw table: the feature set's features, ``n_nuclei``, ``cell_label``."""
        from ._core import spot_feature_names

        return spot_feature_names(self.config, self.feature_set) + ["n_nuclei", "cell_label"]

    def raw_dict(self) -> dict[str, Any]:
        """The raw part: what a radiomics table records in its metadata."""
        return {
            "segmenter": self.segmenter.to_dict(),
            "size": self.patch_size,
            "mpp": self.patch_mpp,
            "feature_set": self.feature_set,
            "radiomics_config": self.config.to_dict(),
        }

    def raw_key(self) -> str:
        """A hash of the raw part: equal keys mean equal raw values for the same slide and spot."""
        blob = json.dumps(self.raw_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def spot_feature_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~napari_rapacl.radiomics.iter_spot_features` for this recipe."""
        return {
            "size": self.patch_size,
            "mpp": self.patch_mpp,
            "config": self.config,
            "segment": self.segmenter,
            "feature_set": self.feature_set,
        }

    # -- model input ----------------------------------------------------------------------------
    def transform(self, raw: np.ndarray) -> np.ndarray:
        """``(n, len(raw_columns()))`` raw values -> ``(n, len(columns))`` float32 model input:
        the input columns, signed log, then the training sections' z-scoring (exactly as the
        trainer's ``radiomics`` input builder computes it)."""
        from ..preprocess import zscore_apply

        raw = np.asarray(raw, dtype=np.float64)
        names = self.raw_columns()
        if raw.ndim != 2 or raw.shape[1] != len(names):
            raise RapaclInputError(
                f"raw radiomics of shape {raw.shape}: expected (n, {len(names)}) in raw_columns() order"
            )
        pos = {c: i for i, c in enumerate(names)}
        values = raw[:, [pos[c] for c in self.columns]]
        values = signed_log(values, self.columns, self.signed_log)
        if self.mean is None:
            return values.astype(np.float32)
        return zscore_apply(values, np.asarray(self.mean), np.asarray(self.std))

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            **self.raw_dict(),
            "columns": list(self.columns),
            "signed_log": list(self.signed_log),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "fitted_on": list(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> RadiomicsRecipe:
        if not isinstance(data, Mapping):
            raise RapaclInputError(
                f"{source}: a radiomics recipe must be a mapping, got {type(data).__name__}"
            )
        required = ("segmenter", "size", "mpp", "feature_set", "radiomics_config")
        missing = [k for k in required if k not in data]
        if missing:
            raise RapaclInputError(f"{source}: the radiomics recipe lacks {missing}")
        return cls(
            segmenter=NucleusSegmenter.from_dict(data["segmenter"], source),
            patch_size=data["size"],
            patch_mpp=data["mpp"],
            feature_set=data["feature_set"],
            config=RadiomicsConfig.from_dict(data["radiomics_config"]),
            columns=tuple(data.get("columns") or ()),
            signed_log=tuple(data.get("signed_log", DEFAULT_SIGNED_LOG)),
            mean=data.get("mean"),
            std=data.get("std"),
            fitted_on=tuple(data.get("fitted_on") or ()),
        )

    @classmethod
    def from_table_attrs(cls, attrs: Mapping[str, Any], source: str) -> RadiomicsRecipe | None:
        """The raw recipe recorded in a radiomics table's metadata, or None when it records none."""
        meta = attrs.get("napari_rapacl") if isinstance(attrs, Mapping) else None
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except ValueError:
                return None
        if not isinstance(meta, Mapping) or not isinstance(meta.get("segmenter"), Mapping):
            return None
        return cls.from_dict(meta, source)

    def describe(self) -> str:
        """One line for people: how the radiomics are made."""
        stats = f"z-scored on {', '.join(self.fitted_on)}" if self.mean is not None else "not z-scored"
        return (
            f"{len(self.columns)} {self.feature_set} features on {self.patch_size} px patches at "
            f"{self.patch_mpp:g} um/px, nuclei by {self.segmenter.describe()}, {stats}"
        )

    def check_current(self, source: str) -> None:
        """Refuse a recipe this code cannot reproduce (a segmentation version it does not have, another
        features version). Older segmentation versions that the code keeps (``SEGMENTATION_VERSIONS``)
        are reproduced: the segmenter runs the version it records."""
        from ..segmentation import SEGMENTATION_VERSIONS

        if self.segmenter.version not in SEGMENTATION_VERSIONS:
            raise RapaclInputError(
                f"{source}: its radiomics were computed on nuclei from segmentation version "
                f"{self.segmenter.version}, but this napari-rapacl reproduces versions "
                f"{', '.join(SEGMENTATION_VERSIONS)} only (the newest, {_segmentation_version()}, for new "
                f"tables): the features would differ from those it was trained on; {RETRAIN_HINT}"
            )
        if self.config.version != FEATURES_VERSION:
            raise RapaclInputError(
                f"{source}: its radiomics are features version {self.config.version}, this napari-rapacl "
                f"computes version {FEATURES_VERSION}; {RETRAIN_HINT}"
            )


def recipe_from_checkpoint(payload: Mapping[str, Any], source: str) -> RadiomicsRecipe:
    """The :class:`RadiomicsRecipe` a checkpoint records (``input_stats["radiomics"]``), checked
    against this code; a clear :class:`RapaclInputError` when it records none."""
    stats = (payload.get("input_stats") or {}).get("radiomics")
    recipe = stats.get("recipe") if isinstance(stats, Mapping) else None
    if not isinstance(recipe, Mapping):
        raise RapaclInputError(
            f"{source}: this {payload.get('model', 'model')!r} checkpoint does not record how its "
            "radiomics were made (segmentation method and version, patch size and um/px, feature set "
            "and settings, z-scoring statistics), so they cannot be reproduced from a slide; " + RETRAIN_HINT
        )
    merged = {
        **recipe,
        "columns": stats.get("columns"),
        "signed_log": stats.get("signed_log", []),
        "mean": stats.get("mean"),
        "std": stats.get("std"),
        "fitted_on": stats.get("fitted_on", []),
    }
    out = RadiomicsRecipe.from_dict(merged, source)
    out.check_current(source)
    return out
