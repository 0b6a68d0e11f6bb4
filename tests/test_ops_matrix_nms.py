"""Matrix NMS and greedy mask NMS: exact hand-computed cases, a sequential reference written from
the paper's equations, torchvision's box NMS on rectangle masks, and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from pixelwise.errors import UserError
from pixelwise.ops import (
    DECAY_KERNELS,
    mask_iou_matrix,
    mask_nms,
    matrix_nms,
    matrix_nms_decay,
    matrix_nms_scores,
)


def strip_masks(spans: list[tuple[int, int]], width: int = 10) -> torch.Tensor:
    """(N, 1, width) float64 masks, mask k covering columns spans[k] = [a, b)."""
    masks = torch.zeros(len(spans), 1, width, dtype=torch.float64)
    for k, (a, b) in enumerate(spans):
        masks[k, 0, a:b] = 1
    return masks


# A: columns 0-3, B: 2-5, C: 3-7.  IoU(A,B) = 2/6, IoU(A,C) = 1/8, IoU(B,C) = 3/6.
SPANS = [(0, 4), (2, 6), (3, 8)]
SCORES = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)


def test_mask_iou_exact() -> None:
    iou = mask_iou_matrix(strip_masks(SPANS))
    expected = torch.tensor([[1, 1 / 3, 1 / 8], [1 / 3, 1, 1 / 2], [1 / 8, 1 / 2, 1]],
                            dtype=torch.float64)
    torch.testing.assert_close(iou, expected, rtol=0, atol=1e-15)


def test_mask_iou_matches_box_iou_on_rectangles() -> None:
    masks, boxes = random_rectangles(torch.Generator().manual_seed(1), 25, 20, 24)
    torch.testing.assert_close(mask_iou_matrix(masks),
                               torchvision.ops.box_iou(boxes, boxes), rtol=0, atol=1e-6)


def test_mask_iou_of_empty_masks_is_zero() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert mask_iou_matrix(masks).eq(0).all()


# decay_B = f(1/3) / f(0);  decay_C = min(f(1/8) / f(0), f(1/2) / f(1/3)).
EXACT = {
    "linear": [1.0, 2 / 3, min(7 / 8, (1 / 2) / (2 / 3))],  # C: 3/4
    "gaussian": [1.0, math.exp(-2 / 9), min(math.exp(-2 / 64), math.exp(-2 / 4 + 2 / 9))],
}


@pytest.mark.parametrize("kernel", DECAY_KERNELS)
def test_exact_three_masks(kernel: str) -> None:
    labels = torch.tensor([1, 1, 1])
    decayed = matrix_nms_scores(strip_masks(SPANS), labels, SCORES, kernel=kernel, sigma=2.0)
    expected = SCORES * torch.tensor(EXACT[kernel], dtype=torch.float64)
    torch.testing.assert_close(decayed, expected, rtol=0, atol=1e-15)
    assert EXACT["linear"][2] == 0.75  # the compensation term picked B's ratio, not A's


def test_compensation_lifts_a_suppressed_neighbour() -> None:
    """C overlaps only B, exactly as much as B overlaps A: B's own decay cancels C's."""
    masks = strip_masks([(0, 4), (2, 6), (4, 8)])  # IoU(A,B) = IoU(B,C) = 1/3, IoU(A,C) = 0
    for kernel in DECAY_KERNELS:
        decayed = matrix_nms_scores(masks, None, SCORES, kernel=kernel)
        assert decayed[2].item() == pytest.approx(0.7, abs=1e-15)
        assert decayed[1].item() < 0.8


@pytest.mark.parametrize("kernel", DECAY_KERNELS)
def test_class_aware(kernel: str) -> None:
    """With C of another class, C keeps its score and A, B are as before."""
    labels = torch.tensor([1, 1, 2])
    decayed = matrix_nms_scores(strip_masks(SPANS), labels, SCORES, kernel=kernel)
    expected = SCORES * torch.tensor([1.0, EXACT[kernel][1], 1.0], dtype=torch.float64)
    torch.testing.assert_close(decayed, expected, rtol=0, atol=1e-15)
    # all of different classes: nothing decays
    torch.testing.assert_close(
        matrix_nms_scores(strip_masks(SPANS), torch.tensor([1, 2, 3]), SCORES, kernel=kernel),
        SCORES)


def test_input_order_does_not_matter() -> None:
    perm = torch.tensor([2, 0, 1])
    masks, labels = strip_masks(SPANS), torch.tensor([1, 1, 1])
    for kernel in DECAY_KERNELS:
        plain = matrix_nms_scores(masks, labels, SCORES, kernel=kernel)
        shuffled = matrix_nms_scores(masks[perm], labels[perm], SCORES[perm], kernel=kernel)
        torch.testing.assert_close(shuffled, plain[perm], rtol=0, atol=1e-15)


def test_duplicates_give_no_nan() -> None:
    """Three identical masks: the linear kernel's compensation 1 - 1 = 0 must not give NaN."""
    masks = strip_masks([(0, 4)] * 3)
    linear = matrix_nms_scores(masks, None, SCORES, kernel="linear")
    torch.testing.assert_close(linear, torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64))
    gaussian = matrix_nms_scores(masks, None, SCORES, kernel="gaussian")
    e = math.exp(-2.0)
    torch.testing.assert_close(gaussian, SCORES * torch.tensor([1.0, e, e], dtype=torch.float64))


# ----------------------------------------------------------------------------- reference


def random_rectangles(gen: torch.Generator, n: int, h: int, w: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """n random axis-aligned rectangles: masks (n, h, w) bool and boxes (n, 4) XYXY whose
    box IoU equals the mask IoU (integer corners, half-open)."""
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for k in range(n):
        x1, y1 = (int(torch.randint(0, s - 2, (1,), generator=gen)) for s in (w, h))
        x2 = x1 + 1 + int(torch.randint(0, w - x1 - 1, (1,), generator=gen))
        y2 = y1 + 1 + int(torch.randint(0, h - y1 - 1, (1,), generator=gen))
        masks[k, y1:y2, x1:x2] = True
        boxes[k] = torch.tensor([x1, y1, x2, y2], dtype=torch.float32)
    return masks, boxes


def reference_matrix_nms(masks: np.ndarray, labels: list[int], scores: list[float],
                         kernel: str, sigma: float) -> list[float]:
    """Eq. 3-4 of the paper, one pair at a time: decay_j = min_{s_i > s_j} f(iou_ij) / f_i with
    f_i = min_{s_k > s_i} f(iou_ki) (f_i = 1 and decay = 1 for an empty minimum)."""
    n = len(scores)

    def f(x: float) -> float:
        return 1.0 - x if kernel == "linear" else math.exp(-sigma * x * x)

    def iou(a: int, b: int) -> float:
        inter = np.logical_and(masks[a], masks[b]).sum()
        union = np.logical_or(masks[a], masks[b]).sum()
        return float(inter / union) if union else 0.0

    order = sorted(range(n), key=lambda i: (-scores[i], i))
    compensation = {}
    for pos, i in enumerate(order):
        higher = [k for k in order[:pos] if labels[k] == labels[i]]
        compensation[i] = min((f(iou(k, i)) for k in higher), default=1.0)
    out = [0.0] * n
    for pos, j in enumerate(order):
        higher = [i for i in order[:pos] if labels[i] == labels[j]]
        decay = min((f(iou(i, j)) / compensation[i] for i in higher), default=1.0)
        out[j] = scores[j] * decay
    return out


def reference_greedy(masks: np.ndarray, labels: list[int], scores: list[float],
                     threshold: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for j in order:
        if all(labels[i] != labels[j] or
               np.logical_and(masks[i], masks[j]).sum() / np.logical_or(masks[i], masks[j]).sum()
               <= threshold for i in keep):
            keep.append(j)
    return keep


@pytest.mark.parametrize("kernel", DECAY_KERNELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sequential_reference(kernel: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    masks, _ = random_rectangles(gen, 40, 16, 16)
    labels = torch.randint(0, 3, (40,), generator=gen)
    scores = torch.rand(40, generator=gen, dtype=torch.float64)
    for sigma in (2.0, 0.5):
        ours = matrix_nms_scores(masks, labels, scores, kernel=kernel, sigma=sigma)
        ref = reference_matrix_nms(masks.numpy(), labels.tolist(), scores.tolist(), kernel, sigma)
        torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
        assert (ours <= scores).all()


def test_soft_and_binary_masks_agree_on_binary_values() -> None:
    masks, _ = random_rectangles(torch.Generator().manual_seed(3), 12, 10, 10)
    scores = torch.rand(12)
    torch.testing.assert_close(matrix_nms_scores(masks, None, scores),
                               matrix_nms_scores(masks.float(), None, scores))


def test_areas_argument_replaces_mask_sums() -> None:
    masks = strip_masks(SPANS)
    areas = masks.sum((1, 2))
    torch.testing.assert_close(matrix_nms_scores(masks, None, SCORES, areas=areas),
                               matrix_nms_scores(masks, None, SCORES))
    # doubled areas halve nothing but change the IoU: the areas are really used
    assert not torch.allclose(matrix_nms_scores(masks, None, SCORES, areas=2 * areas),
                              matrix_nms_scores(masks, None, SCORES))


def test_decay_needs_sorted_candidates_and_reads_upper_triangle() -> None:
    iou = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(matrix_nms_decay(iou, kernel="linear"),
                               torch.tensor([1.0, 0.5], dtype=torch.float64))


# ----------------------------------------------------------------------------- matrix_nms steps


def test_matrix_nms_steps() -> None:
    gen = torch.Generator().manual_seed(4)
    masks, _ = random_rectangles(gen, 30, 16, 16)
    labels = torch.randint(0, 2, (30,), generator=gen)
    scores = torch.rand(30, generator=gen)
    keep, decayed = matrix_nms(masks, labels, scores, pre_nms_top_n=20, score_threshold=0.2,
                               max_detections=7)
    # by hand: top 20, decay, threshold, top 7
    top = torch.argsort(scores, descending=True)[:20]
    full = matrix_nms_scores(masks[top], labels[top], scores[top])
    ok = full >= 0.2
    expect_scores, idx = full[ok].sort(descending=True)
    torch.testing.assert_close(decayed, expect_scores[:7])
    assert keep.tolist() == top[ok][idx][:7].tolist()
    assert keep.dtype == torch.int64


def test_matrix_nms_empty_and_single() -> None:
    keep, scores = matrix_nms(torch.zeros(0, 5, 5), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0))
    assert keep.shape == (0,) and scores.shape == (0,) and keep.dtype == torch.int64
    assert matrix_nms_scores(torch.zeros(0, 5, 5), None, torch.zeros(0)).shape == (0,)
    masks = torch.ones(1, 5, 5)
    keep, scores = matrix_nms(masks, torch.tensor([3]), torch.tensor([0.4]))
    assert keep.tolist() == [0] and scores.tolist() == [pytest.approx(0.4)]
    keep, _ = matrix_nms(masks, torch.tensor([3]), torch.tensor([0.4]), score_threshold=0.5)
    assert keep.numel() == 0


def test_bad_arguments() -> None:
    masks = strip_masks(SPANS)
    with pytest.raises(UserError, match="unknown Matrix NMS kernel 'box'.*gaussian, linear"):
        matrix_nms_scores(masks, None, SCORES, kernel="box")
    with pytest.raises(UserError, match="scores must be"):
        matrix_nms(masks, None, SCORES[:2])
    with pytest.raises(UserError, match=r"masks must be \(N, H, W\)"):
        matrix_nms(masks[0], None, SCORES)
    with pytest.raises(UserError, match="max_detections"):
        matrix_nms(masks, None, SCORES, max_detections=-1)


# ----------------------------------------------------------------------------- greedy mask NMS


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_mask_nms_matches_torchvision_box_nms_on_rectangles(threshold: float) -> None:
    gen = torch.Generator().manual_seed(5)
    masks, boxes = random_rectangles(gen, 60, 24, 24)
    scores = torch.rand(60, generator=gen)
    labels = torch.randint(0, 3, (60,), generator=gen)
    assert mask_nms(masks, scores, threshold).tolist() == \
        torchvision.ops.nms(boxes, scores, threshold).tolist()
    assert mask_nms(masks, scores, threshold, labels=labels).tolist() == \
        torchvision.ops.batched_nms(boxes, scores, labels, threshold).tolist()


def test_mask_nms_matches_reference_on_blobs() -> None:
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(30, 12, 12, generator=gen) > 0.5  # irregular masks, many overlaps
    scores = torch.rand(30, generator=gen)
    labels = torch.randint(0, 2, (30,), generator=gen)
    ours = mask_nms(masks, scores, 0.35, labels=labels).tolist()
    assert ours == reference_greedy(masks.numpy(), labels.tolist(), scores.tolist(), 0.35)
    assert 1 < len(ours) < 30


def test_mask_nms_empty() -> None:
    keep = mask_nms(torch.zeros(0, 3, 3), torch.zeros(0))
    assert keep.shape == (0,) and keep.dtype == torch.int64
