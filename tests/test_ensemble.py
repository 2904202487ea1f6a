"""The ensemble model: one checkpoint holding several trained members, built by training.ensemble, loaded
with weights_only=True through load_model and predicted through jobs.iter_predict like any model."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from napari_rapacl._errors import RapaclInputError  # noqa: E402


def _train_tiny(name: str, root: Path, rapacl_run) -> Path:
    """``name`` (a *_tiny model) trained 1 epoch on the rapacl_run fixture's sections and spots."""
    import yaml
    from training.config import load_config
    from training.run import train

    base = yaml.safe_load((REPO / "training" / "configs" / "stnet_tiny_test.yaml").read_text())
    cfg = {
        **base,
        "model": {"name": name, "config": {"dropout": 0.0} if name != "pixnet_tiny" else {}},
        "data": {
            **base["data"],
            "train": ["C3"],
            "val": ["C4"],
            "test": ["C2"],
            "max_spots": 40,
            "cache_dir": str(rapacl_run.root / "patches"),
        },
        "optim": {**base["optim"], "epochs": 1},
        "run": {**base["run"], "out_dir": str(root / name)},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load_config(path, []))
    return root / name / "best.pt"


@pytest.fixture(scope="module")
def members(rapacl_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble_members")
    return [
        _train_tiny("stnet_tiny", root, rapacl_run),
        _train_tiny("pixnet_tiny", root, rapacl_run),
        rapacl_run.stage2,
    ]


def test_ensemble_checkpoint_end_to_end(members, rapacl_run, tmp_path, data_dir):
    import torch
    from training.ensemble import main
    from training.postprocess import write_postprocess
    from training.run import predict_checkpoint

    from napari_rapacl.datasets import her2st
    from napari_rapacl.jobs import iter_predict
    from napari_rapacl.models.checkpoint import load_model, read_checkpoint
    from napari_rapacl.progress import run_to_completion

    out = tmp_path / "ens"
    assert main(["--members", *map(str, members), "--out", str(out)]) == 0
    ckpt = out / "best.pt"
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain data only
    assert (
        payload["model"] == "ensemble" and (out / "best.yaml").is_file() and (out / "metrics.json").is_file()
    )
    member_payloads = [read_checkpoint(m) for m in members]
    common = set(member_payloads[0]["genes"]).intersection(*[p["genes"] for p in member_payloads[1:]])
    assert payload["genes"] == [g for g in member_payloads[0]["genes"] if g in common]
    # the radiomics z-scoring and recipe of the RaPaCL-ST member travel with the ensemble
    assert payload["input_stats"]["radiomics"] == member_payloads[2]["input_stats"]["radiomics"]
    # smoothing and per-gene r chosen / computed on the validation section (C4), never on C2
    assert payload["postprocess"]["chosen_on"] == ["C4"]
    assert payload["gene_reliability"]["section"] == ["C4"]
    assert len(payload["gene_reliability"]["values"]) == len(payload["genes"])

    model, _ = load_model(ckpt)
    assert model.model_name == "ensemble" and len(model.members) == 3
    assert set(model.predict_inputs) == {"image", "radius_px", "radiomics"}
    assert model.radiomics_recipe is not None
    assert [m.model_name for m in model.members] == ["stnet_tiny", "pixnet_tiny", "rapacl_tiny"]

    # the training module's predictions of the ensemble = the mean of the members' (same genes)
    genes = payload["genes"]
    ens = predict_checkpoint(ckpt, ["C2"])["C2"]["pred"]
    parts = []
    for m, p in zip(members, member_payloads, strict=True):
        idx = [list(p["genes"]).index(g) for g in genes]
        parts.append(predict_checkpoint(m, ["C2"])["C2"]["pred"][:, idx])
    np.testing.assert_allclose(ens, np.mean(parts, axis=0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(ens, parts[0], atol=1e-4)  # the members really differ

    # from the slide, through the Predict widget's job: the mean of the members' own predictions
    # (smoothing off on copies, so only the mean is compared)
    plain = []
    for i, path in enumerate([*members, ckpt]):
        copy = tmp_path / f"plain{i}.pt"
        shutil.copy(path, copy)
        write_postprocess(copy, {"smooth_sigma_um": 0.0})
        plain.append(copy)
    sec = her2st("C2", data_dir=data_dir)
    s = sec.spots
    box = (4500, 5000, 7000, 7500)
    results = [
        run_to_completion(iter_predict((None, p), sec.slide, s, box, cache=False, device="cpu"))
        for p in plain
    ]
    assert len(results[-1].values) >= 6
    by_member = []
    for r, p in zip(results[:3], member_payloads, strict=True):
        by_member.append(r.values[:, [list(p["genes"]).index(g) for g in genes]])
    np.testing.assert_allclose(results[-1].values, np.mean(by_member, axis=0), rtol=1e-4, atol=1e-5)
    # and with the ensemble's own smoothing the job applies it
    smoothed = run_to_completion(iter_predict((None, ckpt), sec.slide, s, box, cache=False, device="cpu"))
    if payload["postprocess"]["smooth_sigma_um"] > 0:
        assert not np.allclose(smoothed.values, results[-1].values)
    assert list(smoothed.genes) == genes
    assert set(smoothed.gene_reliability) == set(genes)  # the ensemble's own validation r


def test_ensemble_weights_chosen_on_validation(members, tmp_path):
    from training.ensemble import build_ensemble, choose_weights

    # choose_weights: a member equal to the target wins alone; equal weights win ties
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 6))
    noise = rng.normal(size=(50, 6))
    w, score = choose_weights([noise, target], target)
    assert w == [0.0, 1.0] or (w[0] == 0 and w[1] > 0)
    assert score == pytest.approx(1.0)
    w, _ = choose_weights([target, target], target)
    assert w == [1.0, 1.0]

    ckpt = build_ensemble(members[:2], tmp_path / "auto", weights="auto", smooth=False)
    from napari_rapacl.models.checkpoint import read_checkpoint

    payload = read_checkpoint(ckpt)
    assert payload["ensemble"]["chosen_on"] == ["C4"]
    assert len(payload["config"]["weights"]) == 2 and sum(payload["config"]["weights"]) > 0
    assert payload["postprocess"]["smooth_sigma_um"] == 0.0


def test_ensemble_refuses_members_it_cannot_feed(members, tmp_path):
    import torch
    from training.ensemble import build_ensemble

    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import read_checkpoint

    with pytest.raises(RapaclInputError, match="python -m training.ensemble"):
        create_model("ensemble")
    from napari_rapacl.jobs import user_models
    from napari_rapacl.models import list_models

    # not offered as a model to build with random weights; still a registered (loadable) model
    assert "ensemble" not in list_models() and "ensemble" in list_models(include_checkpoint_only=True)
    assert "ensemble" not in user_models()
    with pytest.raises(RapaclInputError, match="at least two"):
        build_ensemble(members[:1], tmp_path / "one")
    # a member reading other patches (2 um/px instead of 4) is refused with both geometries named
    payload = read_checkpoint(members[0])
    payload["config"] = {**payload["config"], "mpp": 2.0}
    odd = tmp_path / "odd" / "best.pt"
    odd.parent.mkdir()
    torch.save(payload, odd)
    with pytest.raises(RapaclInputError, match=r"read different patches.*32 px at 4.0 um/px.*32 px at 2.0"):
        build_ensemble([members[1], odd], tmp_path / "bad")
    # members validated on different sections need an explicit --val
    payload = read_checkpoint(members[0])
    payload["train_config"] = {
        **payload["train_config"],
        "data": {**payload["train_config"]["data"], "val": ["C5"]},
    }
    other = tmp_path / "other" / "best.pt"
    other.parent.mkdir()
    torch.save(payload, other)
    with pytest.raises(RapaclInputError, match="validated on different"):
        build_ensemble([members[1], other], tmp_path / "bad2")
    with pytest.raises(RapaclInputError, match="itself an ensemble"):
        ens = build_ensemble(members[:2], tmp_path / "ok", smooth=False)
        build_ensemble([ens, members[0]], tmp_path / "nested")
