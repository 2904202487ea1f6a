"""PixNet: a dense per-pixel gene map, aggregated over each spot's disc.

Spec: ``methods.md`` section 4 (paper only, no reference code); the unspecified parts follow the
proposals of section 4.2.

Architecture
------------
* **Encoder**: a timm backbone with ``features_only=True`` and ``out_indices`` (default layer1..4 of
  a ResNet18, strides 4..32); channels and strides come from ``feature_info`` (nothing hard-coded).
* **U-Net decoder** of width ``hidden``: every pyramid level is projected to ``hidden`` by a 1 x 1
  convolution; ``D_0 = proj(F_L)`` and, for each shallower level ``l``,
  ``D = FFN(Up(D) + delta_l * proj(F_l))`` with ``Up`` a ``ConvTranspose2d`` (kernel = stride = the
  stride ratio of the two levels, 2 for ResNets), ``delta_l`` a learnable scalar (init 1) and ``FFN``
  a pre-norm convolutional feed-forward block with a residual:
  ``x + 1x1(dw3x3(GELU(1x1(LN(x)))))`` (``ffn_kernel=3``; ``ffn_kernel=1`` drops the depthwise conv).
* **Head**: a per-pixel ``1 x 1`` convolution to ``G + 1`` channels at the stride of the first level
  (4), ``softplus``: a non-negative **count density** per um^2 of each of the ``G`` genes plus one
  channel for **all other genes** (the rest of the transcriptome), bilinearly up-sampled to the
  input size.

Aggregation (methods.md 4.5: sum of a map vs log-normalised targets)
----------------------------------------------------------------------
We aggregate in **count space** and normalise afterwards, exactly like the targets:

1. expected counts of the spot: ``c_j = sum over the disc of rho_j(p) * mpp^2`` for the ``G + 1``
   channels (``rho`` the up-sampled density, ``mpp^2`` the pixel area in um^2);
2. library size ``L = sum_j c_j`` (panel genes + the rest channel: the targets' library is over ALL
   genes, not only the panel);
3. prediction ``y_g = ln(1 + 1e4 * c_g / L)``, the same log1p(CP10k) as the targets
   (:func:`~napari_rapacl.preprocess.normalize_log1p_cp10k`).

Consistency across spot sizes: for uniform tissue ``rho`` is constant, ``c_j`` grows with the disc
area for every channel alike, and the ratio ``c_g / L`` (hence the prediction) is the same for a
55 um and a 100 um spot. For mixed tissue a larger disc gives the count-weighted mixture of the
compositions it covers, as a real spot does (pixels with more RNA weigh more). A plain sum of a
log-space map would instead grow with ``pi r^2``. Because the targets are library-normalised, only
the ratios are supervised: the map's absolute scale (total RNA per um^2) is learned up to one global
constant, so treat ``predict_map(kind="density")`` as relative density.

The disc of radius ``r`` (batch key ``radius_px``, in patch pixels) is centred on the patch centre;
pixel weights are the anti-aliased coverage ``clip(r + 0.5 - d, 0, 1)`` (``d`` = distance of the
pixel centre), so predictions change smoothly with ``r``; radii below 0.5 px are refused (no pixel
would be covered). Radii above the patch's half side are refused unless ``clip_radius=True`` (then
the disc is clipped to the patch). The sum over the full-resolution disc is computed exactly at
stride 4: bilinear up-sampling is linear and separable, ``up(rho) = A_y rho A_x^T``, so
``sum(D * up(rho)) = sum((A_y^T D A_x) * rho)``; the stride-4 weights are cached per radius. No
``G x H x W`` map is materialised at training time.

Loss: ``MSE(y, target) + pcc_weight * (1 - PCC)``, PCC per gene across the batch's spots, averaged
over the genes whose target varies in the batch (:func:`pcc_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import RapaclInputError
from .backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from .base import gather_batch
from .pixnet_config import PixNetConfig

__all__ = [
    "ConvFFN",
    "DecoderStage",
    "PixNet",
    "build",
    "counts_to_log1p_cp10k",
    "disc_weights",
    "pcc_loss",
    "upsample_matrix",
]

CP_SCALE = 1e4
MIN_RADIUS_PX = 0.5


# ----------------------------------------------------------------------------------------------
# aggregation helpers


def disc_weights(height: int, width: int, radius: float, *, device: torch.device | str | None = None):
    """(H, W) float32 coverage of each pixel by the disc of ``radius`` px centred on the patch centre.

    Pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``; the centre is ``(width / 2, height / 2)``.
    The weight is ``clip(radius + 0.5 - d, 0, 1)`` with ``d`` the distance of the pixel centre, an
    anti-aliased approximation of the covered fraction (the weights sum to about ``pi r^2``).
    """
    yy = torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2
    xx = torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2
    d = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return (float(radius) + 0.5 - d).clamp(0.0, 1.0)


def upsample_matrix(n_out: int, n_in: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear up-sampling as ``F.interpolate(..., align_corners=False)``.

    2-D bilinear up-sampling of ``x`` (h, w) to (H, W) equals ``A_h @ x @ A_w.T`` with
    ``A_h = upsample_matrix(H, h)`` and ``A_w = upsample_matrix(W, w)``.
    """
    eye = torch.eye(n_in, device=device, dtype=torch.float32)[None]  # (1, C=n_in, L=n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def counts_to_log1p_cp10k(counts: torch.Tensor) -> torch.Tensor:
    """(B, G + 1) expected counts (last column = all other genes) -> (B, G) ``ln(1 + 1e4 c_g / L)``.

    ``L`` is the sum over all ``G + 1`` columns, as the targets' library size is over all genes.
    """
    counts = counts.float()
    library = counts.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.log1p(CP_SCALE * counts[:, :-1] / library)


def pcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, int]:
    """``1 - mean_g PCC_g``: Pearson r of each gene across the batch's spots, averaged over genes.

    Genes whose target is constant in the batch (no defined correlation, e.g. all zero) are left
    out of the mean; with fewer than 2 spots or no varying gene the term is 0. Returns the loss and
    the number of genes it averaged over. Computed in float32. Under DDP the batch is the global
    one (:func:`.base.gather_batch`), so the correlation does not depend on the number of processes.
    """
    pred, target = gather_batch(pred.float()), gather_batch(target.float())
    if pred.shape[0] < 2:
        return pred.sum() * 0.0, 0
    p = pred - pred.mean(0, keepdim=True)
    t = target - target.mean(0, keepdim=True)
    tt = (t * t).sum(0)
    valid = tt > 1e-10 * pred.shape[0]
    n_valid = int(valid.sum())
    if n_valid == 0:
        return pred.sum() * 0.0, 0
    r = (p * t).sum(0) / (torch.sqrt((p * p).sum(0) + eps) * torch.sqrt(tt + eps))
    return 1.0 - r[valid].mean(), n_valid


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


# ----------------------------------------------------------------------------------------------
# modules


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """``x + 1x1(dw_kxk(GELU(1x1(LN(x)))))``; ``kernel=1`` has no depthwise conv."""

    def __init__(self, dim: int, expansion: int = 1, kernel: int = 3) -> None:
        super().__init__()
        inner = dim * expansion
        self.norm = LayerNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, inner, 1)
        self.act = nn.GELU()
        self.dw = (
            nn.Conv2d(inner, inner, kernel, padding=kernel // 2, groups=inner)
            if kernel > 1
            else nn.Identity()
        )
        self.fc2 = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dw(self.act(self.fc1(self.norm(x)))))


def _match(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (or replicate-pad) ``x`` to spatial ``size`` (odd input sizes give one extra row/column)."""
    h, w = size
    x = x[..., :h, :w]
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    if dh or dw:
        x = F.pad(x, (0, dw, 0, dh), mode="replicate")
    return x


class DecoderStage(nn.Module):
    """``FFN(Up(x) + delta * skip)``: ``Up`` a ConvTranspose2d(k=s=ratio), ``delta`` learned (init 1)."""

    def __init__(self, dim: int, ratio: int, expansion: int, kernel: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim, ratio, stride=ratio) if ratio > 1 else nn.Conv2d(dim, dim, 1)
        self.delta = nn.Parameter(torch.ones(()))
        self.ffn = ConvFFN(dim, expansion, kernel)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ffn(_match(self.up(x), tuple(skip.shape[-2:])) + self.delta * skip)


class PixNet(nn.Module):
    """PixNet re-implemented (see the module docstring)."""

    required_inputs = ("image", "target", "radius_px")
    predict_inputs = ("image", "radius_px")

    def __init__(self, config: PixNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = create_backbone(
            config.backbone, config.pretrained, features_only=True, out_indices=tuple(config.out_indices)
        )
        channels = list(self.encoder.feature_info.channels())
        strides = [int(s) for s in self.encoder.feature_info.reduction()]
        ratios = [b // a for a, b in zip(strides[:-1], strides[1:], strict=True)]
        if any(b % a or b < a for a, b in zip(strides[:-1], strides[1:], strict=True)):
            raise RapaclInputError(
                f"backbone {config.backbone!r} with out_indices={list(config.out_indices)} has strides "
                f"{strides}: each must be a multiple of the previous one"
            )
        self.output_stride = strides[0]
        h = config.hidden
        self.skips = nn.ModuleList(nn.Conv2d(c, h, 1) for c in channels)
        # stages[i] goes from level i + 1 to level i (run deepest first)
        self.stages = nn.ModuleList(
            DecoderStage(h, r, config.ffn_expansion, config.ffn_kernel) for r in ratios
        )
        self.head = nn.Conv2d(h, config.n_genes + 1, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        # start every gene near log1p(CP10k) = 1 (the trainer resets this to the training mean)
        self.set_target_mean(torch.ones(config.n_genes))

    # -- dense map -----------------------------------------------------------------------------

    def density(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, G + 1, H / s, W / s) float32 count density at the output stride.

        Channel ``G`` is the density of all other genes. Up-sampled (bilinear) to (H, W) and multiplied
        by the pixel area ``mpp^2`` it gives expected counts per input pixel.
        """
        feats = self.encoder((images - self.mean) / self.std)
        x = self.skips[-1](feats[-1])
        for level in range(len(feats) - 2, -1, -1):
            x = self.stages[level](x, self.skips[level](feats[level]))
        return F.softplus(self.head(x).float())

    def predict_map(self, images: torch.Tensor, kind: str = "expression") -> torch.Tensor:
        """(B, 3, H, W) -> (B, G, H, W) dense map at the input resolution (for the GUI's dense layer).

        ``kind="expression"`` (default): ``ln(1 + 1e4 rho_g / rho_total)`` per pixel, in the units of
        :meth:`predict` (log1p(CP10k)): what a spot covering only tissue like that pixel's would give.
        A disc prediction is the log of the count-weighted mean composition over the disc, not the
        mean of this map. ``kind="density"``: the up-sampled count density of the G genes per um^2
        (relative units; the sum over a disc times ``mpp^2`` is the spot's expected counts).
        """
        if kind not in ("expression", "density"):
            raise RapaclInputError(f"kind must be 'expression' or 'density', got {kind!r}")
        self._check_image(images)
        up = F.interpolate(self.density(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if kind == "density":
            return up[:, :-1]
        total = up.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.log1p(CP_SCALE * up[:, :-1] / total)

    # -- aggregation ---------------------------------------------------------------------------

    def _stride_weights(
        self, radius: float, size: tuple[int, int], grid: tuple[int, int], device
    ) -> torch.Tensor:
        """(h, w) stride-grid weights: their dot product with the density = the full-res disc sum."""
        key = (size, grid, round(float(radius), 6), str(device))
        cached = self._mask_cache.get(key)
        if cached is None:
            (big_h, big_w), (h, w) = size, grid
            # normal tensors even under inference_mode: a cached mask is reused by training steps
            with torch.inference_mode(False), torch.no_grad():
                disc = disc_weights(big_h, big_w, radius, device=device)
                a_h = upsample_matrix(big_h, h, device=device)
                cached = a_h.T @ disc @ upsample_matrix(big_w, w, device=device)
            if len(self._mask_cache) >= 256:
                self._mask_cache.clear()
            self._mask_cache[key] = cached
        return cached

    def _radius(self, radius, n: int, size: tuple[int, int], device) -> torch.Tensor:
        r = torch.as_tensor(radius, dtype=torch.float32).detach().reshape(-1).cpu()
        if r.numel() == 1 and n != 1:
            r = r.expand(n)
        if r.numel() != n:
            raise RapaclInputError(f"radius_px must hold one radius per image ({n}), got {r.numel()}")
        if not bool(torch.isfinite(r).all()):
            raise RapaclInputError("radius_px contains NaN or infinite values")
        small = r < MIN_RADIUS_PX
        if bool(small.any()):
            raise RapaclInputError(
                f"radius_px {float(r[small][0]):g} is below {MIN_RADIUS_PX} px: the disc covers no pixel; "
                "use patches with a finer mpp"
            )
        half = min(size) / 2
        big = r > half + 1e-4
        if bool(big.any()) and not self.config.clip_radius:
            raise RapaclInputError(
                f"radius_px {float(r[big][0]):g} is larger than the patch's half side ({half:g} px of a "
                f"{size[1]} x {size[0]} px patch at {self.config.mpp:g} um/px): the spot reaches outside "
                "the patch; use a larger patch_size or mpp, or set clip_radius=True to aggregate over the "
                "part of the disc inside the patch"
            )
        return r

    def spot_counts(self, density: torch.Tensor, radius, size: tuple[int, int]) -> torch.Tensor:
        """(B, G + 1) expected counts over each image's disc; ``size`` = the input (H, W)."""
        b = density.shape[0]
        r = self._radius(radius, b, size, density.device)
        grid = tuple(density.shape[-2:])
        weights = torch.stack(
            [self._stride_weights(float(v), size, grid, density.device) for v in r.tolist()]
        )
        return torch.einsum("bchw,bhw->bc", density.float(), weights) * (self.config.mpp**2)

    def forward(self, images: torch.Tensor, radius_px=None) -> torch.Tensor:
        """(B, 3, H, W) and per-image disc radius (px) -> (B, G) predicted log1p(CP10k)."""
        if radius_px is None:
            raise RapaclInputError(
                "PixNet predicts a spot from its disc and needs the spot radius: call "
                "model(images, radius_px) or model.predict({'image': ..., 'radius_px': ...}) with the "
                "radius in patch pixels (slide radius in px * slide mpp / model mpp)"
            )
        self._check_image(images)
        counts = self.spot_counts(self.density(images), radius_px, tuple(images.shape[-2:]))
        return counts_to_log1p_cp10k(counts)

    def set_target_mean(self, mean: torch.Tensor) -> None:
        """Start the head's bias so that a uniform map predicts ``mean`` (log1p(CP10k)) per gene.

        Gene fractions ``f_g = expm1(mean_g) / 1e4``; the rest channel gets ``1 - sum f_g`` (at least
        0.05); the biases are ``softplus^-1(f)``.
        """
        bias = self.head.bias
        g = self.config.n_genes
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        if mean.shape != (g,):
            raise RapaclInputError(f"target mean must have shape ({g},), got {tuple(mean.shape)}")
        if not bool(torch.isfinite(mean).all()):
            raise RapaclInputError("target mean contains NaN or infinite values")
        frac = (torch.expm1(mean.clamp_min(0.0)) / CP_SCALE).clamp_min(1e-8)
        rest = (1.0 - frac.sum()).clamp_min(0.05)
        with torch.no_grad():
            bias.copy_(_inverse_softplus(torch.cat([frac, rest.view(1)])).to(bias))

    # -- contract ------------------------------------------------------------------------------

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise RapaclInputError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")

    def _get(self, batch: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
        if key not in batch:
            raise RapaclInputError(f"PixNet needs batch[{key!r}] ({what}); got keys {sorted(batch)}")
        return batch[key]

    def compute_loss(self, batch: dict[str, torch.Tensor], epoch: int = 0) -> dict[str, torch.Tensor]:
        """``MSE + pcc_weight * (1 - PCC)``; logs ``mse`` and ``pcc`` (mean per-gene r in the batch, 0 if
        no gene varies)."""
        pred = self.predict(batch)
        g = self.config.n_genes
        target = self._get(batch, "target", f"(B, {g}) log1p(CP10k) of the spot")
        if tuple(target.shape) != tuple(pred.shape):
            raise RapaclInputError(f"target must have shape {tuple(pred.shape)}, got {tuple(target.shape)}")
        mse = F.mse_loss(pred, target.float())
        one_minus_r, n_valid = pcc_loss(pred, target)
        loss = mse + self.config.pcc_weight * one_minus_r
        # logged r: mean over the genes that vary in the batch (0 when none does)
        r = (1.0 - one_minus_r).detach() if n_valid else torch.zeros((), device=pred.device)
        return {"loss": loss, "mse": mse.detach(), "pcc": r}

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, G) predictions for the disc of ``batch["radius_px"]`` around each patch centre."""
        image = self._get(batch, "image", "(B, 3, H, W) spot patches in [0, 1]")
        radius = self._get(batch, "radius_px", "(B,) spot radius in patch pixels")
        return self(image, radius)


def build(config: PixNetConfig) -> PixNet:
    return PixNet(config)
