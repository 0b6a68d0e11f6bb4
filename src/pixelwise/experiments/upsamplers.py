"""`pixelwise experiment upsamplers`: which upsampler should a U-Net decoder use?

The same U-Net (plain encoder) is trained with every operator of `pixelwise.upsample.UPSAMPLERS`
in all its decoder stages, on the same synthetic data, from the same seed and with the same
budget. Each row: val mIoU, boundary F-score (2 px), pixel accuracy, parameters, ms per image
(one thread), the operator's checkerboard score (`pixelwise.inspect_upsamplers`: max/min of its
overlap pattern; 1 = even, "-" = holes: bed of nails and max unpooling leave 3 of 4 outputs
empty) and the trained network's output checkerboard (share of the logits' energy at the
period-2 frequencies).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pixelwise.experiments import ExperimentOptions
from pixelwise.experiments.common import (
    SMALL_SCENE,
    Variant,
    dataset_classes,
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
    grouped_bars,
    markdown_table,
    plain,
    pyplot,
    settings_markdown,
    write_report,
)
from pixelwise.upsample import UPSAMPLERS

logger = logging.getLogger(__name__)

NAME = "upsamplers"

# image side, images, steps per model, U-Net width and depth, batch size, learning rate
DEFAULTS = {"size": 64, "num": 600, "steps": 300, "width": 16, "depth": 3, "batch_size": 8,
            "lr": 3e-3}
QUICK = {"size": 32, "num": 10, "steps": 2, "width": 4, "depth": 2, "batch_size": 4, "lr": 3e-3}
LOSS = "ce+dice"
EXAMPLES = (0, 1, 2)  # val images shown in the figure

COLUMNS = [
    ("name", "upsampler", plain),
    ("miou", "mIoU", fixed(3)),
    ("boundary_f", "boundary F", fixed(3)),
    ("pixel_accuracy", "pixel acc.", fixed(3)),
    ("params", "params", count),
    ("ms_per_image", "ms/image", fixed(2)),
    ("checkerboard", "checkerboard (op)", fixed(2)),
    ("output_checkerboard", "output checkerboard", fixed(4)),
    ("train_seconds", "train s", fixed(1)),
]


def variants(width: int, depth: int) -> dict[str, Variant]:
    """One U-Net per upsampler, all else equal."""
    return {name: Variant(name, "unet", {"width": width, "depth": depth, "upsample": name})
            for name in UPSAMPLERS}


def operator_checkerboard() -> dict[str, float | None]:
    """upsampler name -> checkerboard score of the operator with its default options."""
    from pixelwise.inspect_upsamplers import measure_upsamplers

    rows = measure_upsamplers(timing_shape=(1, 1, 8, 8), repeats=1)  # tiny: only the scores matter
    return {row["name"]: row["checkerboard"] for row in rows if row["name"] in UPSAMPLERS}


def run(out: Path, options: ExperimentOptions) -> dict[str, Any]:
    """Train, evaluate and time a U-Net per upsampler; write upsamplers.{md,png,json} in `out`."""
    check_out(out, NAME, overwrite=options.overwrite)
    base = QUICK if options.quick else DEFAULTS
    size, num = options.size or base["size"], options.num or base["num"]
    budget = resolve_budget(options.budget_steps, options.budget_seconds, base["steps"])
    checker = operator_checkerboard()
    rows: list[dict[str, Any]] = []
    examples: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="pixelwise-upsamplers-") as work:
        data = make_data(Path(work) / "data", size=size, num=num, seed=options.seed)
        class_names, class_colors = dataset_classes(data)
        for name, variant in variants(base["width"], base["depth"]).items():
            row, examples[name], _ = score_variant(
                variant, data, Path(work), size=size, budget=budget,
                batch_size=base["batch_size"], lr=base["lr"], loss=LOSS, seed=options.seed,
                keep=EXAMPLES, timing_s=0.01 if options.quick else 0.3)
            row["checkerboard"] = checker.get(name)
            rows.append(row)
    settings = setting_dict(size=size, num=num, seed=options.seed, budget=budget,
                            batch_size=base["batch_size"], lr=base["lr"], loss=LOSS,
                            scene=SMALL_SCENE, model="unet", width=base["width"],
                            depth=base["depth"], quick=options.quick)
    report = {"experiment": NAME, "settings": settings, "rows": rows}
    paths = write_report(out, NAME, markdown=_markdown(rows, settings), data=report,
                         png=_figure(rows, examples, class_names, class_colors, settings))
    return {**report, "files": paths}


def _markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    best = max(rows, key=lambda r: r["miou"] or 0.0)["name"] if rows else "-"
    return f"""# Upsamplers in a U-Net decoder

The same U-Net (plain encoder, width {settings['width']}, depth {settings['depth']}) trained with
each upsampler in every decoder stage, on the same synthetic data, seed and budget
({settings['budget']} per model). Metrics on the val split; best mIoU: **{best}**.

{markdown_table(rows, COLUMNS)}

- boundary F: Csurka's BF score, 2 px tolerance. ms/image: one forward pass of a
  {settings['size']}x{settings['size']} image on one CPU thread, best of several calls.
- checkerboard (op): max/min of the operator's overlap pattern (how many inputs reach each
  output; `pixelwise upsamplers` explains it): 1 is even; "-" means some outputs get no input
  (bed of nails, max unpooling fill one pixel of four).
- output checkerboard: share of the trained network's logit energy at the period-2 (Nyquist)
  frequencies on the val images; higher means more checkerboard left in the output.
- A short budget on small images: differences of a few hundredths are within the noise of one
  seed; rerun with `--seed` or a larger `--budget-steps` before concluding.

## Settings
{settings_markdown(settings)}
"""


def _figure(rows: list[dict[str, Any]], examples: dict[str, list], class_names: list[str],
            class_colors: list[list[int]] | None, settings: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig = plt.figure(figsize=(max(12.0, 1.35 * (len(rows) + 2)), 8.0))
    outer = fig.add_gridspec(2, 1, height_ratios=[2.2, 1.0], hspace=0.3, left=0.05, right=0.98,
                             top=0.9, bottom=0.1)
    captions = {r["name"]: f"mIoU {r['miou']:.3f}" for r in rows if r["miou"] is not None}
    draw_examples(fig, outer[0], examples, class_names, captions=captions,
                  class_colors=class_colors)
    grouped_bars(fig.add_subplot(outer[1]), rows,
                 [("miou", "val mIoU"), ("boundary_f", "boundary F (2 px)")])
    fig.suptitle(f"U-Net with each upsampler: {settings['size']}x{settings['size']} synthetic "
                 f"scenes, {settings['budget']} per model (val images)", fontsize=11)
    return figure_png(fig)
