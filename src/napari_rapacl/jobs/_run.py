"""Running independent tasks here or on a scheduler (threads, processes, dask.distributed)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any


def run_tasks(
    fn: Callable[..., Any], tasks: list[tuple[Any, tuple]], scheduler: Any = None
) -> Generator[tuple[Any, Any], None, None]:
    """Run ``fn(*args)`` for every ``(tag, args)`` and yield ``(tag, result)`` as tasks finish.

    ``scheduler``: None or ``"synchronous"`` (this thread, in order), ``"threads"``, ``"processes"``
    (spawned; ``fn`` and its arguments must be picklable, module-level) or a ``dask.distributed``
    Client, cluster or scheduler address (see :mod:`napari_rapacl.tiled`). Closing the generator
    cancels the tasks not started yet.
    """
    from ..tiled import _check_scheduler, _get_client, _local_workers

    _check_scheduler(scheduler)
    if not tasks:
        return
    if scheduler is None or scheduler == "synchronous":
        for tag, args in tasks:
            yield tag, fn(*args)
        return
    if scheduler in ("threads", "processes"):
        import concurrent.futures as cf
        import multiprocessing

        if scheduler == "threads":
            pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=_local_workers())
        else:
            n = min(_local_workers(), len(tasks))
            pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(fn, *args): tag for tag, args in tasks}
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    from distributed import as_completed

    client, owned = _get_client(scheduler)
    futures: dict = {}
    try:
        for tag, args in tasks:
            futures[client.submit(fn, *args, pure=False)] = tag
        for fut in as_completed(list(futures)):
            yield futures[fut], fut.result()
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        if owned:
            client.close()
