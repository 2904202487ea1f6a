"""Atomic file writes: the content goes to a temporary file in the destination's folder, which then
replaces the destination in one ``os.replace``; on any failure the temporary file is removed and the
destination is left as it was (absent or complete, never half-written)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it onto ``path``.

    ``suffix`` ends the temporary file's name (a writer that insists on an extension gets it).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_atomic` of ``data``."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of ``text`` (UTF-8)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
