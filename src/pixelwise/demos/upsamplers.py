"""Demo: the checkerboard inspection of every upsampling operator (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run(out: Path, *, model: str | None = None, quick: bool = False) -> dict[str, Any]:
    from pixelwise.inspect_upsamplers import write_report

    rows = write_report(out)
    return {
        "task": "upsamplers",
        "out": str(out),
        "report": str(out / "upsamplers.md"),
        "figure": str(out / "upsamplers.png"),
        "rows": rows,
    }
