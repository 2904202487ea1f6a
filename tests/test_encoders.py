"""Foundation encoders offline: hf-hub names built from timm's architecture + a local weights file,
frozen encoders, and the frozen-encoder probe with its embedding cache (issue #12 item 2)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.models import backbones as bb  # noqa: E402
from napari_rapacl.models import create_model  # noqa: E402

#: a small ViT of the UNI family (same timm class and keyword arguments, tiny width)
TINY_UNI = "hf-hub:test-lab/tiny-uni"
TINY_KWARGS = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}


@pytest.fixture()
def tiny_uni(tmp_path, monkeypatch):
    """Register a tiny UNI-like family and write its weights file (what a user downloads)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NAPARI_RAPACL_ENCODERS_DIR", str(tmp_path / "encoders"))
    monkeypatch.setitem(
        bb.FOUNDATION_ENCODERS,
        TINY_UNI,
        bb.EncoderFamily(TINY_UNI, "vit_tiny_patch16_224", TINY_KWARGS, "test family", "https://example.org"),
    )
    torch.manual_seed(123)
    donor = timm.create_model("vit_tiny_patch16_224", **TINY_KWARGS)  # with a classifier, like many files
    path = tmp_path / "pytorch_model.bin"
    torch.save(donor.state_dict(), path)
    return donor, path


def test_every_foundation_family_resolves_to_a_timm_architecture():
    for name, family in bb.FOUNDATION_ENCODERS.items():
        arch, kwargs = bb.resolve_architecture(name)
        assert arch in timm.list_models(), (name, arch)
        assert all(not (isinstance(v, str) and v.startswith("timm:")) for v in kwargs.values())
        assert family.url.startswith("https://") and family.note
    assert bb.resolve_architecture("hf-hub:timm/vit_small_patch16_224.dino") == ("vit_small_patch16_224", {})


def test_hf_hub_encoder_is_built_offline_from_a_local_weights_file(tiny_uni):
    donor, path = tiny_uni
    model = create_model("stnet", n_genes=4, backbone=TINY_UNI, pretrained=str(path), patch_size=48, mpp=2.0)
    own = model.encoder.state_dict()
    for key, value in donor.state_dict().items():
        if key.startswith("head."):
            assert key not in own  # the classifier of the file is dropped (num_classes=0)
            continue
        assert torch.equal(own[key], value), key
    with torch.no_grad():  # dynamic_img_size: any multiple of the ViT patch, here 48 px
        assert model.eval()(torch.rand(2, 3, 48, 48)).shape == (2, 4)


def test_weights_placed_in_the_encoder_folder_are_found_for_pretrained_hub(tiny_uni, tmp_path):
    donor, path = tiny_uni
    with pytest.raises(RapaclInputError) as info:
        bb.create_backbone(TINY_UNI, "hub", num_classes=0)
    msg = str(info.value)
    placed = tmp_path / "encoders" / "test-lab" / "tiny-uni" / "pytorch_model.bin"
    assert "offline" in msg and str(placed) in msg and "https://example.org" in msg
    placed.parent.mkdir(parents=True)
    placed.write_bytes(path.read_bytes())
    enc = bb.create_backbone(TINY_UNI, "hub", num_classes=0)
    assert torch.equal(enc.pos_embed, donor.pos_embed)


def test_a_weights_file_of_another_architecture_is_refused(tiny_uni, tmp_path):
    other = tmp_path / "resnet.bin"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    with pytest.raises(RapaclInputError, match=r"resnet.bin does not hold the weights of backbone.*tiny-uni"):
        bb.create_backbone(TINY_UNI, str(other), num_classes=0)
    with pytest.raises(FileNotFoundError, match="nope.bin.*download its weights file"):
        bb.create_backbone(TINY_UNI, str(tmp_path / "nope.bin"), num_classes=0)
    with pytest.raises(RapaclInputError, match="not reachable.*vit_large_patch16_224"):
        bb.create_backbone("hf-hub:unknown/encoder", None, num_classes=0)


@pytest.mark.parametrize("name", ["stnet_tiny", "nh2st_tiny", "rapacl_tiny", "pixnet_tiny"])
def test_freeze_backbone_really_freezes_the_encoder(name):
    from tests.test_models import make_batch

    extra = {"stage": 2} if name.startswith("rapacl") else {}
    model = create_model(name, n_genes=5, freeze_backbone=True, **extra)
    assert model.config.freeze_backbone and bb.is_frozen(model.encoder)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}  # BN running stats included
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.1)
    model.train()
    loss = model.compute_loss(make_batch(model), epoch=100)["loss"]
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None for p in trainable)  # the rest of the model learns
    assert not model.encoder.training  # kept in eval mode through model.train()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    unfrozen = create_model(name, n_genes=5, **extra)
    assert all(p.requires_grad for p in unfrozen.encoder.parameters())


def test_frozen_foundation_encoder_survives_a_checkpoint_round_trip(tiny_uni, tmp_path):
    from napari_rapacl.models.checkpoint import load_model, save_checkpoint

    _, path = tiny_uni
    model = create_model(
        "stnet", n_genes=3, backbone=TINY_UNI, pretrained=str(path), patch_size=32, mpp=2.0,
        freeze_backbone=True,
    )  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "m.pt", model, genes=["A", "B", "C"])
    path.unlink()  # the weights now come from the checkpoint, not the original file
    loaded, payload = load_model(ckpt)
    assert payload["config"]["freeze_backbone"] and bb.is_frozen(loaded.encoder)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), loaded(x))
