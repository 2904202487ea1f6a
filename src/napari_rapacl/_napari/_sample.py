"""Sample data: her2st breast cancer sections with their spots (from the local mirror or the cache)."""

from __future__ import annotations


def _beside_open_slides():
    """Where a sample goes in the current viewer: right of the slides already open (None: none open)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no viewer (a script): where the slide's own pixels put it
        return None
    if viewer is None:
        return None
    from ._common import beside_offset

    return beside_offset(viewer)


def her2st_layers(section: str) -> list:
    from ..jobs import iter_open_sample
    from ..progress import run_to_completion
    from .layers import opened_layer_data

    return opened_layer_data(run_to_completion(iter_open_sample(section)), translate=_beside_open_slides())


def her2st_c2() -> list:
    return her2st_layers("C2")


def her2st_c3() -> list:
    return her2st_layers("C3")
