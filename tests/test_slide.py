"""Tests for napari_rapacl.io.slide: lazy slide reading and OME-TIFF writing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_rapacl._errors import (
    CorruptFileError,
    MissingPixelSizeError,
    RapaclInputError,
    UnsupportedFormatError,
)
from napari_rapacl.io.slide import Slide, open_slide, write_ome_tiff

HER2ST_JPG = Path("her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg")
VISIUM_PNG = Path("visium_mouse_brain_crop/spatial/tissue_hires_image.png")


def pattern_image(height: int, width: int) -> np.ndarray:
    """A recognisable RGB pattern: red ramps along x, green along y, blue checkerboard."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx // 32 + yy // 32) % 2) * 200], axis=-1).astype(
        np.uint8
    )


def _pattern_block(block_info=None):
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    yy = np.arange(y0, y1, dtype=np.int64)[:, None]
    xx = np.arange(x0, x1, dtype=np.int64)[None, :]
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    out[..., 0] = (xx // 16) % 256
    out[..., 1] = (yy // 16) % 256
    out[..., 2] = ((xx // 512 + yy // 512) % 2) * 200
    return out


def lazy_pattern(size: int, chunk: int = 1024) -> da.Array:
    n = size // chunk
    return da.map_blocks(_pattern_block, dtype=np.uint8, chunks=((chunk,) * n, (chunk,) * n, (3,)))


def _square_chunks(slide: Slide, chunk: int) -> None:
    for level in slide.levels:
        assert level.dtype == np.uint8 and level.ndim == 3 and level.shape[2] == 3
        # every chunk but the last along each axis is chunk x chunk
        assert all(c == chunk for c in level.chunks[0][:-1])
        assert all(c == chunk for c in level.chunks[1][:-1])
        assert level.chunks[2] == (3,)


# ---- OME-TIFF round trip ------------------------------------------------------------------------


def test_ome_tiff_round_trip(tmp_path):
    image = pattern_image(1500, 2100)
    path = write_ome_tiff(tmp_path / "pattern.ome.tif", image, mpp=0.5, tile=256)
    assert path == tmp_path / "pattern.ome.tif"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pattern.ome.tif"]  # no temp files left

    slide = open_slide(path, chunk=512)
    assert slide.shape == (1500, 2100)
    assert slide.mpp == pytest.approx(0.5)
    assert slide.mpp_source == "metadata"
    assert slide.path == path
    # levels /2 until the longest side <= tile
    shapes = [(1500, 2100), (750, 1050), (375, 525), (187, 262), (93, 131)]
    assert [lv.shape[:2] for lv in slide.levels] == shapes
    assert slide.downsamples[0] == 1.0
    assert slide.downsamples[1:] == pytest.approx([2.0, 4.0, 2100 / 262, 2100 / 131])
    _square_chunks(slide, 512)

    np.testing.assert_array_equal(slide.levels[0].compute(), image)
    level2 = slide.levels[2].compute().astype(float)
    expected = image[:1500, :2100].reshape(375, 4, 525, 4, 3).mean(axis=(1, 3))
    assert np.abs(level2 - expected).max() <= 2.0

    region = slide.read_region(100, 200, 612, 456)
    np.testing.assert_array_equal(region, image[200:456, 100:612])
    region = slide.read_region(100, 200, 612, 456, level=1)
    assert region.shape == (128, 256, 3)
    expected = image[200:456, 100:612].reshape(128, 2, 256, 2, 3).mean((1, 3))
    assert np.abs(region.astype(float) - expected).max() <= 1


def test_caller_mpp_wins_and_is_validated(tmp_path):
    path = write_ome_tiff(tmp_path / "a.ome.tif", pattern_image(300, 400), mpp=0.5)
    slide = open_slide(path, mpp=0.25)
    assert (slide.mpp, slide.mpp_source) == (0.25, "caller")
    assert slide.with_mpp(0.7, "spot-grid").mpp_source == "spot-grid"
    assert slide.with_mpp(0.7).mpp == 0.7 and slide.mpp == 0.25  # a copy
    with pytest.raises(RapaclInputError, match="source"):
        slide.with_mpp(0.7, "unknown")
    bare = Slide(slide.levels, slide.downsamples, mpp=None, mpp_source="metadata")
    assert bare.mpp_source == "unknown" and bare.path is None
    for bad in (0, -1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(RapaclInputError, match="mpp"):
            open_slide(path, mpp=bad)
        with pytest.raises(RapaclInputError):
            slide.with_mpp(bad)


def test_read_region_fills_outside_and_thumbnail(tmp_path):
    image = pattern_image(600, 800)
    slide = open_slide(write_ome_tiff(tmp_path / "b.ome.tif", image, tile=128))
    region = slide.read_region(-10, -20, 30, 40, fill=7)
    assert region.shape == (60, 40, 3)
    assert (region[:20] == 7).all() and (region[:, :10] == 7).all()
    np.testing.assert_array_equal(region[20:, 10:], image[:40, :30])
    assert (slide.read_region(900, 700, 950, 720) == 255).all()

    thumb, scale = slide.thumbnail(200)
    assert thumb.shape == (150, 200, 3) and thumb.dtype == np.uint8
    assert scale == pytest.approx(0.25)
    assert slide.best_level(1 / scale) == 2
    assert slide.best_level(0.5) == 0 and slide.best_level(100) == len(slide.levels) - 1
    small, scale1 = slide.thumbnail(5000)
    assert scale1 == 1.0
    np.testing.assert_array_equal(small, image)


def test_large_lazy_slide_reads_few_tiles(tmp_path, monkeypatch):
    size = 16384
    image = lazy_pattern(size)
    path = write_ome_tiff(tmp_path / "large.ome.tif", image, mpp=0.25, tile=512)
    slide = open_slide(path)
    assert slide.shape == (size, size)
    assert len(slide.levels) == 6 and slide.downsamples[-1] == 32.0
    assert max(slide.levels[-1].shape) == 512
    _square_chunks(slide, 1024)

    reads = []
    original = tifffile.FileCache.read

    def counting_read(self, *args, **kwargs):
        reads.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.FileCache, "read", counting_read)
    region = slide.read_region(5000, 7000, 5512, 7512)
    np.testing.assert_array_equal(region, image[7000:7512, 5000:5512].compute())
    # the region touches 2 x 2 chunks of 1024 px, i.e. at most 16 of the 1024 level-0 tiles
    assert 0 < len(reads) <= 16

    reads.clear()
    thumb, scale = slide.thumbnail(1000)
    assert thumb.shape == (1000, 1000, 3)
    assert len(reads) <= 16  # 1024 px level: 4 tiles of 512 px
    # blue checkerboard of 512 px squares: (0, 0) is dark, (0, 1) is bright
    assert thumb[15, 15, 2] < 20 and thumb[15, 47, 2] > 180


# ---- flat TIFF, SVS, layouts ----------------------------------------------------------------------


def test_flat_tiff_resolution_in_cm(tmp_path):
    image = pattern_image(2500, 1800)
    path = tmp_path / "flat.tif"
    res = (1e4 / 0.8, 1e4 / 0.8)
    tifffile.imwrite(path, image, photometric="rgb", resolution=res, resolutionunit="CENTIMETER")
    slide = open_slide(path, chunk=512)
    assert slide.mpp == pytest.approx(0.8) and slide.mpp_source == "metadata"
    # lazy pyramid by 2 x 2 averaging until the longest side < 1024
    assert [lv.shape[:2] for lv in slide.levels] == [(2500, 1800), (1250, 900), (625, 450)]
    _square_chunks(slide, 512)
    np.testing.assert_array_equal(slide.read_region(1000, 2000, 1300, 2300), image[2000:2300, 1000:1300])
    level1 = slide.levels[1].compute().astype(float)
    assert np.abs(level1 - image.reshape(1250, 2, 900, 2, 3).mean((1, 3))).max() <= 0.5


def test_flat_tiff_resolution_inch_and_none(tmp_path):
    image = pattern_image(200, 300)
    rgb = {"photometric": "rgb", "resolutionunit": "INCH"}
    tifffile.imwrite(tmp_path / "inch.tif", image, resolution=(50800, 50800), **rgb)
    assert open_slide(tmp_path / "inch.tif").mpp == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "dpi72.tif", image, resolution=(72, 72), **rgb)
    tifffile.imwrite(tmp_path / "none.tif", image, photometric="rgb")
    for name in ("dpi72.tif", "none.tif"):
        slide = open_slide(tmp_path / name)
        assert slide.mpp is None and slide.mpp_source == "unknown"


def test_grey_planar_uint16_tiffs_become_rgb(tmp_path):
    image = pattern_image(300, 400)
    grey = image[..., 0]
    tifffile.imwrite(tmp_path / "grey.tif", grey, photometric="minisblack")
    slide = open_slide(tmp_path / "grey.tif")
    np.testing.assert_array_equal(slide.levels[0].compute(), np.repeat(grey[..., None], 3, axis=2))

    planar = np.moveaxis(image, 2, 0)
    options = {"photometric": "rgb", "planarconfig": "separate", "tile": (128, 128)}
    tifffile.imwrite(tmp_path / "planar.tif", planar, **options)
    slide = open_slide(tmp_path / "planar.tif")
    np.testing.assert_array_equal(slide.levels[0].compute(), image)

    tifffile.imwrite(tmp_path / "u16.tif", image.astype(np.uint16) * 257, photometric="rgb")
    slide = open_slide(tmp_path / "u16.tif")
    np.testing.assert_array_equal(slide.levels[0].compute(), image)

    rgba = np.concatenate([image, np.full((300, 400, 1), 128, np.uint8)], axis=2)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(open_slide(tmp_path / "rgba.tif").levels[0].compute(), image)


def test_unsupported_tiff_layout(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 64, 64), np.uint8), photometric="minisblack")
    with pytest.raises(UnsupportedFormatError, match=r"stack\.tif.*layout"):
        open_slide(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((64, 64, 3), np.float32), photometric="rgb")
    with pytest.raises(UnsupportedFormatError, match=r"float\.tif.*float32"):
        open_slide(tmp_path / "float.tif")


def test_svs_like_mpp(tmp_path):
    image = pattern_image(2048, 2048)
    desc = ("Aperio Image Library v12.0.5\r\n2048x2048 [0,0 2048x2048] (256x256) RAW|AppMag = 20"
            "|MPP = 0.2520|Filename = test")  # fmt: skip
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", description=desc, metadata=None)
        tw.write(image[::8, ::8], photometric="rgb", description="Aperio thumbnail", metadata=None)
        tw.write(image[::4, ::4], tile=(256, 256), photometric="rgb", description="Aperio", metadata=None)
    slide = open_slide(path, chunk=512)
    assert slide.mpp == pytest.approx(0.252) and slide.mpp_source == "metadata"
    assert slide.downsamples == (1.0, 4.0)  # the native pyramid (thumbnail page excluded)
    np.testing.assert_array_equal(slide.levels[1].compute(), image[::4, ::4])
    np.testing.assert_array_equal(slide.read_region(0, 0, 300, 200), image[:200, :300])


# ---- JPEG / PNG ---------------------------------------------------------------------------------


def test_her2st_jpeg_lazy(data_dir):
    path = data_dir / HER2ST_JPG
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            width, height = im.size
    assert (height, width) == (9911, 9274)  # "about 9270 x 9920"
    slide = open_slide(path)
    assert slide.shape == (height, width)
    assert slide.mpp is None and slide.mpp_source == "unknown"
    assert slide.downsamples[:4] == pytest.approx([1, 2, 4, 8], rel=2e-3)  # DCT-scaled levels
    _square_chunks(slide, 1024)
    level0 = slide._sources[0]

    thumb, scale = slide.thumbnail(1200)
    assert max(thumb.shape[:2]) == 1200
    assert scale == pytest.approx(1200 / 9911)
    assert not level0.loaded, "thumbnail decoded level 0"
    with pytest.raises(MissingPixelSizeError, match=path.name):
        slide.require_mpp("patch extraction at 0.5 um/px")

    region = slide.read_region(4000, 5000, 5024, 6024)
    assert level0.loaded
    assert limit == Image.MAX_IMAGE_PIXELS  # our reads lift Pillow's limit only while opening
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            crop = np.asarray(im.convert("RGB").crop((4000, 5000, 5024, 6024)))
    np.testing.assert_array_equal(region, crop)
    # the thumbnail (from the DCT-scaled 1/8 level) shows the same place as level 0
    x0, y0 = round(4000 * scale), round(5000 * scale)
    n = round(1024 * scale)
    reduced = np.asarray(Image.fromarray(crop).resize((n, n), Image.Resampling.BOX)).astype(float)
    diff = np.abs(thumb[y0 : y0 + n, x0 : x0 + n].astype(float) - reduced).mean()
    shifted = np.abs(thumb[y0 + 20 : y0 + 20 + n, x0 + 20 : x0 + 20 + n].astype(float) - reduced).mean()
    assert diff < 15 and diff < 0.7 * shifted, (diff, shifted)


def test_visium_png(data_dir):
    path = data_dir / VISIUM_PNG
    slide = open_slide(path)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert slide.shape == expected.shape[:2]
    assert slide.mpp is None
    np.testing.assert_array_equal(slide.read_region(0, 0, 256, 256), expected[:256, :256])


def test_rgba_png_and_small_jpeg(tmp_path):
    image = pattern_image(300, 500)
    rgba = np.concatenate([image, np.full((300, 500, 1), 10, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    slide = open_slide(tmp_path / "rgba.png")
    assert slide.levels[0].shape == (300, 500, 3)
    np.testing.assert_array_equal(slide.levels[0].compute(), image)  # alpha dropped

    # a PNG named .jpg is read by its content
    (tmp_path / "png.jpg").write_bytes((tmp_path / "rgba.png").read_bytes())
    np.testing.assert_array_equal(open_slide(tmp_path / "png.jpg").levels[0].compute(), image)

    Image.fromarray(image[..., 0], "L").save(tmp_path / "grey.jpg", quality=95)
    slide = open_slide(tmp_path / "grey.jpg")
    grey = slide.levels[0].compute()
    assert grey.shape == (300, 500, 3) and (grey[..., 0] == grey[..., 2]).all()


# ---- errors -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ome.tif"):
        open_slide(tmp_path / "nope.ome.tif")


def test_truncated_jpeg(tmp_path, data_dir):
    data = (data_dir / HER2ST_JPG).read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="half.jpg"):
        open_slide(path)


def test_corrupt_tiffs(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "random.tif"
    path.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptFileError, match="random.tif"):
        open_slide(path)

    full = write_ome_tiff(tmp_path / "full.ome.tif", pattern_image(600, 600), tile=128)
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="cut.ome.tif"):
        open_slide(cut)

    # valid header, garbage image data
    garbage = tmp_path / "garbage.tif"
    tifffile.imwrite(garbage, pattern_image(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(garbage) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    raw = bytearray(garbage.read_bytes())
    raw[offset : offset + count] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    garbage.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="garbage.tif"):
        open_slide(garbage)


def test_unsupported_extension(tmp_path):
    for name in ("image.bmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"\0" * 100)
        with pytest.raises(UnsupportedFormatError, match=r"\.ome\.tiff.*\.jpg"):
            open_slide(tmp_path / name)
    (tmp_path / "folder.zarr").mkdir()
    with pytest.raises(UnsupportedFormatError, match="directory"):
        open_slide(tmp_path / "folder.zarr")


def test_jpeg_require_mpp(tmp_path):
    Image.fromarray(pattern_image(100, 120)).save(tmp_path / "tile.jpg")
    slide = open_slide(tmp_path / "tile.jpg")
    with pytest.raises(MissingPixelSizeError, match=r"tile\.jpg.*spot radius"):
        slide.require_mpp("spot radius")
    assert slide.with_mpp(0.5).require_mpp("spot radius") == 0.5
    assert open_slide(tmp_path / "tile.jpg", mpp=0.3).require_mpp("x") == 0.3


def test_write_ome_tiff_validation(tmp_path):
    with pytest.raises(RapaclInputError, match="shape"):
        write_ome_tiff(tmp_path / "x.ome.tif", np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(RapaclInputError, match="dtype"):
        write_ome_tiff(tmp_path / "x.ome.tif", np.zeros((10, 10, 3), np.float32))
    with pytest.raises(RapaclInputError, match="mpp"):
        write_ome_tiff(tmp_path / "x.ome.tif", np.zeros((10, 10, 3), np.uint8), mpp=-1)
    assert list(tmp_path.iterdir()) == []
    path = write_ome_tiff(tmp_path / "two.ome.tif", pattern_image(1000, 1000), n_levels=2, tile=128)
    assert len(open_slide(path).levels) == 2
    assert math.isclose(open_slide(path).downsamples[1], 2.0)


# ---- #14 item 2: damaged data detected at open; flat TIFF thumbnails with bounded memory ---------------


def _jpeg(tmp_path, name="ok.jpg", shape=(1200, 1600)) -> Path:
    rng = np.random.default_rng(1)
    img = pattern_image(*shape)
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path / name
    Image.fromarray(img).save(path, quality=90)
    return path


def test_truncated_and_filler_padded_jpegs_are_refused(tmp_path):
    good = _jpeg(tmp_path)
    data = good.read_bytes()
    assert open_slide(good).shape == (1200, 1600)
    trailer = tmp_path / "trailer.jpg"  # zeros after the end marker are harmless
    trailer.write_bytes(data + bytes(100_000))
    assert open_slide(trailer).shape == (1200, 1600)

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(CorruptFileError, match=r"cut\.jpg.*truncated"):
        open_slide(cut)

    # cut short, then padded back to its size with zeros (a failed copy or download): libjpeg decodes it
    # without an error, the missing part as made-up pixels
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data[: len(data) * 6 // 10] + bytes(len(data) - len(data) * 6 // 10))
    with Image.open(padded) as im, Image.open(good) as ref:
        im.load()  # no error from the decoder: the damage would be silent
        wrong = np.abs(np.asarray(im)[-100:].astype(int) - np.asarray(ref)[-100:].astype(int)).mean()
    assert wrong > 20
    with pytest.raises(CorruptFileError, match=r"padded\.jpg.*filler-padded.*zeros"):
        open_slide(padded)

    # zeros in the middle, the end marker intact
    holed = tmp_path / "holed.jpg"
    start = len(data) // 3
    holed.write_bytes(data[:start] + bytes(70_000) + data[start + 70_000 :])
    with pytest.raises(CorruptFileError, match=r"holed\.jpg.*zero bytes"):
        open_slide(holed)

    # a header that claims far more pixels than the file holds (a small bomb under the pixel budget)
    small = _jpeg(tmp_path, "small.jpg", (64, 64)).read_bytes()
    sof = small.index(b"\xff\xc0")
    forged = bytearray(small)
    forged[sof + 5 : sof + 9] = (15000).to_bytes(2, "big") + (20000).to_bytes(2, "big")
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(forged))
    with pytest.raises(CorruptFileError, match=r"bomb\.jpg.*claims 20000 x 15000 px"):
        open_slide(bomb)


def test_filler_padded_compressed_tiff_is_refused(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, pattern_image(512, 512), photometric="rgb", compression="zlib", rowsperstrip=16)
    data = good.read_bytes()
    with tifffile.TiffFile(good) as tif:
        first_end = int(tif.pages[0].dataoffsets[1])
    # cut in the image data and padded back to the same size: every offset still lies in the file
    padded = tmp_path / "padded.tif"
    keep = max(first_end + 1, len(data) * 7 // 10)
    padded.write_bytes(data[:keep] + bytes(len(data) - keep))
    with pytest.raises(CorruptFileError, match=r"padded\.tif.*end of the file"):
        open_slide(padded)
    assert open_slide(good).shape == (512, 512)


def test_flat_tiff_thumbnail_reads_strips_once_with_bounded_memory(tmp_path, monkeypatch):
    """A flat (no overview) TIFF's export thumbnail streams the strips, averaging while reading: the peak
    stays at a few bands, far below a 1024-row band of level 0 (what the lazy pyramid needs) or level 0."""
    import tracemalloc

    from napari_rapacl.io import slide as slide_mod

    height, width = 1200, 16000  # 57.6 MB of RGB; one 1024-row band is 49 MB
    path = tmp_path / "flat.tif"
    img = np.empty((height, width, 3), np.uint8)
    xx = np.arange(width)[None, :]
    for y0 in range(0, height, 200):
        yy = np.arange(y0, y0 + 200)[:, None]
        img[y0 : y0 + 200] = np.stack(
            [np.broadcast_to((xx // 7) % 256, (200, width)), np.broadcast_to((yy * 3) % 256, (200, width)),
             (xx + yy) % 256], -1)  # fmt: skip
    tifffile.imwrite(path, img, photometric="rgb", compression="zlib", rowsperstrip=8)
    expected_sums = img.reshape(30, 40, 400, 40, 3).astype(np.float64).mean(axis=(1, 3))
    del img
    slide = open_slide(path)
    assert len(slide.levels) > 1  # the lazy pyramid, no overview in the file

    monkeypatch.setattr(slide_mod, "_THUMB_BAND_BYTES", 2 * 2**20)
    tracemalloc.start()
    try:
        thumb, scale = slide.thumbnail(400)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert thumb.shape == (30, 400, 3) and thumb.dtype == np.uint8 and scale == pytest.approx(400 / width)
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB"
    # the exact 40 x 40 box average of level 0
    assert np.abs(thumb.astype(float) - expected_sums).max() <= 0.5 + 1e-6
