"""Quality runs: train a model on a synthetic set within a wall-clock budget, evaluate, compare
with the issue's goal. Prints one table row per recipe (and a JSON record with --json).

    .venv/bin/python benchmarks/quality.py RECIPE [RECIPE ...] [--minutes M | --epochs E]
        [--threads T] [--repeats N] [--out runs/quality] [--json]

Recipes (goals from issues 4-7): semantic-unet, instance-mask_rcnn, instance-solov2,
keypoints, cells-mask_rcnn, panoptic. `--list` prints them.

How the budget is kept: the trainer runs with a time budget (`pixelwise train --time`), so the
schedule spans exactly the budget's wall time (training + validation; data synthesis and the
final evaluation are not counted) and ends with it. A probe of a few training steps first
measures the step time, only to space the recipe's `validations` over the run. Training
uses bfloat16 autocast where the CPU has native bf16 (`--no-amp`: float32). Run recipes one at
a time on a quiet machine (the budget is wall time, so a busy machine gets fewer steps); with
`--threads 1` two recipes can share a 2-core machine, each then trains on one core (a
conservative reading of "2 cores").

Runs of one recipe differ (the timed schedule gives every run other learning rates; seeds).
Until the thirteenth session a `seed` training option (`--train-option seed=N`) was ignored:
the recipe comments' repeated runs since then trained with seed 0 and differ by their timed
schedules only (`--repeats` always gave its seeds):
two 10-minute semantic-unet runs on the same data (2500 images) gave 0.856 and 0.830 mIoU,
two 20-minute instance-mask_rcnn runs 0.517 and 0.444 segm AP50. `--repeats N` trains N times
on the same data with training seeds seed .. seed + N - 1 and prints the mean, sample sd and
range: compare trials by those, not by single runs.

A recipe may evaluate with test-time augmentation (semantic-unet: flip and scales 0.75, 1, 1.25,
as MMSegmentation's multi-scale + flip test; instance-solov2: SOLOv2's flip test;
instance-mask_rcnn: both views' detections merged, `pixelwise.models.rcnn_tta`); the one-pass
figures and both times per image are reported beside it, and `--no-tta` evaluates in one pass
only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# R-CNN settings for small synthetic images (those of the instance demo)
# R-CNN settings for small synthetic images on a CPU: on 96-256 px images the stride-4 FPN level
# and the RoI heads, not the backbone, take most of a step: a 128-wide FPN, thin heads, few RoIs
RCNN = {"backbone": "resnet18", "fpn_channels": 128, "mask_head_layers": [64, 64, 64, 64],
        "box_batch_size_per_image": 64, "rpn_post_nms_top_n_train": 600,
        "rpn_post_nms_top_n_test": 300, "anchor_sizes": [16, 32, 64, 128, 256]}


@dataclass
class Recipe:
    task: str
    model: str
    minutes: float
    goals: dict[str, float]  # "segm.AP50" -> minimum
    synth: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    # test-time augmentation of the evaluation (`evaluate_run`'s tta / tta_scales); the table
    # gives the one-pass figure beside it
    tta: dict[str, Any] = field(default_factory=dict)
    # validations spaced over the run (besides the final one; each chooses the best checkpoint)
    validations: int = 3


RECIPES: dict[str, Recipe] = {
    "semantic-unet": Recipe(
        "semantic", "unet", 10, {"miou": 0.95}, {"num": 2500},
        # whole images, the network on them pooled 4x4 (input_scale 0.25): no shape cut by a
        # crop, each unit sees 4x as far, 16 images a step; its loss at its own 64 x 64
        # resolution against each 4x4 block's label counts (loss_at "net": ~30 % more steps);
        # every image gets the things of another pasted on; files decoded once (cache);
        # channels_last weights, the fused AdamW and the faster block label counts (1.45x
        # faster steps, measured in one session). 10 minutes, width 16, bilinear logits, val
        # mIoU one pass / with the test below, three runs: 0.911 / 0.926 (6775 steps;
        # earlier sessions got 2600-3114), 0.916 / 0.930 (7526, with the flip fast path),
        # 0.912 / 0.928 (7253); mean 0.913 / 0.928.
        # Tried, not kept (one run each unless said): 10000 images 0.910 / 0.923 (5842 steps);
        # input_stem "unshuffle" 0.904 / 0.924 (6373); width 24 0.917 / 0.931 (4269) and
        # 0.919 / 0.933 (second run, 4423), mean 0.918 / 0.932: +0.004, within the spread, for
        # 1.6x the inference time (adopted below with the guided upsampling, over four runs);
        # width 32 0.914 / 0.924 (3079). Before those:
        # three training seeds 0.873 / 0.889 (2918 steps), 0.866 / 0.884 (2600), 0.878 / 0.897
        # (3114); mean 0.872 / 0.890.
        # Before loss_at "net" (500 images): 0.846 / 0.871
        # (2261 steps), 0.834 / 0.856 (seed 1), 0.843 one pass (2391 steps); loss_at "net" on
        # 500 images 0.855 / 0.886 (2908 steps). Earlier: before the cache, the faster label
        # checks and Dice 0.751 (1283 steps); without copy-paste 0.696; random 128 px crops at
        # full resolution: 0.539
        # Now: the logits reach 256 px by joint bilateral upsampling guided by the image
        # (no weights; training unchanged), and width 24. Most of the bilinear errors were
        # within 2 px of a class boundary (without those: 0.912 -> 0.953). Width 16, the
        # three runs above evaluated again with it: 0.938 / 0.949, 0.943 / 0.953,
        # 0.938 / 0.951, and a fourth run 0.938 / 0.947 (6674 steps): mean 0.940 / 0.950.
        # Width 24 (the two runs above evaluated again, then two trained with it, both seed
        # 0): 0.942 / 0.953, 0.944 / 0.955, 0.939 / 0.952 (4179 steps), 0.940 / 0.951 (4021):
        # mean 0.941 / 0.953.
        {"width": 24, "depth": 4, "input_scale": 0.25, "output_upsample": "joint_bilateral"},
        {"batch_size": 16, "lr": 3e-3, "loss": "ce+dice", "loss_at": "net", "class_mix": 1.0,
         "mix_classes": ["person", "ellipse", "rectangle", "triangle"], "cache": True,
         "channels_last": True},
        # evaluated as MMSegmentation's multi-scale + flip test (above)
        # Tried, not kept (one pass / with the test above; 500 images, loss at 256 px):
        # input_stem "unshuffle" 0.835 / 0.856 (2135 steps); 2500 images 0.856 / 0.877 (2091)
        # and, re-run, 0.830 / 0.855 (2031):
        # runs of one setting differ by ~0.025 (the recipe with training seed 1: 0.834 / 0.856,
        # 2186 steps); 10000 images 0.834 / 0.856 (1728); trained on 64 px images and masks
        # (input_scale 1, `size` 64: 1.6x the steps) and run at 256 px with input_scale 0.25:
        # 0.832 (500 images), 0.854 (2500)
        tta={"tta": "flip", "tta_scales": [0.75, 1, 1.25]}),
    "instance-mask_rcnn": Recipe(
        "instance", "mask_rcnn", 20, {"segm.AP50": 0.9, "segm.AP": 0.6}, {"num": 2500},
        # 2500 images (val: 500): segm AP50 / AP 0.566 / 0.369 (1490 steps), 0.624 / 0.419
        # (second run, 1520 steps); mean 0.595 / 0.394; with the fused AdamW and
        # channels_last weights (~13 % faster steps) 0.549 / 0.359 (1586 steps: within the
        # spread). Tried, not kept (2500 images): an
        # auxiliary semantic branch (aux_semantic 1: per-pixel labels from the instance masks)
        # 0.604 / 0.395 (1373 steps) and 0.593 / 0.381 (second run, 1354): mean 0.599 / 0.388, the
        # same in fewer steps; its votes in the scores (semantic_rescore 0.5 / 1) 0.542 / 0.250
        # AP50 (after 20 minutes the branch labels every shape's pixels as rectangle or
        # background); lr 1.5e-3 0.475 / 0.291 (1501 steps); box_head_convs 4 0.500 / 0.309
        # (1254); the second-stage mask classifier (mask_classifier, trained on ground-truth
        # masks) 0.547 / 0.362 (1447 steps; the same model without it 0.578 / 0.382: here the
        # class-agnostic AP50 is only 0.658, large objects' AP 0.14, so naming is not the
        # main loss); with mask_class_agnostic too 0.493 / 0.318 (1366 steps): its classifier
        # names ground-truth rectangles at their boxes right 60 % of the time, the predicted
        # ones (mask IoU ~0.89) 34 %: trained on ground-truth masks, it does not carry over.
        # On 400 images (val: 80):
        # BatchNorm in the FPN and the mask head: 20 minutes, segm AP50 0.517 / AP 0.335
        # (1249 steps); without: 0.457 / 0.288 (1223 steps). Tried, not kept: copy_paste 0.5
        # 0.523 / 0.341 (1198 steps, within noise), mask_roi_size 28 0.390 / 0.238 (865),
        # ema 0.999 0.435 / 0.277 (1152; that run's trained weights 0.444 / 0.281: runs of
        # this recipe differ by ~0.07 AP50); trained and evaluated at 128 px (`size` 128,
        # anchors halved) 0.446 / 0.236 (1887 steps)
        # Since the sixteenth session the RPN filters each thread's share of the images on its
        # own thread (`pixelwise.models.rpn`), keeps 1000 boxes per level before NMS (was
        # torchvision's 2000) and the run validates once before the end (was three times):
        # the step ~0.65 -> ~0.53 s; training seeds 0, 1, 2: 1808, 1672, 1912 steps, 0.676 /
        # 0.472, 0.625 / 0.417, 0.699 / 0.487 (mean 0.667 / 0.459, sd 0.038 AP50). Tried, not
        # kept: mask_roi_levels 1 (every mask RoI from the stride-4 level; with pre-NMS 1000,
        # three validations) 0.599 / 0.402 (1570 steps; nearly every object maps there anyway);
        # mask_classifier with classifier_masks "predicted" (trained on its own class-agnostic
        # masks, mask_class_agnostic) 0.517 / 0.333 (1501 steps; its cross-entropy 0.83 at the
        # end: it had not learnt to name the shapes)
        # Since the seventeenth session without the task's random scale (0.75-1.25: a batch is
        # padded to its largest image) and photometric jitter, the flip kept: the step ~16 %
        # faster (0.50 -> 0.42 s in a profile of 25 steps) and better per step (4.8 epochs of
        # 2000 training images need no more variety): training seeds 0, 1, 2: 2370, 2501, 2384
        # steps, 0.789 / 0.581, 0.769 / 0.567, 0.777 / 0.570 (mean 0.778 / 0.573, sd 0.010
        # AP50). Class-agnostic segm AP50 0.806 (seed 0): the masks of overlapping persons
        # (boxes AP50 0.945, masks 0.764: the mask often takes the person in front). Tried,
        # not kept: mask_head_dilation 2 (the mask convs see the whole RoI) 0.749 / 0.543
        # (2075 steps; the machine was slow that run: 143 ms per image at eval against ~97);
        # lr 7.5e-4 0.773 / 0.570 (2218 steps: within the spread)
        # Since the eighteenth session half of the 64 proposals sampled per image may be
        # positives (box_positive_fraction 0.5; torchvision: 0.25): they are the mask head's
        # training RoIs, so it sees up to twice as many per step (the step ~10 % slower):
        # training seeds 0, 1, 2: 2159, 2096, 2049 steps, 0.811 / 0.597, 0.788 / 0.569,
        # 0.808 / 0.587 (mean 0.802 / 0.584; each seed +0.02-0.03 AP50 over the runs above).
        # Tried, not kept: box_positive_fraction 0.75 0.793 / 0.576 (seed 0, 2138 steps);
        # mask_roi_size 28 (56 x 56 masks) 0.596 / 0.400 (1305 steps: the step ~1.6x slower)
        # Nineteenth session, on a slower machine (the step in a bare loop 0.64-0.81 s against
        # 0.42 s in the seventeenth session's profile; compared by steps, `--epochs 4`: 2000
        # steps, seed 0): the recipe 0.757 / 0.540 (persons' mask AP50 0.749); not kept, within
        # ~0.01 of it: mask_fc_fusion (PANet's fc over the whole RoI) 0.754 / 0.549 (persons
        # 0.759); mask_head_layers [128] x 4 0.763 / 0.557 (persons 0.754): neither a global
        # view of the RoI nor a wider head helps the persons' masks in this many steps
        # Twentieth session (the same slower machine), how far the goal is in steps: the
        # recipe trained 6000 steps (`--epochs 12 --validations 4`, 89 minutes here; ~3x the
        # 20-minute runs above) reaches 0.8999 / 0.702, validated on the way (mid-schedule)
        # 0.684 / 0.475 (1500 steps), 0.871 / 0.664 (3000), 0.893 / 0.692 (4500); persons'
        # masks 0.699 -> 0.835 AP50, the shapes' 0.58-0.74 -> 0.89-0.95 (1500 -> 6000 steps).
        # Not kept: batch 2 (the same 8000 images in 4000 steps, `--epochs 4`) 0.758 / 0.554,
        # as batch 4 in 2000 steps (0.757 / 0.540), at ~1.5x the time per image (the probes:
        # 0.49 s per step of 2 images, 0.66 s per step of 4): it is images, not updates
        # Twenty-first session (a slower machine still: eval ~133-191 ms per image), the
        # training RoIAlign as two GEMMs per image (`separable_roi_align`; the step ~1.13-1.25x
        # faster) and a 64-wide FPN: by steps (2000, `--epochs 4`, seed 0) fpn_channels 64
        # 0.734 / 0.515 against 0.757 / 0.540 at 128, its steps ~1.4x faster; in 20 minutes,
        # back to back on the same machine: 128 wide 1500 steps, 0.662 / 0.458; 64 wide 1876
        # steps, 0.739 / 0.520: adopted. Not kept: backbone_width 32 with fpn_channels 64 (a
        # half-width ResNet-18, steps ~1.8x faster) 0.650 / 0.443 in 2000 steps
        # Twenty-second session, at eval only (the 64-wide run above, its checkpoint evaluated
        # again): maskness 1 (scores x the RoI masks' maskness, SOLOv2's mask score) 0.753 /
        # 0.543; the test-time flip (`--tta flip`: both views merged by NMS, masks voted,
        # `rcnn_tta`) 0.752 / 0.546; both 0.766 / 0.569 (against 0.739 / 0.520). Not kept:
        # the flip test without the mask vote 0.764 / 0.551; scales 1.5 (and 0.75) as views
        # too: lower AP50 (0.751 / 0.570 with 1.5 and its flip; the model never saw them).
        # The twentieth session's 6000-step checkpoint (128 wide) 0.8999 / 0.702: with
        # maskness 0.902 / 0.720, with both 0.909 / 0.749. Trained with maskness 1: seed 0
        # 1966 steps, 0.727 / 0.523 one pass, 0.736 / 0.547 with the flip (135 / 232 ms per
        # image; its one validation fell at the end: 20.8 minutes, see `about` below); seed 1
        # (after that fix: 20.0 minutes) 1941 steps, 0.731 / 0.522, 0.742 / 0.547
        {**RCNN, "fpn_channels": 64, "head_norm": "bn", "rpn_pre_nms_top_n_train": 1000,
         "box_positive_fraction": 0.5, "maskness": 1.0},
        {"batch_size": 4, "lr": 5e-4, "clip_grad": 10.0, "channels_last": True,
         "scale_jitter": [1, 1], "color_jitter": 0.0},
        tta={"tta": "flip"},
        # one validation at about 80 % of the budget and the final one (~43-50 s each)
        validations=1),
    "instance-solov2": Recipe(
        "instance", "solov2", 30, {"segm.AP50": 0.8}, {"num": 2500},
        # the paper's scale ranges are for 800-1333 px images: on 256 px images 98 % of the objects
        # would fall in level 0 and levels 2-4 would never get one; scaled by ~1/3 they spread over
        # levels 0-3
        # two convs per head tower (the paper: 4): 2339 steps in 30 minutes, segm AP50 0.456 /
        # AP 0.285; with 4: 1680 steps, 0.403 / 0.235 (one run each: within the ~0.07 AP50
        # spread of single runs, adopted as the cheaper of two equals). Tried, not kept: trained
        # and evaluated at 128 px (`size` 128, scale ranges halved) 0.466 / 0.254 (4228 steps).
        # Those on 400 images (val 80); now 2500 (val 500) and channels_last weights with the
        # fused AdamW: 3915 steps, segm AP50 0.618 / AP 0.425 (one run; +0.16 AP50, beyond the
        # spread of single runs). That model's class-agnostic segm AP50 was 0.788: it found the
        # shapes but misnamed them (39 % of its detections matching an object at mask IoU 0.5
        # had the wrong class). Now with the second-stage mask classifier
        # (`pixelwise.models.mask_classifier`): 3321 steps, 0.804 / 0.563 (109 ms per image);
        # training seed 1: 3197 steps, 0.791 / 0.544 (97 ms); seed 2: 3101 steps, 0.776 / 0.536
        # (the machine was busy for its first minutes); seed 3: 3057 steps, 0.779 / 0.537. Its
        # first trial (GroupNorm, no crop symmetries, the second Matrix NMS thresholded): 0.657 /
        # 0.446
        {"backbone": "resnet18", "fpn_channels": 128, "head_channels": 128, "kernel_channels": 128,
         "mask_channels": 64, "stacked_convs": 2,
         "scale_ranges": [[1, 32], [16, 64], [32, 128], [64, 256], [128, 2048]],
         "mask_classifier": True},
        {"batch_size": 4, "lr": 5e-4, "clip_grad": 10.0, "channels_last": True},
        # SOLOv2's own test-time flip (`SOLOv2.set_flip_test`: grid cells averaged with their
        # mirror cells, masks with theirs, the classifier over its crops' 8 symmetries); the
        # four runs above with it: 0.820 / 0.582, 0.804 / 0.562, 0.792 / 0.554, 0.792 / 0.555
        # (mean 0.802 / 0.563; 216 ms per image against 95 ms in one pass). Since the
        # fifteenth session GroupNorm normalises an NCHW copy (`pixelwise.models.norm`: the
        # step 8-12 % faster with channels_last weights) and the run validates twice (below):
        # training seed 0 3635 steps (3321 before), 0.825 / 0.580 one pass, 0.833 / 0.596
        # with the flip (82 / 192 ms per image); seed 1 3621 steps, 0.839 / 0.599, 0.848 /
        # 0.616; seed 2 3667 steps, 0.821 / 0.581, 0.837 / 0.601 (one pass mean 0.828 / 0.587,
        # with the flip 0.839 / 0.604)
        tta={"tta": "flip"},
        # one validation at about 80 % of the budget and the final one (~40 s each on 500
        # images; four took 9 % of the budget)
        validations=1),
    "keypoints": Recipe(
        "keypoints", "keypoint_rcnn", 20, {"keypoints.AP": 0.5}, {"num": 400},
        {**{k: v for k, v in RCNN.items() if k != "mask_head_layers"},
         "keypoint_head_layers": [128, 128, 128, 128]},
        {"batch_size": 4, "lr": 5e-4, "clip_grad": 10.0}),
    "cells-mask_rcnn": Recipe(
        "instance", "mask_rcnn", 20, {"segm.AP50": 0.7},
        {"num": 200, "cells": True, "gray16": True, "image_format": "tif"},
        {**RCNN, "box_detections_per_img": 300, "rpn_post_nms_top_n_test": 1000,
         "rpn_pre_nms_top_n_test": 2000, "anchor_sizes": [8, 16, 32, 64, 128]},
        {"batch_size": 2, "lr": 5e-4, "clip_grad": 10.0}),
    "panoptic": Recipe(
        "panoptic", "panoptic_fpn", 30, {"pq": 0.6}, {"num": 400},
        {**RCNN, "semantic_channels": 64}, {"batch_size": 4, "lr": 5e-4, "clip_grad": 10.0}),
}
PROBE_STEPS = 6


def _data(recipe: Recipe, root: Path, size: int, seed: int) -> Path:
    """The recipe's synthetic set, synthesised once per (task, options) under `root`."""
    from pixelwise.data.synthetic import synthesize

    key = "-".join([recipe.task, str(size), str(seed),
                    *(f"{k}={v}" for k, v in sorted(recipe.synth.items()))])
    path = root / "data" / key
    if not (path / "DONE").exists():
        shutil.rmtree(path, ignore_errors=True)
        synthesize(recipe.task, path, size=(size, size), seed=seed, **recipe.synth)
        (path / "DONE").write_text("")
    return path


def _lookup(metrics: dict[str, Any], dotted: str) -> float:
    value: Any = metrics
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def ms_per_image(run: Path, data: Path, task: Any, images: int = 20,
                 tta: dict[str, Any] | None = None) -> float:
    """Median eval-mode forward time (ms) of the run's best model on single val images, at the
    current number of threads (with `tta`: all its views)."""
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.predict.tta import apply_tta, parse_tta

    model, _ = load_model(run, "best")
    model.eval()
    if tta:
        model = apply_tta(model, parse_tta(tta.get("tta"), tta.get("tta_scales"), task.name),
                          task.name, run)
    dataset = task.dataset(data, "val")
    times = []
    with torch.inference_mode():
        for i in range(min(images, len(dataset))):
            image = dataset[i][0].as_subclass(torch.Tensor)
            start = time.perf_counter()
            model([image]) if task.name != "semantic" else model(image[None])
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def run_recipe(name: str, *, root: Path, minutes: float | None, size: int,
               epochs: int | None = None,
               seed: int, amp: bool = False, options: dict[str, Any] | None = None,
               train_options: dict[str, Any] | None = None,
               synth_options: dict[str, Any] | None = None,
               tag: str = "", tta: bool = True, train_seed: int | None = None,
               validations: int | None = None) -> dict[str, Any]:
    from pixelwise.cli.eval import evaluate_run
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train
    from pixelwise.models import model_options
    from pixelwise.tasks import TASKS

    recipe = RECIPES[name]
    recipe = Recipe(recipe.task, recipe.model, recipe.minutes, recipe.goals,
                    _merged(recipe.synth, synth_options), _merged(recipe.options, options),
                    _merged(recipe.train, train_options), recipe.tta if tta else {},
                    validations or recipe.validations)
    budget = 60.0 * (minutes if minutes is not None else recipe.minutes)
    data = _data(recipe, root, size, seed)
    task = TASKS[recipe.task].from_data(data)
    accepted = model_options(recipe.model)
    model_opts = {k: v for k, v in recipe.options.items() if k in accepted}
    ignored = sorted(set(recipe.options) - set(accepted))
    if ignored:
        logging.info("%s: options not taken by %s: %s", name, recipe.model, ", ".join(ignored))
    model_opts.update(task.model_options(recipe.model) if hasattr(task, "model_options") else {})
    # the training seed: --repeats, else a `seed` training option, else the data's `seed`
    if train_seed is None:
        train_seed = int(recipe.train.get("seed", seed))
    base = TrainConfig(data=str(data), out=str(root / (name + tag) / "probe"), task=recipe.task,
                       model=recipe.model, model_options=model_opts, progress=False,
                       seed=train_seed, amp=amp,
                       **{k: v for k, v in recipe.train.items() if k != "seed"})
    # probe: the step time on this machine
    probe = train(base.replace(epochs=1, max_steps=PROBE_STEPS, val_every=10 ** 6),
                  overwrite=True)
    record = json.loads((Path(probe["out"]) / "metrics.jsonl").read_text().splitlines()[-1])
    step_seconds = record["train_seconds"] / max(probe["steps"], 1)  # validation left out
    n_train = len(task.dataset(data, "train"))
    steps_per_epoch = max(1, n_train // base.batch_size)
    # 0.8: the validations spaced over `about` epochs must come before the end even when the
    # probe's steps were faster than the run's (at 0.9 a twenty-second-session run trained
    # 1966 of the probe's ~2000 steps, so its one validation fell at the end, the trainer had
    # no validation time to reserve, and the final one ran 50 s past the budget)
    about = max(1, int(0.8 * budget / (step_seconds * steps_per_epoch)))
    logging.info("%s: %.2f s per step, %d steps per epoch -> about %d epochs in %.0f s", name,
                 step_seconds, steps_per_epoch, about, budget)
    timed = {"time_budget": budget / 60}
    if epochs is not None:  # a fixed length instead of the budget (the schedule spans it)
        timed = {"time_budget": None, "epochs": epochs}
    epochs = epochs or about
    cfg = base.replace(out=str(root / (name + tag) / "run"), **timed,
                       val_every=max(1, math.ceil(epochs / recipe.validations)), progress=True)
    started = time.perf_counter()
    summary = train(cfg, overwrite=True)
    wall = time.perf_counter() - started
    metrics = evaluate_run(Path(cfg.out), data, which="best", **recipe.tta)
    reached = {goal: _lookup(metrics, goal) for goal in recipe.goals}
    one_pass = None
    if recipe.tta:
        plain = evaluate_run(Path(cfg.out), data, which="best")
        one_pass = {goal: _lookup(plain, goal) for goal in recipe.goals}
    if recipe.task != "semantic":  # the COCO headline numbers too
        head = "keypoints" if recipe.task == "keypoints" else "segm"
        for key in ("AP", "AP50"):
            if head in metrics:
                reached.setdefault(f"{head}.{key}", float(metrics[head][key]))
            if one_pass is not None and head in plain:  # in the same order
                one_pass.setdefault(f"{head}.{key}", float(plain[head][key]))
    return {
        "recipe": name + tag,
        "overrides": {"options": options or {}, "train": train_options or {},
                      "synth": synth_options or {}},
        "task": recipe.task, "model": recipe.model, "model_options": model_opts,
        "data": str(data), "train_seed": base.seed,
        "threads": torch.get_num_threads(), "amp": "bfloat16" if amp else None,
        "budget_minutes": budget / 60,
        "train_minutes": round(wall / 60, 2), "trainer_minutes": round(summary["seconds"] / 60, 2),
        "steps": summary["steps"], "epochs": summary["epochs"], "batch_size": cfg.batch_size,
        "metrics": reached, "goals": recipe.goals, "tta": recipe.tta or None,
        "one_pass_metrics": one_pass,
        "met": all(reached[g] >= v for g, v in recipe.goals.items()),
        "ms_per_image": round(ms_per_image(Path(cfg.out), data, task), 1),
        "ms_per_image_tta": (round(ms_per_image(Path(cfg.out), data, task, tta=recipe.tta), 1)
                             if recipe.tta else None),
        "run": cfg.out,
    }


def _merged(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    """`base` updated by `over`; a None value removes the setting."""
    return {k: v for k, v in {**base, **(over or {})}.items() if v is not None}


def _overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """KEY=JSON strings -> dict (a bare word that is not JSON is taken as a string; KEY=null
    removes the recipe's own setting)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"override {item!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--minutes", type=float, help="budget (default: the recipe's goal)")
    parser.add_argument("--epochs", type=int, metavar="E",
                        help="train E epochs instead of the time budget: trials compared by "
                             "steps on a machine slower or faster than the one the recipe's "
                             "runs were timed on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and training")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="train N times on the same data (training seeds seed, seed + 1, "
                             "...) and give the mean and spread: one run of a recipe differs "
                             "from the next by ~0.025 mIoU / ~0.07 AP50")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (default: where the CPU has native bf16)")
    parser.add_argument("--json", action="store_true", help="print JSON records")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="override a model option of the recipe, e.g. encoder=resnet18 or "
                             "depth=null (removes it)")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=JSON",
                        help="override a training setting, e.g. lr=0.001 or crop=[96,96]")
    parser.add_argument("--synth-option", action="append", default=[], metavar="KEY=JSON",
                        help="override a synthesis setting of the recipe's data, e.g. num=2500 "
                             "(another data folder; the goals are for the recipe's own data)")
    parser.add_argument("--tag", default="", help="suffix of the output folder (trials)")
    parser.add_argument("--validations", type=int, metavar="N",
                        help="validations spaced over the run, the final one included "
                             "(default: the recipe's); each is in metrics.jsonl: a learning "
                             "curve of one run")
    parser.add_argument("--no-tta", dest="tta", action="store_false",
                        help="evaluate in one pass even where the recipe has test-time "
                             "augmentation")
    args = parser.parse_args(argv)
    if args.list or not args.recipes:
        for name, r in RECIPES.items():
            print(f"{name:20s} {r.task:10s} {r.model:14s} {r.minutes:g} min  goals {r.goals}")
        return 0
    unknown = [n for n in args.recipes if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; see --list")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    from pixelwise.atomic import write_json
    from pixelwise.engine.trainer import native_bf16

    amp = native_bf16() if args.amp is None else args.amp
    options, train_options = _overrides(parser, args.option), _overrides(parser, args.train_option)
    synth_options = _overrides(parser, args.synth_option)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.validations is not None and args.validations < 1:
        parser.error("--validations must be at least 1")
    records = []
    for name in args.recipes:
        for repeat in range(args.repeats):
            tag = args.tag + (f"-seed{args.seed + repeat}" if args.repeats > 1 else "")
            record = run_recipe(name, root=args.out, minutes=args.minutes, size=args.size,
                                epochs=args.epochs,
                                seed=args.seed, amp=amp, options=options,
                                train_options=train_options, synth_options=synth_options,
                                tag=tag, tta=args.tta, validations=args.validations,
                                train_seed=args.seed + repeat if args.repeats > 1 else None)
            records.append(record)
            write_json(args.out / (name + tag) / "quality.json", record)
    spreads = _spreads(records, args.repeats)
    if args.json:
        print(json.dumps({"runs": records, "spread": spreads} if spreads else records, indent=2))
        return 0
    print("| recipe | threads | amp | budget min | trained min | steps x batch | reached | goal "
          "| met | ms/image |")
    print("|---|---:|---|---:|---:|---:|---|---|---|---:|")
    for r in records:
        reached = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
        ms = r["ms_per_image"]
        if r["tta"]:  # the one-pass figures beside the augmented ones
            reached += " (test-time augmentation; one pass: " + ", ".join(
                f"{v:.3f}" for v in r["one_pass_metrics"].values()) + ")"
            ms = f"{r['ms_per_image_tta']} (one pass {ms})"
        goals = ", ".join(f"{k} >= {v}" for k, v in r["goals"].items())
        print(f"| {r['recipe']} | {r['threads']} | {r['amp'] or 'no'} | {r['budget_minutes']:g} | "
              f"{r['train_minutes']:.1f} | {r['steps']} x {r['batch_size']} | {reached} | "
              f"{goals} | {'yes' if r['met'] else 'no'} | {ms} |")
    for name, figures in spreads.items():
        print(f"\n{name}, {args.repeats} runs (mean, sample sd, min-max): " + "; ".join(
            f"{k} {v['mean']:.3f} sd {v['sd']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
            for k, v in figures.items()))
    return 0


def _spreads(records: list[dict[str, Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """recipe -> {metric (and `one_pass.` metric): mean, sd, min, max} over its `repeats` runs,
    in the order `main` ran them; empty for single runs."""
    if repeats < 2:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(records), repeats):
        group = records[start:start + repeats]
        name = group[0]["recipe"].rsplit("-seed", 1)[0]
        series: dict[str, list[float]] = {}
        for r in group:
            for k, v in r["metrics"].items():
                series.setdefault(k, []).append(v)
            for k, v in (r["one_pass_metrics"] or {}).items():
                series.setdefault(f"one_pass.{k}", []).append(v)
        out[name] = {k: {"mean": statistics.mean(v), "sd": statistics.stdev(v),
                         "min": min(v), "max": max(v)} for k, v in series.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
