"""Sample data: her2st breast cancer sections with their spots (from the local mirror or the cache)."""

from __future__ import annotations


def her2st_layers(section: str) -> list:
    from ..datasets import her2st
    from .layers import slide_layer_data, spots_layer_data

    sec = her2st(section)
    return [
        slide_layer_data(sec.slide, name=f"her2st {section}"),
        spots_layer_data(
            sec.spots,
            mpp=sec.slide.mpp,
            name=f"her2st {section} spots",
            library_id=section,
            slide_path=str(sec.slide.path),
        ),
    ]


def her2st_c2() -> list:
    return her2st_layers("C2")


def her2st_c3() -> list:
    return her2st_layers("C3")
