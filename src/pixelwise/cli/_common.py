"""Helpers shared by the command modules (no torch imports here)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


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
    """`--tta` / `--tta-scales` (semantic runs; `pixelwise.predict.tta`)."""
    parser.add_argument("--tta", default=None, metavar="NAME",
                        help="semantic runs: test-time augmentation; flip averages the class "
                        "probabilities of each view and its mirror image")
    parser.add_argument("--tta-scales", type=parse_floats, default=None, metavar="S,...",
                        help="semantic runs: average the views resized by these factors too, "
                        "e.g. 0.75,1,1.25 (with --tta flip: 6 passes)")


def emit_json(obj: Any) -> None:
    """Write `obj` as the only thing on stdout."""
    json.dump(obj, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
