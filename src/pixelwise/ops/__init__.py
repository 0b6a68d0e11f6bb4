"""Tensor operations that torchvision does not offer: Matrix NMS, greedy mask NMS, and RoIAlign
split between CPU threads."""

from pixelwise.ops.matrix_nms import (
    DECAY_KERNELS,
    greedy_nms_from_iou,
    mask_iou_matrix,
    mask_nms,
    matrix_nms,
    matrix_nms_decay,
    matrix_nms_scores,
)
from pixelwise.ops.roi_align import ParallelMultiScaleRoIAlign, parallel_roi_align

__all__ = [
    "DECAY_KERNELS",
    "ParallelMultiScaleRoIAlign",
    "greedy_nms_from_iou",
    "mask_iou_matrix",
    "mask_nms",
    "matrix_nms",
    "matrix_nms_decay",
    "matrix_nms_scores",
    "parallel_roi_align",
]
