"""Synthetic data for tests and benchmarks: an H&E-like image with known nuclei.

Not imported by the package itself; numpy and scipy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .segmentation._common import _positive, _relabel_by_size

__all__ = ["synthetic_he_nuclei"]

_H_OD = np.array([0.65, 0.70, 0.29])  # haematoxylin, eosin absorbance directions (Ruifrok & Johnston)
_E_OD = np.array([0.07, 0.99, 0.11])


def synthetic_he_nuclei(
    shape: tuple[int, int] = (512, 512),
    *,
    mpp: float = 0.5,
    n_nuclei: int = 60,
    n_touching_pairs: int = 10,
    diameter_um: tuple[float, float] = (6.0, 11.0),
    max_elongation: float = 1.6,
    centers: Any = None,
    blank_fraction: float = 0.0,
    noise: float = 8.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image with known nuclei, for validating segmenters.

    Pink (eosin) tissue with a slowly varying stain density, dark purple (haematoxylin) elliptical
    nuclei with texture and a soft edge, ``n_touching_pairs`` pairs of nuclei that touch, optionally a
    white glass strip on the right (``blank_fraction`` of the width), and Gaussian pixel noise. Colours
    follow Beer-Lambert with the haematoxylin and eosin absorbance vectors behind ``rgb2hed``.

    Parameters
    ----------
    shape
        ``(H, W)``.
    mpp
        Microns per pixel (sets the nucleus size in pixels).
    n_nuclei
        Single (non-touching) nuclei to place (fewer if they do not fit).
    n_touching_pairs
        Pairs of nuclei that touch each other (each counts two nuclei).
    diameter_um
        Range of the ellipse's mean diameter (um).
    max_elongation
        Largest major/minor axis ratio.
    centers
        Optional ``(k, 2)`` (y, x) centres placed first (single nuclei), e.g. on tile borders.
    blank_fraction
        Fraction of the width, on the right, that is glass (no tissue).
    noise
        Standard deviation of the per-pixel noise (grey levels).
    seed
        Random seed; the output is a deterministic function of the arguments.

    Returns
    -------
    rgb, labels
        ``(H, W, 3)`` uint8 and ``(H, W)`` int32 ground truth (1..n; touching pairs split along the
        boundary where each ellipse's normalised radius is smaller).
    """
    rng = np.random.default_rng(seed)
    hgt, wid = int(shape[0]), int(shape[1])
    mpp = _positive(mpp, "mpp")
    tissue_w = int(round(wid * (1.0 - float(blank_fraction))))
    labels = np.zeros((hgt, wid), dtype=np.int32)
    best_q = np.full((hgt, wid), np.inf, dtype=np.float32)
    occupied = np.zeros((hgt, wid), dtype=bool)
    conc = np.zeros((hgt, wid), dtype=np.float32)  # haematoxylin concentration of nuclei

    def footprint(cy: float, cx: float, a: float, b: float, theta: float) -> tuple[Any, ...] | None:
        r = int(math.ceil(max(a, b))) + 3
        y0, y1 = max(0, int(cy) - r), min(hgt, int(cy) + r + 2)
        x0, x1 = max(0, int(cx) - r), min(tissue_w, int(cx) + r + 2)
        if y1 <= y0 or x1 <= x0:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        c, s = math.cos(theta), math.sin(theta)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        q = (u / a) ** 2 + (v / b) ** 2
        if not (q <= 1.0).any():
            return None
        halo = q <= (1.0 + 3.0 / min(a, b)) ** 2  # keep ~3 px of stroma around each nucleus
        return (slice(y0, y1), slice(x0, x1)), q, halo

    def free(fp: tuple[Any, ...] | None) -> bool:
        return fp is not None and not occupied[fp[0]][fp[2]].any()

    def paint(fp: tuple[Any, ...], label: int) -> None:
        sl, q, halo = fp
        inside = q <= 1.0
        sub_q = best_q[sl]
        win = inside & (q < sub_q)
        labels[sl][win] = label
        sub_q[win] = q[win]
        occupied[sl] |= halo
        dens = rng.uniform(0.7, 1.1)
        edge = np.clip((1.0 - q) * 6.0, 0.0, 1.0)  # soft edge, ~1 px wide
        conc[sl] = np.maximum(conc[sl], dens * edge)

    def random_axes() -> tuple[float, float, float]:
        d = rng.uniform(*diameter_um) / mpp
        e = rng.uniform(1.0, max_elongation)
        a, b = 0.5 * d * math.sqrt(e), 0.5 * d / math.sqrt(e)
        return a, b, rng.uniform(0, math.pi)

    def radius_towards(a: float, b: float, theta: float, phi: float) -> float:
        t = phi - theta
        return 1.0 / math.sqrt((math.cos(t) / a) ** 2 + (math.sin(t) / b) ** 2)

    label = 0
    if centers is not None:
        for cy, cx in np.asarray(centers, dtype=float).reshape(-1, 2):
            fp = footprint(cy, cx, *random_axes())
            if free(fp):
                paint(fp, label + 1)
                label += 1
    margin = 0.5 * diameter_um[1] / mpp + 2
    placed_pairs = 0
    for _ in range(n_touching_pairs * 50):
        if placed_pairs >= n_touching_pairs:
            break
        a1, b1, t1 = random_axes()
        a2, b2, t2 = random_axes()
        cy, cx = rng.uniform(margin * 2, hgt - margin * 2), rng.uniform(margin * 2, tissue_w - margin * 2)
        phi = rng.uniform(0, 2 * math.pi)
        dist = radius_towards(a1, b1, t1, phi) + radius_towards(a2, b2, t2, phi + math.pi) - 1.0
        cy2, cx2 = cy + dist * math.sin(phi), cx + dist * math.cos(phi)
        if not (margin <= cy2 < hgt - margin and margin <= cx2 < tissue_w - margin):
            continue
        fp1, fp2 = footprint(cy, cx, a1, b1, t1), footprint(cy2, cx2, a2, b2, t2)
        if not (free(fp1) and free(fp2)):
            continue
        paint(fp1, label + 1)
        paint(fp2, label + 2)
        label += 2
        placed_pairs += 1
    placed = 0
    for _ in range(n_nuclei * 50):
        if placed >= n_nuclei:
            break
        cy, cx = rng.uniform(margin, hgt - margin), rng.uniform(margin, tissue_w - margin)
        fp = footprint(cy, cx, *random_axes())
        if free(fp):
            paint(fp, label + 1)
            label += 1
            placed += 1
    # stain densities: eosin everywhere in tissue (slowly varying), haematoxylin in nuclei (textured)
    yy, xx = np.mgrid[0:hgt, 0:wid].astype(np.float32)
    eosin = 0.6 + 0.2 * np.sin(xx / 57.0 + rng.uniform(0, 6)) * np.cos(yy / 43.0 + rng.uniform(0, 6))
    hema = 0.3 + 0.1 * np.sin(xx / 23.0) * np.sin(yy / 31.0)  # background haematoxylin (cytoplasm, stroma)
    texture = ndi.gaussian_filter(rng.normal(0.0, 1.0, (hgt, wid)).astype(np.float32), 1.0)
    hema = hema + conc * (2.8 + 0.6 * texture)  # nuclei: RGB about (35, 40, 110), as on her2st
    eosin = eosin * (1.0 - 0.5 * np.clip(conc, 0, 1))
    if tissue_w < wid:
        eosin[:, tissue_w:] = 0.04
        hema[:, tissue_w:] = 0.02
    od = hema[..., None] * _H_OD + eosin[..., None] * _E_OD
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, float(noise), (hgt, wid, 3))
    labels = _relabel_by_size(labels, 1, np.inf)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels
