"""Radiomics engine: pyradiomics per cell and per spot, the RaPaCL-ST 72, composition label, cache."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("radiomics")
pytest.importorskip("SimpleITK")

from napari_rapacl import radiomics as rad  # noqa: E402
from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.progress import Progress  # noqa: E402
from napari_rapacl.radiomics import _pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS_MD = REPO.parent / "shared" / "docs" / "methods.md"
MPP = 0.5  # RaPaCL-ST / HEST-Bench patches: 224 px at 0.5 um/px
SHAPE_FO = ("original_shape2D_", "original_firstorder_")


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


def _segment(patch: np.ndarray, mpp: float) -> np.ndarray:
    from napari_rapacl.segmentation import segment_nuclei

    return segment_nuclei(patch, mpp, method="classical")


@pytest.fixture(scope="module")
def her2st_c2(data_dir):
    from napari_rapacl.datasets import her2st

    return her2st("C2", data_dir=data_dir, download=False)


@pytest.fixture(scope="module")
def her2st_patches(her2st_c2):
    """Three tissue patches of her2st C2 (224 px at 0.5 um/px) and their classical nucleus labels."""
    from napari_rapacl.preprocess import extract_patches

    spots = her2st_c2.spots
    idx = np.array([10, 60, 120])
    patches = extract_patches(her2st_c2.slide, spots.x[idx], spots.y[idx], size=224, mpp=MPP)
    labels = [_segment(p, MPP) for p in patches]
    assert all(lab.max() > 5 for lab in labels), "her2st tissue patches should hold nuclei"
    return patches, labels


def _extractor(classes: dict[str, list[str] | None], config: rad.RadiomicsConfig):
    rad.require_radiomics()
    from radiomics import featureextractor

    ext = featureextractor.RadiomicsFeatureExtractor(**config.pyradiomics_settings())
    ext.disableAllFeatures()
    ext.disableAllImageTypes()
    for name, custom in config.image_types.items():
        ext.enableImageTypeByName(name, customArgs=dict(custom))
    for cls, feats in classes.items():
        if feats is None:
            ext.enableFeatureClassByName(cls)
        else:
            ext.enableFeaturesByName(**{cls: feats})
    return ext


def _sitk(arr: np.ndarray, spacing: float = 1.0):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing, spacing))
    return img


def _disc_labels(shape, centres, radii, axes=None) -> np.ndarray:
    """A label image of ellipses: ``radii`` (ry, rx) per object, or discs of radius r."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, dtype=np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii, strict=True), start=1):
        ry, rx = (r, r) if np.isscalar(r) else r
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = k
    return lab


def _he_like(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Pink background, purple nuclei with some texture."""
    rng = np.random.default_rng(seed)
    img = np.empty(labels.shape + (3,), dtype=np.float64)
    img[:] = (235, 190, 215)
    nuc = labels > 0
    img[nuc] = (90, 60, 140)
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# names, config, module
# --------------------------------------------------------------------------------------------


def test_absolute_import_radiomics_is_pyradiomics():
    mod = rad.require_radiomics()
    assert mod is not rad and mod.__name__ == "radiomics"
    assert hasattr(mod, "featureextractor") and hasattr(mod, "shape2D")
    assert logging.getLogger("radiomics").level == logging.WARNING


def test_72_names_in_methods_order():
    names = rad.rapacl72_names()
    assert len(names) == 72 and len(set(names)) == 72
    assert sum(n.startswith("cellseg_all_original_") for n in names) == 40
    assert sum(n.startswith("patch_original_") for n in names) == 9
    assert sum(n.startswith("morph_") for n in names) == 23
    assert names[0] == "cellseg_all_original_firstorder_10Percentile"
    assert names[40] == "patch_original_firstorder_Energy"
    assert names[49] == "morph_perimetersurfaceratio_maximum"
    assert names[-1] == "morph_sphericity_energy"
    assert rad.spot_feature_names(None, "rapacl72") == list(names)
    if METHODS_MD.is_file():  # the spec itself, parsed: same names, same order
        text = METHODS_MD.read_text()
        sec = text[text.index("### 1.3") : text.index("### 1.4")]
        expected: list[str] = []
        fam1 = sec[sec.index("1. **`cellseg_all") : sec.index("2. **`patch")]
        fam2 = sec[sec.index("2. **`patch") : sec.index("3. **`morph")]
        fam3 = sec[sec.index("3. **`morph") : sec.index("* **Observation")]
        for line in fam1.splitlines():
            m = re.match(r"\s*\* (\w+) \(\d+\): (.*)", line)
            if m:
                expected += [f"cellseg_all_original_{m[1]}_{f.strip()}" for f in m[2].split(",")]
        for line in fam2.splitlines():
            m = re.match(r"\s*\* (\w+): (.*)", line)
            if m:
                expected += [f"patch_original_{m[1]}_{f.strip()}" for f in m[2].split(",")]
        for line in fam3.splitlines():
            m = re.match(r"\s*\* (\w+): \{(.*)\}", line)
            if m:
                expected += [f"morph_{m[1]}_{s.strip()}" for s in m[2].split(",")]
        assert expected == list(names)


def test_config_roundtrip_and_validation():
    cfg = rad.RadiomicsConfig(
        bin_width=16,
        grey="Haematoxylin",
        image_types=["original", "square"],
        cell_classes=("shape2D", "GLCM"),
    )
    assert cfg.grey == "haematoxylin" and cfg.image_types == {"Original": {}, "Square": {}}
    assert cfg.cell_classes == ("shape2D", "glcm")
    assert rad.RadiomicsConfig.from_dict(cfg.to_dict()) == cfg
    assert rad.RadiomicsConfig.from_yaml(cfg.to_yaml()) == cfg
    assert hash(rad.RadiomicsConfig.from_dict(cfg.to_dict())) == hash(cfg)
    assert cfg.pyradiomics_settings()["binWidth"] == 16.0
    for bad in (
        {"bin_width": 0},
        {"grey": "hsv"},
        {"image_types": ["LBP3D"]},
        {"image_types": {"LoG": {}}},
        {"cell_classes": ("shape",)},
        {"spot_classes": ("shape2D",)},
        {"min_nucleus_area_px": 0},
        {"composition": {"min_share": 2.0}},
    ):
        with pytest.raises(RapaclInputError):
            rad.RadiomicsConfig(**bad)
    with pytest.raises(RapaclInputError, match="unknown radiomics config key"):
        rad.RadiomicsConfig.from_dict({"binwidth": 25})


def test_import_is_light_and_works_without_pyradiomics(tmp_path):
    code = (
        "import sys; sys.modules['radiomics'] = None; sys.modules['SimpleITK'] = None\n"
        "import numpy as np\n"
        "import napari_rapacl.radiomics as r\n"
        "heavy = [m for m in ('torch', 'cellpose', 'skimage') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert len(r.rapacl72_names()) == 72 and r.RadiomicsConfig().bin_width == 25\n"
        "assert r.composition_from_morphology([], [], 1e4) == 0\n"
        "try:\n"
        "    r.cell_features(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32))\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and 'pip install "napari-rapacl[radiomics]"' in out.stdout
    assert "--no-build-isolation" in out.stdout


def test_missing_pyradiomics_raises_clear_importerror(monkeypatch):
    monkeypatch.setitem(sys.modules, "radiomics", None)
    img = np.zeros((16, 16, 3), np.uint8)
    lab = np.zeros((16, 16), np.int32)
    for call in (
        lambda: rad.cell_features(img, lab),
        lambda: rad.spot_features(img, lab),
        lambda: rad.require_radiomics(),
    ):
        with pytest.raises(ImportError, match=r"napari-rapacl\[radiomics\]"):
            call()


# --------------------------------------------------------------------------------------------
# the fast path equals pyradiomics' extractor
# --------------------------------------------------------------------------------------------


def test_batched_percentiles_equal_numpy():
    from napari_rapacl.radiomics._core import row_medians, row_percentiles

    rng = np.random.default_rng(1)
    for trial in range(50):
        n = int(rng.integers(1, 30))
        widths = rng.integers(1, 80, size=n)
        a = np.full((n, widths.max()), np.nan)
        for i, w in enumerate(widths):
            a[i, :w] = rng.integers(0, 6, size=w) if trial % 2 else rng.normal(size=w) * 50
        s, c = np.sort(a, axis=1), np.count_nonzero(~np.isnan(a), axis=1)
        for q in (0, 10, 25, 50, 75, 90, 100):
            np.testing.assert_array_equal(row_percentiles(s, c, q), np.nanpercentile(a, q, axis=1))
        np.testing.assert_array_equal(row_medians(s, c), np.nanmedian(a, axis=1))


def test_bin_edges_equal_pyradiomics():
    from radiomics import imageoperations

    from napari_rapacl.radiomics._core import _bin_edges

    rng = np.random.default_rng(2)
    for trial in range(40):
        v = rng.integers(0, 256, size=int(rng.integers(1, 500))).astype(float)
        if trial % 3 == 0:
            v = rng.normal(size=v.size) * 37.0
        for settings in ({"binWidth": 25}, {"binWidth": 7.5}, {"binCount": 10}, {"binCount": 3}):
            np.testing.assert_array_equal(_bin_edges(v, settings), imageoperations.getBinEdges(v, **settings))


def test_cell_features_equal_the_plain_extractor_loop(her2st_patches):
    patches, labels = her2st_patches
    cfg = rad.RadiomicsConfig()
    ext = _extractor({"shape2D": None, "firstorder": None}, cfg)
    checked = 0
    for patch, lab, mpp in zip(patches, labels, (None, MPP, None), strict=True):
        df = rad.cell_features(patch, lab, cfg, mpp=mpp)
        assert df.index.name == "label" and df.index.is_monotonic_increasing
        assert list(df.columns[:3]) == ["centroid_y", "centroid_x", "area"]
        assert len(df) >= 10 and np.isfinite(df.to_numpy()).all()
        assert df.attrs["radiomics_config"] == cfg.to_dict()
        spacing = 1.0 if mpp is None else mpp
        image = _sitk(rad.to_grey(patch), spacing)
        mask = _sitk(lab.astype(np.uint32), spacing)
        for label_id in df.index[:40]:
            ref = {k: float(v) for k, v in ext.execute(image, mask, label=int(label_id)).items()}
            assert set(ref) == {c for c in df.columns if c.startswith(SHAPE_FO)}
            got = df.loc[label_id, list(ref)].to_numpy(dtype=float)
            np.testing.assert_allclose(
                got, list(ref.values()), rtol=1e-6, atol=1e-9, err_msg=f"label {label_id}"
            )
            ys, xs = np.nonzero(lab == label_id)
            assert df.loc[label_id, "area"] == ys.size
            assert df.loc[label_id, "centroid_y"] == pytest.approx(ys.mean())
            checked += 1
    assert checked >= 60


def test_cell_texture_and_derived_images_equal_the_extractor(her2st_patches):
    patches, labels = her2st_patches
    cfg = rad.RadiomicsConfig(
        cell_classes=("shape2D", "firstorder", "glcm", "ngtdm"),
        image_types={"Original": {}, "Square": {}, "Wavelet": {}},
        grey="haematoxylin",
        bin_width=10,
    )
    df = rad.cell_features(patches[0], labels[0], cfg)
    assert list(df.columns[3:]) == rad.cell_feature_columns(cfg)
    assert any(c.startswith("wavelet-HH_glcm_") for c in df.columns)
    ext = _extractor({"shape2D": None, "firstorder": None, "glcm": None, "ngtdm": None}, cfg)
    image, mask = _sitk(rad.to_grey(patches[0], "haematoxylin")), _sitk(labels[0].astype(np.uint32))
    for label_id in df.index[:6]:
        ref = {k: float(v) for k, v in ext.execute(image, mask, label=int(label_id)).items()}
        assert set(ref) == set(df.columns[3:])
        np.testing.assert_allclose(
            df.loc[label_id, list(ref)].to_numpy(dtype=float), list(ref.values()), rtol=1e-6, atol=1e-9
        )


def test_cell_features_parallel_equals_serial(monkeypatch):
    from napari_rapacl.radiomics import _core

    rng = np.random.default_rng(3)
    centres = [(y, x) for y in range(6, 250, 14) for x in range(6, 250, 14)]
    radii = [(rng.uniform(2.5, 5), rng.uniform(2.5, 5)) for _ in centres]
    lab = _disc_labels((256, 256), centres, radii)
    img = _he_like(lab)
    serial = rad.cell_features(img, lab)
    monkeypatch.setattr(_core, "_PARALLEL_MIN_NUCLEI", 50)
    parallel = rad.cell_features(img, lab, n_jobs=2)
    pd.testing.assert_frame_equal(serial, parallel)


def _roi_crop(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _c_and_numpy_matrices_agree(
    levels: np.ndarray, mask: np.ndarray, ng: int, distances=(1,), alpha=0
) -> int:
    """Every numpy matrix of ``_NumpyMatrices`` equals pyradiomics' C one (or both refuse the ROI).

    Returns how many of the four were computed (not refused)."""
    from radiomics import cMatrices

    from napari_rapacl.radiomics._core import _NumpyMatrices

    fast = _NumpyMatrices(cMatrices)
    d = np.asarray(distances)
    calls = {
        "calculate_glrlm": (levels, mask, ng, max(levels.shape), False, 0),
        "calculate_glszm": (levels, mask, ng, int(mask.sum()), False, 0),
        "calculate_gldm": (levels, mask, d, ng, alpha, False, 0),
        "calculate_ngtdm": (levels, mask, d, ng, False, 0),
    }
    computed = 0
    for name, args in calls.items():
        try:
            ref = getattr(cMatrices, name)(*args)
        except Exception as exc:  # the C code refuses the ROI: so must the numpy path
            with pytest.raises(type(exc)):
                getattr(fast, name)(*args)
            continue
        got = getattr(fast, name)(*args)
        if name == "calculate_glrlm":  # (matrix, angles)
            np.testing.assert_array_equal(got[1], ref[1])
            assert got[1].dtype == ref[1].dtype
            got, ref = got[0], ref[0]
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.shape, ref.shape)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, ref, err_msg=name)  # bit for bit
        computed += 1
    return computed


def test_numpy_texture_matrices_equal_pyradiomics_c(her2st_patches):
    """GLRLM, GLSZM, GLDM and NGTDM matrices from numpy equal pyradiomics' C matrices exactly:
    real her2st ROIs (whole patch, union of nuclei, single nuclei), edge cases, random ROIs."""
    from napari_rapacl.radiomics._core import _BinnedRoi, _usable_nuclei

    patches, labels = her2st_patches
    checked = 0
    for grey_mode, bin_width in (("luminance", 25.0), ("haematoxylin", 10.0)):
        settings = rad.RadiomicsConfig(grey=grey_mode, bin_width=bin_width).pyradiomics_settings()
        for patch, lab in zip(patches, labels, strict=True):
            grey = rad.to_grey(patch, grey_mode)
            ids, slices, *_ = _usable_nuclei(lab, 10)
            union = np.isin(lab, ids)
            rois = [(grey, None), (grey[_roi_crop(union)], union[_roi_crop(union)])]
            rois += [(grey[sl], lab[sl] == i) for i, sl in zip(ids[:5], slices[:5], strict=True)]
            for image, mask in rois:
                roi = _BinnedRoi(image, mask, settings)
                checked += _c_and_numpy_matrices_agree(roi.binned, roi.mask, roi.ng)
    assert checked == 2 * 3 * 7 * 4

    settings = rad.RadiomicsConfig().pyradiomics_settings()
    grey = rad.to_grey(patches[0])
    edge: list[tuple[np.ndarray, np.ndarray | None]] = []
    edge.append((np.full((64, 64), 120.0), None))  # constant patch: one grey level
    disc = _disc_labels((64, 64), [(30, 30)], [8]) > 0
    edge.append((np.full((64, 64), 120.0)[_roi_crop(disc)], disc[_roi_crop(disc)]))  # constant nucleus
    edge.append((grey[_roi_crop(disc)], disc[_roi_crop(disc)]))  # one nucleus
    one = np.zeros((9, 9), bool)
    one[4, 4] = True
    edge.append((grey[:9, :9], one))  # a 1-pixel nucleus in its neighbourhood
    edge.append((grey[4:5, 4:5], one[4:5, 4:5]))  # ... cropped to itself (pyradiomics refuses it)
    diagonal = np.eye(12, dtype=bool)  # one ROI pixel per row and column: angles dropped
    edge.append((grey[:12, :12], diagonal))
    edge.append((grey[:12, :12], diagonal[::-1]))
    edge.append((grey[:1, :40], np.ones((1, 40), bool)))  # a single row
    edge.append((grey[:40, :1], np.ones((40, 1), bool)))  # a single column
    for image, mask in edge:
        roi = _BinnedRoi(image, mask, settings)
        _c_and_numpy_matrices_agree(roi.binned, roi.mask, roi.ng)
    # empty ROI and grey levels outside 1..Ng: the C code's answers (errors included)
    _c_and_numpy_matrices_agree(np.zeros((6, 6), np.int32), np.zeros((6, 6), bool), 3)
    bad = np.full((6, 6), 5, np.int32)
    _c_and_numpy_matrices_agree(bad, np.ones((6, 6), bool), 3)

    rng = np.random.default_rng(11)
    computed = 0
    for trial in range(600):
        h, w = (int(v) for v in rng.integers(1, 14, size=2))
        ng = int(rng.integers(1, 7))
        levels = rng.integers(1, ng + 1, size=(h, w)).astype(np.int32)
        mask = rng.random((h, w)) < rng.uniform(0.05, 1.0)
        if trial % 4 == 0:
            levels[~mask] = rng.integers(0, 9)  # values outside the ROI must not matter
        distances = (1,) if trial % 5 else (1, 2)
        computed += _c_and_numpy_matrices_agree(levels, mask, ng, distances, alpha=int(trial % 3 == 0))
    assert computed > 2000


def test_shape2d_features_equal_pyradiomics(her2st_patches):
    """The per-nucleus shape2D values behind ``morph_*`` and ``cell_features`` are pyradiomics'
    RadiomicsShape2D on each nucleus's bounding box (what the extractor crops to)."""
    import radiomics

    from napari_rapacl.radiomics._core import _usable_nuclei, shape2d_features

    patches, labels = her2st_patches
    cls = radiomics.getFeatureClasses()["shape2D"]
    settings = rad.RadiomicsConfig().pyradiomics_settings()
    for lab in labels[:2]:
        ids, slices, *_ = _usable_nuclei(lab, 10)
        for spacing in (1.0, 0.5, 0.37):
            got = shape2d_features(lab, ids, slices, spacing)
            for k, (i, sl) in enumerate(zip(ids, slices, strict=True)):
                mask = _sitk((lab[sl] == i).astype(np.uint32), spacing)
                fc = cls(mask, mask, **settings)
                fc.enableAllFeatures()
                ref = fc.execute()
                for f, v in ref.items():
                    assert got[f][k] == pytest.approx(float(v), rel=1e-12, abs=1e-300), (i, f)


def _pyradiomics_72(patch: np.ndarray, lab: np.ndarray, cfg: rad.RadiomicsConfig) -> dict[str, float]:
    """The 72 values from pyradiomics alone: the extractor on the union of nuclei and on each
    nucleus (shape2D), its classes on the whole patch (the extractor refuses a mask without
    background), and its first-order class on the list of per-nucleus shape values (morph_*)."""
    import radiomics
    import SimpleITK as sitk

    names = list(rad.rapacl72_names())
    settings = cfg.pyradiomics_settings()
    classes = radiomics.getFeatureClasses()
    grey = rad.to_grey(patch)
    image = _sitk(grey)
    out: dict[str, float] = {}
    ones = _sitk(np.ones(lab.shape, np.uint32))
    for n in names[40:49]:
        _, cls, feat = n[len("patch_") :].split("_", 2)
        fc = classes[cls](image, ones, **settings)
        fc.enableFeatureByName(feat)
        out[n] = float(fc.execute()[feat])
    ids = rad.find_nuclei(lab, cfg.min_nucleus_area_px)[0]
    if len(ids):
        groups: dict[str, list[str]] = {}
        for n in names[:40]:
            _, cls, feat = n[len("cellseg_all_") :].split("_", 2)
            groups.setdefault(cls, []).append(feat)
        union = _sitk(np.isin(lab, ids).astype(np.uint32))
        for k, v in _extractor(groups, cfg).execute(image, union, label=1).items():
            out[f"cellseg_all_{k}"] = float(v)
        shape_ext = _extractor({"shape2D": None}, cfg)
        mask = _sitk(lab.astype(np.uint32))
        shapes: dict[str, list[float]] = {}
        for i in ids:
            for k, v in shape_ext.execute(image, mask, label=int(i)).items():
                shapes.setdefault(k.rsplit("_", 1)[-1].lower(), []).append(float(v))
        getters = {"p10": "10Percentile", "p90": "90Percentile"}
        for n in names[49:]:
            _, shape, stat = n.split("_", 2)
            vals = np.array(shapes[shape])
            if stat in ("p25", "p75"):  # numpy.nanpercentile, pyradiomics' percentile function
                out[n] = float(np.nanpercentile(vals, int(stat[1:])))
                continue
            row = sitk.GetImageFromArray(vals.reshape(1, -1))
            fc = classes["firstorder"](
                row,
                sitk.GetImageFromArray(np.ones((1, vals.size), np.uint32)),
                binCount=cfg.morph_bin_count,
                voxelArrayShift=0,
            )
            feat = getters.get(stat) or next(f for f in fc.featureNames if f.lower() == stat)
            fc.enableFeatureByName(feat)
            out[n] = float(fc.execute()[feat])
    return {n: (v if np.isfinite(v) else 0.0) for n, v in out.items()}


def test_spot_features_equal_plain_pyradiomics(her2st_patches):
    """All 72 values of spot_features equal pyradiomics' own (rtol 1e-9) on real her2st patches and
    edge cases: no nuclei, one nucleus, a 1-pixel nucleus, a constant patch."""
    patches, labels = her2st_patches
    cfg = rad.RadiomicsConfig()
    names = list(rad.rapacl72_names())
    lab1 = _disc_labels((64, 64), [(30, 30)], [8])
    lab_px = lab1.copy()
    lab_px[5, 50] = 2  # a 1-pixel nucleus: not usable (pyradiomics refuses it), the disc is
    lab_const = _disc_labels((64, 64), [(16, 16), (40, 44), (50, 12)], [6, (4, 9), 5])
    cases = [(p, lab) for p, lab in zip(patches, labels, strict=True)]
    cases += [
        (patches[0], np.zeros_like(labels[0])),  # tissue, no nuclei
        (_he_like(lab1), lab1),  # one nucleus
        (_he_like(lab_px), lab_px),
        (np.full((64, 64, 3), 150, np.uint8), lab_const),  # constant patch
    ]
    for k, (patch, lab) in enumerate(cases):
        got = rad.spot_features(patch, lab, cfg)
        ref = _pyradiomics_72(patch, lab, cfg)
        expected = np.array([ref.get(n, 0.0) for n in names])
        np.testing.assert_allclose(
            got[names].to_numpy(), expected, rtol=1e-9, atol=1e-12, err_msg=f"case {k}"
        )
    assert rad.spot_features(*cases[5], cfg)["n_nuclei"] == 1


# --------------------------------------------------------------------------------------------
# per-spot features
# --------------------------------------------------------------------------------------------


def test_spot_features_on_her2st(her2st_patches):
    patches, labels = her2st_patches
    cfg = rad.RadiomicsConfig()
    names = list(rad.rapacl72_names())
    rows = [rad.spot_features(p, lab, cfg, mpp=MPP) for p, lab in zip(patches, labels, strict=True)]
    for s, lab in zip(rows, labels, strict=True):
        assert list(s.index) == names + ["n_nuclei", "cell_label"]
        assert np.isfinite(s.to_numpy()).all()
        assert 5 <= s["n_nuclei"] <= lab.max()
        assert s["cell_label"] in (1, 2, 3, 4)  # tissue: never "sparse"
        assert (
            0
            <= s["cellseg_all_original_firstorder_10Percentile"]
            <= s["cellseg_all_original_firstorder_Maximum"]
        )
        assert s["cellseg_all_original_firstorder_Maximum"] <= 255
        assert s["patch_original_firstorder_Energy"] > s["cellseg_all_original_firstorder_Energy"] > 0
        assert s["morph_maximumdiameter_minimum"] <= s["morph_maximumdiameter_p75"]
        assert s.attrs["radiomics_config"] == cfg.to_dict()
    # the union-mask family is exactly pyradiomics' extractor on the union of the usable nuclei
    ids, *_ = rad.find_nuclei(labels[0], cfg.min_nucleus_area_px)
    union = np.isin(labels[0], ids).astype(np.uint32)
    groups: dict[str, list[str]] = {}
    for n in names[:40]:
        _, cls, feat = n[len("cellseg_all_") :].split("_", 2)
        groups.setdefault(cls, []).append(feat)
    ref = _extractor(groups, cfg).execute(_sitk(rad.to_grey(patches[0])), _sitk(union), label=1)
    np.testing.assert_allclose(
        [rows[0][f"cellseg_all_{k}"] for k in ref], [float(v) for v in ref.values()], rtol=1e-6
    )
    # the whole-patch family is pyradiomics' own classes on an all-one mask (the extractor refuses
    # a mask without background)
    import radiomics

    image = _sitk(rad.to_grey(patches[0]))
    ones = _sitk(np.ones(labels[0].shape, np.uint32))
    for n in names[40:49]:
        _, cls, feat = n[len("patch_") :].split("_", 2)
        fc = radiomics.getFeatureClasses()[cls](image, ones, **cfg.pyradiomics_settings())
        fc.enableFeatureByName(feat)
        assert rows[0][n] == pytest.approx(float(fc.execute()[feat]), rel=1e-9), n
    # morph statistics are pyradiomics first order over the per-nucleus shapes
    cells = rad.cell_features(patches[0], labels[0], rad.RadiomicsConfig(cell_classes=("shape2D",)))
    psr = cells["original_shape2D_PerimeterSurfaceRatio"].to_numpy()
    assert rows[0]["morph_perimetersurfaceratio_maximum"] == pytest.approx(psr.max())
    assert rows[0]["morph_perimetersurfaceratio_range"] == pytest.approx(np.ptp(psr))
    assert rows[0]["morph_perimetersurfaceratio_energy"] == pytest.approx(np.sum(psr**2))
    area = cells["original_shape2D_PixelSurface"].to_numpy()
    assert rows[0]["morph_pixelsurface_standarddeviation"] == pytest.approx(np.std(area))
    assert rows[0]["morph_pixelsurface_meanabsolutedeviation"] == pytest.approx(
        np.mean(np.abs(area - area.mean()))
    )
    diam = cells["original_shape2D_MaximumDiameter"].to_numpy()
    assert rows[0]["morph_maximumdiameter_p75"] == pytest.approx(np.percentile(diam, 75))
    el = cells["original_shape2D_Elongation"].to_numpy()
    p = np.histogram(el, bins=cfg.morph_bin_count)[0] / el.size
    p = p[p > 0]
    assert rows[0]["morph_elongation_entropy"] == pytest.approx(-np.sum(p * np.log2(p + np.spacing(1))))


def test_full_feature_set(her2st_patches):
    patches, labels = her2st_patches
    cfg = rad.RadiomicsConfig(image_types={"Original": {}, "LoG": {"sigma": [1.0]}})
    s = rad.spot_features(patches[1], labels[1], cfg, "full")
    names = rad.spot_feature_names(cfg, "full")
    assert list(s.index) == names + ["n_nuclei"]
    assert len(names) > 72 * 4 and set(rad.rapacl72_names()) <= set(names)
    assert any(n.startswith("patch_log-sigma-1-0-mm-3D_glszm_") for n in names)
    assert np.isfinite(s.to_numpy()).all()
    s72 = rad.spot_features(patches[1], labels[1], cfg, "rapacl72")
    np.testing.assert_allclose(s[list(rad.rapacl72_names())], s72[list(rad.rapacl72_names())], rtol=1e-9)
    with pytest.raises(RapaclInputError, match="feature_set"):
        rad.spot_features(patches[1], labels[1], cfg, "all")
    # every feature of every class equals pyradiomics': the extractor on the union of nuclei (LoG
    # image included), the classes on the whole patch of each image
    import radiomics

    from napari_rapacl.radiomics._core import derived_images

    ids = rad.find_nuclei(labels[1], cfg.min_nucleus_area_px)[0]
    union = _sitk(np.isin(labels[1], ids).astype(np.uint32))
    grey = rad.to_grey(patches[1])
    ext = _extractor(dict.fromkeys(cfg.spot_classes), cfg)
    ref = {f"cellseg_all_{k}": float(v) for k, v in ext.execute(_sitk(grey), union, label=1).items()}
    ones = _sitk(np.ones(labels[1].shape, np.uint32))
    for image_name, arr in derived_images(grey, cfg):
        for cls in cfg.spot_classes:
            fc = radiomics.getFeatureClasses()[cls](_sitk(arr), ones, **cfg.pyradiomics_settings())
            fc.enableAllFeatures()
            ref.update({f"patch_{image_name}_{cls}_{k}": float(v) for k, v in fc.execute().items()})
    assert set(ref) == {n for n in names if not n.startswith("morph_")}
    expected = np.array([ref[n] if np.isfinite(ref[n]) else 0.0 for n in ref])
    np.testing.assert_allclose(s[list(ref)].to_numpy(), expected, rtol=1e-9, atol=1e-12)


def test_empty_patch_defaults():
    white = np.full((64, 64, 3), 255, np.uint8)
    s = rad.spot_features(white, np.zeros((64, 64), np.int32), mpp=MPP)
    assert np.isfinite(s.to_numpy()).all()
    assert s["n_nuclei"] == 0 and s["cell_label"] == 0
    zero_cols = [c for c in s.index if c.startswith(("cellseg_all_", "morph_"))]
    assert len(zero_cols) == 63 and (s[zero_cols] == 0).all()
    assert s["patch_original_firstorder_Energy"] == pytest.approx(64 * 64 * 255.0**2)
    df = rad.cell_features(white, np.zeros((64, 64), np.int32))
    assert len(df) == 0 and list(df.columns[3:]) == rad.cell_feature_columns(rad.RadiomicsConfig())


def test_single_nucleus_patch():
    lab = _disc_labels((64, 64), [(30, 30)], [8])
    s = rad.spot_features(_he_like(lab), lab, mpp=MPP)
    assert np.isfinite(s.to_numpy()).all() and s["n_nuclei"] == 1
    for col in ("range", "skewness", "kurtosis"):
        assert s[f"morph_perimetersurfaceratio_{col}"] == 0
    assert s["morph_pixelsurface_standarddeviation"] == 0
    assert s["morph_pixelsurface_energy"] == pytest.approx(float((lab > 0).sum()) ** 2)
    assert s["cellseg_all_original_firstorder_Range"] > 0


def test_one_pixel_and_thin_nuclei_are_skipped():
    lab = np.zeros((40, 40), np.int32)
    lab[5, 5] = 1  # one pixel
    lab[10, 10:20] = 2  # one pixel thin
    lab[20:23, 20:23] = 3  # a valid 3 x 3 nucleus, but below the default minimum area (10 px)
    lab[28:34, 28:34] = 7  # valid
    img = _he_like(lab)
    df = rad.cell_features(img, lab)
    assert list(df.index) == [7] and df.attrs["skipped_labels"] == [1, 2, 3]
    df4 = rad.cell_features(img, lab, rad.RadiomicsConfig(min_nucleus_area_px=4))
    assert list(df4.index) == [3, 7]
    s = rad.spot_features(img, np.where(lab == 7, 0, lab))
    assert s["n_nuclei"] == 0 and (s[[c for c in s.index if c.startswith("morph_")]] == 0).all()


def test_large_label_ids_and_int64_labels():
    lab = np.zeros((40, 40), np.int64)
    lab[2:8, 2:8] = 2**40
    lab[20:30, 20:26] = 5
    img = _he_like(lab)
    df = rad.cell_features(img, lab)
    assert list(df.index) == [5, 2**40] and list(df["area"]) == [60, 36]
    ref = rad.cell_features(img, np.where(lab == 2**40, 3, lab).astype(np.int32))
    np.testing.assert_allclose(df.loc[[2**40, 5]].to_numpy(), ref.loc[[3, 5]].to_numpy())


def test_grey_rgba_float_and_bad_inputs(her2st_patches):
    patches, labels = her2st_patches
    patch, lab = patches[2], labels[2]
    grey = np.rint(rad.to_grey(patch)).astype(np.uint8)
    s_grey = rad.spot_features(grey, lab)
    s_grey3 = rad.spot_features(np.repeat(grey[..., None], 3, axis=2), lab)
    pd.testing.assert_series_equal(s_grey, s_grey3)
    s_rgb = rad.spot_features(patch, lab)
    rgba = np.concatenate([patch, np.full(patch.shape[:2] + (1,), 255, np.uint8)], axis=2)
    pd.testing.assert_series_equal(rad.spot_features(rgba, lab), s_rgb)
    pd.testing.assert_series_equal(rad.spot_features(patch / 255.0, lab), s_rgb)
    with pytest.raises(RapaclInputError, match="dtype int16"):
        rad.spot_features(patch.astype(np.int16), lab)
    with pytest.raises(RapaclInputError, match=r"\[0, 1\]"):
        rad.cell_features(patch.astype(np.float32), lab)
    with pytest.raises(RapaclInputError, match="shape"):
        rad.cell_features(patch, lab[:-1])
    with pytest.raises(RapaclInputError, match="boolean mask"):
        rad.cell_features(patch, lab > 0)
    with pytest.raises(RapaclInputError, match="negative"):
        rad.cell_features(patch, -lab)
    with pytest.raises(RapaclInputError, match="integer label image"):
        rad.cell_features(patch, lab.astype(np.float32))
    with pytest.raises(RapaclInputError, match="mpp"):
        rad.cell_features(patch, lab, mpp=0)
    with pytest.raises(RapaclInputError, match="shape"):
        rad.spot_features(np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.int32))


# --------------------------------------------------------------------------------------------
# composition label
# --------------------------------------------------------------------------------------------


def _grid(shape, step, jitter=0):
    return [
        (y, x)
        for y in range(step // 2, shape[0] - step // 2 + 1, step)
        for x in range(step // 2, shape[1] - step // 2 + 1, step)
    ]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("lymphocytes", 1), ("tumour", 2), ("stroma", 3), ("sparse", 0), ("mixed", 4)],
)
def test_composition_rule_on_synthetic_patches(kind, expected):
    shape = (224, 224)  # 112 um at 0.5 um/px
    if kind == "lymphocytes":  # many small round nuclei, r = 3 um -> 28 um^2
        centres = _grid(shape, 16)
        radii = [6] * len(centres)
    elif kind == "tumour":  # large round nuclei, r = 6 um -> 113 um^2
        centres = _grid(shape, 32)
        radii = [12] * len(centres)
    elif kind == "stroma":  # spindle nuclei 3 x 14 um
        centres = _grid(shape, 32)
        radii = [(3, 14)] * len(centres)
    elif kind == "sparse":  # 3 nuclei in 12544 um^2 = 240 / mm^2
        centres = [(50, 50), (120, 150), (180, 60)]
        radii = [12] * 3
    else:  # a quarter each of small round, large round, spindle and medium (untyped) nuclei
        centres = _grid(shape, 32)
        radii = [[6, 12, (3, 14), 8][k % 4] for k in range(len(centres))]
    lab = _disc_labels(shape, centres, radii)
    s = rad.spot_features(_he_like(lab), lab, mpp=MPP)
    assert s["cell_label"] == expected, (kind, s["n_nuclei"])
    assert rad.COMPOSITION_CLASSES[expected]


def test_nucleus_types_and_rule_thresholds():
    rule = rad.CompositionRule()
    types = rad.nucleus_types([20, 20, 120, 120, 50, 200], [0.9, 0.3, 0.9, 0.3, 0.8, 0.6], rule)
    assert list(types) == [1, 3, 2, 3, 0, 2]
    area = np.full(40, 120.0)
    assert rad.composition_from_morphology(area, np.full(40, 0.9), 12544.0) == 2
    assert rad.composition_from_morphology(area[:4], np.full(4, 0.9), 12544.0) == 0  # 319 / mm^2 < 400
    # a tie between the leading types is "mixed"
    el = np.r_[np.full(20, 0.9), np.full(20, 0.2)]
    assert rad.composition_from_morphology(area, el, 12544.0) == 4
    strict = rad.CompositionRule(min_share=0.9)
    el = np.r_[np.full(30, 0.9), np.full(10, 0.2)]
    assert rad.composition_from_morphology(area, el, 12544.0) == 2
    assert rad.composition_from_morphology(area, el, 12544.0, strict) == 4


def test_user_given_cell_labels_majority():
    cells = pd.DataFrame(
        {
            "x": [100, 101, 102, 300, 301, 900],
            "y": [100, 100, 100, 300, 300, 900],
            "cell_type": ["tumour", "tumour", "immune", "stroma", "immune", "immune"],
        }
    )
    codes, classes = rad.labels_from_cells(
        cells, np.array([100.0, 300, 600]), np.array([100.0, 300, 600]), 20, "cell_type"
    )
    assert classes == ["immune", "stroma", "tumour"]
    assert list(codes) == [2, 0, -1]  # majority; tie -> smallest code; no cell -> -1 (ignored by the loss)
    with pytest.raises(RapaclInputError, match="no column"):
        rad.labels_from_cells(cells, np.zeros(1), np.zeros(1), 5, "celltype")


# --------------------------------------------------------------------------------------------
# slide-level generator: cache, parallel, user labels
# --------------------------------------------------------------------------------------------


def test_iter_spot_features_cache_hit_does_no_work(her2st_c2, tmp_path, monkeypatch):
    spots = her2st_c2.spots.subset(np.arange(0, 30, 5))
    _pipeline.MEMORY_CACHE.clear()  # process-wide: another test may have measured these spots
    calls = {"n": 0}
    real_job = _pipeline._spot_job

    def counting_job(*args, **kwargs):
        calls["n"] += 1
        return real_job(*args, **kwargs)

    monkeypatch.setattr(_pipeline, "_spot_job", counting_job)
    kwargs = {"size": 224, "mpp": MPP, "segment": "classical", "cache_dir": tmp_path, "n_jobs": 1}
    gen = rad.iter_spot_features(her2st_c2.slide, spots, **kwargs)
    progress = []
    t0 = time.perf_counter()
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            first = stop.value
            break
    t_first = time.perf_counter() - t0
    assert calls["n"] == len(spots) == len(first)
    assert all(isinstance(p, Progress) and p.stage == "radiomics" for p in progress)
    assert progress[-1].done == progress[-1].total == len(spots)
    assert list(first.index) == list(spots.barcode) and first.index.name == "barcode"
    assert list(first.columns) == list(rad.rapacl72_names()) + ["n_nuclei", "cell_label"]
    assert np.isfinite(first.to_numpy(dtype=float)).all() and (first["n_nuclei"] > 0).all()
    assert first.attrs["cache_hits"] == 0 and first.attrs["cell_label_source"] == "morphology rule"
    files = list((tmp_path / "radiomics").rglob("*.npy"))
    assert len(files) == len(spots) and not list(tmp_path.rglob("*.tmp"))

    memory = _pipeline.MEMORY_CACHE
    assert len(memory) >= len(spots)  # the process-wide copy of the entries
    memory.clear()  # what follows is about the disk cache
    t0 = time.perf_counter()
    second = rad.spot_feature_table(her2st_c2.slide, spots, **kwargs)
    t_second = time.perf_counter() - t0
    assert calls["n"] == len(spots)  # no segmentation, no pyradiomics the second time
    assert second.attrs["cache_hits"] == len(spots)
    pd.testing.assert_frame_equal(first, second)
    assert t_first > 5 * t_second

    # other settings are other entries
    rad.spot_feature_table(her2st_c2.slide, spots.subset([0]), **{**kwargs, "config": {"bin_width": 16}})
    assert calls["n"] == len(spots) + 1
    # a damaged entry is recomputed
    files[0].write_bytes(b"garbage")
    memory.clear()
    rad.spot_feature_table(her2st_c2.slide, spots, **kwargs)
    assert calls["n"] == len(spots) + 2


def test_iter_spot_features_parallel_and_user_labels(her2st_c2, monkeypatch):
    spots = her2st_c2.spots.subset(np.arange(40, 46))
    monkeypatch.setattr(_pipeline, "MIN_PARALLEL", 2)
    kwargs = {"size": 224, "mpp": MPP, "segment": "classical"}
    serial = rad.spot_feature_table(her2st_c2.slide, spots, n_jobs=1, **kwargs)
    parallel = rad.spot_feature_table(her2st_c2.slide, spots, n_jobs=2, **kwargs)
    pd.testing.assert_frame_equal(serial, parallel)
    per_spot = pd.Series([3, 1, 1], index=list(spots.barcode[:3]))
    labelled = rad.spot_feature_table(her2st_c2.slide, spots, n_jobs=1, cell_labels=per_spot, **kwargs)
    assert list(labelled["cell_label"]) == [3, 1, 1, -1, -1, -1]
    cells = pd.DataFrame({"x": spots.x + 3, "y": spots.y - 3, "cell_type": ["a", "b", "b", "a", "b", "a"]})
    labelled = rad.spot_feature_table(her2st_c2.slide, spots, n_jobs=1, cell_labels=cells, **kwargs)
    assert list(labelled["cell_label"]) == [0, 1, 1, 0, 1, 0]
    assert labelled.attrs["cell_label_classes"] == ["a", "b"]
    # a spot outside the slide: its patch is white (the fill of read_region) -> documented defaults
    h, w = her2st_c2.slide.shape
    outside = pd.DataFrame({"x": [w + 500.0], "y": [h + 500.0]}, index=["outside"])
    row = rad.spot_feature_table(her2st_c2.slide, outside, n_jobs=1, **kwargs).loc["outside"]
    assert row["n_nuclei"] == 0 and row["cell_label"] == 0 and np.isfinite(row.to_numpy(dtype=float)).all()
    with pytest.raises(RapaclInputError, match="feature_set"):
        rad.iter_spot_features(her2st_c2.slide, spots, feature_set="x")
    with pytest.raises(RapaclInputError, match="segment"):
        rad.iter_spot_features(her2st_c2.slide, spots, segment=3)


def test_slide_content_hash_and_segment_identity(tmp_path):
    import dask.array as da

    from napari_rapacl.io.slide import Slide, open_slide

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(600, 500, 3), dtype=np.uint8)
    a = Slide((da.from_array(arr, chunks=(256, 256, 3)),), (1.0,), mpp=0.5)
    b = Slide((da.from_array(arr.copy(), chunks=(128, 128, 3)),), (1.0,), mpp=0.5)
    assert rad.slide_content_hash(a) == rad.slide_content_hash(b)
    changed = arr.copy()
    changed[0, 0, 0] ^= 1
    c = Slide((da.from_array(changed, chunks=(256, 256, 3)),), (1.0,), mpp=0.5)
    assert rad.slide_content_hash(c) != rad.slide_content_hash(a)
    assert rad.slide_content_hash(a.with_mpp(0.25)) != rad.slide_content_hash(a)
    from PIL import Image

    p1, p2 = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(arr).save(p1)
    p2.write_bytes(p1.read_bytes())
    assert rad.slide_content_hash(open_slide(p1, mpp=0.5)) == rad.slide_content_hash(open_slide(p2, mpp=0.5))
    assert rad.segment_identity("classical").startswith("segment_nuclei:classical")
    assert rad.segment_identity(_segment).endswith("._segment")
    assert rad.segment_identity(_segment, "v2") == "key:v2"
