"""`pixelwise experiment fcn-skips`: what FCN's skips buy (Long et al. 2015, Table 2).

FCN-32s, FCN-16s and FCN-8s share one encoder (plain, depth 5: stride 32) and differ only in the
zero-initialised score skips from the stride-16 and stride-8 stages. Each is trained on the same
synthetic data, from the same seed, with the same budget, and scored with the paper's four
numbers (pixel accuracy, mean accuracy, mean IU, frequency-weighted IU) plus the boundary
F-score, where finer skips should help most. Unlike the paper, which trained FCN-16s from
FCN-32s and FCN-8s from FCN-16s ("staged"), every net here is trained from scratch in one go
(the "all-at-once" recipe of the journal version, which reaches the same accuracy).
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

logger = logging.getLogger(__name__)

NAME = "fcn-skips"

# 128 px: the stride-32 score map of FCN-32s is 4 x 4, coarse enough to see what skips add
DEFAULTS = {"size": 128, "num": 600, "steps": 300, "width": 16, "depth": 5, "batch_size": 8,
            "lr": 3e-3}
QUICK = {"size": 32, "num": 10, "steps": 2, "width": 4, "depth": 5, "batch_size": 4, "lr": 3e-3}
LOSS = "ce"  # the paper's per-pixel softmax loss
EXAMPLES = (0, 1, 2)

# the paper's Table 2 (PASCAL VOC 2011 segval subset), in percent
PAPER_TABLE_2 = [
    {"name": "FCN-32s (paper)", "pixel_accuracy": 89.1, "mean_accuracy": 73.3, "miou": 59.4,
     "fw_iou": 81.4},
    {"name": "FCN-16s (paper)", "pixel_accuracy": 90.0, "mean_accuracy": 75.7, "miou": 62.4,
     "fw_iou": 83.0},
    {"name": "FCN-8s (paper)", "pixel_accuracy": 90.3, "mean_accuracy": 75.9, "miou": 62.7,
     "fw_iou": 83.2},
]

COLUMNS = [
    ("name", "model", plain),
    ("pixel_accuracy", "pixel acc.", fixed(3)),
    ("mean_accuracy", "mean acc.", fixed(3)),
    ("miou", "mean IU", fixed(3)),
    ("fw_iou", "f.w. IU", fixed(3)),
    ("boundary_f", "boundary F", fixed(3)),
    ("params", "params", count),
    ("ms_per_image", "ms/image", fixed(2)),
    ("train_seconds", "train s", fixed(1)),
]
PAPER_COLUMNS = [
    ("name", "model", plain),
    ("pixel_accuracy", "pixel acc.", fixed(1)),
    ("mean_accuracy", "mean acc.", fixed(1)),
    ("miou", "mean IU", fixed(1)),
    ("fw_iou", "f.w. IU", fixed(1)),
]


def variants(width: int, depth: int) -> dict[str, Variant]:
    """FCN-32s, -16s, -8s on the same plain encoder (default upsampler: transposed, bilinear
    init)."""
    return {f"FCN-{s}s": Variant(f"FCN-{s}s", f"fcn{s}s", {"width": width, "depth": depth})
            for s in (32, 16, 8)}


def run(out: Path, options: ExperimentOptions) -> dict[str, Any]:
    """Train and score FCN-32s/16s/8s; write fcn-skips.{md,png,json} in `out`."""
    check_out(out, NAME, overwrite=options.overwrite)
    base = QUICK if options.quick else DEFAULTS
    size, num = options.size or base["size"], options.num or base["num"]
    budget = resolve_budget(options.budget_steps, options.budget_seconds, base["steps"])
    rows: list[dict[str, Any]] = []
    examples: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="pixelwise-fcn-skips-") as work:
        data = make_data(Path(work) / "data", size=size, num=num, seed=options.seed)
        class_names, class_colors = dataset_classes(data)
        for name, variant in variants(base["width"], base["depth"]).items():
            row, examples[name], _ = score_variant(
                variant, data, Path(work), size=size, budget=budget,
                batch_size=base["batch_size"], lr=base["lr"], loss=LOSS, seed=options.seed,
                keep=EXAMPLES, timing_s=0.01 if options.quick else 0.3)
            rows.append(row)
    settings = setting_dict(size=size, num=num, seed=options.seed, budget=budget,
                            batch_size=base["batch_size"], lr=base["lr"], loss=LOSS,
                            scene=SMALL_SCENE, encoder="plain", width=base["width"],
                            depth=base["depth"], upsample="transposed (bilinear init)",
                            quick=options.quick)
    report = {"experiment": NAME, "settings": settings, "rows": rows, "paper": PAPER_TABLE_2}
    paths = write_report(out, NAME, markdown=_markdown(rows, settings), data=report,
                         png=_figure(rows, examples, class_names, class_colors, settings))
    return {**report, "files": paths}


def _ordering(rows: list[dict[str, Any]]) -> str:
    """Whether mean IU grows 32s -> 16s -> 8s, as in the paper."""
    ious = [r["miou"] for r in rows]
    if all(a <= b for a, b in zip(ious, ious[1:])):
        return "mean IU grows from FCN-32s to FCN-16s to FCN-8s, the paper's ordering"
    best = max(rows, key=lambda r: r["miou"])["name"]
    return (f"mean IU does not grow monotonically here (best: {best}); with a short budget on "
            "small images the skips' gain can be within one seed's noise")


def _markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    return f"""# FCN-32s / 16s / 8s: what the skips buy

One plain encoder (depth {settings['depth']}, width {settings['width']}: output stride 32), three
decoders: FCN-32s upsamples the stride-32 class scores 32x in one step; FCN-16s adds
zero-initialised scores of the stride-16 stage, FCN-8s also of the stride-8 stage. Same data,
seed and budget ({settings['budget']} per model); val split. Here {_ordering(rows)}.

{markdown_table(rows, COLUMNS)}

The FCN paper's Table 2 (PASCAL VOC 2011 segval subset, VGG16 pretrained on ImageNet, percent):

{markdown_table(PAPER_TABLE_2, PAPER_COLUMNS)}

- pixel acc. = sum_i n_ii / sum_i t_i; mean acc. = mean_i n_ii / t_i; mean IU = mean_i n_ii /
  (t_i + sum_j n_ji - n_ii); f.w. IU weighs each class's IU by its pixel share (Sec. 5 of the
  paper). boundary F: Csurka's BF score, 2 px tolerance.
- Every net is trained from scratch at once (the paper trained 16s from 32s and 8s from 16s).

## Settings
{settings_markdown(settings)}
"""


def _figure(rows: list[dict[str, Any]], examples: dict[str, list], class_names: list[str],
            class_colors: list[list[int]] | None, settings: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig = plt.figure(figsize=(11.0, 9.0))
    outer = fig.add_gridspec(2, 1, height_ratios=[2.0, 1.0], hspace=0.28, left=0.06, right=0.98,
                             top=0.91, bottom=0.1)
    captions = {r["name"]: f"mean IU {r['miou']:.3f}" for r in rows}
    draw_examples(fig, outer[0], examples, class_names, captions=captions,
                  class_colors=class_colors)
    grouped_bars(fig.add_subplot(outer[1]), rows,
                 [("pixel_accuracy", "pixel acc."), ("mean_accuracy", "mean acc."),
                  ("miou", "mean IU"), ("fw_iou", "f.w. IU"), ("boundary_f", "boundary F")])
    fig.suptitle(f"FCN-32s / 16s / 8s on {settings['size']}x{settings['size']} synthetic scenes, "
                 f"{settings['budget']} per model (val images)", fontsize=11)
    return figure_png(fig)
