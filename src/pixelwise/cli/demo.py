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
    parser.add_argument("--model", default=None,
                        help="model to train (the task's default if omitted)")
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
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    """The headline (scores against the goal), the training cost, then where each output is."""
    scores = {k: v for k, v in summary.items()
              if k.startswith(("val_", "goal_")) and not isinstance(v, (list, dict))}
    title = " ".join(str(summary[k]) for k in ("task", "model") if summary.get(k))
    print(f"{title} demo: " + ", ".join(f"{k} {v}" for k, v in scores.items()) if scores
          else f"{title} demo done")
    if "steps" in summary:
        print(f"trained {summary['steps']} steps in {summary.get('train_seconds')} s "
              f"(whole demo {summary.get('total_seconds')} s)")
    skip = {"task", "model", "next", *scores}
    for key, value in summary.items():
        if key not in skip and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            if key in ("steps", "train_seconds", "total_seconds"):
                continue
            print(f"  {key:<12} {value}")
    if summary.get("next"):
        print(f"next: {summary['next']}")
