"""Helpers shared by the command modules (no torch imports here)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pixelwise.errors import UserError


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (logs go to stderr)"
    )


def parse_floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers ("0.75,1,1.25")."""
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def add_tta_flags(parser: argparse.ArgumentParser) -> None:
    """`--tta` / `--tta-scales` (semantic runs; flip for solov2 and mask_rcnn;
    `pixelwise.predict.tta`)."""
    parser.add_argument("--tta", default=None, metavar="NAME",
                        help="test-time augmentation; flip averages the class probabilities of "
                        "each view and its mirror image (semantic runs; solov2 instance runs: "
                        "per grid cell, with its masks, see SOLOv2; mask_rcnn runs: both "
                        "views' detections merged by NMS, masks voted)")
    parser.add_argument("--tta-scales", type=parse_floats, default=None, metavar="S,...",
                        help="semantic runs: average the views resized by these factors too, "
                        "e.g. 0.75,1,1.25 (with --tta flip: 6 passes)")


def add_output_upsample_flag(parser: argparse.ArgumentParser) -> None:
    """`--output-upsample` (unet runs at input_scale < 1; `UNet.set_output_upsample`)."""
    parser.add_argument("--output-upsample", default=None, metavar="NAME",
                        help="unet runs with input_scale < 1: how the logits reach the image's "
                        "resolution, bilinear or joint_bilateral (guided by the image); "
                        "default: the run's own")


def apply_output_upsample(model: Any, name: str | None, where: object) -> None:
    """Switch a loaded model's output upsampling to `name` (None: keep the run's); a one-line
    error for models that have none."""
    if name is None:
        return
    setter = getattr(model, "set_output_upsample", None)
    if setter is None:
        raise UserError(f"{where}: --output-upsample applies to unet runs with input_scale < 1, "
                        f"not to a {type(model).__name__}")
    setter(name)


def add_head_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """`--head-dtype` (mask_rcnn / keypoint_rcnn runs; `FastRoIHeads.head_dtype`)."""
    parser.add_argument("--head-dtype", default=None, choices=("float32", "bfloat16"),
                        help="mask_rcnn / keypoint_rcnn runs: the dtype their mask / keypoint "
                        "head runs in on a CPU (bfloat16: ~2x faster heads where the CPU has "
                        "native bf16, boxes and scores unchanged); default: the run's own")


def apply_head_dtype(model: Any, name: str | None, where: object) -> None:
    """Set a loaded R-CNN's `head_dtype` to `name` (None: keep the run's); a one-line error
    for models without the fast R-CNN heads."""
    if name is None:
        return
    from pixelwise.models.fast_postprocess import FastRoIHeads
    from pixelwise.models.rcnn import HEAD_DTYPES

    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, FastRoIHeads) or not (heads.has_mask() or heads.has_keypoint()):
        raise UserError(f"{where}: --head-dtype applies to mask_rcnn and keypoint_rcnn runs "
                        f"(fast=true), not to a {type(model).__name__}")
    heads.head_dtype = HEAD_DTYPES[name]


def emit_json(obj: Any) -> None:
    """Write `obj` as the only thing on stdout."""
    json.dump(obj, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
