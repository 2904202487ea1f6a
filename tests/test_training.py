"""The training module: config, data inputs, single-process runs, resume, and real DDP under torchrun.

Runs on the CPU with ``stnet_tiny`` (32-px patches, ~0.45 M parameters) on 47 spots per real her2st
section, one thread per process. The DDP tests launch ``torchrun --nproc_per_node=2`` (gloo) through
:func:`run_torchrun`, the one place that knows how (loopback rendezvous, time-out).

DDP equivalence is made exact up to float summation order: ``run.batchnorm=frozen`` (BatchNorm uses
running statistics, so a sample's forward does not depend on which other samples share its process),
``dropout=0``, and the data order is a function of (seed, epoch) only - each rank takes every second
index of the same permutation, so step k's two local batches together are the single process's k-th
batch. Augmentation stays ON: it is a function of (seed, epoch, spot), identical in both runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.config import load_config  # noqa: E402
from training.data import (  # noqa: E402
    InputContext,
    SectionData,
    SpotDataset,
    batch_to_device,
    build_inputs,
    dihedral,
    nearest_neighbors,
    spot_subset,
)
from training.run import init_from_checkpoint, lr_factor, main, resolve_model_overrides, train  # noqa: E402

from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.models import ModelConfig, register_model  # noqa: E402
from napari_rapacl.models import registry as _registry  # noqa: E402
from napari_rapacl.models.checkpoint import load_model  # noqa: E402

TINY = REPO / "training" / "configs" / "stnet_tiny_test.yaml"
TORCHRUN_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], *, nproc: int = 2, timeout: float = TORCHRUN_TIMEOUT_S) -> tuple[int, str]:
    """``torchrun --nproc_per_node=nproc <args>`` from the repository root; returns (exit code, output).

    Rendezvous on the loopback interface with a free port (torchrun hangs where the host name does
    not resolve), one thread per process, and a hard time-out that kills the whole process group,
    so a hang fails the test instead of blocking CI.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *args,
    ]
    env = dict(os.environ)
    env.update(
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        NAPARI_RAPACL_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def patch_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("patch_cache")


@pytest.fixture()
def tiny(data_dir, patch_cache):
    """Overrides that point the tiny config at the real data and a shared patch cache."""

    def make(out_dir: Path, *extra: str) -> list[str]:
        return [
            f"data.data_dir={data_dir}",
            f"data.cache_dir={patch_cache}",
            f"run.out_dir={out_dir}",
            *extra,
        ]

    return make


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir, patch_cache) -> Path:
    """A 1-process, 2-epoch run of the tiny config (train C3+C5, val C4, test C2; 47 spots each)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(
        TINY, [f"data.data_dir={data_dir}", f"data.cache_dir={patch_cache}", f"run.out_dir={out}"]
    )
    train(cfg)
    return out


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_config_yaml_and_typed_overrides():
    cfg = load_config(
        TINY,
        [
            "optim.lr=3e-4",  # YAML reads this as a string; the dataclass makes it a float
            "optim.epochs=5",
            "optim.patience=null",
            "data.train=[C3, c5, C6]",
            "data.test=C2",  # a single name becomes a list
            "data.max_spots=20",
            "data.genes=top:50:var",
            "data.radiomics_table={C3: a.parquet, C5: b.csv}",
            "model.config.dropout=0.25",
            "model.config.backbone=resnet18",
            "run.amp=true",
            "run.device=cuda:1",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 5 and cfg.optim.patience is None
    assert cfg.data.train == ["C3", "c5", "C6"] and cfg.data.test == ["C2"] and cfg.data.val == ["C4"]
    assert cfg.data.genes == "top:50:var" and cfg.data.max_spots == 20
    assert cfg.data.radiomics_table == {"C3": "a.parquet", "C5": "b.csv"}
    assert cfg.model.config == {"dropout": 0.25, "backbone": "resnet18"}
    assert cfg.run.amp is True and cfg.run.device == "cuda:1"
    assert cfg.optim.batch_size == 8 and cfg.run.batchnorm == "frozen"  # from the YAML
    assert resolve_model_overrides(cfg) == {"dropout": 0.25, "backbone": "resnet18"}
    # every shipped example config parses
    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        assert load_config(path).data.val, path


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optim.lrr=1"], r"unknown key 'lrr' in section 'optim'.*batch_size"),
        (["optimizer.lr=1"], r"unknown section 'optimizer'"),
        (["optim.lr.x=1"], r"no sub-keys"),
        (["optim.lr"], r"section.key=value"),
        (["optim.epochs=abc"], r"optim.epochs: expected an integer, got 'abc'"),
        (["optim.lr=-1"], r"optim.lr must be > 0"),
        (["run.amp=maybe"], r"run.amp: expected true or false"),
        (["data.val=[C2]"], r"data.val and data.test overlap \(\['C2'\]\)"),
        (["data.val=[c3]"], r"data.val and data.train overlap \(\['C3'\]\)"),
        (["data.test=[C5]"], r"data.train and data.test overlap"),
        (["data.val=[]"], r"data.val is empty"),
        (["optim.select_on=best"], r"optim.select_on must be one of"),
        (["model.stage=2"], r"model.stage=2 needs model.init_checkpoint"),
        (["run.batchnorm=group"], r"run.batchnorm must be one of"),
    ],
)
def test_config_errors_name_the_bad_key(overrides, match):
    with pytest.raises(RapaclInputError, match=match):
        load_config(TINY, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\nmodell:\n  name: x\n")
    with pytest.raises(RapaclInputError, match=r"unknown section\(s\) 'modell'"):
        load_config(bad)
    bad.write_text("data:\n  trainn: [C3]\n")
    with pytest.raises(RapaclInputError, match=r"data: unknown key\(s\) 'trainn'; valid keys: dataset"):
        load_config(bad)
    cfg = load_config(TINY, ["model.config.dropoutt=0"])
    with pytest.raises(RapaclInputError, match=r"model.config: unknown key\(s\) \['dropoutt'\].*stnet_tiny"):
        resolve_model_overrides(cfg)
    cfg = load_config(TINY, ["model.config.dropout=lots"])
    with pytest.raises(RapaclInputError, match="model.config.dropout: expected a number"):
        resolve_model_overrides(cfg)


def test_command_line(capsys):
    assert main(["--config", str(TINY), "--print-config", "optim.lr=3e-4", "data.val=C6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == pytest.approx(3e-4) and printed["data"]["val"] == ["C6"]
    assert main(["--config", str(TINY), "optim.nope=1"]) == 2
    assert "unknown key 'nope' in section 'optim'" in capsys.readouterr().err
    assert main([]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_learning_rate_schedule_is_a_function_of_the_epoch():
    assert lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("none", 7, 10) == 1.0


# ------------------------------------------------------------------------------------------------
# data inputs (synthetic sections: exact expectations)
# ------------------------------------------------------------------------------------------------
def _section(name: str, n: int, x0: float = 0.0, seed: int = 0) -> SectionData:
    rng = np.random.default_rng(seed)
    return SectionData(
        name=name,
        barcodes=np.array([f"{name}_{i}" for i in range(n)], dtype=object),
        x=x0 + 10.0 * np.arange(n),
        y=np.zeros(n),
        radius=np.full(n, 50.0),
        slide_mpp=0.5,
        patch_mpp=2.0,
        patches=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        target=rng.random((n, 4), dtype=np.float32),
    )


def test_input_builders(tmp_path):
    import pandas as pd
    from training.config import DataConfig

    a, b, v = _section("A", 6, seed=1), _section("B", 5, seed=2), _section("V", 4, seed=3)
    rng = np.random.default_rng(0)
    raw = {}
    for sec in (a, b, v):
        n = len(sec) + 1
        frame = pd.DataFrame(
            {
                "barcode": list(sec.barcodes)[::-1] + [f"{sec.name}_extra"],  # order, extra rows: no matter
                "feat": rng.normal(5.0, 2.0, n),
                "GLCM_Energy": rng.lognormal(3.0, 2.0, n),
                "cell_label": rng.choice(["tumour", "stroma"], n),
            }
        )
        if sec is v:
            frame.loc[frame.barcode == "V_0", "cell_label"] = "immune"  # never seen in training
        raw[sec.name] = frame.set_index("barcode")
        if sec is b:
            frame.to_csv(tmp_path / f"{sec.name}.csv", index=False)
        else:
            frame.to_parquet(tmp_path / f"{sec.name}.parquet")
    tables = {
        "A": str(tmp_path / "A.parquet"),
        "B": str(tmp_path / "B.csv"),
        "V": str(tmp_path / "V.parquet"),
    }
    data = DataConfig(
        train=["A", "B"],
        val=["V"],
        radiomics_table=tables,
        radiomics_signed_log=["Energy"],
        n_neighbors=2,
    )
    ctx = InputContext(data, ModelConfig(n_genes=4), ["g1", "g2", "g3", "g4"], [a, b])
    keys = ["image", "target", "neighbors", "neighbor_target", "radius_px", "radiomics", "cell_label"]
    fa, fb, fv = build_inputs([a, b, v], keys, ctx)

    # radiomics: signed log on *Energy*, z-scored with the TRAINING sections' statistics only
    def rows(sec):
        d = raw[sec.name].loc[list(sec.barcodes)]
        return np.stack([d["feat"].to_numpy(), np.log1p(d["GLCM_Energy"].to_numpy())], axis=1)

    train_raw = np.concatenate([rows(a), rows(b)])
    mean, std = train_raw.mean(0), train_raw.std(0)
    train_z = np.concatenate([fa["radiomics"], fb["radiomics"]])
    np.testing.assert_allclose(train_z.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(train_z.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(fv["radiomics"], (rows(v) - mean) / std, rtol=1e-5, atol=1e-5)
    assert abs(fv["radiomics"].mean()) > 1e-3  # validation is NOT re-standardised on itself
    st = ctx.stats["radiomics"]
    assert st["columns"] == ["feat", "GLCM_Energy"] and st["fitted_on"] == ["A", "B"]
    # cell labels: classes from training, unseen -> -100 (ignored by cross_entropy)
    assert ctx.stats["cell_label"]["classes"] == ["stroma", "tumour"]
    lab_v = fv["cell_label"]
    assert lab_v.dtype == np.int64 and lab_v[0] == -100
    expected = [["stroma", "tumour"].index(c) for c in raw["V"].loc[list(v.barcodes[1:]), "cell_label"]]
    assert lab_v[1:].tolist() == expected
    # neighbours: the 2 nearest spots on a line (ties broken by index), never the spot itself
    assert nearest_neighbors(a.x, a.y, 2).tolist() == [[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [4, 3]]
    assert nearest_neighbors(a.x, a.y, 2, include_self=True)[3].tolist() == [3, 2]
    np.testing.assert_array_equal(fa["neighbors"](3), a.patches[[2, 4]])
    np.testing.assert_array_equal(fa["neighbor_target"](0), a.target[[1, 2]])
    # radius in patch pixels: 50 level-0 px x 0.5 um/px / 2 um per patch px
    np.testing.assert_allclose(fa["radius_px"], 12.5)
    # errors name what is wrong
    with pytest.raises(RapaclInputError, match="no input builder for batch key.*'spectra'"):
        build_inputs([a], ["spectra"], ctx)
    short = _section("A", 6, seed=1)
    short.barcodes = np.array([f"A_{i}" for i in range(5)] + ["ZZ"], dtype=object)
    with pytest.raises(RapaclInputError, match=r"A.parquet: 1 of 6 spots of section A are missing.*ZZ"):
        build_inputs([short], ["radiomics"], InputContext(data, ModelConfig(), ["g"], [a, b]))
    with pytest.raises(RapaclInputError, match="data.radiomics_table is not set"):
        fresh = _section("A", 6)
        build_inputs([fresh], ["radiomics"], InputContext(DataConfig(), ModelConfig(), ["g"], [fresh]))
    with pytest.raises(RapaclInputError, match="7 neighbours requested"):
        nearest_neighbors(a.x, a.y, 7)


def test_radiomics_columns_by_feature_set_name(tmp_path):
    """``radiomics_columns: rapacl72`` takes the engine's 72 names in order (``n_nuclei`` is left out)."""
    import pandas as pd
    from training.config import DataConfig

    from napari_rapacl.radiomics import rapacl72_names

    names = list(rapacl72_names())
    rng = np.random.default_rng(0)
    a = _section("A", 6, seed=1)
    frame = pd.DataFrame(rng.normal(size=(6, 72)), columns=names[::-1], index=list(a.barcodes))
    frame["n_nuclei"] = rng.integers(0, 50, 6)
    frame.to_parquet(tmp_path / "A.parquet")
    table = {"A": str(tmp_path / "A.parquet")}
    ctx = InputContext(
        DataConfig(radiomics_table=table, radiomics_columns="rapacl72"), ModelConfig(), ["g"], [a]
    )
    (fa,) = build_inputs([a], ["radiomics"], ctx)
    assert ctx.stats["radiomics"]["columns"] == names and fa["radiomics"].shape == (6, 72)
    expected = frame[names].to_numpy()
    np.testing.assert_allclose(fa["radiomics"], (expected - expected.mean(0)) / expected.std(0), atol=1e-5)
    bad = InputContext(
        DataConfig(radiomics_table=table, radiomics_columns="rapacl99"), ModelConfig(), ["g"], [a]
    )
    with pytest.raises(RapaclInputError, match="radiomics_columns='rapacl99'"):
        build_inputs([a], ["radiomics"], bad)


def test_dataset_augmentation_and_device_batches():
    a = _section("A", 6, seed=1)
    from training.config import DataConfig

    ctx = InputContext(DataConfig(n_neighbors=2), ModelConfig(n_genes=4), ["g"] * 4, [a])
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert len({dihedral(img, k).tobytes() for k in range(8)}) == 8  # the 8 symmetries of the square
    ds = SpotDataset([a], ["image", "neighbors", "target"], ctx, augment=True, seed=3)
    plain = SpotDataset([a], ["image", "neighbors", "target"], ctx, augment=False)
    ds.set_epoch(2)
    s1, s2 = ds[4], ds[4]
    np.testing.assert_array_equal(s1["image"], s2["image"])  # a function of (seed, epoch, spot)
    changed = [not np.array_equal(ds[j]["image"], plain[j]["image"]) for j in range(6)]
    assert any(changed)
    np.testing.assert_array_equal(plain[4]["image"], a.patches[4])  # no augmentation unless asked
    # the neighbours get the same symmetry as their spot
    k = next(k for k in range(8) if np.array_equal(dihedral(a.patches[4], k), s1["image"]))
    np.testing.assert_array_equal(s1["neighbors"], dihedral(a.patches[[3, 5]], k))
    batch = torch.utils.data.default_collate([plain[0], plain[1]])
    b = batch_to_device(batch, "cpu", channels_last=True)
    assert b["image"].shape == (2, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["neighbors"].shape == (2, 2, 3, 8, 8) and float(b["image"].max()) <= 1.0
    assert b["image"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b["image"][1], torch.from_numpy(a.patches[1]).permute(2, 0, 1).float() / 255)
    assert b["index"].tolist() == [0, 1]
    assert spot_subset(10, 4, "C3").tolist() == spot_subset(10, 4, "C3").tolist()
    assert len(spot_subset(10, 4, "C3")) == 4 and spot_subset(10, None, "C3").tolist() == list(range(10))


def test_hed_stain_jitter(data_dir):
    from skimage.color import hed2rgb, rgb2hed
    from training.data import hed_jitter

    from napari_rapacl.datasets import her2st
    from napari_rapacl.preprocess import extract_patches

    sec = her2st("C3")
    patches = np.asarray(extract_patches(sec.slide, sec.spots.x[:8], sec.spots.y[:8], size=32, mpp=2.0))
    # identity at scale 1, bias 0 (no clipping of negative stain amounts)
    np.testing.assert_array_equal(hed_jitter(patches, np.ones(3), np.zeros(3)), patches)
    # a pure haematoxylin scale acts on the haematoxylin amount as skimage's deconvolution sees it
    more_h = hed_jitter(patches, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    h0, h1 = rgb2hed(patches)[..., 0], rgb2hed(more_h)[..., 0]
    e0, e1 = rgb2hed(patches)[..., 1], rgb2hed(more_h)[..., 1]
    assert h1.mean() > 1.2 * h0.mean() and abs(e1.mean() - e0.mean()) < 0.05 * abs(e0.mean()) + 1e-3
    assert np.abs(hed2rgb(rgb2hed(patches)) * 255 - patches).mean() < 3  # same colour model as skimage

    a = _section("A", 6, seed=1)
    from training.config import DataConfig

    ctx = InputContext(DataConfig(n_neighbors=2), ModelConfig(n_genes=4), ["g"] * 4, [a])
    a.patches[:] = patches[:6, :8, :8]
    geo = SpotDataset([a], ["image", "neighbors", "target"], ctx, augment=True, seed=3)
    hed = SpotDataset([a], ["image", "neighbors", "target"], ctx, augment=True, seed=3, hed_sigma=0.05)
    geo.set_epoch(1)
    hed.set_epoch(1)
    for j in range(6):
        g, h = geo[j], hed[j]
        assert not np.array_equal(g["image"], h["image"])  # the stain changed ...
        assert np.abs(g["image"].astype(int) - h["image"]).mean() < 25  # ... by a light jitter
        np.testing.assert_array_equal(h["image"], hed[j]["image"])  # a function of (seed, epoch, spot)
    first = [hed[j]["image"] for j in range(6)]
    hed.set_epoch(2)
    assert any(not np.array_equal(first[j], hed[j]["image"]) for j in range(6))  # a new draw per epoch
    with pytest.raises(RapaclInputError, match="data.hed_sigma"):
        SpotDataset([a], ["image"], ctx, augment=True, hed_sigma=1.5)


# ------------------------------------------------------------------------------------------------
# single-process runs on real her2st sections
# ------------------------------------------------------------------------------------------------
def test_single_process_run_writes_checkpoints_metrics_and_logs(reference_run, patch_cache):
    out = reference_run
    for name in ("config.yaml", "train.log", "history.json", "last.pt", "best.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert len(list(patch_cache.glob("her2st_C*_32px_4mpp_*.npz"))) >= 4  # the patch cache
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "optimizer", "config", "genes", "normalization", "epoch", "best_score",
                "history", "train_config", "input_stats"):  # fmt: skip
        assert key in last, key
    assert last["epoch"] == 1 and len(last["genes"]) == 785 and last["config"]["n_genes"] == 785
    assert "log1p(CP10k)" in last["normalization"]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    best_epoch = int(np.argmax([h["val_pcc"] for h in history]))
    assert best["epoch"] == best_epoch == last["best_epoch"]
    assert best["best_score"] == pytest.approx(history[best_epoch]["val_pcc"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == best_epoch and metrics["select_on"] == "val_pcc"
    assert set(metrics["val"]) == {"C4"} and set(metrics["test"]) == {"C2"}
    assert metrics["val"]["C4"]["pcc_m"] == pytest.approx(history[best_epoch]["val_pcc"], abs=1e-6)
    test = metrics["test"]["C2"]
    for key in ("pcc_m", "pcc_s", "pcc_f", "mse", "mae", "pcc_top50", "n_constant"):
        assert key in test and math.isfinite(test[key]), key
    assert test["n_spots"] == 47 and len(test["per_gene_r"]) == 785
    assert test["pcc_f"] <= test["pcc_s"] and metrics["test_mean"]["pcc_m"] == pytest.approx(test["pcc_m"])
    # the test-time spot smoothing is chosen on the validation section and stored in best.pt
    post = metrics["postprocess"]
    from training.postprocess import SMOOTH_GRID_UM

    assert post["chosen_on"] == ["C4"] and post["smooth_sigma_um"] in SMOOTH_GRID_UM
    assert max(post["val_pcc_by_sigma"].values()) == post["val_pcc_by_sigma"][f"{post['smooth_sigma_um']:g}"]
    assert best["postprocess"]["smooth_sigma_um"] == post["smooth_sigma_um"]
    # the resolved config is a valid config again, with the model config filled in
    resolved = load_config(out / "config.yaml")
    assert resolved.model.config["n_genes"] == 785 and resolved.model.config["backbone"] == "test_resnet"
    log_lines = (out / "train.log").read_text().splitlines()
    epoch_lines = [ln for ln in log_lines if " epoch " in ln]
    assert len(epoch_lines) == 2 and "epoch 1/2 train_loss" in epoch_lines[0]
    assert "val_pcc" in epoch_lines[0] and "samples/s" in epoch_lines[0]
    # best.pt rebuilds through the registry and predicts deterministically in eval mode
    model, payload = load_model(out / "best.pt")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_run_dir_of_an_existing_run_is_not_overwritten(reference_run, tiny):
    with pytest.raises(RapaclInputError, match="already holds a run.*run.resume="):
        train(load_config(TINY, tiny(reference_run)))


def test_one_run_per_output_folder(reference_run, tiny, tmp_path):
    """#14 item 4: a run holds its output folder (an exclusive lock naming its pid): a second run with
    the same run.out_dir is refused clearly, even with run.overwrite=true, and leaves the folder as
    the first run has it; the lock goes with the run."""
    from training.run import LOCK_NAME, lock_out_dir

    out = tmp_path / "busy"
    out.mkdir()
    held = lock_out_dir(out)  # what a running training holds
    try:
        with pytest.raises(RapaclInputError, match=r"in use by another training run \(pid \d+"):
            train(load_config(TINY, tiny(out, "run.overwrite=true")))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside it
    finally:
        held.close()
    # once the first run has ended, the folder is free; a finished run releases it too
    result = train(load_config(TINY, tiny(out, "optim.epochs=1")))
    assert (result.out_dir / "best.pt").exists()
    lock_out_dir(out).close()


def test_resume_repeats_the_uninterrupted_run(reference_run, tiny, tmp_path):
    out = tmp_path / "interrupted"
    first = train(load_config(TINY, tiny(out, "run.stop_after=1")))
    assert len(first.history) == 1 and not (out / "metrics.json").exists()  # no test evaluation yet
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    # continue from the checkpoint alone (its config is inside), at the next epoch, with its optimizer
    assert main([f"run.resume={out / 'last.pt'}"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert "resuming at epoch 2" in (out / "train.log").read_text()
    # identical to the uninterrupted run: same data order, augmentation, optimizer state, schedule
    assert _max_diff(_weights(out / "last.pt"), _weights(reference_run / "last.pt")) < 1e-6
    ref = json.loads((reference_run / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert got["test"]["C2"]["pcc_m"] == pytest.approx(ref["test"]["C2"]["pcc_m"], abs=1e-6)


def test_stage2_initialisation_from_a_checkpoint(reference_run, tiny, tmp_path, monkeypatch):
    import napari_rapacl.models.stnet as stnet_module
    from napari_rapacl.models import create_model

    init = reference_run / "best.pt"
    # strict load when the model's module has no init_from_stage1 hook
    model = create_model("stnet_tiny", n_genes=785)
    assert init_from_checkpoint(model, init) == "load_state_dict(strict=True)"
    assert _max_diff(model.state_dict(), _weights(init)) == 0.0
    with pytest.raises(RuntimeError, match="size mismatch"):
        init_from_checkpoint(create_model("stnet_tiny", n_genes=3), init)
    # the module's hook is used when there is one
    calls = []
    monkeypatch.setattr(stnet_module, "init_from_stage1", lambda m, p: calls.append(p), raising=False)
    assert init_from_checkpoint(model, init).endswith("init_from_stage1") and calls == [str(init)]
    monkeypatch.delattr(stnet_module, "init_from_stage1")
    # a stage-2 run starts from the checkpoint: with a negligible learning rate it stays there
    out = tmp_path / "stage2"
    cfg = load_config(
        TINY,
        tiny(out, "model.stage=2", f"model.init_checkpoint={init}", "optim.lr=1e-12", "optim.epochs=1",
             "data.train=[C3]", "data.test=[]"),
    )  # fmt: skip
    result = train(cfg)
    assert result.select_on == "val_pcc"
    assert _max_diff(_weights(out / "last.pt"), _weights(init)) < 1e-6
    assert f"init: {init} via load_state_dict(strict=True)" in (out / "train.log").read_text()


def test_selection_and_early_stopping_use_the_validation_score(tiny, tmp_path, monkeypatch, data_dir):
    import training.run as run_module

    scores = iter([0.10, 0.30, 0.20, 0.25, 0.50, 0.60])  # best at epoch 1, then 2 epochs without gain
    original = run_module._Trainer._validate

    def scripted(self):
        real = original(self)  # the real gathered validation still runs
        return {**real, "val_pcc": next(scores)}

    monkeypatch.setattr(run_module._Trainer, "_validate", scripted)
    out = tmp_path / "early"
    result = train(
        load_config(
            TINY,
            tiny(
                out,
                "optim.epochs=6",
                "optim.patience=2",
                "data.train=[C3]",
                "data.test=[]",
                "data.genes=top:20",
            ),
        )
    )
    assert [h["val_pcc"] for h in result.history] == [0.10, 0.30, 0.20, 0.25]
    assert result.best_epoch == 1 and [h["best"] for h in result.history] == [True, True, False, False]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["epochs_run"] == 4 and metrics["best_epoch"] == 1
    # top:20 = the 20 most expressed genes of the TRAINING section (C3) only
    from napari_rapacl.datasets import her2st
    from napari_rapacl.preprocess import select_genes

    with pytest.warns(UserWarning, match="no counts"):
        c3 = her2st("C3", data_dir=data_dir).spots.counts
    genes = torch.load(out / "best.pt", weights_only=True)["genes"]
    assert metrics["genes"] == 20 and genes == select_genes([c3], 20)
    assert "early stopping" in (out / "train.log").read_text()


# ------------------------------------------------------------------------------------------------
# every input reaches a model through the trainer (a probe model registered for this test)
# ------------------------------------------------------------------------------------------------
@dataclass
class ProbeConfig(ModelConfig):
    n_neighbors: int = 3


SEEN: dict[str, tuple] = {}


class Probe(torch.nn.Module):
    required_inputs = (
        "image",
        "target",
        "neighbors",
        "neighbor_target",
        "radius_px",
        "radiomics",
        "cell_label",
    )
    predict_inputs = ("image", "radius_px")

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, config.n_genes)
        self.rad = torch.nn.Linear(2, 2)

    def _features(self, batch):
        return torch.cat([batch["image"].mean((-1, -2)), batch["radius_px"][:, None] / 10], dim=1)

    def compute_loss(self, batch, epoch=0):
        if self.training and "image" not in SEEN:  # the first training batch
            for key in self.required_inputs:
                SEEN[key] = (tuple(batch[key].shape), batch[key].dtype)
            SEEN["radius_values"] = tuple(sorted(set(batch["radius_px"].tolist())))
        mse = torch.nn.functional.mse_loss(self.head(self._features(batch)), batch["target"])
        nb = batch["neighbors"].mean((-1, -2, -3)).mean(-1, keepdim=True)  # (B, K) -> (B, 1)
        aux = (nb * 0 + batch["neighbor_target"].mean((1, 2))[:, None]).mean() * 0
        ce = torch.nn.functional.cross_entropy(
            self.rad(batch["radiomics"]), batch["cell_label"], ignore_index=-100
        )
        return {"loss": mse + 0.1 * ce + aux, "mse": mse.detach(), "ce": ce.detach()}

    def predict(self, batch):
        return self.head(self._features(batch))


def build_probe(config: ProbeConfig) -> Probe:
    return Probe(config)


@pytest.fixture()
def probe_model():
    register_model(
        "_test_probe", ProbeConfig, f"{__name__}:build_probe", "test probe", patch_size=32, mpp=4.0
    )
    yield "_test_probe"
    _registry._REGISTRY.pop("_test_probe", None)


@pytest.mark.filterwarnings("ignore:.*have no counts")
def test_all_inputs_reach_the_model_and_val_loss_selection(probe_model, tiny, tmp_path, data_dir):
    import pandas as pd

    from napari_rapacl.datasets import her2st

    tables = {}
    for name in ("C3", "C4"):
        spots = her2st(name, data_dir=data_dir).spots
        frame = pd.DataFrame(
            {
                "barcode": spots.barcode,
                "area_mean": spots.x / 100.0,
                "GLCM_Energy": np.exp(spots.y / 2000.0),
                "cell_label": np.where(spots.x > np.median(spots.x), "tumour", "stroma"),
            }
        )
        tables[name] = tmp_path / f"{name}.parquet"
        frame.to_parquet(tables[name])
    out = tmp_path / "probe"
    cfg = load_config(
        TINY,
        tiny(out, f"model.name={probe_model}", "model.config={}", "data.train=[C3]", "data.test=[]",
             f"data.radiomics_table={{C3: {tables['C3']}, C4: {tables['C4']}}}",
             "data.radiomics_signed_log=[Energy]", "optim.epochs=2", "optim.select_on=val_loss"),
    )  # fmt: skip
    SEEN.clear()
    result = train(cfg)
    assert SEEN["image"] == ((8, 3, 32, 32), torch.float32)
    assert SEEN["neighbors"] == ((8, 3, 3, 32, 32), torch.float32)  # K from the model config
    assert SEEN["neighbor_target"][0] == (8, 3, 785) and SEEN["target"][0] == (8, 785)
    assert SEEN["radiomics"] == ((8, 2), torch.float32) and SEEN["cell_label"] == ((8,), torch.int64)
    assert SEEN["radius_px"][1] == torch.float32
    # ST spots are 100 um across: radius 50 um = 12.5 px at 4 um/px
    assert all(abs(r - 12.5) < 0.1 for r in SEEN["radius_values"])
    assert result.select_on == "val_loss" and {"val_loss", "val_mse", "val_ce"} <= set(result.history[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["C4"]["loss"] == pytest.approx(min(h["val_loss"] for h in result.history), rel=1e-6)
    stats = torch.load(out / "best.pt", weights_only=True)["input_stats"]
    assert stats["radiomics"]["fitted_on"] == ["C3"] and stats["cell_label"]["classes"] == [
        "stroma",
        "tumour",
    ]
    c3 = pd.read_parquet(tables["C3"]).set_index("barcode")
    spots = her2st("C3", data_dir=data_dir).spots
    used = spots.barcode[spot_subset(len(spots), 47, "C3")]
    assert stats["radiomics"]["mean"][0] == pytest.approx(c3.loc[list(used), "area_mean"].mean())


# ------------------------------------------------------------------------------------------------
# DDP: torchrun with 2 processes
# ------------------------------------------------------------------------------------------------
def test_ddp_two_processes_equal_one_process(reference_run, tiny, tmp_path):
    out = tmp_path / "ddp"
    rc, log = run_torchrun(["-m", "training.run", "--config", str(TINY), *tiny(out)])
    assert rc == 0, log[-4000:]
    assert "DDP (gloo) on cpu: 2 process(es) x batch 4 = global batch 8" in log
    # final weights equal the 1-process run with the same global batch (float summation order only)
    assert _max_diff(_weights(out / "last.pt"), _weights(reference_run / "last.pt")) < 1e-4
    ddp = json.loads((out / "history.json").read_text())
    ref = json.loads((reference_run / "history.json").read_text())
    for d, r in zip(ddp, ref, strict=True):
        assert d["train_loss"] == pytest.approx(r["train_loss"], abs=1e-5)
        # validation predictions gathered from both ranks give the 1-process metric
        assert d["val_pcc"] == pytest.approx(r["val_pcc"], abs=1e-4)
        assert d["val_mse"] == pytest.approx(r["val_mse"], abs=1e-5)
        # gradients are synchronised: both replicas hold identical weights after every epoch,
        # although each rank trained on different spots
        assert d["replica_max_diff"] == 0.0
        rank0, rank1 = d["first_step_indices"]
        assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)
        (single,) = r["first_step_indices"]
        assert set(rank0) | set(rank1) == set(single)  # together: the 1-process global batch
    m_ddp = json.loads((out / "metrics.json").read_text())
    m_ref = json.loads((reference_run / "metrics.json").read_text())
    assert m_ddp["world_size"] == 2 and m_ddp["best_epoch"] == m_ref["best_epoch"]
    # 47 validation spots over 2 ranks: DistributedSampler repeats one; it is dropped before the metric
    assert m_ddp["val"]["C4"]["n_spots"] == 47 and m_ddp["test"]["C2"]["n_spots"] == 47
    assert m_ddp["test"]["C2"]["pcc_m"] == pytest.approx(m_ref["test"]["C2"]["pcc_m"], abs=1e-4)
    # only rank 0 writes and logs
    assert log.count("epoch 1/2 train_loss") == 1


def test_ddp_without_gradient_sync_is_caught(tiny, tmp_path):
    """The reference bug (forwards bypassing the DDP wrapper) makes replicas drift; the trainer stops."""
    script = tmp_path / "no_sync.py"
    script.write_text(
        "import sys\n"
        "import training.run as tr\n"
        "from training.distributed import LossModule\n"
        "tr.wrap_for_training = lambda model, ctx, **kw: LossModule(model)  # no DDP: no gradient sync\n"
        "sys.exit(tr.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "nosync"
    rc, log = run_torchrun(
        [str(script), "--config", str(TINY), *tiny(out, "optim.epochs=1", "data.train=[C3]", "data.test=[]")]
    )
    assert rc != 0
    assert "gradients are not being synchronised" in log


@pytest.fixture(scope="module")
def random_radiomics_tables(tmp_path_factory, data_dir) -> str:
    """Random radiomics (6 columns) and cell labels for every her2st spot, one parquet per section."""
    import pandas as pd

    from napari_rapacl.io.spots import read_spots

    folder = tmp_path_factory.mktemp("radiomics")
    rng = np.random.default_rng(0)
    root = Path(data_dir) / "her2st" / "data"
    for name in ("C2", "C3", "C4", "C5"):
        spots = read_spots(root / "ST-spotfiles" / f"{name}_selection.tsv")
        frame = pd.DataFrame(rng.normal(size=(len(spots), 6)), index=spots.barcode, columns=list("abcdef"))
        frame["cell_label"] = rng.integers(0, 3, len(spots))
        frame.to_parquet(folder / f"her2st_{name}.parquet")
    return str(folder / "her2st_{section}.parquet")


@pytest.mark.parametrize(
    "model",
    [
        {"name": "nh2st_tiny", "config": {"dropout": 0.0}},
        {"name": "pixnet_tiny"},
        {
            "name": "rapacl_tiny",
            "stage": 1,
            "config": {"dropout": 0.0, "warmup_epochs": 0, "ramp_epochs": 1, "n_radiomics": 6},
        },
    ],
    ids=lambda m: m["name"],
)
def test_ddp_batch_level_losses_equal_one_process(model, tiny, tmp_path, random_radiomics_tables):
    """InfoNCE (NH2ST, RaPaCL Stage 1) and PixNet's per-gene PCC are statistics of the batch: under DDP
    they are computed over the gathered global batch, so 2 processes train exactly like 1."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"] = model
    # SGD: the weights are linear in the gradients (Adam would turn float noise in near-zero gradients
    # into +-lr steps), so equal weights mean equal gradients
    lr = 0.005 if model["name"].startswith("rapacl") else 0.05  # RaPaCL's reconstruction diverges at 0.05
    cfg["optim"].update(epochs=1, optimizer="sgd", lr=lr, momentum=0.9)
    if model["name"].startswith("rapacl"):
        cfg["data"]["radiomics_table"] = random_radiomics_tables
        cfg["run"]["find_unused_parameters"] = True
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref, ddp = tmp_path / "one", tmp_path / "two"
    train(load_config(config, tiny(ref)))
    rc, log = run_torchrun(["-m", "training.run", "--config", str(config), *tiny(ddp)])
    assert rc == 0, log[-4000:]
    assert "2 process(es) x batch 4 = global batch 8" in log
    # measured on nh2st_tiny: 3.7e-4 with the gathered batch (float summation order, amplified by the
    # 1/T = 14 logit scale over 12 steps), 1.3e-2 when each process used only its own rows
    diff = _max_diff(_weights(ddp / "last.pt"), _weights(ref / "last.pt"))
    assert diff < 2e-3, f"max weight difference {diff:.2e}"
    (h_ddp,), (h_ref,) = (json.loads((d / "history.json").read_text()) for d in (ddp, ref))
    assert h_ddp["train_loss"] == pytest.approx(h_ref["train_loss"], abs=1e-4)
    assert h_ddp["replica_max_diff"] == 0.0


def test_a_patch_cache_that_lies_is_extracted_again(tmp_path, data_dir):
    """#14 item 8: a patch cache overwritten with zeros (same shape, so it loads) no longer feeds
    training silently: its content hash does not match and the patches are extracted again."""
    from training.data import load_patches_cached

    from napari_rapacl.datasets import her2st

    sec = her2st("C2")
    x, y = sec.spots.x[:6], sec.spots.y[:6]
    first = load_patches_cached(sec.slide, x, y, size=32, mpp=4.0, cache_dir=tmp_path, key="c2")
    (path,) = tmp_path.glob("c2_*.npz")
    assert first.std() > 0
    with np.load(path) as npz:
        sha = npz["sha256"]
    np.savez(path.with_suffix(""), patches=np.zeros_like(first), sha256=sha)  # an all-zero cache
    assert np.load(path)["patches"].max() == 0
    again = load_patches_cached(sec.slide, x, y, size=32, mpp=4.0, cache_dir=tmp_path, key="c2")
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(path)["patches"], first)  # and the cache is repaired


# ------------------------------------------------------------------------------------------------
# gene panels (issue #12 item 3)
# ------------------------------------------------------------------------------------------------
def test_her2st785_markers_panel_resolves_on_training_counts(data_dir):
    """``her2st785+markers`` = the 785 benchmark genes, then the markers the training counts hold."""
    from training.config import DataConfig
    from training.data import HER2ST_MARKERS, load_her2st_section, resolve_gene_list, with_markers

    from napari_rapacl.datasets import her2st_genes

    data = DataConfig(data_dir=str(data_dir), genes="her2st785+markers")
    raw = [load_her2st_section(s, data) for s in ("C2", "C5")]  # both lack KRT5; C5 lacks PGR
    genes = resolve_gene_list(data, raw)
    base = her2st_genes(data_dir=data_dir)
    assert genes[: len(base)] == base  # the benchmark genes first, in their order
    added = genes[len(base) :]
    assert len(set(genes)) == len(genes)
    for g in ("ERBB2", "ESR1", "MKI67", "GRB7", "EPCAM", "CD3E", "MS4A1", "COL1A1", "ACTA2", "PGR"):
        assert g in added, g
    assert "CD74" in base and "PTPRC" in base and "CD74" not in added  # already benchmark genes
    assert "KRT5" not in genes  # in no training section's counts
    assert added == [g for g in HER2ST_MARKERS if g in added]  # the markers' order
    # with C3 (which holds KRT5) among the training sections it is predicted too
    c3 = load_her2st_section("C3", data)
    assert "KRT5" in with_markers(base, [raw[0], c3])
    # the targets of an added marker are its real log1p(CP10k) values, not zeros
    from napari_rapacl.preprocess import normalize_log1p_cp10k

    y = normalize_log1p_cp10k(raw[0].spots.counts, ["ERBB2"], missing="zero")
    assert y.max() > 1.0 and y.std() > 0.1


def test_unknown_gene_panel_names_the_choices(data_dir):
    from training.config import DataConfig
    from training.data import resolve_gene_list

    with pytest.raises(RapaclInputError, match="her2st785\\+markers"):
        resolve_gene_list(DataConfig(data_dir=str(data_dir), genes="her2st785+nothing"), [])


# ------------------------------------------------------------------------------------------------
# test-time spot smoothing (issue #12 item 1: a spot-graph lever chosen on the validation section)
# ------------------------------------------------------------------------------------------------
def test_smooth_over_spots_is_a_gaussian_mean_over_the_grid():
    from napari_rapacl.inference import smooth_over_spots, spot_smoothing_matrix

    xy = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0], [5000.0, 0.0]])
    pred = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, 0.0], [7.0, 3.0]], dtype=np.float32)
    assert smooth_over_spots(pred, xy, 0.0) is pred  # off
    out = smooth_over_spots(pred, xy, 100.0)
    w = np.exp(-0.5)  # neighbours 100 um away at sigma 100; 200 um (reach 250 um): exp(-2)
    w2 = np.exp(-2.0)
    expect0 = (pred[0] + w * pred[1] + w2 * pred[2]) / (1 + w + w2)
    np.testing.assert_allclose(out[0], expect0, rtol=1e-6)
    np.testing.assert_allclose(out[3], pred[3])  # an isolated spot keeps its prediction
    assert out.dtype == np.float32
    m = spot_smoothing_matrix(xy, 100.0)
    np.testing.assert_allclose(np.asarray(m.sum(1)).ravel(), 1.0)
    with pytest.raises(ValueError, match="one row per spot"):
        smooth_over_spots(pred[:3], xy, 100.0)


def test_smoothing_width_is_chosen_on_validation_and_stored_in_the_checkpoint(tmp_path):
    """Smooth truth + independent noise: smoothing must win on validation; pure-noise-free spots must
    keep sigma 0. The setting goes into the checkpoint and is read back by the product."""
    from training.postprocess import choose_sigma, write_postprocess

    from napari_rapacl.inference import model_postprocess, postprocess_spots
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import load_model, save_checkpoint

    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.arange(20) * 100.0, np.arange(20) * 100.0)
    xy = np.stack([gx.ravel(), gy.ravel()], 1)
    truth = np.stack([np.sin(xy[:, 0] / 400.0 + k) + np.cos(xy[:, 1] / 500.0 - k) for k in range(6)], 1)
    noisy = truth + rng.normal(0, 1.0, truth.shape)
    sigma, scores = choose_sigma([(noisy, truth, xy)])
    assert sigma > 0 and scores[sigma] > scores[0.0] + 0.05
    sigma_clean, _ = choose_sigma([(truth + 0.0, truth + rng.normal(0, 1e-3, truth.shape), xy)])
    assert sigma_clean == 0.0
    path = save_checkpoint(tmp_path / "m.pt", create_model("stnet_tiny", n_genes=3), genes=["a", "b", "c"])
    write_postprocess(path, {"smooth_sigma_um": sigma})
    model, payload = load_model(path)  # weights_only load still works
    assert model_postprocess(model, str(path)) == {"smooth_sigma_um": sigma}
    vals = postprocess_spots(noisy.astype(np.float32), xy, model.postprocess)
    assert not np.allclose(vals, noisy)


def test_predict_job_applies_the_checkpoints_spot_smoothing(tmp_path, data_dir):
    """A checkpoint's ``postprocess`` (as the benchmark scores it) is applied by jobs.iter_predict."""
    from training.postprocess import write_postprocess

    from napari_rapacl.datasets import her2st
    from napari_rapacl.inference import predict_spots, smooth_over_spots
    from napari_rapacl.jobs import iter_predict
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint
    from napari_rapacl.progress import run_to_completion

    sec = her2st("C2", data_dir=data_dir)
    s = sec.spots
    model = create_model("stnet_tiny", n_genes=4).eval()
    plain = save_checkpoint(tmp_path / "plain.pt", model, genes=["A", "B", "C", "D"])
    smooth = save_checkpoint(tmp_path / "smooth.pt", model, genes=["A", "B", "C", "D"])
    write_postprocess(smooth, {"smooth_sigma_um": 150.0})
    box = (4500, 5000, 7000, 7500)
    inside = np.flatnonzero((s.x >= 4500) & (s.x < 7000) & (s.y >= 5000) & (s.y < 7500))
    assert len(inside) >= 6
    raw = run_to_completion(iter_predict((None, plain), sec.slide, s, box, cache=False, device="cpu"))
    ref = predict_spots(model, sec.slide, s.x[inside], s.y[inside], device="cpu")
    np.testing.assert_allclose(raw.values, ref, rtol=1e-4, atol=1e-5)  # no setting: unchanged
    res = run_to_completion(iter_predict((None, smooth), sec.slide, s, box, cache=False, device="cpu"))
    xy_um = np.stack([s.x[inside], s.y[inside]], 1) * sec.slide.mpp
    np.testing.assert_allclose(res.values, smooth_over_spots(ref, xy_um, 150.0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(res.values, raw.values)
