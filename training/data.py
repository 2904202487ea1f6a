"""Data for the trainer: sections, cached patches, and a registry of per-spot input builders.

A model declares the batch keys it needs (``required_inputs`` at training, ``predict_inputs`` at
prediction; :mod:`napari_rapacl.models.base`). For every key there is an **input builder** in
:data:`INPUT_BUILDERS`; a builder turns one loaded section into a per-spot field (an array indexed
by spot, or a function of the spot index). New inputs plug in with :func:`register_input`::

    @register_input("my_key")
    def _my_key(section: SectionData, ctx: InputContext) -> np.ndarray | Callable[[int], np.ndarray]:
        ...

Built in: ``image``, ``target``, ``neighbors``, ``neighbor_target``, ``radius_px``, ``radiomics``
and ``cell_label``. Statistics a builder fits (radiomics z-scoring, label classes) are fitted on the
TRAINING sections only, stored in ``ctx.stats`` and saved in the checkpoint (``input_stats``).

Image-like fields (``image``, ``neighbors``) stay ``uint8 (..., H, W, 3)`` in memory and in the batch;
:func:`batch_to_device` turns them into ``float (..., 3, H, W)`` in ``[0, 1]`` on the device, which is
cheaper than converting on the CPU. Training augmentation (random flips / 90-degree rotations, the
8 symmetries of the square) is a function of ``(seed, epoch, spot)`` only, so it is identical for
any number of processes and data-loader workers, and repeats exactly after a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from napari_rapacl._atomic import write_atomic
from napari_rapacl._errors import RapaclInputError
from napari_rapacl.datasets import HER2ST_MARKERS
from napari_rapacl.datasets import with_markers as datasets_with_markers

from .config import DataConfig, normalized_sections

log = logging.getLogger("training")

__all__ = [
    "INPUT_BUILDERS",
    "InputContext",
    "SectionData",
    "SpotDataset",
    "batch_to_device",
    "build_inputs",
    "dihedral",
    "load_patches_cached",
    "load_section",
    "nearest_neighbors",
    "read_table",
    "register_input",
    "resolve_gene_list",
    "HER2ST_MARKERS",
    "with_markers",
]


Field = np.ndarray | Callable[[int], np.ndarray]
InputBuilder = Callable[["SectionData", "InputContext"], Field]


@dataclass
class InputSpec:
    """A registered input: its builder and whether it holds images (augmented, moved as images)."""

    key: str
    build: InputBuilder
    spatial: bool = False


#: The registry of input builders, keyed by batch key.
INPUT_BUILDERS: dict[str, InputSpec] = {}


def register_input(key: str, *, spatial: bool = False) -> Callable[[InputBuilder], InputBuilder]:
    """Register ``build(section, ctx) -> field`` for batch key ``key``.

    ``spatial=True`` marks ``uint8 (..., H, W, 3)`` image fields: they get the training augmentation
    and are converted to ``float (..., 3, H, W)`` in ``[0, 1]`` on the device.
    """

    def deco(fn: InputBuilder) -> InputBuilder:
        if key in INPUT_BUILDERS:
            raise ValueError(f"an input builder for {key!r} is already registered")
        INPUT_BUILDERS[key] = InputSpec(key, fn, spatial)
        return fn

    return deco


@dataclass
class SectionData:
    """One loaded section.

    Attributes
    ----------
    name
        Section name (e.g. ``"C3"``).
    barcodes
        ``(N,)`` spot barcodes (str).
    x, y
        ``(N,)`` spot centres in level-0 slide pixels.
    radius
        ``(N,)`` spot radius in level-0 slide pixels.
    slide_mpp
        Microns per level-0 pixel.
    patch_mpp
        Microns per patch pixel.
    patches
        ``(N, S, S, 3)`` uint8 spot patches.
    target
        ``(N, G)`` float32 log1p(CP10k) expression of the selected genes.
    cache
        Scratch space for builders (e.g. the neighbour table), keyed by name.
    """

    name: str
    barcodes: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    slide_mpp: float
    patch_mpp: float
    patches: np.ndarray
    target: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.barcodes.shape[0])


@dataclass
class InputContext:
    """What builders may use beyond their section.

    Attributes
    ----------
    data
        The data config.
    model_config
        The resolved model config (e.g. for ``n_neighbors``).
    genes
        The gene list.
    train_sections
        The TRAINING sections: the only data statistics may be fitted on.
    stats
        Fitted statistics, keyed by input (saved in checkpoints as ``input_stats``). Pre-filled from a
        checkpoint when resuming, so a resumed run uses the same statistics.
    """

    data: DataConfig
    model_config: Any
    genes: list[str]
    train_sections: list[SectionData]
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# sections, genes and the patch cache
# ------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    from napari_rapacl.datasets import cache_root

    return cache_root() / "patches"


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _content_hash(patches: np.ndarray) -> str:
    """sha256 of a patch array's bytes (shape and dtype included): what a patch cache must hold."""
    h = hashlib.sha256(f"{patches.dtype}{patches.shape}".encode())
    h.update(np.ascontiguousarray(patches).data)
    return h.hexdigest()


def load_patches_cached(
    slide: Any, x: np.ndarray, y: np.ndarray, *, size: int, mpp: float, cache_dir: str | os.PathLike, key: str
) -> np.ndarray:
    """Spot patches from ``preprocess.extract_patches``, cached as ``.npz`` in ``cache_dir``.

    The file name holds ``key`` (the section), ``size`` and ``mpp`` plus a fingerprint of the slide
    file (path, size, modification time) and of the spot coordinates, so a changed slide or spot
    table is re-extracted. The file carries the sha256 of its patches: one whose content does not
    match (damaged, or overwritten, e.g. all zeros) is extracted again, never used. Files are written
    atomically (temporary file + ``os.replace``), so concurrent runs never read a half-written cache.
    """
    from napari_rapacl.preprocess import extract_patches

    cache_dir = Path(cache_dir).expanduser()
    path_obj = getattr(slide, "path", None)
    stat = Path(path_obj).stat() if path_obj is not None and Path(path_obj).exists() else None
    ident = (str(path_obj), stat.st_size if stat else None, stat.st_mtime_ns if stat else None)
    fp = _fingerprint(
        ident, getattr(slide, "mpp", None), np.asarray(x, np.float64), np.asarray(y, np.float64)
    )
    path = cache_dir / f"{key}_{int(size)}px_{float(mpp):g}mpp_{fp}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                patches = npz["patches"]
                stored = str(npz["sha256"]) if "sha256" in npz.files else None
            if patches.shape != (len(x), size, size, 3) or patches.dtype != np.uint8:
                log.warning("patch cache %s has shape %s; extracting again", path, patches.shape)
            elif stored != _content_hash(patches):
                log.warning("patch cache %s does not match its content hash; extracting again", path)
            else:
                return patches
        except Exception as exc:  # a damaged cache file is re-created, not fatal
            log.warning("cannot read patch cache %s (%s); extracting again", path, exc)
    patches = extract_patches(slide, x, y, size=int(size), mpp=float(mpp))
    cache_dir.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a path
            np.savez(fh, patches=patches, sha256=np.array(_content_hash(patches)))

    write_atomic(path, save)
    return patches


def spot_subset(n: int, max_spots: int | None, section: str) -> np.ndarray:
    """Indices of the spots used: all, or a fixed subset of ``max_spots`` (seeded by the section name)."""
    if max_spots is None or max_spots >= n:
        return np.arange(n)
    seed = int(hashlib.sha1(section.encode()).hexdigest()[:8], 16)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_spots, replace=False))


def load_her2st_section(name: str, data: DataConfig) -> Any:
    from napari_rapacl.datasets import her2st

    with warnings.catch_warnings():
        # "n spots have no counts and were dropped": expected for her2st (1-3 per section)
        warnings.filterwarnings("ignore", message=".*have no counts.*")
        return her2st(name, data_dir=data.data_dir)


def _count_genes(raw: Any) -> set[str]:
    counts = raw.spots.counts
    names = getattr(counts, "var_names", None)
    if names is None and isinstance(counts, tuple) and len(counts) == 2:
        names = counts[1]
    return {str(g) for g in names} if names is not None else set()


def with_markers(
    base: Sequence[str], train_raw: Sequence[Any], markers: Sequence[str] = HER2ST_MARKERS
) -> list[str]:
    """``base`` plus the ``markers`` not in it that the counts of at least one TRAINING section hold
    (:func:`napari_rapacl.datasets.with_markers`); markers absent from every training section are left
    out (a model cannot learn them) with a log line naming them."""
    genes, absent = datasets_with_markers(base, [_count_genes(raw) for raw in train_raw], markers)
    if absent:
        log.info("marker gene(s) %s are in no training section's counts: not predicted", absent)
    return genes


def resolve_gene_list(data: DataConfig, train_raw: Sequence[Any]) -> list[str]:
    """The gene list from ``data.genes`` (see :class:`~training.config.DataConfig`).

    ``train_raw`` are the loaded TRAINING sections (``Her2stSection``); ``top:K`` selects on them only.
    ``her2st785+markers`` is the 785 benchmark genes followed by the :data:`HER2ST_MARKERS` that are
    not among them and that the training sections' counts hold (:func:`with_markers`).
    """
    from napari_rapacl.datasets import her2st_genes
    from napari_rapacl.preprocess import read_gene_list, select_genes

    spec = data.genes
    if isinstance(spec, list):
        if not spec:
            raise RapaclInputError("data.genes is an empty list")
        if len(set(spec)) != len(spec):
            raise RapaclInputError("data.genes lists a gene twice")
        return [str(g) for g in spec]
    text = str(spec).strip()
    if text.lower() == "her2st785":
        return her2st_genes(data_dir=data.data_dir)
    if text.lower() == "her2st785+markers":
        return with_markers(her2st_genes(data_dir=data.data_dir), train_raw)
    if text.lower().startswith("top:"):
        parts = text.split(":")
        try:
            k = int(parts[1])
            by = parts[2] if len(parts) > 2 else "mean"
        except (IndexError, ValueError):
            raise RapaclInputError(f"data.genes {text!r}: expected top:K or top:K:mean|var") from None
        if len(parts) > 3 or by not in ("mean", "var"):
            raise RapaclInputError(f"data.genes {text!r}: expected top:K or top:K:mean|var")
        counts = [s.spots.counts for s in train_raw]
        return select_genes(counts, k, by=by, min_frac_spots=data.min_frac_spots)
    path = Path(text).expanduser()
    if not path.is_file():
        raise RapaclInputError(
            f"data.genes {text!r} is neither 'her2st785', 'her2st785+markers', 'top:K[:mean|var]', a list, "
            "nor an existing file"
        )
    return read_gene_list(path)


def load_section(raw: Any, genes: list[str], data: DataConfig, *, size: int, mpp: float) -> SectionData:
    """Patches (cached) and targets of one loaded her2st section, restricted to ``data.max_spots``."""
    from napari_rapacl.preprocess import normalize_log1p_cp10k

    spots = raw.spots
    slide_mpp = float(raw.slide.require_mpp("patch extraction"))
    cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    patches = load_patches_cached(
        raw.slide, spots.x, spots.y, size=size, mpp=mpp, cache_dir=cache_dir, key=f"her2st_{raw.name}"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*requested genes are absent.*")
        target = normalize_log1p_cp10k(spots.counts, genes, missing="zero", name=f"her2st {raw.name}")
    keep = spot_subset(len(spots), data.max_spots, raw.name)
    return SectionData(
        name=raw.name,
        barcodes=np.asarray(spots.barcode[keep], dtype=object),
        x=spots.x[keep].copy(),
        y=spots.y[keep].copy(),
        radius=spots.radius[keep].copy(),
        slide_mpp=slide_mpp,
        patch_mpp=float(mpp),
        patches=np.ascontiguousarray(patches[keep]),
        target=np.ascontiguousarray(target[keep], dtype=np.float32),
    )


def load_splits(data: DataConfig, *, size: int, mpp: float) -> tuple[list[str], dict[str, list[SectionData]]]:
    """Load every section of the train/val/test splits; returns ``(genes, {split: [SectionData]})``."""
    splits = {s: normalized_sections(getattr(data, s)) for s in ("train", "val", "test")}
    raw = {name: load_her2st_section(name, data) for names in splits.values() for name in names}
    genes = resolve_gene_list(data, [raw[n] for n in splits["train"]])
    out = {
        split: [load_section(raw[n], genes, data, size=size, mpp=mpp) for n in names]
        for split, names in splits.items()
    }
    return genes, out


# ------------------------------------------------------------------------------------------------
# built-in inputs
# ------------------------------------------------------------------------------------------------
@register_input("image", spatial=True)
def _image(section: SectionData, ctx: InputContext) -> Field:
    return section.patches


@register_input("target")
def _target(section: SectionData, ctx: InputContext) -> Field:
    return section.target


def nearest_neighbors(x: np.ndarray, y: np.ndarray, k: int, include_self: bool = False) -> np.ndarray:
    """``(N, k)`` indices of the ``k`` nearest spots (Euclidean, ties by index), nearest first.

    With ``include_self`` the spot itself is the first of its ``k``; otherwise it is excluded.
    """
    pts = np.stack([np.asarray(x, np.float64), np.asarray(y, np.float64)], axis=1)
    n = pts.shape[0]
    need = k if include_self else k + 1
    if need > n:
        raise RapaclInputError(
            f"{k} neighbours requested (include_self={include_self}) but the section has only {n} spots"
        )
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")
    # the spot itself has distance 0; put it first explicitly (duplicated positions would tie)
    rows = []
    for i in range(n):
        o = order[i][order[i] != i]
        rows.append(np.concatenate([[i], o[: k - 1]]) if include_self else o[:k])
    return np.stack(rows).astype(np.int64)


def _neighbor_table(section: SectionData, ctx: InputContext) -> np.ndarray:
    k = ctx.data.n_neighbors
    if k is None:
        k = getattr(ctx.model_config, "n_neighbors", None) or 8
    include_self = ctx.data.neighbors_include_self
    if include_self is None:
        include_self = bool(getattr(ctx.model_config, "neighbors_include_self", False))
    key = f"knn_{k}_{include_self}"
    if key not in section.cache:
        section.cache[key] = nearest_neighbors(section.x, section.y, int(k), include_self)
    return section.cache[key]


class GatherRows:
    """A field ``i -> values[table[i]]`` (picklable, for data-loader workers started by spawn)."""

    def __init__(self, values: np.ndarray, table: np.ndarray) -> None:
        self.values, self.table = values, table

    def __call__(self, i: int) -> np.ndarray:
        return self.values[self.table[i]]


@register_input("neighbors", spatial=True)
def _neighbors(section: SectionData, ctx: InputContext) -> Field:
    return GatherRows(section.patches, _neighbor_table(section, ctx))


@register_input("neighbor_target")
def _neighbor_target(section: SectionData, ctx: InputContext) -> Field:
    return GatherRows(section.target, _neighbor_table(section, ctx))


@register_input("radius_px")
def _radius_px(section: SectionData, ctx: InputContext) -> Field:
    """Spot radius in patch pixels: level-0 radius x slide um/px / patch um/px."""
    return (section.radius * section.slide_mpp / section.patch_mpp).astype(np.float32)


def read_table(path: str | os.PathLike) -> Any:
    """A per-spot table (``.parquet`` or ``.csv``) indexed by barcode (a ``barcode`` column or the index)."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"per-spot table not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    elif suffix in (".csv", ".tsv") or path.name.endswith((".csv.gz", ".tsv.gz")):
        sep = "\t" if ".tsv" in path.name else ","
        df = pd.read_csv(path, sep=sep)
        if "barcode" not in df.columns:
            df = df.set_index(df.columns[0])
    else:
        raise RapaclInputError(f"per-spot table {path}: expected .parquet or .csv, got {path.suffix!r}")
    if "barcode" in df.columns:
        df = df.set_index("barcode")
    df.index = df.index.astype(str)
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise RapaclInputError(f"per-spot table {path}: barcode(s) listed twice: {dup}")
    return df


def _table_path(spec: str | dict[str, str] | None, section: str, what: str) -> Path:
    if spec is None:
        raise RapaclInputError(
            f"the model needs {what!r} but data.{what}_table is not set: give a per-section table "
            "(a path template with {section}, or a {section: path} mapping)"
        )
    if isinstance(spec, dict):
        lookup = {str(k).upper(): v for k, v in spec.items()}
        if section.upper() not in lookup:
            raise RapaclInputError(f"data.{what}_table has no entry for section {section!r}: {sorted(spec)}")
        return Path(lookup[section.upper()])
    return Path(str(spec).format(section=section))


def _section_table(section: SectionData, spec: Any, what: str) -> Any:
    key = f"table_{what}"
    if key not in section.cache:
        path = _table_path(spec, section.name, what)
        df = read_table(path)
        wanted = [str(b) for b in section.barcodes]
        missing = [b for b in wanted if b not in df.index]
        if missing:
            raise RapaclInputError(
                f"{path}: {len(missing)} of {len(wanted)} spots of section {section.name} are missing "
                f"(e.g. {missing[:3]})"
            )
        section.cache[key] = df.loc[wanted]
        section.cache[f"{key}_attrs"] = dict(df.attrs)
        section.cache[f"{key}_path"] = str(path)
    return section.cache[key]


def _table_recipe(section: SectionData, spec: Any) -> Any:
    """The raw radiomics recipe recorded in a section's table (None when the table records none)."""
    from napari_rapacl.radiomics import RadiomicsRecipe

    _section_table(section, spec, "radiomics")
    path = section.cache["table_radiomics_path"]
    return RadiomicsRecipe.from_table_attrs(section.cache["table_radiomics_attrs"], path)


def _fit_recipe(ctx: InputContext, columns: list[str], mean: np.ndarray, std: np.ndarray) -> dict | None:
    """The recipe of the training tables (all must agree), to be saved in the checkpoint so that
    prediction from a slide makes the same inputs; None (with a warning) when a table records none."""
    d = ctx.data
    recipes = [_table_recipe(s, d.radiomics_table) for s in ctx.train_sections]
    if any(r is None for r in recipes):
        bare = [s.name for s, r in zip(ctx.train_sections, recipes, strict=True) if r is None]
        log.warning(
            "the radiomics tables of %s do not record how they were made (segmentation, patch, "
            "features): the checkpoint will not predict from a slide (write them with "
            "python -m training.radiomics_tables)",
            bare,
        )
        return None
    keys = {r.raw_key() for r in recipes}
    if len(keys) > 1:
        pairs = zip(ctx.train_sections, recipes, strict=True)
        detail = "; ".join(f"{s.name}: {r.describe()}" for s, r in pairs)
        raise RapaclInputError(f"the training sections' radiomics tables were made differently: {detail}")
    # the transform is checked here, as prediction will apply it
    recipe = dataclasses.replace(
        recipes[0],
        columns=tuple(columns),
        signed_log=tuple(d.radiomics_signed_log),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        fitted_on=tuple(s.name for s in ctx.train_sections),
    )
    return recipe.raw_dict()


@register_input("radiomics")
def _radiomics(section: SectionData, ctx: InputContext) -> Field:
    """Per-spot radiomics from the section's table, z-scored with TRAINING-section statistics."""
    from napari_rapacl.preprocess import zscore_apply, zscore_fit
    from napari_rapacl.radiomics import signed_log

    d = ctx.data
    if "radiomics" not in ctx.stats:
        first = _section_table(ctx.train_sections[0], d.radiomics_table, "radiomics")
        if isinstance(d.radiomics_columns, str):
            columns = _feature_set_columns(d.radiomics_columns)
        elif d.radiomics_columns is not None:
            columns = list(d.radiomics_columns)
        else:
            columns = [
                c
                for c in first.columns
                if c != d.cell_label_column and np.issubdtype(first[c].dtype, np.number)
            ]
        if not columns:
            raise RapaclInputError("the radiomics table has no numeric feature column")
        mats = [
            _table_values(_section_table(s, d.radiomics_table, "radiomics"), columns, s.name)
            for s in ctx.train_sections
        ]
        train = signed_log(np.concatenate(mats), columns, d.radiomics_signed_log)
        mean, std = zscore_fit(train)
        ctx.stats["radiomics"] = {
            "columns": columns,
            "signed_log": list(d.radiomics_signed_log),
            "mean": mean.tolist(),
            "std": std.tolist(),
            "fitted_on": [s.name for s in ctx.train_sections],
            "recipe": _fit_recipe(ctx, columns, mean, std),
        }
    st = ctx.stats["radiomics"]
    values = _table_values(
        _section_table(section, d.radiomics_table, "radiomics"), st["columns"], section.name
    )
    values = signed_log(values, st["columns"], st["signed_log"])
    return zscore_apply(values, np.asarray(st["mean"]), np.asarray(st["std"]))


def _feature_set_columns(name: str) -> list[str]:
    from napari_rapacl.radiomics import rapacl72_names

    if name != "rapacl72":
        raise RapaclInputError(
            f"data.radiomics_columns={name!r}: a string must name a feature set ('rapacl72'); "
            "otherwise give a list of column names"
        )
    return list(rapacl72_names())


def _table_values(df: Any, columns: list[str], section: str) -> np.ndarray:
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise RapaclInputError(f"the radiomics table of section {section} lacks column(s) {absent[:5]}")
    values = df[columns].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = [c for c, ok in zip(columns, np.isfinite(values).all(0), strict=True) if not ok]
        raise RapaclInputError(f"the radiomics table of section {section} has NaN/inf in {bad[:5]}")
    return values


@register_input("cell_label")
def _cell_label(section: SectionData, ctx: InputContext) -> Field:
    """Per-spot class index. Integer labels are used as they are; other labels are mapped to the
    sorted classes seen in the TRAINING sections, and a class unseen there becomes -100 (ignored by
    ``cross_entropy``)."""
    d = ctx.data
    spec = d.cell_label_table if d.cell_label_table is not None else d.radiomics_table
    col = d.cell_label_column

    def labels(s: SectionData) -> Any:
        df = _section_table(s, spec, "cell_label")
        if col not in df.columns:
            raise RapaclInputError(f"the cell-label table of section {s.name} has no column {col!r}")
        return df[col]

    if "cell_label" not in ctx.stats:
        train = [labels(s) for s in ctx.train_sections]
        if all(np.issubdtype(t.dtype, np.integer) for t in train):
            ctx.stats["cell_label"] = {"classes": None, "fitted_on": [s.name for s in ctx.train_sections]}
        else:
            classes = sorted({str(v) for t in train for v in t})
            ctx.stats["cell_label"] = {"classes": classes, "fitted_on": [s.name for s in ctx.train_sections]}
    classes = ctx.stats["cell_label"]["classes"]
    values = labels(section)
    if classes is None:
        return values.to_numpy(dtype=np.int64)
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(str(v), -100) for v in values], dtype=np.int64)


def build_inputs(
    sections: list[SectionData], keys: Sequence[str], ctx: InputContext
) -> list[dict[str, Field]]:
    """Per section, ``{key: field}`` for every key; unknown keys are a clear error."""
    unknown = [k for k in keys if k not in INPUT_BUILDERS]
    if unknown:
        raise RapaclInputError(
            f"no input builder for batch key(s) {unknown}; registered: {sorted(INPUT_BUILDERS)} "
            "(add one with training.data.register_input)"
        )
    return [{k: INPUT_BUILDERS[k].build(s, ctx) for k in keys} for s in sections]


# ------------------------------------------------------------------------------------------------
# dataset, augmentation, device transfer
# ------------------------------------------------------------------------------------------------
def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square on ``(..., H, W, C)``: ``k % 4`` quarter turns, then a
    horizontal flip when ``k >= 4``."""
    out = np.rot90(img, k % 4, axes=(-3, -2))
    if k >= 4:
        out = out[..., ::-1, :]
    return np.ascontiguousarray(out)


# Ruifrok & Johnston's haematoxylin / eosin / DAB optical-density vectors (the rows of
# skimage.color.rgb_from_hed); the inverse maps optical density to the three stain amounts
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


def hed_jitter(img: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """HED stain jitter (Tellez et al. 2018) of ``uint8 (..., H, W, 3)`` RGB images.

    Colour deconvolution (Ruifrok & Johnston's matrix) of the optical density ``-ln(I / 255)``
    (``I >= 1``) into haematoxylin, eosin and residual amounts ``s``; ``s * scale + bias`` per
    channel (bias in optical-density units); back to RGB, rounded to uint8. ``scale = 1, bias = 0``
    returns the image unchanged (no clipping of negative amounts, unlike ``skimage.color.rgb2hed``).
    """
    od = -np.log(np.maximum(img.astype(np.float32), 1.0) / 255.0)
    stains = od @ HED_FROM_RGB
    stains = stains * np.asarray(scale, np.float32) + np.asarray(bias, np.float32)
    out = 255.0 * np.exp(-(stains @ RGB_FROM_HED))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class SpotDataset(torch.utils.data.Dataset):
    """Spots of one or more sections as ``{key: array, "index": int}`` samples.

    Parameters
    ----------
    sections
        The sections (in order; sample ``j`` is a spot of one of them).
    keys
        Batch keys to build (see :data:`INPUT_BUILDERS`).
    ctx
        Builder context.
    augment
        Random symmetry per (seed, epoch, spot) of the spatial fields; call :meth:`set_epoch`.
    seed
        Augmentation seed.
    hed_sigma
        With ``augment``: HED stain jitter of the spatial fields (:func:`hed_jitter`), scale
        ``U(1 - hed_sigma, 1 + hed_sigma)`` and bias ``U(-hed_sigma, hed_sigma)`` per stain channel,
        one draw per (seed, epoch, spot) shared by all images of the sample; 0 = off.
    """

    def __init__(
        self,
        sections: list[SectionData],
        keys: Sequence[str],
        ctx: InputContext,
        *,
        augment: bool = False,
        seed: int = 0,
        hed_sigma: float = 0.0,
    ) -> None:
        if not (isinstance(hed_sigma, (int, float)) and 0.0 <= hed_sigma < 1.0):
            raise RapaclInputError(
                f"data.hed_sigma must be a number in [0, 1) (0 = no stain jitter; Tellez et al.'s "
                f"'HED-light' is 0.05), got {hed_sigma!r}"
            )
        self.hed_sigma = float(hed_sigma)
        self.keys = list(keys)
        self.fields = build_inputs(sections, self.keys, ctx)
        self.spatial = [k for k in self.keys if INPUT_BUILDERS[k].spatial]
        self.lookup = [(s, i) for s, sec in enumerate(sections) for i in range(len(sec))]
        self.section_names = [sec.name for sec in sections]
        self.section_of = np.array([s for s, _ in self.lookup], dtype=np.int64)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lookup)

    def __getitem__(self, j: int) -> dict[str, Any]:
        s, i = self.lookup[j]
        out: dict[str, Any] = {}
        for key, fld in self.fields[s].items():
            out[key] = fld(i) if callable(fld) else fld[i]
        if self.augment and self.spatial:
            k = int(np.random.default_rng([self.seed, self.epoch, j]).integers(8))
            for key in self.spatial:
                out[key] = dihedral(out[key], k)
            if self.hed_sigma > 0:
                rng = np.random.default_rng([self.seed, self.epoch, j, 1])
                scale = rng.uniform(1.0 - self.hed_sigma, 1.0 + self.hed_sigma, 3)
                bias = rng.uniform(-self.hed_sigma, self.hed_sigma, 3)
                for key in self.spatial:
                    out[key] = hed_jitter(out[key], scale, bias)
        out["index"] = j
        return out


def batch_to_device(
    batch: dict[str, Any], device: Any, *, channels_last: bool = False, non_blocking: bool = False
) -> dict[str, Any]:
    """Move a collated batch to ``device``; spatial uint8 fields become float ``(..., 3, H, W)`` in [0, 1]."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        value = value.to(device, non_blocking=non_blocking)
        spec = INPUT_BUILDERS.get(key)
        if spec is not None and spec.spatial:
            value = value.movedim(-1, -3).float().div_(255.0)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            else:
                value = value.contiguous()
        out[key] = value
    return out
