"""Demo: panoptic segmentation of synthetic scenes with Panoptic FPN.

Synthesises a COCO panoptic set (sky, ground, water as stuff; people and shapes as things),
trains a small `panoptic_fpn` (resnet18-FPN, light heads), evaluates PQ / SQ / RQ on the val
split, predicts the val images into COCO panoptic files with overlays, and scores those files
with `evaluate_panoptic_files` (the `pixelwise metrics panoptic` path), which gives the same PQ
as the evaluation. Everything lands under `out`:

    out/data/          the synthetic dataset (images, annotations/panoptic_*.json, panoptic/)
    out/run/           the training run (checkpoints, metrics.jsonl, curves.png)
    out/predictions/   panoptic.json, panoptic/NAME.png, overlays/NAME.png of the val images
    out/summary.json   the returned summary
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pixelwise.atomic import write_json
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

# light heads and fewer proposals: the demo trains on a CPU in minutes (`--quick`: seconds)
MODEL_OPTIONS: dict[str, Any] = {
    "backbone": "resnet18",
    "semantic_channels": 64,
    "mask_head_layers": [64, 64],
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
}
# (images, image size, epochs, batch, max steps)
SETTINGS = {
    "full": {"num": 160, "size": (128, 128), "epochs": 8, "batch_size": 4, "max_steps": None},
    "quick": {"num": 6, "size": (64, 64), "epochs": 1, "batch_size": 2, "max_steps": 2},
}
QUICK_MODEL_OPTIONS = {"semantic_channels": 16, "mask_head_layers": [16],
                       "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50,
                       "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 30,
                       "box_detections_per_img": 20}
PANOPTIC_MODELS = ("panoptic_fpn",)


def _evaluate(run: Path, data: Path) -> dict[str, Any]:
    """PQ of the run's best checkpoint on the val split (one image per batch, as predicted)."""
    import torch
    from torch.utils.data import DataLoader

    from pixelwise.engine.checkpoint import load_model
    from pixelwise.tasks import build_task

    model, meta = load_model(run)
    task = build_task(meta["task"])
    size = (meta.get("train") or {}).get("size")
    dataset = task.dataset(data, "val", size=tuple(size) if size else None, train=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=task.collate)
    with torch.inference_mode():
        return task.evaluate(model, loader, device=torch.device("cpu"))


def _predict(run: Path, data: Path, out: Path) -> dict[str, Any]:
    """COCO panoptic files and overlays of the val images, with the ground truth's image ids."""
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.predict import check_outputs, expand_inputs, predict_files
    from pixelwise.predict.panoptic import PanopticPredictor

    model, meta = load_model(run)
    gt_json = data / "annotations" / "panoptic_val.json"
    predictor = PanopticPredictor(model, meta, gt_json=gt_json)
    files = expand_inputs([data / "images" / "val"])
    check_outputs(files, out, predictor.outputs, overwrite=True)
    summary = predict_files(predictor, files, out)
    summary.update(predictor.finish(out))
    if summary["failed"]:
        raise UserError(f"demo: {len(summary['failed'])} images failed: "
                        f"{summary['failed'][0]['error']}")
    return summary


def run(out: Path, *, model: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Synthesise, train, evaluate, predict and score under `out`; returns the summary."""
    from pixelwise.data.synthetic import synthesize
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train
    from pixelwise.metrics.panoptic import evaluate_panoptic_files
    from pixelwise.tasks.panoptic import PanopticTask

    name = model or "panoptic_fpn"
    if name not in PANOPTIC_MODELS:
        raise UserError(f"the panoptic demo trains {', '.join(PANOPTIC_MODELS)}, not {name!r} "
                        "(fuse a semantic and an instance run with `pixelwise predict --task "
                        "panoptic --semantic RUN_A --instance RUN_B`)")
    out = Path(out)
    settings = SETTINGS["quick" if quick else "full"]
    data = synthesize("panoptic", out / "data", num=settings["num"], size=settings["size"],
                      seed=0, val_fraction=0.2 if not quick else 0.34, overwrite=True)
    task = PanopticTask.from_data(data)
    options = {**MODEL_OPTIONS, **(QUICK_MODEL_OPTIONS if quick else {}),
               **task.model_options(name)}
    cfg = TrainConfig(data=str(data), out=str(out / "run"), task="panoptic", model=name,
                      model_options=options, epochs=settings["epochs"],
                      batch_size=settings["batch_size"], max_steps=settings["max_steps"],
                      lr=1e-3, clip_grad=5.0, seed=0, progress=not quick)
    trained = train(cfg, overwrite=True)
    run_dir = out / "run"
    metrics = _evaluate(run_dir, data)
    predicted = _predict(run_dir, data, out / "predictions")
    scored = evaluate_panoptic_files(data / "annotations" / "panoptic_val.json",
                                     data / "panoptic" / "val", predicted["panoptic_json"],
                                     out / "predictions" / "panoptic")
    summary = {
        "task": "panoptic",
        "model": name,
        "out": str(out),
        "data": str(data),
        "run": str(run_dir),
        "steps": trained["steps"],
        "train_seconds": trained["seconds"],
        "pq": metrics["all"]["pq"],
        "pq_things": metrics["things"]["pq"],
        "pq_stuff": metrics["stuff"]["pq"],
        "sq": metrics["all"]["sq"],
        "rq": metrics["all"]["rq"],
        "pq_of_predicted_files": scored["all"]["pq"],
        "predictions": str(out / "predictions"),
        "panoptic_json": predicted["panoptic_json"],
        "overlays": str(out / "predictions" / "overlays"),
        "curves": str(run_dir / "curves.png"),
        "metrics": metrics,
    }
    write_json(out / "summary.json", summary)
    logger.info("panoptic demo: PQ %s (things %s, stuff %s); files: %s", summary["pq"],
                summary["pq_things"], summary["pq_stuff"], out)
    return summary
