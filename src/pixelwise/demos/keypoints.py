"""Demo: keypoint detection (Keypoint R-CNN) on synthetic stick figures with COCO's 17 person
keypoints, trained briefly on the CPU; writes under `out` (default runs/demo-keypoints) what
`pixelwise.demos.instance` describes (metrics: bbox + keypoint AP; overlays with skeletons)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelwise.demos.instance import run_detection_demo


def run(out: Path, *, model: str | None = None, quick: bool = False) -> dict[str, Any]:
    """The keypoint demo (default model keypoint_rcnn)."""
    return run_detection_demo("keypoints", out, model=model, quick=quick)
