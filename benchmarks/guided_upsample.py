"""Benchmark: the joint bilateral upsampling of a U-Net's logits, against bilinear upsampling
and a plain broadcast version of the same sum, same run.

    .venv/bin/python benchmarks/guided_upsample.py [--repeats 30] [--threads 2] [--data DIR]
        [--figure PNG] [--json]

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

Second table, what the upsampling itself can recover, without a network: on the val split of a
synthetic semantic set (`--data DIR`; default: 100 scenes of 256² synthesised into a temporary
folder), each 4 x 4 block's label fractions (a perfect 1/4-resolution prediction) brought back to
256² by bilinear or by joint bilateral upsampling guided by the image, argmax, mIoU against the
masks. `--figure PNG` draws a few of them (image, truth, both reconstructions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F

from pixelwise.models import build_model
from pixelwise.ops.joint_bilateral import joint_bilateral_upsample

K, CLASSES, SIZE, RADIUS = 4, 7, 256, 2
SIGMA_COLOR, SIGMA_SPACE = 0.075, 2.0
CROP = 96  # the figure's zoomed window


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


def _read_split(data: Path, split: str = "val") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from PIL import Image

    images, masks = [], []
    for path in sorted((data / "images" / split).glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        images.append(torch.from_numpy(rgb).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        masks.append(torch.from_numpy(np.asarray(Image.open(data / "masks" / split / path.name))
                                      .astype(np.int64)))
    return images, masks


def oracle(data: Path, classes: int) -> tuple[dict[str, float], list[tuple]]:
    """mIoU of the blocks' label fractions upsampled each way, and the examples' arrays."""
    images, masks = _read_split(data)
    confusion = {name: torch.zeros(classes, classes, dtype=torch.int64)
                 for name in ("bilinear", "joint_bilateral")}
    examples = []
    for image, mask in zip(images, masks):
        valid = mask < classes  # 255: void
        onehot = F.one_hot(mask.clamp(max=classes - 1), classes).permute(2, 0, 1).float()
        onehot = onehot * valid  # (K, H, W); void pixels count for no class
        fractions = F.avg_pool2d(onehot[None], K)  # (1, K, H/4, W/4): a perfect coarse map
        outs = {"bilinear": F.interpolate(fractions, scale_factor=K, mode="bilinear",
                                          align_corners=False),
                "joint_bilateral": joint_bilateral_upsample(
                    fractions, image[None], K, sigma_color=SIGMA_COLOR,
                    sigma_space=SIGMA_SPACE, radius=RADIUS)}
        labels = {name: out[0].max(0).indices for name, out in outs.items()}
        for name, pred in labels.items():
            pair = mask[valid] * classes + pred[valid]
            confusion[name] += torch.bincount(pair, minlength=classes**2).reshape(classes,
                                                                                 classes)
        examples.append((image, mask, labels))
    miou = {}
    for name, cm in confusion.items():
        tp = cm.diag().double()
        union = cm.sum(0) + cm.sum(1) - cm.diag()
        present = union > 0
        miou[name] = float((tp[present] / union[present]).mean())
    return miou, examples


def draw(examples: list[tuple], miou: dict[str, float], colors: np.ndarray, out: Path,
         rows: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixelwise.viz.palette import colorize_labels

    # the examples where the two differ most
    order = sorted(range(len(examples)), key=lambda i: -int(
        (examples[i][2]["bilinear"] != examples[i][2]["joint_bilateral"]).sum()))[:rows]
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3.1 * rows))
    titles = ["image", "truth", f"bilinear (mIoU {miou['bilinear']:.3f})",
              f"joint bilateral (mIoU {miou['joint_bilateral']:.3f})"]
    for row, index in enumerate(order):
        image, mask, labels = examples[index]
        # zoom on the 96 x 96 window where the two differ most (boundaries are thin at 256²)
        differ = (labels["bilinear"] != labels["joint_bilateral"]).float()[None, None]
        density = F.avg_pool2d(differ, CROP, stride=8)[0, 0]  # (rows, cols) of windows
        y, x = divmod(int(density.flatten().argmax()), density.shape[1])
        window = (slice(8 * y, 8 * y + CROP), slice(8 * x, 8 * x + CROP))
        panels = [image.permute(1, 2, 0).numpy()[window],
                  colorize_labels(mask.numpy()[window], colors),
                  colorize_labels(labels["bilinear"].numpy()[window], colors),
                  colorize_labels(labels["joint_bilateral"].numpy()[window], colors)]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=10)
    fig.suptitle("A perfect 1/4-resolution map (each 4 x 4 block's label fractions) brought back "
                 "to 256² (96 x 96 crops; mIoU over the val split)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None,
                        help="semantic dataset for the oracle table (default: synthesise 100)")
    parser.add_argument("--figure", type=Path, default=None, help="write the oracle figure here")
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
    with tempfile.TemporaryDirectory() as tmp:
        data, source = args.data, str(args.data)
        if data is None:
            source = "100 synthetic scenes (seed 0)"
            from pixelwise.data.synthetic import synthesize

            data = synthesize("semantic", Path(tmp) / "data", num=100, size=(SIZE, SIZE), seed=0)
        meta = json.loads((data / "classes.json").read_text())
        miou, examples = oracle(data, len(meta["classes"]))
        if args.figure is not None:
            draw(examples, miou, np.asarray(meta["colors"], dtype=np.uint8), args.figure)
    if args.json:
        print(json.dumps({"speed": rows, "oracle_miou": miou}, indent=2))
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
    print(f"\na perfect 1/4-resolution map (block label fractions) upsampled, val of {source}:")
    print("| upsampling | mIoU |\n|---|---:|")
    for name, value in miou.items():
        print(f"| {name} | {value:.4f} |")
    if args.figure is not None:
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
