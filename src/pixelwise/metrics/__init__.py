"""Streaming evaluation metrics: semantic (confusion matrix), boundary F, COCO AP, panoptic PQ.

Every metric object follows the same life cycle: ``update(...)`` per batch or image, ``compute()``
at the end, ``reset()`` to start again, ``merge(other)`` to combine shards (e.g. one per worker).
Memory is independent of the dataset size.

Names are imported lazily, so that ``pixelwise.metrics.panoptic`` and ``pixelwise.metrics.coco``
(numpy / pycocotools only) can be used without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_LAZY = {
    "SemanticMetrics": "pixelwise.metrics.semantic",
    "semantic_scores": "pixelwise.metrics.semantic",
    "BoundaryFScore": "pixelwise.metrics.boundary",
    "coco_evaluate": "pixelwise.metrics.coco",
    "CocoEvaluator": "pixelwise.metrics.coco",
    "COCO_STAT_NAMES": "pixelwise.metrics.coco",
    "stat_names": "pixelwise.metrics.coco",
    "PanopticQuality": "pixelwise.metrics.panoptic",
    "evaluate_panoptic_files": "pixelwise.metrics.panoptic",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pixelwise.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
