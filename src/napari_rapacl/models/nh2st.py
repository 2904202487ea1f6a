"""NH2ST: a query branch and a neighbour branch, aligned with expression at training, image-only at inference.

Spec: ``methods.md`` section 2. Our own re-implementation, with the reference's bugs fixed (sections
2.7 and 5.1):

* **Multi-token cross-attention.** In the reference every attention call had ONE key, so its
  softmax was identically 1 and "cross-attention" was a fixed linear map. Here the target's token
  attends over the **K neighbour tokens** (attention weights of shape ``(B, heads, 1, K)``).
* **Expression encoder with a nonlinearity** (``Linear -> GELU -> Linear``; the reference had two
  stacked Linears, i.e. one linear map).
* **Symmetric InfoNCE** on the **pre-fusion** embeddings (the reference contrasted embeddings that
  already held the partner modality through the residual cross-attention, one-directionally, with its
  negatives' logits multiplied by 0.1).
* **Neighbours exclude the spot itself** (:func:`nearest_spot_indices`; the reference's "9 nearest"
  included it) and get the same train/test handling as the target.
* **Deterministic inference**: only ``nn.Dropout`` / ``nn.MultiheadAttention`` dropout, all of which
  switch off in ``eval()``; no module overrides ``train()``.

Architecture
------------
* Shared image encoder: a timm backbone with **global-average pooled** features (``num_classes=0``)
  and ``Linear(features -> D)``. Pooled rather than the reference's flattened ``7 x 7 x 512`` map
  (``Linear(25088 -> 512)``, 12.8 M weights tied to one patch size): the attention's tokens are the
  K neighbours, so spatial tokens are not needed, and pooled features work at any patch size (the
  tiny variant's 32 px patches give a 1 x 1 map anyway).
* Expression encoder ``Linear(G -> D) -> GELU -> Dropout -> Linear(D -> D)``, shared by the target's
  and the neighbours' measured expression (training only).
* Neighbour branch: the K neighbour patches go through the SAME image encoder (one backbone call
  for target + neighbours), their expression through the SAME expression encoder. Optionally
  (``graph_k > 0``) one hypergraph convolution mixes the K tokens of each modality (plain torch; the
  incidence comes from the cosine k-NN of the image tokens, as in the reference). Then the target's
  image token attends over the K neighbour image tokens, and the target's expression token over the
  K neighbour expression tokens (pre-norm multi-head attention + a residual feed-forward block); the
  attention outputs are the neighbour summaries ``s_img`` and ``s_exp``. The summary is the attended
  neighbour context only (no residual of the query), so it summarises the neighbourhood.
* Decoder ``Linear(D -> decoder_hidden) -> GELU -> Dropout -> Linear(-> G)`` on the target's image
  embedding. **Prediction uses the image only** (``predict_inputs == ("image",)``).

Loss
----
``MSE(pred, target) + w_query * InfoNCE(z_img, z_exp) + w_neighbor * InfoNCE(s_img, s_exp)``, both
InfoNCE terms symmetric (CLIP loss), temperature ``config.temperature`` (default 0.07, fixed unless
``learn_temperature``). Default weights 0.1 and 0.05: see :class:`.nh2st_config.NH2STConfig`.

Batch keys (see :mod:`.base`): ``image`` (B, 3, H, W) in [0, 1]; ``target`` (B, G);
``neighbors`` (B, K, 3, H, W); ``neighbor_target`` (B, K, G).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import RapaclInputError
from .backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from .base import IMAGE_ONLY
from .nh2st_config import NH2STConfig
from .rapacl import symmetric_info_nce

__all__ = [
    "NH2ST",
    "NH2STOutput",
    "HypergraphMix",
    "NeighborAttention",
    "build",
    "nearest_spot_indices",
    "symmetric_info_nce",
]

MAX_LOGIT_SCALE = math.log(100.0)


def nearest_spot_indices(x, y, k: int, *, chunk: int = 1024) -> np.ndarray:
    """Indices of the ``k`` nearest spots of every spot, the spot itself excluded.

    Parameters
    ----------
    x, y
        ``(N,)`` spot centres in pixels (any one coordinate frame).
    k
        Number of neighbours, ``1 <= k <= N - 1``.
    chunk
        Rows of the distance matrix computed at once (memory ``chunk * N`` floats).

    Returns
    -------
    numpy.ndarray
        ``(N, k)`` int64, nearest first; equal distances are ordered by spot index. Another spot at
        the very same position is a neighbour at distance 0.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise RapaclInputError(f"x and y must have the same length, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise RapaclInputError("spot coordinates contain NaN or infinite values")
    n = x.size
    k = int(k)
    if k < 1:
        raise RapaclInputError(f"k (number of neighbours) must be >= 1, got {k}")
    if k > n - 1:
        raise RapaclInputError(f"{k} neighbours requested but there are only {n} spots ({n - 1} others)")
    pts = np.stack([x, y], axis=1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, max(1, int(chunk))):
        stop = min(n, start + max(1, int(chunk)))
        d2 = ((pts[start:stop, None, :] - pts[None, :, :]) ** 2).sum(-1)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # never the spot itself
        out[start:stop] = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return out


class NH2STOutput(NamedTuple):
    """Everything one training forward computes.

    Attributes
    ----------
    pred
        (B, G) predicted expression (from the target image only).
    z_img, z_exp
        (B, D) pre-fusion embeddings of the target image and of its measured expression.
    s_img, s_exp
        (B, D) neighbour summaries (attention outputs) of the neighbour images / expressions.
    attn_img, attn_exp
        (B, heads, 1, K) attention weights of the target token over the K neighbour tokens.
    """

    pred: torch.Tensor
    z_img: torch.Tensor
    z_exp: torch.Tensor
    s_img: torch.Tensor
    s_exp: torch.Tensor
    attn_img: torch.Tensor
    attn_exp: torch.Tensor


class HypergraphMix(nn.Module):
    """One hypergraph convolution over the K neighbour tokens, with a residual.

    ``x + Dropout(GELU(Linear(Dv^-1 H De^-1 H^T LN(x))))`` where the incidence ``H`` (nodes x
    hyperedges) has one hyperedge per node: the node and its ``m`` most cosine-similar other nodes.
    """

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def incidence(tokens: torch.Tensor, m: int) -> torch.Tensor:
        """(B, K, K) float incidence (node, hyperedge) of the cosine k-NN hypergraph of ``tokens``."""
        b, k, _ = tokens.shape
        eye = torch.eye(k, device=tokens.device, dtype=torch.bool)
        inc = eye.expand(b, k, k).clone()  # every hyperedge holds its own node
        m = min(int(m), k - 1)
        if m > 0:
            with torch.no_grad():
                unit = F.normalize(tokens.detach().float(), dim=-1)
                sim = (unit @ unit.transpose(1, 2)).masked_fill(eye, float("-inf"))
                nearest = sim.topk(m, dim=-1).indices  # (B, edge i, m): the members of edge i
            edge = torch.arange(k, device=tokens.device).view(1, k, 1).expand(b, k, m)
            batch = torch.arange(b, device=tokens.device).view(b, 1, 1).expand(b, k, m)
            inc[batch, nearest, edge] = True
        return inc.to(tokens.dtype)

    def forward(self, tokens: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        edge_deg = inc.sum(1, keepdim=True)  # (B, 1, E)
        node_deg = inc.sum(2, keepdim=True)  # (B, K, 1)
        edges = (inc / edge_deg).transpose(1, 2) @ h  # (B, E, D): mean of the member nodes
        nodes = (inc @ edges) / node_deg  # (B, K, D): mean of the node's hyperedges
        return tokens + self.dropout(F.gelu(self.linear(nodes)))


class NeighborAttention(nn.Module):
    """The target token attends over the K neighbour tokens (pre-norm multi-head cross-attention).

    Returns the attended context passed through a residual feed-forward block, ``(B, D)``, and the
    attention weights ``(B, heads, 1, K)``.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.norm_kv(tokens)
        ctx, weights = self.attn(
            self.norm_q(query)[:, None, :], kv, kv, need_weights=True, average_attn_weights=False
        )
        summary = ctx[:, 0]
        return summary + self.ffn(self.norm_ffn(summary)), weights


class NH2ST(nn.Module):
    """NH2ST re-implemented (see the module docstring)."""

    required_inputs = ("image", "target", "neighbors", "neighbor_target")
    predict_inputs = IMAGE_ONLY
    #: image-only prediction without data-dependent control flow: frozen with TorchScript for CPU
    #: inference (:func:`napari_rapacl.inference.frozen_image_predictor`)
    freeze_for_inference = True

    def __init__(self, config: NH2STConfig) -> None:
        super().__init__()
        d, g, p = config.embed_dim, config.n_genes, config.dropout
        self.encoder = create_backbone(config.backbone, config.pretrained, num_classes=0)
        self.img_proj = nn.Sequential(nn.Dropout(p), nn.Linear(self.encoder.num_features, d))
        self.exp_encoder = nn.Sequential(nn.Linear(g, d), nn.GELU(), nn.Dropout(p), nn.Linear(d, d))
        self.graph_img = HypergraphMix(d, p) if config.graph_k > 0 else None
        self.graph_exp = HypergraphMix(d, p) if config.graph_k > 0 else None
        self.attn_img = NeighborAttention(d, config.heads, p)
        self.attn_exp = NeighborAttention(d, config.heads, p)
        self.decoder = nn.Sequential(
            nn.Linear(d, config.decoder_hidden), nn.GELU(), nn.Dropout(p), nn.Linear(config.decoder_hidden, g)
        )
        scale = torch.tensor(math.log(1.0 / config.temperature))
        if config.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.config = config

    # -- pieces --------------------------------------------------------------------------------

    @property
    def temperature(self) -> torch.Tensor:
        """The InfoNCE temperature ``T`` (a 0-d tensor; learned when ``learn_temperature``)."""
        return torch.exp(-self.logit_scale.clamp(max=MAX_LOGIT_SCALE))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) image embedding."""
        return self.img_proj(self.encoder((images - self.mean) / self.std))

    def encode_expression(self, expression: torch.Tensor) -> torch.Tensor:
        """(..., G) measured expression -> (..., D) embedding."""
        return self.exp_encoder(expression)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Prediction from the target image only: (B, 3, H, W) -> (B, G)."""
        return self.decoder(self.encode_image(images))

    def set_target_mean(self, mean: torch.Tensor) -> None:
        """Start the decoder's output bias at the training mean expression."""
        bias = self.decoder[-1].bias
        mean = torch.as_tensor(mean, dtype=bias.dtype).reshape(-1)
        if mean.shape != bias.shape:
            raise RapaclInputError(f"target mean must have shape ({bias.numel()},), got {tuple(mean.shape)}")
        with torch.no_grad():
            bias.copy_(mean.to(bias.device))

    # -- contract ------------------------------------------------------------------------------

    def _get(self, batch: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
        if key not in batch:
            raise RapaclInputError(f"NH2ST needs batch[{key!r}] ({what}); got keys {sorted(batch)}")
        return batch[key]

    def _image(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self._get(batch, "image", "(B, 3, H, W) spot patches in [0, 1]")
        if image.ndim != 4 or image.shape[1] != 3:
            raise RapaclInputError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        return image

    def forward_train(self, batch: dict[str, torch.Tensor]) -> NH2STOutput:
        """The full training forward (needs the measured expression and the neighbours)."""
        image = self._image(batch)
        b, _, h, w = image.shape
        g = self.config.n_genes
        target = self._get(batch, "target", f"(B, {g}) measured expression of the spot")
        neighbors = self._get(
            batch, "neighbors", "(B, K, 3, H, W) patches of the K nearest spots, needed at training"
        )
        neighbor_target = self._get(
            batch, "neighbor_target", f"(B, K, {g}) measured expression of the K nearest spots"
        )
        if tuple(target.shape) != (b, g):
            raise RapaclInputError(f"target must have shape ({b}, {g}), got {tuple(target.shape)}")
        if neighbors.ndim != 5 or neighbors.shape[0] != b or tuple(neighbors.shape[2:]) != (3, h, w):
            raise RapaclInputError(
                f"neighbors must have shape ({b}, K, 3, {h}, {w}) like the image batch, "
                f"got {tuple(neighbors.shape)}"
            )
        k = neighbors.shape[1]
        if k < 1:
            raise RapaclInputError("neighbors holds K=0 patches; NH2ST needs at least one neighbour")
        if tuple(neighbor_target.shape) != (b, k, g):
            raise RapaclInputError(
                f"neighbor_target must have shape ({b}, {k}, {g}), got {tuple(neighbor_target.shape)}"
            )

        # one backbone call for the targets and their neighbours (shared encoder)
        emb = self.encode_image(torch.cat([image, neighbors.reshape(b * k, 3, h, w)], dim=0))
        z_img, n_img = emb[:b], emb[b:].reshape(b, k, -1)
        z_exp = self.encode_expression(target)
        n_exp = self.encode_expression(neighbor_target)
        if self.graph_img is not None:
            inc = HypergraphMix.incidence(n_img, self.config.graph_k)
            n_img = self.graph_img(n_img, inc)
            n_exp = self.graph_exp(n_exp, inc)
        s_img, attn_img = self.attn_img(z_img, n_img)
        s_exp, attn_exp = self.attn_exp(z_exp, n_exp)
        return NH2STOutput(self.decoder(z_img), z_img, z_exp, s_img, s_exp, attn_img, attn_exp)

    def compute_loss(self, batch: dict[str, torch.Tensor], epoch: int = 0) -> dict[str, torch.Tensor]:
        """``MSE + w_query * InfoNCE(z_img, z_exp) + w_neighbor * InfoNCE(s_img, s_exp)``.

        Logs ``mse``, ``nce_query``, ``nce_neighbor`` and ``temperature`` beside ``loss``.
        """
        out = self.forward_train(batch)
        t = self.temperature
        mse = F.mse_loss(out.pred.float(), batch["target"].float())
        nce_q = symmetric_info_nce(out.z_img, out.z_exp, t)
        nce_n = symmetric_info_nce(out.s_img, out.s_exp, t)
        loss = mse + self.config.w_query * nce_q + self.config.w_neighbor * nce_n
        return {
            "loss": loss,
            "mse": mse.detach(),
            "nce_query": nce_q.detach(),
            "nce_neighbor": nce_n.detach(),
            "temperature": t.detach(),
        }

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, G) predictions from ``batch["image"]`` alone (every other key is ignored)."""
        return self(self._image(batch))


def build(config: NH2STConfig) -> NH2ST:
    return NH2ST(config)
