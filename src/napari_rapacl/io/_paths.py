"""Input paths: regular files and folders only (a FIFO, socket or device would block a read forever)."""

from __future__ import annotations

import stat
from pathlib import Path

from .._errors import UnsupportedFormatError


def require_readable(path: Path, what: str) -> Path:
    """``path`` if it is a regular file or a folder; :class:`FileNotFoundError` when it does not exist,
    :class:`UnsupportedFormatError` naming what it is otherwise (FIFO, socket, device)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return path
    kind = (
        "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise UnsupportedFormatError(
        f"{what} {path} is {kind}: napari-rapacl reads regular files and folders only (reading it could "
        "wait forever); save the data to a file first"
    )
