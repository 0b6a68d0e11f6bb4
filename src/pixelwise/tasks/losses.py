"""Dense classification losses for semantic segmentation: cross-entropy, soft Dice, focal.

Each takes logits `(N, K, H, W)` and integer targets `(N, H, W)`; pixels whose target is
`ignore_index` do not count; optional class weights `(K,)`. `LOSSES` names them; a loss spec
`"ce+dice"` sums several (`make_losses`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError, unknown_name


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _weight(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(device=like.device, dtype=like.dtype)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = 255,
    weight: torch.Tensor | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    """`1 - (2 sum p g + s) / (sum p + sum g + s)` per class over the whole batch (p: softmax
    probability, g: one-hot target), averaged over classes (weighted by `weight`).

    Args:
        logits: (N, K, H, W). target: (N, H, W) int64. Returns a scalar.
    """
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)  # (N, K, H, W)
    valid = _valid(target, ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target))
    keep = valid.to(probs.dtype)  # (N, H, W)
    # The sums without a one-hot target (K times the pixels, several full-size products): sum p
    # over valid pixels is one contraction, sum p g gathers each pixel's own class and adds it
    # to that class, sum g counts labels. Equal to the one-hot formula; a U-Net training step
    # (batch 16, 256², 7 classes, CPU) took 0.27 s with the one-hot, 0.24 s with these sums.
    prob_sum = torch.einsum("nkhw,nhw->k", probs, keep)  # (K,)
    own = probs.gather(1, safe.unsqueeze(1)).squeeze(1) * keep  # (N, K, H, W) -> (N, H, W)
    intersection = torch.zeros(num_classes, dtype=probs.dtype, device=probs.device).index_add(
        0, safe.flatten(), own.flatten())  # (K,)
    counts = torch.bincount(safe[valid], minlength=num_classes).to(probs.dtype)  # (K,)
    cardinality = prob_sum + counts  # (K,)
    dice = (2.0 * intersection + smooth) / (cardinality + smooth)  # (K,)
    loss = 1.0 - dice
    w = _weight(weight, loss)
    return loss.mean() if w is None else (loss * w).sum() / w.sum()


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = 255,
    weight: torch.Tensor | None = None,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) for K-way softmax: `-w_t (1 - p_t)^gamma log p_t`, averaged
    over valid pixels with the same normalisation as weighted cross-entropy (sum of `w_t`).
    `gamma = 0` is cross-entropy.

    Args:
        logits: (N, K, H, W). target: (N, H, W) int64. Returns a scalar.
    """
    valid = _valid(target, ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p = logits.log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # (N, H, W)
    p = log_p.exp()
    loss = -((1.0 - p) ** gamma) * log_p  # (N, H, W)
    w = _weight(weight, loss)
    pixel_weight = valid.to(loss.dtype) if w is None else w[safe] * valid.to(loss.dtype)
    return (loss * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


class CrossEntropyLoss(nn.Module):
    """`F.cross_entropy` with ignore index and class weights."""

    def __init__(self, *, ignore_index: int | None = 255, weight: torch.Tensor | None = None):
        super().__init__()
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.weight = weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=_weight(self.weight, logits),
                               ignore_index=self.ignore_index)


class DiceLoss(nn.Module):
    """`soft_dice_loss` as a module."""

    def __init__(self, *, ignore_index: int | None = 255, weight: torch.Tensor | None = None,
                 smooth: float = 1.0):
        super().__init__()
        self.ignore_index, self.weight, self.smooth = ignore_index, weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, target, ignore_index=self.ignore_index, weight=self.weight,
                              smooth=self.smooth)


class FocalLoss(nn.Module):
    """`softmax_focal_loss` as a module."""

    def __init__(self, *, ignore_index: int | None = 255, weight: torch.Tensor | None = None,
                 gamma: float = 2.0):
        super().__init__()
        self.ignore_index, self.weight, self.gamma = ignore_index, weight, gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return softmax_focal_loss(logits, target, ignore_index=self.ignore_index,
                                  weight=self.weight, gamma=self.gamma)


LOSSES: dict[str, type[nn.Module]] = {"ce": CrossEntropyLoss, "dice": DiceLoss, "focal": FocalLoss}


def make_losses(
    spec: str,
    *,
    ignore_index: int | None = 255,
    class_weights: Sequence[float] | None = None,
    num_classes: int | None = None,
) -> dict[str, nn.Module]:
    """`"ce+dice"` -> `{"ce": CrossEntropyLoss(...), "dice": DiceLoss(...)}` (the terms are summed
    by the trainer; each is logged under its name)."""
    names = [name.strip() for name in spec.split("+")]
    for name in names:
        if name not in LOSSES:
            raise unknown_name("loss", name, LOSSES)
    if len(set(names)) != len(names):
        raise UserError(f"loss {spec!r} names a term twice")
    weight = None
    if class_weights is not None:
        if num_classes is not None and len(class_weights) != num_classes:
            raise UserError(f"got {len(class_weights)} class weights for {num_classes} classes")
        if any(w < 0 for w in class_weights) or not any(w > 0 for w in class_weights):
            raise UserError("class weights must be >= 0 and not all zero")
        weight = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
    return {name: LOSSES[name](ignore_index=ignore_index, weight=weight) for name in names}
