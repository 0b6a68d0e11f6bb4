"""Semantic metrics: hand-computed confusion matrices (exact fractions), a naive per-pixel loop,
and the boundary F-score against a naive set-distance loop."""

from __future__ import annotations

from fractions import Fraction as Fr

import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.metrics.boundary import BoundaryFScore
from pixelwise.metrics.semantic import SemanticMetrics, semantic_scores

# rows: ground truth, columns: prediction. Class 2 is absent from both (left out), class 3 is
# predicted once but absent from the ground truth (IoU 0, no accuracy).
HAND_CONFUSION = [
    [6, 2, 0, 1],
    [1, 4, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
]
# worked by hand: t = (9, 5, 0, 0), p = (7, 6, 0, 1), n_ii = (6, 4, 0, 0)
HAND_EXPECTED = {
    "miou": Fr(41, 105),  # (6/10 + 4/7 + 0) / 3
    "pixel_accuracy": Fr(5, 7),  # 10 / 14
    "mean_accuracy": Fr(11, 15),  # (6/9 + 4/5) / 2
    "fw_iou": Fr(289, 490),  # (9 * 3/5 + 5 * 4/7) / 14
    "dice": Fr(65, 132),  # (12/16 + 8/11 + 0) / 3
    "per_class": {
        "bg": {"iou": Fr(3, 5), "dice": Fr(3, 4), "accuracy": Fr(2, 3)},
        "cat": {"iou": Fr(4, 7), "dice": Fr(8, 11), "accuracy": Fr(4, 5)},
        "dog": {"iou": None, "dice": None, "accuracy": None},
        "cow": {"iou": Fr(0), "dice": Fr(0), "accuracy": None},
    },
}
NAMES = ["bg", "cat", "dog", "cow"]


def _pixels_for(confusion: list[list[int]], ignore: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, P) pred / target tensors whose confusion is `confusion`, plus `ignore` ignored px."""
    target, pred = [], []
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            target += [i] * n
            pred += [j] * n
    target += [255] * ignore
    pred += [3] * ignore
    perm = torch.randperm(len(target))
    return torch.tensor(pred)[perm][None, None], torch.tensor(target)[perm][None, None]


def test_hand_confusion_exact_fractions():
    assert semantic_scores(HAND_CONFUSION, NAMES, exact=True) == HAND_EXPECTED


def test_update_builds_the_confusion_and_floats_match_fractions():
    pred, target = _pixels_for(HAND_CONFUSION, ignore=5)
    metric = SemanticMetrics(4, ignore_index=255, class_names=NAMES)
    metric.update(pred, target)
    assert metric.confusion.dtype == torch.int64
    assert metric.confusion.tolist() == HAND_CONFUSION
    got = metric.compute()
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice"):
        assert got[key] == pytest.approx(float(HAND_EXPECTED[key]), abs=1e-15)
    assert got["per_class"]["dog"] == {"iou": None, "dice": None, "accuracy": None}
    assert got["per_class"]["cow"]["iou"] == 0.0


def _naive(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int) -> dict:
    """Per-pixel loop and the FCN formulas written out, with exact fractions."""
    n = [[0] * k for _ in range(k)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != ignore:
            n[t][p] += 1
    t_ = [sum(n[i]) for i in range(k)]
    p_ = [sum(n[j][i] for j in range(k)) for i in range(k)]
    iou = {i: Fr(n[i][i], t_[i] + p_[i] - n[i][i]) for i in range(k) if t_[i] + p_[i] > 0}
    dice = {i: Fr(2 * n[i][i], t_[i] + p_[i]) for i in range(k) if t_[i] + p_[i] > 0}
    acc = {i: Fr(n[i][i], t_[i]) for i in range(k) if t_[i] > 0}
    total = sum(t_)
    return {
        "confusion": n,
        "miou": sum(iou.values()) / len(iou),
        "dice": sum(dice.values()) / len(dice),
        "mean_accuracy": sum(acc.values()) / len(acc),
        "pixel_accuracy": Fr(sum(n[i][i] for i in range(k)), total),
        "fw_iou": sum(t_[i] * iou[i] for i in acc) / total,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 6
    target = torch.randint(0, k - 1, (3, 11, 13), generator=gen)  # class k-1 never in GT
    target[torch.rand(target.shape, generator=gen) < 0.1] = 255
    pred = torch.randint(0, k, (3, 11, 13), generator=gen)
    expected = _naive(pred, target, k, 255)
    metric = SemanticMetrics(k)
    for i in range(3):  # streaming: one image at a time
        metric.update(pred[i], target[i])
    assert metric.confusion.tolist() == expected["confusion"]
    got = metric.compute(exact=True)
    for key in ("miou", "dice", "mean_accuracy", "pixel_accuracy", "fw_iou"):
        assert got[key] == expected[key], key


def test_logits_merge_and_reset():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 6, 7, generator=gen)  # (N, K, H, W)
    target = torch.randint(0, 5, (4, 6, 7), generator=gen)
    whole = SemanticMetrics(5)
    whole.update(logits, target)
    labels = SemanticMetrics(5)
    labels.update(logits.argmax(1), target)
    assert torch.equal(whole.confusion, labels.confusion)
    a, b = SemanticMetrics(5), SemanticMetrics(5)
    a.update(logits[:2], target[:2])
    b.update(logits[2:], target[2:])
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    single = SemanticMetrics(5)
    single.update(logits[0], target[0])  # (K, H, W) logits of one image
    assert single.confusion.sum() == 6 * 7
    whole.reset()
    assert whole.confusion.sum() == 0


def test_nothing_counted_gives_none():
    metric = SemanticMetrics(3)
    metric.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    got = metric.compute()
    assert [got[k] for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice")] == [
        None
    ] * 5


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 3), "target label 3"),
        (torch.full((2, 2), 7), torch.zeros(2, 2, dtype=torch.long), "predicted label 7"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), "shape"),
        (torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), "4 classes"),
    ],
)
def test_bad_input(pred, target, message):
    with pytest.raises(UserError, match=message):
        SemanticMetrics(3).update(pred, target)


def test_class_names_checked():
    with pytest.raises(UserError, match="2 class names for 3"):
        SemanticMetrics(3, class_names=["a", "b"])
    with pytest.raises(UserError, match="duplicate"):
        SemanticMetrics(2, class_names=["a", "a"])


# ---------------------------------------------------------------------------------------------
# boundary F-score


def _naive_boundary(pred, target, k, tol, ignore=255):
    """Sets of boundary pixels and nearest-distance matching by brute force."""
    counts = [[0, 0, 0, 0] for _ in range(k)]
    image_scores = []
    for p_img, t_img in zip(pred.tolist(), target.tolist()):
        h, w = len(t_img), len(t_img[0])

        def edge(img, y, x, h=h, w=w):
            return any(
                0 <= y + dy < h and 0 <= x + dx < w and img[y + dy][x + dx] != img[y][x]
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
            )

        fs = []
        for c in range(k):
            gb = [
                (y, x) for y in range(h) for x in range(w) if t_img[y][x] == c and edge(t_img, y, x)
            ]
            pb = [
                (y, x)
                for y in range(h)
                for x in range(w)
                if p_img[y][x] == c and edge(p_img, y, x) and t_img[y][x] != ignore
            ]

            def near(a, pts):
                return any((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 <= tol**2 for b in pts)

            ph = sum(near(a, gb) for a in pb)
            gh = sum(near(a, pb) for a in gb)
            for i, v in enumerate((ph, len(pb), gh, len(gb))):
                counts[c][i] += v
            if pb or gb:
                prec = ph / len(pb) if pb else 0.0
                rec = gh / len(gb) if gb else 0.0
                fs.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        if fs:
            image_scores.append(sum(fs) / len(fs))
    return counts, sum(image_scores) / len(image_scores)


@pytest.mark.parametrize("tol", [0, 1, 2])
def test_boundary_against_naive(tol):
    gen = torch.Generator().manual_seed(tol)
    k = 3
    # blocky random maps (upsampled 3x3 noise) so that boundaries are lines, not everywhere
    target = torch.randint(0, k, (2, 4, 4), generator=gen)
    target = target.repeat_interleave(3, 1).repeat_interleave(3, 2)  # (2, 12, 12)
    pred = target.clone()
    pred[:, 1:, :] = target[:, :-1, :]  # shifted by one row
    pred[0, 2:4, 2:9] = 2
    target[1, 0:3, 0:3] = 255
    counts, expected_f = _naive_boundary(pred, target, k, tol)
    metric = BoundaryFScore(k, tolerance=tol)
    metric.update(pred[0], target[0])
    metric.update(pred[1:], target[1:])
    assert metric.counts.T.tolist() == counts
    got = metric.compute()
    assert got["boundary_f"] == pytest.approx(expected_f, abs=1e-12)
    for c, (ph, pn, gh, gn) in enumerate(counts):
        assert got["per_class"][str(c)]["precision"] == (ph / pn if pn else None)
        assert got["per_class"][str(c)]["recall"] == (gh / gn if gn else None)


def test_boundary_perfect_and_shift():
    target = torch.zeros(10, 10, dtype=torch.long)
    target[:, 5:] = 1
    perfect = BoundaryFScore(2, tolerance=0)
    perfect.update(target, target)
    assert perfect.compute()["boundary_f"] == 1.0
    shifted = torch.zeros_like(target)
    shifted[:, 7:] = 1  # the edge moved by 2 px
    for tol in (0, 1, 2):
        metric = BoundaryFScore(2, tolerance=tol)
        metric.update(shifted, target)
        f = metric.compute()["boundary_f"]
        # boundary columns: target 4|5, shifted 6|7; distances 2 (for 4<->6, 5<->7)
        assert f == (1.0 if tol >= 2 else 0.0)
