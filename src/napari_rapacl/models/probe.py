"""Frozen-encoder probe (HEST-Bench style): a frozen image encoder and a ridge or small MLP head.

The encoder (any timm / ``hf-hub:`` foundation encoder, :mod:`.backbones`) never trains, so each
patch's embedding is computed once and kept in an on-disk cache (:class:`EmbeddingCache`): after the
first epoch, training and validation cost a hash of each patch and the head's few matrix products,
i.e. minutes on a CPU. The model trains through ``python -m training.run`` like every other model
(``training/configs/probe_her2st.yaml``; patches are not augmented there, since a flipped patch is a
new cache entry) and predicts through the same checkpoint and inference path.

Cache keys: the encoder name, the SHA-256 of the encoder's weights as loaded (so a different
weights file, or a random initialisation with another seed, never reuses embeddings), the patch
size and µm/px, and each patch's own pixel content (which identifies the slide region it was cut
from, so a changed slide file gives new keys). Entries are written in shards with atomic writes; a
shard that cannot be read is ignored (its embeddings are computed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._atomic import write_atomic, write_text_atomic
from .backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone, weights_hash
from .base import IMAGE_ONLY
from .probe_config import ProbeConfig

log = logging.getLogger(__name__)

#: Counters over this process (tests and logs): embeddings found in a cache / computed by the encoder.
CACHE_STATS = {"hits": 0, "computed": 0}
#: Pending embeddings written as one shard once this many have accumulated.
FLUSH_EVERY = 4096


def default_cache_root() -> Path:
    """``$NAPARI_RAPACL_CACHE_DIR/embeddings`` or ``~/.cache/napari-rapacl/embeddings``."""
    base = os.environ.get("NAPARI_RAPACL_CACHE_DIR")
    return (Path(base).expanduser() if base else Path("~/.cache/napari-rapacl").expanduser()) / "embeddings"


def patch_keys(images: torch.Tensor) -> list[bytes]:
    """One 16-byte BLAKE2 digest per patch of a (B, 3, H, W) float batch (its exact pixel values)."""
    arr = images.detach().to("cpu", torch.float32).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr]


class EmbeddingCache:
    """Embeddings of one encoder identity (``key``) in ``<root>/<key[:24]>/``: ``meta.json`` (what the
    key stands for) and ``shard-*.npz`` files (``keys`` S16, ``emb`` float32), each written atomically."""

    def __init__(self, root: str | os.PathLike, identity: dict, dim: int) -> None:
        text = json.dumps(identity, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()
        self.folder = Path(root).expanduser() / self.key[:24]
        self.dim = dim
        self.memory: dict[bytes, np.ndarray] = {}
        self.pending: dict[bytes, np.ndarray] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            write_text_atomic(meta, json.dumps({**identity, "dim": dim}, indent=2, sort_keys=True) + "\n")
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    keys, emb = data["keys"], data["emb"]
                if emb.ndim != 2 or emb.shape[1] != dim or len(keys) != len(emb):
                    raise ValueError(f"shape {emb.shape} for {len(keys)} keys, dim {dim}")
            except Exception as exc:  # a damaged shard costs a recomputation, never a wrong embedding
                log.warning("embedding cache: ignoring unreadable shard %s (%s)", shard, exc)
                continue
            self.memory.update(zip((bytes(k) for k in keys), emb.astype(np.float32), strict=True))

    def get(self, key: bytes) -> np.ndarray | None:
        return self.memory.get(key)

    def put(self, key: bytes, value: np.ndarray) -> None:
        self.memory[key] = value
        self.pending[key] = value
        if len(self.pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the pending embeddings as one new shard (atomically)."""
        if not self.pending:
            return
        keys = np.array(list(self.pending), dtype="S16")
        emb = np.stack(list(self.pending.values())).astype(np.float32)
        self.pending = {}
        path = self.folder / f"shard-{uuid.uuid4().hex}.npz"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=keys, emb=emb)

        try:
            write_atomic(path, write, suffix=".npz")
        except OSError as exc:  # a full or read-only disk: the embeddings stay in memory only
            log.warning("embedding cache: cannot write %s (%s)", path, exc)


class Probe(nn.Module):
    """Frozen encoder -> (cached) embedding -> ridge or MLP head -> (B, n_genes) log1p(CP10k)."""

    required_inputs = ("image", "target")
    predict_inputs = IMAGE_ONLY
    #: prediction goes through the embedding cache (Python control flow): never traced
    freeze_for_inference = False

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.encoder = create_backbone(config.backbone, config.pretrained, num_classes=0)
        dim = int(self.encoder.num_features)
        self.embed_dim = dim
        if config.head == "mlp":
            self.mlp: nn.Module = nn.Sequential(
                nn.Linear(dim, config.hidden), nn.GELU(), nn.Dropout(config.dropout)
            )
            self.head = nn.Linear(config.hidden, config.n_genes)
        else:
            self.mlp = nn.Identity()
            self.head = nn.Linear(dim, config.n_genes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._cache: EmbeddingCache | None = None
        self._cache_cfg = config

    # -- embeddings ------------------------------------------------------------------------------
    def embedding_cache(self) -> EmbeddingCache | None:
        """The cache of this encoder's current weights (built on first use), or None when disabled."""
        cfg = self._cache_cfg
        if cfg.embedding_cache is None:
            return None
        if self._cache is None:
            root = default_cache_root() if cfg.embedding_cache == "auto" else Path(cfg.embedding_cache)
            identity = {
                "encoder": cfg.backbone,
                "weights_sha256": weights_hash(self.encoder),
                "patch_size": cfg.patch_size,
                "mpp": cfg.mpp,
                "input": "RGB in [0, 1], ImageNet mean/std, float32",
            }
            self._cache = EmbeddingCache(root, identity, self.embed_dim)
            weakref.finalize(self, self._cache.flush)  # what is pending is written at exit too
        return self._cache

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder((images - self.mean) / self.std).float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) embeddings of a (B, 3, H, W) batch in [0, 1], from the cache where known."""
        cache = self.embedding_cache()
        if cache is None:
            CACHE_STATS["computed"] += images.shape[0]
            return self._encode(images)
        keys = patch_keys(images)
        found = [cache.get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        CACHE_STATS["hits"] += len(keys) - len(missing)
        CACHE_STATS["computed"] += len(missing)
        if missing:
            new = self._encode(images[missing]).cpu().numpy()
            for i, row in zip(missing, new, strict=True):
                found[i] = row
                cache.put(keys[i], row)
        return torch.from_numpy(np.stack(found)).to(images.device)

    # -- the model contract ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(images)))

    def compute_loss(self, batch: dict[str, torch.Tensor], epoch: int = 0) -> dict[str, torch.Tensor]:
        pred = self(batch["image"])
        mse = nn.functional.mse_loss(pred, batch["target"])
        penalty = self._cache_cfg.ridge_alpha * self.head.weight.pow(2).sum() / self.head.out_features
        return {"loss": mse + penalty, "mse": mse.detach(), "ridge": penalty.detach()}

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["image"])

    def train(self, mode: bool = True):
        """Also writes the embeddings gathered so far (the trainer switches modes every epoch)."""
        if self._cache is not None:
            self._cache.flush()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache = None  # new encoder weights: a new cache identity (recomputed on first use)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build(config: ProbeConfig) -> Probe:
    return Probe(config)
