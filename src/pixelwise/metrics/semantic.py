"""Semantic segmentation metrics from one streaming confusion matrix.

``n[i, j]`` counts the pixels of ground-truth class ``i`` predicted as class ``j``; ``t_i = sum_j
n[i, j]`` (ground-truth pixels of class i), ``p_i = sum_j n[j, i]`` (predicted pixels of class i).
The FCN paper's four numbers (Long et al. 2015, Sec. 5; the arXiv version's corrected f.w. IU):

* pixel accuracy       ``sum_i n_ii / sum_i t_i``
* mean accuracy        ``mean_i n_ii / t_i``
* mean IoU             ``mean_i n_ii / (t_i + p_i - n_ii)``
* frequency-weighted   ``(sum_k t_k)^-1 sum_i t_i n_ii / (t_i + p_i - n_ii)``

plus Dice ``2 n_ii / (t_i + p_i)``. Conventions (those of the FCN ``score.py`` recipe, with
``nanmean`` over classes), for classes that are missing:

* a class absent from both ground truth and prediction (``t_i + p_i = 0``) has no IoU / Dice
  (``None``) and is left out of mIoU and mean Dice;
* a class predicted but absent from the ground truth (``t_i = 0 < p_i``) counts with IoU 0 and
  Dice 0;
* mean accuracy averages over the classes present in the ground truth (``t_i > 0``) only.

Pixels whose target is ``ignore_index`` are dropped before counting. The confusion matrix is an
int64 tensor (``.confusion``), so shards can be summed (``merge``, or an all-reduce under DDP).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch

from pixelwise.errors import UserError
from pixelwise.ops.labels import argmax_labels

logger = logging.getLogger(__name__)


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise UserError(f"got {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise UserError(f"duplicate class names: {', '.join(duplicates)}")
    return names


def semantic_scores(
    confusion: torch.Tensor | Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
    *,
    exact: bool = False,
) -> dict[str, Any]:
    """All semantic scores from a confusion matrix (rows: ground truth, columns: prediction).

    Args:
        confusion: (K, K) non-negative integer counts.
        class_names: K names used as keys of ``per_class`` (default ``"0" ... "K-1"``).
        exact: return ``fractions.Fraction`` values instead of floats.
    Returns:
        ``{miou, pixel_accuracy, mean_accuracy, fw_iou, dice, per_class}`` where ``per_class`` maps
        a name to ``{iou, dice, accuracy}``; undefined values (see the module doc) are ``None``.
    """
    matrix = torch.as_tensor(confusion, dtype=torch.int64).cpu()
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UserError(f"confusion matrix must be square (K, K), got shape {tuple(matrix.shape)}")
    names = _check_class_names(class_names, matrix.shape[0])
    # The reductions are vectorised; the per-class arithmetic below runs over K Python ints so that
    # the same code gives exact Fractions (for tests) or correctly rounded floats.
    hits = matrix.diagonal().tolist()
    gt_count = matrix.sum(dim=1).tolist()  # t_i
    pred_count = matrix.sum(dim=0).tolist()  # p_i

    def div(a: int | Fraction, b: int | Fraction) -> float | Fraction:
        return Fraction(a) / b if exact else a / b

    def mean(values: list) -> float | Fraction | None:
        return div(sum(values), len(values)) if values else None

    per_class: dict[str, dict[str, Any]] = {}
    ious, dices, accs, weighted = [], [], [], []
    for name, n_ii, t_i, p_i in zip(names, hits, gt_count, pred_count):
        iou = div(n_ii, t_i + p_i - n_ii) if t_i + p_i > 0 else None
        dice = div(2 * n_ii, t_i + p_i) if t_i + p_i > 0 else None
        acc = div(n_ii, t_i) if t_i > 0 else None
        per_class[name] = {"iou": iou, "dice": dice, "accuracy": acc}
        if iou is not None:
            ious.append(iou)
            dices.append(dice)
        if acc is not None:
            accs.append(acc)
            weighted.append(t_i * iou)  # classes with t_i = 0 have weight 0
    total = sum(gt_count)
    return {
        "miou": mean(ious),
        "pixel_accuracy": div(sum(hits), total) if total else None,
        "mean_accuracy": mean(accs),
        "fw_iou": div(sum(weighted), total) if total else None,
        "dice": mean(dices),
        "per_class": per_class,
    }


class SemanticMetrics:
    """Streaming confusion matrix for semantic segmentation (see the module doc for formulas).

    Args:
        num_classes: K; valid labels are 0 .. K-1.
        ignore_index: target value whose pixels are not counted (``None``: every pixel counts).
        class_names: K names for ``per_class`` (default ``"0" ... "K-1"``).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = _check_class_names(class_names, self.num_classes)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: (N, H, W) or (H, W) integer labels, or logits (N, K, H, W) / (K, H, W)
                (floating point; reduced by argmax over K).
            target: (N, H, W) or (H, W) integer labels, ``ignore_index`` where unlabelled.
        """
        target = torch.as_tensor(target)
        pred = torch.as_tensor(pred, device=target.device)
        k = self.num_classes
        if pred.is_floating_point():
            if pred.dim() != target.dim() + 1:
                raise UserError(
                    f"logits must have one more dimension than the target, got "
                    f"{tuple(pred.shape)} for target {tuple(target.shape)}"
                )
            class_dim = pred.dim() - 3  # (N, K, H, W) -> 1, (K, H, W) -> 0
            if pred.shape[class_dim] != k:
                raise UserError(f"logits have {pred.shape[class_dim]} classes, expected {k}")
            pred = argmax_labels(pred, class_dim)
        if pred.shape != target.shape:
            raise UserError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if target.is_floating_point():
            raise UserError(f"target must hold integer labels, got {target.dtype}")
        target = target.reshape(-1).long()  # (P,) all pixels of the batch
        pred = pred.reshape(-1).long()  # (P,)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, pred = target[keep], pred[keep]
        bad_target = (target < 0) | (target >= k)
        bad = bad_target | (pred < 0) | (pred >= k)
        if bool(bad.any()):
            if bool(bad_target.any()):
                which = f"target label {int(target[bad_target][0])}"
            else:
                which = f"predicted label {int(pred[bad][0])}"
            raise UserError(f"{which} is outside [0, {k}) (ignore_index {self.ignore_index})")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)  # (K, K)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def merge(self, other: SemanticMetrics) -> SemanticMetrics:
        """Add another shard's counts into this one (same K); returns self."""
        if other.num_classes != self.num_classes:
            raise UserError(
                f"cannot merge metrics over {other.num_classes} classes into {self.num_classes}"
            )
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def compute(self, *, exact: bool = False) -> dict[str, Any]:
        """``{miou, pixel_accuracy, mean_accuracy, fw_iou, dice, per_class}`` (see
        :func:`semantic_scores`)."""
        return semantic_scores(self.confusion, self.class_names, exact=exact)
