"""`pixelwise predict RUN IMAGE_OR_DIR... --out DIR`: label maps and overlays of images.

    pixelwise predict runs/demo/run photos/ extra.tif --out preds
    pixelwise predict RUN big.tif --out preds --tile 512 --overlap 128

Writes OUT/NAME.png (palette PNG, pixel value = class index) and OUT/overlays/NAME.png (colour
overlay with a legend of the classes present) per image. The model, classes, input channels and
training size come from the checkpoint alone. Without --tile, images are resized to the run's
training --size (if it had one) and the logits back to the image's size; with --tile, images are
predicted at their native size (`--size` overrides both). An unreadable image is named on
stderr, the others are still predicted, and the exit code is 1. No torch import at module level.

Panoptic runs write COCO panoptic files instead (OUT/panoptic.json, OUT/panoptic/NAME.png with
id = R + 256 G + 256^2 B) and overlays; `--semantic RUN_A --instance RUN_B` (no RUN) fuses a
semantic run with an instance run (`pixelwise.predict.panoptic`):

    pixelwise predict --task panoptic --semantic RUN_A --instance RUN_B photos/ --out preds
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pixelwise.cli._common import (
    add_head_dtype_flag,
    add_json_flag,
    add_output_upsample_flag,
    add_tta_flags,
    apply_head_dtype,
    apply_output_upsample,
    emit_json,
)
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

EXIT_SOME_FAILED = 1


def _size(text: str) -> str | tuple[int, int]:
    if text in ("train", "native"):
        return text
    from pixelwise.cli.train import parse_size

    try:
        return parse_size(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected train, native, HxW or one size, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="label maps (PNG), colour overlays and legends of images with a trained run",
        description="Predict the label map of every image (folders: their png/jpg/jpeg/tif/"
        "tiff/bmp files). Writes OUT/NAME.png (pixel value = class index, palette colours) "
        "and OUT/overlays/NAME.png (classes over the image, legend of the classes present). "
        "Instance / keypoint runs write OUT/results.json (COCO results: boxes, scores, RLE "
        "masks, keypoints, the dataset's category ids) and OUT/overlays/NAME.png.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN",
                        help="run directory or checkpoint (not given with --semantic/--instance)")
    parser.add_argument("inputs", type=Path, nargs="*", metavar="IMAGE_OR_DIR",
                        help="image files and/or folders of images")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                        help="which checkpoint of RUN (default best, else last)")
    parser.add_argument("--size", type=_size, default=None,
                        help="prediction size: train (the run's --size if it had one, else "
                        "native; the default without --tile), native (the default with --tile), "
                        "or HxW; outputs always have the image's size")
    parser.add_argument("--tile", type=int, default=None, metavar="SIZE",
                        help="predict in SIZE x SIZE tiles (images larger than memory allows)")
    parser.add_argument("--overlap", type=int, default=None, metavar="PX",
                        help="pixels shared by neighbouring tiles (default: the model's receptive "
                        "field + output stride - 2, which makes tiles equal one pass)")
    parser.add_argument("--pad-mode", default="reflect", choices=("reflect", "zeros"),
                        help="how images are padded to multiples of the model's output stride "
                        "before the pass (default reflect; cropped off the outputs)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per forward pass (tiles per pass with --tile; default 1)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    add_tta_flags(parser)
    add_output_upsample_flag(parser)
    add_head_dtype_flag(parser)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse images with more pixels (default 2^27; 0: no limit)")
    parser.add_argument("--score-threshold", type=float, default=None, metavar="S",
                        help="instance / keypoint models: drop detections scoring below S from "
                        "overlays and results.json (default 0.5; 0 keeps all, as COCO AP needs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty --out (same names are replaced)")
    panoptic = parser.add_argument_group("panoptic (COCO panoptic files; --score-threshold is "
                                         "the fusion's instance score threshold)")
    panoptic.add_argument("--task", default=None,
                          help="the task to predict (default: the run's); panoptic with "
                          "--semantic/--instance")
    panoptic.add_argument("--semantic", type=Path, default=None, metavar="RUN_A",
                          help="fuse this semantic run's classes (stuff and things) ...")
    panoptic.add_argument("--instance", type=Path, default=None, metavar="RUN_B",
                          help="... with this instance run's objects (classes matched by name)")
    panoptic.add_argument("--gt-json", type=Path, default=None, metavar="FILE",
                          help="ground-truth COCO panoptic json: image ids and sizes by file "
                          "name, and its category ids, so `pixelwise metrics panoptic` scores "
                          "the output directly")
    panoptic.add_argument("--overlap-threshold", type=float, default=None, metavar="F",
                          help="drop an instance when more than F of its mask is already taken "
                          "by higher-scoring ones (default 0.5)")
    panoptic.add_argument("--stuff-area-threshold", type=int, default=None, metavar="PX",
                          help="smallest stuff region kept, in pixels (default 64)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _fusion_options(args: argparse.Namespace) -> dict[str, Any]:
    """The FusionConfig fields given on the command line."""
    given = {"instance_score_thresh": args.score_threshold,
             "overlap_threshold": args.overlap_threshold,
             "stuff_area_threshold": args.stuff_area_threshold}
    return {k: v for k, v in given.items() if v is not None}


def _predict_fusion(args: argparse.Namespace, on_error: Any = None) -> dict[str, Any]:
    """`--semantic RUN_A --instance RUN_B IMAGES`: panoptic files fused from two runs."""
    from pixelwise.predict import check_outputs, expand_inputs, predict_files
    from pixelwise.predict.panoptic import load_fusion_predictor

    if args.semantic is None or args.instance is None:
        raise UserError("fusion needs both --semantic RUN_A and --instance RUN_B")
    if args.task not in (None, "panoptic"):
        raise UserError(f"--semantic/--instance make a panoptic prediction, not {args.task}")
    if any(v is not None for v in (args.tile, args.overlap, args.tta, args.tta_scales,
                                   args.output_upsample)):
        raise UserError("--tile/--overlap/--tta/--tta-scales/--output-upsample are not "
                        "available with --semantic/--instance")
    files = expand_inputs([args.run_dir, *args.inputs])  # no RUN: every positional is an image
    predictor = load_fusion_predictor(
        args.semantic, args.instance, which=args.checkpoint, device=args.device,
        size=args.size or "train", batch_size=args.batch_size, pad_mode=args.pad_mode,
        gt_json=args.gt_json, fusion=_fusion_options(args))
    check_outputs(files, args.out, predictor.outputs, overwrite=args.overwrite)
    logger.info("fusing %s and %s on %d image%s", args.semantic, args.instance, len(files),
                "" if len(files) == 1 else "s")
    summary = predict_files(predictor, files, args.out, max_pixels=args.max_pixels,
                            on_error=on_error)
    summary.update(predictor.finish(args.out))
    return {"semantic": str(args.semantic), "instance": str(args.instance), "task": "panoptic",
            "size": predictor.policy, "tile": None, "overlap": None, **summary}


def predict_run(args: argparse.Namespace, on_error: Any = None) -> dict[str, Any]:
    """Everything `run` does but printing: returns the summary (see `predict_files`)."""
    from pixelwise.engine.checkpoint import find_checkpoint, load_model
    from pixelwise.engine.distributed import resolve_device
    from pixelwise.predict import (
        check_outputs,
        expand_inputs,
        make_predictor,
        min_overlap,
        predict_files,
    )
    from pixelwise.predict.tta import apply_tta, parse_tta

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.semantic is not None or args.instance is not None:
        return _predict_fusion(args, on_error)
    if not args.inputs:
        raise UserError("no images given: pixelwise predict RUN IMAGE_OR_DIR... --out DIR")
    if args.tile is not None and args.tile < 1:
        raise UserError(f"--tile must be >= 1, got {args.tile}")
    if args.overlap is not None and args.tile is None:
        raise UserError("--overlap applies to tiled prediction; pass --tile SIZE too")
    if args.overlap is not None and args.overlap < 0:
        raise UserError(f"--overlap must be >= 0, got {args.overlap}")
    if args.max_pixels is not None and args.max_pixels < 0:
        raise UserError(f"--max-pixels must be >= 0, got {args.max_pixels}")
    files = expand_inputs(args.inputs)
    path = find_checkpoint(args.run_dir, args.checkpoint)
    device = resolve_device(args.device)
    model, meta = load_model(path, device=device)
    apply_output_upsample(model, args.output_upsample, path)
    apply_head_dtype(model, args.head_dtype, path)
    task_name = (meta.get("task") or {}).get("name")
    if args.task is not None and args.task != task_name:
        raise UserError(f"{path}: a {task_name} run, not {args.task}")
    detection = task_name in ("instance", "keypoints")
    tta = parse_tta(args.tta, args.tta_scales, task_name)
    if (detection or task_name == "panoptic") and args.tile is not None:
        raise UserError(f"--tile is for semantic models; {task_name} models predict whole images")
    panoptic_only = {"--gt-json": args.gt_json, "--overlap-threshold": args.overlap_threshold,
                     "--stuff-area-threshold": args.stuff_area_threshold}
    given = [flag for flag, value in panoptic_only.items() if value is not None]
    if given and task_name != "panoptic":
        raise UserError(f"{', '.join(given)}: for panoptic runs, not {task_name} runs")
    if args.score_threshold is not None and not (detection or task_name == "panoptic"):
        raise UserError(f"--score-threshold applies to instance and keypoint models, not to "
                        f"{task_name} models")
    extra = {"score_threshold": args.score_threshold} if args.score_threshold is not None else {}
    if tta is not None and detection:  # the model's own test-time flip
        model = apply_tta(model, tta, task_name, path)
    elif tta is not None:
        extra["tta"] = tta
    if task_name == "panoptic":
        extra = {"gt_json": args.gt_json, "fusion": _fusion_options(args)}
    overlap = args.overlap
    if args.tile is not None and overlap is None:
        overlap = min_overlap(model)
        if overlap is None:
            raise UserError(f"{meta['model']['name']}: its receptive field is global; tiles "
                            "cannot equal one pass; pass --overlap PX to tile anyway")
        if overlap >= args.tile:
            raise UserError(f"--tile {args.tile} is too small for the overlap {overlap} px that "
                            f"{meta['model']['name']}'s receptive field needs; use --tile of "
                            f"at least {2 * overlap} or pass a smaller --overlap")
    size = args.size or ("native" if args.tile is not None else "train")
    predictor = make_predictor(model, meta, size=size, tile=args.tile,
                               overlap=overlap or 0, batch_size=args.batch_size,
                               pad_mode=args.pad_mode, **extra)
    check_outputs(files, args.out, predictor.outputs, overwrite=args.overwrite)
    logger.info("predicting %d image%s with %s (%s, %s) on %s, size %s%s", len(files),
                "" if len(files) == 1 else "s", path, meta["model"]["name"], meta["task"]["name"],
                device, predictor.policy,
                f", tiles {args.tile} overlap {overlap}" if args.tile else "")
    summary = predict_files(predictor, files, args.out, max_pixels=args.max_pixels,
                            on_error=on_error)
    if hasattr(predictor, "finish"):  # files about all images (results.json, panoptic.json)
        summary.update(predictor.finish(args.out))
    return {"checkpoint": str(path), "task": meta["task"]["name"], "size": predictor.policy,
            "tile": args.tile, "overlap": overlap if args.tile else None,
            "tta": None if tta is None else tta.to_dict(), **summary}


def run(args: argparse.Namespace) -> int:
    def on_error(path: Path, message: str) -> None:
        print(f"pixelwise: error: {message}", file=sys.stderr, flush=True)

    summary = predict_run(args, on_error=on_error)
    failed = len(summary["failed"])
    if args.json:
        emit_json(summary)
    else:
        out = Path(summary["out"])
        print(f"predicted {summary['count']} image{'' if summary['count'] == 1 else 's'} "
              f"(size {summary['size']}" + (f", tiles {summary['tile']} overlap "
                                            f"{summary['overlap']}" if summary["tile"] else "")
              + f") into {out}" + (f"; {failed} failed" if failed else ""))
        if summary.get("panoptic_json"):
            print(f"  panoptic    {summary['panoptic_json']} and {out / 'panoptic'}/NAME.png "
                  "(COCO panoptic: id = R + 256 G + 256^2 B)")
        elif "results" in summary:  # instance / keypoints
            print(f"  results     {summary['results']} ({summary['detections']} detections, "
                  f"COCO results; image ids: {summary['image_ids']})")
            if summary.get("images_json"):
                print(f"  images      {summary['images_json']}")
        else:
            print(f"  label maps  {out}/NAME.png (pixel value = class index)")
        print(f"  overlays    {out / 'overlays'}/NAME.png")
    return EXIT_SOME_FAILED if failed else 0
