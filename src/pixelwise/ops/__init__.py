"""Tensor operations that torchvision does not offer: Matrix NMS and greedy mask NMS."""

from pixelwise.ops.matrix_nms import (
    DECAY_KERNELS,
    greedy_nms_from_iou,
    mask_iou_matrix,
    mask_nms,
    matrix_nms,
    matrix_nms_decay,
    matrix_nms_scores,
)

__all__ = [
    "DECAY_KERNELS",
    "greedy_nms_from_iou",
    "mask_iou_matrix",
    "mask_nms",
    "matrix_nms",
    "matrix_nms_decay",
    "matrix_nms_scores",
]
