"""Benchmark: every pixelwise upsampler against the plain torch op it is built on, same run.

    .venv/bin/python benchmarks/upsample.py [--shape N C H W] [--repeats R] [--threads T] [--json]

For each operator, forward (no grad) and forward+backward times of ours and of the peer (same
weights), measured interleaved (ours, peer, peer, ours, ...: alternating which goes first) and
summarised by the best of the runs (the minimum: other processes on a shared machine only ever
add time; the medians are in the --json output). The ratio ours / peer is what to read.
Goal: every ratio <= 1.1, and bed_of_nails no slower than nearest (its peer here).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.upsample import UPSAMPLERS, MaxPoolWithIndices, make_upsampler

GOAL = 1.1


class _Peer(nn.Module):
    """A plain torch function as a module (holding the modules it uses, so their grads reset)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *modules: nn.Module) -> None:
        super().__init__()
        self.fn, self.used = fn, nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **extra)


def _cases(shape: tuple[int, int, int, int]) -> list[tuple[str, str, nn.Module, nn.Module, dict]]:
    """(name, peer description, ours, peer, extra inputs) for every operator, same weights."""
    n, c, h, w = shape
    s = 2
    cases = []
    for name in UPSAMPLERS:
        ours = make_upsampler(name, c, s)
        extra: dict[str, torch.Tensor] = {}
        if name in ("bed_of_nails", "nearest"):
            desc = "F.interpolate(nearest)"
            peer = _Peer(lambda x: F.interpolate(x, scale_factor=s, mode="nearest"))
        elif name in ("bilinear", "bicubic"):
            desc = f"F.interpolate({name})"
            peer = _Peer(
                lambda x, m=name: F.interpolate(x, scale_factor=s, mode=m, align_corners=False)
            )
        elif name == "max_unpool":
            _, extra["indices"] = MaxPoolWithIndices(s)(torch.randn(n, c, h * s, w * s))
            desc = "F.max_unpool2d"
            peer = _Peer(lambda x, indices: F.max_unpool2d(x, indices, s))
        elif name == "transposed":
            peer = nn.ConvTranspose2d(c, c, 4, stride=s, padding=1, bias=False)
            peer.load_state_dict(ours.conv.state_dict())
            desc = "nn.ConvTranspose2d(k4 s2 p1)"
        elif name == "resize_conv":
            conv = nn.Conv2d(c, c, 3, padding=1, padding_mode="replicate")
            conv.load_state_dict(ours.conv.state_dict())
            desc = "F.interpolate(nearest) + nn.Conv2d(3x3, replicate)"
            # conv bound now: the loop rebinds the name for pixel_shuffle
            peer = _Peer(
                lambda x, conv=conv: conv(F.interpolate(x, scale_factor=s, mode="nearest")), conv
            )
        elif name == "pixel_shuffle":
            conv = nn.Conv2d(c, c * s * s, 3, padding=1)
            conv.load_state_dict(ours.conv.state_dict())
            desc = "nn.Conv2d(C->4C, 3x3) + nn.PixelShuffle(2)"
            peer = nn.Sequential(conv, nn.PixelShuffle(s))
        else:  # a new operator: add its peer here
            raise KeyError(f"no benchmark peer for upsampler {name!r}")
        cases.append((name, desc, ours, peer, extra))
    return cases


def _time_once(
    fn: nn.Module, x: torch.Tensor, extra: dict, backward: bool, grad: torch.Tensor
) -> float:
    if backward:
        x.grad = None
        for p in fn.parameters():
            p.grad = None
        start = time.perf_counter()
        fn(x, **extra).backward(grad)
        return time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        fn(x, **extra)
        return time.perf_counter() - start


def measure(
    shape: tuple[int, int, int, int],
    repeats: int,
    budget_s: float = 0.5,
    warmup: int = 2,
    ops: list[str] | None = None,
) -> list[dict]:
    """Rows of best (and median) times; each side runs >= `repeats` times and >= `budget_s`."""
    torch.manual_seed(0)
    rows = []
    for name, desc, ours, peer, extra in _cases(shape):
        if ops and name not in ops:
            continue
        x = torch.randn(shape, requires_grad=True)
        with torch.no_grad():
            out_ours, out_peer = ours(x, **extra), peer(x, **extra)
        # bed_of_nails is the one operator that computes something else than its peer
        if name != "bed_of_nails" and not torch.allclose(out_ours, out_peer, atol=1e-5):
            raise AssertionError(f"{name}: ours and its peer disagree")
        grad = torch.randn_like(out_ours)
        row = {"name": name, "peer": desc}
        for key, backward in (("forward", False), ("forward_backward", True)):
            warm = [
                _time_once(fn, x, extra, backward, grad)
                for _ in range(warmup)
                for fn in (ours, peer)
            ]
            runs = max(repeats, min(1000, math.ceil(2 * budget_s / max(sum(warm), 1e-6) * warmup)))
            times: dict[str, list[float]] = {"ours": [], "peer": []}
            for r in range(runs):
                order = (
                    (("ours", ours), ("peer", peer))
                    if r % 2 == 0
                    else (("peer", peer), ("ours", ours))
                )
                for who, fn in order:
                    times[who].append(_time_once(fn, x, extra, backward, grad))
            ours_ms, peer_ms = min(times["ours"]) * 1e3, min(times["peer"]) * 1e3
            row[f"{key}_ms"] = round(ours_ms, 3)
            row[f"{key}_peer_ms"] = round(peer_ms, 3)
            row[f"{key}_ratio"] = round(ours_ms / peer_ms, 3)
            row[f"{key}_median_ms"] = round(statistics.median(times["ours"]) * 1e3, 3)
            row[f"{key}_peer_median_ms"] = round(statistics.median(times["peer"]) * 1e3, 3)
            row[f"{key}_runs"] = runs
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| operator | peer (plain torch) | fwd ms | peer fwd ms | ratio "
        "| fwd+bwd ms | peer fwd+bwd ms | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = lambda v: f"**{v:.2f}**" if v > GOAL else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['peer']} | {r['forward_ms']:.2f} | {r['forward_peer_ms']:.2f} | "
            f"{flag(r['forward_ratio'])} | {r['forward_backward_ms']:.2f} | "
            f"{r['forward_backward_peer_ms']:.2f} | {flag(r['forward_backward_ratio'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[1, 64, 128, 128], metavar=("N", "C", "H", "W")
    )
    parser.add_argument("--repeats", type=int, default=10, help="at least this many runs per op")
    parser.add_argument(
        "--budget", type=float, default=0.5, help="and at least this many seconds per op and mode"
    )
    # One thread by default: on a shared machine a multi-threaded op waits for its slowest,
    # preempted thread, which swamps the ratios (same-call rows read 2x); --threads 0: torch's.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--ops", nargs="+", choices=list(UPSAMPLERS), help="only these operators")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    rows = measure(shape, args.repeats, args.budget, ops=args.ops)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"upsamplers at scale 2, input {'x'.join(map(str, shape))}, float32, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; best of >= "
        f"{args.repeats} runs (>= {args.budget} s) interleaved with the peer's"
    )
    print(table(rows))
    slow = [r["name"] for r in rows if max(r["forward_ratio"], r["forward_backward_ratio"]) > GOAL]
    print(f"\ngoal (ratio <= {GOAL}): {'met' if not slow else 'missed by ' + ', '.join(slow)}")
    by_name = {r["name"]: r for r in rows}
    if {"bed_of_nails", "nearest"} <= set(by_name):
        bed, nearest = by_name["bed_of_nails"], by_name["nearest"]
        print(
            f"bed_of_nails / nearest: forward {bed['forward_ms'] / nearest['forward_ms']:.2f}, "
            f"forward+backward {bed['forward_backward_ms'] / nearest['forward_backward_ms']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
