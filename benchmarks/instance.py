"""Benchmark: pixelwise Mask / Keypoint R-CNN against torchvision's, same weights, same run.

    .venv/bin/python benchmarks/instance.py [--size 256] [--detections 100] [--repeats 3]
        [--threads 2] [--only eval-mask eval-keypoint train]
        [--head-dtypes float32 bfloat16] [--device cpu] [--amp] [--json]

* eval: ``maskrcnn_resnet50_fpn`` / ``keypointrcnn_resnet50_fpn`` (weights=None,
  weights_backbone=None) against pixelwise's `mask_rcnn` / `keypoint_rcnn` with the same
  backbone and settings (min_size = max_size = size, torchvision's anchors) and the same state
  dict; one image, box_score_thresh 0 so that (with random weights) every image gives
  `--detections` detections. Checked: boxes, labels and scores identical; masks: the pasted
  probabilities' largest difference, the smallest IoU at 0.5 (pixels within 1e-4 of 0.5 left
  out: ties), how many pixels flip and how close to 0.5 they were; keypoints (pixelwise
  reports COCO pixel indices: + 0.5 to compare). The timed pixelwise model thresholds its
  masks (bool), as it is used. Each eval case runs with pixelwise's float32 heads (its
  default: torchvision's numbers) and with ``head_dtype="bfloat16"`` (the mask / keypoint
  head and predictor in bfloat16; backbone, RPN and box branch float32, so the same boxes and
  scores): `--head-dtypes` picks.
* train: one SGD step (forward, backward, update) on a batch of two images with 8 random boxes
  and masks each, resnet50-FPN and resnet18-FPN, against torchvision's model of the same build.
* where the time goes: one more eval run of each model with every stage timed.

Times are interleaved (torchvision, pixelwise, pixelwise, torchvision, ...) and summarised by
the best run (other processes on a shared machine only ever add time); medians are in --json.
"cpu-s ratio" compares process CPU seconds instead (best run): with --threads 1 it is the
least contention-sensitive figure on a busy machine (with 2 threads it counts spin-waits too).
Goals (issue 5): eval ratio torchvision / pixelwise >= 2, train ratio >= 1 (no slower).

`--device cuda` runs both models on the GPU (every timed run and stage ends with a
synchronisation); `--amp` trains under autocast (float16 with loss scaling on CUDA, bfloat16 on
a CPU), as `pixelwise train --amp` does. The times keep PyTorch's defaults (cuDNN convolutions
in TF32 for float32); the agreement is given with them and again with TF32 off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torchvision.models.detection as tvd
import torchvision.models.detection.roi_heads as tv_roi_heads
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import pixelwise.models.fast_postprocess as fast_postprocess
from pixelwise.models.rcnn import keypoint_rcnn, mask_rcnn
from pixelwise.models.rcnn_heads import torchvision_key_map

TV_ANCHORS = (32, 64, 128, 256, 512)  # torchvision's default anchor sizes
# pixels whose torchvision probability is this close to 0.5 are ties (a random model's thin
# boxes paste saturated probabilities as exactly 0.5): left out of the IoU, counted as flips
TIE = 1e-4
EVAL_GOAL, TRAIN_GOAL = 2.0, 1.0
DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ----------------------------------------------------------------------------- timing


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int
                 ) -> dict[str, dict[str, list[float]]]:
    """Run each fn once to warm up, then `repeats` rounds alternating the order; wall-clock
    and process CPU seconds of each run."""
    for fn in fns.values():
        fn()
    _sync()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            _sync()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _summary(times: dict[str, list[float]]) -> dict[str, float]:
    return {"best": min(times["wall"]), "median": statistics.median(times["wall"]),
            "cpu_best": min(times["cpu"])}


class StageClock:
    """Times named stages by wrapping callables (module forwards, methods, module functions)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self.seconds[label] += time.perf_counter() - start
        return timed


@contextlib.contextmanager
def _stages(model: torch.nn.Module, clock: StageClock) -> Iterator[None]:
    """Patch `model` (torchvision's or pixelwise's) so that `clock` times each stage."""
    heads = model.roi_heads
    targets: list[tuple[Any, str, str]] = [
        (model.transform, "forward", "transform (normalise, batch)"),
        (model.backbone, "forward", "backbone + FPN"),
        (model.rpn, "forward", "RPN (head, anchors, NMS)"),
        (heads.box_roi_pool, "forward", "box RoIAlign (1000 proposals)"),
        (heads.box_head, "forward", "box head + predictor"),
        (heads.box_predictor, "forward", "box head + predictor"),
        (fast_postprocess, "selected_mask_logits", "mask predictor"),
        (fast_postprocess, "keypoint_logits", "keypoint predictor"),
        (heads, "postprocess_detections", "box decoding + class-wise NMS"),
        (model.transform, "postprocess", "paste masks / rescale"),
        (fast_postprocess, "run_conv_stack", "RoI head convs"),
        (tv_roi_heads, "maskrcnn_inference", "mask probabilities"),
        (tv_roi_heads, "keypointrcnn_inference", "heatmaps -> keypoints"),
        (fast_postprocess, "heatmaps_to_keypoints", "heatmaps -> keypoints"),
    ]
    if heads.has_mask():
        targets += [(heads.mask_roi_pool, "forward", "mask RoIAlign"),
                    (heads.mask_head, "forward", "RoI head convs"),
                    (heads.mask_predictor, "forward", "mask predictor"),
                    (heads.mask_predictor, "forward_selected", "mask predictor")]
    if heads.has_keypoint():
        targets += [(heads.keypoint_roi_pool, "forward", "keypoint RoIAlign"),
                    (heads.keypoint_head, "forward", "RoI head convs"),
                    (heads.keypoint_predictor, "forward", "keypoint predictor")]
    # head_dtype bfloat16: the heads' low-precision copies (made by an earlier run)
    for _, low in heads.__dict__.get("_low_precision_copies", {}).values():
        targets.append((low, "forward", "RoI head convs"))
    with contextlib.ExitStack() as stack:
        for obj, attr, label in targets:
            if hasattr(obj, attr):
                stack.enter_context(mock.patch.object(obj, attr,
                                                      clock.wrap(label, getattr(obj, attr))))
        yield


def breakdown(models: dict[str, torch.nn.Module], images: list[torch.Tensor]
              ) -> dict[str, dict[str, float]]:
    """{model name: {stage: seconds}} of one eval run each (plus 'total' and 'other')."""
    out = {}
    for name, model in models.items():
        clock = StageClock()
        with _stages(model, clock), torch.inference_mode():
            _sync()
            start = time.perf_counter()
            model(images)
            _sync()
            total = time.perf_counter() - start
        stages = dict(clock.seconds)
        stages["other"] = total - sum(stages.values())
        stages["total"] = total
        out[name] = stages
    return out


# ----------------------------------------------------------------------------- agreement


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-instance IoU of two (N, H, W) bool stacks (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def agreement(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How pixelwise's detections compare with torchvision's (see the module docstring)."""
    same_n = len(ref["boxes"]) == len(ours["boxes"])
    result: dict[str, Any] = {
        "detections": [len(ref["boxes"]), len(ours["boxes"])],
        "boxes_identical": same_n and torch.equal(ref["boxes"], ours["boxes"]),
        "scores_identical": same_n and torch.equal(ref["scores"], ours["scores"]),
        "labels_identical": same_n and torch.equal(ref["labels"], ours["labels"]),
    }
    if "masks" in ref and same_n:
        # ours as probabilities (mask_threshold None) to see how far apart they are
        p_ref, p_ours = ref["masks"][:, 0], ours["masks"][:, 0]
        m_ref, m_ours = p_ref >= 0.5, p_ours >= 0.5
        decided = (p_ref - 0.5).abs() > TIE  # pixels not sitting on the threshold
        iou = _mask_iou(m_ref & decided, m_ours & decided)
        flips = m_ref != m_ours
        result["mask_prob_max_abs_diff"] = float((p_ref - p_ours).abs().max())
        result["mask_iou_min"] = float(iou.min()) if len(iou) else 1.0
        result["mask_iou_mean"] = float(iou.mean()) if len(iou) else 1.0
        result["masks_iou_ge_0.99"] = float((iou >= 0.99).float().mean()) if len(iou) else 1.0
        result["pixels_flipped"] = int(flips.sum())
        result["flipped_max_dist_to_0.5"] = (float((p_ref[flips] - 0.5).abs().max())
                                             if flips.any() else 0.0)
    if "keypoints" in ref and same_n:
        diff = (ref["keypoints"][..., :2] - (ours["keypoints"][..., :2] + 0.5)).abs()
        result["keypoints_max_abs_diff_px"] = float(diff.max()) if diff.numel() else 0.0
        result["keypoints_identical_fraction"] = (
            float((diff.amax(-1) == 0).float().mean()) if diff.numel() else 1.0)
        sdiff = (ref["keypoints_scores"] - ours["keypoints_scores"]).abs()
        result["keypoint_scores_max_abs_diff"] = float(sdiff.max()) if sdiff.numel() else 0.0
    return result


# ----------------------------------------------------------------------------- cases


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """float32 convolutions and matmuls on the GPU in full precision while inside."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _same_weights(ref: torch.nn.Module, ours: torch.nn.Module) -> None:
    ours.load_state_dict(torchvision_key_map(ref.state_dict(), ours))


def eval_case(kind: str, size: int, detections: int, repeats: int,
              head_dtype: str = "float32") -> dict[str, Any]:
    torch.manual_seed(0)
    settings = dict(min_size=size, max_size=size, box_score_thresh=0.0,
                    box_detections_per_img=detections)
    if kind == "mask":
        ref = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **settings)
        ours = mask_rcnn(91, backbone="resnet50", anchor_sizes=TV_ANCHORS, mask_threshold=0.5,
                         head_dtype=head_dtype, **settings)
    else:
        ref = tvd.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, **settings)
        ours = keypoint_rcnn(2, num_keypoints=17, backbone="resnet50", anchor_sizes=TV_ANCHORS,
                             head_dtype=head_dtype, **settings)
    _same_weights(ref, ours)
    ref.to(DEVICE).eval()
    ours.to(DEVICE).eval()
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE)]
    with torch.inference_mode():
        ours.transform.mask_threshold = None  # probabilities for the comparison
        check = agreement(ref(images)[0], ours(images)[0])
        if DEVICE.type == "cuda":  # cuDNN's TF32 convolutions (on by default) in both models
            with _no_tf32():
                check["without TF32"] = agreement(ref(images)[0], ours(images)[0])
        ours.transform.mask_threshold = 0.5

        def run(model: torch.nn.Module) -> Callable[[], Any]:
            return lambda: model(images)

        times = _interleaved({"torchvision": run(ref), "pixelwise": run(ours)}, repeats)
    stages = breakdown({"torchvision": ref, "pixelwise": ours}, images)
    name = f"{kind} eval" + ("" if head_dtype == "float32" else " bf16 heads")
    return {"case": name, "times": {k: _summary(v) for k, v in times.items()},
            "agreement": check, "stages": stages}


def _train_targets(size: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size * 0.7)
    wh = 16 + torch.rand(n, 2, generator=g) * (size * 0.25)
    boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
        masks[i, y1:y2, x1:x2] = 1
    labels = torch.randint(1, 91, (n,), generator=g)
    return {"boxes": boxes, "labels": labels, "masks": masks}


def train_case(backbone: str, size: int, repeats: int, amp: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    settings = dict(min_size=size, max_size=size)
    if backbone == "resnet50":
        ref = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **settings)
    else:
        body = resnet_fpn_backbone(backbone_name=backbone, weights=None,
                                   norm_layer=torch.nn.BatchNorm2d, trainable_layers=5)
        ref = tvd.MaskRCNN(body, 91, **settings)
    ours = mask_rcnn(91, backbone=backbone, anchor_sizes=TV_ANCHORS, **settings)
    _same_weights(ref, ours)
    ref.to(DEVICE)
    ours.to(DEVICE)
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(i)).to(DEVICE)
              for i in range(2)]
    targets = [{k: v.to(DEVICE) for k, v in _train_targets(size, 8, i).items()}
               for i in range(2)]
    half = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], Any]:
        scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp and half == torch.float16)

        def run() -> dict[str, float]:
            torch.manual_seed(1)  # same proposal sampling for both models
            with torch.autocast(DEVICE.type, dtype=half, enabled=amp):
                losses = model(images, [dict(t) for t in targets])
            opt.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(opt)
            scaler.update()
            return {k: float(v.detach()) for k, v in losses.items()}
        return run

    ref.train()
    ours.train()
    runs = {name: step(m, torch.optim.SGD(m.parameters(), lr=1e-4))
            for name, m in (("torchvision", ref), ("pixelwise", ours))}
    first = {name: run() for name, run in runs.items()}  # same weights: same losses
    same = first["torchvision"] == first["pixelwise"]
    times = _interleaved(runs, repeats)
    name = f"train step {backbone}" + (" amp" if amp else "")
    return {"case": name, "times": {k: _summary(v) for k, v in times.items()},
            "agreement": {"first_losses_identical": same}}


# ----------------------------------------------------------------------------- report


def _ratio(case: dict[str, Any]) -> float:
    t = case["times"]
    return t["torchvision"]["best"] / t["pixelwise"]["best"]


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in values.items())


def report(cases: list[dict[str, Any]], args: argparse.Namespace) -> str:
    where = (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    lines = [f"R-CNN benchmark: {args.size}x{args.size}, {where}, "
             f"eval batch 1 with {args.detections} detections, train batch 2 "
             f"(best of {args.repeats}; ratio = torchvision / pixelwise)", ""]
    lines.append(f"{'case':<26}{'torchvision s':>14}{'pixelwise s':>13}{'ratio':>8}{'goal':>7}"
                 f"{'cpu-s ratio':>13}")
    for case in cases:
        goal = EVAL_GOAL if "eval" in case["case"] else TRAIN_GOAL
        t = case["times"]
        ratio = _ratio(case)
        cpu_ratio = t["torchvision"]["cpu_best"] / t["pixelwise"]["cpu_best"]
        lines.append(f"{case['case']:<26}{t['torchvision']['best']:>14.3f}"
                     f"{t['pixelwise']['best']:>13.3f}{ratio:>7.2f}x{'>=' + str(goal):>7}"
                     f"{cpu_ratio:>12.2f}x{'' if ratio >= goal else '  (below goal)'}")
    for case in cases:
        agree = dict(case["agreement"])
        exact = agree.pop("without TF32", None)
        lines += ["", f"{case['case']}: {_pairs(agree)}"]
        if exact is not None:
            lines.append(f"  without TF32: {_pairs(exact)}")
        if "stages" in case:
            ref, ours = case["stages"]["torchvision"], case["stages"]["pixelwise"]
            lines.append(f"  where the time goes (one run each, s): {'torchvision':>12}"
                         f"{'pixelwise':>11}")
            for stage in [s for s in ref if s not in ("other", "total")] + ["other", "total"]:
                lines.append(f"  {stage:<38}{ref.get(stage, 0.0):>12.3f}"
                             f"{ours.get(stage, 0.0):>11.3f}")
            for stage in ours:
                if stage not in ref:
                    lines.append(f"  {stage:<38}{0.0:>12.3f}{ours[stage]:>11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["eval-mask", "eval-keypoint", "train"],
                        choices=["eval-mask", "eval-keypoint", "train"])
    parser.add_argument("--train-backbones", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--head-dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"],
                        help="pixelwise's eval cases with these head_dtype settings")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--amp", action="store_true",
                        help="train steps under autocast (float16 on CUDA, bfloat16 on a CPU)")
    parser.add_argument("--json", action="store_true", help="print the results as json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    cases = []
    for kind in ("mask", "keypoint"):
        if f"eval-{kind}" in args.only:
            cases += [eval_case(kind, args.size, args.detections, args.repeats, dtype)
                      for dtype in args.head_dtypes]
    if "train" in args.only:
        cases += [train_case(b, args.size, args.repeats, args.amp)
                  for b in args.train_backbones]
    if args.json:
        print(json.dumps({"threads": args.threads, "size": args.size, "device": str(DEVICE),
                          "cases": cases}, indent=2))
    else:
        print(report(cases, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
