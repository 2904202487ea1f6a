"""Progress of long jobs: generators yield :class:`Progress` and return their result.

Torch-free and cheap to import: segmentation, radiomics, tiled inference and the jobs layer all use it.
A GUI wraps such a generator in a ``thread_worker`` (progress bar, cancel between yields); a script
drains it with :func:`run_to_completion`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Progress", "run_to_completion"]


@dataclass(frozen=True)
class Progress:
    """One step of a long job: ``done`` of ``total`` units of ``stage`` are finished.

    ``result`` optionally carries something usable before the job ends (a partial result, e.g. the
    predictions of a viewer's view before the tiles around it are complete); it takes no part in
    comparisons.
    """

    stage: str
    done: int
    total: int
    result: Any = field(default=None, compare=False, repr=False)


def run_to_completion(
    gen: Generator[Progress, None, Any], on_progress: Callable[[Progress], Any] | None = None
) -> Any:
    """Drain a progress generator and return its value; ``on_progress`` (if given) gets each
    :class:`Progress` it yields."""
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)
