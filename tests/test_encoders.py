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


def test_probe_head_learns_on_cached_embeddings_of_a_frozen_encoder(tmp_path):
    from napari_rapacl.models import probe

    model = create_model("probe_tiny", n_genes=3, embedding_cache=str(tmp_path / "emb"))
    assert bb.is_frozen(model.encoder) and not any(p.requires_grad for p in model.encoder.parameters())
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = dict(probe.CACHE_STATS)
    first = model.embed(images)
    assert probe.CACHE_STATS["computed"] - before["computed"] == 6
    again = model.embed(images)
    assert probe.CACHE_STATS["hits"] - before["hits"] == 6 and torch.equal(first, again)
    model.train()  # flushes a shard to disk
    shards = list((tmp_path / "emb").glob("*/shard-*.npz"))
    assert len(shards) == 1 and (shards[0].parent / "meta.json").is_file()
    # another model with the same encoder weights reads the shard: nothing is computed
    twin = create_model("probe_tiny", n_genes=3, embedding_cache=str(tmp_path / "emb"))
    twin.encoder.load_state_dict(model.encoder.state_dict())
    mark = dict(probe.CACHE_STATS)
    assert torch.equal(twin.embed(images), first) and probe.CACHE_STATS["computed"] == mark["computed"]
    # other encoder weights: another cache identity, never the stale embeddings
    torch.manual_seed(99)
    other = create_model("probe_tiny", n_genes=3, embedding_cache=str(tmp_path / "emb"))
    other.embed(images)
    assert probe.CACHE_STATS["computed"] == mark["computed"] + 6
    # a damaged shard is ignored (recomputed), not trusted
    shards[0].write_bytes(b"garbage")
    fresh = create_model("probe_tiny", n_genes=3, embedding_cache=str(tmp_path / "emb"))
    fresh.encoder.load_state_dict(model.encoder.state_dict())
    assert torch.equal(fresh.embed(images), first)


def test_probe_config_refuses_an_unfrozen_encoder_and_unknown_heads():
    from napari_rapacl.models import make_config

    with pytest.raises(RapaclInputError, match="freeze_backbone must be true"):
        make_config("probe", freeze_backbone=False)
    with pytest.raises(RapaclInputError, match="head must be one of ridge, mlp"):
        make_config("probe", head="svm")


@pytest.mark.realdata
def test_probe_trains_through_training_run_reuses_its_cache_and_installs(
    tiny_uni, tmp_path, data_dir, monkeypatch
):
    """The probe YAML with a tiny UNI-family encoder: trained by training.run on real her2st spots
    (47 per section), the second run hits the embedding cache for every patch, best.pt stores the
    per-gene validation r, predicts through load_model, and run.install_as lists it by name."""
    import math
    from pathlib import Path

    from training.config import load_config
    from training.run import train

    from napari_rapacl.jobs import installed_models, load_model_choice, user_models
    from napari_rapacl.models import probe
    from napari_rapacl.models.checkpoint import load_model

    _, weights = tiny_uni
    monkeypatch.setenv("NAPARI_RAPACL_MODELS_DIR", str(tmp_path / "models"))
    torch.set_num_threads(1)
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "probe_her2st.yaml"
    common = [
        f"data.data_dir={data_dir}",
        f"data.cache_dir={tmp_path / 'patches'}",
        "data.train=[C3,C5]",
        "data.val=[C4]",
        "data.test=[C2]",
        "data.max_spots=47",
        f"model.config.backbone={TINY_UNI}",
        f"model.config.pretrained={weights}",
        f"model.config.embedding_cache={tmp_path / 'emb'}",
        "model.config.patch_size=32",
        "model.config.mpp=4.0",
        "optim.epochs=3",
        "optim.batch_size=16",
        "run.device=cpu",
    ]
    start = dict(probe.CACHE_STATS)
    first = train(
        load_config(config, [*common, f"run.out_dir={tmp_path / 'run1'}", "run.install_as=probe-test"])
    )
    n_patches = 4 * 47  # C3, C5, C4, C2
    assert probe.CACHE_STATS["computed"] - start["computed"] == n_patches  # each patch encoded once
    assert len(first.history) == 3 and math.isfinite(first.best_score)
    mark = dict(probe.CACHE_STATS)
    second = train(load_config(config, [*common, f"run.out_dir={tmp_path / 'run2'}"]))
    assert probe.CACHE_STATS["computed"] == mark["computed"]  # the second run: all from the cache
    # 3 epochs x (94 training + 47 validation patches) + the final validation and test (47 + 47)
    # + the validation predictions the spot smoothing is chosen on (47)
    assert probe.CACHE_STATS["hits"] - mark["hits"] == 3 * (94 + 47) + 47 + 47 + 47
    assert second.best_score == pytest.approx(first.best_score, abs=1e-5)
    model, payload = load_model(tmp_path / "run1" / "best.pt")
    rel = payload["gene_reliability"]
    assert rel["section"] == ["C4"] and len(rel["values"]) == 785 == len(model.gene_reliability)
    finite = [v for v in rel["values"] if math.isfinite(v)]
    # the r of the smoothed validation predictions (the chosen width's score; NaN counted as 0 there)
    post = payload["postprocess"]
    chosen = post["val_pcc_by_sigma"][f"{post['smooth_sigma_um']:g}"]
    assert sum(finite) / 785 == pytest.approx(chosen, abs=1e-5)
    assert payload["config"]["backbone"] == TINY_UNI and payload["config"]["freeze_backbone"]
    with torch.no_grad():
        assert model.predict({"image": torch.rand(2, 3, 32, 32)}).shape == (2, 785)
    assert user_models()[0] == "probe-test"
    card = installed_models()["probe-test"]
    assert card["model"] == "probe" and card["training"]["val"] == ["C4"] and card["n_genes"] == 785
    assert load_model_choice("probe-test", None).gene_reliability is not None


def test_an_encoder_trained_with_its_own_mean_and_std_gets_its_normalisation(tiny_uni, monkeypatch):
    """The models feed ImageNet-normalised images; a family with its own mean/std (H-optimus-0)
    sees its own normalisation of the same pixels."""
    _, path = tiny_uni
    mean, std = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
    hoptimus = bb.FOUNDATION_ENCODERS["hf-hub:bioptimus/H-optimus-0"]
    assert (hoptimus.mean, hoptimus.std) == (mean, std)
    own = bb.EncoderFamily("hf-hub:test/own-norm", "vit_tiny_patch16_224", TINY_KWARGS, mean=mean, std=std)
    monkeypatch.setitem(bb.FOUNDATION_ENCODERS, own.hub, own)
    enc = bb.create_backbone(own.hub, str(path), num_classes=0).eval()
    plain = bb.create_backbone(TINY_UNI, str(path), num_classes=0).eval()

    def normalise(x, m, s):
        return (x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)

    rgb = torch.rand(2, 3, 32, 32)
    imagenet, theirs = normalise(rgb, bb.IMAGENET_MEAN, bb.IMAGENET_STD), normalise(rgb, mean, std)
    with torch.no_grad():  # (layer scale 1e-5 at random init: outputs move little with the input)
        good = float((enc(imagenet) - plain(theirs)).abs().max())
        bad = float((enc(imagenet) - plain(imagenet)).abs().max())
    assert good < 1e-5 and bad > 1e-6 and bad > 20 * good
