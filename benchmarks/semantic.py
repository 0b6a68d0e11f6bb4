"""pixelwise `unet` (resnet18 encoder) vs segmentation_models_pytorch `Unet("resnet18")`.

Issue 4 §5.

Same architecture on both sides: torchvision ResNet-18 encoder (random init; SMP with
`encoder_weights=None`, so nothing is downloaded), decoder widths (256, 128, 64, 32, 16), nearest
upsampling, two conv-BN-ReLU per block. (Only the heads differ: pixelwise's is a 1x1 conv as in
the U-Net paper, SMP's a 3x3 conv on 16 channels.) Batch 8, 256 x 256, 2 CPU threads by default.

* inference (img/s): SMP in eval mode under `torch.inference_mode`; pixelwise through
  `optimize_for_inference` (conv-BN folding; nearest-upsample + concat + conv rewritten as the
  equivalent sub-pixel conv; channels_last; `--compile` adds torch.compile). The optimised copy
  computes the same function (max difference printed);
* training step (s): forward, cross-entropy, backward, AdamW step, both in train mode.

Both models are timed in the same run, alternating, and the table reports medians and the ratio,
so a machine shared with other jobs still gives a fair comparison.
Run: `.venv/bin/python benchmarks/semantic.py [--compile] [--device cuda] [--amp]` (needs
`pip install -e '.[bench]'`). `--device cuda` times both on the GPU (each timed call ends with a
synchronisation); `--amp` runs both models' inference and training step under autocast
(float16 with loss scaling on CUDA, bfloat16 on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pixelwise.models import build_model
from pixelwise.models.fold import optimize_for_inference

DECODER_CHANNELS = (256, 128, 64, 32, 16)  # SMP's default


def _timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU's queued work counts too
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--compile", action="store_true", help="torch.compile the pixelwise model")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--amp", action="store_true",
                        help="autocast: float16 on CUDA, bfloat16 on a CPU")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    device = torch.device(args.device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print(
            "benchmarks/semantic.py needs segmentation_models_pytorch: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = smp.Unet(
        "resnet18", encoder_weights=None, classes=args.classes, decoder_channels=DECODER_CHANNELS
    )
    ours = build_model(
        "unet",
        args.classes,
        encoder="resnet18",
        upsample="nearest",
        decoder_channels=list(DECODER_CHANNELS),
    )
    ref.to(device)
    ours.to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)

    # --- inference
    ref.eval()
    ours.eval()
    fast = optimize_for_inference(ours, compile=args.compile)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        max_diff = (fast(x_cl) - ours(x)).abs().max().item()  # the optimised copy computes the same
    with torch.inference_mode(), torch.autocast(device.type, dtype=half, enabled=args.amp):
        _timed(lambda: (ref(x), fast(x_cl)), device)  # warm-up (and compilation), synchronised
        t_ref, t_ours = [], []
        for _ in range(args.rounds):
            t_ref.append(_timed(lambda: ref(x), device))
            t_ours.append(_timed(lambda: fast(x_cl), device))
    inf_ref = args.batch / statistics.median(t_ref)
    inf_ours = args.batch / statistics.median(t_ours)

    # --- training step
    def step_fn(model: torch.nn.Module, inputs: torch.Tensor):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp and half == torch.float16)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=half, enabled=args.amp):
                loss = F.cross_entropy(model(inputs), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        return step

    ref.train()
    ours.train()
    ref_step, ours_step = step_fn(ref, x), step_fn(ours, x)
    _timed(lambda: (ref_step(), ours_step()), device)  # warm-up, synchronised
    s_ref, s_ours = [], []
    for _ in range(args.rounds):
        s_ref.append(_timed(ref_step, device))
        s_ours.append(_timed(ours_step, device))
    train_ref, train_ours = statistics.median(s_ref), statistics.median(s_ours)

    params_ref = sum(p.numel() for p in ref.parameters())
    params_ours = sum(p.numel() for p in ours.parameters())
    result = {
        "batch": args.batch,
        "size": args.size,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "amp": args.amp,
        "compile": args.compile,
        "rounds": args.rounds,
        "parameters": {"smp": params_ref, "pixelwise": params_ours},
        "inference_img_per_s": {"smp": inf_ref, "pixelwise": inf_ours, "ratio": inf_ours / inf_ref},
        "train_step_s": {
            "smp": train_ref,
            "pixelwise": train_ours,
            "ratio": train_ref / train_ours,
        },
        "optimised_vs_plain_max_abs_diff": max_diff,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(
        f"U-Net, resnet18 encoder, batch {args.batch}, {args.size}x{args.size}, {where}"
        f"{', autocast ' + str(half).removeprefix('torch.') if args.amp else ''}, "
        f"medians of {args.rounds} alternating rounds (same run)"
    )
    print("| | SMP Unet | pixelwise unet | pixelwise / SMP |")
    print("|---|---|---|---|")
    print(f"| parameters | {params_ref:,} | {params_ours:,} | |")
    print(
        f"| inference (img/s) | {inf_ref:.1f} | {inf_ours:.1f} | {inf_ours / inf_ref:.2f}x faster |"
    )
    print(
        f"| training step (s) | {train_ref:.3f} | {train_ours:.3f} "
        f"| {train_ref / train_ours:.2f}x faster |"
    )
    print(
        f"pixelwise inference: BN folded, sub-pixel upsample-conv, channels_last"
        f"{', torch.compile' if args.compile else ''}; "
        f"max |optimised - plain| = {max_diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
