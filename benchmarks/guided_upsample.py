"""Benchmark: the joint bilateral upsampling of a U-Net's logits, against bilinear upsampling
and a plain broadcast version of the same sum, same run.

    .venv/bin/python benchmarks/guided_upsample.py [--repeats 30] [--threads 2] [--json]

The case of the semantic recipe (`benchmarks/quality.py semantic-unet`): (N, 7, 64, 64) logits
to 256 x 256 (k = 4) guided by the (N, 3, 256, 256) image, radius 2 (25 cells), N = 1 and 8.
Rows, ms per image, best of the runs, interleaved:
* `bilinear`: `F.interpolate` (what the recipe used before);
* `plain broadcast`: the same weighted sum written shift by shift over the full-resolution map
  (each neighbour cell's logits and colour repeated k x k times, float32) - the obvious way;
* `joint_bilateral_upsample`: pixelwise's (cells innermost, one image at a time);
* `unet forward`: the recipe's network (width 24, input_scale 0.25) on the same images, for
  scale.
The plain version must agree with pixelwise's (max abs diff printed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pixelwise.models import build_model
from pixelwise.ops.joint_bilateral import joint_bilateral_upsample

K, CLASSES, SIZE, RADIUS = 4, 7, 256, 2
SIGMA_COLOR, SIGMA_SPACE = 0.075, 2.0


def plain_broadcast(values: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """The sum over the window written directly at full resolution, shift by shift."""
    n, c, h, w = values.shape
    r = RADIUS
    cells = F.pad(values, (r,) * 4, mode="replicate")
    colours = F.pad(F.avg_pool2d(guide, K), (r,) * 4, mode="replicate")
    offset = (torch.arange(K) + 0.5) / K - 0.5
    logs, shifted = [], []
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            def up(t: torch.Tensor) -> torch.Tensor:
                part = t[:, :, r + di:r + di + h, r + dj:r + dj + w]
                return part.repeat_interleave(K, 2).repeat_interleave(K, 3)
            dy = (di - offset).repeat(h)[:, None]
            dx = (dj - offset).repeat(w)[None, :]
            logs.append(-(dy**2 + dx**2) / (2 * SIGMA_SPACE**2)
                        - (guide - up(colours)).square().sum(1) / (2 * SIGMA_COLOR**2))
            shifted.append(up(cells))
    weights = torch.stack(logs).softmax(0)  # (S, N, H, W)
    return sum(weights[s][:, None] * shifted[s] for s in range(len(shifted)))


def _best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("unet", num_classes=CLASSES, width=24, depth=4, input_scale=0.25).eval()
    rows = []
    for n in (1, 8):
        gen = torch.Generator().manual_seed(n)
        images = torch.rand(n, 3, SIZE, SIZE, generator=gen)
        logits = torch.randn(n, CLASSES, SIZE // K, SIZE // K, generator=gen) * 3
        ours = joint_bilateral_upsample(logits, images, K, sigma_color=SIGMA_COLOR,
                                        sigma_space=SIGMA_SPACE, radius=RADIUS)
        diff = float((ours - plain_broadcast(logits, images)).abs().max())
        with torch.inference_mode():
            ms = _best_ms({
                "bilinear": lambda: F.interpolate(logits, scale_factor=K, mode="bilinear",
                                                  align_corners=False),
                "plain broadcast": lambda: plain_broadcast(logits, images),
                "joint_bilateral_upsample": lambda: joint_bilateral_upsample(
                    logits, images, K, sigma_color=SIGMA_COLOR, sigma_space=SIGMA_SPACE,
                    radius=RADIUS),
                "unet forward": lambda: net(images),
            }, args.repeats)
        for name, value in ms.items():
            rows.append({"batch": n, "op": name, "ms_per_image": value / n,
                         "vs_plain": ms["plain broadcast"] / value,
                         "max_abs_diff_to_plain": diff})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"joint bilateral upsampling, (N, {CLASSES}, {SIZE // K}, {SIZE // K}) -> {SIZE}², "
          f"radius {RADIUS}, {args.threads} threads (best of {args.repeats})\n")
    print("| batch | op | ms / image | plain broadcast / this |")
    print("|---:|---|---:|---:|")
    for row in rows:
        print(f"| {row['batch']} | {row['op']} | {row['ms_per_image']:.2f} | "
              f"{row['vs_plain']:.1f}x |")
    print(f"\nmax abs diff, pixelwise vs plain broadcast: "
          f"{max(r['max_abs_diff_to_plain'] for r in rows):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
