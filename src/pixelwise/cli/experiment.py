"""`pixelwise experiment NAME`: train a few models on a budget, write a report (md, png, json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelwise.cli._common import add_json_flag, emit_json
from pixelwise.experiments import EXPERIMENTS  # a plain dict; no torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="answer a lecture question by training models on a budget "
        f"({', '.join(EXPERIMENTS)})",
        description="Synthesise data, train each model of the experiment on it with the same "
        "budget, evaluate on val and write NAME.md, NAME.png and NAME.json into --out. "
        "upsamplers: a U-Net with each upsampler; fcn-skips: FCN-32s/16s/8s; receptive-field: "
        "patch classifier vs flat FCN vs U-Net.",
    )
    parser.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME",
                        help=f"one of: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/experiments/NAME)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, default=None, metavar="N",
                        help="training steps per model (default: the experiment's)")
    budget.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                        help="training seconds per model (steps from a measured step time)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--num", type=int, default=None, help="images to synthesise (80%% train)")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixelwise.experiments import ExperimentOptions, default_out, run_experiment

    options = ExperimentOptions(size=args.size, num=args.num, seed=args.seed,
                                budget_steps=args.budget_steps,
                                budget_seconds=args.budget_seconds, quick=args.quick,
                                overwrite=args.overwrite)
    report = run_experiment(args.name, args.out or default_out(args.name), options)
    if args.json:
        emit_json(report)
        return 0
    import importlib

    from pixelwise.experiments.report import markdown_table

    module = importlib.import_module(EXPERIMENTS[args.name])
    print(markdown_table(report["rows"], module.COLUMNS))
    for kind, path in report["files"].items():
        print(f"{kind}: {path}")
    return 0
