"""Model registry, checkpoints and the spot inference generator (tiny variants on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_rapacl._errors import CorruptFileError, RapaclInputError  # noqa: E402
from napari_rapacl.models import create_model, list_models, make_config  # noqa: E402
from napari_rapacl.models.checkpoint import config_path_for, load_model, save_checkpoint  # noqa: E402


def make_batch(model, batch_size: int = 4, seed: int = 0) -> dict:
    """A random batch holding every key the model declares (see models/base.py)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size, n_genes = cfg.patch_size, cfg.n_genes
    k = getattr(cfg, "k_neighbors", 3)
    makers = {
        "image": lambda: torch.rand(batch_size, 3, size, size, generator=g),
        "target": lambda: torch.rand(batch_size, n_genes, generator=g),
        "radiomics": lambda: torch.randn(batch_size, getattr(cfg, "n_radiomics", 72), generator=g),
        "cell_label": lambda: torch.randint(0, getattr(cfg, "n_classes", 5), (batch_size,), generator=g),
        "neighbors": lambda: torch.rand(batch_size, k, 3, size, size, generator=g),
        "neighbor_target": lambda: torch.rand(batch_size, k, n_genes, generator=g),
        "radius_px": lambda: torch.full((batch_size,), size / 4),
    }
    keys = set(model.required_inputs) | set(model.predict_inputs)
    return {key: makers[key]() for key in keys}


def test_every_model_has_a_tiny_twin_for_cpu_tests():
    names = set(list_models())
    full = {n for n in names if not n.endswith("_tiny")}
    assert full and all(f"{n}_tiny" in names for n in full), sorted(names)


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_tiny")])
def test_every_tiny_model_trains_and_predicts(name):
    small = {"n_genes": 5}
    if name.startswith("rapacl"):
        small.update(stage=2)
    model = create_model(name, **small)
    assert model.model_name == name and model.config.n_genes == 5
    batch = make_batch(model)
    model.train()
    losses = model.compute_loss(batch, epoch=100)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()  # gradients reach every trainable parameter
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in model.predict_inputs}
        first, second = model.predict(inputs), model.predict(inputs)
    assert first.shape == (4, 5) and torch.equal(first, second)


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
    from napari_rapacl.inference import iter_predict_spots
    from napari_rapacl.metrics import pearson_per_gene
    from napari_rapacl.models.fit import fit_patch_regressor
    from napari_rapacl.preprocess import extract_patches
    from napari_rapacl.progress import Progress

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


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_tiny") and n != "rapacl_tiny"])
def test_spot_inference_runs_every_image_model_on_a_slide(tmp_path, name):
    """The GUI/CLI path (``iter_predict_spots``) feeds each model what its ``predict`` needs."""
    from napari_rapacl.inference import predict_spots

    slide = _synthetic_slide(tmp_path)
    model = create_model(name, n_genes=4)
    x, y = np.array([200.0, 500.0, 800.0]), np.array([300.0, 500.0, 700.0])
    pred = predict_spots(model, slide, x, y, radius=np.array([20.0, 30.0, 40.0]), device="cpu")
    assert pred.shape == (3, 4) and np.isfinite(pred).all()
    again = predict_spots(model, slide, x, y, radius=np.array([20.0, 30.0, 40.0]), device="cpu")
    np.testing.assert_array_equal(pred, again)


def test_spot_inference_refuses_models_that_need_more_than_the_slide(tmp_path):
    from napari_rapacl.inference import predict_spots

    slide = _synthetic_slide(tmp_path)
    with pytest.raises(RapaclInputError, match="radiomics"):
        predict_spots(create_model("rapacl_tiny", n_genes=2, stage=2), slide, [100.0], [100.0], device="cpu")


def test_checkpoint_stores_and_exposes_per_gene_reliability(tmp_path):
    import math

    from napari_rapacl.jobs import load_model_choice
    from napari_rapacl.jobs._predict import PredictResult
    from napari_rapacl.models.checkpoint import gene_reliability_entry

    model = create_model("stnet_tiny", n_genes=3)
    genes = ["ERBB2", "FLAT", "KRT5"]
    entry = gene_reliability_entry([0.41, float("nan"), -0.05], genes, "C6")
    path = save_checkpoint(tmp_path / "m.pt", model, genes=genes, gene_reliability=entry)
    raw = torch.load(path, weights_only=True)
    assert raw["gene_reliability"]["metric"] == "pearson_r" and raw["gene_reliability"]["section"] == ["C6"]
    loaded, _ = load_model(path)
    rel = loaded.gene_reliability
    assert list(rel) == genes and rel["ERBB2"] == pytest.approx(0.41) and math.isnan(rel["FLAT"])
    choice = load_model_choice(None, path)
    assert list(choice.gene_reliability) == genes and choice.gene_reliability["ERBB2"] == rel["ERBB2"]
    result = PredictResult(choice, (0, 0, 1, 1), np.zeros(0, np.int64), np.zeros((0, 3)), 0, 0)
    assert result.gene_reliability["KRT5"] == pytest.approx(-0.05)
    # a checkpoint without it (older files) says None, not an empty or made-up table
    plain, _ = load_model(save_checkpoint(tmp_path / "old.pt", model, genes=genes))
    assert plain.gene_reliability is None
    assert load_model_choice("stnet_tiny", None).gene_reliability is None
    with pytest.raises(ValueError, match="2 reliability values for 3 genes"):
        gene_reliability_entry([0.1, 0.2], genes, "C6")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the file is empty"),
        (b"not a checkpoint at all", "not a PyTorch file"),
        ("state_dict", "bare weights"),
        ("list", "holds a list"),
        ("truncated", "truncated"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_named_with_a_next_step(tmp_path, content, reason):
    path = tmp_path / "weights.pt"
    if content == "state_dict":
        torch.save(create_model("stnet_tiny", n_genes=2).state_dict(), path)
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "truncated":
        torch.save({"a": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(CorruptFileError) as info:
        load_model(path)
    msg = str(info.value)
    assert "weights.pt: this .pt is not a napari-rapacl checkpoint (" in msg and reason in msg
    assert "python -m training.run" in msg and "main job" in msg
    assert ": 101" not in msg


def test_installed_model_is_listed_by_name_and_loads_with_its_card(tmp_path, monkeypatch):
    import json

    from napari_rapacl.jobs import install_model, installed_models, load_model_choice, models_dir, user_models
    from napari_rapacl.models.checkpoint import gene_reliability_entry

    monkeypatch.setenv("NAPARI_RAPACL_MODELS_DIR", str(tmp_path / "models"))
    assert models_dir() == tmp_path / "models" and installed_models() == {}
    assert "stnet" in user_models() and not any(n.endswith("_tiny") for n in user_models())
    model = create_model("stnet_tiny", n_genes=3)
    genes = ["ERBB2", "ESR1", "GRB7"]
    rel = gene_reliability_entry([0.5, float("nan"), 0.1], genes, "C6")
    src = save_checkpoint(tmp_path / "run" / "best.pt", model, genes=genes, gene_reliability=rel)
    path = install_model(src, "her2st-test", description="tiny", training={"dataset": "her2st", "val": "C6"})
    assert path == tmp_path / "models" / "her2st-test" / "model.pt" and path.with_suffix(".yaml").is_file()
    assert user_models()[0] == "her2st-test" and "stnet" in user_models()
    card = installed_models()["her2st-test"]
    assert card["model"] == "stnet_tiny" and card["n_genes"] == 3 and card["training"]["val"] == "C6"
    assert card["validation"]["mean_gene_r"] == pytest.approx(0.3) and card["validation"]["section"] == ["C6"]
    assert (
        json.loads((path.parent / "card.json").read_text())["checkpoint_sha256"] == card["checkpoint_sha256"]
    )
    loaded = load_model_choice("her2st-test", None)  # by name, no .pt to browse for
    assert loaded.checkpoint == str(path) and loaded.genes == genes and loaded.installed_name == "her2st-test"
    assert loaded.gene_reliability["ERBB2"] == 0.5 and loaded.provenance()["installed_model"] == "her2st-test"
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x))
    # reinstalling replaces it whole; nothing half-written is left in the folder
    install_model(src, "her2st-test")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["her2st-test"]
    with pytest.raises(RapaclInputError, match="already installed"):
        install_model(src, "her2st-test", overwrite=False)
    with pytest.raises(RapaclInputError, match="registry model's name"):
        install_model(src, "stnet")
    with pytest.raises(RapaclInputError, match="model name '../x'"):
        install_model(src, "../x")
    (tmp_path / "models" / "broken").mkdir()  # no card: skipped, not an error
    assert list(installed_models()) == ["her2st-test"]
