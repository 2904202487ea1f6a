"""The main job on the built-in default: her2st -> image-only baseline -> predictions -> .h5ad + PNG.

Train the small baseline (``stnet``, ResNet18, random init: no pretrained weights are reachable
offline) on her2st sections C3, C4, C5, choose the epoch on C6 (inner validation), predict held-out
section C2 through the lazy slide, and write

* ``<out>/stnet_her2st.pt`` (+ ``.yaml`` config) — the checkpoint,
* ``<out>/C2_prediction.h5ad`` — predictions in ``X``, measured log1p(CP10k) in ``layers['measured']``,
  opens with ``scanpy.pl.spatial`` / ``squidpy.pl.spatial_scatter``,
* ``<out>/C2_prediction.png`` — predicted vs measured for the best-predicted genes on the slide,

and install the model in the user's model folder (:func:`napari_rapacl.jobs.install_model`) as
:data:`READY_MODEL_NAME`, so the Predict widget lists it by name with its genes, validation scores and
training data. The checkpoint stores each gene's Pearson r on the validation section
(``gene_reliability``).

The configuration the main job trains is :data:`READY_MODEL` (one place to switch it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


#: Name under which the main job installs its model in the user's model folder.
READY_MODEL_NAME = "her2st-stnet"

#: The configuration the main job trains and installs (the best single model that trains within the
#: main job's 10-minute CPU budget). Switch it here; ``model`` must be an image-only patch regressor
#: (``model(images) -> (B, genes)``), as :func:`~napari_rapacl.models.fit.fit_patch_regressor` trains.
READY_MODEL = {
    "model": "stnet",
    "backbone": "resnet18",
    "patch_size": 64,
    "mpp": 2.0,  # 64 px at 2 um/px = a 128 um field around each 100 um spot
    "epochs": 15,
    "batch_size": 32,
    "lr": 1e-3,
}


@dataclass
class DemoConfig:
    test_section: str = "C2"
    train_sections: tuple[str, ...] = ("C3", "C4", "C5")
    val_section: str = "C6"
    model: str = READY_MODEL["model"]
    backbone: str = READY_MODEL["backbone"]
    patch_size: int = READY_MODEL["patch_size"]
    mpp: float = READY_MODEL["mpp"]
    epochs: int = READY_MODEL["epochs"]
    batch_size: int = READY_MODEL["batch_size"]
    lr: float = READY_MODEL["lr"]
    seed: int = 0
    device: str = "auto"
    install_as: str | None = READY_MODEL_NAME  # None: do not install


@dataclass
class DemoResult:
    h5ad: Path
    figure: Path
    checkpoint: Path
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    installed: Path | None = None  # the installed checkpoint in the user's model folder


def _section_data(sec, genes: list[str], cfg: DemoConfig):
    from .preprocess import extract_patches, normalize_log1p_cp10k

    y = normalize_log1p_cp10k(sec.spots.counts, genes, missing="zero")
    x = extract_patches(sec.slide, sec.spots.x, sec.spots.y, size=cfg.patch_size, mpp=cfg.mpp)
    return sec, x, y


def _xy_um(section) -> np.ndarray:
    """``(n, 2)`` spot centres of a her2st section in um (what spot smoothing measures distances in)."""
    mpp = float(section.slide.require_mpp("spot smoothing"))
    return np.stack([section.spots.x, section.spots.y], axis=1).astype(np.float64) * mpp


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> DemoResult:
    import torch

    from .datasets import her2st, her2st_genes, with_markers
    from .export import checkpoint_sha256, to_anndata, write_h5ad
    from .inference import postprocess_spots, predict_spots, resolve_device, smoothing_setting
    from .metrics import pearson_per_gene, summarize
    from .models import create_model
    from .models.checkpoint import gene_reliability_entry, save_checkpoint
    from .models.fit import fit_patch_regressor, predict_patches

    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    log.info("loading her2st sections and extracting %d px patches at %.2f um/px", cfg.patch_size, cfg.mpp)
    sections = {name: her2st(name) for name in (*cfg.train_sections, cfg.val_section)}
    genes, _ = with_markers(her2st_genes(), [sections[s].spots.counts.var_names for s in cfg.train_sections])
    train = [_section_data(sections[s], genes, cfg) for s in cfg.train_sections]
    val_sec, val_x, val_y = _section_data(sections[cfg.val_section], genes, cfg)
    train_x = np.concatenate([t[1] for t in train])
    train_y = np.concatenate([t[2] for t in train])

    model = create_model(
        cfg.model, n_genes=len(genes), backbone=cfg.backbone, patch_size=cfg.patch_size, mpp=cfg.mpp
    )
    log.info(
        "training %s on %d spots (%s), validating on %s",
        cfg.model,
        len(train_x),
        cfg.train_sections,
        cfg.val_section,
    )
    fit = fit_patch_regressor(
        model,
        train_x,
        train_y,
        val_x,
        val_y,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        device=device,
    )
    # the test-time spot smoothing, chosen on the inner validation section (as training.run does), and
    # each gene's Pearson r there with the selected weights and that smoothing: what the viewer shows
    val_pred = predict_patches(model, val_x, device=device)
    val_xy = _xy_um(val_sec)
    postprocess = smoothing_setting([(val_pred, val_y, val_xy)], [cfg.val_section])
    sigma = postprocess["smooth_sigma_um"]
    val_pcc = postprocess["val_pcc_by_sigma"]  # by width, in um
    val_r = pearson_per_gene(postprocess_spots(val_pred, val_xy, postprocess), val_y)
    log.info(
        "spot smoothing chosen on %s: sigma %g um (validation mean PCC %.4f; %.4f without)",
        cfg.val_section,
        sigma,
        val_pcc[f"{sigma:g}"],
        val_pcc["0"],
    )
    training = {
        "dataset": "her2st",
        "train": list(cfg.train_sections),
        "val": cfg.val_section,
        "test": cfg.test_section,
        "genes": "her2st785+markers",
        "best_epoch": fit.best_epoch,
        "best_val_pcc": fit.best_val_pcc,
        "epochs": cfg.epochs,
        "history": fit.history,
    }
    ckpt = save_checkpoint(
        out / "stnet_her2st.pt",
        model,
        genes=genes,
        training=training,
        gene_reliability=gene_reliability_entry(val_r, genes, cfg.val_section),
        postprocess=postprocess,
    )
    installed = None
    if cfg.install_as:
        from .jobs import install_model

        installed = install_model(
            ckpt,
            cfg.install_as,
            description=(
                f"{cfg.model} ({cfg.backbone}, {cfg.patch_size} px at {cfg.mpp:g} um/px) trained by the main "
                f"job on her2st {', '.join(cfg.train_sections)}; epoch chosen on {cfg.val_section}"
            ),
            training={k: v for k, v in training.items() if k != "history"},
            validation={
                "section": cfg.val_section,
                "pcc_m": val_pcc[f"{sigma:g}"],
                "pcc_m_unsmoothed": fit.best_val_pcc,
                "spot_smoothing_um": sigma,
                "best_epoch": fit.best_epoch,
            },
        )
        log.info("installed the model as %r: %s", cfg.install_as, installed)

    test = her2st(cfg.test_section)
    log.info("predicting %d spots of %s through the lazy slide", len(test.spots), cfg.test_section)
    pred = predict_spots(
        model, test.slide, test.spots.x, test.spots.y, radius=test.spots.radius, device=device
    )
    pred = postprocess_spots(pred, _xy_um(test), postprocess)
    from .preprocess import normalize_log1p_cp10k

    measured = normalize_log1p_cp10k(test.spots.counts, genes, missing="zero")
    metrics = summarize(pred, measured, genes)

    adata = to_anndata(
        pred,
        genes,
        test.spots,
        slide=test.slide,
        library_id=cfg.test_section,
        measured={"measured": measured},
        provenance={
            "model": cfg.model,
            "checkpoint": str(ckpt),
            "checkpoint_sha256": checkpoint_sha256(ckpt),
            "config": model.config.to_dict(),
            "demo": cfg.__dict__,
            "metrics": metrics,
        },
    )
    h5ad = write_h5ad(adata, out / f"{cfg.test_section}_prediction.h5ad")
    figure = plot_prediction(
        adata, measured, pred, genes, metrics, out / f"{cfg.test_section}_prediction.png"
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return DemoResult(
        h5ad=h5ad,
        figure=figure,
        checkpoint=ckpt,
        metrics=metrics,
        seconds=time.perf_counter() - t0,
        installed=installed,
    )


def plot_prediction(adata, measured, pred, genes, metrics, path: Path, n_genes: int = 3) -> Path:
    """Predicted vs measured for the best-predicted genes, drawn on the slide's hires image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    from .metrics import pearson_per_gene

    r = np.nan_to_num(pearson_per_gene(pred, measured))
    best = np.argsort(-r, kind="stable")[:n_genes]
    lib = next(iter(adata.uns["spatial"]))
    img = adata.uns["spatial"][lib]["images"]["hires"]
    sf = adata.uns["spatial"][lib]["scalefactors"]
    xy = adata.obsm["spatial"] * sf["tissue_hires_scalef"]
    radius = sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"] / 2
    lo, hi = xy.min(axis=0) - 4 * radius, xy.max(axis=0) + 4 * radius  # zoom on the spots
    fig, axes = plt.subplots(2, n_genes, figsize=(4.2 * n_genes, 8.4), squeeze=False)
    for col, g in enumerate(best):
        for row, (vals, what) in enumerate(((measured[:, g], "measured"), (pred[:, g], "predicted"))):
            ax = axes[row, col]
            ax.imshow(img)
            # circles sized in image pixels: the true 100 um spot footprint on the slide
            spots = PatchCollection([Circle(c, radius) for c in xy], cmap="viridis", edgecolors="none")
            spots.set_array(vals)
            ax.add_collection(spots)
            ax.set_title(f"{genes[g]} {what}" + (f" (r = {r[g]:.2f})" if row else ""), fontsize=10)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])
            ax.set_axis_off()
            fig.colorbar(spots, ax=ax, fraction=0.046, pad=0.02, label="log1p(CP10k)")
    fig.suptitle(
        f"{lib}: image-only baseline, held-out section. Mean PCC over {metrics['n_genes']} genes "
        f"{metrics['pcc_m']:.3f} (median {metrics['pcc_s']:.3f})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
