"""The panoptic segmentation task: data, loss terms and PQ evaluation for the trainer.

The model (`panoptic_fpn`) takes a list of images and, in training, their targets, and returns
its own dict of weighted loss terms (Mask R-CNN's five and ``loss_semantic``); in eval it returns
one dict per image with the instance outputs (``boxes``, ``labels`` 1..T, ``scores``, ``masks``)
and ``semantic`` logits (C, H, W). Evaluation fuses them (`fuse_model_output`, i.e.
`pixelwise.panoptic.fuse_panoptic` with the task's `FusionConfig`) into segments carrying the
dataset's category ids and scores them with `pixelwise.metrics.panoptic.PanopticQuality` against
the ground-truth PNG ids, summing the per-category statistics over DDP ranks.

Evaluation never crops or resizes the ground truth (a resize or crop can remove segments that
``segments_info`` lists): with a training ``size`` only the *image* is resized for the model and
its outputs are brought back to the ground truth's size before fusion.

The task's `config()` holds the dataset's categories (ids, names, isthing), so evaluation and
prediction rebuild the label <-> category-id maps from a checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pixelwise.engine.distributed import all_reduce_sum
from pixelwise.errors import UserError
from pixelwise.panoptic import FusionConfig, PanopticCategories, PanopticResult, fuse_panoptic

logger = logging.getLogger(__name__)

# the category fields kept in the task config (and copied into prediction jsons)
CATEGORY_KEYS = ("id", "name", "isthing", "supercategory", "color")


def _clean_categories(categories: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The categories sorted by id, with the JSON fields the outputs need."""
    PanopticCategories(categories)  # validates: integer unique ids, isthing, at most 254
    cats = [{k: c[k] for k in CATEGORY_KEYS if k in c} for c in categories]
    for cat in cats:
        cat["isthing"] = int(bool(cat["isthing"]))
        cat["name"] = str(cat.get("name", cat["id"]))
    return sorted(cats, key=lambda c: c["id"])


def panoptic_jsons(root: str | Path) -> list[Path]:
    """The ``annotations/panoptic_SPLIT.json`` files of the dataset at `root` (train first)."""
    from pixelwise.data.layout import detect_layout

    layout = detect_layout(root)
    found = [s.annotations["panoptic"] for s in layout.splits.values()
             if "panoptic" in s.annotations]
    if not found:
        raise UserError(f"{root}: no panoptic annotations (annotations/panoptic_SPLIT.json) "
                        "found")
    return found


def categories_of(path: Path) -> list[dict[str, Any]]:
    """The categories of a COCO panoptic json."""
    from pixelwise.data.coco import load_coco_json

    return list(load_coco_json(path, kind="panoptic")["categories"])


def list_collate(samples: list[tuple[torch.Tensor, dict[str, Any]]]
                 ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """`(image (C, H, W), target dict)` pairs -> (list of images, list of targets): R-CNN models
    take images of different sizes, so nothing is stacked."""
    images = [image.as_subclass(torch.Tensor) for image, _ in samples]
    return images, [target for _, target in samples]


class ResizeImage:
    """Resize only the image to (H, W) (bilinear, antialiased, as the training `Resize`); the
    target is kept at its own size: evaluation resizes the predictions back instead."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = [int(size[0]), int(size[1])]

    def __call__(self, image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        from torchvision.transforms.v2.functional import resize

        return resize(image, self.size, antialias=True), target


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) or (N, h, w) masks (bool or probabilities) -> (N, H, W) probabilities."""
    if masks.dim() == 4:
        masks = masks[:, 0]  # (N, 1, h, w) -> (N, h, w)
    if tuple(masks.shape[-2:]) == size:
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]  # (N, 1, H, W) -> (N, H, W)


def fuse_model_output(output: Mapping[str, torch.Tensor], categories: PanopticCategories,
                      config: FusionConfig | None = None,
                      size: Sequence[int] | None = None) -> PanopticResult:
    """Fuse one image's instance + semantic output into a panoptic result at `size` (H, W).

    output: ``masks`` (N, 1, h, w) or (N, h, w) (bool, or probabilities thresholded at
    ``config.mask_threshold``), ``scores`` (N,), ``labels`` (N,) in 1..T and ``semantic``
    (C, h, w) logits (or (h, w) labels). When `size` differs from (h, w), the logits and masks
    are resized bilinearly first (the labels by nearest).
    """
    semantic = output["semantic"]
    size = tuple(int(v) for v in (size or semantic.shape[-2:]))
    if tuple(semantic.shape[-2:]) != size:
        if semantic.dim() == 3:
            semantic = F.interpolate(semantic[None].float(), size=size, mode="bilinear",
                                     align_corners=False)[0]  # (1, C, H, W) -> (C, H, W)
        else:
            semantic = F.interpolate(semantic[None, None].float(), size=size,
                                     mode="nearest-exact")[0, 0].long()  # (H, W)
    if semantic.is_floating_point():
        semantic = semantic.float()  # half under autocast
    instances = {"masks": _resize_masks(output["masks"], size), "scores": output["scores"],
                 "labels": output["labels"]}
    return fuse_panoptic(instances, semantic, categories, config)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel -> the model


class PanopticTask:
    """Panoptic segmentation over the dataset's COCO panoptic categories.

    Args:
        categories: the dataset's categories (``id``, ``name``, ``isthing``; any order).
        fusion: `FusionConfig` fields (instance_score_thresh, overlap_threshold,
            stuff_area_threshold, mask_threshold) used by evaluation and prediction.
        num_classes, num_things, class_names: derived from `categories` (stored in `config()`
            for readers of checkpoints); when given they must agree.
        loss, class_weights: not used (the model computes its loss terms; `panoptic_fpn` has
            ``instance_loss_weight`` / ``semantic_loss_weight``); giving them is an error.
    """

    name = "panoptic"
    best_metric = "pq"  # evaluate()["pq"] = PQ over all categories, deciding the best checkpoint
    find_unused_parameters = True  # R-CNN heads skip parameters in steps without instances

    def __init__(
        self,
        categories: Sequence[Mapping[str, Any]],
        *,
        fusion: Mapping[str, Any] | FusionConfig | None = None,
        num_classes: int | None = None,
        num_things: int | None = None,
        class_names: Sequence[str] | None = None,
        loss: str | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        if loss is not None or class_weights is not None:
            raise UserError("task panoptic: --loss and --class-weights do not apply; the model "
                            "computes its loss terms (panoptic_fpn: instance_loss_weight, "
                            "semantic_loss_weight)")
        self.categories = _clean_categories(categories)
        self.panoptic_categories = PanopticCategories(self.categories)
        self.num_classes = self.panoptic_categories.num_classes
        self.num_things = self.panoptic_categories.num_things
        self.class_names = [c["name"] for c in self.categories]  # by semantic label (id order)
        self.thing_names = [c["name"] for c in self.categories if c["isthing"]]
        for key, given, derived in (("num_classes", num_classes, self.num_classes),
                                    ("num_things", num_things, self.num_things),
                                    ("class_names", class_names, self.class_names)):
            if given is not None and (list(given) if key == "class_names" else given) != derived:
                raise UserError(f"task panoptic: {key} {given!r} does not fit the categories "
                                f"({derived!r})")
        if self.num_things < 1 or self.num_things == self.num_classes:
            raise UserError(f"task panoptic needs thing and stuff categories; got "
                            f"{self.num_things} things of {self.num_classes}")
        if isinstance(fusion, FusionConfig):
            self.fusion = fusion
        else:
            known = {f.name for f in dataclasses.fields(FusionConfig)}
            unknown = sorted(set(fusion or {}) - known)
            if unknown:
                raise UserError(f"task panoptic: unknown fusion settings {unknown}; valid: "
                                f"{sorted(known)}")
            self.fusion = FusionConfig(**dict(fusion or {}))

    @classmethod
    def from_data(cls, root: str | Path, **options: Any) -> "PanopticTask":
        """The task for the COCO panoptic layout at `root` (categories of its first split)."""
        return cls(categories_of(panoptic_jsons(root)[0]), **options)

    def config(self) -> dict[str, Any]:
        """JSON settings; `PanopticTask(**config minus "name")` rebuilds the task."""
        return {
            "name": self.name,
            "categories": [dict(c) for c in self.categories],
            "num_classes": self.num_classes,
            "num_things": self.num_things,
            "class_names": list(self.class_names),
            "fusion": dataclasses.asdict(self.fusion),
        }

    def model_options(self, model: str) -> dict[str, Any]:
        """Builder options the data decides for model `model`: `panoptic_fpn`'s number of thing
        categories (``num_things``); none for other models."""
        from pixelwise.models import model_options

        return {"num_things": self.num_things} if "num_things" in model_options(model) else {}

    def check_data(self, root: str | Path) -> None:
        """A one-line `UserError` when the categories of any of the dataset's panoptic jsons
        differ (ids or isthing) from this task's."""
        mine = {c["id"]: bool(c["isthing"]) for c in self.categories}
        for path in panoptic_jsons(root):
            other = _clean_categories(categories_of(path))
            theirs = {c["id"]: bool(c["isthing"]) for c in other}
            if mine != theirs:
                raise UserError(
                    f"{path}: its panoptic categories {sorted(theirs)} (things "
                    f"{sorted(k for k, v in theirs.items() if v)}) differ from the model's "
                    f"{sorted(mine)} (things {sorted(k for k, v in mine.items() if v)})")
            names = {c["id"]: c["name"] for c in other}
            if any(names[c["id"]] != c["name"] for c in self.categories):
                logger.warning("%s: category names differ from the model's (same ids)", path)

    def dataset(self, root: str | Path, split: str, *, size: tuple[int, int] | None = None,
                train: bool = False, skip_bad: bool = False) -> Dataset:
        """`CocoPanoptic` of `split`. Training resizes to `size` (H, W) when given and flips
        horizontally at random; evaluation resizes the image only (see the module docstring).
        `skip_bad`: a bad sample is logged and read as None instead of stopping."""
        from pixelwise.data.panoptic import CocoPanoptic
        from pixelwise.data.transforms import HorizontalFlip, JointTransform, Resize

        transforms: Any = None
        if train:
            steps: list[nn.Module] = []
            if size is not None:
                steps.append(Resize(list(size), antialias=True))
            steps.append(HorizontalFlip(0.5))
            transforms = JointTransform(steps)
        elif size is not None:
            transforms = ResizeImage(size)
        return CocoPanoptic.from_layout(root, split, transforms=transforms, skip_bad=skip_bad)

    collate = staticmethod(list_collate)

    def to_device(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]],
                  device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """Images and the tensors of each target on `device` (``segments``, ``image_id``: as
        they are)."""
        images, targets = batch
        non_blocking = device.type == "cuda"
        images = [image.to(device, non_blocking=non_blocking) for image in images]
        targets = [{k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor)
                    else v for k, v in target.items()} for target in targets]
        return images, targets

    @staticmethod
    def num_images(batch: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> int:
        return len(batch[0])

    def _check_model(self, model: nn.Module) -> None:
        inner = _unwrap(model)
        things = getattr(inner, "num_things", None)
        if things is None or not hasattr(inner, "semantic_head"):
            name = (getattr(inner, "config", None) or {}).get("name", type(inner).__name__)
            raise UserError(f"task panoptic trains models with an instance and a semantic "
                            f"branch (panoptic_fpn); {name!r} is not one")
        if things != self.num_things or inner.num_classes != self.num_classes:
            raise UserError(f"the model predicts {inner.num_classes} classes with {things} "
                            f"things, the data has {self.num_classes} with {self.num_things}")

    def loss(self, model: nn.Module, batch: tuple[list[torch.Tensor], list[dict[str, Any]]]
             ) -> dict[str, torch.Tensor]:
        """The model's own weighted loss terms for `(images, targets)` (training mode)."""
        self._check_model(model)
        images, targets = batch
        return model(images, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, *, device: torch.device,
                 amp: bool = False) -> dict[str, Any]:
        """PQ / SQ / RQ over all `batches` (this rank's share; statistics summed over ranks).

        Returns `PanopticQuality.compute()`'s ``{all, things, stuff, per_class}`` (the keys of
        ``pixelwise metrics panoptic``) plus ``pq`` = ``all.pq`` for the best checkpoint.
        """
        from pixelwise.metrics.panoptic import PanopticQuality

        self._check_model(model)
        metric = PanopticQuality(self.categories)
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                if batch is None:  # only bad samples (--skip-bad)
                    continue
                images, targets = self.to_device(batch, device)
                with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    outputs = model(images)
                for output, target in zip(outputs, targets):
                    gt = target["panoptic"].as_subclass(torch.Tensor).cpu().numpy()
                    result = fuse_model_output(output, self.panoptic_categories, self.fusion,
                                               size=gt.shape)
                    metric.update(gt, target["segments"], result.ids.cpu().numpy(),
                                  result.segments, image=f"id {target['image_id']}")
        finally:
            model.train(was_training)
        # (4, C) statistics + the image count, summed over ranks (exact in float64)
        stats = torch.tensor([*metric.tp, *metric.fp, *metric.fn, *metric.iou,
                              metric.num_images], dtype=torch.float64)
        stats = all_reduce_sum(stats)
        c = len(metric.category_ids)
        metric.tp[:] = stats[:c].round().long().numpy()
        metric.fp[:] = stats[c:2 * c].round().long().numpy()
        metric.fn[:] = stats[2 * c:3 * c].round().long().numpy()
        metric.iou[:] = stats[3 * c:4 * c].numpy()
        metric.num_images = int(stats[-1])
        if metric.num_images == 0:
            raise UserError("no images to evaluate")
        result = metric.compute()
        return {"pq": result["all"]["pq"], **result}
