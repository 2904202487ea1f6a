"""Tests for napari_rapacl.datasets: HER2ST from the local mirror and through the download path."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from napari_rapacl import datasets
from napari_rapacl._errors import CorruptFileError, DownloadError, RapaclInputError
from napari_rapacl.datasets import (
    HER2ST_PUBLISHED_REG2ST,
    HER2ST_SECTIONS,
    data_root,
    her2st,
    her2st_files,
    her2st_genes,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*have no counts:UserWarning")


# --------------------------------------------------------------------------------------------
# local mirror
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_her2st_sections_from_mirror(data_dir: Path, section: str):
    sec = her2st(section)
    assert sec.name == section
    assert 178 <= len(sec.spots) <= 187
    assert sec.spots.counts is not None and sec.spots.counts.n_obs == len(sec.spots)
    height, width = sec.slide.shape
    assert 9000 < height < 10500 and 9000 < width < 10500
    assert np.all((sec.spots.x >= 0) & (sec.spots.x < width) & (sec.spots.y >= 0) & (sec.spots.y < height))
    assert sec.slide.mpp_source == "spot-grid"
    assert sec.slide.mpp == pytest.approx(sec.spots.mpp) and 0.65 < sec.slide.mpp < 0.75
    assert sec.slide.path is not None and sec.slide.path.is_relative_to(data_dir / "her2st")


def test_her2st_genes_from_mirror(data_dir: Path):
    genes = her2st_genes()
    assert len(genes) == 785 == len(set(genes))
    assert genes[0] == "HPS6"
    # the benchmark genes are measured in every section
    counts = her2st("C2").spots.counts
    assert set(genes) <= set(counts.var_names)


def test_explicit_data_dir_and_lookup(data_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("NAPARI_RAPACL_DATA_DIR")
    monkeypatch.setenv("NAPARI_RAPACL_OFFLINE", "1")
    assert data_root() is None
    # data_dir may be the folder holding her2st/ or her2st/ itself
    assert len(her2st_genes(data_dir=data_dir)) == 785
    assert len(her2st_genes(data_dir=data_dir / "her2st")) == 785
    with pytest.raises(FileNotFoundError, match="genes_785_hvg.txt"):
        her2st_genes(data_dir=tmp_path)
    # no local copy, offline: a clear error that says what to set
    with pytest.raises(DownloadError, match="NAPARI_RAPACL_DATA_DIR"):
        her2st_genes(cache_dir=tmp_path)
    monkeypatch.delenv("NAPARI_RAPACL_OFFLINE")
    with pytest.raises(DownloadError, match="download=False"):
        her2st_genes(cache_dir=tmp_path, download=False)
    monkeypatch.setenv("NAPARI_RAPACL_DATA_DIR", str(data_dir))
    assert data_root() == data_dir


def test_unknown_section():
    with pytest.raises(RapaclInputError, match="C2, C3, C4, C5, C6"):
        her2st("A1")
    assert her2st_files("c3")["image"].endswith("5714_HE_BT_D1.jpg")


CHECKSUMS = Path(datasets.__file__).parent / "data" / "her2st_checksums.json"


def test_published_reference_and_checksums(data_dir: Path):
    assert set(HER2ST_PUBLISHED_REG2ST) == set(HER2ST_SECTIONS)
    sums = json.loads(CHECKSUMS.read_text())["files"]
    wanted = {rel for s in HER2ST_SECTIONS for rel in her2st_files(s).values()} | {"genes_785_hvg.txt"}
    assert wanted <= set(sums)
    for rel in ("genes_785_hvg.txt", her2st_files("C6")["spots"]):
        path = data_dir / "her2st" / rel
        assert sums[rel]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sums[rel]["size"] == path.stat().st_size


# --------------------------------------------------------------------------------------------
# download path, against a local HTTP server
# --------------------------------------------------------------------------------------------
class _Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path: Path):
    """No local data, downloads allowed, a fresh cache in tmp_path."""
    monkeypatch.delenv("NAPARI_RAPACL_DATA_DIR", raising=False)
    monkeypatch.delenv("NAPARI_RAPACL_OFFLINE", raising=False)
    monkeypatch.delenv("NAPARI_RAPACL_CACHE_DIR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path / "cache"


@pytest.fixture
def mirror_server(data_dir: Path, monkeypatch) -> Iterator[_Server]:
    server = _Server(data_dir / "her2st")
    monkeypatch.setenv("NAPARI_RAPACL_HER2ST_URL", server.url)
    yield server
    server.close()


def test_download_and_cache(online: Path, mirror_server: _Server, data_dir: Path):
    genes = her2st_genes(cache_dir=online)
    assert len(genes) == 785
    assert mirror_server.requests == ["/genes_785_hvg.txt"]
    assert her2st_genes(cache_dir=online) == genes
    assert len(mirror_server.requests) == 1  # served from the cache

    sec = her2st("C2", cache_dir=online)
    files = her2st_files("C2")
    assert sorted(mirror_server.requests[1:]) == sorted(f"/{rel}" for rel in files.values())
    for rel in files.values():
        assert (online / "her2st" / rel).read_bytes() == (data_dir / "her2st" / rel).read_bytes()
    assert sec.slide.mpp_source == "spot-grid" and len(sec.spots) == 187
    n = len(mirror_server.requests)
    again = her2st("C2", cache_dir=online)
    assert len(mirror_server.requests) == n  # no second download
    assert np.array_equal(again.spots.barcode, sec.spots.barcode)
    assert not list(online.rglob("*.part"))


def test_cache_dir_from_environment(online: Path, mirror_server: _Server, monkeypatch):
    monkeypatch.setenv("NAPARI_RAPACL_CACHE_DIR", str(online))
    her2st_genes()
    assert (online / "her2st" / "genes_785_hvg.txt").is_file()
    her2st_genes()
    assert len(mirror_server.requests) == 1


def test_checksum_mismatch(online: Path, data_dir: Path, tmp_path: Path, monkeypatch):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    text = (data_dir / "her2st" / "genes_785_hvg.txt").read_text()
    (tampered / "genes_785_hvg.txt").write_text(text.replace("HPS6", "HPS7", 1))
    server = _Server(tampered)
    monkeypatch.setenv("NAPARI_RAPACL_HER2ST_URL", server.url)
    try:
        with pytest.raises(DownloadError, match=r"checksum mismatch .*genes_785_hvg\.txt") as info:
            her2st_genes(cache_dir=online)
    finally:
        server.close()
    expected = json.loads(CHECKSUMS.read_text())
    got = hashlib.sha256((tampered / "genes_785_hvg.txt").read_bytes()).hexdigest()
    assert expected["files"]["genes_785_hvg.txt"]["sha256"] in str(info.value) and got in str(info.value)
    assert [p for p in online.rglob("*") if p.is_file()] == []


def test_missing_upstream_file(online: Path, tmp_path: Path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    server = _Server(empty)
    monkeypatch.setenv("NAPARI_RAPACL_HER2ST_URL", server.url)
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            her2st_genes(cache_dir=online)
    finally:
        server.close()
    assert [p for p in online.rglob("*") if p.is_file()] == []


def test_unreachable_server(online: Path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NAPARI_RAPACL_HER2ST_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DownloadError, match=rf"127\.0\.0\.1:{port}.*NAPARI_RAPACL_DATA_DIR"):
        her2st("C3", cache_dir=online)
    assert time.monotonic() - start < 10
    assert [p for p in online.rglob("*") if p.is_file()] == []


def test_offline_refuses(online: Path, monkeypatch):
    monkeypatch.setenv("NAPARI_RAPACL_OFFLINE", "1")
    monkeypatch.setenv("NAPARI_RAPACL_HER2ST_URL", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match="NAPARI_RAPACL_OFFLINE"):
        her2st("C2", cache_dir=online)


def test_stalled_server_times_out(online: Path, monkeypatch):
    # a server that accepts the connection and never answers: the read timeout must fire
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    monkeypatch.setenv("NAPARI_RAPACL_HER2ST_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(datasets, "DOWNLOAD_TIMEOUT", 0.5)
    try:
        start = time.monotonic()
        with pytest.raises(DownloadError, match="timed out"):
            her2st_genes(cache_dir=online)
        assert time.monotonic() - start < 5
    finally:
        listener.close()
    shutil.rmtree(online, ignore_errors=True)


def test_caches_that_cannot_lie(
    online: Path, mirror_server: _Server, data_dir: Path, tmp_path: Path, monkeypatch
):
    """#14 item 8: a cached file of the right size but the wrong content is detected (sha256, checked
    once and remembered by size and modification time) and downloaded again; a local mirror file
    changed in place is an error naming it, not silently used."""
    import os

    genes = her2st_genes(cache_dir=online)
    cached = online / "her2st" / "genes_785_hvg.txt"
    good = cached.read_bytes()
    cached.write_bytes(good.replace(b"HPS6", b"HPS7", 1))  # same size, other content
    assert cached.stat().st_size == len(good)
    assert her2st_genes(cache_dir=online) == genes  # noticed and fetched again
    assert mirror_server.requests.count("/genes_785_hvg.txt") == 2 and cached.read_bytes() == good
    # a mirror (NAPARI_RAPACL_DATA_DIR / data_dir) holding a damaged copy
    mirror = tmp_path / "mirror" / "her2st"
    mirror.mkdir(parents=True)
    (mirror / "genes_785_hvg.txt").write_bytes(good)
    assert her2st_genes(data_dir=mirror.parent) == genes
    stat = (mirror / "genes_785_hvg.txt").stat()
    (mirror / "genes_785_hvg.txt").write_bytes(good.replace(b"HPS6", b"HPS7", 1))
    os.utime(mirror / "genes_785_hvg.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(CorruptFileError, match=r"genes_785_hvg\.txt does not match the pinned HER2ST file"):
        her2st_genes(data_dir=mirror.parent)
