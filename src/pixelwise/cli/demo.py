"""`pixelwise demo`: the main job on synthetic data.

Until the semantic demo exists it runs the upsampler inspection (checkerboard analysis) and
writes its table, JSON and figure under `runs/demo/upsamplers/`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on synthetic data")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixelwise.inspect_upsamplers import write_report

    out = args.out / "upsamplers"
    rows = write_report(out)
    logger.info("upsampler inspection of %d operators written to %s", len(rows), out)
    for row in rows:
        logger.info(
            "  %-22s params=%-6d checkerboard=%-6s forward=%.2f ms",
            row["name"], row["params"], row["checkerboard"], row["forward_ms"],
        )
    return 0
