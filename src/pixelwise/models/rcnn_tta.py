"""Test-time flip for Mask R-CNN: the detections of an image and of its mirror image, merged.

Written here because torchvision has no detection test-time augmentation. detectron2's
`GeneralizedRCNNWithTTA` merges the views' boxes, then runs the mask head again on the merged
boxes in every view and averages those masks. This one merges the views' outputs alone (the
heads run once per view): the detections of both views are pooled, the box head's per-class
NMS chooses among them, and each kept detection's mask is the score-weighted mean of the
masks (probabilities) of the pooled detections of its class whose boxes overlap its box by
more than `vote_iou` (itself included: "mask voting"), thresholded by the caller. The votes
need the views' masks as probabilities at the image's size (D x H x W floats per view, where
the one-pass path thresholds chunk by chunk): ~0.4 GB per view for 100 detections on a
1333 x 800 image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms, box_iou

#: the box IoU above which a pooled detection's mask votes for a kept one of its class
FLIP_VOTE_IOU = 0.7

#: the keys `merge_views` reads and returns (a Mask R-CNN's eval output)
DETECTION_KEYS = ("boxes", "labels", "scores", "masks")


def mirror_detections(detections: dict[str, torch.Tensor], width: int
                      ) -> dict[str, torch.Tensor]:
    """One image's detections on its mirror image (boxes (D, 4) as x1, y1, x2, y2 in pixels
    of an image `width` wide, masks (D, 1, H, W)) mapped back onto the image itself."""
    boxes = detections["boxes"]
    out = dict(detections)
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                boxes[:, 3]], dim=1)  # (D, 4)
    out["masks"] = detections["masks"].flip(-1)
    return out


def merge_views(views: Sequence[dict[str, torch.Tensor]], *, nms_thresh: float,
                max_detections: int, vote_iou: float | None = FLIP_VOTE_IOU
                ) -> dict[str, torch.Tensor]:
    """The detections of several views of one image (each a dict of `DETECTION_KEYS` in the
    image's frame, masks (D, 1, H, W) probabilities) as one set: per-class NMS at
    `nms_thresh` over all of them, the `max_detections` best kept (by score, descending), and
    with `vote_iou` each kept mask replaced by its voters' score-weighted mean (module
    docstring; None keeps each kept detection's own mask)."""
    pooled = {key: torch.cat([view[key] for view in views]) for key in DETECTION_KEYS}
    boxes, labels, scores = pooled["boxes"], pooled["labels"], pooled["scores"]
    keep = batched_nms(boxes.float(), scores.float(), labels, nms_thresh)[:max_detections]
    merged = {key: value[keep] for key, value in pooled.items()}
    if vote_iou is None or len(keep) == 0:
        return merged
    same_class = labels[keep][:, None] == labels[None, :]  # (D, N)
    voters = same_class & (box_iou(boxes[keep].float(), boxes.float()) > vote_iou)  # (D, N)
    weights = voters.to(torch.float32) * scores.float()[None, :]  # (D, N)
    # a kept detection always votes for itself (IoU 1); only zero scores leave no weight
    total = weights.sum(1)  # (D,)
    masks = pooled["masks"].to(torch.float32).flatten(1)  # (N, 1, H, W) -> (N, H * W)
    voted = (weights @ masks) / total.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    merged["masks"] = voted.view(len(keep), *pooled["masks"].shape[1:])  # (D, 1, H, W)
    own = total == 0  # no weight: the detection's own mask
    if bool(own.any()):
        merged["masks"][own] = pooled["masks"][keep][own].to(torch.float32)
    return merged


__all__ = ["DETECTION_KEYS", "FLIP_VOTE_IOU", "merge_views", "mirror_detections"]
