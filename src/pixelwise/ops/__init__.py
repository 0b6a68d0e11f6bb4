"""Tensor operations that torchvision does not offer: Matrix NMS, greedy mask NMS, RoIAlign
split between CPU threads, per-pixel labels from scores, and joint bilateral upsampling.

The RoIAlign names are loaded on first use (PEP 562): `roi_align` imports torchvision, which
importing a light submodule such as `pixelwise.ops.labels` (used by the metrics) should not
(0.8 s of start-up).
"""

from __future__ import annotations

from typing import Any

from pixelwise.ops.joint_bilateral import joint_bilateral_upsample
from pixelwise.ops.labels import argmax_labels
from pixelwise.ops.matrix_nms import (
    DECAY_KERNELS,
    greedy_nms_from_iou,
    mask_iou_matrix,
    mask_nms,
    matrix_nms,
    matrix_nms_decay,
    matrix_nms_scores,
)

_LAZY = ("ParallelMultiScaleRoIAlign", "parallel_roi_align")

__all__ = [
    "DECAY_KERNELS",
    "ParallelMultiScaleRoIAlign",
    "argmax_labels",
    "greedy_nms_from_iou",
    "joint_bilateral_upsample",
    "mask_iou_matrix",
    "mask_nms",
    "matrix_nms",
    "matrix_nms_decay",
    "matrix_nms_scores",
    "parallel_roi_align",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pixelwise.ops import roi_align

    return getattr(roi_align, name)
