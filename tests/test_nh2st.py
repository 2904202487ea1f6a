"""NH2ST: contract, multi-token attention, losses, neighbour indices, checkpoints, real her2st (tiny, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.models import create_model, make_config  # noqa: E402
from napari_rapacl.models.checkpoint import load_model, save_checkpoint  # noqa: E402
from napari_rapacl.models.nh2st import (  # noqa: E402
    HypergraphMix,
    nearest_spot_indices,
    symmetric_info_nce,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(b=6, k=3, g=5, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, size, size, generator=gen),
        "target": 2 * torch.rand(b, g, generator=gen),
        "neighbors": torch.rand(b, k, 3, size, size, generator=gen),
        "neighbor_target": 2 * torch.rand(b, k, g, generator=gen),
    }


def _step(model, opt, batch):
    model.train()
    out = model.compute_loss(batch, 0)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out


# ---------------------------------------------------------------------------------------------
# config and registry


def test_config_defaults_tiny_variant_and_validation():
    cfg = make_config("nh2st")
    assert (cfg.backbone, cfg.pretrained, cfg.embed_dim, cfg.k_neighbors, cfg.heads) == (
        "resnet18",
        None,
        512,
        8,
        8,
    )
    assert (cfg.temperature, cfg.learn_temperature, cfg.w_query, cfg.w_neighbor) == (0.07, False, 0.1, 0.05)
    assert cfg.n_neighbors == 8  # the name the trainer's neighbour builder reads
    tiny = make_config("nh2st_tiny")
    assert (tiny.backbone, tiny.patch_size, tiny.mpp, tiny.k_neighbors, tiny.embed_dim) == (
        "test_resnet",
        32,
        4.0,
        3,
        32,
    )
    with pytest.raises(RapaclInputError, match=r"embed_dim \(30\) must be divisible by heads \(4\)"):
        make_config("nh2st_tiny", embed_dim=30)
    with pytest.raises(RapaclInputError, match="temperature must be > 0, got 0"):
        make_config("nh2st_tiny", temperature=0)
    with pytest.raises(RapaclInputError, match="w_neighbor must be >= 0"):
        make_config("nh2st_tiny", w_neighbor=-1.0)
    with pytest.raises(RapaclInputError, match="k_neighbors must be >= 1"):
        make_config("nh2st_tiny", k_neighbors=0)
    with pytest.raises(RapaclInputError, match="unknown key.*'n_neighbors'"):
        make_config("nh2st_tiny", n_neighbors=4)  # a read-only alias, not a field


def test_create_model_from_registry_and_contract_attributes():
    model = create_model("nh2st_tiny", n_genes=5)
    assert model.model_name == "nh2st_tiny" and model.config.n_genes == 5
    assert model.required_inputs == ("image", "target", "neighbors", "neighbor_target")
    assert model.predict_inputs == ("image",)


# ---------------------------------------------------------------------------------------------
# forward, backward, determinism, inputs


@pytest.mark.parametrize("extra", [{}, {"learn_temperature": True, "graph_k": 0}])
def test_forward_backward_reaches_every_parameter(extra):
    model = create_model("nh2st_tiny", n_genes=5, **extra)
    out = model.compute_loss(_batch(), 0)
    assert {"loss", "mse", "nce_query", "nce_neighbor", "temperature"} <= set(out)
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # (timm zero-initialises each residual block's last BN, so some encoder grads are exactly 0 at init)
    zero = [
        n
        for n, p in model.named_parameters()
        if not n.startswith("encoder.") and not float(p.grad.abs().sum()) > 0
    ]
    assert not zero, zero
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert {"encoder", "img_proj", "exp_encoder", "attn_img", "attn_exp", "decoder"} <= names
    assert ("logit_scale" in names) == bool(extra.get("learn_temperature"))
    assert ("graph_img" in names) == (extra.get("graph_k", 2) > 0)


def test_loss_is_mse_plus_weighted_symmetric_infonce_on_prefusion_embeddings():
    model = create_model("nh2st_tiny", n_genes=5, dropout=0.0, w_query=0.3, w_neighbor=0.2).eval()
    batch = _batch()
    with torch.no_grad():
        out = model.compute_loss(batch, 0)
        parts = model.forward_train(batch)
        z_img = model.encode_image(batch["image"])  # the pre-fusion embeddings
        z_exp = model.encode_expression(batch["target"])
    torch.testing.assert_close(parts.z_img, z_img)
    torch.testing.assert_close(parts.z_exp, z_exp)
    mse = torch.nn.functional.mse_loss(parts.pred, batch["target"])
    nce_q = symmetric_info_nce(z_img, z_exp, 0.07)
    nce_n = symmetric_info_nce(parts.s_img, parts.s_exp, 0.07)
    assert float(out["nce_query"]) == pytest.approx(float(nce_q), rel=1e-5)
    assert float(out["nce_neighbor"]) == pytest.approx(float(nce_n), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(mse + 0.3 * nce_q + 0.2 * nce_n), rel=1e-5)
    assert float(out["temperature"]) == pytest.approx(0.07, rel=1e-6)


def test_predict_uses_only_the_image_and_is_deterministic_in_eval_mode():
    model = create_model("nh2st_tiny", n_genes=5, dropout=0.5).eval()
    batch = _batch()
    with torch.no_grad():
        full = model.predict(batch)
        image_only = model.predict({"image": batch["image"]})
        other = _batch(seed=7)
        swapped = model.predict({**other, "image": batch["image"]})  # other targets and neighbours
        again = model.predict({"image": batch["image"]})
    assert full.shape == (6, 5)
    assert torch.equal(full, image_only) and torch.equal(full, swapped) and torch.equal(full, again)
    model.train()  # dropout on: training-mode outputs differ, eval-mode ones do not
    with torch.no_grad():
        assert not torch.equal(model.predict(batch), model.predict(batch))
    with pytest.raises(RapaclInputError, match=r"needs batch\['image'\]"):
        model.predict({"target": batch["target"]})


def test_compute_loss_fails_clearly_without_neighbours_or_with_bad_shapes():
    model = create_model("nh2st_tiny", n_genes=5)
    batch = _batch()
    no_nb = {k: v for k, v in batch.items() if k != "neighbors"}
    with pytest.raises(RapaclInputError, match=r"needs batch\['neighbors'\].*K nearest spots"):
        model.compute_loss(no_nb, 0)
    no_nt = {k: v for k, v in batch.items() if k != "neighbor_target"}
    with pytest.raises(RapaclInputError, match=r"needs batch\['neighbor_target'\]"):
        model.compute_loss(no_nt, 0)
    with pytest.raises(RapaclInputError, match=r"neighbor_target must have shape \(6, 3, 5\)"):
        model.compute_loss({**batch, "neighbor_target": batch["neighbor_target"][:, :2]}, 0)
    with pytest.raises(RapaclInputError, match=r"neighbors must have shape \(6, K, 3, 32, 32\)"):
        model.compute_loss({**batch, "neighbors": batch["neighbors"][..., :16, :16]}, 0)
    with pytest.raises(RapaclInputError, match=r"target must have shape \(6, 5\)"):
        model.compute_loss({**batch, "target": batch["target"][:, :4]}, 0)
    # any K works at training (the trainer may override the config's k_neighbors)
    assert torch.isfinite(model.compute_loss(_batch(k=5), 0)["loss"])
    assert torch.isfinite(model.compute_loss(_batch(k=1), 0)["loss"])


# ---------------------------------------------------------------------------------------------
# attention and hypergraph


def test_neighbour_attention_is_a_real_multi_token_attention():
    model = create_model("nh2st_tiny", n_genes=5, dropout=0.0, k_neighbors=4).eval()
    batch = _batch(k=4)
    with torch.no_grad():
        out = model.forward_train(batch)
    heads = model.config.heads
    for w in (out.attn_img, out.attn_exp):
        assert w.shape == (6, heads, 1, 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(6, heads, 1))
        # not uniform over the K tokens (a one-token attention would be exactly 1 everywhere)
        assert float((w - 0.25).abs().max()) > 1e-3
        assert float(w.std(-1).mean()) > 1e-4
    # the weights depend on the neighbours: replacing ONE neighbour moves the weights of the others
    changed = {**batch, "neighbors": batch["neighbors"].clone()}
    changed["neighbors"][:, 0] = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out2 = model.forward_train(changed)
    assert not torch.allclose(out.attn_img[..., 1:], out2.attn_img[..., 1:])
    # no positional encoding: the summaries do not depend on the order of the neighbours
    perm = torch.tensor([2, 0, 3, 1])
    permuted = {
        **batch,
        "neighbors": batch["neighbors"][:, perm],
        "neighbor_target": batch["neighbor_target"][:, perm],
    }
    with torch.no_grad():
        out3 = model.forward_train(permuted)
    torch.testing.assert_close(out3.s_img, out.s_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out3.s_exp, out.s_exp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out3.attn_img, out.attn_img[..., perm], rtol=1e-4, atol=1e-6)


def test_hypergraph_incidence_joins_each_node_with_its_most_similar_nodes():
    tokens = torch.tensor(
        [[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.05]]]
    )  # nodes 0~1, 2~3, 4 alone
    inc = HypergraphMix.incidence(tokens, 1)  # (B, node, edge)
    assert inc.shape == (1, 5, 5)
    members = [set(torch.nonzero(inc[0, :, e]).flatten().tolist()) for e in range(5)]
    assert members[:4] == [{0, 1}, {0, 1}, {2, 3}, {2, 3}]
    assert 4 in members[4] and len(members[4]) == 2
    assert torch.equal(HypergraphMix.incidence(tokens, 0)[0], torch.eye(5))
    assert float(HypergraphMix.incidence(tokens, 99).sum()) == 25  # m capped at K - 1


# ---------------------------------------------------------------------------------------------
# InfoNCE


def test_symmetric_info_nce_matches_a_hand_computation_on_3x3():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.3, 1.0]])
    b = torch.tensor([[0.8, 0.2, 0.0], [0.0, 1.0, 0.5], [0.1, 0.0, 1.0]])
    t = 0.07

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    ua, ub = [unit(v) for v in a.tolist()], [unit(v) for v in b.tolist()]
    s = [[sum(x * y for x, y in zip(ua[i], ub[j], strict=True)) / t for j in range(3)] for i in range(3)]
    image_to_exp = [math.log(sum(math.exp(s[i][j]) for j in range(3))) - s[i][i] for i in range(3)]
    exp_to_image = [math.log(sum(math.exp(s[i][j]) for i in range(3))) - s[j][j] for j in range(3)]
    hand = 0.5 * (sum(image_to_exp) / 3 + sum(exp_to_image) / 3)
    assert float(symmetric_info_nce(a, b, t)) == pytest.approx(hand, rel=1e-5)
    assert float(symmetric_info_nce(b, a, t)) == pytest.approx(hand, rel=1e-5)  # symmetric
    # a one-directional loss would differ here (the two directions are not equal on this case)
    assert abs(sum(image_to_exp) - sum(exp_to_image)) > 1e-3
    # learnable temperature: a tensor temperature gives the same value and a gradient
    scale = torch.tensor(math.log(1 / t), requires_grad=True)
    loss = symmetric_info_nce(a, b, torch.exp(-scale))
    assert float(loss.detach()) == pytest.approx(hand, rel=1e-5)
    loss.backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0


# ---------------------------------------------------------------------------------------------
# training


def test_loss_decreases_when_overfitting_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("nh2st_tiny", n_genes=6, dropout=0.0)
    batch = _batch(b=8, g=6, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = [_step(model, opt, batch) for _ in range(20)]
    first, last = history[0], history[-1]
    assert float(last["loss"]) < 0.3 * float(first["loss"]), (first, last)
    assert float(last["mse"]) < 0.3 * float(first["mse"])
    assert float(last["nce_query"]) < float(first["nce_query"])
    assert float(last["nce_neighbor"]) < float(first["nce_neighbor"])


def test_set_target_mean_and_checkpoint_round_trip_with_weights_only(tmp_path):
    model = create_model("nh2st_tiny", n_genes=4, learn_temperature=True)
    model.set_target_mean(torch.arange(4.0))
    assert torch.equal(model.decoder[-1].bias.detach(), torch.arange(4.0))
    with pytest.raises(RapaclInputError, match=r"target mean must have shape \(4,\)"):
        model.set_target_mean(torch.zeros(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, opt, _batch(g=4))
    path = save_checkpoint(tmp_path / "nh2st.pt", model, genes=list("ABCD"), optimizer=opt, epoch=1)
    raw = torch.load(path, weights_only=True)
    assert raw["model"] == "nh2st_tiny" and raw["config"]["k_neighbors"] == 3
    assert "logit_scale" in raw["state_dict"]
    loaded, _ = load_model(path)
    assert not loaded.training and loaded.config == model.config
    assert float(loaded.temperature) == pytest.approx(float(model.temperature))
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict({"image": x}), model.predict({"image": x}))


# ---------------------------------------------------------------------------------------------
# neighbour indices


def test_nearest_spot_indices_match_brute_force_and_exclude_the_spot():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1000, 57), rng.uniform(0, 1000, 57)
    idx = nearest_spot_indices(x, y, 4, chunk=10)
    assert idx.shape == (57, 4) and idx.dtype == np.int64
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :4])
    assert not (idx == np.arange(57)[:, None]).any()
    assert (np.diff(np.take_along_axis(d, idx, 1), axis=1) >= 0).all()  # nearest first
    np.testing.assert_array_equal(nearest_spot_indices(x, y, 4), idx)  # chunking does not matter

    # a square grid: the 4 nearest of the centre are its 4 edge neighbours, ties in index order
    gx, gy = np.meshgrid(np.arange(3) * 100.0, np.arange(3) * 100.0)
    grid = nearest_spot_indices(gx.ravel(), gy.ravel(), 4)
    assert grid[4].tolist() == [1, 3, 5, 7]
    assert grid[0].tolist() == [1, 3, 4, 2]

    # the same table as the trainer's builder (training.data.nearest_neighbors)
    data = pytest.importorskip("training.data")
    np.testing.assert_array_equal(data.nearest_neighbors(x, y, 4), idx)


def test_nearest_spot_indices_errors():
    with pytest.raises(RapaclInputError, match="3 neighbours requested but there are only 3 spots"):
        nearest_spot_indices([0, 1, 2], [0, 0, 0], 3)
    with pytest.raises(RapaclInputError, match="must be >= 1"):
        nearest_spot_indices([0, 1], [0, 0], 0)
    with pytest.raises(RapaclInputError, match="same length"):
        nearest_spot_indices([0, 1], [0], 1)
    with pytest.raises(RapaclInputError, match="NaN"):
        nearest_spot_indices([0, np.nan], [0, 0], 1)


# ---------------------------------------------------------------------------------------------
# real data


def test_trains_and_predicts_on_real_her2st_patches(data_dir):
    from napari_rapacl.datasets import her2st, her2st_genes
    from napari_rapacl.inference import images_to_tensor
    from napari_rapacl.preprocess import extract_patches, normalize_log1p_cp10k

    genes = her2st_genes(data_dir=data_dir)
    sec = her2st("C3", data_dir=data_dir)
    cfg = make_config("nh2st_tiny")
    patches = images_to_tensor(
        extract_patches(sec.slide, sec.spots.x, sec.spots.y, size=cfg.patch_size, mpp=cfg.mpp)
    )
    target = torch.from_numpy(normalize_log1p_cp10k(sec.spots.counts, genes, missing="zero"))
    n = len(patches)
    assert n > 100 and target.shape == (n, len(genes))
    nb = torch.from_numpy(nearest_spot_indices(sec.spots.x, sec.spots.y, cfg.k_neighbors))
    # her2st spots sit on a ~200 um grid (ST): the nearest spots are the grid neighbours
    gap_um = (
        np.hypot(sec.spots.x[nb[:, 0]] - sec.spots.x, sec.spots.y[nb[:, 0]] - sec.spots.y) * sec.slide.mpp
    )
    assert 150 < np.median(gap_um) < 250

    torch.manual_seed(0)
    model = create_model("nh2st_tiny", n_genes=len(genes))
    model.set_target_mean(target[:120].mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        idx = torch.randperm(120, generator=gen)[:16]
        batch = {
            "image": patches[idx],
            "target": target[idx],
            "neighbors": patches[nb[idx]],
            "neighbor_target": target[nb[idx]],
        }
        out = _step(model, opt, batch)
        assert all(math.isfinite(float(v)) for v in out.values()), out
    model.eval()
    with torch.no_grad():
        pred = model.predict({"image": patches[120:]})
    assert pred.shape == (n - 120, len(genes)) and torch.isfinite(pred).all()
