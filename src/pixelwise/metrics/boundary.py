"""Boundary F-score (BF, Csurka et al. 2013; the "BF" column of the SegNet paper), streaming.

Definitions used here:

* **Boundary pixel** of class c in a label map: a pixel of class c with at least one 4-neighbour
  (up, down, left, right) of a different label. The image border is not a boundary. In the
  ground truth, ``ignore_index`` is a label of its own (so a class next to an ignore band has a
  boundary there) but has no boundary of its own; prediction boundary pixels that fall on
  ground-truth ignore pixels are not scored.
* **Match within a tolerance**: a boundary pixel is matched if a boundary pixel of the same class
  in the other map lies within Euclidean distance ``tolerance`` pixels (a disk of that radius;
  ``tolerance=0`` needs the same pixel).
* Per image and class: precision = matched prediction boundary / prediction boundary, recall =
  matched ground-truth boundary / ground-truth boundary, F = 2PR / (P + R) (0 when either side has
  no boundary or P + R = 0). Classes with no boundary on either side are left out.
* ``boundary_f``: the mean over images of the per-image mean F over its classes (Csurka's BF).
  ``per_class``: precision / recall / F from the counts pooled over the whole dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.metrics.semantic import _check_class_names
from pixelwise.ops.labels import argmax_labels

logger = logging.getLogger(__name__)


def boundary_mask(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) labels -> (H, W) bool, True where a 4-neighbour has a different label."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    vertical = labels[1:, :] != labels[:-1, :]  # (H-1, W)
    horizontal = labels[:, 1:] != labels[:, :-1]  # (H, W-1)
    out[1:, :] |= vertical
    out[:-1, :] |= vertical
    out[:, 1:] |= horizontal
    out[:, :-1] |= horizontal
    return out


def _disk(radius: int, device: torch.device) -> torch.Tensor:
    """(1, 1, 2r+1, 2r+1) float kernel, 1 inside the Euclidean disk of the radius."""
    r = torch.arange(-radius, radius + 1, device=device)
    disk = (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2  # (2r+1, 2r+1)
    return disk.float()[None, None]


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """(K, H, W) bool -> (K, H, W) bool dilated by a disk of the radius (one conv per class)."""
    if radius == 0:
        return masks
    x = masks.float().unsqueeze(1)  # (K, 1, H, W): classes as a batch
    hit = F.conv2d(x, _disk(radius, masks.device), padding=radius)  # (K, 1, H, W)
    return hit.squeeze(1) > 0.5  # (K, H, W)


class BoundaryFScore:
    """Streaming boundary F-score over K classes (definitions in the module doc).

    Args:
        num_classes: K; valid labels are 0 .. K-1.
        tolerance: match radius in pixels (integer >= 0; 2 by default).
        ignore_index: ground-truth value that is not scored (``None``: none).
        class_names: K names for ``per_class``.
    """

    def __init__(
        self,
        num_classes: int,
        tolerance: int = 2,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}")
        if int(tolerance) != tolerance or tolerance < 0:
            raise UserError(f"boundary tolerance must be an integer >= 0 pixels, got {tolerance}")
        self.num_classes = int(num_classes)
        self.tolerance = int(tolerance)
        self.ignore_index = ignore_index
        self.class_names = _check_class_names(class_names, self.num_classes)
        # pooled counts per class: matched prediction, prediction, matched GT, GT boundary pixels
        self.counts = torch.zeros(4, self.num_classes, dtype=torch.int64)
        self.image_f_sum = 0.0
        self.num_images = 0

    def reset(self) -> None:
        self.counts.zero_()
        self.image_f_sum = 0.0
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Score a batch: pred / target (N, H, W) or (H, W) labels; pred may be logits
        (N, K, H, W) / (K, H, W)."""
        target = torch.as_tensor(target)
        pred = torch.as_tensor(pred, device=target.device)
        k = self.num_classes
        if pred.is_floating_point():
            pred = argmax_labels(pred, pred.dim() - 3)  # (N, K, H, W) -> (N, H, W)
        if pred.shape != target.shape:
            raise UserError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if target.dim() == 2:
            pred, target = pred[None], target[None]  # (1, H, W)
        pred, target = pred.long(), target.long()
        ignore = (
            target == self.ignore_index
            if self.ignore_index is not None
            else torch.zeros_like(target, dtype=torch.bool)
        )
        bad = (~ignore & ((target < 0) | (target >= k))) | (pred < 0) | (pred >= k)
        if bool(bad.any()):
            raise UserError(f"labels outside [0, {k}) (ignore_index {self.ignore_index})")
        if self.counts.device != target.device:
            self.counts = self.counts.to(target.device)
        classes = torch.arange(k, device=target.device)[:, None, None]  # (K, 1, 1)
        for gt_img, pred_img, ign in zip(target, pred, ignore):  # one (H, W) image at a time
            gt_b = boundary_mask(gt_img) & (gt_img == classes)  # (K, H, W); ignore is no class
            pred_b = boundary_mask(pred_img) & (pred_img == classes) & ~ign  # (K, H, W)
            pred_hit = (pred_b & _dilate(gt_b, self.tolerance)).sum(dim=(1, 2))  # (K,)
            gt_hit = (gt_b & _dilate(pred_b, self.tolerance)).sum(dim=(1, 2))  # (K,)
            stats = torch.stack([pred_hit, pred_b.sum(dim=(1, 2)), gt_hit, gt_b.sum(dim=(1, 2))])
            self.counts += stats  # (4, K)
            f = _f_scores(stats)
            if f.numel():
                self.image_f_sum += float(f.mean())
                self.num_images += 1

    def merge(self, other: BoundaryFScore) -> BoundaryFScore:
        """Add another shard's counts (same K and tolerance); returns self."""
        if (other.num_classes, other.tolerance) != (self.num_classes, self.tolerance):
            raise UserError("cannot merge boundary F-scores with different classes or tolerance")
        self.counts += other.counts.to(self.counts.device)
        self.image_f_sum += other.image_f_sum
        self.num_images += other.num_images
        return self

    def compute(self) -> dict[str, Any]:
        """``{boundary_f, tolerance, per_class: name -> {precision, recall, f}}`` (None where
        undefined)."""
        pred_hit, pred_n, gt_hit, gt_n = self.counts.cpu().tolist()
        per_class = {}
        for name, ph, pn, gh, gn in zip(self.class_names, pred_hit, pred_n, gt_hit, gt_n):
            precision = ph / pn if pn else None
            recall = gh / gn if gn else None
            if pn == 0 and gn == 0:
                f = None
            elif not precision or not recall:
                f = 0.0
            else:
                f = 2 * precision * recall / (precision + recall)
            per_class[name] = {"precision": precision, "recall": recall, "f": f}
        return {
            "boundary_f": self.image_f_sum / self.num_images if self.num_images else None,
            "tolerance": self.tolerance,
            "per_class": per_class,
        }


def _f_scores(stats: torch.Tensor) -> torch.Tensor:
    """(4, K) counts of one image -> F of the classes with a boundary on either side, (K',)."""
    pred_hit, pred_n, gt_hit, gt_n = stats.double()
    present = (pred_n > 0) | (gt_n > 0)
    precision = torch.where(pred_n > 0, pred_hit / pred_n.clamp(min=1), 0.0)
    recall = torch.where(gt_n > 0, gt_hit / gt_n.clamp(min=1), 0.0)
    denom = precision + recall
    f = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
    return f[present]
