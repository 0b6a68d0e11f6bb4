"""`pixelwise demo [--task NAME]`: the main job on synthetic data, written under `runs/`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pixelwise.cli._common import add_json_flag, emit_json

logger = logging.getLogger(__name__)

# kept here (not imported from pixelwise.demos) so that `--help` stays light
TASKS = ("semantic", "instance", "keypoints", "panoptic", "upsamplers")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="synthesise data, train briefly, evaluate and predict (default task: semantic)",
    )
    parser.add_argument("--task", choices=TASKS, default="semantic")
    parser.add_argument("--model", default=None, help="model to train (the task's default if omitted)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="output folder (default runs/demo for semantic, runs/demo-TASK otherwise)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run, seconds not minutes")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixelwise.demos import run_demo

    default = Path("runs/demo") if args.task == "semantic" else Path("runs") / f"demo-{args.task}"
    summary = run_demo(args.task, args.out or default, model=args.model, quick=args.quick)
    if args.json:
        emit_json(summary)
    else:
        # the headline: scalar entries of the summary, one per line
        for key, value in summary.items():
            if not isinstance(value, (list, dict)):
                print(f"{key}: {value}")
    return 0
