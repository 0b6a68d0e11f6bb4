"""Sliding window vs fully convolutional: the same patch classifier, two ways (issue 4 §1).

`model.sliding_window` classifies one P x P patch per pixel (batched); `model(images)` runs the
same weights densely. Both are timed in the same run; the table prints the ratio and the largest
difference between the two outputs. Run: `.venv/bin/python benchmarks/sliding_window.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pixelwise.models import build_model


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--patch-size", type=int, default=33)
    parser.add_argument("--batch-size", type=int, default=1024, help="patches per batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the dense path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("patch_classifier", 3, patch_size=args.patch_size).eval()
    x = torch.rand(1, 3, args.size, args.size)
    with torch.inference_mode():
        model(x)  # warm-up
        dense_s = _time(lambda: model(x), args.repeats)
        t0 = time.perf_counter()
        slow = model.sliding_window(x, batch_size=args.batch_size)
        slide_s = time.perf_counter() - t0
        diff = (model(x) - slow).abs().max().item()
    pixels = args.size * args.size
    print(
        f"patch classifier, P = {args.patch_size}, one {args.size}x{args.size} image, "
        f"{torch.get_num_threads()} threads (same run)"
    )
    print("| path | time (s) | pixels/s |")
    print("|---|---|---|")
    print(
        f"| sliding window ({pixels} patches, batches of {args.batch_size}) "
        f"| {slide_s:.3f} | {pixels / slide_s:,.0f} |"
    )
    print(f"| fully convolutional | {dense_s:.4f} | {pixels / dense_s:,.0f} |")
    print(f"speed-up of the dense path: {slide_s / dense_s:.0f}x; max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
