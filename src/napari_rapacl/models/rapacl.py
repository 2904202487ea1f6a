"""RaPaCL-ST: pathomics encoder + radiomics tabular transformer, trained in two stages.

Spec: ``methods.md`` section 1. Our own re-implementation, with the reference's bugs fixed:

* The image is ImageNet-normalised inside the model (the reference fed raw [0, 1] pixels).
* Column embeddings are one learned vector per radiomics column (no WordPiece tokenizer, no
  download); the column order is the config's, optionally named in ``radiomics_features``.
* The contrastive token is the **last** token of the sequence (the reference's baseline read index 1,
  the first feature token).
* The default contrastive loss is a correct symmetric InfoNCE between the image embedding and the
  contrastive token's projection (the token used downstream), so that token gets a contrastive
  gradient. The reference's multi-positive NT-Xent is an option (``mmcl="multipos"``), computed in
  row chunks with recomputation so its ``N x N`` similarity matrix is never held in memory at once.

Stages
------
**Stage 1** (``stage=1``): epochs ``< warmup_epochs`` train the radiomics reconstruction only
(``recon_weight * MSE``); later epochs add ``w(e) * L_mmcl + cls_weight * CE`` with the cosine ramp
``w(e) = mmcl_weight * (1 - cos(pi * min(1, (e - warmup + 1) / ramp))) / 2``. The image encoder is
frozen (eval, no grad) unless ``freeze_encoder_stage1=False``; the gene head is not trained.

**Stage 2** (``stage=2``): start from a Stage 1 checkpoint (:func:`init_from_stage1`); the radiomics
branch and the reconstruction/classification heads are frozen (eval mode, ``requires_grad=False``);
the image encoder (unless ``train_encoder_stage2=False``), the pathomics projection and the gene head
train with MSE on ``gene_head([z_img ; z_rad])``.

Prediction needs the image **and** the spot's radiomics (``predict_inputs``). A Stage 1 model has no
trained gene head, so :meth:`RaPaCL.predict` refuses it with a clear error.

Batch keys (see :mod:`.base`): ``image`` (B, 3, H, W) in [0, 1]; ``radiomics`` (B, F) z-scored,
finite; ``cell_label`` (B,) long in ``[0, n_classes)`` or ``-1`` (unknown: ignored by the loss);
``target`` (B, G); optional ``sample_index`` (B,) long: rows with equal index are views of one
sample (positives of each other in the multi-positive loss).
"""

from __future__ import annotations

import logging
import math
import warnings
from os import PathLike
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .._errors import RapaclInputError
from .backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from .base import gather_batch, mse_loss_dict
from .rapacl_config import ARCHITECTURE_FIELDS, RaPaCLConfig

log = logging.getLogger(__name__)

__all__ = [
    "RaPaCL",
    "RadiomicsOutput",
    "RadiomicsTransformer",
    "build",
    "init_from_stage1",
    "mmcl_ramp",
    "multipos_nt_xent",
    "symmetric_info_nce",
]


# ----------------------------------------------------------------------------------------------
# losses and schedule


def mmcl_ramp(epoch: int, warmup_epochs: int = 5, ramp_epochs: int = 20, max_weight: float = 1.0) -> float:
    """Weight of the contrastive term at ``epoch`` (0-based): 0 during the warm-up, then a cosine ramp.

    ``w(e) = max_weight * (1 - cos(pi * min(1, (e - warmup + 1) / ramp))) / 2`` for ``e >= warmup``.
    With the defaults: ``w(4) = 0``, ``w(5) ~ 0.0062``, ``w(14) = 0.5``, ``w(e >= 24) = 1``.
    """
    if epoch < warmup_epochs:
        return 0.0
    progress = min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs)
    return max_weight * 0.5 * (1.0 - math.cos(math.pi * progress))


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP loss: mean of the row-wise and column-wise cross-entropies of ``cos(a_i, b_j) / T``.

    Row ``i`` of ``a`` and row ``i`` of ``b`` are the positive pair; every other row of the other
    modality in the batch is a negative. Computed in float32 (also under autocast). Under DDP the
    batch is the global one (:func:`.base.gather_batch`): negatives come from every process.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise RapaclInputError(f"InfoNCE needs two (B, D) tensors of one shape, got {a.shape} and {b.shape}")
    a, b = gather_batch(a), gather_batch(b)
    with torch.autocast(a.device.type, enabled=False):
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        logits = a @ b.T / temperature
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _lse_without_self(rows: torch.Tensor, pool: torch.Tensor, start: int, inv_t: float) -> torch.Tensor:
    """logsumexp over ``pool`` of ``rows @ pool.T * inv_t``, leaving out each row's own column."""
    logits = rows @ pool.T * inv_t
    i = torch.arange(rows.shape[0], device=rows.device)
    logits = logits.index_put((i, i + start), torch.tensor(float("-inf"), device=rows.device))
    return torch.logsumexp(logits, dim=1)


def multipos_nt_xent(
    z_img: torch.Tensor,
    z_tokens: torch.Tensor,
    temperature: float,
    sample_index: torch.Tensor | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """SupCon-style multi-positive NT-Xent over ``{z_img} + {per-feature token projections}``.

    The pool holds, for each of the ``B`` rows, its image embedding and its ``K`` token projections
    (``N = B * (K + 1)`` unit vectors). For every anchor, the loss is
    ``logsumexp_{k != a} s_ak - mean_{p in P(a)} s_ap`` with ``s = cos / T``, where the positives
    ``P(a)`` are all *other* pool members of the same sample (same row, or same ``sample_index``).
    The result is the mean over anchors (methods.md 1.6).

    Memory: the positive term needs only per-sample sums of the pool (``O(N D)``); the
    log-sum-exp is computed ``chunk`` rows at a time and recomputed in backward, so at most a
    ``chunk x N`` block of similarities exists at once (the reference built all ``N x N``).
    Under DDP this variant stays per process (its negatives are the process's own rows), unlike
    :func:`symmetric_info_nce`, which gathers the global batch.

    Parameters
    ----------
    z_img
        (B, D) image embeddings.
    z_tokens
        (B, K, D) per-feature token projections.
    temperature
        Softmax temperature.
    sample_index
        Optional (B,) sample ids; rows with equal ids share positives (e.g. two augmented views).
    chunk
        Rows of the similarity matrix per block.
    """
    if z_tokens.ndim != 3 or z_img.ndim != 2 or z_tokens.shape[0] != z_img.shape[0]:
        raise RapaclInputError(
            f"multipos loss needs z_img (B, D) and z_tokens (B, K, D), got {tuple(z_img.shape)} and "
            f"{tuple(z_tokens.shape)}"
        )
    b, k, d = z_tokens.shape
    with torch.autocast(z_img.device.type, enabled=False):
        pool = torch.cat([z_img[:, None, :].float(), z_tokens.float()], dim=1).reshape(b * (k + 1), d)
        pool = F.normalize(pool, dim=-1)
        n = pool.shape[0]
        if sample_index is None:
            groups = torch.arange(b, device=pool.device)
        else:
            if sample_index.shape != (b,):
                raise RapaclInputError(
                    f"sample_index must have shape ({b},), got {tuple(sample_index.shape)}"
                )
            groups = torch.unique(sample_index.to(pool.device), return_inverse=True)[1]
        groups = groups.repeat_interleave(k + 1)
        n_groups = int(groups.max()) + 1
        group_sum = pool.new_zeros(n_groups, d).index_add(0, groups, pool)
        n_pos = torch.bincount(groups, minlength=n_groups)[groups] - 1
        inv_t = 1.0 / temperature
        pos_sum = ((pool * group_sum[groups]).sum(-1) - (pool * pool).sum(-1)) * inv_t
        lse = []
        for start in range(0, n, chunk):
            rows = pool[start : start + chunk]
            if torch.is_grad_enabled() and pool.requires_grad:
                lse.append(grad_checkpoint(_lse_without_self, rows, pool, start, inv_t, use_reentrant=False))
            else:
                lse.append(_lse_without_self(rows, pool, start, inv_t))
        lse = torch.cat(lse)
        valid = n_pos > 0
        return (lse[valid] - pos_sum[valid] / n_pos[valid]).mean()


# ----------------------------------------------------------------------------------------------
# modules


class MLPHead(nn.Sequential):
    """Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float):
        super().__init__(
            nn.Linear(d_in, d_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(d_hidden, d_out)
        )


class GatedTransformerLayer(nn.Module):
    """Post-norm transformer layer with a gated feed-forward block (TransTab style).

    ``x = LN(x + Dropout(MHA(x)))``; ``h = sigmoid(w . x) * Linear(d -> ffn)(x)``;
    ``x = LN(x + Dropout(Linear(ffn -> d)(Dropout(LeakyReLU(h)))))``. The gate is one scalar per token.
    """

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.drop_attn = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d)
        self.gate = nn.Linear(d, 1, bias=False)
        self.linear1 = nn.Linear(d, ffn)
        self.act = nn.LeakyReLU()
        self.drop_ffn = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn, d)
        self.drop_out = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x, x, x, need_weights=False)[0]
        x = self.norm1(x + self.drop_attn(a))
        h = torch.sigmoid(self.gate(x)) * self.linear1(x)
        h = self.linear2(self.drop_ffn(self.act(h)))
        return self.norm2(x + self.drop_out(h))


class RadiomicsOutput(NamedTuple):
    """Hidden states of the radiomics transformer."""

    cls_h: torch.Tensor  # (B, d) [CLS] hidden -> classification head
    contrast_h: torch.Tensor  # (B, d) [CONTRASTIVE] (last token) hidden
    feature_h: torch.Tensor  # (B, F, d) per-feature token hiddens
    z: torch.Tensor  # (B, D) projection of contrast_h


class RadiomicsTransformer(nn.Module):
    """Tabular transformer over ``F`` numeric columns with learned per-column embeddings.

    Token of column ``j`` with value ``v``: ``align(LN(col_emb[j]) * v + bias)``; the sequence is
    ``[CLS] + F tokens + [CONTRASTIVE]``; the contrastive token's hidden state is projected to ``D``
    by a bias-free Linear (also applied to the feature tokens for the multi-positive loss).
    """

    def __init__(
        self, n_features: int, d: int, layers: int, heads: int, ffn: int, embed_dim: int, dropout: float
    ):
        super().__init__()
        self.col_emb = nn.Parameter(torch.randn(n_features, d))
        self.col_norm = nn.LayerNorm(d)
        bound = 1.0 / math.sqrt(d)
        self.value_bias = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.align = nn.Linear(d, d, bias=False)
        self.cls_token = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.contrast_token = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.layers = nn.ModuleList([GatedTransformerLayer(d, heads, ffn, dropout) for _ in range(layers)])
        self.projection = nn.Linear(d, embed_dim, bias=False)

    def forward(self, values: torch.Tensor) -> RadiomicsOutput:
        b = values.shape[0]
        tokens = self.col_norm(self.col_emb)[None] * values[..., None] + self.value_bias
        tokens = self.align(tokens)
        d = tokens.shape[-1]
        seq = torch.cat([self.cls_token.expand(b, 1, d), tokens, self.contrast_token.expand(b, 1, d)], dim=1)
        for layer in self.layers:
            seq = layer(seq)
        contrast_h = seq[:, -1]  # the appended [CONTRASTIVE] token (the reference baseline read index 1)
        return RadiomicsOutput(seq[:, 0], contrast_h, seq[:, 1:-1], self.projection(contrast_h))


class RaPaCL(nn.Module):
    """RaPaCL-ST (see the module docstring).

    Submodules: ``encoder`` (timm, pooled), ``path_proj`` (MLP -> D), ``radiomics``
    (:class:`RadiomicsTransformer`), ``recon_head`` (D -> F), ``cls_head`` (rad_hidden -> n_classes),
    ``gene_head`` (2D -> G).
    """

    #: Stage 1 keys (the instance attribute reflects the model's stage and weights).
    required_inputs: tuple[str, ...] = ("image", "radiomics", "cell_label")
    predict_inputs: tuple[str, ...] = ("image", "radiomics")
    #: CPU inference in channels-last memory format (DenseNet-121, 49 patches on 2 cores: 2.4 s
    #: against 3.5 s contiguous and 4.0 s TorchScript-frozen)
    channels_last_inference = True

    def __init__(self, config: RaPaCLConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = create_backbone(c.backbone, c.pretrained, num_classes=0)
        self.path_proj = MLPHead(self.encoder.num_features, c.path_hidden, c.embed_dim, c.dropout)
        self.radiomics = RadiomicsTransformer(
            c.n_radiomics, c.rad_hidden, c.rad_layers, c.rad_heads, c.rad_ffn, c.embed_dim, c.dropout
        )
        self.recon_head = MLPHead(c.embed_dim, c.recon_hidden, c.n_radiomics, c.dropout)
        self.cls_head = MLPHead(c.rad_hidden, c.cls_hidden, c.n_classes, c.dropout)
        head_in = 2 * c.embed_dim + (c.n_radiomics if c.rad_skip else 0)
        self.gene_head = MLPHead(head_in, c.gene_hidden, c.n_genes, c.dropout)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        if c.stage == 1:
            keys = ["image", "radiomics"] if c.mmcl_weight > 0 else ["radiomics"]
            self.required_inputs = tuple(keys + (["cell_label"] if c.cls_weight > 0 else []))
        else:
            self.required_inputs = ("image", "radiomics", "target")
        self.stage1_source: dict[str, Any] | None = None  # set by init_from_stage1
        for name in self.frozen_modules:
            for p in getattr(self, name).parameters():
                p.requires_grad_(False)
        self.train()

    # -- stage bookkeeping ---------------------------------------------------------------------

    @property
    def stage(self) -> int:
        return self.config.stage

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """Submodules that are not trained in this stage (kept in eval mode, ``requires_grad=False``)."""
        c = self.config
        if c.stage == 1:
            return ("encoder", "gene_head") if c.freeze_encoder_stage1 else ("gene_head",)
        frozen = ("radiomics", "recon_head", "cls_head")
        return frozen if c.train_encoder_stage2 else ("encoder", *frozen)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """True when some trainable parameters get no gradient in some steps (Stage 1 warm-up)."""
        c = self.config
        return c.stage == 1 and (c.warmup_epochs > 0 or c.mmcl_weight == 0 or c.cls_weight == 0)

    def train(self, mode: bool = True) -> RaPaCL:
        """Set train/eval mode; frozen submodules always stay in eval mode (no dropout, fixed BN stats)."""
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self

    def parameter_groups(self, lr: float, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups of the trainable parameters, with per-group learning rates.

        ``path_proj`` gets ``path_proj_lr_scale * lr`` (reference 0.3), ``encoder``
        ``encoder_lr_scale * lr``; the radiomics transformer and every head get ``lr``. Frozen
        submodules are left out. Each group carries a ``name``.
        """
        c = self.config
        scales = {
            "encoder": c.encoder_lr_scale,
            "path_proj": c.path_proj_lr_scale,
            "radiomics": 1.0,
            "recon_head": 1.0,
            "cls_head": 1.0,
            "gene_head": 1.0,
        }
        groups = []
        for name, scale in scales.items():
            params = [p for p in getattr(self, name).parameters() if p.requires_grad]
            if not params:
                continue
            group: dict[str, Any] = {"name": name, "params": params, "lr": lr * scale}
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            groups.append(group)
        n_grouped = sum(len(g["params"]) for g in groups)
        n_trainable = sum(1 for p in self.parameters() if p.requires_grad)
        assert n_grouped == n_trainable, "a trainable parameter is missing from the groups"
        return groups

    def param_groups(self, lr: float, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Alias of :meth:`parameter_groups` (the trainer's hook name)."""
        return self.parameter_groups(lr, weight_decay)

    def set_target_mean(self, mean: torch.Tensor) -> None:
        """Start the gene head at the training mean: the bias of its last Linear = ``mean`` (G,)."""
        last = self.gene_head[-1]
        mean = torch.as_tensor(mean, dtype=last.bias.dtype, device=last.bias.device)
        if mean.shape != last.bias.shape:
            raise RapaclInputError(
                f"target mean must have shape {tuple(last.bias.shape)}, got {tuple(mean.shape)}"
            )
        with torch.no_grad():
            last.bias.copy_(mean)

    def init_from_stage1(
        self, path: str | PathLike | None = None, map_location: str = "cpu"
    ) -> dict[str, Any]:
        """Load a Stage 1 checkpoint into this Stage 2 model (see :func:`init_from_stage1`)."""
        return init_from_stage1(self, path, map_location=map_location)

    # -- encoders ------------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> z_img (B, D). No gradient reaches a frozen encoder."""
        x = (image - self.mean) / self.std
        if "encoder" in self.frozen_modules:
            with torch.no_grad():
                features = self.encoder(x)
        else:
            features = self.encoder(x)
        return self.path_proj(features)

    def encode_radiomics(self, radiomics: torch.Tensor) -> RadiomicsOutput:
        """(B, F) z-scored radiomics -> :class:`RadiomicsOutput` (no gradient in Stage 2)."""
        if "radiomics" in self.frozen_modules:
            with torch.no_grad():
                return self.radiomics(radiomics)
        return self.radiomics(radiomics)

    def forward(self, image: torch.Tensor, radiomics: torch.Tensor) -> torch.Tensor:
        """Gene head output ``gene_head([z_img ; z_rad])`` (B, G), whatever the stage.

        Use :meth:`predict` for predictions: it validates the inputs and refuses a Stage 1 model.
        """
        radiomics = self._ablate(radiomics)
        z_img = self.encode_image(image)
        z_rad = self.encode_radiomics(radiomics).z
        parts = [z_img, z_rad, radiomics] if self.config.rad_skip else [z_img, z_rad]
        return self.gene_head(torch.cat(parts, dim=1))

    def _ablate(self, radiomics: torch.Tensor) -> torch.Tensor:
        """The radiomics ablation of the config: rows permuted within the batch, or zeros."""
        mode = self.config.radiomics_ablation
        if mode == "zero":
            return torch.zeros_like(radiomics)
        if mode == "shuffle" and radiomics.shape[0] > 1:
            # a fixed derangement-like permutation (a cyclic shift): no spot keeps its own row, and
            # predictions stay deterministic for a given batch
            return torch.roll(radiomics, shifts=max(1, radiomics.shape[0] // 2), dims=0)
        return radiomics

    # -- contract ------------------------------------------------------------------------------

    def _get(self, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise RapaclInputError(
                f"RaPaCL (stage {self.stage}) needs batch[{key!r}]; got keys {sorted(batch)}"
            )
        return batch[key]

    def _radiomics(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        r = self._get(batch, "radiomics")
        f = self.config.n_radiomics
        if r.ndim != 2 or r.shape[1] != f:
            raise RapaclInputError(
                f"radiomics must have shape (B, {f}) (n_radiomics={f}), got {tuple(r.shape)}"
            )
        finite = torch.isfinite(r)
        if not bool(finite.all()):
            raise RapaclInputError(
                f"radiomics contain {int((~finite).sum())} non-finite values; z-score them and fill "
                "missing values (e.g. with 0, the training mean) first"
            )
        return r.float()

    def _image(self, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        image = self._get(batch, "image")
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] != n:
            raise RapaclInputError(
                f"image must have shape ({n}, 3, H, W) to match the radiomics batch, got {tuple(image.shape)}"
            )
        return image

    def compute_loss(self, batch: dict[str, torch.Tensor], epoch: int = 0) -> dict[str, torch.Tensor]:
        """Training losses for this stage; ``"loss"`` is back-propagated, the rest are for logging.

        Stage 1 logs ``recon`` always and, after the warm-up, ``mmcl``, ``cls``, ``cls_acc`` and
        ``mmcl_weight`` (during the warm-up they are not computed). Stage 2 logs ``mse``.
        """
        return self._stage1_loss(batch, epoch) if self.stage == 1 else self._stage2_loss(batch)

    def _stage1_loss(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        c = self.config
        radiomics = self._radiomics(batch)
        rad = self.encode_radiomics(radiomics)
        recon = F.mse_loss(self.recon_head(rad.z), radiomics)
        loss = c.recon_weight * recon
        out: dict[str, torch.Tensor] = {"recon": recon.detach()}
        if epoch < c.warmup_epochs:
            out["loss"] = loss
            return out
        w = mmcl_ramp(epoch, c.warmup_epochs, c.ramp_epochs, c.mmcl_weight)
        out["mmcl_weight"] = torch.tensor(w, device=radiomics.device)
        if w > 0:
            z_img = self.encode_image(self._image(batch, radiomics.shape[0]))
            if c.mmcl == "infonce":
                mmcl = symmetric_info_nce(z_img, rad.z, c.temperature)
            else:
                z_tokens = self.radiomics.projection(rad.feature_h)
                mmcl = multipos_nt_xent(
                    z_img, z_tokens, c.temperature, batch.get("sample_index"), c.multipos_chunk
                )
            loss = loss + w * mmcl
            out["mmcl"] = mmcl.detach()
        if c.cls_weight > 0:
            labels = self._get(batch, "cell_label").long().to(radiomics.device)
            if labels.shape != (radiomics.shape[0],):
                raise RapaclInputError(
                    f"cell_label must have shape ({radiomics.shape[0]},), got {tuple(labels.shape)}"
                )
            bad = (labels < -1) | (labels >= c.n_classes)
            if bool(bad.any()):
                raise RapaclInputError(
                    f"cell_label values must be in [0, {c.n_classes}) or -1 (unknown), got "
                    f"{sorted(set(labels[bad].tolist()))}"
                )
            logits = self.cls_head(rad.cls_h)
            known = labels >= 0
            if bool(known.any()):
                cls = F.cross_entropy(logits, labels, ignore_index=-1)
                out["cls_acc"] = (logits.argmax(1)[known] == labels[known]).float().mean().detach()
            else:  # no labelled spot in this batch: a zero that keeps the graph connected
                cls = logits.sum() * 0.0
            loss = loss + c.cls_weight * cls
            out["cls"] = cls.detach()
        out["loss"] = loss
        return out

    def _stage2_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        radiomics = self._radiomics(batch)
        image = self._image(batch, radiomics.shape[0])
        target = self._get(batch, "target")
        pred = self(image, radiomics)
        if target.shape != pred.shape:
            raise RapaclInputError(f"target must have shape {tuple(pred.shape)}, got {tuple(target.shape)}")
        out = mse_loss_dict(pred, target.float())
        if self.config.pcc_weight > 0:
            from .pixnet import pcc_loss

            one_minus_r, _ = pcc_loss(pred, target)
            out["pcc"] = (1.0 - one_minus_r).detach()
            out["loss"] = out["loss"] + self.config.pcc_weight * one_minus_r
        return out

    def check_can_predict(self) -> None:
        """Raise :class:`RapaclInputError` for a Stage 1 model: its gene head was never trained."""
        if self.stage != 2:
            raise RapaclInputError(
                "this RaPaCL-ST model is a Stage 1 model (contrastive pre-alignment of image and "
                "radiomics): its gene head was never trained, so it cannot predict expression. Train "
                "Stage 2 from it (python -m training.run --config training/configs/rapacl_stage2_her2st.yaml "
                "model.init_checkpoint=<this checkpoint>) and load the Stage 2 best.pt"
            )

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, G) predicted expression from ``image`` and ``radiomics`` (call in eval mode).

        Raises
        ------
        RapaclInputError
            For a Stage 1 model: its gene head has never been trained.
        """
        self.check_can_predict()
        radiomics = self._radiomics(batch)
        return self(self._image(batch, radiomics.shape[0]), radiomics)


# ----------------------------------------------------------------------------------------------
# Stage 1 -> Stage 2


def init_from_stage1(
    model: RaPaCL, path: str | PathLike | None = None, *, map_location: str = "cpu"
) -> dict[str, Any]:
    """Initialise a Stage 2 RaPaCL model from a Stage 1 checkpoint, strictly.

    The checkpoint is read with ``torch.load(weights_only=True)``. It must hold a RaPaCL model
    trained with ``stage=1`` whose architecture fields (``backbone``, ``embed_dim``,
    ``n_radiomics``, widths, ...) equal the model's; every tensor is then loaded with
    ``strict=True``. One exception: if only ``n_genes`` (or ``rad_skip``) differs, the (never
    trained) Stage 1 gene head is skipped and keeps its fresh initialisation; every other key is
    still required.

    Parameters
    ----------
    model
        A RaPaCL model built with ``stage=2``.
    path
        The Stage 1 checkpoint (default: ``model.config.init_checkpoint``).
    map_location
        Passed to ``torch.load``.

    Returns
    -------
    dict
        ``path``, ``model``, ``epoch`` (if recorded) and ``skipped`` keys; also stored as
        ``model.stage1_source``.
    """
    from .checkpoint import read_checkpoint
    from .registry import get_entry

    if not isinstance(model, RaPaCL):
        raise RapaclInputError(f"init_from_stage1 needs a RaPaCL model, got {type(model).__name__}")
    cfg = model.config
    if cfg.stage != 2:
        raise RapaclInputError(
            f"init_from_stage1 initialises a stage 2 model, but this model has stage={cfg.stage}"
        )
    path = path if path is not None else cfg.init_checkpoint
    if path is None:
        raise RapaclInputError("no Stage 1 checkpoint given (pass a path or set config.init_checkpoint)")
    payload = read_checkpoint(path, map_location)
    name = payload["model"]
    try:
        entry = get_entry(name)
    except RapaclInputError:
        raise RapaclInputError(
            f"{path}: holds model {name!r}, which is not a registered RaPaCL model"
        ) from None
    if entry.config_cls is not RaPaCLConfig:
        raise RapaclInputError(
            f"{path}: holds model {name!r}, not a RaPaCL model; cannot start Stage 2 from it"
        )
    src = RaPaCLConfig.from_dict(payload["config"], source=str(path))
    if src.stage != 1:
        raise RapaclInputError(
            f"{path}: is a stage {src.stage} checkpoint; Stage 2 starts from a Stage 1 checkpoint "
            "(to continue a Stage 2 run, resume it instead)"
        )
    diffs = [
        f"{f}={getattr(src, f)!r} (checkpoint) != {getattr(cfg, f)!r} (model)"
        for f in ARCHITECTURE_FIELDS
        if getattr(src, f) != getattr(cfg, f)
    ]
    if src.radiomics_features and cfg.radiomics_features and src.radiomics_features != cfg.radiomics_features:
        diffs.append("radiomics_features: the checkpoint's column names/order differ from the model's")
    if diffs:
        raise RapaclInputError(
            f"{path}: Stage 1 checkpoint does not fit this Stage 2 model: " + "; ".join(diffs)
        )
    for f in ("patch_size", "mpp"):
        if getattr(src, f) != getattr(cfg, f):
            warnings.warn(
                f"{path}: Stage 1 used {f}={getattr(src, f)}, Stage 2 uses {getattr(cfg, f)}", stacklevel=2
            )
    state = dict(payload["state_dict"])
    skipped: list[str] = []
    own_state = model.state_dict()
    heads = [(k, v) for k, v in state.items() if k.startswith("gene_head.")]
    head_fits = all(k in own_state and own_state[k].shape == v.shape for k, v in heads)
    if src.n_genes != cfg.n_genes or not head_fits:
        skipped = sorted(k for k in state if k.startswith("gene_head."))
        for k in skipped:
            del state[k]
        log.info(
            "%s: n_genes %d -> %d, rad_skip %s -> %s: the untrained Stage 1 gene head is not loaded",
            path,
            src.n_genes,
            cfg.n_genes,
            src.rad_skip,
            cfg.rad_skip,
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - {k for k in own if skipped and k.startswith("gene_head.")})
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RapaclInputError(
            f"{path}: state dict does not match the model ({len(missing)} missing keys, e.g. "
            f"{missing[:5]}; {len(unexpected)} unexpected keys, e.g. {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=not skipped)
    except RuntimeError as exc:  # shape mismatches
        raise RapaclInputError(f"{path}: cannot load the Stage 1 weights: {exc}") from exc
    model.train(model.training)  # re-assert eval mode of the frozen branch
    info = {"path": str(path), "model": name, "epoch": payload.get("epoch"), "skipped": skipped}
    model.stage1_source = info
    return info


def build(config: RaPaCLConfig) -> RaPaCL:
    return RaPaCL(config)
