"""`pixelwise experiment receptive-field`: how much must a pixel see, and what does seeing cost?

The lecture's three steps, trained on the same data with the same budget:

* `patch_classifier`: classify each pixel from the P x P patch around it. Run literally (one
  patch per pixel, `sliding_window`) it recomputes every overlapping patch; run densely (its
  fully-connected layers as 1x1 convs) the same weights cost far less. Both times are reported.
* `flat_fcn`: stride-1 convolutions at full resolution: the receptive field grows by 2 px per
  3x3 layer, the cost by a full-resolution layer.
* `unet`: downsample, then upsample with skips: a receptive field larger than the image for a
  fraction of the cost.

Each row: val mIoU, boundary F, receptive field (input pixels per side; an upper bound for
U-Net), output stride, parameters, FLOPs per image and ms per image (one thread).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from pixelwise.experiments import ExperimentOptions
from pixelwise.experiments.common import (
    SMALL_SCENE,
    Variant,
    dataset_classes,
    inference_ms,
    make_data,
    resolve_budget,
    score_variant,
    setting_dict,
)
from pixelwise.experiments.report import (
    check_out,
    count,
    draw_examples,
    figure_png,
    fixed,
    markdown_table,
    plain,
    pyplot,
    settings_markdown,
    write_report,
)

logger = logging.getLogger(__name__)

NAME = "receptive-field"

DEFAULTS = {"size": 64, "num": 600, "steps": 300, "batch_size": 8, "lr": 3e-3, "patch": 33,
            "width": 32, "unet_width": 16}
QUICK = {"size": 32, "num": 10, "steps": 2, "batch_size": 4, "lr": 3e-3, "patch": 9,
         "width": 4, "unet_width": 4}
LOSS = "ce+dice"
EXAMPLES = (0, 1, 2)
SLIDING_CROP = 16  # the sliding window is timed on a 16 x 16 crop and scaled to the image

COLUMNS = [
    ("name", "model", plain),
    ("miou", "mIoU", fixed(3)),
    ("boundary_f", "boundary F", fixed(3)),
    ("receptive_field", "receptive field (px)", plain),
    ("output_stride", "output stride", plain),
    ("params", "params", count),
    ("flops", "FLOPs/image", count),
    ("ms_per_image", "ms/image", fixed(2)),
    ("sliding_ms_per_image", "ms/image, sliding window", fixed(1)),
    ("train_seconds", "train s", fixed(1)),
]


def variants(base: dict[str, Any]) -> dict[str, Variant]:
    """Patch classifier (receptive field P), flat FCNs of 8 and 16 layers (17 and 33 px), U-Net."""
    width = base["width"]
    return {
        "patch_classifier": Variant("patch_classifier", "patch_classifier",
                                    {"patch_size": base["patch"], "width": width,
                                     "hidden": 2 * width}),
        "flat_fcn": Variant("flat_fcn", "flat_fcn", {"depth": 8, "width": width}),
        "flat_fcn_deep": Variant("flat_fcn_deep", "flat_fcn", {"depth": 16, "width": width}),
        "unet": Variant("unet", "unet", {"width": base["unet_width"], "depth": 3}),
    }


def sliding_window_ms(model: torch.nn.Module, size: int) -> float:
    """ms per size x size image of `model.sliding_window` (one patch per pixel), timed on a
    SLIDING_CROP x SLIDING_CROP image and scaled by the pixel count (its cost is linear in it)."""
    crop = min(size, SLIDING_CROP)
    x = torch.rand(1, model.in_channels, crop, crop)
    ms = inference_ms(lambda t: model.sliding_window(t, batch_size=crop * crop), x,
                      budget_s=0.2, repeats=2)
    return ms * (size * size) / (crop * crop)


def run(out: Path, options: ExperimentOptions) -> dict[str, Any]:
    """Train and score a patch classifier, flat FCNs and a U-Net; write
    receptive-field.{md,png,json} in `out`."""
    check_out(out, NAME, overwrite=options.overwrite)
    base = QUICK if options.quick else DEFAULTS
    size, num = options.size or base["size"], options.num or base["num"]
    budget = resolve_budget(options.budget_steps, options.budget_seconds, base["steps"])
    rows: list[dict[str, Any]] = []
    examples: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="pixelwise-receptive-field-") as work:
        data = make_data(Path(work) / "data", size=size, num=num, seed=options.seed)
        class_names, class_colors = dataset_classes(data)
        for name, variant in variants(base).items():
            row, examples[name], trained = score_variant(
                variant, data, Path(work), size=size, budget=budget,
                batch_size=base["batch_size"], lr=base["lr"], loss=LOSS, seed=options.seed,
                keep=EXAMPLES, timing_s=0.01 if options.quick else 0.3)
            row["sliding_ms_per_image"] = (sliding_window_ms(trained.model, size)
                                           if hasattr(trained.model, "sliding_window") else None)
            rows.append(row)
    settings = setting_dict(size=size, num=num, seed=options.seed, budget=budget,
                            batch_size=base["batch_size"], lr=base["lr"], loss=LOSS,
                            scene=SMALL_SCENE, quick=options.quick)
    report = {"experiment": NAME, "settings": settings, "rows": rows}
    paths = write_report(out, NAME, markdown=_markdown(rows, settings), data=report,
                         png=_figure(rows, examples, class_names, class_colors, settings))
    return {**report, "files": paths}


def _markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    by_name = {r["name"]: r for r in rows}
    patch = by_name.get("patch_classifier", {})
    speedup = ""
    if patch.get("sliding_ms_per_image") and patch.get("ms_per_image"):
        speedup = (f" The patch classifier's dense pass is "
                   f"{patch['sliding_ms_per_image'] / patch['ms_per_image']:.0f}x faster than "
                   "its sliding window, with the same weights and the same output.")
    return f"""# Receptive field vs cost: patch classifier, flat FCN, U-Net

Each model trained on the same {settings['size']}x{settings['size']} synthetic scenes (things
are {SMALL_SCENE.thing_size[0]:g}-{SMALL_SCENE.thing_size[1]:g} of the side, stuff regions span
the image), same seed and budget ({settings['budget']} per model); val split.{speedup}

{markdown_table(rows, COLUMNS)}

- receptive field: input pixels per side that can reach one output pixel (exact for the chain
  models, an upper bound for U-Net, whose receptive field exceeds the image).
- FLOPs: 2 per multiply-add of convolutions, one {settings['size']}x{settings['size']} image.
  ms/image: one thread, best of several calls; the sliding window is timed on a
  {SLIDING_CROP}x{SLIDING_CROP} crop and scaled by the pixel count.

## Settings
{settings_markdown(settings)}
"""


def _figure(rows: list[dict[str, Any]], examples: dict[str, list], class_names: list[str],
            class_colors: list[list[int]] | None, settings: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig = plt.figure(figsize=(11.0, 10.0))
    outer = fig.add_gridspec(2, 1, height_ratios=[1.0, 1.6], hspace=0.3, left=0.08, right=0.97,
                             top=0.92, bottom=0.08)
    top = outer[0].subgridspec(1, 2, wspace=0.25)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_rf, ax_ms = fig.add_subplot(top[0]), fig.add_subplot(top[1])
    for i, r in enumerate(rows):
        color = colors[i % len(colors)]
        rf = r["receptive_field"] or settings["size"]
        ax_rf.scatter([rf], [r["miou"]], s=40 + 200 * math.sqrt(r["flops"] / max(
            x["flops"] for x in rows)), color=color, label=r["name"])
        ax_ms.scatter([r["ms_per_image"]], [r["miou"]], color=color, s=60, label=r["name"])
        if r.get("sliding_ms_per_image"):
            ax_ms.scatter([r["sliding_ms_per_image"]], [r["miou"]], color=color, marker="x", s=60)
            ax_ms.annotate("", xy=(r["ms_per_image"], r["miou"]),
                           xytext=(r["sliding_ms_per_image"], r["miou"]),
                           arrowprops={"arrowstyle": "->", "color": color})
            ax_ms.annotate("sliding window", (r["sliding_ms_per_image"], r["miou"]),
                           textcoords="offset points", xytext=(-10, 8), fontsize=8, ha="right")
    ax_rf.axvline(settings["size"], color="gray", linestyle="--", linewidth=1)
    ax_rf.annotate("image side", (settings["size"], 0.95), fontsize=8, color="gray",
                   textcoords="offset points", xytext=(3, 0))
    ax_rf.set_xscale("log")
    ax_rf.set_xlabel("receptive field (px, log)")
    ax_rf.set_ylabel("val mIoU")
    ax_rf.set_title("mIoU vs receptive field (marker area ~ FLOPs)", fontsize=10)
    ax_ms.set_xscale("log")
    ax_ms.set_xlabel("ms per image, one thread (log)")
    ax_ms.set_title("mIoU vs inference time", fontsize=10)
    from matplotlib.ticker import LogFormatter, NullFormatter

    for ax in (ax_rf, ax_ms):
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(NullFormatter())  # crowded labels on short log ranges
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    ax_rf.legend(fontsize=8, loc="upper left", markerscale=0.6)
    captions = {r["name"]: f"mIoU {r['miou']:.3f}, RF {r['receptive_field'] or 'all'}"
                for r in rows}
    draw_examples(fig, outer[1], examples, class_names, captions=captions,
                  class_colors=class_colors)
    fig.suptitle(f"Receptive field vs cost on {settings['size']}x{settings['size']} synthetic "
                 f"scenes, {settings['budget']} per model (val images)", fontsize=11)
    return figure_png(fig)
