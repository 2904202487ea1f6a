"""Config of the ensemble model (torch-free, so the registry can import it without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._errors import RapaclInputError
from .config import ModelConfig

BUILD_HINT = (
    "an ensemble is built from finished checkpoints: python -m training.ensemble --members "
    "RUN1/best.pt RUN2/best.pt ... --out DIR, then load DIR/best.pt"
)


@dataclass
class EnsembleConfig(ModelConfig):
    """Config of :class:`~napari_rapacl.models.ensemble.Ensemble`: the mean of several trained models.

    Attributes
    ----------
    members
        One ``{"model": registry name, "config": that model's config as a dict}`` per member, in
        order (their weights live in the ensemble's state dict under ``members.<i>.``).
    gene_index
        For every member, the column of each of the ensemble's ``n_genes`` genes in that member's
        output (the ensemble predicts the genes all members predict).
    weights
        Weight of each member in the mean (normalised to sum 1); None = equal weights.
    patch_size, mpp
        The input patch all members read (members must agree: one patch per spot feeds them all).
    """

    members: list[dict[str, Any]] = field(default_factory=list)
    gene_index: list[list[int]] = field(default_factory=list)
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.members:
            raise RapaclInputError(f"an ensemble needs at least one member model; {BUILD_HINT}")
        from .registry import get_entry

        for i, spec in enumerate(self.members):
            if not isinstance(spec, dict) or set(spec) != {"model", "config"}:
                raise RapaclInputError(
                    f"ensemble member {i} must be {{'model': name, 'config': {{...}}}}, got {spec!r:.200}"
                )
            if spec["model"] == "ensemble":
                raise RapaclInputError(f"ensemble member {i} is itself an ensemble; list its members instead")
            cfg = get_entry(spec["model"]).config_cls.from_dict(
                dict(spec["config"]), source=f"ensemble member {i} ({spec['model']})"
            )
            if cfg.patch_size != self.patch_size or cfg.mpp != self.mpp:
                raise RapaclInputError(
                    f"ensemble member {i} ({spec['model']}) reads {cfg.patch_size} px patches at {cfg.mpp} "
                    f"um/px, the ensemble {self.patch_size} px at {self.mpp} um/px: members must read the "
                    "same patches"
                )
        if len(self.gene_index) != len(self.members):
            raise RapaclInputError(
                f"gene_index lists {len(self.gene_index)} members, the ensemble has {len(self.members)}"
            )
        for i, idx in enumerate(self.gene_index):
            n_member = int(self.members[i]["config"].get("n_genes", -1))
            if len(idx) != self.n_genes or any(not 0 <= int(j) < n_member for j in idx):
                raise RapaclInputError(
                    f"gene_index of member {i} must hold {self.n_genes} columns in [0, {n_member})"
                )
            self.gene_index[i] = [int(j) for j in idx]
        if self.weights is not None:
            w = [float(v) for v in self.weights]
            if len(w) != len(self.members) or any(v < 0 for v in w) or sum(w) <= 0:
                raise RapaclInputError(
                    f"weights must be {len(self.members)} numbers >= 0 with a positive sum, "
                    f"got {self.weights!r}"
                )
            self.weights = w
