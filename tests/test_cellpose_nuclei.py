"""The project's cellpose nucleus model (issue #11 item 3): trained with cellpose's own API on TNBC crops,
installed by name, used by ``segment_nuclei`` and ``napari-rapacl segment``; clear messages when it is
not built. The real training (minutes) is ``python -m training.cellpose_nuclei``; here a few steps of a
narrow network on three small crops prove the path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_rapacl import segmentation as seg
from napari_rapacl._errors import RapaclInputError
from napari_rapacl.progress import run_to_completion
from napari_rapacl.segmentation import _cellpose_train as ct

pytest.importorskip("cellpose")
if seg.cellpose_major_version() != 3:  # pragma: no cover - CI installs cellpose 3.x
    pytest.skip("the project's nucleus model is a cellpose 3.x model", allow_module_level=True)

#: A few optimiser steps of a narrow U-Net on small crops: seconds on one CPU core.
TINY = {
    "crop": 128,
    "epochs": 2,
    "images_per_epoch": 4,
    "batch_size": 2,
    "bsize": 64,
    "nbase": (2, 8, 16, 32),
    "stain_copies": 1,
    "threads": 1,
}


def _tiles(data_dir):
    tnbc = data_dir / "tnbc_nuclei"
    if not (tnbc / "Slide_01").is_dir():
        pytest.skip(f"TNBC nuclei data not found in {tnbc} (see ../shared/data/tnbc_nuclei/README.md)")
    tiles = [t for t in ct.tnbc_tiles(tnbc, (1,)) if t["name"] in ("01_1", "01_2", "01_4")]
    assert len(tiles) == 3  # development patient 01, crops with nuclei
    return tiles


@pytest.fixture()
def models_dir(cellpose_models):
    return cellpose_models


@pytest.fixture(scope="module")
def tiles(data_dir):
    return _tiles(data_dir)


def _train(tiles, **kwargs):
    stages = []
    path = run_to_completion(
        ct.iter_train_nuclei_model(tiles=tiles, seed=0, **{**TINY, **kwargs}), lambda p: stages.append(p)
    )
    return path, stages


def test_training_installs_the_model_by_name_and_it_segments(models_dir, tiles, tmp_path):
    import torch

    path, stages = _train(tiles)
    assert path == models_dir / seg.PROJECT_NUCLEI_MODEL
    train = [p for p in stages if p.stage == "training cellpose"]
    assert train and train[-1].done == train[-1].total == 2 * 2  # epochs x (4 images / batch of 2)
    side = json.loads(ct.sidecar_path(path).read_text())
    assert side["train_mpp"] == ct.TRAIN_MPP and side["input"] == "haematoxylin"
    assert side["nbase"] == [2, 8, 16, 32] and side["settings"]["seed"] == 0
    assert seg.PROJECT_NUCLEI_MODEL in (models_dir / "gui_models.txt").read_text().split()
    assert not list(models_dir.glob("*.tmp"))  # written atomically, nothing left over

    # resolvable by name, the default, first among the choices (no network probe offline)
    assert seg.project_nuclei_model_built()
    assert seg.resolve_cellpose_model(seg.PROJECT_NUCLEI_MODEL) == path
    assert seg.resolve_cellpose_model(None) == path
    assert seg.cellpose_model_choices()[0] == seg.PROJECT_NUCLEI_MODEL
    assert seg.cellpose_model_settings(None)["min_area_um2"] == ct.PROJECT_MIN_AREA_UM2

    # deterministic for a seed: a second run to another file has equal weights
    again, _ = _train(tiles, out=tmp_path / "again")
    a = torch.load(path, map_location="cpu", weights_only=True)
    b = torch.load(again, map_location="cpu", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # segment_nuclei with the project model (by name and by default): resampled to the training mpp
    rgb = tiles[0]["rgb"][:128, :128]
    labels = seg.segment_nuclei(rgb, ct.TNBC_MPP, "cellpose", model=seg.PROJECT_NUCLEI_MODEL)
    assert labels.shape == (128, 128) and labels.dtype == np.int32
    ids = np.unique(labels[labels > 0])
    assert len(ids) == 0 or (ids.min() == 1 and ids.max() == len(ids))
    assert np.array_equal(seg.segment_nuclei(rgb, ct.TNBC_MPP, "cellpose"), labels)
    net = seg.load_cellpose_model(seg.PROJECT_NUCLEI_MODEL)
    assert [m.out_channels for m in net.net.modules() if hasattr(m, "out_channels")][:1] == [8]


def test_segment_cli_runs_the_project_model(models_dir, tiles, tmp_path, capsys):
    from PIL import Image

    from napari_rapacl import cli

    _train(tiles)
    slide = tmp_path / "tile.png"
    Image.fromarray(tiles[1]["rgb"][:160, :160]).save(slide)
    out = tmp_path / "cells.csv"
    assert (
        cli.main(
            ["segment", "--slide", str(slide), "--mpp", "0.25", "--out", str(out), "--method", "cellpose"]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert f"model {seg.PROJECT_NUCLEI_MODEL}" in said and out.is_file()
    out2 = tmp_path / "cells2.csv"
    argv = ["segment", "--slide", str(slide), "--mpp", "0.25", "--out", str(out2), "--method", "cellpose"]
    assert cli.main([*argv, "--model", seg.PROJECT_NUCLEI_MODEL]) == 0
    assert out.read_text() == out2.read_text()


def test_not_built_offline_names_the_build_command(models_dir, tmp_path, capsys):
    from napari_rapacl import cli

    assert not seg.project_nuclei_model_built()
    assert seg.cellpose_model_choices() == []  # offline, nothing local: nothing to offer
    with pytest.raises(seg.CellposeModelUnavailableError, match="python -m training.cellpose_nuclei"):
        seg.resolve_cellpose_model(seg.PROJECT_NUCLEI_MODEL)
    with pytest.raises(seg.CellposeModelUnavailableError, match="python -m training.cellpose_nuclei"):
        seg.resolve_cellpose_model(None)  # the default ('nuclei') cannot be downloaded either
    slide = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(slide)
    argv = ["segment", "--slide", str(slide), "--mpp", "0.25", "--out", str(tmp_path / "c.csv")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--method", "cellpose", "--model", seg.PROJECT_NUCLEI_MODEL])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "python -m training.cellpose_nuclei" in err and "--build-model" in err and "minutes" in err
    assert not (tmp_path / "c.csv").exists()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--build-model"])  # only with --method cellpose
    assert "--method cellpose" in capsys.readouterr().err


def test_training_refuses_held_out_patients_and_cancels_cleanly(models_dir, tiles, tmp_path):
    with pytest.raises(RapaclInputError, match="held-out"):
        next(ct.iter_train_nuclei_model(tmp_path, patients=(8, 9)))
    # closing the generator during training (a cancelled GUI worker) stops it and installs nothing
    gen = ct.iter_train_nuclei_model(tiles=tiles, seed=0, **{**TINY, "epochs": 50})
    for p in gen:
        if p.stage == "training cellpose":
            break
    gen.close()
    assert not (models_dir / seg.PROJECT_NUCLEI_MODEL).exists()
    assert not seg.project_nuclei_model_built()


def test_jobs_build_is_the_same_generator(models_dir, tiles):
    from napari_rapacl.jobs import iter_build_nuclei_model

    tiny = {k: v for k, v in TINY.items() if k not in ("epochs", "threads")}
    path = run_to_completion(iter_build_nuclei_model(epochs=1, threads=1, tiles=tiles, **tiny))
    assert path == models_dir / seg.PROJECT_NUCLEI_MODEL and seg.project_nuclei_model_built()
