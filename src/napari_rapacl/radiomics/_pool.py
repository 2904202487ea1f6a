"""A reusable process pool for radiomics work (forkserver on Linux, spawn elsewhere).

Processes are started from a clean server process (forkserver) or a fresh interpreter (spawn),
never forked from a parent that may already run torch / dask / Qt threads. The pool lives until
:func:`shutdown_pools` or interpreter exit, so a second call does not pay the start-up again.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor

_POOLS: dict[int, ProcessPoolExecutor] = {}
_LOCK = threading.Lock()


def _init_worker() -> None:
    import logging

    logging.getLogger("radiomics").setLevel(logging.WARNING)
    try:  # one ITK thread per worker: the workers are the parallelism
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:
        pass


def _context() -> mp.context.BaseContext:
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def get_pool(n_jobs: int) -> ProcessPoolExecutor:
    """The shared pool with ``n_jobs`` worker processes (created on first use)."""
    with _LOCK:
        pool = _POOLS.get(n_jobs)
        if pool is None or getattr(pool, "_broken", False):
            pool = ProcessPoolExecutor(max_workers=n_jobs, mp_context=_context(), initializer=_init_worker)
            _POOLS[n_jobs] = pool
        return pool


def shutdown_pools() -> None:
    """Stop every worker process this module started."""
    with _LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pools)
