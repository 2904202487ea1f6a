"""RaPaCL-ST: stages, freezing, losses, schedule, Stage 1 -> Stage 2 initialisation (tiny, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.models import create_model, make_config  # noqa: E402
from napari_rapacl.models.checkpoint import save_checkpoint  # noqa: E402
from napari_rapacl.models.rapacl import (  # noqa: E402
    init_from_stage1,
    mmcl_ramp,
    multipos_nt_xent,
    symmetric_info_nce,
)

RAD_BRANCH = ("radiomics", "recon_head", "cls_head")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(b=6, f=72, g=5, seed=0, size=32):
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, size, size, generator=gen),
        "radiomics": torch.randn(b, f, generator=gen),
        "cell_label": torch.randint(0, 5, (b,), generator=gen),
        "target": torch.randn(b, g, generator=gen),
    }


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _genes(n):
    return [f"G{i}" for i in range(n)]


def _step(model, opt, batch, epoch):
    model.train()
    out = model.compute_loss(batch, epoch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out


# ---------------------------------------------------------------------------------------------
# config and registry


def test_config_validation_and_variants():
    cfg = make_config("rapacl")
    assert (cfg.backbone, cfg.embed_dim, cfg.n_radiomics, cfg.n_classes) == ("densenet121", 384, 72, 5)
    assert (cfg.rad_hidden, cfg.rad_layers, cfg.rad_heads, cfg.rad_ffn) == (128, 2, 8, 256)
    assert (cfg.temperature, cfg.recon_weight, cfg.cls_weight, cfg.mmcl) == (0.25, 25.0, 1.0, "infonce")
    tiny = make_config("rapacl_tiny")
    assert (tiny.backbone, tiny.patch_size, tiny.embed_dim, tiny.rad_hidden, tiny.rad_heads) == (
        "test_resnet",
        32,
        32,
        32,
        4,
    )
    with pytest.raises(RapaclInputError, match="stage must be 1 or 2, got 3"):
        make_config("rapacl_tiny", stage=3)
    with pytest.raises(RapaclInputError, match="mmcl must be one of.*'clip'"):
        make_config("rapacl_tiny", mmcl="clip")
    with pytest.raises(RapaclInputError, match=r"rad_hidden \(30\) must be divisible by rad_heads \(4\)"):
        make_config("rapacl_tiny", rad_hidden=30)
    with pytest.raises(RapaclInputError, match="lists 2 names but n_radiomics=3"):
        make_config("rapacl_tiny", n_radiomics=3, radiomics_features=["a", "b"])
    with pytest.raises(RapaclInputError, match="only used in stage 2"):
        make_config("rapacl_tiny", init_checkpoint="s1.pt")


# ---------------------------------------------------------------------------------------------
# freezing per stage


def test_stage1_trains_radiomics_branch_and_projection_with_encoder_frozen():
    model = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0)
    assert model.required_inputs == ("image", "radiomics", "cell_label")
    model.train()
    assert not model.encoder.training and model.radiomics.training and model.path_proj.training
    enc_before = _params(model.encoder)  # weights and BatchNorm running stats
    opt = torch.optim.AdamW(model.param_groups(1e-2), weight_decay=0.1)
    out = _step(model, opt, _batch(), epoch=30)
    assert {"loss", "recon", "mmcl", "cls", "cls_acc", "mmcl_weight"} <= set(out)
    for name in ("encoder", "gene_head"):
        for p in getattr(model, name).parameters():
            assert not p.requires_grad and p.grad is None, name
    for name in ("radiomics", "recon_head", "cls_head", "path_proj"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    for key, value in _params(model.encoder).items():
        assert torch.equal(value, enc_before[key]), key  # BN statistics did not move either
    groups = {g["name"]: g["lr"] for g in model.parameter_groups(1e-4)}
    assert groups == pytest.approx(
        {"path_proj": 3e-5, "radiomics": 1e-4, "recon_head": 1e-4, "cls_head": 1e-4}
    )

    unfrozen = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0, freeze_encoder_stage1=False)
    unfrozen.compute_loss(_batch(), epoch=30)["loss"].backward()
    assert all(p.grad is not None for p in unfrozen.encoder.parameters())


def test_stage2_freezes_radiomics_branch_and_trains_encoder_projection_gene_head():
    model = create_model("rapacl_tiny", n_genes=5, stage=2)
    assert model.required_inputs == ("image", "radiomics", "target")
    model.train()
    for name in RAD_BRANCH:
        assert not getattr(model, name).training, name
        assert all(not p.requires_grad for p in getattr(model, name).parameters()), name
    assert model.encoder.training
    out = model.compute_loss(_batch(), epoch=0)
    assert set(out) == {"loss", "mse"}
    out["loss"].backward()
    for name in RAD_BRANCH:
        assert all(p.grad is None for p in getattr(model, name).parameters()), name
    for name in ("encoder", "path_proj", "gene_head"):
        assert all(p.grad is not None for p in getattr(model, name).parameters()), name
    groups = {g["name"]: g["lr"] for g in model.parameter_groups(1e-4, weight_decay=1e-3)}
    assert groups == pytest.approx({"encoder": 1e-4, "path_proj": 3e-5, "gene_head": 1e-4})

    assert all(g["weight_decay"] == 1e-3 for g in model.param_groups(1e-4, 1e-3))
    model.set_target_mean(torch.arange(5.0))
    assert torch.equal(model.gene_head[-1].bias, torch.arange(5.0))
    with pytest.raises(RapaclInputError, match=r"target mean must have shape \(5,\)"):
        model.set_target_mean(torch.zeros(4))

    fixed = create_model("rapacl_tiny", n_genes=5, stage=2, train_encoder_stage2=False)
    fixed.compute_loss(_batch(), epoch=0)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in fixed.encoder.parameters())
    assert [g["name"] for g in fixed.parameter_groups(1e-4)] == ["path_proj", "gene_head"]


# ---------------------------------------------------------------------------------------------
# schedule and losses


def test_schedule_warmup_is_reconstruction_only_then_cosine_ramp():
    expected = {0: 0.0, 4: 0.0, 5: 0.5 * (1 - math.cos(math.pi / 20)), 14: 0.5, 24: 1.0, 40: 1.0}
    for epoch, w in expected.items():
        assert mmcl_ramp(epoch, 5, 20) == pytest.approx(w, abs=1e-12), epoch
    assert mmcl_ramp(5, 5, 20) == pytest.approx(0.00616, abs=1e-5)

    model = create_model("rapacl_tiny", n_genes=5, dropout=0.0).eval()  # warmup 5, ramp 20 (defaults)
    batch = _batch()
    for epoch in (0, 4):
        out = model.compute_loss(batch, epoch)
        assert set(out) == {"loss", "recon"}, epoch  # no contrastive / classification term at all
        assert float(out["loss"].detach()) == pytest.approx(25 * float(out["recon"]), rel=1e-6)
    for epoch in (5, 14, 24):
        out = model.compute_loss(batch, epoch)
        assert float(out["mmcl_weight"]) == pytest.approx(expected[epoch], rel=1e-6)
        total = expected[epoch] * out["mmcl"] + 25 * out["recon"] + 1 * out["cls"]
        assert float(out["loss"].detach()) == pytest.approx(float(total), rel=1e-5), epoch
    # the warm-up loss does not even need the image
    no_image = {k: v for k, v in batch.items() if k != "image"}
    assert set(model.compute_loss(no_image, 0)) == {"loss", "recon"}
    with pytest.raises(RapaclInputError, match=r"needs batch\['image'\]"):
        model.compute_loss(no_image, 5)


def test_symmetric_info_nce_matches_hand_computation_and_is_symmetric():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.5], [0.0, 1.0], [-1.0, 1.0]])
    t = 0.5

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    ua, ub = [unit(v) for v in a.tolist()], [unit(v) for v in b.tolist()]
    s = [[sum(x * y for x, y in zip(ua[i], ub[j], strict=True)) / t for j in range(3)] for i in range(3)]
    rows = [-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(3))) for i in range(3)]
    cols = [-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(3))) for j in range(3)]
    hand = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    assert float(symmetric_info_nce(a, b, t)) == pytest.approx(hand, rel=1e-6)
    assert float(symmetric_info_nce(b, a, t)) == pytest.approx(hand, rel=1e-6)
    # matched orthogonal pairs at a low temperature: close to zero; swapped pairs: large
    e = torch.eye(3)
    assert float(symmetric_info_nce(e, e, 0.05)) < 1e-6
    assert float(symmetric_info_nce(e, e[[1, 2, 0]], 0.05)) > 10


def _multipos_brute_force(z_img, z_tok, t, sample_index=None):
    b, k, d = z_tok.shape
    pool = torch.nn.functional.normalize(torch.cat([z_img[:, None], z_tok], 1).reshape(-1, d), dim=-1)
    groups = (torch.arange(b) if sample_index is None else sample_index).repeat_interleave(k + 1)
    logits = pool @ pool.T / t
    eye = torch.eye(len(pool), dtype=torch.bool)
    logprob = torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=1)
    pos = (groups[:, None] == groups[None, :]) & ~eye
    return -(logprob.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


def test_multipos_loss_equals_brute_force_with_chunks_and_has_the_right_positives():
    gen = torch.Generator().manual_seed(1)
    z_img = torch.randn(4, 8, generator=gen, requires_grad=True)
    z_tok = torch.randn(4, 3, 8, generator=gen, requires_grad=True)
    fast = multipos_nt_xent(z_img, z_tok, 0.25, chunk=5)  # N = 16 rows in 4 chunks
    ref = _multipos_brute_force(z_img, z_tok, 0.25)
    assert torch.isfinite(fast) and float(fast) == pytest.approx(float(ref), rel=1e-5)
    g_fast = torch.autograd.grad(fast, (z_img, z_tok))
    g_ref = torch.autograd.grad(ref, (z_img, z_tok))
    for x, y in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # two views of one sample (sample_index) share their positives
    idx = torch.tensor([0, 1, 0, 2])
    assert float(multipos_nt_xent(z_img, z_tok, 0.25, idx, chunk=3)) == pytest.approx(
        float(_multipos_brute_force(z_img, z_tok, 0.25, idx)), rel=1e-5
    )
    # positives = exactly the other members of the same sample: each sample's image and K tokens
    # are one unit vector, samples are orthogonal -> closed form
    b, k, t = 3, 4, 0.5
    e = torch.eye(b)
    loss = multipos_nt_xent(e, e[:, None, :].expand(b, k, b), t, chunk=4)
    n, m = b * (k + 1), k + 1
    expected = math.log((m - 1) * math.exp(1 / t) + (n - m)) - 1 / t
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_contrastive_token_is_the_last_token_of_the_sequence():
    model = create_model("rapacl_tiny", n_genes=5).eval()
    seen = {}
    model.radiomics.layers[-1].register_forward_hook(lambda m, i, o: seen.setdefault("seq", o))
    with torch.no_grad():
        out = model.encode_radiomics(torch.randn(3, 72))
    seq = seen["seq"]
    assert seq.shape == (3, 1 + 72 + 1, 32)
    assert torch.equal(out.cls_h, seq[:, 0]) and torch.equal(out.contrast_h, seq[:, -1])
    assert torch.equal(out.feature_h, seq[:, 1:-1])
    torch.testing.assert_close(out.z, model.radiomics.projection(seq[:, -1]))


def test_multipos_option_trains_through_the_feature_tokens():
    model = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0, mmcl="multipos", multipos_chunk=64)
    out = model.compute_loss(_batch(b=4), epoch=30)  # N = 4 * 73 = 292 rows, 5 chunks
    assert torch.isfinite(out["loss"]) and float(out["mmcl"]) > 0
    out["loss"].backward()
    assert model.radiomics.col_emb.grad is not None and model.path_proj[0].weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Stage 1 -> Stage 2


def _train_stage1(steps=2, **cfg):
    torch.manual_seed(0)
    model = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0, **cfg)
    opt = torch.optim.AdamW(model.param_groups(1e-2))
    for i in range(steps):
        _step(model, opt, _batch(seed=i), epoch=10)
    return model


def test_stage2_starts_from_stage1_checkpoint_and_keeps_the_radiomics_branch(tmp_path):
    stage1 = _train_stage1()
    fresh = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0)
    assert not torch.equal(stage1.radiomics.col_emb, fresh.radiomics.col_emb)  # Stage 1 really trained
    path = save_checkpoint(tmp_path / "stage1.pt", stage1, genes=_genes(5), epoch=10)
    saved = torch.load(path, weights_only=True)["state_dict"]

    torch.manual_seed(123)  # a different initialisation than Stage 1
    model = create_model("rapacl_tiny", n_genes=5, stage=2, init_checkpoint=str(path))
    assert not torch.equal(model.radiomics.col_emb, saved["radiomics.col_emb"])
    info = model.init_from_stage1()  # path from config.init_checkpoint
    assert info["model"] == "rapacl_tiny" and info["epoch"] == 10 and info["skipped"] == []
    state = model.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key  # bit for bit, every tensor (strict)
    assert model.training and not model.radiomics.training and model.gene_head.training

    gene_before = _params(model.gene_head)
    # even an optimiser over *all* parameters with weight decay must leave the frozen branch alone
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    for i in range(2):
        _step(model, opt, _batch(seed=10 + i), epoch=0)
    state = model.state_dict()
    for key, value in saved.items():
        if key.split(".")[0] in RAD_BRANCH:
            assert torch.equal(state[key], value), key
    assert any(not torch.equal(v, gene_before[k]) for k, v in _params(model.gene_head).items())
    assert not torch.equal(state["path_proj.0.weight"], saved["path_proj.0.weight"])

    # another gene panel: the untrained Stage 1 gene head is skipped, everything else is loaded
    other = create_model("rapacl_tiny", n_genes=7, stage=2)
    info = init_from_stage1(other, path)
    assert info["skipped"] == sorted(k for k in saved if k.startswith("gene_head."))
    assert torch.equal(other.radiomics.col_emb, saved["radiomics.col_emb"])
    assert other.gene_head[-1].out_features == 7


def test_mismatched_stage1_checkpoints_are_clear_errors(tmp_path):
    stage1 = _train_stage1(steps=0)
    path = save_checkpoint(tmp_path / "s1.pt", stage1, genes=_genes(5))
    with pytest.raises(RapaclInputError, match=r"n_radiomics=72 \(checkpoint\) != 12 \(model\)"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5, stage=2, n_radiomics=12), path)
    with pytest.raises(RapaclInputError, match="backbone='test_resnet' \\(checkpoint\\) != 'resnet18'"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5, stage=2, backbone="resnet18"), path)
    with pytest.raises(RapaclInputError, match="has stage=1"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5), path)
    stnet = save_checkpoint(tmp_path / "stnet.pt", create_model("stnet_tiny", n_genes=5), genes=_genes(5))
    with pytest.raises(RapaclInputError, match="'stnet_tiny', not a RaPaCL model"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5, stage=2), stnet)
    s2 = save_checkpoint(tmp_path / "s2.pt", create_model("rapacl_tiny", n_genes=5, stage=2), genes=_genes(5))
    with pytest.raises(RapaclInputError, match="is a stage 2 checkpoint"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5, stage=2), s2)
    with pytest.raises(RapaclInputError, match="no Stage 1 checkpoint given"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5, stage=2))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        init_from_stage1(create_model("rapacl_tiny", n_genes=5, stage=2), tmp_path / "nope.pt")
    named = create_model("rapacl_tiny", n_genes=5, stage=2, n_radiomics=2, radiomics_features=["a", "b"])
    src = create_model("rapacl_tiny", n_genes=5, n_radiomics=2, radiomics_features=["b", "a"])
    p = save_checkpoint(tmp_path / "named.pt", src, genes=_genes(5))
    with pytest.raises(RapaclInputError, match="radiomics_features"):
        init_from_stage1(named, p)


def test_predict_is_deterministic_and_inputs_are_validated():
    model = create_model("rapacl_tiny", n_genes=5, stage=2, dropout=0.5).eval()
    batch = _batch()
    with torch.no_grad():
        first, second = model.predict(batch), model.predict(batch)
    assert first.shape == (6, 5) and torch.equal(first, second)
    assert model.predict_inputs == ("image", "radiomics")
    with pytest.raises(RapaclInputError, match="Stage 1 model.*never trained"):
        create_model("rapacl_tiny", n_genes=5).eval().predict(batch)
    with pytest.raises(RapaclInputError, match=r"shape \(B, 72\).*got \(6, 70\)"):
        model.predict({**batch, "radiomics": batch["radiomics"][:, :70]})
    bad = batch["radiomics"].clone()
    bad[0, 3] = float("nan")
    with pytest.raises(RapaclInputError, match="1 non-finite"):
        model.predict({**batch, "radiomics": bad})
    with pytest.raises(RapaclInputError, match=r"image must have shape \(6, 3, H, W\)"):
        model.predict({**batch, "image": batch["image"][:4]})

    stage1 = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0)
    with pytest.raises(RapaclInputError, match=r"cell_label values must be in \[0, 5\).*\[7\]"):
        stage1.compute_loss({**batch, "cell_label": torch.tensor([0, 1, 7, 2, 3, 4])}, 10)
    unknown = stage1.compute_loss({**batch, "cell_label": torch.full((6,), -1)}, 10)  # -1 = no label
    assert float(unknown["cls"]) == 0 and torch.isfinite(unknown["loss"])


def test_stage1_then_stage2_learns_expression_carried_by_the_radiomics(tmp_path):
    """Images are noise; expression is a function of the radiomics -> Stage 2 must learn it.

    Like real radiomics, the 72 columns are collinear: noisy mixtures of 4 latent factors, which
    also drive the expression and the cell label.
    """
    gen = torch.Generator().manual_seed(0)
    n, f, g = 160, 72, 4
    latent = torch.randn(n, 4, generator=gen)
    rad = latent @ torch.randn(4, f, generator=gen) / 2 + 0.3 * torch.randn(n, f, generator=gen)
    rad = (rad - rad.mean(0)) / rad.std(0)
    target = torch.stack(
        [latent[:, 0] + latent[:, 1], latent[:, 2] - latent[:, 3], latent[:, 0], latent[:, 3] / 2], 1
    )
    data = {
        "image": torch.rand(n, 3, 32, 32, generator=gen),
        "radiomics": rad,
        "cell_label": (latent[:, 0] > 0).long() + (latent[:, 1] > 0).long(),
        "target": target,
    }
    train, val = range(0, 128), range(128, n)

    def batches(rng, size=32):
        order = torch.randperm(len(train), generator=rng)
        for i in range(0, len(order), size):
            idx = order[i : i + size]
            yield {k: v[idx] for k, v in data.items()}

    torch.manual_seed(0)
    stage1 = create_model("rapacl_tiny", n_genes=g, warmup_epochs=1, ramp_epochs=2, dropout=0.0)
    opt = torch.optim.AdamW(stage1.param_groups(3e-3))
    rng = torch.Generator().manual_seed(1)
    recon = []
    for epoch in range(4):
        for batch in batches(rng):
            recon.append(float(_step(stage1, opt, batch, epoch)["recon"]))
    assert recon[-1] < recon[0]
    path = save_checkpoint(tmp_path / "s1.pt", stage1, genes=_genes(g), epoch=3)

    model = create_model("rapacl_tiny", n_genes=g, stage=2, dropout=0.0)
    init_from_stage1(model, path)
    held_out = {k: v[list(val)] for k, v in data.items()}

    def val_loss():
        model.eval()
        with torch.no_grad():
            return float(model.compute_loss(held_out)["loss"])

    start = val_loss()
    opt = torch.optim.AdamW(model.param_groups(3e-3))
    for _ in range(6):
        for batch in batches(rng):
            _step(model, opt, batch, 0)
    end = val_loss()
    assert end < 0.5 * start, (start, end)


# ---------------------------------------------------------------------------------------------
# real data


def _simple_patch_features(patches: np.ndarray) -> np.ndarray:
    """Stand-in per-patch features (colour statistics) until the radiomics engine is wired in."""
    x = patches.reshape(len(patches), -1, 3).astype(np.float32) / 255
    grey = x.mean(-1)
    feats = [x.mean(1), x.std(1), np.percentile(grey, [10, 50, 90], axis=1).T, (grey < 0.5).mean(1)[:, None]]
    return np.concatenate(feats, 1)  # (n, 10)


def test_stage1_and_stage2_on_real_her2st_patches(data_dir, tmp_path):
    from napari_rapacl.datasets import her2st, her2st_genes
    from napari_rapacl.inference import images_to_tensor
    from napari_rapacl.preprocess import extract_patches, normalize_log1p_cp10k, zscore_apply, zscore_fit

    genes = her2st_genes(data_dir=data_dir)
    sec = her2st("C3", data_dir=data_dir)
    cfg = make_config("rapacl_tiny")
    patches = extract_patches(sec.slide, sec.spots.x, sec.spots.y, size=cfg.patch_size, mpp=cfg.mpp)
    feats = _simple_patch_features(patches)
    mean, std = zscore_fit(feats)
    rad = torch.from_numpy(zscore_apply(feats, mean, std).astype(np.float32))
    darkness = feats[:, -1]
    labels = np.digitize(darkness, np.quantile(darkness, [0.2, 0.4, 0.6, 0.8]))  # 5 classes
    data = {
        "image": images_to_tensor(patches),
        "radiomics": rad,
        "cell_label": torch.from_numpy(labels).long(),
        "target": torch.from_numpy(normalize_log1p_cp10k(sec.spots.counts, genes, missing="zero")),
    }
    n = len(patches)
    assert n > 100 and data["target"].shape == (n, len(genes))

    torch.manual_seed(0)
    stage1 = create_model("rapacl_tiny", n_genes=len(genes), n_radiomics=feats.shape[1], warmup_epochs=1)
    opt = torch.optim.AdamW(stage1.param_groups(1e-3))
    for epoch, start in enumerate((0, 32, 64)):
        out = _step(stage1, opt, {k: v[start : start + 32] for k, v in data.items()}, epoch)
        assert all(math.isfinite(float(v.detach())) for v in out.values()), out
    assert "mmcl" in out and "cls" in out
    path = save_checkpoint(tmp_path / "s1.pt", stage1, genes=genes)

    model = create_model("rapacl_tiny", n_genes=len(genes), n_radiomics=feats.shape[1], stage=2)
    init_from_stage1(model, path)
    opt = torch.optim.AdamW(model.param_groups(1e-3))
    for start in (0, 32, 64):
        out = _step(model, opt, {k: v[start : start + 32] for k, v in data.items()}, 0)
        assert math.isfinite(float(out["loss"].detach()))
    model.eval()
    with torch.no_grad():
        pred = model.predict({"image": data["image"][-40:], "radiomics": rad[-40:]})
    assert pred.shape == (40, len(genes)) and torch.isfinite(pred).all()


def test_rad_skip_feeds_the_radiomics_to_the_gene_head_and_loads_from_a_plain_stage1(tmp_path):
    """``rad_skip``: the gene head also sees the z-scored radiomics; a Stage 1 checkpoint without it
    still initialises the Stage 2 model (only the untrained gene head is skipped)."""
    stage1 = create_model("rapacl_tiny", n_genes=5, warmup_epochs=0)
    path = save_checkpoint(tmp_path / "s1.pt", stage1, genes=_genes(5))
    model = create_model("rapacl_tiny", n_genes=5, stage=2, rad_skip=True, dropout=0.0)
    info = init_from_stage1(model, path)
    assert info["skipped"] and all(k.startswith("gene_head.") for k in info["skipped"])
    d = model.config.embed_dim
    assert model.gene_head[0].in_features == 2 * d + 72
    for key, value in stage1.radiomics.state_dict().items():  # the radiomics branch came from Stage 1
        torch.testing.assert_close(model.radiomics.state_dict()[key], value)
    model.eval()
    batch = _batch()
    with torch.no_grad():
        base = model.predict(batch)
        # only the skip input changes: zero the head's weights on z_rad, then vary the radiomics
        model.gene_head[0].weight[:, :d].zero_()
        model.gene_head[0].weight[:, d : 2 * d].zero_()
        other = model.predict({**batch, "radiomics": batch["radiomics"] + 1.0})
    assert base.shape == (6, 5) and not torch.allclose(base, other)


def test_radiomics_ablations_remove_the_spot_radiomics():
    batch = _batch()
    shuffled = create_model("rapacl_tiny", n_genes=5, stage=2, radiomics_ablation="shuffle").eval()
    zero = create_model("rapacl_tiny", n_genes=5, stage=2, radiomics_ablation="zero").eval()
    plain = create_model("rapacl_tiny", n_genes=5, stage=2).eval()
    plain.load_state_dict(shuffled.state_dict())
    zero.load_state_dict(shuffled.state_dict())
    with torch.no_grad():
        # a batch whose radiomics rows are cyclically shifted by B/2 predicts as the plain model on them
        rolled = {**batch, "radiomics": torch.roll(batch["radiomics"], 3, dims=0)}
        torch.testing.assert_close(shuffled.predict(batch), plain.predict(rolled))
        assert not torch.allclose(shuffled.predict(batch), plain.predict(batch))
        # zero: the radiomics do not matter at all
        torch.testing.assert_close(
            zero.predict(batch), zero.predict({**batch, "radiomics": batch["radiomics"] * 5 + 2})
        )
        torch.testing.assert_close(
            zero.predict(batch), plain.predict({**batch, "radiomics": torch.zeros_like(batch["radiomics"])})
        )
    with pytest.raises(RapaclInputError, match="radiomics_ablation must be one of"):
        make_config("rapacl_tiny", radiomics_ablation="drop")
