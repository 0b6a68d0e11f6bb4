"""`pixelwise models`: list the models; `models info NAME`: parameters, FLOPs, receptive field.

`add_model_options(parser)` / `model_options_from_args(args)` give every command that builds a
model the same flags, each named as the builder's keyword (`--upsample` -> `upsample`, ...).
No torch import at module level (imported inside `run`).
"""

from __future__ import annotations

import argparse
from typing import Any

from pixelwise.cli._common import add_json_flag, emit_json
from pixelwise.errors import UserError


def _names(text: str) -> str | list[str]:
    """'bilinear' -> 'bilinear'; 'transposed,bilinear,nearest' -> a list (one per stage)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a name or comma-separated names")
    return parts[0] if len(parts) == 1 else parts


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


# (flag, builder keyword, type, help); a model that lacks an option given here says so in one line
MODEL_OPTION_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--in-channels", "in_channels", int, "input channels (1 for grayscale; default 3)"),
    ("--encoder", "encoder", str, "plain, resnet18, resnet34, resnet50, mobilenet_v3_large"),
    ("--upsample", "upsample", _names, "upsampler name, or comma-separated names one per stage"),
    ("--depth", "depth", int, "number of poolings (plain encoder) / conv layers (flat_fcn)"),
    ("--width", "width", int, "base channel width"),
    ("--padding", "padding", str, "unet: same (default) or valid (overlap-tile)"),
    ("--tile", "tile", int, "unet valid: input tile size for overlap-tile prediction"),
    ("--input-scale", "input_scale", float, "unet: run on the image pooled to this scale "
                                            "(1/k: 0.5, 0.25) and upsample the logits"),
    ("--input-stem", "input_stem", str, "unet with --input-scale: pool (average k x k blocks; "
                                        "default) or unshuffle (stack them as channels)"),
    ("--output-upsample", "output_upsample", str, "unet with --input-scale: bilinear (default) "
                                                  "or joint_bilateral (guided by the image)"),
    ("--guide-sigma-color", "guide_sigma_color", float, "unet joint_bilateral: colour sigma, in "
                                                        "the input's units (default 0.075)"),
    ("--guide-sigma-space", "guide_sigma_space", float, "unet joint_bilateral: distance sigma, in "
                                                        "network cells (default 2)"),
    ("--guide-radius", "guide_radius", int, "unet joint_bilateral: window radius in cells "
                                            "(default 2: 5 x 5 cells)"),
    ("--decoder-channels", "decoder_channels", _ints, "unet: comma-separated widths per block"),
    ("--norm", "norm", str, "batch (default) or none"),
    ("--weights", "weights", str, "local torchvision encoder weights (.safetensors or .pth)"),
    ("--head-channels", "head_channels", int, "fcn: channels of the fc6/fc7 convs"),
    ("--patch-size", "patch_size", int, "patch_classifier: odd patch size P"),
    ("--hidden", "hidden", int, "patch_classifier: hidden units of the classifier"),
    ("--pad-mode", "pad_mode", str, "patch_classifier: zeros or reflect"),
    ("--kernel-size", "kernel_size", int, "flat_fcn: conv kernel size"),
    ("--dilation", "dilation", int, "flat_fcn: conv dilation"),
    ("--backbone", "backbone", str, "detection models: resnet18, resnet34, resnet50 (default), "
                                    "mobilenet_v3_large (with FPN)"),
    ("--anchor-sizes", "anchor_sizes", _ints, "R-CNN: comma-separated anchor size per FPN level "
                                              "(5; default 16,32,64,128,256)"),
    ("--box-detections-per-img", "box_detections_per_img", int,
     "R-CNN: most detections per image (default 100; raise for crowded images)"),
    ("--mask-head-layers", "mask_head_layers", _ints, "mask_rcnn: comma-separated channels of "
                                                      "the mask head's convs"),
    ("--keypoint-head-layers", "keypoint_head_layers", _ints,
     "keypoint_rcnn: comma-separated channels of the keypoint head's convs"),
)


def _key_value(text: str) -> tuple[str, Any]:
    """'box_batch_size_per_image=64' -> ('box_batch_size_per_image', 64); the value is read as
    JSON when it parses (numbers, lists, true/false/null), else kept as a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a builder option, got "
                                         f"{text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the model-option flags (all default to the model's own default)."""
    group = parser.add_argument_group("model options (each model takes a subset)")
    for flag, dest, typ, help_text in MODEL_OPTION_FLAGS:
        group.add_argument(flag, dest=dest, type=typ, default=None, help=help_text)
    group.add_argument("--model-option", dest="model_option", type=_key_value, action="append",
                       default=None, metavar="KEY=VALUE",
                       help="any other option of the model's builder, VALUE as JSON (repeatable; "
                       "e.g. box_batch_size_per_image=128; see `pixelwise models`)")


def model_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The model options given on the command line, as `build_model` keywords."""
    options = {
        dest: getattr(args, dest)
        for _, dest, _, _ in MODEL_OPTION_FLAGS
        if getattr(args, dest, None) is not None
    }
    for key, value in getattr(args, "model_option", None) or []:
        if key in options:
            raise UserError(f"model option {key!r} given twice (by its flag and --model-option)")
        options[key] = value
    return options


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 256x256) or one size, got {text!r}")
    return parts[0], parts[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models; `models info NAME`: parameters, FLOPs, receptive field",
        description="Without a subcommand: list the semantic segmentation models.",
    )
    parser.set_defaults(func=run, models_command=None)
    add_json_flag(parser)
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    lst = sub.add_parser("list", help="list the models and their options")
    add_json_flag(lst)
    info = sub.add_parser(
        "info",
        help="parameters, FLOPs at a size, receptive field and output stride of one model",
        description="Build model NAME (random weights) and report parameters, FLOPs of one "
        "forward pass at --size (torch.utils.flop_counter: convolutions and matrix products, 2 "
        "per multiply-add), receptive field (input pixels per side that can affect one output "
        "pixel; null = the whole image) and output stride.",
    )
    info.add_argument("name", metavar="NAME", help="model name (see `pixelwise models`)")
    info.add_argument(
        "--size", type=_size, default=(256, 256), help="HxW for FLOPs (default 256x256)"
    )
    info.add_argument("--num-classes", type=int, default=2, help="classes (default 2)")
    add_model_options(info)
    add_json_flag(info)


def run(args: argparse.Namespace) -> int:
    if args.models_command == "info":
        return _info(args)
    return _list(args)


def _list(args: argparse.Namespace) -> int:
    from pixelwise.models import MODELS, describe, model_options

    rows = [
        {
            "name": name,
            "description": describe(name),
            "options": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in model_options(name).items()
            },
        }
        for name in MODELS
    ]
    if args.json:
        emit_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['description']}")
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{'':<{width}}    options: {opts}")
    print(
        "\n`pixelwise models info NAME [--size HxW] [options]`: parameters, FLOPs, receptive field."
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from pixelwise.models import build_model
    from pixelwise.models.info import model_info

    if args.num_classes < 1:
        raise UserError(f"--num-classes must be >= 1, got {args.num_classes}")
    model = build_model(args.name, args.num_classes, **model_options_from_args(args))
    info = model_info(model, tuple(args.size))
    if args.json:
        emit_json(info)
        return 0
    h, w = args.size
    whole = info["flops_of"] == "model"
    flops_label = f"FLOPs at {h}x{w}"
    options = ", ".join(
        f"{k}={v}" for k, v in info["config"].items() if k not in ("name",) and v is not None
    )
    print(f"{info['name']}  ({options})")
    print(
        f"  parameters        {info['parameters']:,} ({info['trainable_parameters']:,} trainable)"
    )
    print(
        f"  {flops_label:<16}  {info['flops'] / 1e9:.3f} G  "
        + ("(convolutions and matrix products, 2 per multiply-add)" if whole else
           "(backbone + FPN only: the heads' cost depends on the proposals and detections)")
    )
    if whole:
        rf = info["receptive_field"]
        print(f"  receptive field   "
              f"{'the whole image (global pooling)' if rf is None else f'{rf} px'}")
        print(f"  output stride     {info['output_stride']}")
    else:
        print(f"  FPN map strides   {', '.join(map(str, info['feature_strides']))}")
    return 0
