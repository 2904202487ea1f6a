"""Tiled inference: equal to predict_spots, only the needed tiles, cache, cancel, schedulers, dense maps."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
da = pytest.importorskip("dask.array")

from napari_rapacl._errors import RapaclInputError  # noqa: E402
from napari_rapacl.inference import predict_spots  # noqa: E402
from napari_rapacl.io.slide import Slide  # noqa: E402
from napari_rapacl.progress import Progress  # noqa: E402
from napari_rapacl.tiled import (  # noqa: E402
    TileCache,
    dense_geometry,
    iter_predict_dense,
    iter_predict_region,
    model_key,
    predict_dense,
    predict_region,
    slide_key,
    spot_tiles,
)

MPP = 1.0
TILE = 256


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour texture plus noise: patches differ from spot to spot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            128 + 80 * np.sin(xx / 37.0) * np.cos(yy / 23.0),
            128 + 80 * np.sin((xx + yy) / 51.0),
            128 + 80 * np.cos(xx / 19.0 - yy / 29.0),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide() -> Slide:
    img = _texture(768, 1024)
    level1 = img.reshape(384, 2, 512, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return Slide(
        (da.from_array(img, chunks=(256, 256, 3)), da.from_array(level1, chunks=(256, 256, 3))),
        (1.0, 2.0),
        mpp=MPP,
    )


@pytest.fixture(scope="module")
def spots():
    yy, xx = np.mgrid[20:768:80, 20:1024:80]
    return xx.ravel().astype(np.float64), yy.ravel().astype(np.float64)


@pytest.fixture(scope="module")
def stnet():
    from napari_rapacl.models import create_model

    torch.manual_seed(0)
    return create_model("stnet_tiny", n_genes=5).eval()


@pytest.fixture(scope="module")
def reference(stnet, slide, spots):
    return predict_spots(stnet, slide, *spots, device="cpu")


def _drain(gen):
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            return stop.value, progress


def _tile_sizes(x, y, box=None):
    from napari_rapacl.tiled import spot_tiles

    return [len(members) for _, members in spot_tiles(np.asarray(x), np.asarray(y), box, TILE)[1]]


def test_equal_to_predict_spots_with_progress_per_tile(stnet, slide, spots, reference):
    result, progress = _drain(
        iter_predict_region(stnet, slide, *spots, tile_px=TILE, cache=TileCache(), device="cpu")
    )
    n_tiles = 3 * 4  # 768 x 1024 px in 256 px cells, every cell holds spots
    assert result.tiles_computed == n_tiles and result.tiles_cached == 0
    # progress counts spots: after every tile (each fits one batch of 64 here), 130 spots in all
    sizes = _tile_sizes(*spots)
    assert len(sizes) == n_tiles and sum(sizes) == len(spots[0]) == 130
    done = [0, *np.cumsum(sizes).tolist()]
    assert progress == [Progress("predict", d, 130) for d in done]
    np.testing.assert_array_equal(result.index, np.arange(len(spots[0])))
    assert result.values.dtype == np.float32 and result.values.shape == reference.shape
    np.testing.assert_allclose(result.values, reference, atol=1e-5, rtol=0)


def test_only_tiles_touching_the_box_are_computed(stnet, slide, spots, reference, monkeypatch):
    import napari_rapacl.tiled as tiled

    seen = []
    real = tiled._predict_tile

    def spy(model, sl, x, y, *args):
        seen.append((x.copy(), y.copy()))
        return real(model, sl, x, y, *args)

    monkeypatch.setattr(tiled, "_predict_tile", spy)
    x, y = spots
    box = (300, 260, 600, 500)  # inside tiles (ty, tx) in {1} x {1, 2}
    cache = TileCache()
    result = predict_region(stnet, slide, x, y, box=box, tile_px=TILE, cache=cache, device="cpu")
    inside = np.flatnonzero((x >= 300) & (x < 600) & (y >= 260) & (y < 500))
    np.testing.assert_array_equal(result.index, inside)
    np.testing.assert_allclose(result.values, reference[inside], atol=1e-5, rtol=0)
    assert result.tiles_computed == 2 == len(seen) == len(cache)
    tiles = {(int(ty[0] // TILE), int(tx[0] // TILE)) for tx, ty in seen}
    assert tiles == {(1, 1), (1, 2)}
    for tx, ty in seen:  # a tile is predicted whole: all of its spots, inside the box or not
        ty0, tx0 = int(ty[0] // TILE), int(tx[0] // TILE)
        whole = (x // TILE == tx0) & (y // TILE == ty0)
        assert len(tx) == whole.sum() > 0


def test_second_call_is_served_from_the_cache(stnet, slide, spots, reference, monkeypatch):
    import napari_rapacl.tiled as tiled

    cache = TileCache()
    box = (0, 0, 600, 400)
    first = predict_region(stnet, slide, *spots, box=box, tile_px=TILE, cache=cache, device="cpu")
    assert first.tiles_computed == 6 and cache.misses == 6 and cache.hits == 0

    def boom(*args, **kwargs):
        raise AssertionError("a cached tile was predicted again")

    monkeypatch.setattr(tiled, "_predict_tile", boom)
    again = predict_region(stnet, slide, *spots, box=box, tile_px=TILE, cache=cache, device="cpu")
    assert again.tiles_computed == 0 and again.tiles_cached == 6 and cache.hits == 6
    np.testing.assert_array_equal(again.values, first.values)
    # a smaller box inside the same tiles: also cached
    inner = predict_region(stnet, slide, *spots, box=(10, 10, 200, 200), tile_px=TILE, cache=cache)
    assert inner.tiles_computed == 0 and inner.tiles_cached == 1
    np.testing.assert_allclose(inner.values, reference[inner.index], atol=1e-5, rtol=0)
    # different spots in a tile, another model or another slide: not served from the cache
    x, y = spots
    with pytest.raises(AssertionError, match="predicted again"):
        predict_region(stnet, slide, x + 1.0, y, box=box, tile_px=TILE, cache=cache)


def test_closing_mid_way_keeps_whole_tiles_and_a_rerun_completes(stnet, slide, spots, reference):
    cache = TileCache()
    gen = iter_predict_region(stnet, slide, *spots, tile_px=TILE, cache=cache, device="cpu")
    sizes = _tile_sizes(*spots)
    assert next(gen) == Progress("predict", 0, 130)
    assert next(gen) == Progress("predict", sizes[0], 130)
    assert next(gen) == Progress("predict", sizes[0] + sizes[1], 130)
    gen.close()  # what a GUI's worker.quit() does between tiles
    assert len(cache) == 2
    with pytest.raises(StopIteration):
        next(gen)
    result = predict_region(stnet, slide, *spots, tile_px=TILE, cache=cache, device="cpu")
    assert (result.tiles_cached, result.tiles_computed) == (2, 10)
    np.testing.assert_allclose(result.values, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler", [None, "threads"])
def test_view_first_hands_out_the_box_before_completing_the_tiles(
    stnet, slide, spots, reference, monkeypatch, scheduler
):
    import napari_rapacl.tiled as tiled

    x, y = spots
    predicted = []
    real = tiled._predict_tile

    def spy(model, sl, xx, yy, *args):
        predicted.append(len(xx))
        return real(model, sl, xx, yy, *args)

    monkeypatch.setattr(tiled, "_predict_tile", spy)
    box = (300, 260, 600, 500)  # 12 spots: 9 of tile (1, 1) (16 spots), 3 of tile (1, 2) (12)
    inside = np.flatnonzero((x >= 300) & (x < 600) & (y >= 260) & (y < 500))
    cache = TileCache()
    gen = iter_predict_region(
        stnet,
        slide,
        x,
        y,
        box=box,
        tile_px=TILE,
        cache=cache,
        device="cpu",
        batch_size=3,
        view_first=True,
        scheduler=scheduler,
    )
    result, progress = _drain(gen)
    stages = [(p.stage, p.done, p.total) for p in progress]
    # the view's 12 spots in 4 batches first, then the two tiles (their 16 other spots)
    assert len(inside) == 12
    # progress in spots: the two tiles hold 16 + 12 (their 16 other spots are one batch of 3 or more)
    assert stages[:6] == [("predict", 0, 28)] + [("predict view", i, 4) for i in range(5)]
    rest = [s for s in stages[6:] if s[0] == "predict"]
    assert len(rest) == len(stages) - 6 and rest[-1] == ("predict", 28, 28)
    assert [d for _, d, _ in rest] == sorted({d for _, d, _ in rest})  # rising, per batch and per tile
    if scheduler is None:  # tile (1, 1): 2 batches of its 7 others, then whole (16); tile (1, 2) the same
        assert [d for _, d, _ in rest] == [3, 6, 16, 19, 22, 28]
    partial = [p.result for p in progress if p.result is not None]
    assert len(partial) == 1 and progress[5].result is partial[0]
    np.testing.assert_array_equal(partial[0].index, inside)
    np.testing.assert_array_equal(partial[0].values, result.values)
    np.testing.assert_allclose(result.values, reference[inside], atol=1e-5, rtol=0)
    # every spot of the two tiles predicted once: 4 x 3 in the view, 7 + 9 outside it
    assert sorted(predicted) == [3, 3, 3, 3, 7, 9] and sum(predicted) == 28
    assert result.tiles_computed == 2 == len(cache)
    # the cache holds whole tiles, equal to those of a plain run
    plain_cache = TileCache()
    predict_region(stnet, slide, x, y, box=box, tile_px=TILE, cache=plain_cache, device="cpu")
    for key in list(plain_cache._data):
        np.testing.assert_allclose(cache.get(key), plain_cache.get(key), atol=1e-5, rtol=0)
    # a rerun is served from the cache: no view stage
    again, progress = _drain(
        iter_predict_region(stnet, slide, x, y, box=box, tile_px=TILE, cache=cache, view_first=True)
    )
    assert {p.stage for p in progress} == {"predict"} and again.tiles_computed == 0
    np.testing.assert_array_equal(again.values, result.values)


def _one_tile_of_many_spots():
    """112 spots in one 256 px tile (a dense grid of small bins, like Visium HD's 8 µm)."""
    yy, xx = np.mgrid[8:256:24, 8:256:24][:, :, :10]
    x, y = xx.ravel()[:112].astype(np.float64), yy.ravel()[:112].astype(np.float64)
    assert len(_tile_sizes(x, y)) == 1
    return x, y


@pytest.mark.parametrize("scheduler", [None, "threads"])
def test_a_tile_of_many_spots_reports_every_batch_before_it_completes(stnet, slide, scheduler):
    """#14 item 10: progress within a tile (before, a tile reported only when complete: 2 reports)."""
    x, y = _one_tile_of_many_spots()
    cache = TileCache()
    progress, cached_while_running = [], []
    gen = iter_predict_region(
        stnet, slide, x, y, tile_px=TILE, cache=cache, device="cpu", batch_size=8, scheduler=scheduler
    )
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
        cached_while_running.append(len(cache))
    n = len(x)
    assert [p.stage for p in progress] == ["predict"] * len(progress)
    assert [p.done for p in progress] == list(range(0, n, 8)) + [n]  # 0, then every batch of 8 spots
    assert {p.total for p in progress} == {n}
    assert cached_while_running[:-1] == [0] * (len(progress) - 1) and len(cache) == 1  # the tile, once
    np.testing.assert_allclose(result.values, predict_spots(stnet, slide, x, y, device="cpu"), atol=1e-5)


@pytest.mark.parametrize("scheduler", [None, "threads"])
def test_a_cancel_within_a_tile_stops_it_after_the_batch_and_caches_nothing(
    stnet, slide, scheduler, monkeypatch
):
    import napari_rapacl.inference as inference

    x, y = _one_tile_of_many_spots()
    batches = []
    real = inference.images_to_tensor

    def counting(patches, device="cpu"):
        batches.append(len(patches))
        return real(patches, device)

    monkeypatch.setattr(inference, "images_to_tensor", counting)
    cache = TileCache()
    gen = iter_predict_region(
        stnet, slide, x, y, tile_px=TILE, cache=cache, device="cpu", batch_size=8, scheduler=scheduler
    )
    seen = [next(gen), next(gen), next(gen)]
    assert [p.done for p in seen] == [0, 8, 16]
    time.sleep(0.5)  # a viewer's cancel stops asking (the tile's 14 batches take ~0.1 s): nothing runs ahead
    assert len(batches) <= 3, f"{len(batches)} batches ran while the job was not asked for more"
    gen.close()  # ... and closes the generator later, in the middle of the tile
    assert len(cache) == 0  # the tile was not completed: nothing cached
    assert len(batches) <= 4, f"{len(batches)} batches ran: the tile went on after the close"
    assert not [t for t in threading.enumerate() if t.name.startswith("napari-rapacl-tile")]
    # a rerun predicts the whole tile
    result = predict_region(stnet, slide, x, y, tile_px=TILE, cache=cache, device="cpu")
    assert result.tiles_computed == 1 and len(cache) == 1


def test_view_first_cancelled_after_the_view_caches_no_partial_tile(stnet, slide, spots, reference):
    x, y = spots
    cache = TileCache()
    box = (300, 260, 600, 500)
    gen = iter_predict_region(
        stnet, slide, x, y, box=box, tile_px=TILE, cache=cache, device="cpu", view_first=True
    )
    partial = None
    while partial is None:
        partial = next(gen).result
    gen.close()
    assert len(cache) == 0  # the tiles' other spots were not predicted: nothing cached
    inside = np.flatnonzero((x >= 300) & (x < 600) & (y >= 260) & (y < 500))
    np.testing.assert_allclose(partial.values, reference[inside], atol=1e-5, rtol=0)
    # a box that covers whole tiles has nothing to predict "first": plain tile order
    whole = (0, 0, 512, 256)
    _, progress = _drain(
        iter_predict_region(stnet, slide, x, y, box=whole, tile_px=TILE, cache=False, view_first=True)
    )
    assert [p.stage for p in progress] == ["predict"] * 3


def test_local_schedulers_give_the_same_result(stnet, slide, spots, reference):
    for scheduler in ("synchronous", "threads"):
        result, progress = _drain(
            iter_predict_region(
                stnet, slide, *spots, tile_px=TILE, cache=TileCache(), device="cpu", scheduler=scheduler
            )
        )
        assert progress[-1] == Progress("predict", 130, 130) and len(progress) == 13
        np.testing.assert_allclose(result.values, reference, atol=1e-5, rtol=0)


def test_dask_distributed_local_cluster_equals_in_thread(stnet, slide, spots, reference):
    distributed = pytest.importorskip("distributed")
    cache = TileCache()
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        result, progress = _drain(
            iter_predict_region(
                stnet, slide, *spots, tile_px=TILE, cache=cache, device="cpu", scheduler=client
            )
        )
        # the address form connects its own client
        addr = predict_region(
            stnet,
            slide,
            *spots,
            box=(0, 0, 200, 200),
            tile_px=TILE,
            cache=False,
            scheduler=cluster.scheduler_address,
        )
        # so does a cluster object
        box = (300, 300, 500, 500)
        by_cluster = predict_region(
            stnet, slide, *spots, box=box, tile_px=TILE, cache=False, scheduler=cluster
        )
    np.testing.assert_allclose(by_cluster.values, reference[by_cluster.index], atol=1e-5, rtol=0)
    assert len(by_cluster.index) > 0
    assert len(progress) == 13 and result.tiles_computed == 12 and len(cache) == 12
    np.testing.assert_allclose(result.values, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(addr.values, reference[addr.index], atol=1e-5, rtol=0)
    # the cache the cluster filled serves the in-thread path
    again = predict_region(stnet, slide, *spots, tile_px=TILE, cache=cache)
    assert again.tiles_computed == 0


def _slow_square(x: int) -> int:
    import time

    time.sleep(0.002 * (x % 3))
    return x * x


@pytest.mark.parametrize("scheduler", [None, "threads", "dask"])
def test_run_tasks_pulls_tasks_lazily_and_bounds_the_work_in_flight(scheduler):
    """run_tasks takes a generator of tasks and never holds more than ``in_flight`` of them submitted and
    not yet handed out (a caller builds each task's data only when it is about to run); ``ordered``
    hands results out in task order; every task runs once on one pool."""
    from napari_rapacl.tiled import run_tasks

    client = None
    if scheduler == "dask":
        distributed = pytest.importorskip("distributed")
        client = distributed.Client(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        )
    try:
        for ordered in (False, True):
            pulled = []

            def tasks(pulled=pulled):
                for i in range(40):
                    pulled.append(i)
                    yield i, (i,)

            handed = []
            for tag, result in run_tasks(
                _slow_square, tasks(), client or scheduler, in_flight=3, ordered=ordered
            ):
                assert result == tag * tag
                handed.append(tag)
                # at most 3 submitted and not handed out, +1 being pulled for refill after this one
                assert len(pulled) - len(handed) <= 3
            assert sorted(handed) == list(range(40))
            if ordered or scheduler is None:
                assert handed == list(range(40))
        with pytest.raises(RapaclInputError, match="in_flight"):
            list(run_tasks(_slow_square, [(0, (0,))], "threads", in_flight=0))
    finally:
        if client is not None:
            client.close()


def test_process_pool_equals_in_thread(stnet, slide, spots, reference):
    box = (0, 0, 250, 250)  # one tile: one spawned worker
    result = predict_region(stnet, slide, *spots, box=box, tile_px=TILE, cache=False, scheduler="processes")
    assert result.tiles_computed == 1
    np.testing.assert_allclose(result.values, reference[result.index], atol=1e-5, rtol=0)


def test_radius_models_and_empty_boxes(slide, spots):
    from napari_rapacl.models import create_model

    torch.manual_seed(1)
    pix = create_model("pixnet_tiny", n_genes=3).eval()
    x, y = spots
    sel = np.flatnonzero((x < 400) & (y < 300))
    radius = np.full(len(x), 20.0)
    radius[::2] = 30.0
    result = predict_region(pix, slide, x, y, radius=radius, box=(0, 0, 400, 300), tile_px=TILE, cache=False)
    expected = predict_spots(pix, slide, x[sel], y[sel], radius=radius[sel], device="cpu")
    np.testing.assert_array_equal(result.index, sel)
    np.testing.assert_allclose(result.values, expected, atol=1e-5, rtol=0)
    with pytest.raises(RapaclInputError, match="radius"):
        predict_region(pix, slide, x, y, cache=False)
    # a box on the slide with no spot: an empty result, no tile
    empty = predict_region(pix, slide, x, y, radius=20.0, box=(0, 0, 10, 10), cache=False)
    assert empty.index.shape == (0,) and empty.values.shape == (0, 3) and empty.tiles_computed == 0


def test_bad_input_names_the_value(stnet, slide, spots):
    x, y = spots
    with pytest.raises(RapaclInputError, match=r"box=\(2000, 0, 3000, 100\).*1024 px wide and 768 px high"):
        predict_region(stnet, slide, x, y, box=(2000, 0, 3000, 100), cache=False)
    with pytest.raises(RapaclInputError, match="empty"):
        predict_region(stnet, slide, x, y, box=(10, 10, 5, 20), cache=False)
    with pytest.raises(RapaclInputError, match="tile_px=8"):
        predict_region(stnet, slide, x, y, tile_px=8, cache=False)
    with pytest.raises(RapaclInputError, match="scheduler='thread'"):
        predict_region(stnet, slide, x, y, scheduler="thread", cache=False)
    with pytest.raises(RapaclInputError, match="equal length"):
        predict_region(stnet, slide, x, y[:-1], cache=False)
    with pytest.raises(RapaclInputError, match="cache="):
        predict_region(stnet, slide, x, y, cache={}, box=(0, 0, 10, 10))
    with pytest.raises(RapaclInputError, match="has no predict_map"):
        predict_dense(stnet, slide, (0, 0, 100, 100))


def test_tile_cache_is_an_lru_bounded_by_bytes():
    cache = TileCache(max_bytes=3 * 800)
    arrays = {i: np.full((10, 20), i, dtype=np.float32) for i in range(4)}  # 800 bytes each
    for i in range(3):
        cache.put(("m", "s", "k", i), arrays[i])
    assert cache.get(("m", "s", "k", 0)) is not None  # 0 is now the most recently used
    cache.put(("m", "s", "k", 3), arrays[3])  # evicts 1, the least recently used
    assert ("m", "s", "k", 1) not in cache and ("m", "s", "k", 0) in cache
    assert len(cache) == 3 and cache.nbytes == 2400
    assert cache.get(("m", "s", "k", 1)) is None and (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(ValueError):
        cache.get(("m", "s", "k", 0))[0, 0] = 5  # read-only
    cache.put("big", np.zeros(10_000))  # larger than the cache: not stored, nothing evicted
    assert "big" not in cache and len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.hits == 0

    # concurrent use keeps the byte count exact
    def work(k):
        for i in range(200):
            cache.put((k, i % 7), arrays[i % 4])
            cache.get((k, (i + 3) % 7))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes == 800 * len(cache) <= cache.max_bytes


def test_keys_follow_weights_and_pixels(stnet, slide, tmp_path):
    from napari_rapacl.io.slide import open_slide, write_ome_tiff
    from napari_rapacl.models import create_model

    key = model_key(stnet)
    assert model_key(stnet) == key
    torch.manual_seed(0)
    twin = create_model("stnet_tiny", n_genes=5).eval()
    assert model_key(twin) == key  # same weights and config, another object
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)  # in place: the memo must notice
    assert model_key(twin) != key
    assert slide_key(slide) == slide_key(Slide(slide.levels, slide.downsamples, mpp=MPP))
    assert slide_key(slide) != slide_key(slide.with_mpp(0.5))
    path = write_ome_tiff(tmp_path / "s.ome.tif", _texture(300, 400), mpp=0.5, tile=128)
    assert slide_key(open_slide(path)) == slide_key(open_slide(path))


def test_spot_tiles_groups_whole_tiles():
    x = np.array([5.0, 300.0, 10.0, 600.0, 260.0])
    y = np.array([5.0, 5.0, 300.0, 5.0, 10.0])
    index, tiles = spot_tiles(x, y, (0, 0, 280, 100), 256)
    np.testing.assert_array_equal(index, [0, 4])
    assert [(t, list(m)) for t, m in tiles] == [((0, 0), [0]), ((0, 1), [1, 4])]


# --------------------------------------------------------------------------------------------
# dense maps
# --------------------------------------------------------------------------------------------


class _RedMap(torch.nn.Module):
    """A 'model' whose map is the red channel (x 255): the dense map must be the block-averaged slide."""

    def __init__(self, patch_size: int = 16, mpp: float = 4.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(patch_size=patch_size, mpp=mpp, n_genes=2)
        self.w = torch.nn.Parameter(torch.ones(()))

    def predict_map(self, images):
        red = images[:, :1] * 255.0 * self.w
        return torch.cat([red, -red], dim=1)


def test_dense_map_is_the_slide_at_model_resolution(slide):
    model = _RedMap()
    box = (37, 61, 901, 613)
    dense = predict_dense(model, slide, box, tile_px=128, cache=False, genes=[0])
    s = dense.px_size
    assert s == 4.0 and dense.genes == [0] and dense.channels == (0,)
    assert dense.corner_px == (60.0, 36.0)  # the map grid is anchored at the slide origin
    assert dense.translate_px == (60.0 + 1.5, 36.0 + 1.5)  # centre of map pixel (0, 0), napari convention
    h, w = dense.values.shape[1:]
    assert (h, w) == (math_ceil(613 / 4) - 15, math_ceil(901 / 4) - 9)
    # independent expectation: 4 x 4 block means of level 0 (read at level 0, box-resampled)
    red = np.asarray(slide.levels[0][:, :, 0]).astype(np.float64)
    blocks = red[: 768 // 4 * 4, : 1024 // 4 * 4].reshape(192, 4, 256, 4).mean(axis=(1, 3))
    expected = blocks[15 : 15 + h, 9 : 9 + w]
    # patches are read from level 1 (rounded 2 x 2 means) and box-resampled by Pillow (fixed point, +-1)
    diff = np.abs(dense.values[0] - expected)
    assert diff.max() <= 1.5 and diff.mean() < 0.6  # no seam, no shift ...
    shifted = np.abs(dense.values[0][:, 1:] - expected[:, :-1])
    assert shifted.mean() > 5 * diff.mean()  # ... which a one-pixel shift would show
    kwargs = dense.layer_kwargs(MPP)
    assert kwargs == {"scale": (4.0, 4.0), "translate": (61.5, 37.5)}


def test_dense_stitching_equals_a_direct_window_and_ignores_tile_size(slide):
    from napari_rapacl.models import create_model
    from napari_rapacl.preprocess import extract_patches

    torch.manual_seed(2)
    pix = create_model("pixnet_tiny", n_genes=3).eval()
    box = (0, 0, 700, 500)
    cache = TileCache()
    dense, progress = _drain(iter_predict_dense(pix, slide, box, tile_px=TILE, cache=cache, device="cpu"))
    assert progress[0] == Progress("dense", 0, len(progress) - 1) and len(progress) > 2
    geo = dense_geometry(pix, slide, TILE)
    s, m, c, p = geo.s, geo.margin, geo.core, geo.patch
    assert (s, p, m, c) == (4.0, 32, 4, 24)
    assert not np.isnan(dense.values).any()
    # the window whose core starts at map pixel (r, q): predict_map on it directly
    for r, q in [(24, 48), (72, 0), (96, 144)]:
        cx, cy = (q - m + p / 2) * s, (r - m + p / 2) * s
        window = extract_patches(slide, [cx], [cy], size=p, mpp=pix.config.mpp)
        with torch.inference_mode():
            direct = pix.predict_map(torch.from_numpy(window).permute(0, 3, 1, 2).float() / 255.0)[0].numpy()
        np.testing.assert_allclose(
            dense.values[:, r : r + c, q : q + c], direct[:, m : m + c, m : m + c], atol=1e-5, rtol=0
        )
    # other tile sizes, other boxes: the same map pixels
    other = predict_dense(pix, slide, (100, 96, 500, 400), tile_px=64, cache=False, genes=[2, 0])
    assert other.corner_px == (96.0, 100.0) and other.channels == (2, 0)
    h, w = other.values.shape[1:]
    np.testing.assert_allclose(
        other.values, dense.values[[2, 0], 24 : 24 + h, 25 : 25 + w], atol=1e-5, rtol=0
    )
    # a second call is served from the cache
    hits = cache.hits
    again = predict_dense(pix, slide, box, tile_px=TILE, cache=cache)
    assert cache.hits - hits == len(progress) - 1
    np.testing.assert_array_equal(again.values, dense.values)


def test_dense_bad_input(slide):
    model = _RedMap()
    with pytest.raises(RapaclInputError, match="lies outside"):
        predict_dense(model, slide, (-500, -500, -10, -10), cache=False)
    with pytest.raises(RapaclInputError, match="gene index 7"):
        predict_dense(model, slide, (0, 0, 50, 50), genes=[7], cache=False)
    with pytest.raises(RapaclInputError, match="carries no gene list"):
        predict_dense(model, slide, (0, 0, 50, 50), genes=["ERBB2"], cache=False)
    model.genes = ["ERBB2", "GAPDH"]
    named = predict_dense(model, slide, (0, 0, 50, 50), genes=["GAPDH"], cache=False)
    assert named.genes == ["GAPDH"] and named.channels == (1,)
    no_mpp = Slide(slide.levels, slide.downsamples, mpp=None)
    with pytest.raises(RapaclInputError, match="pixel size"):
        predict_dense(model, no_mpp, (0, 0, 50, 50), cache=False)


def test_import_stays_light():
    code = (
        "import sys, napari_rapacl, napari_rapacl.tiled\n"
        "heavy = [m for m in ('torch', 'distributed', 'dask.distributed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def math_ceil(v: float) -> int:
    import math

    return math.ceil(v)


def test_frozen_cpu_predictor_equals_the_eager_model_and_follows_the_weights(slide, spots, monkeypatch):
    from napari_rapacl.inference import frozen_image_predictor
    from napari_rapacl.models import create_model

    torch.manual_seed(1)
    model = create_model("stnet_tiny", n_genes=4).eval()
    x, y = spots
    frozen = frozen_image_predictor(model, "cpu")
    assert isinstance(frozen, torch.jit.ScriptModule)
    assert frozen_image_predictor(model, "cpu") is frozen  # built once
    fast = predict_spots(model, slide, x, y, device="cpu")
    eager = predict_spots(model, slide, x, y, device="cpu", optimize=False)
    np.testing.assert_allclose(fast, eager, atol=1e-5, rtol=0)
    assert np.abs(eager).max() > 1e-3
    # weights changed in place (an optimizer step): rebuilt, and the predictions follow
    with torch.no_grad():
        model.head.bias.add_(1.0)
    again = frozen_image_predictor(model, "cpu")
    assert again is not frozen
    np.testing.assert_allclose(predict_spots(model, slide, x, y, device="cpu"), eager + 1.0, atol=1e-5)
    # not for: training mode, another device, models that do not opt in, or when switched off
    assert frozen_image_predictor(model.train(), "cpu") is None
    model.eval()
    assert frozen_image_predictor(model, "cuda") is None
    assert frozen_image_predictor(create_model("pixnet_tiny").eval(), "cpu") is None
    monkeypatch.setenv("NAPARI_RAPACL_NO_FREEZE", "1")
    assert frozen_image_predictor(model, "cpu") is None
