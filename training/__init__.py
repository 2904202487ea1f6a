"""Training of the registered models: ``python -m training.run`` or ``torchrun -m training.run``.

Modules: :mod:`training.config` (typed config, YAML + ``key=value`` overrides; torch-free),
:mod:`training.data` (her2st sections, cached patches, the registry of per-spot input builders),
:mod:`training.distributed` (process group, DDP wrapper, gathers) and :mod:`training.run` (the trainer
and its command line). Example configs are in ``training/configs/``.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def train(cfg: TrainConfig) -> Any:
    """Run a training (see :func:`training.run.train`); imports torch."""
    from .run import train as _train

    return _train(cfg)
