"""Demo: instance segmentation (Mask R-CNN, or SOLOv2 with ``--model solov2``) on synthetic
shapes and stick figures, trained briefly on the CPU.

Writes under `out` (default runs/demo-instance; `pixelwise.demos.keypoints` does the same for
Keypoint R-CNN under runs/demo-keypoints):

    data/            the synthetic dataset (images/, annotations/{instances,keypoints}_*.json)
    run/             the training run: config.json, metrics.jsonl, curves.png, best/last
                     checkpoints (`pixelwise eval out/run`, `pixelwise predict out/run ...`)
    predictions/     results.json (COCO results of the val images, the dataset's image ids) and
                     overlays/NAME.png (masks, boxes, names and scores, skeletons)
    metrics.json     COCO AP of the best checkpoint on val (bbox + segm, or bbox + keypoints)
    demo.json        the summary returned (and printed by `pixelwise demo`)

Choices for a CPU: 128 x 128 scenes whose things are 12-35 % of the side (the default 5-20 %
would be 6-26 px here) without crowd groups; a ResNet-18 FPN; thin heads and few sampled RoIs
(the RoI heads, not the backbone, dominate an R-CNN step on small images); bfloat16 autocast
where the CPU has native bf16, channels_last weights; Mask R-CNN with the settings of
`benchmarks/quality.py`'s instance recipe (`MODEL_OVERRIDES`); AdamW with warm-up and a cosine
schedule, clipped gradients. ``quick`` trains two steps on a few 64 x 64 images:
the pipeline end to end in seconds, not a useful model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pixelwise.demos._output import MARKER, prepare_out, run_paths, write_json
from pixelwise.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

# what each model gets beyond num_classes (only the options its builder takes are passed)
MODEL_OPTIONS: dict[str, Any] = {
    "backbone": "resnet18",
    "mask_head_layers": [128, 128, 128, 128],
    "keypoint_head_layers": [128, 128, 128, 128],
    "box_batch_size_per_image": 128,
    "rpn_post_nms_top_n_train": 600,
    "rpn_post_nms_top_n_test": 300,
    "head_channels": 128,  # solov2
    "kernel_channels": 128,
    "mask_channels": 64,
}
# Mask R-CNN as `benchmarks/quality.py`'s instance recipe trains it on a CPU: a 64-wide FPN
# with BatchNorm, thin mask head, half the sampled RoIs positive (the mask head's training
# RoIs), anchors for small things, scores weighted by the masks' maskness
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "mask_rcnn": {"fpn_channels": 64, "head_norm": "bn", "mask_head_layers": [64, 64, 64, 64],
                  "box_batch_size_per_image": 64, "box_positive_fraction": 0.5,
                  "rpn_pre_nms_top_n_train": 1000, "anchor_sizes": [16, 32, 64, 128, 256],
                  "maskness": 1.0},
}
QUICK_OPTIONS: dict[str, Any] = {
    **MODEL_OPTIONS,
    "mask_head_layers": [16], "keypoint_head_layers": [16], "box_batch_size_per_image": 32,
    "rpn_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 20,
    "head_channels": 16, "kernel_channels": 16, "mask_channels": 16, "stacked_convs": 1,
}
SETTINGS: dict[str, Any] = {
    "size": 128,  # image side (px)
    "num": 300,  # images synthesised; 20 % go to val
    "thing_size": (0.12, 0.35),
    "epochs": 4,
    "batch_size": 4,
    "lr": 3e-4,
    "score_threshold": 0.5,  # overlays show detections scoring at least this
    "amp": "auto",  # bfloat16 autocast where the CPU has native bf16
    "channels_last": True,
}
# Mask R-CNN's steps take ~0.47 s here (bfloat16, the options above; ~2 s in float32 with
# the 256-wide defaults): 600 steps in ~5 minutes, val segm AP50 0.21 (240 steps: 0.09)
MODEL_SETTINGS: dict[str, dict[str, Any]] = {"mask_rcnn": {"epochs": 10, "lr": 5e-4}}
QUICK: dict[str, Any] = {**SETTINGS, "size": 64, "num": 5, "epochs": 1, "batch_size": 2,
                         "max_steps": 2, "amp": False}
ENTRIES = ("data", "run", "predictions", "metrics.json", MARKER)
DEFAULT_MODELS = {"instance": "mask_rcnn", "keypoints": "keypoint_rcnn"}
HEADLINE = {"instance": "segm", "keypoints": "keypoints"}  # the AP the summary leads with


def run_detection_demo(task_name: str, out: Path, *, model: str | None = None,
                       quick: bool = False) -> dict[str, Any]:
    """Synthesise, train, evaluate and predict for `task_name` ("instance" or "keypoints")
    under `out`; returns the summary (module docstring)."""
    import torch
    from torch.utils.data import DataLoader

    from pixelwise.data.synthetic import SceneConfig, synthesize
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import native_bf16, train
    from pixelwise.models import MODELS, model_options
    from pixelwise.predict import expand_inputs, predict_files
    from pixelwise.predict.instance import InstancePredictor
    from pixelwise.tasks import TASKS

    name = model or DEFAULT_MODELS[task_name]
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    s = QUICK if quick else {**SETTINGS, **MODEL_SETTINGS.get(name, {})}
    out = Path(out)
    prepare_out(out, ENTRIES)
    start = time.perf_counter()
    scene = SceneConfig(thing_size=tuple(s["thing_size"]), crowd_fraction=0.0)
    data = synthesize(task_name, out / "data", num=s["num"], size=(s["size"], s["size"]),
                      seed=0, config=scene)
    task = TASKS[task_name].from_data(data)
    accepted = model_options(name)
    wanted = QUICK_OPTIONS if quick else {**MODEL_OPTIONS, **MODEL_OVERRIDES.get(name, {})}
    options = {k: v for k, v in wanted.items() if k in accepted}
    options.update(task.model_options(name))  # keypoint_rcnn: the dataset's schema
    amp = native_bf16() if s["amp"] == "auto" else bool(s["amp"])
    cfg = TrainConfig(data=str(data), out=str(out / "run"), task=task_name, model=name,
                      model_options=options, epochs=s["epochs"], batch_size=s["batch_size"],
                      lr=s["lr"], clip_grad=10.0, max_steps=s.get("max_steps"),
                      progress=not quick, amp=amp, channels_last=s["channels_last"])
    trained = train(cfg)

    best, meta = load_model(out / "run", "best")
    val = task.dataset(data, "val")
    loader = DataLoader(val, batch_size=2, collate_fn=task.collate)
    with torch.inference_mode():
        metrics = task.evaluate(best, loader, device=torch.device("cpu"))
    write_json(out / "metrics.json", metrics)

    predictor = InstancePredictor(best, meta, score_threshold=s["score_threshold"])
    predicted = predict_files(predictor, expand_inputs([data / "images" / "val"]),
                              out / "predictions")
    if predicted["failed"]:
        raise UserError(f"could not predict {predicted['failed'][0]['image']}: "
                        f"{predicted['failed'][0]['error']}")
    written = predictor.finish(out / "predictions")
    headline = HEADLINE[task_name]
    summary = {
        "task": task_name,
        "model": name,
        **run_paths(out, data),
        "results": written["results"],
        "overlays": str(out / "predictions" / "overlays"),
        f"val_{headline}_AP": round(metrics[headline]["AP"], 4),
        f"val_{headline}_AP50": round(metrics[headline]["AP50"], 4),
        "val_bbox_AP": round(metrics["bbox"]["AP"], 4),
        "steps": trained["steps"],
        "train_seconds": round(trained["seconds"], 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "next": f"pixelwise eval {out / 'run'}; pixelwise predict {out / 'run'} IMAGE --out DIR",
        "amp": "bfloat16" if amp else None,
        "settings": {**s, "thing_size": list(s["thing_size"]), "model_options": {
            k: v for k, v in options.items() if k != "schema"}},
    }
    write_json(out / MARKER, summary)
    logger.info("demo done in %.0f s: val %s AP %.3f (AP50 %.3f); see %s",
                summary["total_seconds"], headline, metrics[headline]["AP"],
                metrics[headline]["AP50"], out)
    return summary


def run(out: Path, *, model: str | None = None, quick: bool = False) -> dict[str, Any]:
    """The instance segmentation demo (default model mask_rcnn)."""
    return run_detection_demo("instance", out, model=model, quick=quick)
