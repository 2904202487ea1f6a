"""Tests for napari_rapacl.preprocess: gene lists, log1p(CP10k), gene selection, patches."""

from __future__ import annotations

import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from napari_rapacl._errors import InvalidCountsError, MissingPixelSizeError, RapaclInputError
from napari_rapacl.preprocess import (
    extract_patches,
    iter_patches,
    normalize_log1p_cp10k,
    read_gene_list,
    resolve_genes,
    select_genes,
    zscore_apply,
    zscore_fit,
)

HER2ST_SECTIONS = ("C2", "C3", "C4", "C5", "C6")


def _adata(X, genes, sparse=False) -> ad.AnnData:
    X = np.asarray(X, dtype=np.float32)
    obs = pd.DataFrame(index=[f"s{i}" for i in range(X.shape[0])])
    var = pd.DataFrame(index=list(genes))
    return ad.AnnData(sp.csr_matrix(X) if sparse else X, obs=obs, var=var)


# --------------------------------------------------------------------------------------------
# gene lists
# --------------------------------------------------------------------------------------------
def test_read_gene_list_comments_blanks(tmp_path):
    p = tmp_path / "genes.txt"
    p.write_text("\ufeff# header comment\nERBB2\n\n  GAPDH  \n# another\nACTB\n", encoding="utf-8")
    assert read_gene_list(p) == ["ERBB2", "GAPDH", "ACTB"]


def test_read_gene_list_duplicates_name_file(tmp_path):
    p = tmp_path / "dup_genes.txt"
    p.write_text("A\nB\nA\n")
    with pytest.raises(RapaclInputError, match=r"dup_genes\.txt.*A \(lines 1 and 3\)"):
        read_gene_list(p)


def test_read_gene_list_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_gene_list(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(RapaclInputError, match="no gene"):
        read_gene_list(empty)
    two = tmp_path / "two.txt"
    two.write_text("A\tB\n")
    with pytest.raises(RapaclInputError, match="line 1"):
        read_gene_list(two)


def test_resolve_genes_forms(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text("G1\nG0\n")
    a = _adata([[5, 1], [3, 1]], ["G0", "G1"])
    assert resolve_genes([a], p) == ["G1", "G0"]
    assert resolve_genes([a], ["G0"]) == ["G0"]
    assert resolve_genes([a], None, k=1) == ["G0"]
    with pytest.raises(RapaclInputError, match="twice"):
        resolve_genes([a], ["G0", "G0"])


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
COUNTS = np.array([[1, 0, 3, 6], [0, 0, 0, 0], [2, 2, 0, 4]], dtype=np.float64)
GENES = ["A", "B", "C", "D"]


def _by_hand(counts, cols):
    out = np.zeros((counts.shape[0], len(cols)))
    for i, row in enumerate(counts):
        lib = row.sum()  # over ALL genes
        for j, c in enumerate(cols):
            out[i, j] = 0.0 if lib == 0 else np.log(1.0 + 1e4 * row[c] / lib)
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_normalize_matches_hand_computation(sparse):
    a = _adata(COUNTS, GENES, sparse=sparse)
    got = normalize_log1p_cp10k(a, ["C", "A"])
    assert got.dtype == np.float32 and got.shape == (3, 2)
    np.testing.assert_allclose(got, _by_hand(COUNTS, [2, 0]), rtol=1e-6)
    # a concrete value: spot 0, gene C: ln(1 + 1e4 * 3 / 10)
    assert got[0, 0] == pytest.approx(np.log1p(3000.0), rel=1e-6)
    # zero-library spot -> zeros, not NaN
    assert np.all(got[1] == 0) and np.all(np.isfinite(got))
    # all genes, and the (array, var_names) form
    np.testing.assert_allclose(normalize_log1p_cp10k(a), _by_hand(COUNTS, range(4)), rtol=1e-6)
    np.testing.assert_allclose(
        normalize_log1p_cp10k((COUNTS, GENES), ["D"]), _by_hand(COUNTS, [3]), rtol=1e-6
    )


def test_normalize_library_size_uses_all_genes():
    # subsetting must not change the library size: gene A alone would give ln(1 + 1e4)
    got = normalize_log1p_cp10k((COUNTS, GENES), ["A"])
    assert got[0, 0] == pytest.approx(np.log1p(1e4 * 1 / 10), rel=1e-6)
    assert got[0, 0] < np.log1p(1e4) - 1


def test_normalize_missing_genes():
    a = _adata(COUNTS, GENES)
    with pytest.raises(RapaclInputError, match=r"2 of 3 requested genes are absent.*NOPE1, NOPE2"):
        normalize_log1p_cp10k(a, ["A", "NOPE1", "NOPE2"])
    with pytest.warns(UserWarning, match="filled with zeros"):
        got = normalize_log1p_cp10k(a, ["NOPE1", "A"], missing="zero")
    assert np.all(got[:, 0] == 0)
    np.testing.assert_allclose(got[:, 1], _by_hand(COUNTS, [0])[:, 0], rtol=1e-6)


def test_normalize_bad_counts():
    with pytest.raises(InvalidCountsError, match="negative"):
        normalize_log1p_cp10k((np.array([[1, -1]]), ["A", "B"]))
    with pytest.raises(InvalidCountsError, match="NaN"):
        normalize_log1p_cp10k((np.array([[1, np.nan]]), ["A", "B"]))
    with pytest.raises(InvalidCountsError, match="2-D"):
        normalize_log1p_cp10k(np.array([1, 2]))
    with pytest.raises(RapaclInputError, match="gene names are needed"):
        normalize_log1p_cp10k(np.ones((2, 2)), ["A"])
    with pytest.raises(RapaclInputError, match="twice"):
        normalize_log1p_cp10k((COUNTS, GENES), ["A", "A"])


# --------------------------------------------------------------------------------------------
# gene selection
# --------------------------------------------------------------------------------------------
def _section(rng, n, genes, boost=None):
    X = rng.poisson(2.0, size=(n, len(genes))).astype(np.float32)
    for g, lam in (boost or {}).items():
        X[:, genes.index(g)] = rng.poisson(lam, size=n)
    return _adata(X, genes, sparse=True)


def test_select_genes_uses_training_sections_only():
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(20)] + ["LEAK"]
    train = [_section(rng, 50, genes, {"G05": 40, "G07": 30, "LEAK": 0.5}) for _ in range(2)]
    held_out = _section(rng, 50, genes, {"LEAK": 500})
    sel = select_genes(train, 2)
    assert sel == ["G05", "G07"]
    assert "LEAK" not in select_genes(train, 5)
    # sanity: the gene is top in the held-out section and would be picked if it were included
    assert select_genes([held_out], 1) == ["LEAK"]
    assert "LEAK" in select_genes([*train, held_out], 3)


def test_select_genes_filters_and_ties():
    X1 = np.array([[5, 1, 1, 0, 9], [5, 1, 1, 0, 9], [5, 1, 1, 1, 9]])
    X2 = np.array([[5, 1, 1, 0], [5, 1, 1, 0], [5, 1, 1, 0]])
    s1 = _adata(X1, ["top", "tieB", "tieA", "rare", "only1"])
    s2 = _adata(X2, ["top", "tieB", "tieA", "rare"])
    # 'only1' is absent from s2; 'rare' is expressed in 1/3 of s1 and 0/3 of s2
    assert select_genes([s1, s2], 3) == ["top", "tieA", "tieB"]
    assert select_genes([s2, s1], 3) == ["top", "tieA", "tieB"]
    with pytest.raises(RapaclInputError, match="only 3 genes"):
        select_genes([s1, s2], 4)
    assert "rare" in select_genes([s1, s2], 4, min_frac_spots=0.0)


def test_select_genes_by_var():
    rng = np.random.default_rng(1)
    genes = ["flat", "varying", "mid"]
    X = np.stack([np.full(40, 50.0), rng.choice([0.0, 80.0], 40), np.full(40, 20.0)], axis=1) + 1
    s = _adata(X, genes)
    assert select_genes([s], 1, by="var") == ["varying"]
    with pytest.raises(RapaclInputError, match="by must be"):
        select_genes([s], 1, by="max")  # type: ignore[arg-type]
    with pytest.raises(RapaclInputError, match="k must be"):
        select_genes([s], 0)
    with pytest.raises(RapaclInputError, match="no training section"):
        select_genes([], 1)


def test_zscore_roundtrip():
    rng = np.random.default_rng(2)
    X = rng.normal(3, 2, size=(100, 4))
    X[:, 3] = 7.0  # constant column: std -> 1, not a division by zero
    mean, std = zscore_fit(X)
    Z = zscore_apply(X, mean, std)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Z[:, :3].std(0), 1, atol=1e-5)
    assert np.all(Z[:, 3] == 0)
    with pytest.raises(RapaclInputError):
        zscore_apply(X[:, :2], mean, std)


# --------------------------------------------------------------------------------------------
# her2st: gene list and counts
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_counts(data_dir):
    out = {}
    for s in HER2ST_SECTIONS:
        df = pd.read_csv(data_dir / "her2st" / "data" / "ST-cnts" / f"{s}.tsv.gz", sep="\t", index_col=0)
        out[s] = ad.AnnData(
            sp.csr_matrix(df.to_numpy(dtype=np.float32)),
            obs=pd.DataFrame(index=df.index.astype(str)),
            var=pd.DataFrame(index=df.columns.astype(str)),
        )
    return out


def test_her2st_785_gene_list_present_in_every_section(data_dir, her2st_counts):
    genes = read_gene_list(data_dir / "her2st" / "genes_785_hvg.txt")
    assert len(genes) == 785 and len(set(genes)) == 785
    for s, a in her2st_counts.items():
        present = set(a.var_names)
        missing = [g for g in genes if g not in present]
        assert missing == [], f"{s}: {len(missing)} of the 785 genes missing: {missing[:5]}"
        Y = normalize_log1p_cp10k(a, genes, name=s)
        assert Y.shape == (a.n_obs, 785) and np.all(np.isfinite(Y))
        # hand check of one spot and gene on the real data
        j = a.var_names.get_loc(genes[0])
        row = np.asarray(a.X[0].todense()).ravel()
        assert Y[0, 0] == pytest.approx(np.log1p(1e4 * row[j] / row.sum()), rel=1e-5)


def test_her2st_selection_leave_one_out(her2st_counts):
    train = [her2st_counts[s] for s in ("C3", "C4", "C5", "C6")]
    sel = select_genes(train, 250)
    assert len(sel) == 250 and len(set(sel)) == 250
    # ERBB2 (HER2) is among the most expressed genes of these HER2+ tumours
    assert "ERBB2" in sel[:20]
    # deterministic, and independent of the order the sections are given in
    assert select_genes(train[::-1], 250) == sel


# --------------------------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------------------------
def _synthetic_image(h=768, w=1024) -> np.ndarray:
    """Vertical 8-px black/white stripes in R; G = block row (128-px blocks) * 40; B = 100."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    cols = np.arange(w)
    img[:, (cols // 8) % 2 == 1, 0] = 255
    img[..., 1] = (np.arange(h)[:, None] // 128 * 40).astype(np.uint8)
    img[..., 2] = 100
    return img


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    from napari_rapacl.io.slide import open_slide, write_ome_tiff

    img = _synthetic_image()
    path = tmp_path_factory.mktemp("slide") / "stripes.ome.tif"
    write_ome_tiff(path, img, mpp=0.5, n_levels=3, tile=256)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.5)
    return slide, img


def test_patch_geometry_and_mpp_scaling(synthetic_slide):
    slide, img = synthetic_slide
    # centre (256, 320): a 32-px patch at 1.0 um/px covers 64 level-0 px at 0.5 um/px,
    # i.e. 8 stripes of 8 level-0 px -> 4 output px each
    p = extract_patches(slide, [256.0], [320.0], size=32, mpp=1.0)
    assert p.shape == (1, 32, 32, 3) and p.dtype == np.uint8
    expected_row = np.repeat(np.tile([0, 255], 4), 4)
    np.testing.assert_array_equal(p[0, 0, :, 0], expected_row)
    np.testing.assert_array_equal(p[0, :, :, 0], np.broadcast_to(expected_row, (32, 32)))
    # centre pixel colour: G encodes the 128-px block row (320 // 128 = 2 -> 80), B = 100
    assert tuple(p[0, 16, 16, 1:]) == (80, 100)
    # a patch at the native resolution is an exact crop
    q = extract_patches(slide, [100.0], [200.0], size=40, mpp=0.5)
    np.testing.assert_array_equal(q[0], img[180:220, 80:120])


def test_patch_uses_pyramid_and_area_averaging(synthetic_slide):
    slide, img = synthetic_slide
    # 8 um/px = 16x downsampling (read from a pyramid level): each output pixel spans one black
    # and one white 8-px stripe, so area averaging gives mid-grey (nearest would give 0 or 255)
    assert slide.best_level(16.0) > 0
    p = extract_patches(slide, [512.0], [384.0], size=16, mpp=8.0)
    assert np.all(np.abs(p[0, ..., 0].astype(int) - 128) <= 2)
    ref = np.asarray(
        Image.fromarray(img[384 - 128 : 384 + 128, 512 - 128 : 512 + 128]).resize(
            (16, 16), Image.Resampling.BOX
        )
    )
    assert np.abs(p[0].astype(int) - ref.astype(int)).max() <= 2


def test_patch_outside_is_white_and_batches(synthetic_slide):
    slide, img = synthetic_slide
    p = extract_patches(slide, [0.0], [0.0], size=32, mpp=1.0)
    assert np.all(p[0, :16, :, :] == 255) and np.all(p[0, :, :16, :] == 255)
    assert np.all(p[0, 16:, 16:, 2] == 100)
    xs = np.linspace(50, 950, 10)
    ys = np.linspace(50, 700, 10)
    full = extract_patches(slide, xs, ys, size=24, mpp=1.0)
    batches = list(iter_patches(slide, xs, ys, size=24, mpp=1.0, batch_size=4))
    assert [(a, b) for a, b, _ in batches] == [(0, 4), (4, 8), (8, 10)]
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in batches]), full)
    assert extract_patches(slide, [], [], size=8, mpp=1.0).shape == (0, 8, 8, 3)


def test_patch_errors(synthetic_slide, tmp_path):
    from napari_rapacl.io.slide import open_slide

    slide, img = synthetic_slide
    png = tmp_path / "no_mpp.png"
    Image.fromarray(img[:64, :64]).save(png)
    no_mpp = open_slide(png)
    assert no_mpp.mpp is None
    with pytest.raises(MissingPixelSizeError, match="patch extraction"):
        extract_patches(no_mpp, [10], [10], size=8, mpp=1.0)
    with pytest.raises(MissingPixelSizeError):
        iter_patches(no_mpp, [10], [10], size=8, mpp=1.0)  # raised eagerly, before iterating
    with pytest.raises(RapaclInputError, match="size"):
        extract_patches(slide, [10], [10], size=0, mpp=1.0)
    with pytest.raises(RapaclInputError, match="mpp"):
        extract_patches(slide, [10], [10], size=8, mpp=-1)
    with pytest.raises(RapaclInputError, match="equal length"):
        extract_patches(slide, [10, 20], [10], size=8, mpp=1.0)
    with pytest.raises(RapaclInputError, match="NaN"):
        extract_patches(slide, [np.nan], [10], size=8, mpp=1.0)


def test_her2st_c2_patches(data_dir, capsys, monkeypatch):
    from napari_rapacl.datasets import her2st

    sec = her2st("C2", data_dir=data_dir)
    slide, spots = sec.slide, sec.spots
    assert slide.mpp is not None
    t0 = time.perf_counter()
    patches = extract_patches(slide, spots.x, spots.y, size=112, mpp=1.0)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nher2st C2: {len(spots)} patches of 112 px at 1.0 um/px in {elapsed:.2f} s")
    assert patches.shape == (len(spots), 112, 112, 3)
    # spots sit on tissue: patches are not blank background
    assert np.median(patches.reshape(len(spots), -1).mean(1)) < 220
    assert elapsed < 30
    # one patch against a direct crop of the JPEG, resampled the same way
    i = len(spots) // 2
    box = 112 * 1.0 / slide.mpp
    cx, cy = spots.x[i], spots.y[i]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the her2st JPEGs are ~92 Mpx
    with Image.open(slide.path) as im:
        ref = im.convert("RGB").resize(
            (112, 112),
            Image.Resampling.BOX,
            box=(cx - box / 2, cy - box / 2, cx + box / 2, cy + box / 2),
        )
    diff = np.abs(patches[i].astype(int) - np.asarray(ref).astype(int))
    assert diff.mean() < 3, diff.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(iter_patches(slide, spots.x[:3], spots.y[:3], size=32, mpp=2.0))
