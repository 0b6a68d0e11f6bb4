"""`pixelwise data check DIR`: validate a dataset, one line per problem naming the file."""

from __future__ import annotations

import argparse
import sys

from pixelwise.cli._common import add_json_flag, emit_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate a dataset (pixelwise or PASCAL VOC layout)",
        description=(
            "Read every image, mask, COCO json and panoptic PNG of DIR and print one line per "
            "problem, naming the file: corrupt or truncated images, mask size != image size, "
            "labels outside the classes, invalid RLE or polygons, boxes outside the image, "
            "keypoint counts != the schema, duplicate ids, file names escaping DIR (refused), "
            "images over the pixel limit (refused). Exit 1 when anything is wrong, 0 when clean."
        ),
    )
    parser.add_argument("dir", metavar="DIR", help="the dataset folder")
    parser.add_argument(
        "--max-pixels",
        type=_pixel_limit,
        default=None,
        help="refuse images with more pixels than this, from their header (default 2**27; "
        "0 = no limit)",
    )
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _pixel_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = no limit)")
    return value


def run(args: argparse.Namespace) -> int:
    from pixelwise.data.check import check_dataset_report
    from pixelwise.data.images import DEFAULT_MAX_PIXELS

    if args.max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    else:
        max_pixels = args.max_pixels or None  # 0 lifts the limit
    report = check_dataset_report(args.dir, max_pixels=max_pixels)
    if args.json:
        emit_json({
            "root": str(report.root),
            "layout": report.kind,
            "splits": report.splits,
            "ok": report.ok,
            "counts": report.counts,
            "problems": [{"path": str(p.path), "message": p.message} for p in report.problems],
        })
    else:
        for problem in report.problems:
            print(problem)
        if report.ok:
            print(f"OK: {report.summary()}")
        else:
            files = len({p.path for p in report.problems})
            print(f"{len(report.problems)} problem(s) in {files} file(s); read {report.summary()}",
                  file=sys.stderr)
    return 0 if report.ok else 1
