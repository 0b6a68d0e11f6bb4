"""Benchmark: Matrix NMS against greedy (hard) mask NMS on 500 candidate masks, same run.

    .venv/bin/python benchmarks/matrix_nms.py [--candidates 500] [--sizes 128x128 200x336]
        [--repeats 5] [--threads 2] [--device cpu] [--seed 0]

Candidates look like SOLOv2's before NMS: ~40 objects (ellipses of log-uniform sizes), each
predicted by several grid cells as jittered near-duplicates (dilated / shifted / clipped copies),
plus some noise blobs; 10 classes; scores from a Beta distribution. Masks are bool at the mask
branch's 1/4 resolution (128x128 for a 512x512 image, 200x336 for COCO's 800x1333).

Methods, all from the same masks:

* ``matrix_nms``           `pixelwise.ops.matrix_nms` (IoU matrix + parallel decay), Gaussian
  sigma 2, update_thr 0.05, max 100 -- the whole post-processing step;
* ``greedy mask NMS``      `pixelwise.ops.mask_nms` (IoU 0.5): the same IoU matrix, then the
  sequential walk;
* ``greedy, IoU per step`` the textbook loop (torch): take the best remaining mask, compute its
  IoU with the rest, drop those above the threshold -- one mask-vs-all product per kept mask.

and the parts: ``IoU matrix`` (`mask_iou_matrix`, shared by the first two), ``decay`` (Matrix
NMS's parallel step given the IoU matrix, `matrix_nms_decay`) and ``walk`` (greedy's sequential
step given the IoU matrix, `greedy_nms_from_iou`).

Timed interleaved (the order rotates each repeat), median of the repeats, so a shared machine's
load hits all alike. The paper (Table 3c, V100) reports Matrix NMS < 1 ms vs Hard-NMS 9 ms.
The two greedy variants must keep the same masks (checked).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pixelwise.ops import (
    greedy_nms_from_iou,
    mask_iou_matrix,
    mask_nms,
    matrix_nms,
    matrix_nms_decay,
)


def make_candidates(n: int, h: int, w: int, gen: torch.Generator, num_classes: int = 10
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """masks (n, h, w) bool, labels (n,), scores (n,): clusters of near-duplicate ellipses."""
    yy = torch.arange(h, dtype=torch.float32)[:, None]  # (h, 1)
    xx = torch.arange(w, dtype=torch.float32)[None, :]  # (1, w)
    objects = max(1, n // 12)
    masks, labels = [], []
    side = min(h, w)
    for k in range(n):
        obj = k % objects if k < n - n // 10 else None  # the last 10 %: noise blobs
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        if obj is None:
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            ry = rx = 2 + 4 * float(torch.rand(1, generator=g))
            label = int(torch.randint(0, num_classes, (1,), generator=g))
        else:
            og = torch.Generator().manual_seed(1000 + obj)  # the object's own parameters
            cy, cx = float(torch.rand(1, generator=og)) * h, float(torch.rand(1, generator=og)) * w
            r = math.exp(math.log(3) + float(torch.rand(1, generator=og)) * math.log(side / 8))
            ry, rx = r * (0.6 + 0.8 * float(torch.rand(1, generator=og))), r
            label = int(torch.randint(0, num_classes, (1,), generator=og))
            jitter = 0.15 * r
            cy += jitter * float(torch.randn(1, generator=g))
            cx += jitter * float(torch.randn(1, generator=g))
            scale = 1 + 0.2 * float(torch.randn(1, generator=g))
            ry, rx = max(1.5, ry * scale), max(1.5, rx * scale)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)  # (h, w) bool
        labels.append(label)
    scores = torch.distributions.Beta(2.0, 3.0).sample((n,))
    return torch.stack(masks), torch.tensor(labels), scores


def greedy_per_step(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """The textbook greedy loop: best remaining mask vs all the rest, one step per kept mask."""
    order = torch.argsort(scores, descending=True, stable=True)
    flat = masks[order].reshape(len(order), -1).float()  # (N, H, W) -> (N, H*W)
    areas = flat.sum(1)
    labels = labels[order]
    remaining = torch.arange(len(order), device=masks.device)
    keep = []
    while remaining.numel():
        best, rest = remaining[0], remaining[1:]
        keep.append(best)
        inter = flat[rest] @ flat[best]  # (R,)
        iou = inter / (areas[rest] + areas[best] - inter).clamp_min(1e-9)
        remaining = rest[(iou <= threshold) | (labels[rest] != labels[best])]
    return order[torch.stack(keep)] if keep else order[:0]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_size(h: int, w: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(args.seed)
    masks, labels, scores = make_candidates(args.candidates, h, w, gen)
    masks, labels, scores = masks.to(device), labels.to(device), scores.to(device)
    order = torch.argsort(scores, descending=True)
    iou, labels_sorted = mask_iou_matrix(masks[order]), labels[order]
    methods: dict[str, Callable[[], object]] = {
        "matrix_nms": lambda: matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0,
                                         score_threshold=0.05, max_detections=100),
        "greedy mask NMS": lambda: mask_nms(masks, scores, args.iou_threshold, labels=labels),
        "greedy, IoU per step": lambda: greedy_per_step(masks, labels, scores,
                                                        args.iou_threshold),
        "IoU matrix": lambda: mask_iou_matrix(masks),
        "decay": lambda: matrix_nms_decay(iou, labels_sorted, kernel="gaussian", sigma=2.0),
        "walk": lambda: greedy_nms_from_iou(iou, args.iou_threshold, labels_sorted),
    }
    a = mask_nms(masks, scores, args.iou_threshold, labels=labels)
    b = greedy_per_step(masks, labels, scores, args.iou_threshold)
    if a.tolist() != b.tolist():
        sys.exit("greedy variants disagree")
    kept, _ = matrix_nms(masks, labels, scores, score_threshold=0.05, max_detections=100)
    print(f"  {h}x{w}: greedy keeps {len(a)} of {len(scores)}, matrix_nms keeps {len(kept)} "
          f"(decayed score >= 0.05, max 100)")
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(methods[name], device))
    return {name: statistics.median(t) for name, t in times.items()}


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        default=[(128, 128), (200, 336)],
                        help="mask sizes HxW (default: 128x128 200x336)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iou-threshold", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"Matrix NMS vs greedy mask NMS: {args.candidates} candidates, device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    rows = [(h, w, run_size(h, w, args, device)) for h, w in args.sizes]
    print()
    print("| mask size | matrix_nms | greedy mask NMS | greedy, IoU per step | IoU matrix "
          "| decay | walk | greedy / matrix | per-step / matrix | walk / decay |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for h, w, t in rows:
        m = t["matrix_nms"]
        ms = " | ".join(f"{1e3 * t[k]:.2f} ms" for k in (
            "matrix_nms", "greedy mask NMS", "greedy, IoU per step", "IoU matrix", "decay", "walk"))
        print(f"| {h}x{w} | {ms} | {t['greedy mask NMS'] / m:.2f} "
              f"| {t['greedy, IoU per step'] / m:.2f} | {t['walk'] / t['decay']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
