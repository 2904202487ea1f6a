"""Viewer-side helpers that are not jobs: the torch/OpenGL LLVM clash, FileEdit values as paths."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def avoid_llvm_clash() -> bool:
    """Keep torch from importing triton into a process where an OpenGL driver already loaded LLVM.

    Mesa's software renderer (llvmpipe, what napari gets under Xvfb or on a VM without a GPU) loads
    ``libLLVM``; triton (imported by ``torch._dynamo``, which torchvision and timm import) carries its own
    LLVM, and loading it after Mesa's crashes the interpreter (SIGSEGV). When ``libLLVM`` is mapped and
    triton is not imported yet, ``sys.modules["triton"] = None`` makes torch see triton as absent (it is
    optional: only ``torch.compile`` GPU kernels need it). Returns True when it did so.
    """
    if "triton" in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            maps = fh.read()
    except OSError:  # not Linux
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None
    log.warning("an OpenGL driver loaded LLVM into this process: triton is disabled for torch")
    return True


def checkpoint_path(value: Any) -> Path | None:
    """A FileEdit value as a checkpoint path: None when empty (FileEdit gives '.' or the cwd)."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or text == ".":
        return None
    path = Path(text)
    return path if not path.is_dir() else None
