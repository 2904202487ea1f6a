"""Model registry, checkpoints and the spot inference generator (tiny variants on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_rapacl._errors import CorruptFileError, RapaclInputError  # noqa: E402
from napari_rapacl.models import create_model, list_models, make_config  # noqa: E402
from napari_rapacl.models.checkpoint import config_path_for, load_model, save_checkpoint  # noqa: E402


def test_registry_lists_models_and_builds_every_one():
    names = list_models()
    assert {"stnet", "stnet_tiny"} <= set(names)
    for name in names:
        model = create_model(name, n_genes=5, backbone="test_resnet", patch_size=32)
        out = model(torch.rand(2, 3, 32, 32))
        assert out.shape == (2, 5)
        out.sum().backward()  # backward works through every parameter that requires grad
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert model.model_name == name and model.config.n_genes == 5


def test_unknown_model_and_unknown_config_keys_are_clear_errors():
    with pytest.raises(RapaclInputError, match="unknown model 'nope'.*stnet"):
        create_model("nope")
    with pytest.raises(RapaclInputError, match="unknown key.*'n_gene'"):
        make_config("stnet", n_gene=3)
    with pytest.raises(RapaclInputError, match="mpp"):
        make_config("stnet", mpp=0)


def test_hub_weights_are_refused_offline_without_hanging(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RapaclInputError, match="offline"):
        create_model("stnet_tiny", pretrained="hub")
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        create_model("stnet_tiny", pretrained="no_such_weights.pth")


def test_local_pretrained_file_is_loaded(tmp_path):
    donor = create_model("stnet_tiny", n_genes=3)
    weights = tmp_path / "encoder.pth"
    torch.save(donor.encoder.state_dict(), weights)
    model = create_model("stnet_tiny", n_genes=3, pretrained=str(weights))
    for key, value in donor.encoder.state_dict().items():
        if key.startswith("fc"):
            continue
        assert torch.equal(model.encoder.state_dict()[key], value), key


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = create_model("stnet_tiny", n_genes=4)
    genes = ["A", "B", "C", "D"]
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path / "m.pt", model, genes=genes, optimizer=opt, epoch=3)
    raw = torch.load(path, weights_only=True)  # must not need pickled code
    assert raw["genes"] == genes and raw["epoch"] == 3 and raw["model"] == "stnet_tiny"
    assert config_path_for(path).read_text().startswith("model: stnet_tiny")
    loaded, payload = load_model(path)
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert not loaded.training
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptFileError, match="bad.pt"):
        load_model(bad)
    model = create_model("stnet_tiny", n_genes=2)
    with pytest.raises(RapaclInputError, match="3 gene names"):
        save_checkpoint(tmp_path / "x.pt", model, genes=["a", "b", "c"])


def test_inference_is_deterministic_in_eval_mode():
    model = create_model("stnet_tiny", n_genes=3, dropout=0.5).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def _synthetic_slide(tmp_path, size=1024, mpp=1.0):
    """A slide whose red channel rises left to right: a gene that follows it is learnable."""
    from napari_rapacl.io import open_slide, write_ome_tiff

    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 255 // size), np.full_like(xx, 120), (yy * 255 // size)], -1).astype(np.uint8)
    path = write_ome_tiff(tmp_path / "synthetic.ome.tif", img, mpp=mpp, tile=256)
    return open_slide(path)


def test_fit_learns_a_learnable_gene_and_inference_generator_reports_progress(tmp_path):
    from napari_rapacl.inference import Progress, iter_predict_spots
    from napari_rapacl.metrics import pearson_per_gene
    from napari_rapacl.models.fit import fit_patch_regressor
    from napari_rapacl.preprocess import extract_patches

    slide = _synthetic_slide(tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(64, 960, 160), rng.uniform(64, 960, 160)
    targets = np.stack([x / 1024, y / 1024, rng.normal(size=160)], 1).astype(np.float32)
    model = create_model("stnet_tiny", n_genes=3, patch_size=32, mpp=2.0)
    patches = extract_patches(slide, x, y, size=32, mpp=2.0)
    fit = fit_patch_regressor(
        model, patches[:120], targets[:120], patches[120:], targets[120:], epochs=8, lr=3e-3, augment=False
    )
    assert len(fit.history) == 8 and 0 <= fit.best_epoch < 8

    gen = iter_predict_spots(model, slide, x[120:], y[120:], batch_size=16, device="cpu")
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        pred = stop.value
    assert all(isinstance(s, Progress) for s in steps)
    assert [s.done for s in steps] == [0, 16, 32, 40]
    r = pearson_per_gene(pred, targets[120:])
    assert r[0] > 0.5 and r[1] > 0.5, r  # position-coded genes are learned from colour
    assert abs(np.nan_to_num(r[2])) < 0.5  # noise is not
