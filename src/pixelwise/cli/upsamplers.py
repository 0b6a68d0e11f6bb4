"""`pixelwise upsamplers`: list the upsampling operators, or inspect them for checkerboards.

    pixelwise upsamplers list [--json]
    pixelwise upsamplers inspect [--out DIR] [--json]

`inspect` writes upsamplers.md, upsamplers.json and upsamplers.png into --out (see
`pixelwise.inspect_upsamplers`); with --json, stdout carries the list of rows alone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pixelwise.cli._common import add_json_flag, emit_json

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upsamplers",
        help="list the upsampling operators or inspect them for checkerboard artifacts",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the operator names, their options and what they do")
    add_json_flag(listing)
    listing.set_defaults(func=run_list)
    inspect = actions.add_parser(
        "inspect",
        help="overlap pattern, impulse response, checkerboard score, params, forward time",
    )
    inspect.add_argument(
        "--out",
        type=Path,
        default=Path("runs/upsamplers"),
        help="folder for upsamplers.md, .json and .png (default: runs/upsamplers)",
    )
    add_json_flag(inspect)
    inspect.set_defaults(func=run_inspect)


def run_list(args: argparse.Namespace) -> int:
    from pixelwise.upsample import UPSAMPLERS, upsampler_options

    rows = [
        {
            "name": name,
            "learnable": cls.learnable,
            "needs_indices": cls.needs_indices,
            "options": upsampler_options(name),
            "summary": (cls.__doc__ or "").strip().splitlines()[0],
        }
        for name, cls in UPSAMPLERS.items()
    ]
    if args.json:
        emit_json(rows)
        return 0
    for row in rows:
        flags = ", ".join(
            f
            for f, on in (("learnable", row["learnable"]), ("needs indices", row["needs_indices"]))
            if on
        )
        print(f"{row['name']:<14} {row['summary']}")
        print(
            f"{'':<14} options: {', '.join(row['options']) or '-'}"
            + (f"; {flags}" if flags else "")
        )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from pixelwise.inspect_upsamplers import markdown_table, write_report

    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} exists and is not a folder")
    rows = write_report(args.out)
    if args.json:
        emit_json(rows)
        return 0
    print(markdown_table(rows), end="")
    print(f"\nwritten: {args.out / 'upsamplers.md'}, upsamplers.json, upsamplers.png")
    return 0
