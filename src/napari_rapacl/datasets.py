"""Public example data: the five patient-C sections of the HER2ST breast-cancer study.

HER2ST (Andersson et al., Nat Commun 2021; GitHub ``almaan/her2st``, CC BY 4.0) is legacy
Spatial Transcriptomics: full-resolution H&E JPEGs, raw UMI counts and spot files. Files are found,
in this order, in

1. ``data_dir=`` (a folder holding ``her2st/``, or the ``her2st`` folder itself);
2. ``$NAPARI_RAPACL_DATA_DIR/her2st`` (which keeps the upstream relative paths);
3. the user cache (``cache_dir=``, ``$NAPARI_RAPACL_CACHE_DIR`` or ``~/.cache/napari-rapacl``);
4. a download of the missing files from GitHub (pinned commit, sha256-checked) into that cache,
   unless ``download=False`` or ``$NAPARI_RAPACL_OFFLINE`` is set.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from napari_rapacl._atomic import write_text_atomic
from napari_rapacl._errors import CorruptFileError, DownloadError, RapaclInputError

if TYPE_CHECKING:
    from napari_rapacl.io.slide import Slide
    from napari_rapacl.io.spots import Spots

__all__ = [
    "HER2ST_COMMIT",
    "HER2ST_MARKERS",
    "HER2ST_PUBLISHED_REG2ST",
    "HER2ST_SECTIONS",
    "Her2stSection",
    "cache_root",
    "data_root",
    "her2st",
    "her2st_files",
    "her2st_genes",
    "with_markers",
]

HER2ST_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
HER2ST_URL = f"https://raw.githubusercontent.com/almaan/her2st/{HER2ST_COMMIT}"

#: Reg2ST mean per-gene Pearson r on each held-out section (785 genes; trained on 31 other sections).
HER2ST_PUBLISHED_REG2ST = {"C2": 0.159, "C3": 0.236, "C4": 0.237, "C5": 0.240, "C6": 0.194}

#: Seconds a download may wait for the server (connect, and each read).
DOWNLOAD_TIMEOUT = 30.0

_IMAGE_NAMES = {
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}
_GENES_FILE = "genes_785_hvg.txt"
_HINT = (
    "Set NAPARI_RAPACL_DATA_DIR to a folder holding her2st/ (a copy of github.com/almaan/her2st), "
    "or pass data_dir="
)


@dataclass
class Her2stSection:
    """One HER2ST section: its H&E slide and its spots (raw counts in ``spots.counts``)."""

    name: str
    slide: Slide
    spots: Spots

    def __repr__(self) -> str:
        return f"Her2stSection({self.name!r}, slide={self.slide!r}, spots={self.spots!r})"


def data_root() -> Path | None:
    """``$NAPARI_RAPACL_DATA_DIR`` if it is set and is a folder, else ``None``."""
    value = os.environ.get("NAPARI_RAPACL_DATA_DIR")
    if value and Path(value).expanduser().is_dir():
        return Path(value).expanduser()
    return None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The download cache: ``cache_dir``, ``$NAPARI_RAPACL_CACHE_DIR`` or ``~/.cache/napari-rapacl``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    value = os.environ.get("NAPARI_RAPACL_CACHE_DIR")
    if value:
        return Path(value).expanduser()
    return Path("~/.cache/napari-rapacl").expanduser()


@lru_cache(maxsize=1)
def _checksums() -> dict[str, dict]:
    text = resources.files("napari_rapacl").joinpath("data/her2st_checksums.json").read_text()
    return json.loads(text)["files"]


def _section(section: str) -> str:
    name = str(section).strip().upper()
    if name not in HER2ST_SECTIONS:
        raise RapaclInputError(
            f"unknown HER2ST section {section!r}; valid sections are {', '.join(HER2ST_SECTIONS)}"
        )
    return name


def her2st_files(section: str) -> dict[str, str]:
    """Upstream relative paths of a section's ``image``, ``counts`` and ``spots`` files."""
    name = _section(section)
    return {
        "image": f"data/ST-imgs/C/{name}/{_IMAGE_NAMES[name]}",
        "counts": f"data/ST-cnts/{name}.tsv.gz",
        "spots": f"data/ST-spotfiles/{name}_selection.tsv",
    }


def _has_all(root: Path, relpaths: list[str]) -> bool:
    return all((root / rel).is_file() for rel in relpaths)


_VERIFIED_FILE = "verified.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _matches_pin(path: Path, rel: str) -> bool:
    """Whether ``path`` holds the pinned content of ``rel``: its sha256 is computed once and the result
    remembered by path, size and modification time (in the user cache), so a file changed in place,
    even to the same size, is checked again. Files without a pin count as matching."""
    sums = _checksums()
    if rel not in sums:
        return True
    st = path.stat()
    if st.st_size != sums[rel]["size"]:
        return False
    memo_path = cache_root() / _VERIFIED_FILE
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, sums[rel]["sha256"]]
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(key) == stamp:
        return True
    if _sha256(path) != sums[rel]["sha256"]:
        return False
    memo[key] = stamp
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo_path, json.dumps(memo, indent=0))
    except OSError:  # a read-only home: verify again next time
        pass
    return True


def _verified_mirror(root: Path, relpaths: list[str]) -> Path:
    """``root`` after checking its files against the pinned checksums; a file that does not match is
    an error naming it (a local mirror is the user's: it is not replaced)."""
    for rel in relpaths:
        if not _matches_pin(root / rel, rel):
            pin = _checksums()[rel]
            raise CorruptFileError(
                f"{root / rel} does not match the pinned HER2ST file (size {pin['size']} bytes, sha256 "
                f"{pin['sha256'][:16]}...): it is damaged or another version; copy it again from the her2st "
                "repository, or remove it to let napari-rapacl download it"
            )
    return root


def _cached_ok(root: Path, relpaths: list[str]) -> bool:
    """All files present in the cache with the pinned content; a damaged one is deleted (it is
    downloaded again)."""
    ok = True
    for rel in relpaths:
        path = root / rel
        if not path.is_file():
            ok = False
        elif not _matches_pin(path, rel):
            path.unlink()
            ok = False
    return ok


def _offline() -> bool:
    return os.environ.get("NAPARI_RAPACL_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _resolve(
    relpaths: list[str],
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    download: bool | None,
) -> Path:
    """The her2st root folder holding every path in ``relpaths`` (downloading them if allowed)."""
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        for root in (base / "her2st", base):
            if _has_all(root, relpaths):
                return _verified_mirror(root, relpaths)
        missing = next(rel for rel in relpaths if not (base / "her2st" / rel).is_file())
        raise FileNotFoundError(
            f"HER2ST file {missing} not found under data_dir={base} (looked in {base / 'her2st'} and {base})"
        )
    env_root = data_root()
    if env_root is not None and _has_all(env_root / "her2st", relpaths):
        return _verified_mirror(env_root / "her2st", relpaths)
    cache = cache_root(cache_dir) / "her2st"
    if _cached_ok(cache, relpaths):
        return cache
    if download is False:
        raise DownloadError(
            f"HER2ST files are not available locally ({relpaths[0]} ...) and download=False. {_HINT}."
        )
    if _offline():
        raise DownloadError(
            f"HER2ST files are not available locally ({relpaths[0]} ...) and NAPARI_RAPACL_OFFLINE is set, "
            f"so nothing is downloaded. {_HINT}, or unset NAPARI_RAPACL_OFFLINE to download into {cache}."
        )
    base_url = os.environ.get("NAPARI_RAPACL_HER2ST_URL", HER2ST_URL).rstrip("/")
    sums = _checksums()
    for rel in relpaths:
        target = cache / rel
        if target.is_file() and _matches_pin(target, rel):
            continue
        if rel not in sums:
            raise DownloadError(f"no checksum is known for HER2ST file {rel}; refusing to download it")
        _download(f"{base_url}/{rel}", target, sums[rel]["sha256"])
    return cache


def _download(url: str, target: Path, sha256: str) -> Path:
    """Download ``url`` to ``target`` atomically, checking its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                raise DownloadError(
                    f"could not download {url}: HTTP {exc.code} {exc.reason}. {_HINT}."
                ) from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DownloadError(f"could not download {url}: {reason}. {_HINT}.") from exc
        got = digest.hexdigest()
        if got != sha256:
            raise DownloadError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file was deleted"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def her2st(
    section: str = "C2",
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> Her2stSection:
    """Load one HER2ST section (``C2`` .. ``C6``): slide, spot positions and raw counts.

    Parameters
    ----------
    section
        One of :data:`HER2ST_SECTIONS`.
    data_dir
        A folder holding ``her2st/`` (or the ``her2st`` folder itself); overrides everything else.
    cache_dir
        Download cache (default ``$NAPARI_RAPACL_CACHE_DIR`` or ``~/.cache/napari-rapacl``).
    download
        ``False`` never downloads; ``None``/``True`` download missing files unless
        ``$NAPARI_RAPACL_OFFLINE`` is set.

    Returns
    -------
    Her2stSection
        The slide's pixel size is set from the spot grid (``mpp_source == "spot-grid"``) and all
        spots are checked to lie inside it.
    """
    from napari_rapacl.io import open_slide, place_spots, read_spots

    name = _section(section)
    files = her2st_files(name)
    root = _resolve(list(files.values()), data_dir, cache_dir, download)
    spots = read_spots(root / files["spots"], counts=root / files["counts"])
    slide = place_spots(open_slide(root / files["image"]), spots)
    return Her2stSection(name=name, slide=slide, spots=spots)


#: Clinically relevant breast-cancer markers predicted beside the 785 benchmark genes
#: (``data.genes: her2st785+markers`` in training, the main job):
#: HER2 amplicon (ERBB2, GRB7), hormone receptors (ESR1, PGR), proliferation (MKI67), epithelium
#: (EPCAM, basal KRT5), antigen presentation (CD74), immune cells (PTPRC, T cells CD3E, B cells MS4A1)
#: and stroma (COL1A1, ACTA2).
HER2ST_MARKERS = (
    "ERBB2",
    "ESR1",
    "PGR",
    "MKI67",
    "GRB7",
    "EPCAM",
    "KRT5",
    "CD74",
    "PTPRC",
    "CD3E",
    "MS4A1",
    "COL1A1",
    "ACTA2",
)


def with_markers(
    base: Sequence[str], gene_sets: Iterable[Iterable[str]], markers: Sequence[str] = HER2ST_MARKERS
) -> tuple[list[str], list[str]]:
    """``base`` plus the ``markers`` not in it that at least one of ``gene_sets`` (the genes of each
    training section's counts) holds, in the order of ``markers``; and the markers left out because no
    training section measures them (a model cannot learn them)."""
    present: set[str] = set()
    for genes in gene_sets:
        present |= {str(g) for g in genes}
    have = set(base)
    added = [g for g in markers if g not in have and g in present]
    absent = [g for g in markers if g not in have and g not in present]
    return [*base, *added], absent


def her2st_genes(
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> list[str]:
    """The 785-gene list of the published HER2ST benchmarks (``genes_785_hvg.txt``).

    Found and downloaded like :func:`her2st`.
    """
    root = _resolve([_GENES_FILE], data_dir, cache_dir, download)
    lines = (root / _GENES_FILE).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
