"""What the trainer's step-time choices buy: the quality recipes' models, each choice on and off.

    .venv/bin/python benchmarks/train_step.py [--repeats 10] [--threads 2] [--json]

Steps (forward, loss, backward, AdamW step; bfloat16 autocast where the CPU has native bf16, as
the recipes train), timed alternately in the same run, median seconds:
* `semantic-unet`: the recipe's U-Net (width 16, depth 4, input_scale 0.25), batch 16 of
  256 x 256 images, ce + dice at the network's resolution (`loss_at` "net");
* `instance-mask_rcnn`: the recipe's ResNet-18-FPN Mask R-CNN, batch 4 of 256 x 256 images with
  8 objects each;
each as the trainer ran it before (NCHW weights, torch's per-tensor AdamW loop) and with
`--channels-last` and the fused AdamW the trainer now uses (`build_optimizer`); the Mask R-CNN
also with torchvision's RoIAlign kernel (split between threads, `parallel_roi_align`) against
`separable_roi_align`, which the R-CNNs' poolers now use in bfloat16 training.
Parts, median milliseconds: the AdamW step alone (loop vs fused); the labels of (16, 7, 256,
256) logits (`argmax(1)` vs `pixelwise.ops.labels.argmax_labels`: validation and prediction);
the block label counts of the semantic loss (`area_targets` vs a one-hot + sum pool reference,
which must agree exactly); RoIAlign forward + backward at the recipe's stride-4 level (bfloat16
features, as under autocast; the two must agree to bfloat16 rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from instance import _interleaved, _train_targets  # benchmarks/instance.py
from quality import RECIPES  # benchmarks/quality.py

import pixelwise.ops.roi_align as roi_pooling
from pixelwise.engine.trainer import autocast_settings, build_optimizer
from pixelwise.models import build_model
from pixelwise.ops.labels import argmax_labels
from pixelwise.ops.separable_roi_align import separable_roi_align
from pixelwise.tasks.losses import area_targets
from pixelwise.tasks.semantic import SemanticTask

SIZE = 256


def _semantic_case() -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], Any]]:
    recipe = RECIPES["semantic-unet"]
    task = SemanticTask(7, loss=recipe.train["loss"], loss_at="net")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, SIZE, SIZE, generator=g)
    # blocky labels, as scenes have regions
    labels = torch.randint(0, 7, (16, SIZE // 16, SIZE // 16), generator=g)
    labels = labels.repeat_interleave(16, 1).repeat_interleave(16, 2)  # (16, 256, 256)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("unet", num_classes=7, **recipe.options)

    return build, lambda model: task.loss(model, (images, labels))


def _instance_case() -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], Any]]:
    options = dict(RECIPES["instance-mask_rcnn"].options, min_size=SIZE, max_size=SIZE)
    images = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    targets = [_train_targets(SIZE, 8, i) for i in range(4)]
    for t in targets:
        t["labels"] = t["labels"] % 4 + 1  # the synthetic set's 4 thing classes

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("mask_rcnn", num_classes=5, **options)

    def loss(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)  # the same proposal sampling every step
        return model(images, [dict(t) for t in targets])

    return build, loss


def _stepper(build: Callable[[], torch.nn.Module], loss: Callable[[torch.nn.Module], Any],
             channels_last: bool, fused: bool, separable: bool) -> Callable[[], None]:
    model = build().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fused:
        opt = build_optimizer(model, "adamw", lr=1e-4, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp, dtype = autocast_settings(True, torch.device("cpu"))

    # without it: torchvision's kernel where the training poolers now take the separable op
    pooling = contextlib.nullcontext() if separable else mock.patch.object(
        roi_pooling, "separable_roi_align", roi_pooling.parallel_roi_align)

    def step() -> None:
        with pooling, torch.autocast("cpu", dtype=dtype, enabled=amp):
            losses = loss(model)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return step


def steps(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, case in (("semantic-unet", _semantic_case), ("instance-mask_rcnn", _instance_case)):
        build, loss = case()
        variants = {"before (NCHW, AdamW loop)": (False, False, False),
                    "fused AdamW": (False, True, False),
                    "channels_last + fused AdamW": (True, True, False)}
        if name == "instance-mask_rcnn":
            variants["+ separable RoIAlign"] = (True, True, True)
        fns = {label: _stepper(build, loss, *flags) for label, flags in variants.items()}
        times = _interleaved(fns, repeats)
        base = statistics.median(times["before (NCHW, AdamW loop)"]["wall"])
        for label in variants:
            median = statistics.median(times[label]["wall"])
            rows.append({"case": name, "variant": label, "seconds": median,
                         "speedup": base / median})
    return rows


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def parts(repeats: int) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    for name, options in (("unet", RECIPES["semantic-unet"].options),
                          ("mask_rcnn", RECIPES["instance-mask_rcnn"].options)):
        model = build_model(name, num_classes=5, **options)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        loop = torch.optim.AdamW(params, lr=1e-4, fused=False)
        fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
        rows.append({"part": f"AdamW step, {name} ({sum(p.numel() for p in params):,} params)",
                     "reference": "per-tensor loop", "ours": "fused",
                     "reference_ms": _median_ms(loop.step, repeats),
                     "ours_ms": _median_ms(fused.step, repeats)})
    logits = torch.randn(16, 7, SIZE, SIZE)
    assert torch.equal(logits.argmax(1), argmax_labels(logits, 1))
    rows.append({"part": "labels of (16, 7, 256, 256) logits", "reference": "argmax(1)",
                 "ours": "argmax_labels", "reference_ms": _median_ms(lambda: logits.argmax(1),
                                                                     repeats),
                 "ours_ms": _median_ms(lambda: argmax_labels(logits, 1), repeats)})
    labels = torch.randint(0, 7, (16, SIZE, SIZE))
    labels[:, :4] = 255  # some ignored pixels

    def one_hot_counts() -> torch.Tensor:
        valid = labels != 255
        hot = F.one_hot(torch.where(valid, labels, 0), 7).permute(0, 3, 1, 2)  # (N, K, H, W)
        return F.avg_pool2d((hot * valid[:, None]).float(), 4, divisor_override=1)

    assert torch.equal(one_hot_counts(), area_targets(labels, 4, 7).mass)
    rows.append({"part": "4 x 4 block label counts, batch 16", "reference": "one-hot + sum pool",
                 "ours": "area_targets",
                 "reference_ms": _median_ms(one_hot_counts, repeats),
                 "ours_ms": _median_ms(lambda: area_targets(labels, 4, 7), repeats)})
    return rows + _roi_align_parts(repeats)


def _roi_align_parts(repeats: int) -> list[dict[str, Any]]:
    """RoIAlign forward + backward on the recipe's stride-4 level (4 images, the recipe's FPN
    width, 64 x 64, bfloat16 channels_last): the mask branch's RoIs (up to 32 positives per
    image, 14 x 14) and the box branch's (64 per image, 7 x 7), boxes of 10-110 px."""
    rows = []
    g = torch.Generator().manual_seed(0)
    channels = RECIPES["instance-mask_rcnn"].options["fpn_channels"]
    features = torch.randn(4, channels, SIZE // 4, SIZE // 4, generator=g).bfloat16()
    features = features.to(memory_format=torch.channels_last).requires_grad_()
    for branch, count, side in (("mask", 128, 14), ("box", 256, 7)):
        wh = 10 + 100 * torch.rand(count, 2, generator=g)
        xy = torch.rand(count, 2, generator=g) * (SIZE - wh)
        index = (torch.arange(count) % 4).float()[:, None]
        rois = torch.cat([index, xy, xy + wh], 1)  # (K, 5)
        weight = torch.randn(count, channels, side, side, generator=g)

        def run(pool: Callable[..., torch.Tensor], keep: list | None = None) -> None:
            out = pool(features, rois, side, 0.25, 2)
            (grad,) = torch.autograd.grad((out.float() * weight).sum(), features)
            if keep is not None:
                keep += [out.float(), grad.float()]

        ref: list = []
        ours: list = []
        run(roi_pooling.parallel_roi_align, ref)
        run(separable_roi_align, ours)
        for a, b in zip(ours, ref):  # bfloat16 rounding of features, weights and output
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
        rows.append({"part": f"RoIAlign fwd+bwd, {branch}: {count} x {channels} x {side}²",
                     "reference": "torchvision kernel", "ours": "separable",
                     "reference_ms": _median_ms(lambda: run(roi_pooling.parallel_roi_align),
                                                repeats),
                     "ours_ms": _median_ms(lambda: run(separable_roi_align), repeats)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    step_rows, part_rows = steps(args.repeats), parts(3 * args.repeats)
    if args.json:
        print(json.dumps({"steps": step_rows, "parts": part_rows}, indent=2))
        return 0
    print(f"Training steps, {args.threads} threads, median of {args.repeats} (alternated)\n")
    print(f"{'recipe':<20}{'variant':<30}{'s/step':>9}{'speedup':>9}")
    for r in step_rows:
        print(f"{r['case']:<20}{r['variant']:<30}{r['seconds']:>9.3f}{r['speedup']:>8.2f}x")
    print(f"\n{'part':<46}{'reference':<20}{'ms':>8}{'ours':>15}{'ms':>8}{'ratio':>8}")
    for r in part_rows:
        print(f"{r['part']:<46}{r['reference']:<20}{r['reference_ms']:>8.2f}{r['ours']:>15}"
              f"{r['ours_ms']:>8.2f}{r['reference_ms'] / r['ours_ms']:>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
