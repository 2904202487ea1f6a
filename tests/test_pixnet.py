"""PixNet: pyramid/decoder, disc aggregation in count space, spot-size consistency, loss, real her2st."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.models import create_model, make_config  # noqa: E402
from napari_rapacl.models.checkpoint import load_model, save_checkpoint  # noqa: E402
from napari_rapacl.models.pixnet import (  # noqa: E402
    counts_to_log1p_cp10k,
    disc_weights,
    pcc_loss,
    upsample_matrix,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(b=6, g=5, size=32, radius=10.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, size, size, generator=gen),
        "target": 2 * torch.rand(b, g, generator=gen),
        "radius_px": torch.full((b,), float(radius)),
    }


def _step(model, opt, batch):
    model.train()
    out = model.compute_loss(batch, 0)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out


def _pred(model, image, radius):
    with torch.no_grad():
        return model.predict({"image": image, "radius_px": torch.full((len(image),), float(radius))})


def _centre_disc_image(size):
    """Left half dark, right half light, a pink disc of radius size/8 in the centre."""
    img = torch.full((1, 3, size, size), 0.2)
    img[..., size // 2 :] = 0.9
    c = torch.arange(size) + 0.5 - size / 2
    inside = (c[:, None] ** 2 + c[None, :] ** 2) < (size / 8) ** 2
    img[:, :, inside] = torch.tensor([0.8, 0.2, 0.5]).view(1, 3, 1)
    return img


# ---------------------------------------------------------------------------------------------
# config, registry, architecture


def test_config_defaults_tiny_variant_and_validation():
    cfg = make_config("pixnet")
    assert (cfg.backbone, cfg.hidden, cfg.out_indices, cfg.ffn_kernel, cfg.pcc_weight) == (
        "resnet18",
        512,
        (1, 2, 3, 4),
        3,
        0.5,
    )
    tiny = make_config("pixnet_tiny")
    assert (tiny.backbone, tiny.patch_size, tiny.mpp, tiny.hidden) == ("test_resnet", 32, 4.0, 32)
    assert make_config("pixnet_tiny", out_indices=[2, 3]).out_indices == (2, 3)  # YAML gives lists
    with pytest.raises(RapaclInputError, match=r"strictly increasing.*\[3, 2\]"):
        make_config("pixnet_tiny", out_indices=[3, 2])
    with pytest.raises(RapaclInputError, match="ffn_kernel must be 1 or 3, got 5"):
        make_config("pixnet_tiny", ffn_kernel=5)
    with pytest.raises(RapaclInputError, match="pcc_weight must be >= 0"):
        make_config("pixnet_tiny", pcc_weight=-0.5)


def test_decoder_is_sized_from_the_backbone_feature_info():
    model = create_model("pixnet_tiny", n_genes=5)
    assert model.model_name == "pixnet_tiny"
    assert model.required_inputs == ("image", "target", "radius_px")
    assert model.predict_inputs == ("image", "radius_px")
    info = model.encoder.feature_info
    assert [s.in_channels for s in model.skips] == list(info.channels()) == [32, 48, 192, 96]
    assert all(s.out_channels == 32 for s in model.skips)
    assert len(model.stages) == 3 and model.output_stride == 4
    assert all(isinstance(s.up, torch.nn.ConvTranspose2d) and s.up.stride == (2, 2) for s in model.stages)
    assert all(float(s.delta.detach()) == 1.0 for s in model.stages)
    assert model.head.out_channels == 5 + 1  # genes + "all other genes"
    with torch.no_grad():
        assert model.density(torch.rand(2, 3, 32, 32)).shape == (2, 6, 8, 8)
        assert model.density(torch.rand(2, 3, 30, 30)).shape == (2, 6, 8, 8)  # odd sizes are cropped

    three = create_model("pixnet_tiny", n_genes=5, out_indices=(2, 3, 4), ffn_kernel=1)
    assert three.output_stride == 8 and len(three.stages) == 2
    assert [s.in_channels for s in three.skips] == [48, 192, 96]
    assert isinstance(three.stages[0].ffn.dw, torch.nn.Identity)
    with torch.no_grad():
        assert three.density(torch.rand(2, 3, 32, 32)).shape == (2, 6, 4, 4)
        assert three.predict(_batch(b=2)).shape == (2, 5)


def test_forward_backward_reaches_every_parameter_and_eval_is_deterministic():
    model = create_model("pixnet_tiny", n_genes=5)
    out = model.compute_loss(_batch(), 0)
    assert set(out) == {"loss", "mse", "pcc"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for stage in model.stages:
        assert float(stage.delta.grad.abs()) > 0
    model.eval()
    batch = _batch()
    with torch.no_grad():
        first = model.predict(batch)
        assert first.shape == (6, 5) and torch.equal(first, model.predict(batch))
        no_target = model.predict({"image": batch["image"], "radius_px": batch["radius_px"]})
    assert torch.equal(first, no_target)


# ---------------------------------------------------------------------------------------------
# aggregation


def test_upsample_matrix_and_disc_weights():
    z = torch.randn(2, 4, 8, 5)
    up = F.interpolate(z, size=(32, 19), mode="bilinear", align_corners=False)
    a_h, a_w = upsample_matrix(32, 8), upsample_matrix(19, 5)
    torch.testing.assert_close(a_h @ z @ a_w.T, up, rtol=1e-5, atol=1e-5)
    for r in (1.0, 3.0, 8.0, 15.0):
        w = disc_weights(32, 32, r)
        assert float(w.sum()) == pytest.approx(math.pi * r * r, rel=0.03), r
        assert float(w.max()) == pytest.approx(min(1.0, r + 0.5 - math.sqrt(0.5))) and float(w.min()) == 0.0
        torch.testing.assert_close(w, w.flip(0))  # centred
        torch.testing.assert_close(w, w.T)
    assert float(disc_weights(32, 32, 0.5).sum()) > 0  # the smallest accepted radius covers pixels


def test_prediction_equals_the_full_resolution_disc_sum_of_the_dense_map():
    model = create_model("pixnet_tiny", n_genes=5).eval()
    image = torch.rand(3, 3, 32, 32)
    radius = torch.tensor([3.0, 7.5, 16.0])
    with torch.no_grad():
        pred = model.predict({"image": image, "radius_px": radius})
        dens = F.interpolate(model.density(image), size=(32, 32), mode="bilinear", align_corners=False)
        disc = torch.stack([disc_weights(32, 32, float(r)) for r in radius])
        counts = (dens * disc[:, None]).sum((-2, -1)) * model.config.mpp**2
        torch.testing.assert_close(pred, counts_to_log1p_cp10k(counts), rtol=1e-4, atol=1e-5)
        # predict_map(kind="density") is that map (without the rest channel)
        torch.testing.assert_close(model.predict_map(image, kind="density"), dens[:, :5])


def test_count_space_aggregation_is_consistent_across_spot_sizes():
    """Uniform tissue: the same prediction for a small and a large spot; a structured map: not."""
    model = create_model("pixnet_tiny", n_genes=3).eval()
    uniform = torch.tensor([4.0, 1.0, 0.5, 20.0]).view(1, 4, 1, 1).expand(1, 4, 8, 8)
    small = counts_to_log1p_cp10k(model.spot_counts(uniform, 4.0, (32, 32)))
    large = counts_to_log1p_cp10k(model.spot_counts(uniform, 15.0, (32, 32)))
    torch.testing.assert_close(small, large, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small[0], torch.log1p(1e4 * torch.tensor([4.0, 1.0, 0.5]) / 25.5))
    # ... whereas counts (and a plain sum of a log map) grow with the disc area
    c_small = model.spot_counts(uniform, 4.0, (32, 32))
    c_large = model.spot_counts(uniform, 15.0, (32, 32))
    assert float(c_large[0, 0] / c_small[0, 0]) == pytest.approx((15 / 4) ** 2, rel=0.05)
    # gene 0 is made only in a central disc of radius 2 stride px = 8 px: small spots see more of it
    structured = uniform.clone()
    c = torch.arange(8) + 0.5 - 4
    structured[0, 0] = 4.0 * ((c[:, None] ** 2 + c[None, :] ** 2) < 4).float()
    by_radius = [
        float(counts_to_log1p_cp10k(model.spot_counts(structured, r, (32, 32)))[0, 0]) for r in (3, 8, 15)
    ]
    assert by_radius[0] > by_radius[1] + 0.1 > by_radius[2] + 0.6, by_radius


def test_model_on_a_constant_image_gives_the_same_prediction_for_any_radius():
    torch.manual_seed(0)
    model = create_model("pixnet_tiny", n_genes=20, patch_size=64).eval()
    flat = torch.full((1, 3, 64, 64), 0.7)
    preds = {r: _pred(model, flat, r) for r in (4.0, 8.0, 12.0)}
    spread = max(float((preds[r] - preds[4.0]).abs().max()) for r in preds)
    # equal up to the convolutions' zero padding near the patch border (a sum would differ by ~2.2)
    assert spread < 0.02, spread
    assert math.log((12 / 4) ** 2) > 100 * spread
    # the same radii on a structured image (a disc on a half-dark image) change the prediction
    img = _centre_disc_image(64)
    structured = {r: _pred(model, img, r) for r in (4.0, 8.0, 12.0)}
    change = max(float((structured[r] - structured[4.0]).abs().max()) for r in structured)
    assert change > 3 * spread, (change, spread)


def test_radius_handling_beyond_the_patch_and_below_half_a_pixel():
    model = create_model("pixnet_tiny", n_genes=5).eval()
    image = torch.rand(2, 3, 32, 32)
    with pytest.raises(RapaclInputError, match=r"radius_px 20 is larger than the patch's half side \(16 px"):
        _pred(model, image, 20.0)
    with pytest.raises(RapaclInputError, match="radius_px 0.3 is below 0.5 px"):
        _pred(model, image, 0.3)
    with pytest.raises(RapaclInputError, match="NaN or infinite"):
        _pred(model, image, float("nan"))
    with pytest.raises(RapaclInputError, match=r"one radius per image \(2\), got 3"):
        model.predict({"image": image, "radius_px": torch.ones(3) * 4})
    with pytest.raises(RapaclInputError, match=r"needs batch\['radius_px'\]"):
        model.predict({"image": image})
    with pytest.raises(RapaclInputError, match="needs the spot radius"):
        model(image)
    # a scalar radius is broadcast
    with torch.no_grad():
        torch.testing.assert_close(
            model.predict({"image": image, "radius_px": 6.0}), _pred(model, image, 6.0)
        )
    assert torch.equal(_pred(model, image, 16.0), _pred(model, image, 16.0))  # half side: allowed

    clipped = create_model("pixnet_tiny", n_genes=5, clip_radius=True).eval()
    clipped.load_state_dict(model.state_dict())
    whole = _pred(clipped, image, 100.0)  # every pixel covered ...
    torch.testing.assert_close(whole, _pred(clipped, image, 23.2))  # ... as by the corner-reaching disc
    assert not torch.allclose(whole, _pred(clipped, image, 12.0))


def test_masks_built_under_inference_mode_do_not_break_a_later_training_step():
    model = create_model("pixnet_tiny", n_genes=5)
    batch = _batch()
    model.eval()
    with torch.inference_mode():
        model.predict(batch)  # caches the radius-10 weights
    model.train()
    model.compute_loss(batch, 0)["loss"].backward()
    assert model.head.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# loss, head initialisation, dense map


def test_pcc_loss_matches_numpy_and_skips_constant_genes():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)
    target[:, 2] = 0.0  # constant in the batch: no correlation defined
    loss, n_valid = pcc_loss(pred, target)
    r = [np.corrcoef(pred[:, g].numpy(), target[:, g].numpy())[0, 1] for g in (0, 1, 3)]
    assert n_valid == 3 and float(loss) == pytest.approx(1 - np.mean(r), rel=1e-5)
    assert float(pcc_loss(target[:, [0, 1]], target[:, [0, 1]])[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(pcc_loss(-target[:, [0, 1]], target[:, [0, 1]])[0]) == pytest.approx(2.0, abs=1e-6)
    assert pcc_loss(pred[:1], target[:1])[1] == 0 and pcc_loss(pred, torch.zeros(10, 4))[1] == 0

    model = create_model("pixnet_tiny", n_genes=5, pcc_weight=0.5).eval()
    batch = _batch()
    with torch.no_grad():
        out = model.compute_loss(batch, 0)
        pred = model.predict(batch)
    mse = F.mse_loss(pred, batch["target"])
    one_minus_r, _ = pcc_loss(pred, batch["target"])
    assert float(out["loss"]) == pytest.approx(float(mse + 0.5 * one_minus_r), rel=1e-5)
    assert float(out["pcc"]) == pytest.approx(1 - float(one_minus_r), rel=1e-5)


def test_set_target_mean_makes_a_flat_head_predict_the_mean_for_any_image_and_radius():
    model = create_model("pixnet_tiny", n_genes=4).eval()
    mean = torch.tensor([0.0, 0.5, 2.0, 4.0])
    model.set_target_mean(mean)
    with torch.no_grad():
        model.head.weight.zero_()  # the map is then the same everywhere
    image = torch.rand(2, 3, 32, 32)
    for r in (2.0, 9.0, 16.0):
        torch.testing.assert_close(_pred(model, image, r), mean.expand(2, 4), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        dense = model.predict_map(image)
    assert dense.shape == (2, 4, 32, 32)
    torch.testing.assert_close(dense, mean.view(1, 4, 1, 1).expand(2, 4, 32, 32), rtol=1e-4, atol=1e-4)
    with pytest.raises(RapaclInputError, match=r"target mean must have shape \(4,\)"):
        model.set_target_mean(torch.zeros(5))
    with pytest.raises(RapaclInputError, match="kind must be 'expression' or 'density'"):
        model.predict_map(image, kind="counts")


# ---------------------------------------------------------------------------------------------
# training, checkpoints


def test_loss_decreases_when_overfitting_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("pixnet_tiny", n_genes=6)
    batch = _batch(b=8, g=6, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = [_step(model, opt, batch) for _ in range(20)]
    first, last = history[0], history[-1]
    assert float(last["loss"]) < 0.2 * float(first["loss"]), (first, last)
    assert float(last["pcc"]) > 0.8 > float(first["pcc"])


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = create_model("pixnet_tiny", n_genes=4, out_indices=[1, 2, 3, 4])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, opt, _batch(g=4))
    path = save_checkpoint(tmp_path / "pixnet.pt", model, genes=list("ABCD"), optimizer=opt, epoch=1)
    raw = torch.load(path, weights_only=True)
    assert raw["model"] == "pixnet_tiny" and list(raw["config"]["out_indices"]) == [1, 2, 3, 4]
    loaded, _ = load_model(path)
    assert not loaded.training and loaded.config == model.config
    model.eval()
    batch = _batch(b=3, g=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(batch), model.predict(batch))


# ---------------------------------------------------------------------------------------------
# real data


def test_trains_and_predicts_on_real_her2st_patches(data_dir):
    from napari_rapacl.datasets import her2st, her2st_genes
    from napari_rapacl.inference import images_to_tensor
    from napari_rapacl.preprocess import extract_patches, normalize_log1p_cp10k

    genes = her2st_genes(data_dir=data_dir)
    sec = her2st("C3", data_dir=data_dir)
    cfg = make_config("pixnet_tiny")
    patches = images_to_tensor(
        extract_patches(sec.slide, sec.spots.x, sec.spots.y, size=cfg.patch_size, mpp=cfg.mpp)
    )
    target = torch.from_numpy(normalize_log1p_cp10k(sec.spots.counts, genes, missing="zero"))
    radius = torch.from_numpy(sec.spots.radius * sec.slide.mpp / cfg.mpp).float()  # patch px
    n = len(patches)
    assert n > 100 and target.shape == (n, len(genes))
    assert float(radius.median()) == pytest.approx(12.5, rel=0.05)  # ST spots: 50 um radius at 4 um/px

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", n_genes=len(genes))
    model.set_target_mean(target[:120].mean(0))
    model.eval()
    with torch.no_grad():  # starts near the training mean
        start = model.predict({"image": patches[:8], "radius_px": radius[:8]})
    assert float((start.mean(0) - target[:120].mean(0)).abs().mean()) < 0.3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        idx = torch.randperm(120, generator=gen)[:16]
        out = _step(model, opt, {"image": patches[idx], "target": target[idx], "radius_px": radius[idx]})
        assert all(math.isfinite(float(v)) for v in out.values()), out
    model.eval()
    with torch.no_grad():
        pred = model.predict({"image": patches[120:], "radius_px": radius[120:]})
        dense = model.predict_map(patches[120:122])
    assert pred.shape == (n - 120, len(genes)) and torch.isfinite(pred).all()
    assert dense.shape == (2, len(genes), 32, 32) and torch.isfinite(dense).all()
