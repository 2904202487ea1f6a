from __future__ import annotations

import numpy as np
import pytest

from napari_rapacl.features import FEATURE_NAMES, patch_features


def _patch(n_nuclei: int, seed: int = 0) -> np.ndarray:
    """Pink background with ``n_nuclei`` dark purple discs."""
    rng = np.random.default_rng(seed)
    img = np.empty((96, 96, 3), np.uint8)
    img[:] = (235, 190, 215)
    yy, xx = np.mgrid[:96, :96]
    for cy, cx in rng.uniform(8, 88, size=(n_nuclei, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = (60, 40, 120)
    return img


def test_features_have_names_and_track_nuclei():
    feats = patch_features(np.stack([_patch(0), _patch(5), _patch(20)]))
    assert feats.shape == (3, len(FEATURE_NAMES)) and np.isfinite(feats).all()
    dark = feats[:, FEATURE_NAMES.index("dark_fraction")]
    assert dark[0] == 0 and dark[0] < dark[1] < dark[2]
    hed_h = feats[:, FEATURE_NAMES.index("hed_h_mean")]
    assert hed_h[0] < hed_h[1] < hed_h[2]


def test_features_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        patch_features(np.zeros((2, 8, 8, 3), np.float32))
