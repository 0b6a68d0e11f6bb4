"""Benchmark: panoptic_fpn against a semantic FPN and a Mask R-CNN run separately, same run.

    .venv/bin/python benchmarks/panoptic.py [--size 256] [--backbones resnet18 resnet50]
        [--detections 100] [--images 4] [--repeats 3] [--threads 1] [--json]

For each backbone, three models of the same build: `panoptic_fpn` (one backbone-FPN, both
heads), `semantic_fpn` (the backbone-FPN and the semantic head alone) and `mask_rcnn` (the
backbone-FPN and the R-CNN heads alone). The separate models get panoptic_fpn's weights, so they
do exactly its work plus a second backbone pass (checked: same detections, same semantic logits).
Every image is one 3 x size x size tensor fed alone (batch 1, eval, no grad); box_score_thresh 0,
so with random weights every image gives `--detections` detections and the mask head's work is
fixed. The fusion (`fuse_panoptic`, the same for both pipelines) is timed apart.

Times are interleaved (joint, separate, separate, joint, ...) and summarised by the best run
(other processes on a shared machine only ever add time); medians are in --json. Both the
elapsed time and the process CPU time are reported: with one thread (the default) the CPU time
leaves out the time other processes take the core, so it is the steadier figure. What to read:
joint / (semantic + instance) -- below 1 because the backbone runs once. The backbone's own
time is listed: the saving should be about that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from pixelwise.data.synth_scene import SCENE_CATEGORIES
from pixelwise.models.panoptic_fpn import panoptic_fpn
from pixelwise.models.rcnn import mask_rcnn
from pixelwise.models.semantic_fpn_head import semantic_fpn
from pixelwise.panoptic import PanopticCategories, fuse_panoptic


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each fn once to warm up, then `repeats` rounds alternating the order; returns the
    wall-clock and the process CPU times of every run."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _models(backbone: str, categories: PanopticCategories, detections: int
            ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """panoptic_fpn, semantic_fpn and mask_rcnn with the same weights, in eval mode."""
    rcnn_options = dict(backbone=backbone, box_score_thresh=0.0,
                        box_detections_per_img=detections)
    joint = panoptic_fpn(categories.num_classes, num_things=categories.num_things,
                         **rcnn_options)
    semantic = semantic_fpn(categories.num_classes, backbone=backbone)
    semantic.backbone.load_state_dict(joint.backbone.state_dict())
    semantic.head.load_state_dict(joint.semantic_head.state_dict())
    instance = mask_rcnn(categories.num_things + 1, **rcnn_options)
    instance.load_state_dict(joint.detector.state_dict())
    return joint.eval(), semantic.eval(), instance.eval()


@torch.no_grad()
def run_case(backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    categories = PanopticCategories([
        {"id": c.id, "name": c.name, "isthing": int(c.isthing)}
        for c in SCENE_CATEGORIES["shapes"]
    ])
    torch.manual_seed(0)
    joint, semantic, instance = _models(backbone, categories, args.detections)
    images = [torch.rand(3, args.size, args.size) for _ in range(args.images)]

    # the separate pipeline computes what the joint one does
    out = joint(images[:1])[0]
    sem = semantic(images[0][None])[0]
    det = instance(images[:1])[0]
    torch.testing.assert_close(sem, out["semantic"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det["boxes"], out["boxes"])
    assert torch.equal(det["labels"], out["labels"])

    outputs = [joint([img])[0] for img in images]

    def run_joint() -> None:
        for img in images:
            joint([img])

    def run_semantic() -> None:
        for img in images:
            semantic(img[None])

    def run_instance() -> None:
        for img in images:
            instance([img])

    def run_backbone() -> None:
        for img in images:
            joint.backbone(joint.detector.transform([img])[0].tensors)

    def run_fusion() -> None:
        for o in outputs:
            fuse_panoptic(o, o["semantic"], categories)

    wall, cpu = _interleaved({"joint": run_joint, "semantic": run_semantic,
                              "instance": run_instance, "backbone": run_backbone,
                              "fusion": run_fusion}, args.repeats)
    result: dict[str, Any] = {"backbone": backbone,
                              "detections": int(outputs[0]["boxes"].shape[0])}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        per_image = {k: [t / len(images) * 1000 for t in v] for k, v in times.items()}  # ms
        best = {k: min(v) for k, v in per_image.items()}
        separate = best["semantic"] + best["instance"]
        result[clock] = {
            "best_ms": best,
            "median_ms": {k: statistics.median(v) for k, v in per_image.items()},
            "separate_ms": separate,
            "ratio_joint_over_separate": best["joint"] / separate,
            "saved_ms": separate - best["joint"],
        }
    return result


def report(cases: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"inference per {args.size}x{args.size} image (batch 1, best of {args.repeats} runs over "
        f"{args.images} images, {args.threads} thread(s), {args.detections} detections/image)",
        "",
        f"{'backbone':<20} {'clock':<5} {'panoptic_fpn':>12} {'semantic':>9} {'mask_rcnn':>9} "
        f"{'sum':>9} {'joint/sum':>9} {'saved':>8} {'backbone':>9} {'fusion':>7}",
    ]
    for c in cases:
        for clock in ("cpu", "wall"):
            r = c[clock]
            b = r["best_ms"]
            lines.append(
                f"{c['backbone']:<20} {clock:<5} {b['joint']:>10.1f}ms {b['semantic']:>7.1f}ms "
                f"{b['instance']:>7.1f}ms {r['separate_ms']:>7.1f}ms "
                f"{r['ratio_joint_over_separate']:>9.3f} {r['saved_ms']:>6.1f}ms "
                f"{b['backbone']:>7.1f}ms {b['fusion']:>5.1f}ms")
    lines.append("")
    lines.append("joint/sum < 1: the shared backbone runs once; 'saved' should be about "
                 "'backbone' (the backbone-FPN pass alone). cpu = process CPU time (with one "
                 "thread, the time not lost to other processes); wall = elapsed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [run_case(backbone, args) for backbone in args.backbones]
    if args.json:
        print(json.dumps({"threads": args.threads, "size": args.size, "images": args.images,
                          "cases": cases}, indent=2))
    else:
        print(report(cases, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
