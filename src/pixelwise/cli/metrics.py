"""`pixelwise metrics {semantic,coco,panoptic}`: score predictions saved on disk.

Each prints a readable table, or with ``--json`` only the JSON on stdout (fractions in [0, 1];
``null`` where a value is undefined; COCO's -1 for an empty size bucket kept as pycocotools gives
it). The metric code lives in `pixelwise.metrics`; torch is imported inside the runners.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pixelwise.cli._common import add_json_flag, emit_json
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "metrics",
        help="score saved predictions: semantic (mIoU ...), COCO AP, panoptic PQ",
        description="Score predictions saved on disk against their ground truth.",
    )
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="metrics_command", metavar="METRIC", required=True)

    sem = sub.add_parser(
        "semantic",
        help="mIoU, pixel / mean accuracy, fw IoU, Dice from label PNGs",
        description="Confusion-matrix metrics of label PNGs; predictions matched to the ground "
        "truth by file name. FCN conventions: a class absent from both sides is left out of the "
        "means (null), a class predicted but absent from the ground truth has IoU 0, mean "
        "accuracy averages the classes present in the ground truth.",
    )
    sem.add_argument("--gt", required=True, type=Path, help="folder of ground-truth label PNGs")
    sem.add_argument("--pred", required=True, type=Path, help="folder of predicted label PNGs")
    sem.add_argument("--num-classes", required=True, type=int, help="K (labels 0 .. K-1)")
    sem.add_argument("--ignore-index", type=int, default=255, help="unscored label (default 255)")
    sem.add_argument(
        "--class-names",
        type=Path,
        help='JSON: a list of K names or {"classes": [...]} (a classes.json); default 0..K-1',
    )
    sem.add_argument(
        "--boundary-tolerance",
        type=int,
        metavar="PX",
        help="also report the boundary F-score (key boundary_f) with this match radius in px",
    )
    add_json_flag(sem)

    coco = sub.add_parser(
        "coco",
        help="COCO AP / AR (pycocotools) for boxes, masks or keypoints",
        description="COCO AP / AR exactly as pycocotools' COCOeval computes them.",
    )
    coco.add_argument("--gt", required=True, type=Path, help="COCO annotation json")
    coco.add_argument("--pred", required=True, type=Path, help="COCO results json (a list)")
    coco.add_argument("--iou-type", required=True, choices=["bbox", "segm", "keypoints"])
    coco.add_argument("--max-dets", type=int, default=None, metavar="N",
                      help="detections scored per image (default: pycocotools' 100, keypoints "
                      "20; raise it for crowded images: AR100 becomes ARN)")
    add_json_flag(coco)

    pan = sub.add_parser(
        "panoptic",
        help="PQ / SQ / RQ (as panopticapi) from COCO panoptic jsons and PNGs",
        description="Panoptic quality exactly as the COCO panoptic API computes it; images "
        "matched by image_id, categories from the ground-truth json.",
    )
    pan.add_argument("--gt-json", required=True, type=Path)
    pan.add_argument("--gt-dir", required=True, type=Path, help="ground-truth panoptic PNGs")
    pan.add_argument("--pred-json", required=True, type=Path)
    pan.add_argument("--pred-dir", required=True, type=Path, help="predicted panoptic PNGs")
    add_json_flag(pan)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _read_class_names(path: Path) -> list[str]:
    from pixelwise.metrics.coco import load_json

    data = load_json(path, "class names")
    names = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f'{path}: expected a list of class names or {{"classes": [...]}}')
    return names


def run_semantic(args: argparse.Namespace) -> int:
    from pixelwise.data.images import read_label_png
    from pixelwise.metrics.boundary import BoundaryFScore
    from pixelwise.metrics.semantic import SemanticMetrics

    for folder in (args.gt, args.pred):
        if not folder.is_dir():
            raise UserError(f"not a folder: {folder}")
    gt_files = sorted(args.gt.glob("*.png"))
    if not gt_files:
        raise UserError(f"no .png label maps in {args.gt}")
    names = _read_class_names(args.class_names) if args.class_names else None
    metric = SemanticMetrics(args.num_classes, args.ignore_index, names)
    boundary = (
        BoundaryFScore(args.num_classes, args.boundary_tolerance, args.ignore_index, names)
        if args.boundary_tolerance is not None
        else None
    )
    extra = {p.name for p in args.pred.glob("*.png")} - {p.name for p in gt_files}
    if extra:
        logger.warning("%d predictions have no ground truth and are ignored", len(extra))
    for gt_path in gt_files:
        pred_path = args.pred / gt_path.name
        if not pred_path.is_file():
            raise UserError(f"no prediction for {gt_path.name} (expected {pred_path})")
        target, pred = read_label_png(gt_path), read_label_png(pred_path)
        if pred.shape != target.shape:
            raise UserError(
                f"{pred_path}: size {tuple(pred.shape)} != ground truth {tuple(target.shape)}"
            )
        try:
            metric.update(pred, target)
            if boundary is not None:
                boundary.update(pred, target)
        except UserError as exc:
            raise UserError(f"{gt_path.name}: {exc}") from None
    result = metric.compute()
    if boundary is not None:
        result["boundary_f"] = boundary.compute()["boundary_f"]
    if args.json:
        emit_json(result)
        return 0
    print(f"semantic metrics over {len(gt_files)} images ({args.num_classes} classes)")
    rows = [
        ("mIoU", "miou"),
        ("pixel accuracy", "pixel_accuracy"),
        ("mean accuracy", "mean_accuracy"),
        ("f.w. IoU", "fw_iou"),
        ("mean Dice", "dice"),
    ]
    if boundary is not None:
        rows.append((f"boundary F ({args.boundary_tolerance} px)", "boundary_f"))
    width = max(len(label) for label, _ in rows)
    for label, key in rows:
        print(f"  {label:<{width}}  {_fmt(result[key])}")
    name_width = max(8, *(len(n) for n in result["per_class"]))
    print(f"\n  {'class':<{name_width}}  {'IoU':>7}  {'Dice':>7}  {'acc':>7}")
    for name, cls in result["per_class"].items():
        print(
            f"  {name:<{name_width}}  {_fmt(cls['iou']):>7}  {_fmt(cls['dice']):>7}  "
            f"{_fmt(cls['accuracy']):>7}"
        )
    return 0


def run_coco(args: argparse.Namespace) -> int:
    from pixelwise.metrics.coco import coco_evaluate

    stats = coco_evaluate(args.gt, args.pred, args.iou_type, max_dets=args.max_dets)
    if args.json:
        emit_json(stats)
        return 0
    print(f"COCO {args.iou_type} (pycocotools COCOeval; -1: no ground truth in that size range)")
    for name, value in stats.items():
        print(f"  {name:<6} {value:7.4f}")
    return 0


def run_panoptic(args: argparse.Namespace) -> int:
    from pixelwise.metrics.panoptic import evaluate_panoptic_files

    for folder in (args.gt_dir, args.pred_dir):
        if not folder.is_dir():
            raise UserError(f"not a folder: {folder}")
    result = evaluate_panoptic_files(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
    if args.json:
        emit_json(result)
        return 0
    print(f"{'':10s}  {'PQ':>7}  {'SQ':>7}  {'RQ':>7}  {'N':>4}")
    for group in ("all", "things", "stuff"):
        r = result[group]
        print(
            f"{group:10s}  {_fmt(r['pq']):>7}  {_fmt(r['sq']):>7}  {_fmt(r['rq']):>7}  {r['n']:>4}"
        )
    width = max(10, *(len(n) for n in result["per_class"]))
    print(f"\n{'class':<{width}}  {'kind':<5}  {'PQ':>7}  {'SQ':>7}  {'RQ':>7}  "
          f"{'TP':>5}  {'FP':>5}  {'FN':>5}")  # fmt: skip
    for name, c in result["per_class"].items():
        kind = "thing" if c["isthing"] else "stuff"
        print(
            f"{name:<{width}}  {kind:<5}  {_fmt(c['pq']):>7}  {_fmt(c['sq']):>7}  "
            f"{_fmt(c['rq']):>7}  {c['tp']:>5}  {c['fp']:>5}  {c['fn']:>5}"
        )
    return 0


# metric name -> runner
RUNNERS = {"semantic": run_semantic, "coco": run_coco, "panoptic": run_panoptic}


def run(args: argparse.Namespace) -> int:
    return RUNNERS[args.metrics_command](args)
