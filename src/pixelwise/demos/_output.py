"""The output folder of a demo: made ready without losing anything that is not a demo's, and
JSON files written atomically."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pixelwise import atomic
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "demo.json"  # a folder holding this file is a demo's output, which a new demo replaces


def prepare_out(out: Path, entries: Sequence[str]) -> None:
    """Make `out` ready: refuse a file, or a non-empty folder that holds no earlier demo (no
    `MARKER`); from an earlier demo remove only `entries` (the names this demo writes)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out}: folder exists, is not empty and holds no earlier demo; "
                            "choose another --out")
        logger.info("replacing the earlier demo in %s", out)
        for name in entries:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented strict JSON (no NaN) at `path`, atomically."""
    atomic.write_json(path, obj, allow_nan=False)


def run_paths(out: Path, data: Path) -> dict[str, str]:
    """The summary entries every training demo shares: where its output, data, run, best
    checkpoint, curves and metrics are."""
    return {
        "out": str(out),
        "data": str(data),
        "run": str(out / "run"),
        "checkpoint": str(out / "run" / "best.safetensors"),
        "curves": str(out / "run" / "curves.png"),
        "metrics": str(out / "metrics.json"),
    }
