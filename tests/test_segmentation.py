"""Nucleus segmentation: classical and cellpose (real API) segmenters, tiled stitching, bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import dask.array as da
import numpy as np
import pytest

from napari_rapacl import segmentation as seg
from napari_rapacl._errors import RapaclInputError
from napari_rapacl.io.slide import Slide
from napari_rapacl.metrics import aggregated_jaccard_index, aji_sums, match_labels, nucleus_statistics
from napari_rapacl.progress import Progress
from napari_rapacl.segmentation import _cellpose, _classical
from napari_rapacl.testing import synthetic_he_nuclei

MPP = 0.5


@pytest.fixture(scope="module")
def synthetic():
    """768 px at 0.5 um/px: 80 single nuclei, 15 touching pairs, a glass strip on the right."""
    return synthetic_he_nuclei(
        (768, 768), mpp=MPP, n_nuclei=80, n_touching_pairs=15, blank_fraction=0.1, seed=7
    )


def assert_valid_labels(labels: np.ndarray, shape: tuple[int, int]) -> None:
    assert labels.dtype == np.int32 and labels.shape == shape
    ids = np.unique(labels)
    assert ids[0] >= 0
    nonzero = ids[ids > 0]
    np.testing.assert_array_equal(nonzero, np.arange(1, len(nonzero) + 1))  # 1..n without gaps


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def test_haematoxylin_equals_skimage_rgb2hed():
    from skimage.color import rgb2hed

    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    np.testing.assert_allclose(seg.haematoxylin(rgb), rgb2hed(rgb)[..., 0], atol=2e-6)


def test_hand_written_filters_equal_scipy():
    from scipy import ndimage as ndi

    a = np.random.default_rng(1).random((97, 130)).astype(np.float32)
    for sigma, truncate in ((0.6, 3.0), (1.4, 3.0), (2.7, 2.5)):
        np.testing.assert_allclose(
            _classical._gaussian(a, sigma, truncate),
            ndi.gaussian_filter(a, sigma, truncate=truncate),
            atol=1e-6,
        )
    for half in (1, 2, 4):
        np.testing.assert_array_equal(
            _classical._max_filter(a, half), ndi.maximum_filter(a, size=2 * half + 1)
        )


def test_match_labels_counts_objects():
    true = np.zeros((20, 20), np.int32)
    true[2:6, 2:6] = 1
    true[10:14, 10:14] = 2
    true[15:19, 1:5] = 3
    pred = np.zeros_like(true)
    pred[2:6, 2:6] = 5  # perfect
    pred[10:14, 10:12] = 7  # IoU 0.5: not a match (must exceed)
    pred[0:2, 15:20] = 9  # false positive
    m = match_labels(true, pred)
    assert (m.n_true, m.n_pred, m.tp, m.fp, m.fn) == (3, 3, 1, 2, 2)
    assert m.f1 == pytest.approx(1 / 3)
    assert match_labels(true, true).f1 == 1.0
    assert match_labels(true, np.zeros_like(true)).f1 == 0.0


def test_aggregated_jaccard_index_by_hand():
    true = np.zeros((12, 12), np.int32)
    true[0:4, 0:4] = 1  # 16 px
    true[6:8, 6:8] = 2  # 4 px
    true[0:2, 8:10] = 3  # 4 px, overlapped by nothing
    true[10:12, 0:2] = 4  # 4 px \ both best matched by the same prediction (a merge)
    true[10:12, 3:5] = 5  # 4 px /
    pred = np.zeros_like(true)
    pred[0:4, 0:2] = 7  # with 1: I 8, U 16 (IoU 0.5) <- 1's partner
    pred[0:4, 2:5] = 3  # with 1: I 8, U 20 (IoU 0.4), so unpaired: its 12 px join the union
    pred[6:8, 6:9] = 9  # with 2: I 4, U 6
    pred[9, 0:3] = 1  # overlaps nothing: 3 px join the union
    pred[10:12, 0:5] = 2  # 10 px, partner of 4 (I 4, U 10) and of 5 (I 4, U 10)
    inter = 8 + 4 + 4 + 4
    union = 16 + 6 + 4 + 10 + 10 + 12 + 3  # pairs, unmatched true 3, unpaired predictions 3 and 1
    assert aji_sums(true, pred) == (inter, union)
    assert aggregated_jaccard_index(true, pred) == pytest.approx(20 / 61)
    # identical, disjoint and empty label images
    assert aggregated_jaccard_index(true, true) == 1.0
    shifted = np.zeros_like(true)
    shifted[4:6, 10:12] = 1
    assert aggregated_jaccard_index(true, shifted) == 0.0
    assert aggregated_jaccard_index(np.zeros_like(true), np.zeros_like(true)) == 1.0
    assert aggregated_jaccard_index(true, np.zeros_like(true)) == 0.0
    with pytest.raises(RapaclInputError, match="shape"):
        aji_sums(true, pred[:5])


def test_aggregated_jaccard_index_equals_the_published_loop():
    """Kumar et al.'s algorithm written as a loop over reference objects, on random label images."""
    rng = np.random.default_rng(5)
    for _ in range(5):
        true = rng.integers(0, 6, (6, 7)).astype(np.int32)
        pred = rng.integers(0, 5, (6, 7)).astype(np.int32)
        inter_sum = union_sum = 0
        used = set()
        for g in range(1, 6):
            gm = true == g
            if not gm.any():
                continue
            best, best_iou = None, 0.0
            for s in range(1, 5):
                sm = pred == s
                iou = (gm & sm).sum() / (gm | sm).sum() if sm.any() else 0.0
                if iou > best_iou:
                    best, best_iou = s, iou
            if best is None:
                union_sum += gm.sum()
                continue
            sm = pred == best
            inter_sum += (gm & sm).sum()
            union_sum += (gm | sm).sum()
            used.add(best)
        union_sum += sum((pred == s).sum() for s in range(1, 5) if s not in used)
        assert aji_sums(true, pred) == (inter_sum, union_sum)


def test_synthetic_generator_is_deterministic_with_touching_pairs():
    rgb1, lab1 = synthetic_he_nuclei((256, 256), mpp=MPP, n_nuclei=10, n_touching_pairs=4, seed=3)
    rgb2, lab2 = synthetic_he_nuclei((256, 256), mpp=MPP, n_nuclei=10, n_touching_pairs=4, seed=3)
    np.testing.assert_array_equal(rgb1, rgb2)
    np.testing.assert_array_equal(lab1, lab2)
    assert lab1.max() == 18
    # touching pairs: some pairs of labels are 4-adjacent
    right = (lab1[:, :-1] != lab1[:, 1:]) & (lab1[:, :-1] > 0) & (lab1[:, 1:] > 0)
    down = (lab1[:-1] != lab1[1:]) & (lab1[:-1] > 0) & (lab1[1:] > 0)
    assert right.sum() + down.sum() > 0


# --------------------------------------------------------------------------------------------
# classical segmenter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mpp", [0.25, 0.5, 0.69])
def test_classical_object_f1_on_synthetic_he(mpp):
    rgb, truth = synthetic_he_nuclei(
        (640, 640), mpp=mpp, n_nuclei=60, n_touching_pairs=12, blank_fraction=0.1, seed=11
    )
    labels = seg.segment_nuclei(rgb, mpp)
    assert_valid_labels(labels, truth.shape)
    m = match_labels(truth, labels, iou_threshold=0.5)
    assert m.f1 >= 0.8, m
    assert m.mean_matched_iou > 0.7, m


def test_classical_splits_touching_pairs(synthetic):
    rgb, truth = synthetic
    labels = seg.segment_nuclei(rgb, MPP)
    # label pairs that touch in the ground truth must come out as two objects each
    right = (truth[:, :-1] != truth[:, 1:]) & (truth[:, :-1] > 0) & (truth[:, 1:] > 0)
    pairs = {tuple(sorted(p)) for p in zip(truth[:, :-1][right], truth[:, 1:][right], strict=True)}
    assert len(pairs) >= 5
    split = 0
    for a, b in pairs:
        la = np.bincount(labels[truth == a]).argmax()
        lb = np.bincount(labels[truth == b]).argmax()
        split += la != lb and la > 0 and lb > 0
    assert split >= 0.8 * len(pairs)


def test_classical_is_deterministic_and_respects_size_filter(synthetic):
    rgb, _ = synthetic
    a = seg.segment_nuclei(rgb, MPP)
    b = seg.segment_nuclei(rgb.copy(), MPP)
    np.testing.assert_array_equal(a, b)
    areas = np.bincount(a.ravel())[1:] * MPP**2
    min_area = seg.CLASSICAL_DEFAULTS[seg.SEGMENTATION_VERSION]["min_area_um2"]
    assert areas.min() >= min_area and areas.max() <= seg.DEFAULT_MAX_AREA_UM2
    # a tighter size window removes objects, never adds
    c = seg.segment_nuclei(rgb, MPP, min_area_um2=40.0, max_area_um2=60.0)
    areas_c = np.bincount(c.ravel())[1:] * MPP**2
    assert 0 < c.max() < a.max()
    assert areas_c.min() >= 40.0 and areas_c.max() <= 60.0


def test_glass_strip_has_no_nuclei(synthetic):
    rgb, _ = synthetic
    labels = seg.segment_nuclei(rgb, MPP)
    assert not labels[:, -60:].any()


def test_real_her2st_crop_gives_plausible_nuclei(data_dir):
    from napari_rapacl.datasets import her2st

    section = her2st("C2", data_dir=data_dir)
    slide, spots = section.slide, section.spots
    i = int(np.argmin(np.hypot(spots.x - np.median(spots.x), spots.y - np.median(spots.y))))
    x, y = int(spots.x[i]), int(spots.y[i])
    region = slide.read_region(x - 256, y - 256, x + 256, y + 256)
    labels = seg.segment_nuclei(region, slide.mpp)
    assert_valid_labels(labels, (512, 512))
    stats = nucleus_statistics(labels, slide.mpp, region)
    # breast tissue: ~1000-8000 nuclei per mm^2, median nucleus ~15-100 um^2
    assert 1000 < stats["density_per_tissue_mm2"] < 8000, stats
    assert 15 < stats["median_area_um2"] < 100, stats


def _restained(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The same tissue with every optical density times ``factor`` (Beer-Lambert: a paler or darker stain)."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    return np.clip(np.rint(255.0 * np.exp(-factor * od)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("factor", [0.25, 0.5, 2.0])
def test_classical_adapts_to_the_stain_strength(factor):
    """Thresholds and contrast limits are measured on the region: the same nuclei stained 4x paler (like
    TNBC against her2st) or 2x darker are found alike (version 1's fixed floor found none at 0.25)."""
    rgb, truth = synthetic_he_nuclei(
        (512, 512), mpp=MPP, n_nuclei=50, n_touching_pairs=10, blank_fraction=0.1, seed=12
    )
    labels = seg.segment_nuclei(_restained(rgb, factor), MPP)
    assert_valid_labels(labels, truth.shape)
    m = match_labels(truth, labels)
    assert m.f1 >= 0.9 and m.mean_matched_iou > 0.7, m


#: sha256 of version 2's int32 labels, recorded before version 3 was written (RaPaCL-ST's radiomics tables
#: and checkpoints of session 5 record version 2: prediction must reproduce it bit for bit).
V2_SYNTHETIC_SHA256 = "3c1c35112f1668f59c8a297102f290fa5a57cff950f8b1bc4ba6f8c2be757c03"
V2_TNBC_01_1_SHA256 = "fbf92540b329e6be11e7f1f65228b08cea02f836ad931416f537c16b2be787ca"


def _sha256(labels: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int32).tobytes()).hexdigest()


def test_version_2_is_reproduced_exactly(synthetic):
    """``version="2"`` gives the labels version 2 gave before version 3 existed (checksum), directly and
    through a recipe's segmenter; the default is the newest version, which differs."""
    from napari_rapacl.radiomics import NucleusSegmenter

    rgb, _ = synthetic
    v2 = seg.segment_nuclei(rgb, MPP, version="2")
    assert _sha256(v2) == V2_SYNTHETIC_SHA256
    np.testing.assert_array_equal(NucleusSegmenter("classical", version="2")(rgb, MPP), v2)
    assert seg.SEGMENTATION_VERSION == "3" and seg.SEGMENTATION_VERSIONS == ("2", "3")
    assert NucleusSegmenter().version == "3"
    np.testing.assert_array_equal(NucleusSegmenter()(rgb, MPP), seg.segment_nuclei(rgb, MPP, version="3"))
    np.testing.assert_array_equal(seg.segment_nuclei(rgb, MPP), seg.segment_nuclei(rgb, MPP, version="3"))


def test_version_2_is_reproduced_exactly_on_a_real_tile(tnbc):
    rgb, _ = tnbc[1][0]  # 01_1
    v2 = seg.segment_nuclei(rgb, TNBC_MPP, version="2")
    assert _sha256(v2) == V2_TNBC_01_1_SHA256
    assert not np.array_equal(v2, seg.segment_nuclei(rgb, TNBC_MPP))  # version 3 differs here


def test_tiled_path_runs_the_version_asked_for(border_image):
    rgb, _ = border_image
    for version in ("2", "3"):
        whole = seg.segment_nuclei(rgb, MPP, version=version)
        tiled = np.asarray(seg.segment_region(_slide(rgb), 0, 0, 1024, 1024, tile=256, version=version))
        np.testing.assert_array_equal(whole > 0, tiled > 0)
        assert match_labels(whole, tiled).tp == whole.max() == tiled.max()


def test_cells_job_runs_the_segmenters_recorded_version(tnbc):
    """The Cells job (widget, CLI, RaPaCL-ST's slide path) segments with the version its segmenter
    records: a version-2 recipe gives version 2's labels (on a tile where the versions differ)."""
    from napari_rapacl.jobs import iter_cells
    from napari_rapacl.progress import run_to_completion
    from napari_rapacl.radiomics import NucleusSegmenter

    rgb, _ = tnbc[1][0]  # 01_1
    slide = _slide(rgb, mpp=TNBC_MPP)
    whole = {v: seg.segment_nuclei(rgb, TNBC_MPP, version=v) for v in ("2", "3")}
    assert not np.array_equal(whole["2"] > 0, whole["3"] > 0)
    for version, expected in whole.items():
        segmenter = NucleusSegmenter(version=version)
        res = run_to_completion(iter_cells(slide, segmenter=segmenter, features=False, tile=4096))
        np.testing.assert_array_equal(np.asarray(res.labels) > 0, expected > 0)
        assert res.provenance["segmentation_version"] == version == res.provenance["segmenter"]["version"]


def test_unknown_version_is_named_with_those_available():
    img = np.full((32, 32, 3), 200, np.uint8)
    for method in ("classical", "cellpose"):
        with pytest.raises(RapaclInputError, match=r"version '1' is not available.*versions 2, 3"):
            seg.segment_nuclei(img, MPP, method=method, version="1")


def test_version_3_ring_contrast_keeps_contrasted_objects_only():
    """Version 3 keeps an object when its mean haematoxylin stands out from that of its own ring."""
    yy, xx = np.mgrid[:160, :160]
    img = np.full((160, 160, 3), (230, 200, 225), np.uint8)  # pale pink tissue
    dark, pale = (70, 50, 140), (150, 120, 190)
    for (cy, cx), colour in (((40, 40), dark), ((40, 120), dark), ((120, 40), pale), ((120, 120), pale)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2] = colour  # 4 um radius at 0.5 um/px
    # contrast against the ring: dark discs ~0.95, pale ones ~0.87 (haematoxylin 0.14 / 0.056, ring 0.007)
    found = [seg.segment_nuclei(img, MPP, threshold=0.03, ring_contrast=c) for c in (0.3, 0.9, 0.97)]
    assert [int(f.max()) for f in found] == [4, 2, 0]
    assert found[1][40, 40] > 0 and found[1][40, 120] > 0 and found[1][120, 40] == 0

    # the ring directly: background 0.75-1.75 um from the object, nearer to it than to any other object
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 5:15] = 1  # ring on pale ground
    labels[10:20, 25:35] = 2  # ring on ground as dark as itself
    labels[26:36, 45:59] = 3
    labels[28:34, 49:55] = 4  # enclosed by object 3: no ring
    h = np.full(labels.shape, 0.2, np.float32)
    h[:24, 20:40] = 1.0
    h[labels == 1] = 1.0
    h[labels == 3] = 2.0
    p = _classical._make_params(0.5, 8.0, 0.0, 400.0, version="3")
    contrast, area = _classical._ring_contrast(labels, h, 4, p)
    np.testing.assert_allclose(contrast[1:], [0.8, 0.0, 0.9, 0.0], atol=1e-6)
    np.testing.assert_array_equal(area[1:], [100, 100, 104, 36])
    with pytest.raises(RapaclInputError, match="ring_contrast"):
        seg.segment_nuclei(img, MPP, ring_contrast=1.5)
    with pytest.raises(RapaclInputError, match="ring_um"):
        seg.segment_nuclei(img, MPP, ring_um=(2.0, 1.0))


def test_classical_keeps_spindle_nuclei():
    """Elongated (stromal, spindle) nuclei up to ~6:1 are found, each as one object."""
    rgb, truth = synthetic_he_nuclei(
        (640, 640),
        mpp=MPP,
        n_nuclei=40,
        n_touching_pairs=0,
        diameter_um=(5.0, 7.0),
        max_elongation=6.0,
        seed=3,
    )
    ys, xs = np.nonzero(truth)
    lab = truth[ys, xs]
    count = np.bincount(lab)[1:]
    cov = [np.cov(np.stack([ys[lab == i], xs[lab == i]])) for i in range(1, len(count) + 1)]
    elongation = np.array([math.sqrt(e[1] / e[0]) for e in (np.linalg.eigvalsh(c) for c in cov)])
    assert (elongation >= 4).sum() >= 10, "the test image must hold spindle nuclei"
    labels = seg.segment_nuclei(rgb, MPP)
    m = match_labels(truth, labels)
    assert m.tp >= 0.95 * m.n_true and m.n_pred <= m.n_true + 1, m


# --------------------------------------------------------------------------------------------
# real annotations: TNBC (Naylor et al. 2019), breast H&E ~4x paler than her2st
# --------------------------------------------------------------------------------------------

TNBC_MPP = 0.25


@pytest.fixture(scope="module")
def tnbc(data_dir):
    """``{patient: [(rgb, labels), ...]}`` of ``tnbc_nuclei`` (masks labelled with 8-connectivity)."""
    from PIL import Image
    from scipy import ndimage as ndi

    root = data_dir / "tnbc_nuclei"
    if not (root / "Slide_01").is_dir():
        pytest.skip(f"TNBC nucleus annotations not found in {root} (tnbc_nuclei/Slide_PP, GT_PP)")
    tiles: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for patient in range(1, 12):
        for image in sorted((root / f"Slide_{patient:02d}").glob("*.png")):
            rgb = seg.as_rgb_uint8(np.asarray(Image.open(image)))  # most are RGBA
            mask = np.asarray(Image.open(root / f"GT_{patient:02d}" / image.name)) > 0
            labels = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))[0].astype(np.int32)
            tiles.setdefault(patient, []).append((rgb, labels))
    return tiles


def _pooled(tiles: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    tp = n_true = n_pred = inter = union = 0
    iou = 0.0
    for rgb, truth in tiles:
        labels = seg.segment_nuclei(rgb, TNBC_MPP)
        m = match_labels(truth, labels)
        i, u = aji_sums(truth, labels)
        tp, n_true, n_pred, inter, union = (
            tp + m.tp,
            n_true + m.n_true,
            n_pred + m.n_pred,
            inter + i,
            union + u,
        )
        iou += m.mean_matched_iou * m.tp
    return {"f1": 2 * tp / (n_true + n_pred), "iou": iou / tp, "aji": inter / union, "n_true": n_true}


def test_tnbc_held_out_patients(tnbc):
    """Patients 09-11, never used to choose a setting: object F1@0.5 pooled over their 13 tiles.

    Version 1 found no nucleus there (F1 0.000), version 2 0.647 (mean matched IoU 0.715, AJI 0.476).
    Version 3 (the default) measures 0.677 (mean matched IoU 0.724, AJI 0.470); issue #11's target of
    F1 >= 0.70 is NOT reached (benchmarks/README.md, Segmentation): this test guards what is reached,
    with a small margin.
    """
    held_out = [t for patient in (9, 10, 11) for t in tnbc[patient]]
    r = _pooled(held_out)
    assert r["n_true"] == 871
    assert r["f1"] >= 0.66 and r["iou"] >= 0.71 and r["aji"] >= 0.455, r


def test_tnbc_development_patients(tnbc):
    """Patients 01-08 (the settings were chosen on these): version 1 0.128, version 2 0.664, version 3
    0.704 (mean matched IoU 0.737, AJI 0.477)."""
    r = _pooled([t for patient in range(1, 9) for t in tnbc[patient]])
    assert r["n_true"] == 3157
    assert r["f1"] >= 0.69 and r["iou"] >= 0.725 and r["aji"] >= 0.465, r


def test_tiled_equals_whole_on_pale_real_tiles(tnbc):
    """A 1024 px mosaic of four TNBC tiles (0.25 um/px, worked at 0.5): the tiled path, whose threshold
    comes from the tile histograms, gives the whole-image labels."""
    (a, _), (b, _), (c, _), (d, _) = tnbc[1][0], tnbc[2][0], tnbc[3][0], tnbc[4][0]
    mosaic = np.concatenate([np.concatenate([a, b], axis=1), np.concatenate([c, d], axis=1)], axis=0)
    whole = seg.segment_nuclei(mosaic, TNBC_MPP)
    tiled = np.asarray(seg.segment_region(_slide(mosaic, mpp=TNBC_MPP), 0, 0, 1024, 1024, tile=256))
    assert whole.max() > 150
    m = match_labels(whole, tiled)
    assert m.tp >= 0.98 * m.n_true and abs(m.n_pred - m.n_true) <= 0.02 * m.n_true, m


# --------------------------------------------------------------------------------------------
# bad input (one test each)
# --------------------------------------------------------------------------------------------


def test_region_without_tissue_gives_no_nuclei():
    rng = np.random.default_rng(0)
    glass = np.clip(245 + rng.normal(0, 3, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not seg.segment_nuclei(glass, MPP).any()
    white = np.full((300, 300, 3), 255, np.uint8)
    assert not seg.segment_nuclei(white, MPP).any()
    flat_purple = np.full((300, 300, 3), (90, 60, 140), np.uint8)  # tissue, but no contrast
    assert not seg.segment_nuclei(flat_purple, MPP).any()
    stroma = np.clip(np.array([200, 130, 200]) + rng.normal(0, 6, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not seg.segment_nuclei(stroma, MPP).any()  # pink tissue, noise only
    empty = seg.segment_nuclei(np.zeros((0, 5, 3), np.uint8), MPP)
    assert empty.shape == (0, 5) and empty.dtype == np.int32


def test_grey_input_is_replicated_to_rgb(synthetic):
    rgb, truth = synthetic
    grey = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    labels = seg.segment_nuclei(grey, MPP)
    np.testing.assert_array_equal(labels, seg.segment_nuclei(np.repeat(grey[..., None], 3, axis=2), MPP))
    np.testing.assert_array_equal(labels, seg.segment_nuclei(grey[..., None], MPP))  # (H, W, 1)
    assert match_labels(truth, labels).f1 >= 0.7


def test_rgba_input_is_composited_over_white(synthetic):
    rgb, _ = synthetic
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(seg.segment_nuclei(rgba, MPP), seg.segment_nuclei(rgb, MPP))
    rgba[:, :384, 3] = 0  # transparent left half: background
    labels = seg.segment_nuclei(rgba, MPP)
    assert not labels[:, :380].any() and labels[:, 400:].any()


def test_wrong_dtype():
    rgb, _ = synthetic_he_nuclei((200, 200), mpp=MPP, n_nuclei=10, n_touching_pairs=0, seed=1)
    as_float = rgb.astype(np.float64) / 255.0
    np.testing.assert_array_equal(seg.segment_nuclei(as_float, MPP), seg.segment_nuclei(rgb, MPP))
    with pytest.raises(RapaclInputError, match=r"float.*\[0, 1\]"):
        seg.segment_nuclei(rgb.astype(np.float32), MPP)  # 0-255 floats
    with pytest.raises(RapaclInputError, match="NaN"):
        seg.segment_nuclei(np.full((8, 8, 3), np.nan), MPP)
    for dtype in (np.uint16, np.int64, bool):
        with pytest.raises(RapaclInputError, match="dtype"):
            seg.segment_nuclei(rgb.astype(dtype), MPP)
    with pytest.raises(RapaclInputError, match="shape"):
        seg.segment_nuclei(np.zeros((10, 10, 5), np.uint8), MPP)
    with pytest.raises(RapaclInputError, match="shape"):
        seg.segment_nuclei(np.zeros((2, 10, 10, 3), np.uint8), MPP)


def test_one_pixel_nuclei_are_removed_by_the_size_filter():
    rng = np.random.default_rng(2)
    img = np.full((200, 200, 3), (205, 140, 205), np.uint8)
    ys, xs = rng.integers(5, 195, 40), rng.integers(5, 195, 40)
    img[ys, xs] = (30, 30, 90)  # 40 single dark pixels
    assert not seg.segment_nuclei(img, MPP).any()
    assert not seg.segment_nuclei(img, MPP, threshold=0.05, smooth_um=0).any()
    # with the size filter off (min area below one pixel) the same pixels are objects
    assert seg.segment_nuclei(img, MPP, threshold=0.05, smooth_um=0, min_area_um2=0.0).max() > 0


def test_bad_mpp_and_settings():
    img = np.full((32, 32, 3), 200, np.uint8)
    for mpp in (0, -0.5, float("nan"), float("inf"), "abc", None):
        with pytest.raises(RapaclInputError, match="mpp"):
            seg.segment_nuclei(img, mpp)
    with pytest.raises(RapaclInputError, match="method"):
        seg.segment_nuclei(img, MPP, method="stardist")
    with pytest.raises(RapaclInputError, match="min_area_um2"):
        seg.segment_nuclei(img, MPP, min_area_um2=100, max_area_um2=10)
    with pytest.raises(RapaclInputError, match="diameter_um"):
        seg.segment_nuclei(img, MPP, diameter_um=0)


# --------------------------------------------------------------------------------------------
# tiled segmentation of a slide region
# --------------------------------------------------------------------------------------------


def _slide(rgb: np.ndarray, mpp: float | None = MPP, chunk: int = 256) -> Slide:
    level0 = da.from_array(rgb, chunks=(chunk, chunk, 3))
    level1 = da.from_array(np.ascontiguousarray(rgb[::2, ::2]), chunks=(chunk, chunk, 3))
    return Slide((level0, level1), (1.0, 2.0), mpp=mpp)


@pytest.fixture(scope="module")
def border_image():
    """1024 px with nuclei centred on every 256 px tile border (and on border crossings)."""
    lines = np.arange(256, 1024, 256)
    along = np.linspace(40, 984, 9)
    centers = [(y, x) for y in lines for x in along] + [(y, x) for x in lines for y in along]
    centers += [(y, x) for y in lines for x in lines]
    return synthetic_he_nuclei(
        (1024, 1024), mpp=MPP, n_nuclei=60, n_touching_pairs=15, centers=centers, seed=3
    )


def test_tiled_equals_whole_with_objects_on_tile_borders(border_image):
    rgb, truth = border_image
    whole = seg.segment_nuclei(rgb, MPP)
    tiled = np.asarray(seg.segment_region(_slide(rgb), 0, 0, 1024, 1024, tile=256))
    assert tiled.dtype == np.int32 and tiled.shape == whole.shape
    # objects that cross a tile border (in the whole-image result)
    crossing = set(np.unique(whole[255:257]).tolist()) | set(np.unique(whole[:, 255:257]).tolist())
    crossing |= set(np.unique(whole[511:513]).tolist()) | set(np.unique(whole[767:769]).tolist())
    crossing.discard(0)
    assert len(crossing) >= 20, "the test image must put objects on tile borders"
    m = match_labels(whole, tiled, iou_threshold=0.5)
    assert m.tp >= 0.95 * m.n_true and m.n_pred == m.n_true
    # no object split in two labels across a border: each whole object maps to one tiled label
    fg = (whole > 0) & (tiled > 0)
    pairs = np.unique(whole[fg].astype(np.int64) * 2**32 + tiled[fg])
    assert len(np.unique(pairs // 2**32)) == len(pairs)
    # labels unique: 1..n, and each label is one connected object (no label reused in two tiles)
    from scipy import ndimage as ndi

    assert len(np.unique(tiled[tiled > 0])) == tiled.max()
    objects = ndi.find_objects(tiled)
    for i, sl in enumerate(objects, start=1):
        assert ndi.label(tiled[sl] == i, structure=np.ones((3, 3)))[1] == 1
    # in fact the threshold is global and the overlap wide, so the results are identical
    np.testing.assert_array_equal(whole > 0, tiled > 0)
    assert match_labels(truth, tiled).f1 >= 0.8


def test_tiled_equals_whole_at_a_reduced_working_resolution(border_image):
    # the same pixels read as 0.25 um/px: the classical segmenter works on 2 x 2 blocks (0.5 um/px)
    rgb, _ = border_image
    kwargs = {"diameter_um": 4.0, "min_area_um2": 3.0, "max_area_um2": 100.0}
    whole = seg.segment_nuclei(rgb, 0.25, **kwargs)
    tiled = seg.segment_region(
        _slide(rgb, mpp=0.25), 0, 0, 1024, 1024, tile=250, sample_tiles=25, **kwargs
    ).compute()
    assert whole.max() > 100
    np.testing.assert_array_equal(whole > 0, tiled > 0)
    assert match_labels(whole, tiled).tp == whole.max() == tiled.max()


def test_iter_segment_region_yields_progress_per_tile_and_can_stop(border_image, tmp_path):
    rgb, _ = border_image
    gen = seg.iter_segment_region(_slide(rgb), 0, 0, 1024, 512, tile=256, out=tmp_path / "labels.zarr")
    events = []
    for ev in gen:
        events.append(ev)
        if ev.stage == "segment" and ev.done == 3:
            break
    gen.close()  # cancelled between tiles: no store and no temporary folder is left behind
    assert all(isinstance(e, Progress) for e in events)
    assert [e.done for e in events if e.stage == "threshold"] == list(range(9))
    assert events[-1] == Progress("segment", 3, 8)
    assert list(tmp_path.iterdir()) == []


def test_segment_region_writes_a_zarr_store_atomically(border_image, tmp_path):
    import zarr

    rgb, _ = border_image
    slide = _slide(rgb)
    target = tmp_path / "labels.zarr"
    labels = seg.segment_region(slide, 256, 0, 768, 512, tile=256, out=target)
    assert isinstance(labels, da.Array) and labels.shape == (512, 512) and labels.dtype == np.int32
    assert [p.name for p in tmp_path.iterdir()] == ["labels.zarr"]
    on_disk = zarr.open_array(str(target), mode="r")
    np.testing.assert_array_equal(on_disk[:], labels.compute())
    assert labels.max().compute() > 10
    with pytest.raises(FileExistsError, match="overwrite"):
        seg.segment_region(slide, 256, 0, 768, 512, tile=256, out=target)
    again = seg.segment_region(slide, 256, 0, 768, 512, tile=256, out=target, overwrite=True)
    np.testing.assert_array_equal(again.compute(), labels.compute())
    # an existing zarr array is filled in place
    arr = zarr.open_array(
        zarr.storage.MemoryStore(), mode="w", shape=(512, 512), chunks=(256, 256), dtype="i4"
    )
    seg.segment_region(slide, 256, 0, 768, 512, tile=256, out=arr)
    np.testing.assert_array_equal(arr[:], labels.compute())


def test_tiled_memory_stays_bounded():
    """A 3072^2 region (27 MB RGB, 38 MB labels) is segmented holding far less than either."""
    import tracemalloc

    rgb, _ = synthetic_he_nuclei((512, 512), mpp=MPP, n_nuclei=40, n_touching_pairs=5, seed=1)
    big = da.tile(da.from_array(rgb, chunks=(512, 512, 3)), (6, 6, 1))  # lazy: computed per window
    slide = Slide((big,), (1.0,), mpp=MPP)
    seg.segment_region(slide, 0, 0, 512, 512, tile=256)  # warm-up: imports and lookup tables
    tracemalloc.start()
    try:
        labels = seg.segment_region(slide, 0, 0, 3072, 3072, tile=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole_arrays = 3072 * 3072 * (3 + 4)  # the region's RGB and its int32 labels
    assert peak < 0.25 * whole_arrays, f"peak {peak / 1e6:.1f} MB"
    assert labels.shape == (3072, 3072) and int(labels.max().compute()) >= 36 * 40


def test_segment_region_at_level_1_and_region_offset(border_image):
    rgb, _ = border_image
    slide = _slide(rgb)
    lv1 = seg.segment_region(slide, 0, 0, 1024, 1024, level=1, tile=256)
    assert lv1.shape == (512, 512)
    direct = seg.segment_nuclei(rgb[::2, ::2], 2 * MPP)
    assert match_labels(direct, lv1.compute()).f1 > 0.95
    # a sub-box: the same as segmenting the crop itself
    sub = seg.segment_region(slide, 100, 200, 612, 712, tile=256).compute()
    np.testing.assert_array_equal(sub > 0, seg.segment_nuclei(rgb[200:712, 100:612], MPP) > 0)


def test_region_outside_the_slide(border_image):
    rgb, _ = border_image
    slide = _slide(rgb)
    with pytest.raises(RapaclInputError, match=r"x1=1100.*1024 px wide and 1024 px high.*clip=True"):
        seg.segment_region(slide, 900, 0, 1100, 200)
    with pytest.raises(RapaclInputError, match="does not overlap"):
        seg.segment_region(slide, 2000, 2000, 2100, 2100, clip=True)
    with pytest.raises(RapaclInputError, match="empty"):
        seg.segment_region(slide, 100, 100, 100, 300)
    with pytest.raises(RapaclInputError, match="level"):
        seg.segment_region(slide, 0, 0, 100, 100, level=2)
    with pytest.raises(TypeError, match="diameter"):
        seg.segment_region(slide, 0, 0, 100, 100, diameter=8.0)  # the keyword is diameter_um
    clipped = seg.segment_region(slide, 900, -50, 1100, 200, clip=True, tile=256).compute()
    assert clipped.shape == (200, 124)
    np.testing.assert_array_equal(clipped > 0, seg.segment_nuclei(rgb[0:200, 900:1024], MPP) > 0)


def test_segment_region_needs_a_pixel_size(border_image):
    from napari_rapacl._errors import MissingPixelSizeError

    rgb, _ = border_image
    with pytest.raises(MissingPixelSizeError, match="nucleus segmentation"):
        seg.segment_region(_slide(rgb, mpp=None), 0, 0, 256, 256)
    assert seg.segment_region(_slide(rgb, mpp=None), 0, 0, 256, 256, mpp=MPP).shape == (256, 256)


# --------------------------------------------------------------------------------------------
# cellpose (the real API; CI installs cellpose 3.x)
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def cellpose_env(cellpose_models):
    return cellpose_models


@pytest.fixture(scope="module")
def random_cellpose_model(tmp_path_factory):
    """A randomly initialised cellpose network saved with cellpose's own tools (no download)."""
    pytest.importorskip("cellpose")
    import torch
    from cellpose import models

    torch.manual_seed(0)
    net = models.CellposeModel(gpu=False, pretrained_model=False)
    path = tmp_path_factory.mktemp("cellpose") / "random_cp3"
    net.net.save_model(str(path))
    return path


def test_cellpose_missing_model_file_fails_fast(cellpose_env, tmp_path):
    pytest.importorskip("cellpose")
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no_such_model.pth"):
        seg.segment_nuclei(
            np.zeros((64, 64, 3), np.uint8), MPP, "cellpose", model=tmp_path / "no_such_model.pth"
        )
    with pytest.raises(FileNotFoundError, match="not_a_model"):
        seg.resolve_cellpose_model("not_a_model")
    slide = _slide(np.full((256, 256, 3), 200, np.uint8))
    with pytest.raises(FileNotFoundError, match="missing.pth"):  # before any tile is read or written
        seg.segment_region(
            slide, 0, 0, 256, 256, method="cellpose", model="missing.pth", out=tmp_path / "o.zarr"
        )
    assert not (tmp_path / "o.zarr").exists()
    assert time.perf_counter() - t < 3


def test_cellpose_damaged_model_file_is_named(cellpose_env, tmp_path):
    pytest.importorskip("cellpose")
    bad = tmp_path / "damaged.pth"
    bad.write_bytes(b"not a model" * 100)
    rgb, _ = synthetic_he_nuclei((128, 128), mpp=MPP, n_nuclei=5, n_touching_pairs=0, seed=0)
    with pytest.raises(RapaclInputError, match=r"damaged.pth is not a cellpose \d.x model file"):
        seg.segment_nuclei(rgb, MPP, "cellpose", model=bad)


def test_cellpose_named_model_offline_fails_fast_without_download(cellpose_env, monkeypatch):
    pytest.importorskip("cellpose")
    rgb, _ = synthetic_he_nuclei((128, 128), mpp=MPP, n_nuclei=5, n_touching_pairs=0, seed=0)
    name = "nuclei" if seg.cellpose_major_version() == 3 else "cpsam"
    t = time.perf_counter()
    with pytest.raises(
        seg.CellposeModelUnavailableError, match=r"NAPARI_RAPACL_OFFLINE.*cannot be downloaded"
    ):
        seg.segment_nuclei(rgb, MPP, "cellpose", model=name)
    # not offline by configuration, but the download host does not answer: also refused at once
    monkeypatch.delenv("NAPARI_RAPACL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_cellpose, "_CELLPOSE_HOSTS", {3: "cellpose.invalid", 4: "cellpose.invalid"})
    with pytest.raises(seg.CellposeModelUnavailableError, match="cellpose.invalid cannot be reached"):
        seg.segment_nuclei(rgb, MPP, "cellpose", model=name)
    assert time.perf_counter() - t < 8
    assert list(cellpose_env.iterdir()) == []  # nothing was written (no partial download)


def test_cellpose_eval_through_the_real_api(cellpose_env, random_cellpose_model):
    rgb, _ = synthetic_he_nuclei((192, 192), mpp=0.27, n_nuclei=8, n_touching_pairs=2, seed=4)
    seg.clear_cellpose_cache()
    labels = seg.segment_nuclei(rgb, 0.27, "cellpose", model=random_cellpose_model, diameter_um=8.0)
    assert_valid_labels(labels, rgb.shape[:2])
    # the model is loaded once per (file, gpu)
    assert seg.load_cellpose_model(random_cellpose_model) is seg.load_cellpose_model(
        str(random_cellpose_model)
    )
    # both input modes go through eval; a blank region never reaches the network
    labels_rgb = seg.segment_nuclei(rgb, 0.27, "cellpose", model=random_cellpose_model, cellpose_input="rgb")
    assert_valid_labels(labels_rgb, rgb.shape[:2])
    blank = seg.segment_nuclei(np.full((96, 96, 3), 250, np.uint8), 0.27, "cellpose", model="nuclei")
    assert not blank.any()  # the missing 'nuclei' model is never even looked up


def test_cellpose_named_model_found_in_the_local_models_folder(cellpose_env, random_cellpose_model):
    import shutil

    if seg.cellpose_major_version() != 3:
        pytest.skip("cellpose 4.x has one named model (cpsam)")
    shutil.copy(random_cellpose_model, cellpose_env / "nucleitorch_0")  # cellpose 3's file name
    assert seg.resolve_cellpose_model("nuclei") == cellpose_env / "nucleitorch_0"
    assert seg.resolve_cellpose_model(None) == cellpose_env / "nucleitorch_0"
    rgb, _ = synthetic_he_nuclei((128, 128), mpp=0.5, n_nuclei=5, n_touching_pairs=0, seed=5)
    assert_valid_labels(seg.segment_nuclei(rgb, 0.5, "cellpose", model="nuclei"), (128, 128))


def test_cellpose_tiled_region(cellpose_env, random_cellpose_model):
    rgb, _ = synthetic_he_nuclei((128, 256), mpp=0.27, n_nuclei=6, n_touching_pairs=1, seed=6)
    slide = _slide(rgb, mpp=0.27)
    gen = seg.iter_segment_region(
        slide, 0, 0, 256, 128, method="cellpose", tile=128, overlap=32, model=random_cellpose_model
    )
    stages = []
    try:
        while True:
            stages.append(next(gen).stage)
    except StopIteration as stop:
        labels = np.asarray(stop.value)
    assert "threshold" not in stages and stages.count("segment") == 3  # 0 + 2 tiles
    assert labels.shape == (128, 256) and labels.dtype == np.int32
    ids = np.unique(labels[labels > 0])
    assert len(ids) == 0 or ids.min() >= 1


def test_importing_segmentation_stays_light():
    code = (
        "import sys, napari_rapacl.segmentation; "
        "print([m for m in ('torch', 'cellpose', 'skimage', 'dask', 'zarr') if m in sys.modules])"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout


def test_package_api_and_moved_helpers():
    """The package re-exports the public API; the label metrics and the synthetic generator live in
    ``napari_rapacl.metrics`` and ``napari_rapacl.testing``, not here."""
    for name in seg.__all__:
        assert getattr(seg, name) is not None, name
    assert seg.segment_nuclei.__module__ == "napari_rapacl.segmentation._api"
    for moved in ("match_labels", "nucleus_statistics", "MatchResult", "synthetic_he_nuclei"):
        assert not hasattr(seg, moved), moved
