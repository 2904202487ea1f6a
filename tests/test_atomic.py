"""Atomic folder replacement cleans what killed writes left (#14 item 3)."""

from __future__ import annotations

import os
import time


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_replace_dir_removes_stale_stores_of_killed_writes(tmp_path):
    """A ``segment --out cells.zarr`` killed with -9 leaves its temporary store (the CLI's
    ``.cells.zarr.<r>.tmp``, or the tiler's ``..cells.zarr.<r>.tmp.<r>.tmp`` inside whose name it is),
    and one killed between rename-aside and delete leaves ``.cells.zarr.<r>.old``: the next write to
    cells.zarr removes them once stale. A store still being written (a chunk folder inside it changed
    recently, although its top folder is old) and other targets' temporaries are kept."""
    from napari_rapacl import _atomic

    old_age = _atomic.STALE_SECONDS + 60
    target = tmp_path / "cells.zarr"
    target.mkdir()
    (target / "zarr.json").write_text("old")
    stale = [
        tmp_path / ".cells.zarr.ab12cd34.tmp",
        tmp_path / "..cells.zarr.ab12cd34.tmp.9bd15e11.tmp",
        tmp_path / ".cells.zarr.ef56ab78.old",
    ]
    for d in stale:
        (d / "c" / "0").mkdir(parents=True)
        (d / "c" / "0" / "0").write_bytes(b"\0" * 1000)
        for p in (d / "c" / "0", d / "c", d):
            _age(p, old_age)
    active = tmp_path / ".cells.zarr.12345678.tmp"  # another writer: a chunk row written just now
    (active / "c" / "7").mkdir(parents=True)
    (active / "c" / "7" / "0").write_bytes(b"\1")
    _age(active / "c", old_age)
    _age(active, old_age)
    other = tmp_path / ".other.zarr.ab12cd34.tmp"
    other.mkdir()
    _age(other, old_age)
    new = tmp_path / ".cells.zarr.feedbeef.tmp"
    new.mkdir()
    (new / "zarr.json").write_text("new")
    _atomic.replace_dir(new, target)
    assert (target / "zarr.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".cells.zarr.12345678.tmp", ".other.zarr.ab12cd34.tmp", "cells.zarr"]
    )
    # the same cleaning is available before a write starts (segment calls it first)
    _age(active / "c" / "7", old_age)
    _atomic.remove_stale_dirs(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.zarr.ab12cd34.tmp", "cells.zarr"]
