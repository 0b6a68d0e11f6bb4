"""Checkerboard analysis of every upsampler (Odena, Dumoulin & Olah 2016).

For each row of `VARIANTS` -- every operator of `pixelwise.upsample.UPSAMPLERS` (a test checks
none is missing), plus transposed convolutions with kernel 3 and 4 at stride 2 (random init), a
bilinear resize-conv and a pixel shuffle without ICNR -- at scale 2:

- overlap pattern: the output for a constant input with every weight 1 and every bias 0 -- how many
  input pixels reach each output pixel. An interpolation has no weights and returns the input;
- checkerboard: max / min of that pattern after cropping a border (the kernel size for transposed
  convolutions, 2 px otherwise): 4 for kernel 3 stride 2 (uneven overlap 1, 2, 4), 1 for kernel 4;
  null where the minimum is 0 (bed of nails, max unpooling: most outputs get nothing);
- impulse response: the output for a single 1 in a zero image minus that for a zero image (the
  bias), with the operator's own init;
- ripple at init: (max - min) / max |.| of the interior output for a constant input with the
  operator's own init (0: flat; a random transposed conv has a checkerboard before any training);
- params (at 64 channels) and forward time at 1x64x128x128 on one CPU thread (best of >= 5 calls
  and >= 0.2 s after two warm-up calls, no grad).

`write_report(out)` writes upsamplers.md, upsamplers.json and upsamplers.png into `out`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from pixelwise.atomic import write_bytes
from pixelwise.upsample import MaxPoolWithIndices, make_upsampler

logger = logging.getLogger(__name__)

SCALE = 2
# row name -> (operator name in UPSAMPLERS, options)
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "bed_of_nails": ("bed_of_nails", {}),
    "nearest": ("nearest", {}),
    "bilinear": ("bilinear", {}),
    "bicubic": ("bicubic", {}),
    "max_unpool": ("max_unpool", {}),
    "transposed": ("transposed", {}),  # FCN: kernel 4, stride 2, bilinear init
    "transposed_k3s2": ("transposed", {"kernel_size": 3, "init": "default"}),
    "transposed_k4s2": ("transposed", {"kernel_size": 4, "init": "default"}),
    "resize_conv": ("resize_conv", {}),  # nearest resize
    "resize_conv_bilinear": ("resize_conv", {"mode": "bilinear"}),
    "pixel_shuffle": ("pixel_shuffle", {}),  # ICNR init
    "pixel_shuffle_no_icnr": ("pixel_shuffle", {"init": "default"}),
}

PATTERN_HW = (8, 8)  # constant-input size for the overlap pattern -> 16 x 16 output
IMPULSE_HW = (7, 7)  # impulse at the centre -> 14 x 14 output
TIMING_SHAPE = (1, 64, 128, 128)
TIMING_BUDGET_S = 0.2  # at least `repeats` timed calls and this long per operator


def _border(module: nn.Module) -> int:
    conv = getattr(module, "conv", None)
    if isinstance(conv, nn.ConvTranspose2d):
        return conv.kernel_size[0]
    return 2


def _all_ones(module: nn.Module) -> nn.Module:
    """A copy with every weight 1 and every bias 0."""
    ones = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in ones.named_parameters():
            p.fill_(0.0 if name.endswith("bias") else 1.0)
    return ones


def _call(module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """module(x); for max_unpool, indices from max-pooling a random (2h, 2w) map."""
    if getattr(module, "needs_indices", False):
        n, c, h, w = x.shape
        pre = torch.randn(n, c, h * SCALE, w * SCALE, generator=generator)
        _, idx = MaxPoolWithIndices(SCALE)(pre)
        return module(x, indices=idx)
    return module(x)


def _interior(y: torch.Tensor, border: int) -> torch.Tensor:
    return y[..., border:-border, border:-border]


def _checkerboard(interior: torch.Tensor) -> float | None:
    lo, hi = float(interior.min()), float(interior.max())
    if lo <= 0:
        return None
    return round(hi / lo, 4)


def _distinct(interior: torch.Tensor, limit: int = 6) -> list[float] | None:
    values = sorted({round(v, 4) for v in interior.flatten().tolist()})
    return values if len(values) <= limit else None


def _forward_ms(module: nn.Module, shape: tuple[int, int, int, int], repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    kwargs = {}
    if getattr(module, "needs_indices", False):
        x, kwargs["indices"] = MaxPoolWithIndices(SCALE)(
            torch.randn(shape[0], shape[1], shape[2] * SCALE, shape[3] * SCALE, generator=g)
        )
    times: list[float] = []
    threads = torch.get_num_threads()
    # One thread: with several, a busy machine preempts one and the op waits whole time slices
    # (measured: 16 ms instead of 1 ms for bed_of_nails on 2 shared cores), so rows stop comparing.
    torch.set_num_threads(1)
    try:
        for i in range(2 + 1000):  # two warm-up calls (allocator)
            start = time.perf_counter()
            module(x, **kwargs)
            if i >= 2:
                times.append(time.perf_counter() - start)
            if len(times) >= repeats and sum(times) >= TIMING_BUDGET_S:
                break
    finally:
        torch.set_num_threads(threads)
    return round(min(times) * 1e3, 3)  # best of: a shared machine only ever adds time


def _measure(
    *, timing_shape: tuple[int, int, int, int], repeats: int
) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    rows, maps = [], {}
    with torch.no_grad():
        for name, (operator, options) in VARIANTS.items():
            g = torch.Generator().manual_seed(0)
            torch.manual_seed(0)  # the operator's own init, reproducible
            small = make_upsampler(operator, 1, SCALE, **options)
            border = _border(small)

            overlap = _call(_all_ones(small), torch.ones(1, 1, *PATTERN_HW), g)[0, 0]  # (16, 16)
            inner = _interior(overlap, border)

            impulse_in = torch.zeros(1, 1, *IMPULSE_HW)
            impulse_in[..., IMPULSE_HW[0] // 2, IMPULSE_HW[1] // 2] = 1.0
            state = g.get_state()  # the same max-pool indices for both calls
            impulse = _call(small, impulse_in, g)[0, 0]  # (14, 14)
            g.set_state(state)
            impulse = impulse - _call(small, torch.zeros_like(impulse_in), g)[0, 0]  # minus bias

            at_init = _call(small, torch.ones(1, 1, *PATTERN_HW), g)[0, 0]  # (16, 16)
            init_inner = _interior(at_init, border)
            peak = float(init_inner.abs().max())
            ripple = float(init_inner.max() - init_inner.min()) / peak if peak > 0 else 0.0

            big = make_upsampler(operator, timing_shape[1], SCALE, **options)
            rows.append(
                {
                    "name": name,
                    "operator": operator,
                    "options": options,
                    "params": sum(p.numel() for p in big.parameters()),
                    "checkerboard": _checkerboard(inner),
                    "overlap_values": _distinct(inner),
                    "init_ripple": round(ripple, 4),
                    "forward_ms": _forward_ms(big, timing_shape, repeats),
                }
            )
            maps[name] = {
                "overlap": overlap,
                "impulse": impulse,
                "at_init": at_init,
                "border": border,
            }
            logger.debug("measured %s", name)
    return rows, maps


def measure_upsamplers(
    *, timing_shape: tuple[int, int, int, int] | None = None, repeats: int = 5
) -> list[dict]:
    """One row per variant: name, operator, options, params, checkerboard, overlap_values,
    init_ripple, forward_ms (timed on a `timing_shape` input, default `TIMING_SHAPE`: best of at
    least `repeats` calls and `TIMING_BUDGET_S` seconds); params are counted at its channels."""
    return _measure(timing_shape=timing_shape or TIMING_SHAPE, repeats=repeats)[0]


def _fmt(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = (
        "| name | operator | options | params | overlap (interior) | checkerboard | ripple at init "
        "| forward ms |\n|---|---|---|---:|---|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['name']} | {r['operator']} | {_fmt(r['options'])} | {r['params']} | "
        f"{_fmt(r['overlap_values']) if r['overlap_values'] is not None else 'many'} | "
        f"{_fmt(r['checkerboard'])} | {_fmt(r['init_ripple'])} | {r['forward_ms']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _markdown(rows: list[dict], timing_shape: tuple[int, int, int, int], repeats: int) -> str:
    return (
        "# Upsamplers: overlap and checkerboard (scale 2)\n\n"
        + markdown_table(rows)
        + "\n- overlap: output for a constant 1 input with all weights 1, biases 0; checkerboard = "
        "max/min of it after cropping the kernel size (transposed) or 2 px (others); null where "
        "the minimum is 0.\n- ripple at init: (max - min) / max|.| of the interior output for a "
        "constant input with the operator's own initialisation (0 = flat).\n"
        f"- params at {timing_shape[1]} channels; forward: best of >= {repeats} calls (>= "
        f"{TIMING_BUDGET_S} s) for a "
        f"{'x'.join(map(str, timing_shape))} input, no grad, one CPU thread.\n"
    )


def _figure_png(rows: list[dict], maps: dict[str, dict], per_line: int = 6) -> bytes:
    """Blocks of `per_line` operators; in each block the rows are impulse / overlap / at init."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    blocks = -(-len(rows) // per_line)
    fig, axes = plt.subplots(
        3 * blocks, per_line, figsize=(2.1 * per_line, 6.9 * blocks), squeeze=False
    )
    row_titles = (
        "impulse response\n(own init)",
        "overlap: all-ones\nweights, constant input",
        "constant input\n(own init)",
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for k, row in enumerate(rows):
        top, j = 3 * (k // per_line), k % per_line
        m = maps[row["name"]]
        impulse = m["impulse"].numpy()
        lim = max(abs(impulse).max(), 1e-12)
        axes[top, j].imshow(impulse, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        axes[top, j].set_title(row["name"], fontsize=10, fontweight="bold")
        for i, key in ((1, "overlap"), (2, "at_init")):
            img = m[key].numpy()
            lo, hi = float(img.min()), float(img.max())
            if hi - lo < 1e-6 * max(abs(hi), 1.0):  # flat: show one colour, not float noise
                lo, hi = lo - 1.0, hi + 1.0
            axes[top + i, j].imshow(img, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            b = m["border"]
            axes[top + i, j].add_patch(
                Rectangle(
                    (b - 0.5, b - 0.5),
                    img.shape[1] - 2 * b,
                    img.shape[0] - 2 * b,
                    fill=False,
                    edgecolor="white",
                    linestyle="--",
                    linewidth=1.0,
                )
            )
        score, values = row["checkerboard"], row["overlap_values"]
        axes[top + 1, j].set_xlabel(
            f"checkerboard {'null' if score is None else f'{score:g}'}\n"
            + (f"values {_fmt(values)}" if values is not None else "values: many"),
            fontsize=9,
        )
        axes[top + 2, j].set_xlabel(f"ripple {row['init_ripple']:g}", fontsize=9)
    for k in range(len(rows), blocks * per_line):  # empty cells of the last block
        for i in range(3):
            axes[3 * (k // per_line) + i, k % per_line].axis("off")
    for b in range(blocks):
        for i, title in enumerate(row_titles):
            axes[3 * b + i, 0].set_ylabel(title, fontsize=9)
    fig.suptitle(
        "Upsamplers at scale 2 (Odena et al. 2016). Dashed: the interior the checkerboard score\n"
        "(max/min of the overlap) is taken over. Ripple: (max-min)/max|.| of the interior at init.",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(
    out: Path, *, timing_shape: tuple[int, int, int, int] | None = None, repeats: int = 5
) -> list[dict]:
    """Measure every variant (`measure_upsamplers`); write out/upsamplers.{md,json,png}; return
    the rows. All three files are rendered first, then each written atomically."""
    out = Path(out)
    timing_shape = timing_shape or TIMING_SHAPE
    rows, maps = _measure(timing_shape=timing_shape, repeats=repeats)
    files = {  # everything rendered before anything is written
        "upsamplers.md": _markdown(rows, timing_shape, repeats).encode(),
        "upsamplers.json": (json.dumps(rows, indent=2, allow_nan=False) + "\n").encode(),
        "upsamplers.png": _figure_png(rows, maps),
    }
    out.mkdir(parents=True, exist_ok=True)
    for filename, data in files.items():
        write_bytes(out / filename, data)
    logger.debug("wrote %s", ", ".join(str(out / f) for f in files))
    return rows
