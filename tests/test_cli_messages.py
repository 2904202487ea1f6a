"""CLI messages for people (#14 items 5 and 6): a warning is one line, not Python's ``file:line:
UserWarning`` with a source line; a full disk is one line that names the output and what to do, also
when HDF5 reports it as a multi-line text without an errno."""

from __future__ import annotations

import numpy as np

from helpers import run_cli

_main = run_cli


def test_a_warning_is_one_line_for_people(tmp_path, capsys):
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 80), 128, np.uint8)).save(grey)
    code, _, err = _main(capsys, "convert", grey, tmp_path / "grey.ome.tif", "--mpp", "0.5")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "greyscale" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "grey.png is a greyscale image" in err
    assert "UserWarning" not in err and ".py:" not in err and "open_slide(" not in err, err


def test_a_full_disk_is_one_line_naming_the_output(tmp_path, capsys, monkeypatch):
    import napari_rapacl.cli as cli

    hdf5_text = (
        "Can't close file (file write failed: time = Mon Dec  7 05:11:19 2026\n, filename = "
        f"'{tmp_path}/.p.h5ad.klo5mho4.tmp.h5ad', file descriptor = 4, errno = 28, error message = "
        "'No space left on device', buf = 0x7f8255171040, total write size = 2048)"
    )  # what h5py raised when `predict --out` went to a full tmpfs (an OSError without errno)

    short = OSError("307200 requested and 65536 written")  # numpy's tofile (convert) on a full tmpfs
    for error in (OSError(hdf5_text), OSError(28, "No space left on device"), short):

        def full(args, error=error):
            raise error

        monkeypatch.setattr(cli, "_convert", full)
        code, _, err = _main(capsys, "convert", tmp_path / "in.png", tmp_path / "out.ome.tif")
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "no space left on the disk while writing" in err and "out.ome.tif" in err, err
        assert "Free some space" in err and "file descriptor" not in err, err


def test_missing_sizes_name_the_command_line_option(tmp_path, capsys):
    """A slide without a pixel size given to ``segment``, and a Space Ranger folder without
    scalefactors_json.json given to ``predict``, name the option to pass (--mpp, --radius), not only
    the Python argument (the messages said "pass mpp=... when opening the slide", "pass radius=")."""
    from PIL import Image

    slide = tmp_path / "scan.png"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(slide)
    code, _, err = _main(capsys, "segment", "--slide", slide, "--out", tmp_path / "cells.csv")
    assert code == 2 and "pixel size (microns per pixel) is unknown" in err and "--mpp" in err, err
    spatial = tmp_path / "sr" / "spatial"
    spatial.mkdir(parents=True)
    (spatial / "tissue_positions.csv").write_text(
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\nAAAC-1,1,0,0,10,12\n"
    )
    from napari_rapacl._errors import RapaclInputError
    from napari_rapacl.io import read_spots

    try:
        read_spots(tmp_path / "sr")
    except RapaclInputError as exc:
        assert "no scalefactors_json.json" in str(exc) and "--radius" in str(exc), exc
    else:
        raise AssertionError("a folder without spot size was read")


def test_nan_weights_and_duplicate_genes_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A checkpoint with NaN weights predicted the same value at every spot and exited 0 (the frozen
    CPU predictor); one listing a gene twice was refused only after inference, without the file's name.
    Both are now refused when the checkpoint is loaded, naming the file (CLI: exit 2, before any tile)."""
    import pytest

    torch = pytest.importorskip("torch")
    import napari_rapacl.jobs as jobs
    from napari_rapacl._errors import CorruptFileError
    from napari_rapacl.jobs import load_model_choice
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("stnet_tiny", n_genes=3)
    good = save_checkpoint(tmp_path / "good.pt", model, genes=["ERBB2", "GAPDH", "ACTB"])
    dup = save_checkpoint(tmp_path / "dup.pt", model, genes=["ERBB2", "ERBB2", "ACTB"])
    first = next(iter(model.parameters()))
    with torch.no_grad():
        first.view(-1)[:7] = float("nan")
    nan = save_checkpoint(tmp_path / "nan.pt", model, genes=["ERBB2", "GAPDH", "ACTB"])
    assert load_model_choice(None, good).genes == ["ERBB2", "GAPDH", "ACTB"]
    with pytest.raises(CorruptFileError, match=r"nan\.pt: 7 of the .* weights of .* are NaN or infinite"):
        load_model_choice(None, nan)
    with pytest.raises(CorruptFileError, match=r"dup\.pt: lists the gene ERBB2 twice"):
        load_model_choice(None, dup)
    from napari_rapacl.models.checkpoint import load_model

    with pytest.raises(CorruptFileError, match=r"nan\.pt: 7 of the"):  # the Python API too
        load_model(nan)

    def no_work(*a, **k):
        raise AssertionError("prediction started")

    monkeypatch.setattr(jobs, "iter_predict", no_work)
    from PIL import Image

    slide = tmp_path / "s.png"
    Image.fromarray(np.full((64, 80, 3), 150, np.uint8)).save(slide)
    spots = tmp_path / "spots.csv"
    spots.write_text("x,y,radius\n20,20,8\n40,30,8\n")
    for ckpt, needle in ((nan, "are NaN or infinite"), (dup, "lists the gene ERBB2 twice")):
        code, _, err = _main(
            capsys, "predict", "--slide", slide, "--spots", spots, "--checkpoint", ckpt, "--mpp", "0.5",
            "--out", tmp_path / "p.h5ad", "--device", "cpu",
        )  # fmt: skip
        assert code == 2 and needle in err and str(ckpt) in err and len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "p.h5ad").exists()


def test_checkpoint_misfits_fifos_and_a_missing_gpu_are_named_before_any_work(tmp_path, capsys, monkeypatch):
    """Weights that do not fit the gene count name the tensor and both shapes (the message ended on
    torch's header line); a FIFO given as the checkpoint is named as one (it said "not found"); and
    ``--device cuda`` without a GPU is refused before the slide is read (it came after the job started)."""
    import os

    import pytest

    torch = pytest.importorskip("torch")
    import napari_rapacl.jobs as jobs
    from napari_rapacl._errors import CorruptFileError, UnsupportedFormatError
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import load_model, save_checkpoint

    model = create_model("stnet_tiny", n_genes=3)
    path = save_checkpoint(tmp_path / "genes.pt", model, genes=["ERBB2", "GAPDH", "ACTB"])
    payload = torch.load(path, weights_only=True)
    payload["config"]["n_genes"] = 5
    payload["genes"] = ["ERBB2", "GAPDH", "ACTB", "ESR1", "PGR"]
    torch.save(payload, path)
    with pytest.raises(CorruptFileError) as err:
        load_model(path)
    text = str(err.value)
    assert "genes.pt: its weights do not fit the 'stnet_tiny' architecture" in text
    assert "size mismatch for" in text and "torch.Size([3" in text and "torch.Size([5" in text, text
    assert "\n" not in text

    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFormatError, match=r"checkpoint .*pipe\.pt is a named pipe \(FIFO\)"):
        load_model(fifo)
    with pytest.raises(CorruptFileError, match=r"checkpoint .* is a folder: give the \.pt file"):
        load_model(tmp_path)

    if torch.cuda.is_available():
        return

    def no_open(*a, **k):
        raise AssertionError("the inputs were opened")

    monkeypatch.setattr(jobs, "open_inputs", no_open)
    code, _, err = _main(
        capsys, "predict", "--slide", tmp_path / "s.png", "--spots", tmp_path / "spots.csv",
        "--checkpoint", path, "--out", tmp_path / "p.h5ad", "--device", "cuda",
    )  # fmt: skip
    assert code == 2 and "device 'cuda' requested but no CUDA GPU is available here" in err, err
