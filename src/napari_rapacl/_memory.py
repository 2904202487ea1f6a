"""Memory hygiene between the stages of a long job (Qt-free, no heavy imports)."""

from __future__ import annotations

import gc
import sys

__all__ = ["release_freed_memory"]


def release_freed_memory() -> bool:
    """Collect garbage and hand the heap memory freed so far back to the operating system.

    glibc keeps freed memory in its arenas, so a process's resident size stays at the high-water mark
    of the work done so far (torch's batches, the tiles' patches) and the next stage's memory comes on
    top of it. Called between predicting and writing. Returns whether the C library trimmed its heap
    (glibc on Linux); elsewhere only the garbage collection runs.
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
