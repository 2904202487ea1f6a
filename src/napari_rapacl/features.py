"""Weight-free handcrafted patch features: colour, stain, texture and a nucleus proxy.

They feed the ridge baseline of the her2st benchmark (``benchmarks/her2st_accuracy.py``): a model
with no learned image weights at all, which every deep model should beat.
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES: tuple[str, ...] = (
    *(f"rgb_{c}_{s}" for c in "rgb" for s in ("mean", "std")),
    *(f"hed_{c}_{s}" for c in "hed" for s in ("mean", "std")),
    "h_p10", "h_p50", "h_p90",
    "grad_mean", "grad_std", "laplace_var",
    *(f"glcm_{p}_d{d}" for d in (1, 3) for p in ("contrast", "homogeneity", "energy", "correlation")),
    "dark_fraction", "dark_blobs", "dark_blob_area",
)  # fmt: skip


#: haematoxylin optical density (skimage ``rgb2hed``) above which a pixel counts as nuclear; on her2st
#: patches the median pixel is about 0.05 and nuclei are above about 0.12
DARK_H = 0.12


def patch_features(patches: np.ndarray) -> np.ndarray:
    """``(n, h, w, 3)`` uint8 patches -> ``(n, len(FEATURE_NAMES))`` float64 features."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops

    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError(f"patches must be (n, h, w, 3) uint8, got {patches.shape} {patches.dtype}")
    out = np.zeros((len(patches), len(FEATURE_NAMES)))
    for i, patch in enumerate(patches):
        rgb = patch.astype(np.float64) / 255.0
        hed = rgb2hed(patch)
        grey = rgb @ np.array([0.299, 0.587, 0.114])
        h = hed[..., 0]
        gy, gx = np.gradient(grey)
        grad = np.hypot(gx, gy)
        q = np.clip(grey * 32, 0, 31).astype(np.uint8)
        glcm = graycomatrix(
            q, distances=[1, 3], angles=[0, np.pi / 2], levels=32, symmetric=True, normed=True
        )
        texture = [
            graycoprops(glcm, p)[d].mean()
            for d in range(2)
            for p in ("contrast", "homogeneity", "energy", "correlation")
        ]
        dark = h > DARK_H  # haematoxylin-rich pixels: a nucleus proxy
        dark = ndi.binary_opening(dark, iterations=1)
        labels, n_blobs = ndi.label(dark)
        blob_area = dark.sum() / n_blobs if n_blobs else 0.0
        out[i] = [
            *(v for c in range(3) for v in (rgb[..., c].mean(), rgb[..., c].std())),
            *(v for c in range(3) for v in (hed[..., c].mean(), hed[..., c].std())),
            *np.percentile(h, [10, 50, 90]),
            grad.mean(), grad.std(), ndi.laplace(grey).var(),
            *texture,
            dark.mean(), n_blobs, blob_area,
        ]  # fmt: skip
    return np.nan_to_num(out)
