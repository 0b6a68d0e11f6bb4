"""Prediction for the instance and keypoint tasks: images in, COCO results and overlays out.

`InstancePredictor(model, meta, ...)` runs a detection model rebuilt by `load_model` (Mask R-CNN,
Keypoint R-CNN, SOLOv2) on images read by `pixelwise.data.images.read_image`:

* **input**: the model's channels (`adapt_channels`: grey <-> colour as the semantic predictor
  does), values by `image_to_float`; **size** "train" (default) resizes to the run's training
  ``--size`` when it had one, "native" keeps the image size, (H, W) resizes to that size. The
  detections are mapped back to the image's own size (`rescale_detections`).
* **score_threshold**: detections scoring lower are dropped (from the overlays and the results;
  pass 0 for COCO evaluation: AP needs the low-scoring tail too).
* **outputs**: ``OUT/overlays/NAME.png`` per image (masks, boxes, "name 0.93" tags, keypoints
  and skeleton; `pixelwise.viz.overlay_instances`), and after the last image (`finish`)
  ``OUT/results.json``: the COCO results of all images (`pixelwise.tasks.instance.to_coco_results`:
  bbox xywh, score, RLE segmentation with str counts, keypoints, the dataset's category ids).

Image ids: when every image lies in a dataset folder of the pixelwise layout
(``DIR/images/SPLIT/NAME``) whose ``DIR/annotations/{instances,keypoints}_SPLIT.json`` lists it,
the json's ids are used, so results.json evaluates against that json directly (pycocotools'
``COCO.loadRes``). Otherwise the images are numbered 1, 2, ... in input order and
``OUT/images.json`` (a COCO ``images`` list: id, file_name, height, width) is written beside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixelwise.atomic import write_json
from pixelwise.data.images import image_to_float
from pixelwise.errors import UserError
from pixelwise.predict.dataset_ids import dataset_image_ids
from pixelwise.predict.semantic import OVERLAY_DIR, adapt_channels, describe_size, resolve_size
from pixelwise.predict.tiling import model_device
from pixelwise.tasks.instance import detections_to_cpu, rescale_detections, to_coco_results

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
IMAGES_FILE = "images.json"
DEFAULT_SCORE_THRESHOLD = 0.5
_ANNOTATION_KIND = {"instance": "instances", "keypoints": "keypoints"}


class InstancePredictor:
    """Detections, overlays and COCO results of images (see the module docstring).

    Args:
        model: a detection model in eval mode on its device: list of (C, H, W) -> list of dicts.
        meta: the checkpoint's description (`meta["task"]`: categories, class names, schema).
        size: "train", "native" or (H, W).
        batch_size: images per forward pass.
        score_threshold: the lowest score kept.
        tile: not supported (detections do not tile); overlap, pad_mode: ignored (the semantic
            predictor's options, accepted so that `make_predictor` passes the same ones).
    """

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        *,
        size: str | Sequence[int] = "train",
        tile: int | None = None,
        overlap: int = 0,
        batch_size: int = 1,
        pad_mode: str = "reflect",
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    ) -> None:
        from pixelwise.tasks import build_task

        if tile is not None:
            raise UserError("--tile is for semantic models; detection models predict whole images")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise UserError(f"score threshold must be in [0, 1], got {score_threshold}")
        self.model = model
        self.meta = meta
        self.task = build_task(meta.get("task") or {})
        self.task_name = self.task.name
        model_cfg = meta.get("model") or {}
        self.in_channels = int(model_cfg.get("in_channels", 3))
        self.size = resolve_size(size, (meta.get("train") or {}).get("size"))
        self.batch_size = int(batch_size)
        self.score_threshold = float(score_threshold)
        self.tile = None
        self.class_names = self.task.class_names
        schema = self.task.schema
        self.skeleton = list(schema.skeleton) if schema is not None else None
        self._records: list[dict[str, Any]] = []  # per written image: path, size, results
        self.device = model_device(model)

    @property
    def policy(self) -> str:
        """What `size` resolved to, for summaries: "native" or "HxW"."""
        return describe_size(self.size)

    def prepare(self, image: torch.Tensor, name: str = "image") -> torch.Tensor:
        """(C, H, W) uint8/uint16/float image -> (in_channels, h, w) float32 model input."""
        x = image_to_float(adapt_channels(image, self.in_channels, name))  # (C', H, W)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            from torchvision.transforms.v2.functional import resize

            x = resize(x, list(self.size), antialias=True)  # as the training Resize
        return x

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor], names: Sequence[str] | None = None
                ) -> list[dict[str, Any]]:
        """Detections of `images` ((C, H, W) as `read_image` returns), each a dict of CPU
        tensors at its image's size (boxes, labels, scores, masks / keypoints) scoring at
        least `score_threshold`, plus ``path`` (the name given)."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        out: list[dict[str, Any]] = []
        for first in range(0, len(images), self.batch_size):
            chunk = range(first, min(first + self.batch_size, len(images)))
            inputs = [self.prepare(images[i], names[i]).to(self.device) for i in chunk]
            detections = self.task.detect(self.model, inputs, device=self.device,
                                          amp=self.device.type == "cuda")
            for i, x, det in zip(chunk, inputs, detections):
                det = rescale_detections(det, x.shape[-2:], images[i].shape[-2:])
                keep = det["scores"] >= self.score_threshold
                det = {k: v[keep] for k, v in detections_to_cpu(det).items()}
                out.append({**det, "path": names[i]})
        return out

    def outputs(self, out: Path, name: str) -> dict[str, Path]:
        """The file `write` makes for the image called `name` (results.json comes at `finish`)."""
        return {"overlay": out / OVERLAY_DIR / (Path(name).stem + ".png")}

    def render(self, image: torch.Tensor, det: dict[str, Any]) -> Any:
        """The overlay (H, W, 3) uint8 of one image's detections."""
        from pixelwise.viz import overlay_instances

        return overlay_instances(
            image, masks=det.get("masks"), boxes=det["boxes"], labels=det["labels"],
            scores=det["scores"], class_names=self.class_names, keypoints=det.get("keypoints"),
            skeleton=self.skeleton)

    def write(self, out: Path, name: str, image: torch.Tensor, det: dict[str, Any]
              ) -> dict[str, Any]:
        """Save the overlay of one image; keep its results for `finish`. Returns a summary row."""
        from pixelwise.viz import save_png

        overlay = self.render(image, det)
        results = to_coco_results(det, 0, self.task.categories.category_ids)  # ids at finish
        path = self.outputs(out, name)["overlay"]
        save_png(path, overlay)
        self._records.append({"path": Path(det.get("path", name)), "file_name": name,
                              "size": [int(v) for v in image.shape[-2:]], "results": results})
        labels = det["labels"].tolist()
        return {
            "overlay": str(path),
            "size": [int(v) for v in image.shape[-2:]],
            "detections": len(labels),
            "classes": sorted({self.class_names[c] for c in labels if c < len(self.class_names)}),
        }

    def finish(self, out: Path) -> dict[str, Any]:
        """Write ``OUT/results.json`` (and ``OUT/images.json`` when the images are not all in
        one dataset json) for the images written so far; returns their paths and counts."""
        ids, source = self._dataset_ids()
        images = None
        if ids is None:
            ids = list(range(1, len(self._records) + 1))
            images = [{"id": i, "file_name": r["file_name"], "height": r["size"][0],
                       "width": r["size"][1]} for i, r in zip(ids, self._records)]
        results = []
        for image_id, record in zip(ids, self._records):
            results += [dict(r, image_id=image_id) for r in record["results"]]
        write_json(out / RESULTS_FILE, results, indent=None)
        summary: dict[str, Any] = {"results": str(out / RESULTS_FILE),
                                   "detections": len(results), "image_ids": source}
        if images is not None:
            write_json(out / IMAGES_FILE, images, indent=None)
            summary["images_json"] = str(out / IMAGES_FILE)
        else:
            (out / IMAGES_FILE).unlink(missing_ok=True)  # a stale list from an earlier run
        return summary

    def _dataset_ids(self) -> tuple[list[int] | None, str]:
        """The image ids of the written images from their dataset json, when all of them are
        listed in one (see the module docstring); else (None, "sequential")."""
        kind = _ANNOTATION_KIND.get(self.task_name, "instances")
        ids, source = dataset_image_ids([record["path"] for record in self._records], kind)
        if ids is not None:
            logger.info("image ids from %s", source)
        return ids, source
