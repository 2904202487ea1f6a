"""Helpers shared by several test files (imported by them; pytest does not collect this file).

* :func:`run_cli`: the CLI in this process, returning its exit code, stdout and stderr;
* :func:`small_prediction`: a prediction AnnData over a small synthetic OME-TIFF slide (the SpatialData
  export and reader tests);
* :func:`train_tiny_stnet`: a tiny baseline trained here on real her2st patches (C3, validated on C4),
  with real weights, optionally storing each gene's validation r the way training stores it;
* :func:`look_at`: put napari's camera on a level-0 point with a given field of view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``napari-rapacl`` with ``args`` in this process; returns (exit code, stdout, stderr)."""
    from napari_rapacl.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def small_prediction(folder: Path, genes, reliability: dict[str, float], provenance: dict | None = None):
    """``(adata, slide, spots, values, rgb)``: 40 spots with random values for ``genes`` on a 2300 x 2600 px
    random slide at 0.5 um/px (two image levels), written as an OME-TIFF in ``folder``."""
    from napari_rapacl.io.slide import open_slide, write_ome_tiff
    from napari_rapacl.io.spots import Spots
    from napari_rapacl.jobs import prediction_adata

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2300, 2600, 3), dtype=np.uint8)  # > 2 x 1024: two image levels
    slide = open_slide(write_ome_tiff(folder / "s.ome.tif", img, mpp=0.5, tile=256))
    n = 40
    spots = Spots(
        barcode=[f"AC{i:03d}-1" for i in range(n)],
        x=rng.uniform(60, 2500, n),
        y=rng.uniform(60, 2200, n),
        radius=np.full(n, 55.0),
        mpp=0.5,
    )
    values = rng.normal(size=(n, len(genes))).astype(np.float32)
    adata = prediction_adata(
        values,
        list(genes),
        spots,
        slide=slide,
        library_id="C2",
        gene_reliability=reliability,
        provenance=provenance,
    )
    return adata, slide, spots, values, img


def train_tiny_stnet(
    path: Path, *, epochs: int, max_spots: int | None = None, reliability: bool = False
) -> Path:
    """Train ``stnet_tiny`` over the her2st genes on C3 (validated on C4) and save it at ``path``.

    ``max_spots`` keeps the first spots of each section (faster); ``reliability`` stores the per-gene
    Pearson r on C4 (``gene_reliability``) in the checkpoint.
    """
    import torch

    from napari_rapacl.datasets import her2st, her2st_genes
    from napari_rapacl.inference import images_to_tensor
    from napari_rapacl.metrics import pearson_per_gene
    from napari_rapacl.models import create_model
    from napari_rapacl.models.checkpoint import gene_reliability_entry, save_checkpoint
    from napari_rapacl.models.fit import fit_patch_regressor
    from napari_rapacl.preprocess import extract_patches, normalize_log1p_cp10k

    genes = her2st_genes()
    model = create_model("stnet_tiny", n_genes=len(genes))
    cfg = model.config
    data = []
    for name in ("C3", "C4"):
        sec = her2st(name)
        spots = sec.spots
        if max_spots is not None:
            spots = spots.subset(np.arange(min(max_spots, len(spots))))
        data.append(
            (
                extract_patches(sec.slide, spots.x, spots.y, size=cfg.patch_size, mpp=cfg.mpp),
                normalize_log1p_cp10k(spots.counts, genes, missing="zero"),
            )
        )
    fit_patch_regressor(model, *data[0], *data[1], epochs=epochs, batch_size=32)
    extra = {}
    if reliability:
        model.eval()
        with torch.no_grad():
            pred = model.predict({"image": images_to_tensor(data[1][0])}).numpy()
        extra["gene_reliability"] = gene_reliability_entry(pearson_per_gene(pred, data[1][1]), genes, ["C4"])
    return save_checkpoint(path, model, genes=genes, **extra)


def look_at(viewer, qtbot, center_px, width_px: float, mpp: float, wait_ms: int = 400) -> None:
    """Centre the camera on ``center_px`` (level-0 (row, col)) with ``width_px`` level-0 px across, then
    let napari draw a few times (it updates the layers' corner_pixels and data_level)."""
    from napari_rapacl._napari._widgets import viewer_camera

    cam = viewer_camera(viewer)
    cam.center = (0, *(np.asarray(center_px, float) * mpp))
    cam.zoom = viewer.canvas.size[1] / (width_px * mpp)
    qtbot.wait(wait_ms)
