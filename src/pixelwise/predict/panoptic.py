"""Prediction for the panoptic task: image files -> COCO panoptic files and colour overlays.

Two predictors with the interface of `pixelwise.predict` (`predict`, `outputs`, `write`, plus
`finish`, which writes the json once every image is done):

* `PanopticPredictor(model, meta, ...)`: a trained `panoptic_fpn` run; its outputs are fused
  with the run's `FusionConfig` (`pixelwise.tasks.panoptic.fuse_model_output`) and carry the
  dataset's category ids stored in the checkpoint.
* `FusionPredictor(semantic, instance, ...)`: any trained semantic run fused with any trained
  instance run (Mask R-CNN); the two label spaces are matched by class name
  (`PanopticCategories.from_class_names`), so every thing class of the instance run must be a
  class of the semantic run.

Outputs under OUT (see `pixelwise.panoptic.writer`): ``OUT/panoptic/NAME.png`` (RGB, segment id
= R + 256 G + 256^2 B, 0 = void), ``OUT/panoptic.json`` (``images``, ``annotations`` with
``segments_info``, ``categories``) and ``OUT/overlays/NAME.png`` (stuff tinted by category,
things by instance with outlines and names; a legend of the stuff present).

Image ids: with ``gt_json`` (a COCO panoptic json of the ground truth) each image gets the id
of the ground-truth image with the same file name, its size is checked against the json's, and
the json's categories are the ones the prediction must use: then ``pixelwise metrics panoptic``
scores the output against that ground truth directly. Without it, as for instance predictions:
when every image lies in a dataset folder of the pixelwise layout (``DIR/images/SPLIT/NAME``)
whose ``DIR/annotations/panoptic_SPLIT.json`` lists it, that json's ids are used; otherwise the
images are numbered 1..N in the order they are written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from pixelwise.data.images import image_to_float
from pixelwise.errors import UserError
from pixelwise.panoptic import (FusionConfig, PanopticCategories, PanopticPredictionWriter,
                                PanopticResult, fuse_panoptic)
from pixelwise.predict.semantic import (
    SemanticPredictor,
    adapt_channels,
    describe_size,
    resolve_size,
)
from pixelwise.predict.dataset_ids import dataset_image_ids
from pixelwise.predict.tiling import model_device
from pixelwise.tasks.panoptic import _resize_masks, fuse_model_output

logger = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"
BACKGROUND_NAMES = ("__background__", "background")  # a detector's label 0, when listed


@dataclass
class PanopticPrediction:
    """One image's fused result, the image id it is written under (None: decided by `finish`)
    and the image file it came from."""

    result: PanopticResult
    image_id: int | None = None
    source: str | None = None


class GroundTruthImages:
    """File name -> (image id, (H, W)) of a COCO (panoptic) json's ``images``, and its
    categories."""

    def __init__(self, path: str | Path) -> None:
        from pixelwise.metrics.coco import load_json

        self.path = Path(path)
        data = load_json(self.path, "ground-truth json")
        if not isinstance(data, Mapping) or not isinstance(data.get("images"), list) or \
                not isinstance(data.get("categories"), list):
            raise UserError(f"{self.path}: no 'images' and 'categories' lists (not a COCO "
                            "panoptic json?)")
        self.categories = [dict(c) for c in data["categories"]]
        self.by_name: dict[str, tuple[int, tuple[int, int] | None]] = {}
        twice: set[str] = set()
        for image in data["images"]:
            if not isinstance(image, Mapping) or "id" not in image or \
                    not isinstance(image.get("file_name"), str):
                raise UserError(f"{self.path}: every image needs an 'id' and a 'file_name'")
            name = PurePosixPath(image["file_name"]).name
            size = ((int(image["height"]), int(image["width"]))
                    if "height" in image and "width" in image else None)
            if name in self.by_name:
                twice.add(name)
            self.by_name[name] = (image["id"], size)
        self.ambiguous = twice

    def lookup(self, path: str) -> tuple[int, tuple[int, int] | None]:
        """(image id, size) of the image file `path` (matched by file name)."""
        name = Path(path).name
        if name in self.ambiguous:
            raise UserError(f"{path}: {self.path} lists several images named {name}")
        if name not in self.by_name:
            raise UserError(f"{path}: no image named {name} in {self.path}")
        return self.by_name[name]


def _resolve_size(size: str | Sequence[int], meta: Mapping[str, Any]) -> tuple[int, int] | None:
    return resolve_size(size, (meta.get("train") or {}).get("size"))


class _PanopticWriting:
    """What both predictors share: image ids, the COCO panoptic writer and the overlays."""

    categories: list[dict[str, Any]]  # the categories written into panoptic.json
    panoptic_categories: PanopticCategories
    fusion: FusionConfig

    def _setup_output(self, categories: Sequence[Mapping[str, Any]],
                      gt_json: str | Path | None) -> None:
        self.ground_truth = GroundTruthImages(gt_json) if gt_json is not None else None
        self.categories = (self.ground_truth.categories if self.ground_truth is not None
                           else [dict(c) for c in categories])
        self._writer: PanopticPredictionWriter | None = None
        self._sources: list[str] = []  # the image files written, in order

    def _image_id(self, image: torch.Tensor, name: str) -> int | None:
        """The ground truth's id of image `name`; its size is checked (None without gt_json)."""
        if self.ground_truth is None:
            return None
        image_id, size = self.ground_truth.lookup(name)
        shape = (int(image.shape[-2]), int(image.shape[-1]))
        if size is not None and size != shape:
            raise UserError(f"{name}: the image is {shape[0]}x{shape[1]} but "
                            f"{self.ground_truth.path} says {size[0]}x{size[1]} (height x width)")
        return image_id

    def outputs(self, out: Path, name: str) -> dict[str, Path]:
        """The files `write` makes for the image called `name` (its stem + .png)."""
        stem = Path(name).stem + ".png"
        return {"panoptic": out / PanopticPredictionWriter.png_dir / stem,
                "overlay": out / OVERLAY_DIR / stem}

    def render(self, image: torch.Tensor, result: PanopticResult) -> np.ndarray:
        """(H, W, 3) uint8: the overlay with a legend of the stuff categories present."""
        from pixelwise.viz import (
            category_colors,
            enlarge_small,
            legend_image,
            overlay_panoptic,
            with_legend,
        )

        ids = result.ids.cpu().numpy()
        overlay = enlarge_small(overlay_panoptic(image, ids, result.segments, self.categories))
        cats = sorted(self.categories, key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(cats)}
        stuff = sorted({index[s["category_id"]] for s in result.segments
                        if s["category_id"] in index and not cats[index[s["category_id"]]]
                        .get("isthing")})
        if not stuff:
            return overlay
        legend = legend_image([c["name"] for c in cats], category_colors(cats), present=stuff,
                              max_height=max(overlay.shape[0], 64))
        return with_legend(overlay, legend)

    def write(self, out: Path, name: str, image: torch.Tensor, prediction: PanopticPrediction
              ) -> dict[str, Any]:
        """Check and save one image's panoptic PNG, then its overlay; returns a summary row."""
        from pixelwise.viz import save_png

        if self._writer is None:
            self._writer = PanopticPredictionWriter(out, self.categories)
        image_id = prediction.image_id
        if image_id is None:  # numbered for now; `finish` may take the dataset's ids instead
            image_id = len(self._sources) + 1
        result = prediction.result
        size = (int(image.shape[-2]), int(image.shape[-1]))
        annotation = self._writer.add(image_id, name, result.ids, result.segments, size=size)
        self._sources.append(prediction.source or name)
        paths = self.outputs(out, name)
        save_png(paths["overlay"], self.render(image, result))
        names = {c["id"]: c["name"] for c in self.categories}
        things = sum(1 for s in result.segments if s.get("isthing"))
        return {
            "image_id": image_id,
            "panoptic": str(paths["panoptic"]),
            "overlay": str(paths["overlay"]),
            "size": list(size),
            "things": things,
            "stuff": len(result.segments) - things,
            "categories": sorted({names.get(s["category_id"], str(s["category_id"]))
                                  for s in annotation["segments_info"]}),
        }

    def finish(self, out: Path) -> dict[str, Any]:
        """Write ``OUT/panoptic.json`` (when any image was predicted); returns its path and
        where the image ids came from (the gt json, a dataset json, or "sequential")."""
        if self._writer is None:
            return {"panoptic_json": None, "image_ids": None}
        if self.ground_truth is not None:
            source = str(self.ground_truth.path)
        else:
            ids, source = dataset_image_ids(self._sources)
            if ids is not None:  # the writer's records, one per image in order: renumber them
                for image, annotation, image_id in zip(self._writer.images,
                                                       self._writer.annotations, ids, strict=True):
                    image["id"] = annotation["image_id"] = image_id
                logger.info("image ids from %s", source)
        return {"panoptic_json": str(self._writer.close()), "image_ids": source}


class PanopticPredictor(_PanopticWriting):
    """Panoptic segmentations of images with a `panoptic_fpn` run rebuilt by `load_model`.

    Args:
        model: in eval mode, on its device; list of (C, H, W) -> list of output dicts.
        meta: the checkpoint's description (`meta["task"]`: categories and fusion settings,
            `meta["train"]`: the training size).
        size: "train" (the run's training size, else native), "native" or (H, W): the size the
            model sees; outputs are brought back to the image's size before fusion.
        batch_size: images per forward pass.
        gt_json: the ground truth's COCO panoptic json (image ids, sizes, categories).
        fusion: `FusionConfig` fields overriding the run's.
        tile, overlap, pad_mode: semantic prediction options; tiling is refused.
    """

    task = "panoptic"

    def __init__(self, model: nn.Module, meta: dict[str, Any], *,
                 size: str | Sequence[int] = "train", batch_size: int = 1,
                 gt_json: str | Path | None = None, fusion: Mapping[str, Any] | None = None,
                 tile: int | None = None, overlap: int = 0, pad_mode: str = "reflect") -> None:
        from pixelwise.tasks import build_task

        if tile is not None:
            raise UserError("--tile applies to semantic runs; a panoptic model predicts whole "
                            "images (pass --size to predict at a smaller size)")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        task = build_task(meta["task"])
        self.model = model
        self.meta = meta
        self.panoptic_categories = task.panoptic_categories
        self.fusion = FusionConfig(**{**dataclasses.asdict(task.fusion), **dict(fusion or {})})
        self.in_channels = int((meta.get("model") or {}).get("in_channels", 3))
        self.size = _resolve_size(size, meta)
        self.batch_size = batch_size
        self.tile = None
        self.device = model_device(model)
        self._setup_output(task.categories, gt_json)

    @property
    def policy(self) -> str:
        return describe_size(self.size)

    def prepare(self, image: torch.Tensor, name: str = "image") -> torch.Tensor:
        """(C, H, W) image -> (in_channels, h, w) float32 model input at the prediction size."""
        x = image_to_float(adapt_channels(image, self.in_channels, name))
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            from torchvision.transforms.v2.functional import resize

            x = resize(x, list(self.size), antialias=True)
        return x

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor], names: Sequence[str] | None = None
                ) -> list[PanopticPrediction]:
        """Fused panoptic results at each image's own size."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        ids = [self._image_id(img, name) for img, name in zip(images, names)]
        inputs = [self.prepare(img, name).to(self.device) for img, name in zip(images, names)]
        predictions: list[PanopticPrediction] = []
        for first in range(0, len(inputs), self.batch_size):
            outputs = self.model(inputs[first:first + self.batch_size])
            for k, output in enumerate(outputs):
                i = first + k
                size = (int(images[i].shape[-2]), int(images[i].shape[-1]))
                result = fuse_model_output({key: v.cpu() for key, v in output.items()},
                                           self.panoptic_categories, self.fusion, size=size)
                predictions.append(PanopticPrediction(result, ids[i], names[i]))
        return predictions


def thing_class_names(meta: Mapping[str, Any], where: str = "instance run") -> list[str]:
    """The class names of an instance run by label 1..T (from its checkpoint's task settings:
    ``categories`` ordered by id, or ``class_names`` with or without the background first)."""
    task = meta.get("task") or {}
    cats = task.get("categories")
    if isinstance(cats, list) and cats and all(isinstance(c, Mapping) for c in cats):
        things = [c for c in cats if c.get("isthing", 1)]
        return [str(c.get("name", c.get("id"))) for c in sorted(things, key=lambda c: c["id"])]
    names = task.get("thing_names") or task.get("class_names")
    if isinstance(names, list) and names:
        names = [str(n) for n in names]
        num = (meta.get("model") or {}).get("num_classes")
        if names[0] in BACKGROUND_NAMES or (num is not None and len(names) == num):
            names = names[1:]
        return names
    raise UserError(f"{where}: its checkpoint does not name its classes (task settings "
                    f"{sorted(task)})")


class FusionPredictor(_PanopticWriting):
    """Panoptic segmentations fused from a semantic run and an instance run.

    Args:
        semantic: a `SemanticPredictor` of the semantic run (its size policy and tiling apply).
        instance_model: the instance run's model (eval mode): list of (C, H, W) -> dicts with
            ``masks`` (N, 1, H, W), ``scores``, ``labels`` 1..T.
        instance_meta: its checkpoint's description (class names, input channels, size).
        size: the instance model's prediction size policy ("train", "native" or (H, W)).
        gt_json: the ground truth's COCO panoptic json (image ids, sizes, category ids by name).
        fusion: `FusionConfig` fields.
    """

    task = "panoptic"

    def __init__(self, semantic: SemanticPredictor, instance_model: nn.Module,
                 instance_meta: dict[str, Any], *, size: str | Sequence[int] = "train",
                 gt_json: str | Path | None = None, fusion: Mapping[str, Any] | None = None,
                 names: tuple[str, str] = ("semantic run", "instance run")) -> None:
        self.semantic = semantic
        self.instance_model = instance_model
        self.instance_meta = instance_meta
        self.thing_names = thing_class_names(instance_meta, names[1])
        self.fusion = FusionConfig(**dict(fusion or {}))
        self.in_channels = int((instance_meta.get("model") or {}).get("in_channels", 3))
        self.size = _resolve_size(size, instance_meta)
        self.batch_size = semantic.batch_size
        self.tile = semantic.tile
        self.device = model_device(instance_model)
        gt = GroundTruthImages(gt_json) if gt_json is not None else None
        missing = [n for n in self.thing_names if n not in semantic.class_names]
        if missing:
            raise UserError(f"{names[1]}'s classes {missing} are not classes of the {names[0]} "
                            f"({', '.join(semantic.class_names)}); fusion matches classes by name")
        try:
            self.panoptic_categories = PanopticCategories.from_class_names(
                semantic.class_names, self.thing_names, gt.categories if gt is not None else None)
        except UserError as exc:
            if gt is None:
                raise
            raise UserError(f"the classes of the {names[0]} and the {names[1]} do not fit the "
                            f"categories of {gt.path}: {exc}") from None
        self._setup_output(self.panoptic_categories.categories, gt_json)
        logger.info("fusing %s: %s", names, self.panoptic_categories)

    @property
    def policy(self) -> str:
        return f"semantic {self.semantic.policy}, instance {describe_size(self.size)}"

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor], names: Sequence[str] | None = None
                ) -> list[PanopticPrediction]:
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        ids = [self._image_id(img, name) for img, name in zip(images, names)]
        labels = self.semantic.predict(images, names)  # (H, W) each, at the image's size
        predictions = []
        for img, name, sem, image_id in zip(images, names, labels, ids):
            x = image_to_float(adapt_channels(img, self.in_channels, name))
            if self.size is not None and tuple(x.shape[-2:]) != self.size:
                from torchvision.transforms.v2.functional import resize

                x = resize(x, list(self.size), antialias=True)
            output = self.instance_model([x.to(self.device)])[0]
            if "masks" not in output:
                raise UserError(f"the instance run's model "
                                f"{(self.instance_meta.get('model') or {}).get('name')!r} "
                                "predicts no instance masks")
            size = (int(img.shape[-2]), int(img.shape[-1]))
            instances = {"masks": _resize_masks(output["masks"].cpu(), size),
                         "scores": output["scores"].cpu(), "labels": output["labels"].cpu()}
            result = fuse_panoptic(instances, sem, self.panoptic_categories, self.fusion)
            predictions.append(PanopticPrediction(result, image_id, name))
        return predictions


def load_fusion_predictor(semantic_run: str | Path, instance_run: str | Path, *,
                          which: str = "best", device: str = "auto",
                          size: str | Sequence[int] = "train", batch_size: int = 1,
                          tile: int | None = None, overlap: int = 0, pad_mode: str = "reflect",
                          gt_json: str | Path | None = None,
                          fusion: Mapping[str, Any] | None = None) -> FusionPredictor:
    """A `FusionPredictor` of two trained runs (directories or checkpoint files)."""
    from pixelwise.engine.checkpoint import find_checkpoint, load_model
    from pixelwise.engine.distributed import resolve_device

    dev = resolve_device(device)
    sem_path = find_checkpoint(semantic_run, which)
    inst_path = find_checkpoint(instance_run, which)
    sem_model, sem_meta = load_model(sem_path, device=dev)
    task = (sem_meta.get("task") or {}).get("name")
    if task != "semantic":
        raise UserError(f"--semantic {semantic_run}: a {task} run; fusion needs a semantic run")
    inst_model, inst_meta = load_model(inst_path, device=dev)
    task = (inst_meta.get("task") or {}).get("name")
    if task != "instance":
        raise UserError(f"--instance {instance_run}: a {task} run; fusion needs an instance run "
                        "(mask_rcnn)")
    semantic = SemanticPredictor(sem_model, sem_meta, size=size, tile=tile, overlap=overlap,
                                 batch_size=batch_size, pad_mode=pad_mode)
    # the instance model predicts whole images: with --tile (large images) at their own size
    inst_size = "native" if tile is not None else size
    return FusionPredictor(semantic, inst_model, inst_meta, size=inst_size, gt_json=gt_json,
                           fusion=fusion, names=(f"semantic run {semantic_run}",
                                                 f"instance run {instance_run}"))
