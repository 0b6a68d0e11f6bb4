"""`pixelwise data synth`: write a synthetic dataset for a task in the pixelwise layout."""

from __future__ import annotations

import argparse

from pixelwise.cli._common import add_json_flag, emit_json
from pixelwise.errors import UserError

TASKS = (
    "semantic",
    "instance",
    "keypoints",
    "panoptic",
)  # pixelwise.data.synth_writers.TASK_WRITERS


def parse_size(text: str) -> tuple[int, int]:
    """ "256" -> (256, 256); "192x256" -> (192, 256) (H x W)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--size must be H or HxW (e.g. 256 or 192x256), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise UserError(f"--size must be H or HxW (e.g. 256 or 192x256), got {text!r}")
    return values[0], values[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic dataset (semantic, instance, keypoints or panoptic)",
        description="Draw seeded synthetic scenes (textured stuff, shapes with occlusion, stick "
        "figures with COCO keypoints, or cell-like scenes) and write them in the pixelwise layout "
        "with a train/val split. The same seed gives the same files.",
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--num", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--size", default="256", help="H or HxW in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction of images in val (default 0.2)"
    )
    parser.add_argument(
        "--cells", action="store_true", help="cell-like scenes: 100+ small touching objects"
    )
    parser.add_argument("--gray16", action="store_true", help="16-bit grayscale images")
    parser.add_argument(
        "--format", dest="image_format", choices=("png", "tif"), default="png",
        help="image file format (labels are always PNG)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the layout in a non-empty --out"
    )
    parser.add_argument(
        "--scene", action="append", default=[], metavar="FIELD=VALUE",
        help="a scene option of pixelwise.data.synthetic.SceneConfig, e.g. person_fraction=0.6 "
        "or thing_size=0.1,0.3 (repeatable)",
    )  # fmt: skip
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixelwise.data.synthetic import SceneConfig, run_synthesis

    summary = run_synthesis(
        args.task,
        args.out,
        num=args.num,
        size=parse_size(args.size),
        seed=args.seed,
        val_fraction=args.val_fraction,
        cells=args.cells,
        gray16=args.gray16,
        image_format=args.image_format,
        overwrite=args.overwrite,
        config=SceneConfig.parse(args.scene),
    )
    if args.json:
        emit_json(summary.as_dict())
    else:
        counts = ", ".join(
            f"{split} {c['images']} images" for split, c in sorted(summary.splits.items())
        )
        print(f"wrote {args.task} dataset to {summary.out}: {counts}")
    return 0
