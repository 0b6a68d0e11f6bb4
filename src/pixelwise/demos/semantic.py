"""Demo: semantic segmentation with a U-Net in about two minutes of CPU training.

Writes under `out` (default runs/demo):

    data/            the synthetic dataset (pixelwise layout: images/, masks/, classes.json)
    run/             the training run: config.json, metrics.jsonl, curves.png, best/last
                     checkpoints (safetensors + JSON config: `pixelwise eval/predict out/run`)
    predictions/     a label PNG per val image, and overlays/ with the classes over the image
    examples.png     image | ground truth | prediction for a few val images
    metrics.json     the val metrics of the best checkpoint (mIoU, accuracies, boundary F, ...)
    demo.json        the summary returned (and printed by `pixelwise demo`)

Choices (tuned for two CPU cores, see `SETTINGS`): 64 x 64 images so that a step is cheap;
`DEMO_SCENE`, a clean teaching scene with every class of the default scenes (3 stuff, stick
figures, ellipses, rectangles, triangles) but at most 3 things of 20-45 % of the side, none
hiding another, little noise and blur, no crowd groups, and things painted in their category's
colour (jittered; `thing_colour="category"`), so that colour and shape both tell the class, as in
photographs; a U-Net of width 16 and depth 4; AdamW with a cosine schedule and cross-entropy;
bfloat16 autocast where the CPU has native bf16.
Measured (2 cores, 2 minutes, 1300-1600 steps): val mIoU 0.93-0.94. With random thing colours (shape
alone tells an ellipse from a rectangle or a triangle; the default scenes) the same 2 minutes
give 0.56-0.59: the stuff classes reach IoU 0.9 but the shape classes stay near 0.2, on the
training images too (an optimisation limit, not overfitting); trials at 96 px, with a ResNet-18
encoder, width 32, batch 16, 5x the images or lr 1e-2 did not change that.
Training is budgeted in time: a few probe steps measure the step time and the run gets
`budget_seconds / step time` steps (at least `min_steps`, so a busy machine takes longer
rather than training less), with the cosine schedule spanning exactly those steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from pixelwise.atomic import write_bytes
from pixelwise.data.synth_scene import SceneConfig
from pixelwise.demos._output import MARKER, prepare_out, run_paths, write_json
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

# a clean teaching scene (module docstring)
DEMO_SCENE = SceneConfig(thing_size=(0.2, 0.45), crowd_fraction=0.0, max_things=3,
                         min_visible_fraction=1.0, blur=(0.0, 0.5), noise=(0.005, 0.02),
                         thing_colour="category")
SETTINGS: dict[str, Any] = {
    "size": 64,  # image side (px)
    "num": 800,  # images synthesised; 20 % go to val (400: val mIoU 0.927 vs 0.942 here)
    "options": {"width": 16, "depth": 4},  # U-Net base width and downsamplings
    "batch_size": 8,
    "lr": 3e-3,
    "loss": "ce",
    "budget_seconds": 110.0,  # training wall time
    "min_steps": 400,  # a slow machine trains longer rather than this few steps
    "max_steps": 2000,
    "validations": 4,  # val passes during training (the last one at the end)
    "examples": 4,  # val images in examples.png
    "amp": "auto",  # bfloat16 autocast where the CPU has native bf16 (1.5x the steps here)
}
# a seconds-long run for tests: a fixed number of steps (no probe)
QUICK: dict[str, Any] = {**SETTINGS, "size": 32, "num": 10,
                         "options": {"width": 4, "depth": 2},
                         "batch_size": 4, "budget_seconds": None, "budget_steps": 2,
                         "validations": 1, "examples": 2, "amp": False}
ENTRIES = ("data", "run", "predictions", "examples.png", "metrics.json", MARKER)


def _examples_png(path: Path, examples: list, class_names: list[str], title: str,
                  class_colors: list | None = None) -> None:
    from pixelwise.experiments.report import draw_examples, figure_png, pyplot

    plt = pyplot()
    fig = plt.figure(figsize=(7.5, 2.3 * max(len(examples), 1) + 0.9))
    grid = fig.add_gridspec(1, 1, left=0.02, right=0.98, top=0.9, bottom=0.1)
    draw_examples(fig, grid[0], {"prediction": examples}, class_names, class_colors=class_colors)
    fig.suptitle(title, fontsize=10)
    write_bytes(path, figure_png(fig))


def run(out: Path, *, model: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Synthesise, train, evaluate and predict under `out`; return the summary (see module doc)."""
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.engine.trainer import native_bf16
    from pixelwise.experiments.common import (
        Budget,
        Variant,
        evaluate,
        make_data,
        train_variant,
    )
    from pixelwise.models import MODELS
    from pixelwise.predict import SemanticPredictor, expand_inputs, predict_files

    s = QUICK if quick else SETTINGS
    name = model or "unet"
    if name not in MODELS:
        from pixelwise.errors import unknown_name

        raise unknown_name("model", name, MODELS)
    out = Path(out)
    prepare_out(out, ENTRIES)
    start = time.perf_counter()
    data = make_data(out / "data", size=s["size"], num=s["num"], seed=0, scene=DEMO_SCENE)
    options = dict(s["options"]) if name == "unet" else {}
    budget = Budget(steps=s.get("budget_steps"), seconds=s["budget_seconds"])
    amp = native_bf16() if s["amp"] == "auto" else bool(s["amp"])
    trained = train_variant(
        Variant(name, name, options), data, out / "run", budget=budget,
        batch_size=s["batch_size"], lr=s["lr"], loss=s["loss"], seed=0, validate=True,
        validations=s["validations"], min_steps=s["min_steps"],
        max_steps=s["max_steps"], progress=not quick, overwrite=False, amp=amp,
    )  # fmt: skip
    if trained.step_seconds is not None and trained.steps * trained.step_seconds > 1.2 * s[
            "budget_seconds"]:
        logger.warning("this machine is slower than the demo assumes (%.2f s per step): training "
                       "%d steps takes longer than %g s", trained.step_seconds, trained.steps,
                       s["budget_seconds"])

    best, meta = load_model(out / "run", "best")
    result = evaluate(best, data, keep=range(s["examples"]))
    metrics = {k: v for k, v in result.metrics.items() if k != "output_checkerboard"}
    write_json(out / "metrics.json", metrics)
    predictor = SemanticPredictor(best, meta, batch_size=8)
    predicted = predict_files(predictor, expand_inputs([data / "images" / "val"]),
                              out / "predictions")
    if predicted["failed"]:
        raise UserError(f"could not predict {predicted['failed'][0]['image']}: "
                        f"{predicted['failed'][0]['error']}")
    class_names = list(meta["task"]["class_names"])
    _examples_png(out / "examples.png", result.examples, class_names,
                  f"{name} after {trained.steps} steps: val mIoU {metrics['miou']:.3f}",
                  meta["task"].get("class_colors"))
    summary = {
        "task": "semantic",
        "model": name,
        **run_paths(out, data),
        "predictions": str(out / "predictions"),
        "overlays": str(out / "predictions" / "overlays"),
        "examples": str(out / "examples.png"),
        "val_miou": round(metrics["miou"], 4),
        "val_pixel_accuracy": round(metrics["pixel_accuracy"], 4),
        "val_boundary_f": (None if metrics["boundary_f"] is None
                           else round(metrics["boundary_f"], 4)),
        "goal_miou": 0.90,
        "steps": trained.steps,
        "train_seconds": round(trained.summary["seconds"], 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "next": f"pixelwise eval {out / 'run'}; pixelwise predict {out / 'run'} IMAGE --out DIR",
        "per_class_iou": {k: v["iou"] for k, v in metrics["per_class"].items()},
        "amp": "bfloat16" if amp else None,
        "settings": {**s, "scene": dataclasses.asdict(DEMO_SCENE)},
    }
    write_json(out / MARKER, summary)
    logger.info("demo done in %.0f s: val mIoU %.3f (goal 0.90); see %s", summary["total_seconds"],
                metrics["miou"], out)
    return summary
