"""`pixelwise eval RUN`: evaluate a trained run's checkpoint on a dataset split.

The model, task, classes and input size come from the checkpoint alone. No torch import at
module level.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import Sequence
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

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained run on a dataset split (semantic: mIoU, ...; instance, "
        "keypoints: COCO AP; panoptic: PQ)",
        description="Rebuild the model of RUN's checkpoint and report the task's metrics on "
        "--split of --data (default: the data the run was trained on).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory or checkpoint")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                        help="which checkpoint of RUN (default best, else last)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--max-dets", type=int, default=None, metavar="N",
                        help="instance/keypoints: detections scored per image (default: the "
                        "model's own limit when over COCO's 100, else 100; keypoints 20)")
    add_tta_flags(parser)
    add_output_upsample_flag(parser)
    add_head_dtype_flag(parser)
    parser.add_argument("--skip-bad", action="store_true",
                        help="log and leave out bad samples (those `pixelwise data check` "
                        "reports) instead of stopping at the first")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def evaluate_run(run_dir: Path, data: Path | None, *, split: str = "val", which: str = "best",
                 batch_size: int = 8, workers: int = 0, device: str = "auto",
                 skip_bad: bool = False, max_dets: int | None = None,
                 tta: str | None = None, tta_scales: Sequence[float] | None = None,
                 output_upsample: str | None = None, head_dtype: str | None = None
                 ) -> dict[str, Any]:
    """The task's metrics of `run_dir`'s checkpoint on `split` of `data` (`skip_bad`: bad
    samples are logged and left out of the metrics; `max_dets`: COCO detections scored per
    image, instance and keypoints tasks; `tta` ("flip") / `tta_scales`: test-time augmentation,
    semantic runs (and flip for solov2 and mask_rcnn instance runs), `pixelwise.predict.tta`;
    `output_upsample`: a unet run's output upsampling instead of its own,
    `UNet.set_output_upsample`; `head_dtype`: an R-CNN run's mask / keypoint head dtype,
    `FastRoIHeads.head_dtype`)."""
    import torch
    from torch.utils.data import DataLoader

    from pixelwise.engine.checkpoint import find_checkpoint, load_model, read_meta
    from pixelwise.engine.distributed import resolve_device
    from pixelwise.engine.loader import DropBadSamples
    from pixelwise.errors import UserError
    from pixelwise.predict.tta import apply_tta, parse_tta
    from pixelwise.tasks import build_task

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    path = find_checkpoint(run_dir, which)
    meta = read_meta(path)
    train_cfg = meta.get("train") or {}
    if data is None:
        if not train_cfg.get("data"):
            raise UserError(f"{path}: no dataset recorded; pass --data DIR")
        data = Path(train_cfg["data"])
    task = build_task(meta["task"])
    options = {}
    if max_dets is not None:
        if "max_dets" not in inspect.signature(task.evaluate).parameters:
            raise UserError(f"--max-dets applies to the instance and keypoints tasks, not "
                            f"{task.name!r}")
        options["max_dets"] = max_dets
    augmentation = parse_tta(tta, tta_scales, task.name)
    task.check_data(data)  # e.g. a different number of classes: one line, before any work
    dev = resolve_device(device)
    model, meta = load_model(path, device=dev)
    apply_output_upsample(model, output_upsample, path)
    apply_head_dtype(model, head_dtype, path)
    model = apply_tta(model, augmentation, task.name, path)
    size = train_cfg.get("size")
    dataset = task.dataset(data, split, size=tuple(size) if size else None, train=False,
                           skip_bad=skip_bad)
    collate = DropBadSamples(task.collate) if skip_bad else task.collate
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=workers)
    logger.info("evaluating %s (%s, step %s) on %s split %r: %d images", path,
                meta["model"]["name"], meta.get("progress", {}).get("step"), data, split,
                len(dataset))
    with torch.inference_mode():
        return task.evaluate(model, loader, device=dev, amp=dev.type == "cuda", **options)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_panoptic(metrics: dict[str, Any]) -> None:
    """PQ / SQ / RQ of all, things and stuff, then per class (as `pixelwise metrics panoptic`)."""
    print(f"{'':10s}  {'PQ':>7}  {'SQ':>7}  {'RQ':>7}  {'N':>4}")
    for group in ("all", "things", "stuff"):
        r = metrics[group]
        print(f"{group:10s}  {_fmt(r['pq']):>7}  {_fmt(r['sq']):>7}  {_fmt(r['rq']):>7}  "
              f"{r['n']:>4}")
    per_class = metrics.get("per_class") or {}
    width = max(10, *(len(name) for name in per_class)) if per_class else 10
    print(f"\n{'class':<{width}}  {'kind':<5}  {'PQ':>7}  {'SQ':>7}  {'RQ':>7}  "
          f"{'TP':>5}  {'FP':>5}  {'FN':>5}")
    for name, c in per_class.items():
        print(f"{name:<{width}}  {'thing' if c['isthing'] else 'stuff':<5}  {_fmt(c['pq']):>7}  "
              f"{_fmt(c['sq']):>7}  {_fmt(c['rq']):>7}  {c['tp']:>5}  {c['fp']:>5}  {c['fn']:>5}")


def _print_coco_per_class(per_class: dict[str, Any], iou_types: list[str]) -> None:
    width = max(10, *(len(name) for name in per_class))
    heads = [f"{t} {n}" for t in iou_types for n in ("AP", "AP50")]
    sizes = [max(10, len(h)) + 2 for h in heads]
    print(f"\n{'class':<{width}}" + "".join(f"{h:>{n}}" for h, n in zip(heads, sizes)))
    for name, row in per_class.items():
        cells = [_fmt((row.get(t) or {}).get(n)) for t in iou_types for n in ("AP", "AP50")]
        print(f"{name:<{width}}" + "".join(f"{c:>{n}}" for c, n in zip(cells, sizes)))


def run(args: argparse.Namespace) -> int:
    metrics = evaluate_run(args.run_dir, args.data, split=args.split, which=args.checkpoint,
                           batch_size=args.batch_size, workers=args.workers, device=args.device,
                           skip_bad=args.skip_bad, max_dets=args.max_dets, tta=args.tta,
                           tta_scales=args.tta_scales, output_upsample=args.output_upsample,
                           head_dtype=args.head_dtype)
    if args.json:
        emit_json(metrics)
        return 0
    if "things" in metrics and "stuff" in metrics:
        _print_panoptic(metrics)
        return 0
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice"):
        if key in metrics:
            print(f"{key:<16}{_fmt(metrics[key])}")
    coco = {k: v for k, v in metrics.items() if isinstance(v, dict) and "AP" in v}
    if coco:  # instance / keypoints: COCO AP per iou type (-1: no ground truth of that size)
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        print(f"{'':<10}" + "".join(f"{n:>8}" for n in names))
        for iou_type, stats in coco.items():
            cells = [_fmt(None if stats.get(n, -1) < 0 else stats[n]) for n in names]
            print(f"{iou_type:<10}" + "".join(f"{c:>8}" for c in cells))
    per_class = metrics.get("per_class") or {}
    if coco and per_class:  # AP / AP50 of each class and iou type
        _print_coco_per_class(per_class, list(coco))
        return 0
    if per_class:
        width = max(10, *(len(name) for name in per_class))
        print(f"\n{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}")
        for name, row in per_class.items():
            print(f"{name:<{width}}  {_fmt(row.get('iou')):>7}  {_fmt(row.get('dice')):>7}  "
                  f"{_fmt(row.get('accuracy')):>7}")
    return 0
