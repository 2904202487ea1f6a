"""Atomic file writes: the content goes to a temporary file in the destination's folder, which then
replaces the destination in one ``os.replace``; on any failure the temporary file is removed and the
destination is left as it was (absent or complete, never half-written).

The temporary file is named ``.<name>.<random><suffix>`` beside the destination, so one left behind by a
killed process can be found; the next write to the same destination removes those that have not been
written to for :data:`STALE_SECONDS`. The result gets the permissions an ordinary write would give it:
those of the file it replaces, or ``0666`` less the process umask for a new file (``mkstemp`` alone
would make every output ``0600``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: A temporary file of an earlier write not modified for this long is taken as left by a killed process.
STALE_SECONDS = 15 * 60

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _newest_mtime(path: Path) -> float:
    """Last modification of ``path``; for a folder (a zarr store being written), that of the folder or
    of any folder inside it (a new chunk file changes its own folder's time, not the top one's)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, _files in os.walk(path):
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.stat(root).st_mtime)
    return newest


def _remove_stale(path: Path, suffix: str, *, prefixes: tuple[str, ...] = (".",)) -> None:
    """Remove temporary files or folders of earlier writes to ``path`` (``<prefix><name>.*<suffix>``)
    not modified for :data:`STALE_SECONDS`."""
    import shutil

    now = time.time()
    for prefix in prefixes:
        for old in path.parent.glob(f"{prefix}{path.name}.*{suffix}"):
            try:
                if now - _newest_mtime(old) > STALE_SECONDS:
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old)
                    else:
                        old.unlink()
            except OSError:  # gone already, or not ours to remove
                pass


def remove_stale_dirs(target: str | os.PathLike) -> None:
    """Remove what killed writes of the folder ``target`` (a zarr store) left beside it, once stale:
    its temporary stores ``.<name>.<random>.tmp`` (and ``..<name>.<random>.tmp.<random>.tmp``, a
    store written through a second temporary name) and old stores renamed aside ``.<name>.<random>.old``
    by :func:`replace_dir`. One written to within :data:`STALE_SECONDS` (perhaps another writer's) is kept."""
    target = Path(target)
    for suffix in (".tmp", ".old"):
        _remove_stale(target, suffix, prefixes=(".", ".."))


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it onto ``path``.

    ``suffix`` ends the temporary file's name (a writer that insists on an extension gets it).
    """
    path = Path(path)
    _remove_stale(path, suffix)
    try:
        mode = path.stat().st_mode & 0o7777  # the replaced file's permissions
    except OSError:
        mode = 0o666 & ~_umask()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished folder ``tmp`` (e.g. a zarr store) at ``target``: an existing ``target`` is first
    renamed aside (``.<name>.<random>.old``), the new one renamed in, and only then the old one deleted,
    so an interruption at any moment leaves the old folder or the new one, never neither. Stale
    temporary or set-aside folders of killed writes to ``target`` are removed first
    (:func:`remove_stale_dirs`)."""
    import shutil
    import uuid

    tmp, target = Path(tmp), Path(target)
    remove_stale_dirs(target)
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)  # put the old one back
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
    return target


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_atomic` of ``data``."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of ``text`` (UTF-8)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
