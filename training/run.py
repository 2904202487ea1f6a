"""Train any registered model on her2st sections, on one process or under torchrun (DDP).

Usage::

    python -m training.run --config training/configs/stnet_her2st.yaml [key=value ...]
    torchrun --nproc_per_node=2 -m training.run --config training/configs/stnet_her2st.yaml
    python -m training.run run.resume=outputs/runs/stnet/last.pt optim.epochs=30   # continue a run

Each epoch: one pass over the training sections (DistributedSampler, GLOBAL batch ``optim.batch_size``
split across processes, the loss computed through the DDP wrapper), then predictions on the INNER
validation sections gathered from all processes, and model selection on them: the best mean per-gene
Pearson r (``val_pcc``), or for RaPaCL Stage 1, which predicts no genes, the lowest validation loss at
one fixed loss weighting (``val_loss``, see ``optim.loss_selection_epoch``). ``last.pt`` is written
every epoch and ``best.pt`` at every improvement; early stopping after ``optim.patience`` epochs
without one. At the end the test sections are evaluated ONCE with ``best.pt`` and the scores written
to ``metrics.json``. Only rank 0 writes files and logs.

Files in ``run.out_dir``: ``config.yaml`` (the resolved config), ``train.log``, ``history.json`` (one
row per epoch), ``last.pt``/``best.pt`` (+ ``.yaml`` beside them), ``metrics.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from napari_rapacl._errors import RapaclInputError
from napari_rapacl.metrics import pearson_per_gene, summarize
from napari_rapacl.models.checkpoint import NORMALIZATION, read_checkpoint, save_checkpoint
from napari_rapacl.models.registry import create_model, get_entry

from .config import (
    TrainConfig,
    apply_overrides,
    atomic_write_text,
    coerce,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from .data import InputContext, SpotDataset, batch_to_device, load_splits
from .distributed import (
    DistContext,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    cleanup,
    init_distributed,
    replica_max_diff,
    wrap_for_training,
)

log = logging.getLogger("training")

__all__ = ["TrainResult", "init_from_checkpoint", "main", "resolve_model_overrides", "train"]

#: Largest parameter-fingerprint difference tolerated between DDP replicas.
REPLICA_TOLERANCE = 1e-6


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    out_dir: Path
    best_epoch: int
    best_score: float
    select_on: str
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def resolve_model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """``model.config`` converted to the model config's field types, with ``stage`` injected."""
    entry = get_entry(cfg.model.name)
    hints = typing.get_type_hints(entry.config_cls)
    known = {f.name for f in fields(entry.config_cls)}
    unknown = sorted(set(cfg.model.config) - known)
    if unknown:
        raise RapaclInputError(
            f"model.config: unknown key(s) {unknown} for model {cfg.model.name!r} "
            f"({entry.config_cls.__name__}); valid keys: {sorted(known)}"
        )
    out = {k: coerce(v, hints[k], f"model.config.{k}") for k, v in cfg.model.config.items()}
    if cfg.model.stage is not None and "stage" in known:
        if "stage" in out and out["stage"] != cfg.model.stage:
            raise RapaclInputError(
                f"model.stage={cfg.model.stage} but model.config.stage={out['stage']}: set only one"
            )
        out["stage"] = cfg.model.stage
    return out


def init_from_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Initialise ``model`` from a checkpoint (RaPaCL Stage 2 from Stage 1).

    Uses ``init_from_stage1(model, path)`` when the model's module defines it, else a strict
    ``load_state_dict`` of the checkpoint's weights. Returns how it was done (for the log).
    """
    module = sys.modules.get(type(model).__module__)
    hook = getattr(module, "init_from_stage1", None)
    if callable(hook):
        hook(model, str(path))
        return f"{module.__name__}.init_from_stage1"
    payload = read_checkpoint(path)
    model.load_state_dict(payload["state_dict"], strict=True)
    return "load_state_dict(strict=True)"


def init_head_bias(model: nn.Module, mean: np.ndarray) -> str | None:
    """Start the gene head at the training mean (``set_target_mean`` hook or a ``head`` Linear)."""
    value = torch.as_tensor(mean, dtype=torch.float32)
    hook = getattr(model, "set_target_mean", None)
    if callable(hook):
        hook(value)
        return "set_target_mean"
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.bias is not None and head.out_features == value.numel():
        with torch.no_grad():
            head.bias.copy_(value.to(head.bias))
        return "head.bias"
    return None


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of ``epoch`` (0-based): cosine from 1 towards 0 over ``epochs``, or 1.

    A function of the epoch only (no scheduler state), so a resumed run - even one resumed with
    more epochs - follows the schedule of its config.
    """
    if schedule == "none":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 1_009 + int(rank)) % (2**63 - 1)


def _set_batchnorm_frozen(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(value), indent=2) + "\n")


@contextlib.contextmanager
def _logging(out_dir: Path, ctx: DistContext):
    """Rank 0: INFO to stdout and ``train.log``; other ranks: warnings only, prefixed with the rank."""
    handlers: list[logging.Handler] = []
    old_level, old_propagate = log.level, log.propagate
    if ctx.is_main:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        h1 = logging.StreamHandler(sys.stdout)
        h2 = logging.FileHandler(out_dir / "train.log", mode="a")
        for h in (h1, h2):
            h.setFormatter(fmt)
            handlers.append(h)
        log.setLevel(logging.INFO)
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"[rank {ctx.rank}] %(levelname)s %(message)s"))
        handlers.append(h)
        log.setLevel(logging.WARNING)
    for h in handlers:
        log.addHandler(h)
    log.propagate = False
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)
        log.propagate = old_propagate


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    hook = getattr(model, "param_groups", None)
    if callable(hook):
        params: Any = hook(o.lr, o.weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RapaclInputError(f"model {cfg.model.name!r} has no trainable parameter")
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def _dedupe(idx: torch.Tensor, *rows: torch.Tensor, n: int, what: str) -> list[np.ndarray]:
    """Rows ordered by dataset index, each index once (DistributedSampler repeats a few)."""
    idx_np = idx.numpy().astype(np.int64)
    uniq, first = np.unique(idx_np, return_index=True)
    if len(uniq) != n or (n and (uniq[0] != 0 or uniq[-1] != n - 1)):
        raise RuntimeError(f"{what}: gathered {len(uniq)} distinct spots, expected {n}")
    return [r.numpy()[first] for r in rows]


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def _eval_loader(ds: SpotDataset, cfg: TrainConfig, ctx: DistContext) -> DataLoader:
    sampler = (
        DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False)
        if ctx.enabled
        else None
    )
    return DataLoader(
        ds,
        batch_size=cfg.optim.eval_batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )


def predict_gathered(
    model: nn.Module, ds: SpotDataset, cfg: TrainConfig, ctx: DistContext, autocast: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, target)`` of every spot of ``ds`` in dataset order, gathered from all processes."""
    model.eval()
    preds, targets, idxs = [], [], []
    with torch.inference_mode():
        for batch in _eval_loader(ds, cfg, ctx):
            b = batch_to_device(batch, ctx.device, channels_last=cfg.run.channels_last)
            with autocast():
                pred = model.predict(b)
            preds.append(pred.float())
            targets.append(b["target"].float())
            idxs.append(b["index"])
    g = model.config.n_genes
    pred = torch.cat(preds) if preds else torch.zeros(0, g, device=ctx.device)
    target = torch.cat(targets) if targets else torch.zeros(0, g, device=ctx.device)
    idx = torch.cat(idxs).to(ctx.device) if idxs else torch.zeros(0, dtype=torch.int64, device=ctx.device)
    pred_all, target_all, idx_all = (all_gather_rows(t, ctx) for t in (pred, target, idx))
    p, t = _dedupe(idx_all, pred_all, target_all, n=len(ds), what=f"predictions on {ds.section_names}")
    return p.astype(np.float32), t.astype(np.float32)


def loss_gathered(
    model: nn.Module, ds: SpotDataset, cfg: TrainConfig, ctx: DistContext, autocast: Any
) -> dict[str, float]:
    """Sample-weighted mean of ``compute_loss(batch, epoch=optim.loss_selection_epoch)`` over ``ds``.

    Losses are batch-level (a contrastive term depends on the batch), so under DDP the few spots
    ``DistributedSampler`` repeats to even out the shards count twice, and batches are per process.
    """
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    n = 0
    with torch.inference_mode():
        for batch in _eval_loader(ds, cfg, ctx):
            b = batch_to_device(batch, ctx.device, channels_last=cfg.run.channels_last)
            with autocast():
                out = model.compute_loss(b, cfg.optim.loss_selection_epoch)
            k = int(b["index"].shape[0])
            for key, val in _scalar_terms(out).items():
                sums[key] = sums.get(key, 0.0) + val.double() * k
            n += k
    keys = sorted(sums)
    vec = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64).cpu() for k in keys]
        + [torch.tensor(n, dtype=torch.float64)]
    )
    total = all_reduce_sum(vec, ctx)
    return {k: float(total[i] / total[-1]) for i, k in enumerate(keys)}


def _scalar_terms(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(out, dict) or "loss" not in out:
        raise RapaclInputError("compute_loss must return a dict with the key 'loss' (models/base.py)")
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def section_metrics(pred: np.ndarray, target: np.ndarray, genes: list[str]) -> dict[str, Any]:
    """``metrics.summarize`` plus the per-gene Pearson r (None where a gene is constant)."""
    out: dict[str, Any] = dict(summarize(pred, target, genes))
    r = pearson_per_gene(pred, target)
    out["per_gene_r"] = {g: (None if not np.isfinite(v) else float(v)) for g, v in zip(genes, r, strict=True)}
    return out


def _gene_reliability(per: list[dict[str, Any]], genes: list[str], sections: list[str]) -> dict[str, Any]:
    """The checkpoint's ``gene_reliability``: each gene's Pearson r on the inner validation section
    (the mean over several validation sections, NaN where a gene is constant on all of them)."""
    from napari_rapacl.models.checkpoint import gene_reliability_entry

    table = np.array(
        [[np.nan if m["per_gene_r"][g] is None else m["per_gene_r"][g] for g in genes] for m in per],
        dtype=np.float64,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (constant gene) stays NaN
        values = np.nanmean(table, axis=0)
    return gene_reliability_entry(values, genes, sections)


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
LOCK_NAME = ".training.lock"


def lock_out_dir(out_dir: Path) -> Any:
    """Take the output folder for this run: an exclusive lock on ``<out_dir>/.training.lock`` (which
    names the holder's pid and start time), held until the returned file is closed (or the process
    ends, however it ends). A second run with the same ``run.out_dir`` is refused clearly instead of
    mixing its config with the other run's checkpoints."""
    import datetime as _dt
    import fcntl
    import os

    path = out_dir / LOCK_NAME
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RapaclInputError(
            f"run.out_dir={out_dir} is in use by another training run ({holder}); wait for it to end, "
            "or choose another run.out_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    fh.write(f"pid {os.getpid()} on {os.uname().nodename}, started {now}\n")
    fh.flush()
    return fh


def train(cfg: TrainConfig) -> TrainResult:
    """Run a training described by ``cfg`` (single process, or one rank under torchrun)."""
    cfg.validate()
    ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    try:
        return _Trainer(cfg, ctx).run()
    finally:
        cleanup(ctx)


class _Trainer:
    """One training run; every rank builds one. Methods run in the order of :meth:`run`."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out_dir = Path(cfg.run.out_dir).expanduser()
        self.world = ctx.world_size
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.best_epoch, self.since_best = 0, -1, 0
        self.select_on = cfg.optim.select_on
        if self.select_on == "auto":
            self.select_on = "val_loss" if cfg.model.stage == 1 else "val_pcc"
        self.best_score = -math.inf if self.select_on == "val_pcc" else math.inf
        self._lock: Any = None

    # ---- orchestration ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            if self._lock is not None:  # the run's lock on its output folder
                self._lock.close()

    def _run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        self.resume = read_checkpoint(cfg.run.resume) if cfg.run.resume else None
        self._check_out_dir()
        if cfg.optim.batch_size % self.world:
            raise RapaclInputError(
                f"optim.batch_size={cfg.optim.batch_size} (the global batch) is not divisible by the "
                f"{self.world} processes"
            )
        self.local_batch = cfg.optim.batch_size // self.world
        with _logging(self.out_dir, ctx):
            t_start = time.perf_counter()
            self._setup_data()
            self._setup_model()
            self._setup_loaders()
            self._log_setup()
            finished = self._fit()
            metrics: dict[str, Any] = {}
            if finished:
                metrics = self._final_evaluation()
                metrics["seconds"] = time.perf_counter() - t_start
                if ctx.is_main:
                    postprocess = self._fit_postprocess()
                    if postprocess is not None:
                        metrics["postprocess"] = postprocess
                    _write_json(self.out_dir / "metrics.json", metrics)
                    if cfg.run.install_as:
                        self._install(metrics)
            else:
                log.info(
                    "stopped after %d epoch(s) (run.stop_after); continue with run.resume=%s",
                    cfg.run.stop_after,
                    self.out_dir / "last.pt",
                )
            barrier(ctx)
        return TrainResult(
            self.out_dir, self.best_epoch, self.best_score, self.select_on, self.history, metrics
        )

    def _check_out_dir(self) -> None:
        r = self.cfg.run
        if self.resume is not None and "train_config" not in self.resume:
            raise RapaclInputError(f"{r.resume} was not written by training.run (no train_config)")
        if self.resume is None and (self.out_dir / "last.pt").exists() and not r.overwrite:
            raise RapaclInputError(
                f"{self.out_dir} already holds a run (last.pt): resume it with "
                f"run.resume={self.out_dir / 'last.pt'}, choose another run.out_dir, or pass "
                "run.overwrite=true"
            )
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_out_dir(self.out_dir)
        barrier(self.ctx)

    # ---- setup --------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg, ctx, d = self.cfg, self.ctx, self.cfg.data
        entry = get_entry(cfg.model.name)
        self.overrides = resolve_model_overrides(cfg)
        self.probe = entry.config_cls.from_dict(
            {**entry.defaults, **self.overrides}, source=f"model {cfg.model.name!r}"
        )
        if not ctx.is_main:  # rank 0 first, so that it alone fills the patch cache
            barrier(ctx)
        self.genes, self.splits = load_splits(d, size=self.probe.patch_size, mpp=self.probe.mpp)
        if ctx.is_main:
            barrier(ctx)
        n = len(self.genes)
        if "n_genes" in self.overrides and self.overrides["n_genes"] != n:
            raise RapaclInputError(
                f"model.config.n_genes={self.overrides['n_genes']} but the gene list ({d.genes!r}) "
                f"has {n} genes"
            )
        if self.resume is not None and list(self.resume["genes"]) != list(self.genes):
            raise RapaclInputError(
                f"{cfg.run.resume} was trained on a different gene list than data.genes={d.genes!r}"
            )
        self.overrides["n_genes"] = n

    def _setup_model(self) -> None:
        cfg, ctx, r, o = self.cfg, self.ctx, self.cfg.run, self.cfg.optim
        torch.manual_seed(r.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = create_model(cfg.model.name, **self.overrides)
        self.how_init = "random"
        self.input_stats: dict[str, Any] = {}
        if self.resume is not None:
            model.load_state_dict(self.resume["state_dict"], strict=True)
            self.how_init = f"resumed from {r.resume}"
            self.input_stats = dict(self.resume.get("input_stats") or {})
        elif cfg.model.init_checkpoint:
            how = init_from_checkpoint(model, cfg.model.init_checkpoint)
            self.how_init = f"{cfg.model.init_checkpoint} via {how}"
            # the same input statistics (e.g. radiomics z-scoring) as the run it starts from
            self.input_stats = dict(read_checkpoint(cfg.model.init_checkpoint).get("input_stats") or {})
        # A gene head that starts untrained (random init, or RaPaCL Stage 2 after Stage 1, which has no
        # gene loss) starts at the training mean.
        fresh_head = self.resume is None and (
            not cfg.model.init_checkpoint or getattr(model.config, "stage", None) == 2
        )
        if fresh_head and o.init_head_bias:
            train_mean = np.concatenate([s.target for s in self.splits["train"]]).mean(axis=0)
            how = init_head_bias(model, train_mean)
            if how:
                self.how_init += f", gene head bias = training mean ({how})"
        self.bn_mode = r.batchnorm
        if self.bn_mode == "auto":
            self.bn_mode = "sync" if (ctx.enabled and ctx.device.type == "cuda") else "batch"
        if self.bn_mode == "sync" and ctx.enabled:
            if ctx.device.type != "cuda":
                raise RapaclInputError(
                    "run.batchnorm=sync needs CUDA (torch's SyncBatchNorm has no CPU implementation); "
                    "use batch or frozen on the CPU"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(ctx.device)
        if r.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

        resolved = replace(cfg, model=replace(cfg.model, config=model.config.to_dict()))
        self.resolved_dict = config_to_dict(resolved)
        if ctx.is_main:
            save_config(self.resolved_dict, self.out_dir / "config.yaml")

        self.optimizer = _make_optimizer(model, cfg)
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])  # saved with the optimizer state
        self.amp_dtype = torch.bfloat16 if r.amp_dtype == "bfloat16" else torch.float16
        self.use_scaler = r.amp and self.amp_dtype == torch.float16 and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        if self.resume is not None:
            self.optimizer.load_state_dict(self.resume["optimizer"])
            if self.use_scaler and self.resume.get("scaler"):
                self.scaler.load_state_dict(self.resume["scaler"])
            self.start_epoch = int(self.resume["epoch"]) + 1
            self.best_epoch = int(self.resume["best_epoch"])
            self.best_score = float(self.resume["best_score"])
            self.since_best = int(self.resume["epochs_since_best"])
            self.history = list(self.resume.get("history", []))

        find_unused = r.find_unused_parameters
        if find_unused is None:
            find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
        # compute_loss runs as the forward of this wrapper, i.e. through DDP
        self.ddp_model = wrap_for_training(model, ctx, find_unused_parameters=find_unused)

    def autocast(self) -> Any:
        return torch.autocast(
            device_type=self.ctx.device.type, dtype=self.amp_dtype, enabled=self.cfg.run.amp
        )

    def _setup_loaders(self) -> None:
        cfg, ctx, d = self.cfg, self.ctx, self.cfg.data
        model = self.model
        self.train_keys = list(model.required_inputs)
        eval_keys = (
            list(model.required_inputs)
            if self.select_on == "val_loss"
            else list(dict.fromkeys([*model.predict_inputs, "target"]))
        )
        self.ictx = InputContext(d, model.config, self.genes, self.splits["train"], stats=self.input_stats)
        self.train_ds = SpotDataset(
            self.splits["train"],
            self.train_keys,
            self.ictx,
            augment=d.augment,
            seed=cfg.run.seed,
            hed_sigma=d.hed_sigma,
        )
        self.val_ds = [SpotDataset([s], eval_keys, self.ictx) for s in self.splits["val"]]
        self.test_ds = [SpotDataset([s], eval_keys, self.ictx) for s in self.splits["test"]]
        # the same permutation (seed + epoch) for any number of processes: rank r takes every
        # world-th index, so step k's global batch is the k-th block of it, as in a 1-process run
        self.sampler = DistributedSampler(
            self.train_ds, num_replicas=self.world, rank=ctx.rank, shuffle=True, seed=cfg.run.seed
        )
        drop_last = d.drop_last
        if drop_last is None:  # BatchNorm cannot train on a 1-sample batch
            drop_last = (
                _has_batchnorm(model)
                and self.bn_mode != "frozen"
                and len(self.sampler) % self.local_batch == 1
            )
        n_local = len(self.sampler)
        self.steps = n_local // self.local_batch if drop_last else math.ceil(n_local / self.local_batch)
        if self.steps == 0:
            raise RapaclInputError(
                f"no training batch: {len(self.train_ds)} spots, global batch {cfg.optim.batch_size}"
            )
        self.train_loader = DataLoader(
            self.train_ds,
            batch_size=self.local_batch,
            sampler=self.sampler,
            num_workers=d.num_workers,
            drop_last=drop_last,
            pin_memory=ctx.device.type == "cuda",
        )

    def _log_setup(self) -> None:
        cfg, ctx, model, splits = self.cfg, self.ctx, self.model, self.splits
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "model %s (%s params, %s trainable; init: %s); %d genes; patches %d px at %g um/px",
            cfg.model.name, f"{n_params:,}", f"{n_train:,}", self.how_init, len(self.genes),
            self.probe.patch_size, self.probe.mpp,
        )  # fmt: skip
        log.info(
            "train %s (%d spots), val %s (%d), test %s (%d); training inputs %s",
            [s.name for s in splits["train"]], len(self.train_ds), [s.name for s in splits["val"]],
            sum(len(v) for v in self.val_ds), [s.name for s in splits["test"]],
            sum(len(t) for t in self.test_ds), self.train_keys,
        )  # fmt: skip
        mode = f"DDP ({ctx.backend})" if ctx.enabled else "single process"
        log.info(
            "%s on %s: %d process(es) x batch %d = global batch %d, %d steps/epoch; batchnorm %s; "
            "selection on %s%s",
            mode, ctx.device, self.world, self.local_batch, cfg.optim.batch_size, self.steps, self.bn_mode,
            self.select_on, f"; resuming at epoch {self.start_epoch + 1}" if self.resume else "",
        )  # fmt: skip

    # ---- epochs -------------------------------------------------------------------------------
    def _fit(self) -> bool:
        """Train until the last epoch or early stopping (True), or until ``run.stop_after`` (False)."""
        o, r = self.cfg.optim, self.cfg.run
        if o.patience is not None and self.best_epoch >= 0 and self.since_best >= o.patience:
            return True  # a resumed run that had already stopped early
        for ran, epoch in enumerate(range(self.start_epoch, o.epochs)):
            if r.stop_after is not None and ran >= r.stop_after:
                return False
            t0 = time.perf_counter()
            row = self._train_epoch(epoch)
            row.update(self._validate())
            score = row["val_pcc"] if self.select_on == "val_pcc" else row["val_loss"]
            better = score > self.best_score if self.select_on == "val_pcc" else score < self.best_score
            improved = bool(better and math.isfinite(score))
            if improved:
                self.best_score, self.best_epoch, self.since_best = score, epoch, 0
            else:
                self.since_best += 1
            row["seconds"] = time.perf_counter() - t0
            row["best"] = improved
            self.history.append(row)
            if self.ctx.is_main:
                self._save(epoch, improved)
                val_txt = (
                    f"val_pcc {row['val_pcc']:.4f} val_mse {row['val_mse']:.4f}"
                    if self.select_on == "val_pcc"
                    else f"val_loss {row['val_loss']:.4f}"
                )
                log.info(
                    "epoch %d/%d train_loss %.4f %s %.1fs %.1f samples/s%s",
                    epoch + 1, o.epochs, row["train_loss"], val_txt, row["seconds"], row["samples_per_s"],
                    " *best" if improved else "",
                )  # fmt: skip
            if o.patience is not None and self.since_best >= o.patience:
                log.info("early stopping: no better validation score for %d epochs", self.since_best)
                break
        return True

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx, model, o = self.cfg, self.ctx, self.model, self.cfg.optim
        t0 = time.perf_counter()
        seed = _epoch_seed(cfg.run.seed, epoch, ctx.rank)  # dropout etc.: a function of (seed, epoch, rank)
        torch.manual_seed(seed)
        if ctx.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(o.scheduler, epoch, o.epochs)
        self.ddp_model.train()
        if self.bn_mode == "frozen":
            _set_batchnorm_frozen(model)
        sums: dict[str, torch.Tensor] = {}
        n_seen = 0
        first_indices: list[list[int]] | None = None
        for step, batch in enumerate(self.train_loader):
            if step == 0:  # which spots each rank trains on first (diagnostic: ranks see different data)
                first_indices = all_gather_rows(batch["index"].view(1, -1).to(torch.int64), ctx).tolist()
            b = batch_to_device(
                batch, ctx.device, channels_last=cfg.run.channels_last, non_blocking=ctx.device.type == "cuda"
            )
            with self.autocast():
                out = self.ddp_model(b, epoch)  # through DDP: gradients are all-reduced in backward()
            terms = _scalar_terms(out)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out["loss"]).backward()
            if o.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            k = int(b["index"].shape[0])
            for key, val in terms.items():
                sums[key] = sums.get(key, 0.0) + val.double() * k
            n_seen += k
        # sample-weighted means over all processes = the 1-process epoch mean
        keys = sorted(sums)
        vec = torch.stack(
            [torch.as_tensor(sums[key]).double().cpu() for key in keys]
            + [torch.tensor(float(n_seen), dtype=torch.float64)]
        )
        total = all_reduce_sum(vec, ctx)
        terms_mean = {key: float(total[i] / total[-1]) for i, key in enumerate(keys)}
        t_train = time.perf_counter() - t0
        if not math.isfinite(terms_mean["loss"]):
            raise FloatingPointError(
                f"the training loss is {terms_mean['loss']} at epoch {epoch}: lower optim.lr, set "
                "optim.grad_clip, or check the inputs"
            )
        diff = replica_max_diff(model, ctx)
        if diff > REPLICA_TOLERANCE:
            raise RuntimeError(
                f"model replicas differ across the {self.world} processes after epoch {epoch} (max "
                f"parameter fingerprint difference {diff:.3g}): gradients are not being synchronised"
            )
        broadcast_buffers(model, ctx)  # e.g. BatchNorm running statistics: rank 0's everywhere
        row: dict[str, Any] = {"epoch": epoch, "train_loss": terms_mean.pop("loss")}
        row.update({f"train_{k}": v for k, v in terms_mean.items()})
        row.update(
            train_seconds=t_train,
            samples_per_s=len(self.sampler) * self.world / t_train if t_train > 0 else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
            replica_max_diff=diff,
            first_step_indices=first_indices,
        )
        return row

    def _validate(self) -> dict[str, Any]:
        if self.select_on == "val_pcc":
            per = [self._section_metrics(ds) for ds in self.val_ds]
            self.val_gene_r = _gene_reliability(per, self.genes, [ds.section_names[0] for ds in self.val_ds])
            return {
                "val_pcc": float(np.mean([m["pcc_m"] for m in per])),
                "val_mse": float(np.mean([m["mse"] for m in per])),
                "val_mae": float(np.mean([m["mae"] for m in per])),
            }
        losses = [loss_gathered(self.model, ds, self.cfg, self.ctx, self.autocast) for ds in self.val_ds]
        return {f"val_{k}": float(np.mean([x[k] for x in losses])) for k in losses[0]}

    def _section_metrics(self, ds: SpotDataset) -> dict[str, Any]:
        pred, target = predict_gathered(self.model, ds, self.cfg, self.ctx, self.autocast)
        return section_metrics(pred, target, self.genes)

    def _save(self, epoch: int, improved: bool) -> None:
        state = {
            "optimizer": self.optimizer,
            "epoch": epoch,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "select_on": self.select_on,
            "epochs_since_best": self.since_best,
            "history": [_json_safe(h) for h in self.history],
            "train_config": self.resolved_dict,
            "scaler": self.scaler.state_dict() if self.use_scaler else None,
            "input_stats": self.ictx.stats,
            "world_size": self.world,
        }
        if getattr(self, "val_gene_r", None) is not None:  # this epoch's per-gene validation r
            state["gene_reliability"] = self.val_gene_r
        kw = {"genes": self.genes, "normalization": NORMALIZATION, **state}
        save_checkpoint(self.out_dir / "last.pt", self.model, **kw)
        if improved:
            save_checkpoint(self.out_dir / "best.pt", self.model, **kw)
        _write_json(self.out_dir / "history.json", self.history)

    def _fit_postprocess(self) -> dict[str, Any] | None:
        """``run.spot_smoothing``: choose the test-time spot smoothing of best.pt on the validation
        sections and store it in best.pt with each gene's validation r of the smoothed values
        (:func:`training.postprocess.fit_smoothing_and_reliability`), so prediction from a slide (and
        an installed model) applies what the benchmark scores and shows the r of what it shows."""
        cfg = self.cfg
        if not cfg.run.spot_smoothing or self.select_on != "val_pcc" or not self.val_ds:
            return None
        if cfg.data.dataset != "her2st":
            log.info("spot smoothing is chosen on her2st sections only; %r: not chosen", cfg.data.dataset)
            return None
        from .postprocess import fit_smoothing_and_reliability

        sections = [ds.section_names[0] for ds in self.val_ds]
        return fit_smoothing_and_reliability(self.out_dir / "best.pt", sections, data_dir=cfg.data.data_dir)

    def _install(self, metrics: dict[str, Any]) -> None:
        """``run.install_as``: best.pt into the user's model folder, with its validation scores."""
        from napari_rapacl.jobs import install_model

        d = self.cfg.data
        validation = {k: v for k, v in (metrics.get("val_mean") or {}).items() if k in ("pcc_m", "pcc_s")}
        validation["select_on"] = self.select_on
        path = install_model(
            self.out_dir / "best.pt",
            self.cfg.run.install_as,
            description=f"{self.cfg.model.name} trained by training.run ({self.out_dir})",
            training={"dataset": d.dataset, "train": d.train, "val": d.val, "test": d.test, "genes": d.genes},
            validation=validation,
        )
        log.info("installed as %r: %s", self.cfg.run.install_as, path)

    # ---- the selected checkpoint, on validation and (once) on test ---------------------------
    def _final_evaluation(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        barrier(ctx)  # rank 0 has written best.pt
        best_path = self.out_dir / "best.pt"
        if not best_path.is_file():
            raise RuntimeError(f"no best.pt in {self.out_dir}: no epoch gave a finite validation score")
        payload = read_checkpoint(best_path, map_location=str(ctx.device))
        self.model.load_state_dict(payload["state_dict"])
        metrics: dict[str, Any] = {
            "model": cfg.model.name,
            "stage": cfg.model.stage,
            "select_on": self.select_on,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "epochs_run": len(self.history),
            "stopped_early": len(self.history) < cfg.optim.epochs,
            "checkpoint": str(best_path),
            "genes": len(self.genes),
            "normalization": NORMALIZATION,
            "world_size": self.world,
            "global_batch": cfg.optim.batch_size,
            "device": str(ctx.device),
        }
        for split, datasets in (("val", self.val_ds), ("test", self.test_ds)):
            metrics[split] = {}
            for ds in datasets:
                if self.select_on == "val_pcc":
                    metrics[split][ds.section_names[0]] = self._section_metrics(ds)
                else:
                    metrics[split][ds.section_names[0]] = loss_gathered(
                        self.model, ds, cfg, ctx, self.autocast
                    )
            if datasets:
                per = list(metrics[split].values())
                scalar = [k for k, v in per[0].items() if isinstance(v, float)]
                metrics[f"{split}_mean"] = {k: float(np.mean([m[k] for m in per])) for k in scalar}
        if "test_mean" in metrics:
            shown = ("pcc_m", "pcc_s", "pcc_f", "mse", "mae", "loss")
            log.info(
                "test %s with best.pt (epoch %d, by %s): %s",
                list(metrics["test"]),
                self.best_epoch + 1,
                self.select_on,
                " ".join(f"{k} {v:.4f}" for k, v in metrics["test_mean"].items() if k in shown),
            )
        return metrics


# ------------------------------------------------------------------------------------------------
# test-time predictions of a saved checkpoint
# ------------------------------------------------------------------------------------------------
def predict_checkpoint(
    checkpoint: str | Path, sections: list[str], *, device: str = "cpu", data_dir: str | None = None
) -> dict[str, dict[str, Any]]:
    """The training module's own test-time predictions of a checkpoint on her2st ``sections``.

    The checkpoint's training config says how its inputs are made (patches, gene list, radiomics
    tables and the z-scoring saved with it); the spots are those the trainer evaluates
    (``data.max_spots`` applies). Returns ``{section: {"barcodes", "x", "y", "pred", "target"}}``
    (``pred``/``target`` float32 ``(n_spots, n_genes)``), computed exactly as validation and test
    are during training (:func:`predict_gathered`, one process).
    """
    from napari_rapacl.models.checkpoint import load_model

    from .config import config_from_dict
    from .data import load_her2st_section, load_section

    payload = read_checkpoint(checkpoint)
    if "train_config" not in payload:
        raise RapaclInputError(f"{checkpoint}: holds no training config (not written by training.run)")
    cfg = config_from_dict(dict(payload["train_config"]), f"{checkpoint}:train_config")
    data = replace(cfg.data, data_dir=data_dir) if data_dir is not None else cfg.data
    cfg = replace(cfg, data=data)
    model, _ = load_model(checkpoint, map_location=device)
    ctx = DistContext(device=torch.device(device))
    model.to(ctx.device)
    genes = [str(g) for g in payload["genes"]]
    ictx = InputContext(data, model.config, genes, [], stats=dict(payload.get("input_stats") or {}))
    keys = list(dict.fromkeys([*model.predict_inputs, "target"]))
    autocast = lambda: torch.autocast(  # noqa: E731  (the trainer's own autocast settings)
        device_type=ctx.device.type,
        dtype=torch.bfloat16 if cfg.run.amp_dtype == "bfloat16" else torch.float16,
        enabled=cfg.run.amp,
    )
    out: dict[str, dict[str, Any]] = {}
    for name in sections:
        section = load_section(
            load_her2st_section(name, data), genes, data, size=model.config.patch_size, mpp=model.config.mpp
        )
        pred, target = predict_gathered(model, SpotDataset([section], keys, ictx), cfg, ctx, autocast)
        out[name] = {
            "barcodes": [str(b) for b in section.barcodes],
            "x": section.x,
            "y": section.y,
            "pred": pred,
            "target": target,
        }
    return out


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def resolve_cli_config(config: str | None, overrides: list[str]) -> TrainConfig:
    """The config of a command line: the YAML file, or a checkpoint's config when only resuming."""
    if config is not None:
        return load_config(config, overrides)
    values = apply_overrides({}, overrides)
    resume = (values.get("run") or {}).get("resume")
    if not resume:
        raise RapaclInputError("--config is required (or run.resume=path/to/last.pt to continue a run)")
    payload = read_checkpoint(resume)
    if "train_config" not in payload:
        raise RapaclInputError(f"{resume} holds no training config; pass --config")
    base = dict(payload["train_config"])
    # settings of the interrupted invocation, not of the run
    base["run"] = {**base.get("run", {}), "stop_after": None, "overwrite": False}
    return config_from_dict(apply_overrides(base, overrides), f"{resume}:train_config").validate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train a registered model on her2st sections (single process or torchrun/DDP).",
        epilog="Overrides: dotted keys of the YAML config, e.g. optim.lr=3e-4 data.train=[C3,C4] "
        "model.config.dropout=0 run.out_dir=outputs/runs/x",
    )
    parser.add_argument("--config", help="training config YAML (training/configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_cli_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        train(cfg)
    except (RapaclInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
