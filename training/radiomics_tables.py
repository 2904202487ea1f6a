"""Per-section radiomics tables for RaPaCL-ST training: one ``<dataset>_<section>.parquet`` per section.

    python -m training.radiomics_tables --out outputs/radiomics            # her2st C2-C6
    python -m training.radiomics_tables --sections C2 C3 --n-jobs 2 --cache outputs/radiomics/cache

Every spot's patch (``--size`` px at ``--mpp`` um/px; RaPaCL-ST: 224 px at 0.5 um/px) is segmented
with the weight-free classical segmenter (or cellpose, ``--segment cellpose``) and described by
:func:`napari_rapacl.radiomics.iter_spot_features`: RaPaCL-ST's 72 features, ``n_nuclei`` and the
composition ``cell_label``. The table is indexed by barcode (what ``data.radiomics_table`` in the
training configs reads), written atomically, and carries the radiomics config in its parquet
metadata. The on-disk cache makes a second run over the same slides nearly free.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("training.radiomics_tables")


def write_section_table(
    section: str,
    out_dir: Path,
    *,
    size: int = 224,
    mpp: float = 0.5,
    segment: str = "classical",
    n_jobs: int = 2,
    cache_dir: Path | None = None,
    version: str | None = None,
) -> Path:
    """Compute and write ``her2st_<section>.parquet``; returns its path."""
    from napari_rapacl.datasets import her2st
    from napari_rapacl.progress import Progress
    from napari_rapacl.radiomics import NucleusSegmenter, iter_spot_features

    sec = her2st(section)
    gen = iter_spot_features(
        sec.slide,
        sec.spots,
        size=size,
        mpp=mpp,
        segment=NucleusSegmenter(segment, version=version),
        feature_set="rapacl72",
        cache_dir=cache_dir,
        n_jobs=n_jobs,
    )
    t0, last = time.perf_counter(), 0.0
    while True:
        try:
            step: Progress = next(gen)
        except StopIteration as stop:
            table = stop.value
            break
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log.info("%s: %d/%d spots (%.0f s)", section, step.done, step.total, last - t0)
    table.index.name = "barcode"
    meta = {k: v for k, v in table.attrs.items() if isinstance(v, (str, int, float, dict, list))}
    table.attrs = {"napari_rapacl": json.dumps(meta, default=str)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"her2st_{section}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    table.to_parquet(tmp)
    tmp.replace(path)
    log.info(
        "%s: %d spots, median %d nuclei per patch, cell_label counts %s -> %s (%.0f s)",
        section,
        len(table),
        int(table["n_nuclei"].median()),
        table["cell_label"].value_counts().sort_index().to_dict(),
        path,
        time.perf_counter() - t0,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    from napari_rapacl.datasets import HER2ST_SECTIONS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=list(HER2ST_SECTIONS))
    parser.add_argument("--out", default="outputs/radiomics", help="folder of the parquet tables")
    parser.add_argument("--size", type=int, default=224, help="patch side in px")
    parser.add_argument("--mpp", type=float, default=0.5, help="um per patch pixel")
    parser.add_argument("--segment", default="classical", choices=["classical", "cellpose"])
    parser.add_argument(
        "--segmentation-version",
        default=None,
        help="classical segmentation version to reproduce (default: the newest; the her2st benchmark's "
        "published table used 2)",
    )
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--cache", default=None, help="radiomics cache folder (default: <out>/cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    for section in args.sections:
        write_section_table(
            section,
            out,
            size=args.size,
            mpp=args.mpp,
            segment=args.segment,
            n_jobs=args.n_jobs,
            cache_dir=cache,
            version=args.segmentation_version,
        )
    return 0


if __name__ == "__main__":  # the process pool (n_jobs > 1) needs this guard
    raise SystemExit(main())
