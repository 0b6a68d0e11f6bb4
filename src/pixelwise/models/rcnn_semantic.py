"""An auxiliary semantic branch for Mask R-CNN: dense class supervision, and votes at eval.

Mask R-CNN learns what an object is only from its RoIs: a few dozen sampled boxes an image, each
classified from a 7 x 7 pooled feature map. Trained from scratch on a short budget, that is slow
to learn shape: on pixelwise's synthetic shapes (any colour, so only the outline tells a class),
the box head of a 20-minute model calls most rectangles ellipses or triangles, while semantic
models trained as long label their pixels far better. Here the Panoptic FPN semantic branch
(`SemanticFPNHead`, Kirillov et al. 2019) is added on the same FPN features and trained with a
per-pixel cross-entropy whose labels come from the instance masks themselves (each thing's
pixels its class, the rest background, crowd regions ignored) -- as HTC (Chen et al. 2019) adds a
semantic branch to a cascade Mask R-CNN: every pixel of every object then supervises the
shared features.

At eval the same branch can re-score the detections (``semantic_rescore`` = a in [0, 1]): a
detection of class c with score s and mask M gets ``s ** (1 - a) * q ** a``, where q is the
semantic probability of c averaged over M (over the box when M is empty). A box-head class that
the pixels disagree with loses rank; a = 0 leaves the detections as they are.

Hand-written: torchvision's detection models have no semantic branch (detectron2's
`PanopticFPN` trains one on stuff labels, not as an instance model's auxiliary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pixelwise.errors import UserError
from pixelwise.models.semantic_fpn_head import VOID


def instance_semantic_target(target: Mapping[str, Any], size: Sequence[int]) -> torch.Tensor:
    """(H, W) int64 labels from one image's instance target: 0 background, each instance's mask
    its label (later instances over earlier ones), crowd pixels (``iscrowd`` 1) not covered by a
    non-crowd instance `VOID`."""
    h, w = int(size[0]), int(size[1])
    masks = torch.as_tensor(target["masks"]).as_subclass(torch.Tensor)
    labels = torch.as_tensor(target["labels"]).as_subclass(torch.Tensor).to(torch.int64)
    if masks.dim() != 3 or tuple(masks.shape[-2:]) != (h, w) or len(masks) != len(labels):
        raise UserError(f"instance target: {len(labels)} labels and masks of shape "
                        f"{tuple(masks.shape)} for an image of {h} x {w}")
    crowd = torch.as_tensor(target.get("iscrowd", torch.zeros(len(labels), dtype=torch.int64)))
    crowd = crowd.as_subclass(torch.Tensor).bool().tolist()
    out = torch.zeros(h, w, dtype=torch.int64, device=masks.device)
    covered = torch.zeros(h, w, dtype=torch.bool, device=masks.device)
    for mask, label, is_crowd in zip(masks.bool(), labels.tolist(), crowd):
        if is_crowd:
            out[mask & ~covered] = VOID
        else:
            out[mask] = label
            covered |= mask
    return out


def rescore_with_semantic(detections: dict[str, torch.Tensor], probabilities: torch.Tensor,
                          power: float) -> dict[str, torch.Tensor]:
    """`detections` (one image's eval output: boxes (D, 4), labels (D,), scores (D,), masks
    (D, 1, H, W), bool or probabilities) with scores ``s ** (1 - power) * q ** power``, q the
    mean of `probabilities` (K, H, W, softmax of the semantic branch at the image's size) of the
    detection's class over its mask (over its box when the mask is empty), and re-sorted by
    the new score."""
    if not 0.0 <= power <= 1.0:
        raise UserError(f"semantic_rescore must be in [0, 1], got {power!r}")
    scores = detections["scores"]
    if power == 0.0 or scores.numel() == 0:
        return detections
    # (D, 1, H, W) -> (D, H, W); a copy: empty masks are replaced by their boxes below
    weights = detections["masks"][:, 0].to(probabilities.dtype, copy=True)
    empty = weights.flatten(1).sum(1) == 0
    if bool(empty.any()):  # those masks' boxes instead (integer pixel ranges, at least 1 px)
        h, w = weights.shape[-2:]
        rows = torch.arange(h, device=weights.device, dtype=probabilities.dtype)
        cols = torch.arange(w, device=weights.device, dtype=probabilities.dtype)
        for i in torch.nonzero(empty).flatten().tolist():
            x0, y0, x1, y1 = detections["boxes"][i].tolist()
            y0, x0 = min(max(math.floor(y0), 0), h - 1), min(max(math.floor(x0), 0), w - 1)
            y1, x1 = max(math.ceil(y1), y0 + 1), max(math.ceil(x1), x0 + 1)
            inside_r = ((rows >= y0) & (rows < y1)).to(probabilities.dtype)
            inside_c = ((cols >= x0) & (cols < x1)).to(probabilities.dtype)
            weights[i] = inside_r[:, None] * inside_c[None, :]
    class_maps = probabilities[detections["labels"]]  # (D, H, W): each detection's class
    agreement = (class_maps * weights).flatten(1).sum(1) / weights.flatten(1).sum(1)
    new = scores.clamp_min(0) ** (1.0 - power) * agreement.clamp_min(0) ** power
    order = torch.argsort(new, descending=True, stable=True)
    out = {k: (v[order] if torch.is_tensor(v) and len(v) == len(scores) else v)
           for k, v in detections.items()}
    out["scores"] = new[order].to(scores.dtype)
    return out
