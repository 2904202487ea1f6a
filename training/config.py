"""Typed training configuration: YAML file + ``key=value`` overrides (torch-free).

A config has four sections, each a dataclass (see their docstrings for every field):

``model``  registry name, model config overrides, RaPaCL stage and Stage 1 checkpoint;
``data``   dataset and sections of each split, gene list, patch cache, input tables;
``optim``  optimiser, learning rate, epochs, GLOBAL batch size, early stopping, model selection;
``run``    seed, output folder, device, AMP, channels_last, threads, resume, DDP details.

Overrides use dotted keys (``optim.lr=3e-4``, ``data.train=[C3,C4]``, ``model.config.dropout=0``).
The value is parsed as YAML and then converted to the field's annotated type, so ``1e-3`` is a float
and ``null`` is None. Unknown keys are errors that list the valid ones. Inside ``model.config`` any
key is accepted here and checked against the model's own typed config (from the registry) when the
config is resolved, so a typo there is an error too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from napari_rapacl._atomic import write_atomic
from napari_rapacl._errors import RapaclInputError

__all__ = [
    "DataConfig",
    "ModelSection",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
]

BATCHNORM_MODES = ("auto", "batch", "sync", "frozen")
SELECT_ON = ("auto", "val_pcc", "val_loss")


@dataclass
class ModelSection:
    """Which model to train.

    Attributes
    ----------
    name
        A registry name (``napari_rapacl.models.list_models()``), e.g. ``stnet`` or ``stnet_tiny``.
    config
        Overrides of the model's typed config (checked against it). ``n_genes`` is set from the gene
        list; ``patch_size`` and ``mpp`` here also decide the patches the data side extracts.
    stage
        RaPaCL stage (1 or 2); passed to the model config when it has a ``stage`` field. Stage 1 has
        no gene prediction and is selected on the validation loss (see :class:`OptimConfig`).
    init_checkpoint
        A checkpoint (e.g. the Stage 1 ``best.pt``) loaded into the model before training: through
        ``init_from_stage1(model, path)`` when the model's module defines it, else a strict
        ``load_state_dict``.
    """

    name: str = "stnet_tiny"
    config: dict[str, Any] = field(default_factory=dict)
    stage: int | None = None
    init_checkpoint: str | None = None


@dataclass
class DataConfig:
    """Data: sections of each split, genes, patches and table-backed inputs.

    Attributes
    ----------
    dataset
        Only ``"her2st"`` for now (:func:`napari_rapacl.datasets.her2st`).
    data_dir
        Folder holding ``her2st/`` (default: ``$NAPARI_RAPACL_DATA_DIR``, the cache, a download).
    train, val, test
        Section names. ``val`` is the INNER validation split used for early stopping and model
        selection; it must not overlap ``train`` or ``test``. ``test`` is evaluated once, at the end,
        with the selected checkpoint (it may be empty).
    genes
        ``"her2st785"`` (the published 785-gene list), a path to a gene-list file, an explicit list,
        or ``"top:K[:mean|var]"`` (K genes selected on the TRAINING sections only).
    min_frac_spots
        For ``top:K``: a gene must be expressed in this fraction of the spots of every training section.
    cache_dir
        Where extracted patches are cached (default ``<napari-rapacl cache>/patches``).
    max_spots
        Use at most this many spots per section (a fixed, seeded subset) - for quick tests.
    augment
        Random flips / 90-degree rotations of the training patches (never of val/test).
    hed_sigma
        HED stain jitter of the training patches (only with ``augment``; 0 = off): each patch's
        haematoxylin, eosin and residual stain amounts (colour deconvolution of the optical density
        with Ruifrok and Johnston's matrix) become ``s * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)``
        and ``b ~ U(-sigma, sigma)`` (optical-density units) per channel, one draw per (seed, epoch,
        spot) (Tellez et al. 2018; 0.05 is the "HED-light" range of Tellez et al. 2019).
    drop_last
        Drop the final partial training batch. ``None``: only when a process would get a 1-sample
        batch (BatchNorm cannot train on one sample).
    num_workers
        DataLoader workers (patches live in memory, so 0 is usually fastest).
    n_neighbors
        K for the ``neighbors``/``neighbor_target`` inputs (None: the model config's ``n_neighbors``
        if it has one, else 8).
    neighbors_include_self
        Whether the spot itself is one of its K neighbours (None: the model config's field of that
        name if any, else False).
    radiomics_table
        Per-section table of per-spot radiomics, indexed by barcode (a ``barcode`` column or the
        index): a path template with ``{section}`` (``.parquet`` or ``.csv``) or a ``{section: path}``
        mapping.
    radiomics_columns
        Feature columns to use, in this order: a list of names, the name of a feature set of the
        radiomics engine (``"rapacl72"``: RaPaCL-ST's 72 features), or None (every numeric column
        but the label column; ``n_nuclei`` included).
    radiomics_signed_log
        Substrings of column names transformed with ``sign(x) * log1p(|x|)`` before z-scoring
        (methods.md recommends it for heavy-tailed ``Energy`` / ``NonUniformity`` features).
    cell_label_table
        Table holding the per-spot cell-composition label (default: the radiomics table).
    cell_label_column
        Its column name.
    """

    dataset: str = "her2st"
    data_dir: str | None = None
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    genes: str | list[str] = "her2st785"
    min_frac_spots: float = 0.1
    cache_dir: str | None = None
    max_spots: int | None = None
    augment: bool = True
    hed_sigma: float = 0.0
    drop_last: bool | None = None
    num_workers: int = 0
    n_neighbors: int | None = None
    neighbors_include_self: bool | None = None
    radiomics_table: str | dict[str, str] | None = None
    radiomics_columns: list[str] | str | None = None
    radiomics_signed_log: list[str] = field(default_factory=list)
    cell_label_table: str | dict[str, str] | None = None
    cell_label_column: str = "cell_label"


@dataclass
class OptimConfig:
    """Optimisation and model selection.

    Attributes
    ----------
    optimizer
        ``adamw``, ``adam`` or ``sgd`` (momentum ``momentum``). A model may define
        ``param_groups(lr, weight_decay)`` to set per-group learning rates.
    lr, weight_decay, momentum
        Usual meaning.
    scheduler
        ``cosine`` (learning rate ``lr * (1 + cos(pi * epoch / epochs)) / 2``, set at the start of
        every epoch) or ``none``.
    epochs
        Maximum number of epochs.
    batch_size
        The GLOBAL training batch: split evenly across DDP processes (must be divisible).
    eval_batch_size
        Batch size of each process at validation/test time.
    patience
        Early stopping: stop after this many epochs without a better validation score (None: never).
    grad_clip
        Clip the global gradient norm to this value (None: no clipping).
    init_head_bias
        Start the gene head's bias at the training mean expression (``model.set_target_mean(mean)``
        when the model defines it, else a ``head`` Linear with ``n_genes`` outputs).
    select_on
        ``val_pcc`` (mean per-gene Pearson r on the validation sections, higher is better),
        ``val_loss`` (validation total loss, lower is better) or ``auto`` (``val_loss`` for RaPaCL
        Stage 1, which predicts no genes; ``val_pcc`` otherwise).
    loss_selection_epoch
        With ``val_loss``, the validation loss is ``compute_loss(batch, epoch=loss_selection_epoch)``
        for EVERY epoch, i.e. one FIXED weighting of the loss terms (the default is past any warm-up
        and ramp, so all terms count at full weight). The reference compared losses computed under
        different ramp weights, which biases the choice toward early epochs.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    patience: int | None = None
    grad_clip: float | None = None
    init_head_bias: bool = True
    select_on: str = "auto"
    loss_selection_epoch: int = 1_000_000


@dataclass
class RunConfig:
    """How to run.

    Attributes
    ----------
    seed
        Model init uses ``seed`` on every process (and DDP broadcasts rank 0's weights). The data
        order is a function of ``(seed, epoch)`` only, so it is the same for any number of processes;
        augmentation is a function of ``(seed, epoch, spot)``; other randomness (dropout) is reseeded
        every epoch with ``(seed, epoch, rank)``, so a resumed run repeats an uninterrupted one.
    out_dir
        The run folder (``config.yaml``, ``train.log``, ``history.json``, ``last.pt``, ``best.pt``,
        ``metrics.json``).
    device
        ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun with CUDA each
        process uses ``cuda:LOCAL_RANK``.
    amp
        Mixed precision (autocast) on CUDA, dtype ``amp_dtype`` (``bfloat16`` or ``float16``, the
        latter with a gradient scaler).
    channels_last
        Model and image batches in channels_last memory format (faster convolutions on GPUs).
    num_threads
        ``torch.set_num_threads`` for this process (None: leave torch's default).
    resume
        A ``last.pt`` to continue from (next epoch, optimiser and early-stopping state, history).
    stop_after
        Run at most this many epochs in this invocation, then exit without the final test
        evaluation (e.g. to fit a job time limit); continue with ``run.resume``.
    overwrite
        Allow writing into an out_dir that already holds a run.
    batchnorm
        ``batch`` (per-process batch statistics), ``sync`` (SyncBatchNorm: global batch statistics,
        CUDA only), ``frozen`` (BatchNorm layers in eval mode: running statistics, affine parameters
        still trained) or ``auto`` (``sync`` under DDP on CUDA, else ``batch``).
    find_unused_parameters
        DDP's flag (None: the model's ``ddp_find_unused_parameters`` attribute, else False).
    dist_timeout_s
        Timeout of collective operations.
    spot_smoothing
        After the run, choose the test-time spot smoothing (a Gaussian mean over the spot grid, width
        from 0 = off to 300 um) on the validation sections and store it in ``best.pt``
        (:mod:`training.postprocess`); prediction from a slide applies it. her2st runs that predict
        genes only.
    install_as
        After the run, install ``best.pt`` in the user's model folder under this name
        (:func:`napari_rapacl.jobs.install_model`), so the Predict widget lists it by name.
    """

    seed: int = 0
    out_dir: str = "outputs/runs/default"
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    num_threads: int | None = None
    resume: str | None = None
    stop_after: int | None = None
    overwrite: bool = False
    batchnorm: str = "auto"
    find_unused_parameters: bool | None = None
    dist_timeout_s: float = 600.0
    spot_smoothing: bool = True
    install_as: str | None = None


@dataclass
class TrainConfig:
    """The whole training configuration."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        """Check values that do not depend on the data; returns self."""
        _validate(self)
        return self


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------
def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML) to the annotated type ``tp``; raise a clear error if impossible."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RapaclInputError(f"{where}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        # try the non-str members first, so "3" for `int | str` becomes 3 only if str is not listed
        ordered = [a for a in args if a is not type(None)]
        if isinstance(value, str) and str in ordered:
            return value
        for arg in ordered:
            try:
                return coerce(value, arg, where)
            except RapaclInputError as exc:
                errors.append(str(exc))
        raise RapaclInputError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value]  # a single section name is a one-element list
        if not isinstance(value, (list, tuple)):
            raise RapaclInputError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_t, val_t = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise RapaclInputError(f"{where}: expected a mapping, got {value!r}")
        return {coerce(k, key_t, where): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if value is None:
        raise RapaclInputError(f"{where}: null is not allowed (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise RapaclInputError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RapaclInputError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise RapaclInputError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RapaclInputError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RapaclInputError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RapaclInputError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RapaclInputError(f"{where}: expected a mapping, got {value!r}")
        return dataclass_from_dict(tp, value, where)
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module, not user input


def dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, converting every value; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RapaclInputError(
            f"{where}: unknown key(s) {', '.join(repr(u) for u in unknown)}; valid keys: {', '.join(known)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any] | None, source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a nested mapping (e.g. a parsed YAML file)."""
    values = values or {}
    if not isinstance(values, dict):
        raise RapaclInputError(f"{source}: the top level must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RapaclInputError(
            f"{source}: unknown section(s) {', '.join(repr(u) for u in unknown)}; valid sections: "
            f"{', '.join(known)}"
        )
    sections = {}
    for name, value in values.items():
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RapaclInputError(f"{source}: section {name!r} must be a mapping, got {value!r}")
        sections[name] = dataclass_from_dict(hints[name], value, name)
    return TrainConfig(**sections)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], "3e-4")``; the value is parsed as YAML."""
    if "=" not in text:
        raise RapaclInputError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise RapaclInputError(
            f"override {text!r}: the key must be dotted, section.key (e.g. optim.epochs=5), got {key!r}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RapaclInputError(f"override {text!r}: cannot parse the value: {exc}") from None
    return parts, value


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested mapping (a copy is returned).

    Keys must name existing config fields (checked when the mapping is converted); inside
    ``model.config`` new keys may be added (they are checked against the model's config class).
    """
    import copy

    out = copy.deepcopy(values) if values else {}
    hints = typing.get_type_hints(TrainConfig)
    for text in overrides:
        parts, value = parse_override(text)
        section = parts[0]
        if section not in hints:
            raise RapaclInputError(
                f"override {text!r}: unknown section {section!r}; valid sections: {', '.join(hints)}"
            )
        section_fields = {f.name for f in fields(hints[section])}
        if parts[1] not in section_fields:
            raise RapaclInputError(
                f"override {text!r}: unknown key {parts[1]!r} in section {section!r}; valid keys: "
                f"{', '.join(sorted(section_fields))}"
            )
        if len(parts) > 2 and not (section == "model" and parts[1] == "config"):
            raise RapaclInputError(
                f"override {text!r}: {section}.{parts[1]} has no sub-keys (only model.config.<key> does)"
            )
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RapaclInputError(f"override {text!r}: {part!r} is not a mapping in the config")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides.

    Raises
    ------
    FileNotFoundError
        The YAML file does not exist.
    RapaclInputError
        Bad YAML, an unknown key, a value of the wrong type, or an invalid combination.
    """
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        from napari_rapacl.io._paths import require_readable

        path = require_readable(Path(path), "training config")  # a FIFO or device is named, never read
        if not path.is_file():
            raise RapaclInputError(f"training config {path} is a folder: give the YAML file")
        source = str(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RapaclInputError(f"{path}: not a text file (a YAML training config is expected)") from None
        except yaml.YAMLError as exc:
            raise RapaclInputError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise RapaclInputError(
                f"{path}: a training config is a YAML mapping (model:, data:, optim:, run:), "
                f"got a {type(values).__name__}"
            )
    values = apply_overrides(values, list(overrides))
    return config_from_dict(values, source).validate()


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise RapaclInputError(f"{where} must be one of {', '.join(choices)}; got {value!r}")


def _validate(cfg: TrainConfig) -> None:
    d, o, r, m = cfg.data, cfg.optim, cfg.run, cfg.model
    if d.dataset != "her2st":
        raise RapaclInputError(f"data.dataset: only 'her2st' is supported, got {d.dataset!r}")
    for split in ("train", "val"):
        if not getattr(d, split):
            raise RapaclInputError(
                f"data.{split} is empty: name at least one section (an inner validation section is "
                "required for early stopping and model selection; it is never the test section)"
            )
    names = {s: [str(x).strip().upper() for x in getattr(d, s)] for s in ("train", "val", "test")}
    for split, secs in names.items():
        dup = sorted({s for s in secs if secs.count(s) > 1})
        if dup:
            raise RapaclInputError(f"data.{split} lists section(s) twice: {dup}")
    for a, b in (("val", "test"), ("val", "train"), ("train", "test")):
        both = sorted(set(names[a]) & set(names[b]))
        if both:
            raise RapaclInputError(
                f"data.{a} and data.{b} overlap ({both}): the validation section must be distinct from "
                "the training and test sections, and test sections are never trained on"
            )
    if d.max_spots is not None and d.max_spots < 2:
        raise RapaclInputError(f"data.max_spots must be >= 2 or null, got {d.max_spots}")
    if d.num_workers < 0:
        raise RapaclInputError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.n_neighbors is not None and d.n_neighbors < 1:
        raise RapaclInputError(f"data.n_neighbors must be >= 1, got {d.n_neighbors}")
    if not 0.0 <= d.min_frac_spots <= 1.0:
        raise RapaclInputError(f"data.min_frac_spots must be in [0, 1], got {d.min_frac_spots}")
    _check_choice(o.optimizer, ("adamw", "adam", "sgd"), "optim.optimizer")
    _check_choice(o.scheduler, ("cosine", "none"), "optim.scheduler")
    _check_choice(o.select_on, SELECT_ON, "optim.select_on")
    if not o.lr > 0:
        raise RapaclInputError(f"optim.lr must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise RapaclInputError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if o.epochs < 1:
        raise RapaclInputError(f"optim.epochs must be >= 1, got {o.epochs}")
    if o.batch_size < 1 or o.eval_batch_size < 1:
        raise RapaclInputError(
            "optim.batch_size and optim.eval_batch_size must be >= 1, "
            f"got {o.batch_size}, {o.eval_batch_size}"
        )
    if o.patience is not None and o.patience < 1:
        raise RapaclInputError(f"optim.patience must be >= 1 or null, got {o.patience}")
    if o.grad_clip is not None and not o.grad_clip > 0:
        raise RapaclInputError(f"optim.grad_clip must be > 0 or null, got {o.grad_clip}")
    _check_choice(r.batchnorm, BATCHNORM_MODES, "run.batchnorm")
    _check_choice(r.amp_dtype, ("bfloat16", "float16"), "run.amp_dtype")
    dev = r.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise RapaclInputError(f"run.device must be auto, cpu, cuda or cuda:N; got {dev!r}")
    if r.stop_after is not None and r.stop_after < 1:
        raise RapaclInputError(f"run.stop_after must be >= 1 or null, got {r.stop_after}")
    if r.num_threads is not None and r.num_threads < 1:
        raise RapaclInputError(f"run.num_threads must be >= 1 or null, got {r.num_threads}")
    if r.install_as is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", r.install_as):
        raise RapaclInputError(
            f"run.install_as={r.install_as!r}: a model name is 1-64 letters, digits, '_', '.' or '-'"
        )
    if m.stage is not None and m.stage not in (1, 2):
        raise RapaclInputError(f"model.stage must be 1, 2 or null; got {m.stage}")
    if m.stage == 2 and not m.init_checkpoint:
        raise RapaclInputError(
            "model.stage=2 needs model.init_checkpoint: the Stage 1 best.pt that Stage 2 starts from"
        )
    if "n_genes" in m.config and not isinstance(m.config["n_genes"], int):
        raise RapaclInputError(f"model.config.n_genes must be an integer, got {m.config['n_genes']!r}")


def normalized_sections(names: list[str]) -> list[str]:
    """Section names as the dataset spells them (upper case, stripped)."""
    return [str(x).strip().upper() for x in names]


def save_config(cfg: TrainConfig | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the config as YAML, atomically."""
    values = config_to_dict(cfg) if isinstance(cfg, TrainConfig) else cfg
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""

    def write(tmp: Path) -> None:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are plain, shareable result files

    return write_atomic(path, write)
