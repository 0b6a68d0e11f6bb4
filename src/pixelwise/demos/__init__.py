"""The demos `pixelwise demo --task NAME` runs: synthesise data, train briefly, evaluate, predict.

One module per task, each with `run(out: Path, *, model: str | None, quick: bool) -> dict` that
writes everything under `out` and returns a summary (paths and the headline metrics).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pixelwise.errors import unknown_name

# task -> module implementing its demo
DEMOS: dict[str, str] = {
    "upsamplers": "pixelwise.demos.upsamplers",
    "semantic": "pixelwise.demos.semantic",
    "instance": "pixelwise.demos.instance",
    "keypoints": "pixelwise.demos.keypoints",
    "panoptic": "pixelwise.demos.panoptic",
}


def run_demo(task: str, out: Path, *, model: str | None = None,
             quick: bool = False) -> dict[str, Any]:
    """Run the demo of `task` under `out`; return its summary."""
    if task not in DEMOS:
        raise unknown_name("demo task", task, DEMOS)
    module = importlib.import_module(DEMOS[task])
    return module.run(out, model=model, quick=quick)
