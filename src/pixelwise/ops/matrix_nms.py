"""Matrix NMS (SOLOv2, Wang et al. 2020, Eq. 3-4) and greedy mask NMS, vectorised in torch.

Matrix NMS decays every candidate's score at once instead of removing candidates one by one.
With the candidates sorted by descending score and only same-class pairs interacting:

    decay_j = min_{i: s_i > s_j} f(iou_ij) / f(iou_{.,i})
    f(iou_{.,i}) = min_{k: s_k > s_i} f(iou_ki)
    s_j <- s_j * decay_j

`f(iou_{.,i})` is the compensation term: how much mask i is itself suppressed by its most
overlapping higher-scored mask (the column-wise max of the upper-triangular IoU matrix). A mask
with no higher-scored mask of its class keeps its score (decay 1). Kernels (`DECAY_KERNELS`):

    linear    f(iou) = 1 - iou
    gaussian  f(iou) = exp(-sigma * iou^2)     (the official code's convention, sigma = 2.0;
                                                the paper writes exp(-iou^2 / sigma), sigma = 0.5)

The numbers are those of the official implementation (WXinlong/SOLO, ``matrix_nms.py``): there
the pairs that do not interact get f(0) / f(iou_{.,i}) >= 1 and the minimum runs over every
row, which equals the formula above with an empty minimum read as 1. Here those pairs are
masked out explicitly and the decay is capped at 1. One difference: for the linear kernel a
fully suppressed mask i (iou_{.,i} = 1) makes the official code divide by zero (NaN when
iou_ij = 1 too); here the denominator is clamped to the smallest positive float, so mask i then
has no influence (its ratio is +inf or, for iou_ij = 1, 0 -- which the mask that suppressed i
already imposes on j).

`mask_nms` is the traditional greedy (hard) NMS on mask IoU, the baseline of the paper's
Table 3(c): the IoU matrix is one matrix product as well, but the suppression pass is sequential.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pixelwise.errors import UserError, unknown_name

Kernel = Callable[[torch.Tensor, float], torch.Tensor]


def _linear(iou: torch.Tensor, sigma: float) -> torch.Tensor:
    return 1.0 - iou


def _gaussian(iou: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-sigma * iou.square())


# name -> f(iou, sigma), the decay function of Matrix NMS (sigma is used by "gaussian" only)
DECAY_KERNELS: dict[str, Kernel] = {"linear": _linear, "gaussian": _gaussian}


# ----------------------------------------------------------------------------- checks


def _check_inputs(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None,
                  areas: torch.Tensor | None, op: str) -> None:
    if masks.dim() != 3:
        raise UserError(f"{op}: masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n = masks.shape[0]
    for name, value in (("scores", scores), ("labels", labels), ("areas", areas)):
        if value is not None and tuple(value.shape) != (n,):
            raise UserError(f"{op}: {name} must be ({n},) like the masks, got {tuple(value.shape)}")


def _check_count(value: int | None, name: str, op: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UserError(f"{op}: {name} must be a non-negative integer or None, got {value!r}")


# ----------------------------------------------------------------------------- IoU


def mask_iou_matrix(masks: torch.Tensor, areas: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of every pair of masks: (N, H, W) bool / {0, 1} / soft float -> (N, N) float.

    Intersection is the dot product of the flattened masks (one matrix product), union
    area_i + area_j - inter; `areas` (N,) defaults to the mask sums. Two empty masks have IoU 0.
    """
    n = masks.shape[0]
    dtype = masks.dtype if masks.is_floating_point() else torch.float32
    flat = masks.reshape(n, -1).to(dtype)  # (N, H, W) -> (N, H*W)
    inter = flat @ flat.T  # (N, N)
    area = flat.sum(1) if areas is None else areas.to(dtype)
    union = area[:, None] + area[None, :] - inter  # (N, N)
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(dtype).tiny),
                       torch.zeros((), dtype=dtype, device=masks.device))


# ----------------------------------------------------------------------------- Matrix NMS


def matrix_nms_decay(iou: torch.Tensor, labels: torch.Tensor | None = None, *,
                     kernel: str = "gaussian", sigma: float = 2.0) -> torch.Tensor:
    """The decay coefficients (N,) of candidates already sorted by descending score.

    iou: (N, N) mask IoU in that order; labels: (N,) class of each (None: one class).
    Only the upper triangle (i above j) of same-class pairs is read.
    """
    if kernel not in DECAY_KERNELS:
        raise unknown_name("Matrix NMS kernel", kernel, DECAY_KERNELS)
    f = DECAY_KERNELS[kernel]
    n = iou.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=iou.device).triu(diagonal=1)  # i < j
    if labels is not None:
        upper &= labels[:, None] == labels[None, :]
    iou = iou.masked_fill(~upper, 0.0)  # (N, N): iou_ij for interacting pairs, else 0
    compensate = iou.max(dim=0).values  # (N,): iou_{.,i}, the most overlapping higher mask of i
    denominator = f(compensate, sigma).clamp_min(torch.finfo(iou.dtype).tiny)  # (N,) per row i
    ratio = f(iou, sigma) / denominator[:, None]  # (N, N): f(iou_ij) / f(iou_{.,i})
    ratio = ratio.masked_fill(~upper, math.inf)
    return ratio.min(dim=0).values.clamp(max=1.0)  # (N,): min over i above j; none -> 1


def matrix_nms_scores(masks: torch.Tensor, labels: torch.Tensor | None, scores: torch.Tensor, *,
                      kernel: str = "gaussian", sigma: float = 2.0,
                      areas: torch.Tensor | None = None) -> torch.Tensor:
    """Decayed scores (N,) in the input order (any order: sorted inside, ties by index).

    masks (N, H, W) bool / float; labels (N,) int or None (class-agnostic); scores (N,);
    areas (N,) optional precomputed mask areas (e.g. of the binarised masks).
    """
    _check_inputs(masks, scores, labels, areas, "matrix_nms")
    if masks.shape[0] == 0:
        return scores.new_zeros(0)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = mask_iou_matrix(masks[order], None if areas is None else areas[order])
    decay = matrix_nms_decay(iou, None if labels is None else labels[order],
                             kernel=kernel, sigma=sigma)
    decayed = torch.empty_like(scores)
    decayed[order] = scores[order] * decay.to(scores.dtype)
    return decayed


def matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor | None,
    scores: torch.Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    areas: torch.Tensor | None = None,
    pre_nms_top_n: int | None = None,
    score_threshold: float = 0.0,
    max_detections: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix NMS with SOLOv2's test-time steps. Returns (keep, decayed scores).

    masks (N, H, W) bool / float, labels (N,) int (None: class-agnostic), scores (N,) in any
    order. Steps: keep the `pre_nms_top_n` highest scores (SOLOv2's nms_pre, 500), decay them,
    drop decayed scores below `score_threshold` (update_thr, 0.05), keep the `max_detections`
    highest (max_per_img, 100). keep: (M,) int64 indices into the inputs, by decayed score
    descending; scores: (M,) their decayed scores.
    """
    _check_inputs(masks, scores, labels, areas, "matrix_nms")
    _check_count(pre_nms_top_n, "pre_nms_top_n", "matrix_nms")
    _check_count(max_detections, "max_detections", "matrix_nms")
    order = torch.argsort(scores, descending=True, stable=True)
    if pre_nms_top_n is not None:
        order = order[:pre_nms_top_n]
    if order.numel() == 0:
        return order, scores.new_zeros(0)
    iou = mask_iou_matrix(masks[order], None if areas is None else areas[order])
    decay = matrix_nms_decay(iou, None if labels is None else labels[order],
                             kernel=kernel, sigma=sigma)
    decayed = scores[order] * decay.to(scores.dtype)
    kept = decayed >= score_threshold
    order, decayed = order[kept], decayed[kept]
    resort = torch.argsort(decayed, descending=True, stable=True)
    if max_detections is not None:
        resort = resort[:max_detections]
    return order[resort], decayed[resort]


# ----------------------------------------------------------------------------- greedy NMS


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, *,
             labels: torch.Tensor | None = None, areas: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Greedy (hard) NMS on mask IoU, the classic baseline: keep (M,) int64, by score descending.

    Walks the candidates from the highest score; each one not yet suppressed is kept and
    suppresses every lower-scored one (of its class when `labels` is given) whose mask IoU with
    it is > iou_threshold, as `torchvision.ops.nms` does for boxes (torchvision has no mask
    NMS, hence this function). The IoU matrix is one matrix product; the walk is the sequential
    part Matrix NMS removes.
    """
    _check_inputs(masks, scores, labels, areas, "mask_nms")
    order = torch.argsort(scores, descending=True, stable=True)
    if order.numel() == 0:
        return order
    iou = mask_iou_matrix(masks[order], None if areas is None else areas[order])
    keep = greedy_nms_from_iou(iou, iou_threshold, None if labels is None else labels[order])
    return order[keep]


def greedy_nms_from_iou(iou: torch.Tensor, iou_threshold: float,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy walk of `mask_nms` on candidates already sorted by descending score.

    iou: (N, N) in that order; labels: (N,) or None. Returns kept positions (M,) int64, ascending.
    """
    over = iou > iou_threshold  # (N, N)
    if labels is not None:
        over &= labels[:, None] == labels[None, :]
    # The walk on a numpy copy: N tiny steps, each far cheaper as numpy than as torch calls.
    over_np = over.cpu().numpy()
    removed = np.zeros(len(over_np), dtype=bool)
    kept = []
    for i in range(len(over_np)):
        if not removed[i]:
            kept.append(i)
            removed |= over_np[i]
    return torch.as_tensor(kept, dtype=torch.int64, device=iou.device)
