"""torch.distributed plumbing: process group from the torchrun environment, the DDP wrapper, gathers.

* :func:`init_distributed` reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun) and
  starts a process group: ``nccl`` when the process uses a CUDA device, ``gloo`` on the CPU. Without
  those variables it returns a single-process context and starts nothing.
* :class:`LossModule` makes the model's ``compute_loss(batch, epoch)`` the ``forward`` of a module,
  so DistributedDataParallel's forward IS the loss computation: every training forward runs through
  the DDP wrapper and its gradient hooks (the reference called the unwrapped model, so DDP never
  synchronised anything).
* :func:`all_gather_rows` gathers rank-local rows of different lengths (padding to the longest);
  validation gathers predictions together with dataset indices, so the samples
  ``DistributedSampler`` repeats to even out the shards are dropped before any metric.
* :func:`replica_max_diff` compares a fingerprint of every process's parameters: after each epoch
  the trainer checks that all replicas are identical (they must be when gradients are synchronised).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from napari_rapacl._errors import RapaclInputError

__all__ = [
    "DistContext",
    "LossModule",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "init_distributed",
    "param_fingerprint",
    "replica_max_diff",
    "resolve_device",
    "wrap_for_training",
]


@dataclass
class DistContext:
    """Where this process stands.

    Attributes
    ----------
    rank, world_size, local_rank
        From torchrun (0, 1, 0 for a single process).
    device
        The device this process computes on.
    enabled
        Whether a process group was started (i.e. running under torchrun).
    backend
        ``"nccl"``, ``"gloo"`` or ``None``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Device of tensors passed to collectives (CUDA for nccl, CPU for gloo)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def resolve_device(pref: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under torchrun CUDA means ``cuda:LOCAL_RANK``."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RapaclInputError(f"run.device={pref!r} but CUDA is not available on this machine")
    if pref == "cuda":
        index = local_rank if distributed else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device(pref)


def init_distributed(device_pref: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Start the process group when launched by torchrun; a single-process context otherwise."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DistContext(device=resolve_device(device_pref))
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_RANK", rank))
    device = resolve_device(device_pref, local, distributed=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistContext(rank, world, local, device, True, backend)


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group started by :func:`init_distributed`."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


class LossModule(nn.Module):
    """``forward(batch, epoch) = model.compute_loss(batch, epoch)``: the module DDP wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        return self.model.compute_loss(batch, epoch)


def wrap_for_training(
    model: nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False
) -> nn.Module:
    """``LossModule(model)``, wrapped in DistributedDataParallel under torchrun.

    DDP broadcasts rank 0's parameters and buffers when it is built, so all replicas start equal.
    """
    wrapper = LossModule(model)
    if not ctx.enabled:
        return wrapper
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(
        wrapper, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over processes (returned on the CPU, float64)."""
    t = values.detach().to(ctx.comm_device, torch.float64).clone()
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_gather_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every process's rows (rank order); ranks may hold different numbers of rows."""
    x = x.detach()
    if not ctx.enabled:
        return x.cpu()
    local = x.to(ctx.comm_device).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=ctx.comm_device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if local.shape[0] < longest:
        pad = torch.zeros(
            (longest - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device
        )
        local = torch.cat([local, pad])
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(out, local)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]).cpu()


def broadcast_buffers(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every process."""
    if not ctx.enabled:
        return
    for buf in module.buffers():
        tmp = buf.data.to(ctx.comm_device)
        dist.broadcast(tmp, src)
        buf.data.copy_(tmp)


def param_fingerprint(model: nn.Module) -> torch.Tensor:
    """Per parameter, the float64 sum and sum of absolute values (a cheap identity check)."""
    parts = []
    for p in model.parameters():
        d = p.detach().double()
        parts.append(torch.stack([d.sum(), d.abs().sum()]))
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def replica_max_diff(model: nn.Module, ctx: DistContext) -> float:
    """Largest difference between any process's parameter fingerprint and rank 0's (0 if single)."""
    if not ctx.enabled:
        return 0.0
    fp = param_fingerprint(model).unsqueeze(0)
    allfp = all_gather_rows(fp, ctx)
    return float((allfp - allfp[:1]).abs().max().item()) if allfp.numel() else 0.0
