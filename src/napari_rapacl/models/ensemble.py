"""An ensemble of trained models saved as one checkpoint: the (weighted) mean of their predictions.

Built from finished runs by ``python -m training.ensemble`` (which also stores the members' input
statistics, the radiomics recipe when a member needs radiomics, and the spot smoothing and per-gene
validation r of the ENSEMBLE chosen on the inner validation section). It loads and predicts like any
model (``load_model``, ``jobs.iter_predict``): its ``predict_inputs`` are the union of the members'
(e.g. ``image`` + ``radius_px`` for PixNet + ``radiomics`` for RaPaCL-ST), all members read the same
patch (``patch_size`` / ``mpp``), and each member's output is restricted to the ensemble's genes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._errors import RapaclInputError
from .ensemble_config import BUILD_HINT, EnsembleConfig


def member_config(spec: dict):
    """The typed config of one member, with ``pretrained`` cleared (weights come from the ensemble)."""
    from .registry import get_entry

    entry = get_entry(spec["model"])
    cfg = entry.config_cls.from_dict(dict(spec["config"]), source=f"member {spec['model']}")
    if getattr(cfg, "pretrained", None) is not None:
        cfg = dataclasses.replace(cfg, pretrained=None)
    return cfg


class Ensemble(nn.Module):
    """Mean of the members' predictions over the ensemble's genes (see the module docstring)."""

    def __init__(self, config: EnsembleConfig):
        super().__init__()
        from .registry import create_model

        self.config = config
        self.members = nn.ModuleList(
            [create_model(spec["model"], config=member_config(spec)) for spec in config.members]
        )
        inputs: list[str] = []
        for m in self.members:
            inputs += list(getattr(m, "predict_inputs", ("image",)))
        self.predict_inputs = tuple(dict.fromkeys(inputs))
        self.required_inputs = (*self.predict_inputs, "target")
        w = torch.tensor(config.weights or [1.0] * len(self.members), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)
        for i, idx in enumerate(config.gene_index):
            self.register_buffer(f"gene_index_{i}", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.eval()

    def check_can_predict(self) -> None:
        for m in self.members:
            check = getattr(m, "check_can_predict", None)
            if callable(check):
                check()

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, G) weighted mean of the members' predictions of the ensemble's genes (eval mode)."""
        out = None
        for i, m in enumerate(self.members):
            if float(self.weights[i]) == 0.0:
                continue
            p = m.predict(batch).float().index_select(1, getattr(self, f"gene_index_{i}"))
            out = p * self.weights[i] if out is None else out + p * self.weights[i]
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.predict(batch)

    def compute_loss(self, batch: dict[str, torch.Tensor], epoch: int = 0) -> dict[str, torch.Tensor]:
        raise RapaclInputError(f"an ensemble is not trained itself (its members are); {BUILD_HINT}")


def build(config: EnsembleConfig) -> Ensemble:
    return Ensemble(config)
