"""SOLOv2 losses: focal loss on the category grids, Dice loss on the masks of positive cells.

    L = L_cate + dice_weight * L_mask       (paper: dice_weight 3)

* L_cate: `torchvision.ops.sigmoid_focal_loss` (alpha 0.25, gamma 2) over every grid cell and
  class of every level, summed and divided by (number of positive cells + 1), as the official code.
* L_mask: mean over the positive cells of the batch of the Dice loss
  1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 0.001) of the predicted probabilities p and targets t
  (Milletari et al.'s squared form with the official code's 0.001 smoothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from pixelwise.models.solov2_targets import LevelTargets


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 0.001) -> torch.Tensor:
    """Per-mask Dice loss: probs, targets (P, H, W) in [0, 1] -> (P,)."""
    p = probs.reshape(probs.shape[0], -1)  # (P, H, W) -> (P, H*W)
    t = targets.reshape(targets.shape[0], -1).to(p.dtype)  # (P, H, W) -> (P, H*W)
    inter = (p * t).sum(1)
    return 1 - 2 * inter / ((p * p).sum(1) + (t * t).sum(1) + eps)


def category_loss(cate_logits: Sequence[torch.Tensor],
                  targets: Sequence[Sequence[LevelTargets]], num_positive: int, *,
                  alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of the category grids.

    cate_logits: per level (N, K, S, S); targets: per image, per level; num_positive: the
    batch's positive cells (the normaliser is num_positive + 1)."""
    num_things = cate_logits[0].shape[1]
    logits, labels = [], []
    for level, cate in enumerate(cate_logits):
        logits.append(cate.permute(0, 2, 3, 1).reshape(-1, num_things))  # (N*S*S, K)
        labels.append(torch.stack([t[level].labels.flatten() for t in targets]).flatten())
    logits_all = torch.cat(logits)  # (sum N*S*S, K)
    labels_all = torch.cat(labels)  # (sum N*S*S,) 0 = background, 1..K
    one_hot = F.one_hot(labels_all, num_things + 1)[:, 1:].to(logits_all.dtype)  # drop bg
    loss = sigmoid_focal_loss(logits_all, one_hot, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / (num_positive + 1)
