"""`pixelwise export RUN --out FILE`: the run's model as ONNX (or a torch.export program).

    pixelwise export runs/demo/run --out unet.onnx                 (dynamic batch, H, W)
    pixelwise export RUN --out unet.onnx --size 256x256            (fixed 256 x 256 input)
    pixelwise export RUN --format pt2 --out unet.pt2

The file is written only after it ran on random inputs and matched the eager model (largest
absolute difference of the logits reported, at most --tolerance). No torch import at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelwise.cli._common import add_json_flag, emit_json

FORMAT_NAMES = ("onnx", "pt2")  # pixelwise.export.FORMATS


def register(subparsers: argparse._SubParsersAction) -> None:
    from pixelwise.cli.train import parse_size

    parser = subparsers.add_parser(
        "export",
        help="export a run's model to ONNX (checked with onnxruntime against eager)",
        description="Export the model of RUN's checkpoint: input 'images' (N, C, H, W) float32 "
        "in [0, 1], output 'logits' (N, K, H, W). The export is run on random inputs and "
        "compared with the eager model before the file is written.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory or checkpoint")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    parser.add_argument("--format", default="onnx", choices=FORMAT_NAMES,
                        help="onnx (default) or pt2 (torch.export program)")
    parser.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                        help="fixed input size (default: dynamic height and width)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                        help="which checkpoint of RUN (default best, else last)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest accepted |exported - eager| of the logits (default 1e-3)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixelwise.engine.checkpoint import find_checkpoint, load_model
    from pixelwise.errors import UserError
    from pixelwise.export import export_model

    if args.out.exists() and not args.overwrite:  # before loading anything
        raise UserError(f"{args.out}: exists; pass --overwrite to replace it")
    if not args.tolerance >= 0:
        raise UserError(f"--tolerance must be >= 0, got {args.tolerance}")
    path = find_checkpoint(args.run_dir, args.checkpoint)
    model, meta = load_model(path, device="cpu")
    in_channels = int(getattr(model, "in_channels", meta["model"].get("in_channels", 3)))
    report = export_model(model, args.out, format=args.format, size=args.size,
                          in_channels=in_channels, opset=args.opset, tolerance=args.tolerance,
                          overwrite=args.overwrite)
    report = {"checkpoint": str(path), "model": meta["model"]["name"], **report}
    if args.json:
        emit_json(report)
        return 0
    shape = "x".join(str(d) for d in report["input"])
    checked = ", ".join("x".join(map(str, s)) for s in report["checked"])
    print(f"exported {report['model']} ({path}) to {report['out']} ({report['format']}, input "
          f"images {shape})")
    print(f"max abs diff vs eager: {report['max_abs_diff']:.3g} on random inputs {checked}")
    return 0
