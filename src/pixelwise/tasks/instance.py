"""Instance segmentation and keypoint tasks: COCO data in, loss dicts and COCO AP out.

`InstanceTask` (name ``instance``) trains a model that follows torchvision's detection contract
(Mask R-CNN, SOLOv2): ``model(images, targets)`` in training returns a dict of loss terms,
``model(images)`` in eval returns one dict per image with ``boxes (D, 4)`` XYXY, ``labels (D,)``
in 1..K, ``scores (D,)`` and ``masks (D, 1, H, W)`` (bool, or probabilities thresholded here at
0.5). `KeypointTask` (name ``keypoints``) does the same for Keypoint R-CNN, whose detections
carry ``keypoints (D, K, 3)`` in COCO's pixel-index convention (the model converts; see
`pixelwise.models.rcnn`), and keeps the dataset's `KeypointSchema` in its config, so that eval
and predict rebuild everything from the checkpoint.

Data: `pixelwise.data.coco.CocoInstances` / `CocoKeypoints` (crowd annotations kept with
``iscrowd`` = 1, which the models leave out of their targets; degenerate boxes dropped by the
dataset with a warning; images without annotations allowed), augmented in training by the
schema-aware `pixelwise.data.transforms.train_transforms` (random scale, flip swapping left/right
keypoints, photometric jitter).

Evaluation: detections become COCO results with the dataset's category ids (`CategoryMap`):
``bbox`` [x, y, w, h], ``score``, RLE ``segmentation`` (counts as str) and flat ``keypoints``
[x1, y1, v1, ...] -- the same dicts `pixelwise predict` writes to ``results.json``. They stream
batch by batch into `pixelwise.metrics.coco.CocoEvaluator` against the split's own annotation
json (original coordinates: detections on images resized by ``--size`` are mapped back first),
and the per-image match tables of all DDP ranks are merged before the AP is computed. Boxes and
masks are scored over up to max(100, the model's detections per image) detections per image
(`evaluation_max_dets`): COCO's 100 unless the model was set to keep more for crowded images.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5  # probability masks (SOLOv2, mask_threshold=None) are thresholded here
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- results


def masks_to_rle(masks: torch.Tensor, threshold: float = MASK_THRESHOLD) -> list[dict[str, Any]]:
    """(D, 1, H, W) or (D, H, W) bool / probability masks -> D compressed COCO RLEs with
    ``counts`` as str (JSON-ready). Probabilities are thresholded with ``> threshold``."""
    import pycocotools.mask as mask_utils

    if masks.dim() == 4:
        masks = masks[:, 0]  # (D, 1, H, W) -> (D, H, W)
    binary = masks if masks.dtype == torch.bool else masks > threshold
    if binary.shape[0] == 0:
        return []
    array = np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy().astype(np.uint8))  # (H, W, D)
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def rescale_detections(det: dict[str, torch.Tensor], size: Sequence[int],
                       target_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """Detections on an image of `size` (h, w) mapped to the same image at `target_size` (H, W):
    boxes and keypoints scaled (keypoints as pixel centres: index + 0.5), masks resized
    bilinearly (bool masks as 0/1, thresholded again at 0.5). The input when sizes agree."""
    h, w = (int(v) for v in size)
    big_h, big_w = (int(v) for v in target_size)
    if (h, w) == (big_h, big_w):
        return det
    sx, sy = big_w / w, big_h / h
    out = dict(det)
    if "boxes" in det:
        scale = det["boxes"].new_tensor([sx, sy, sx, sy])
        out["boxes"] = det["boxes"] * scale
    if "keypoints" in det:
        kps = det["keypoints"].clone()
        kps[..., 0] = (kps[..., 0] + 0.5) * sx - 0.5
        kps[..., 1] = (kps[..., 1] + 0.5) * sy - 0.5
        out["keypoints"] = kps
    masks = det.get("masks")
    if masks is not None:
        was_bool = masks.dtype == torch.bool
        if masks.shape[0] == 0:
            out["masks"] = masks.new_zeros(0, 1, big_h, big_w)
        else:
            resized = F.interpolate(masks.float(), size=(big_h, big_w), mode="bilinear",
                                    align_corners=False)  # (D, 1, H, W)
            out["masks"] = resized > MASK_THRESHOLD if was_bool else resized
    return out


def to_coco_results(det: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                    ) -> list[dict[str, Any]]:
    """One image's detections (CPU tensors) -> COCO result dicts.

    category_ids: the COCO id of each label 1..K (``CategoryMap.category_ids``: label l has id
    ``category_ids[l - 1]``). Each result has image_id, category_id, bbox [x, y, w, h], score,
    and ``segmentation`` (RLE) when the detections have masks, ``keypoints`` (3K numbers: x, y and
    the model's visibility) when they have keypoints.
    """
    boxes = det["boxes"].detach().float().cpu()
    labels = det["labels"].detach().cpu().to(torch.int64)
    scores = det["scores"].detach().float().cpu()
    if labels.numel() and (labels.min() < 1 or labels.max() > len(category_ids)):
        raise UserError(f"detections with labels {labels.min().item()}..{labels.max().item()}, "
                        f"but the model's categories are labels 1..{len(category_ids)}")
    ids = torch.tensor(list(category_ids), dtype=torch.int64)
    cats = ids[labels - 1].tolist() if labels.numel() else []
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    rles = masks_to_rle(det["masks"]) if "masks" in det else None
    kps = det["keypoints"].detach().float().cpu() if "keypoints" in det else None
    results = []
    for i in range(len(labels)):
        res: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(cats[i]),
            "bbox": [round(float(v), 3) for v in xywh[i]],
            "score": float(scores[i]),
        }
        if rles is not None:
            res["segmentation"] = rles[i]
        if kps is not None:
            res["keypoints"] = [round(float(v), 3) for v in kps[i].reshape(-1)]  # (K, 3) -> (3K,)
        results.append(res)
    return results


def detections_to_cpu(det: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one detection dict on the CPU, in float32 where floating (after AMP)."""
    out = {}
    for key, value in det.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            out[key] = value.float() if value.is_floating_point() else value
    return out


# ----------------------------------------------------------------------------- data


class _Tagged:
    """The dataset's transforms, plus two target fields the evaluation needs: ``orig_size``
    (h, w) before the transforms, ``annotation_file`` (the ground truth of the sample)."""

    def __init__(self, transforms: Any, annotation_file: str) -> None:
        self.transforms = transforms
        self.annotation_file = annotation_file

    def __call__(self, image: torch.Tensor, target: dict[str, Any]
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target = dict(target, orig_size=size, annotation_file=self.annotation_file)
        return image, target


def collate(samples: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """[(image (C, H, W), target), ...] -> ([images], [targets]); sizes may differ."""
    from pixelwise.data.coco import collate_detection

    return collate_detection(samples)


def _annotation_file(root: str | Path, kind: str, split: str) -> Path:
    return Path(root) / "annotations" / f"{kind}_{split}.json"


def _first_annotations(root: str | Path, kind: str) -> tuple[Path, str]:
    """The annotation file of the first split that has one (train, val, test, then any)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such dataset folder")
    for split in SPLITS:
        path = _annotation_file(root, kind, split)
        if path.is_file():
            return path, split
    found = sorted((root / "annotations").glob(f"{kind}_*.json"))
    if found:
        return found[0], found[0].stem[len(kind) + 1:]
    raise UserError(f"{root}: no {kind} annotations (expected annotations/{kind}_train.json; "
                    f"see `pixelwise data`)")


# ----------------------------------------------------------------------------- tasks


class InstanceTask:
    """Instance segmentation with COCO data and COCO AP (`bbox` and `segm`).

    Args:
        num_classes: labels including the background (K + 1; torchvision's `num_classes`).
        categories: the K COCO category dicts (``id``, ``name``, ...) in label order, so that
            results carry the dataset's category ids.
        scale: training random-scale range (None: off); flip: horizontal flip probability;
            jitter: photometric jitter strength (see `train_transforms`).
        class_names: ignored (the categories' names; `config()` lists them for readers).
    """

    name = "instance"
    kind = "instances"  # annotations/{kind}_{split}.json
    iou_types: tuple[str, ...] = ("bbox", "segm")
    best_metric = "segm_AP"  # evaluate() key (the mask AP) deciding the `best` checkpoint
    find_unused_parameters = True  # e.g. the mask head gets no gradient in a step without objects
    schema = None  # KeypointTask: the KeypointSchema (its flip pairs drive the augmentation)

    def __init__(self, num_classes: int, *, categories: Sequence[dict[str, Any]],
                 scale: Sequence[float] | None = (0.75, 1.25), flip: float = 0.5,
                 jitter: float = 0.2, class_names: Sequence[str] | None = None) -> None:
        from pixelwise.data.coco import CategoryMap

        self.categories = CategoryMap(list(categories), where=f"{self.name} task categories")
        if num_classes != self.categories.num_classes:
            raise UserError(f"num_classes {num_classes} does not fit {len(self.categories)} "
                            "categories (num_classes counts the background)")
        self.num_classes = int(num_classes)
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.flip = float(flip)
        self.jitter = float(jitter)
        self._gt_cache: dict[str, tuple[float, dict[str, Any]]] = {}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_data(cls, root: str | Path, **options: Any) -> InstanceTask:
        """The task for the dataset at `root` (categories from its annotation json)."""
        cls._refuse_semantic_options(options)
        path, split = _first_annotations(root, cls.kind)
        dataset = cls._open(split, path, root=root)
        return cls(dataset.categories.num_classes, categories=dataset.categories.to_json(),
                   **cls._options_of(dataset), **options)

    @classmethod
    def _refuse_semantic_options(cls, options: dict[str, Any]) -> None:
        for key in ("loss", "class_weights"):
            if options.get(key) is not None:
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{flag} does not apply to the {cls.name} task: its models "
                                "compute their own loss terms")
        options.pop("loss", None)
        options.pop("class_weights", None)

    @classmethod
    def _open(cls, split: str, path: Path | None = None, *, root: str | Path,
              transforms: Any = None, train: bool = False, skip_bad: bool = False) -> Any:
        from pixelwise.data.coco import CocoInstances

        path = path or _annotation_file(root, cls.kind, split)
        if not path.is_file():
            raise UserError(f"{root}: no {cls.kind} annotations for split {split!r} ({path})")
        return CocoInstances(path, Path(root) / "images" / split, transforms=transforms,
                             with_masks=train, skip_bad=skip_bad)

    @classmethod
    def _options_of(cls, dataset: Any) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """JSON settings; `build_task(config)` rebuilds the task."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "categories": self.categories.to_json(),
            "class_names": list(self.categories.names),
            "scale": None if self.scale is None else list(self.scale),
            "flip": self.flip,
            "jitter": self.jitter,
        }

    @property
    def class_names(self) -> list[str]:
        """Names by label, "__background__" at 0."""
        return list(self.categories.names)

    def model_options(self, model: str) -> dict[str, Any]:
        """Builder options the data decides for model `model` (none for instance models)."""
        return {}

    # -- data -----------------------------------------------------------------------------

    def check_data(self, root: str | Path) -> None:
        """A one-line `UserError` when the dataset's categories differ from this task's."""
        other = type(self).from_data(root)
        self._check_categories(other.categories, root)

    def _check_categories(self, categories: Any, where: str | Path) -> None:
        mine = self.categories.category_ids
        theirs = categories.category_ids
        if mine != theirs:
            raise UserError(
                f"the model knows {len(mine)} categories (ids {list(mine)}: "
                f"{', '.join(self.categories.names[1:])}) but {where} has {len(theirs)} (ids "
                f"{list(theirs)}: {', '.join(categories.names[1:])})")
        if categories.names != self.categories.names:
            logger.warning("category names differ: model %s, data %s",
                           list(self.categories.names[1:]), list(categories.names[1:]))

    def transforms(self, *, size: tuple[int, int] | None, train: bool) -> Any:
        """The joint transforms of a split: resize to `size` (H, W) when given, then in training
        the schema-aware augmentation of `train_transforms`."""
        from pixelwise.data.transforms import JointTransform, Resize, train_transforms

        steps: list[Any] = [Resize(list(size), antialias=True)] if size is not None else []
        min_size = 1.0
        if train:
            augment = train_transforms(schema=self.schema, scale=self.scale, flip=self.flip,
                                       jitter=self.jitter)
            steps += augment.transforms
            min_size = augment.min_size
        return JointTransform(steps, min_size=min_size) if steps else None

    def dataset(self, root: str | Path, split: str, *, size: tuple[int, int] | None = None,
                train: bool = False, skip_bad: bool = False) -> Dataset:
        """The `split` of the dataset at `root`: (image, target) samples, resized to `size`
        (H, W) when given; augmented when `train`. Masks are decoded only for training (the
        evaluation reads the annotation json itself). `skip_bad`: a bad sample is logged and
        read as None (see `pixelwise.data.check`) instead of stopping."""
        path = _annotation_file(root, self.kind, split)
        transforms = _Tagged(self.transforms(size=tuple(size) if size else None, train=train),
                             str(path.resolve()))
        dataset = self._open(split, path, root=root, transforms=transforms, train=train,
                             skip_bad=skip_bad)
        self._check_categories(dataset.categories, path)
        self._check_dataset(dataset, path)
        return dataset

    def _check_dataset(self, dataset: Any, where: Path) -> None:
        pass

    collate = staticmethod(collate)

    def to_device(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]],
                  device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """Images and target tensors as plain tensors on `device` (other fields as they are)."""
        images, targets = batch
        non_blocking = device.type == "cuda"

        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.as_subclass(torch.Tensor).to(device, non_blocking=non_blocking)
            return value

        return ([move(img) for img in images],
                [{key: move(value) for key, value in t.items()} for t in targets])

    @staticmethod
    def num_images(batch: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> int:
        return len(batch[0])

    # -- training -------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: tuple[list[torch.Tensor], list[dict[str, Any]]]
             ) -> dict[str, torch.Tensor]:
        """The model's own loss dict for `(images, targets)` (the model is in training mode)."""
        images, targets = batch
        if not _takes_targets(model):
            raise UserError(f"the {self.name} task needs a detection model (e.g. mask_rcnn) that "
                            f"takes (images, targets); {type(model).__name__} takes images only")
        terms = model(images, targets)
        if not isinstance(terms, dict):
            raise UserError(f"the {self.name} task needs a detection model that returns a dict "
                            f"of loss terms in training (e.g. mask_rcnn), got "
                            f"{type(terms).__name__}")
        return terms

    # -- evaluation -----------------------------------------------------------------------

    def results(self, det: dict[str, torch.Tensor], image_id: int) -> list[dict[str, Any]]:
        """COCO results of one image's detections (CPU tensors, in the image's coordinates)."""
        return to_coco_results(det, image_id, self.categories.category_ids)

    def ground_truth(self, path: str | os.PathLike) -> dict[str, Any]:
        """The annotation json at `path` restricted to this task's categories (cached per
        file and modification time)."""
        from pixelwise.data.coco import load_coco_json

        key = str(path)
        mtime = os.stat(key).st_mtime
        cached = self._gt_cache.get(key)
        if cached is None or cached[0] != mtime:
            data = load_coco_json(key, kind=self.kind)
            ids = set(self.categories.category_ids)
            data = dict(data, categories=[c for c in data["categories"] if c.get("id") in ids],
                        annotations=[a for a in data["annotations"]
                                     if a.get("category_id") in ids])
            self._gt_cache = {key: (mtime, data)}
            cached = self._gt_cache[key]
        return cached[1]

    def detect(self, model: nn.Module, images: list[torch.Tensor], *, device: torch.device,
               amp: bool = False) -> list[dict[str, torch.Tensor]]:
        """Eval-mode detections of `images` (on `device`), as CPU float tensors."""
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            outputs = model(images)
        if not isinstance(outputs, (list, tuple)):
            raise UserError(f"the {self.name} task needs a detection model that returns one dict "
                            f"per image in eval mode, got {type(outputs).__name__}")
        return [detections_to_cpu(out) for out in outputs]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, *, device: torch.device,
                 amp: bool = False, max_dets: int | None = None) -> dict[str, Any]:
        """COCO AP of `model` on `batches` (this rank's share; the per-image match tables of
        all ranks are merged). Returns ``{iou_type: {AP, AP50, ...}}`` for `iou_types`,
        ``best_metric`` (the headline AP) at the top level and ``per_class``:
        ``{category name: {iou_type: {AP, AP50}}}`` (None where a class has no ground truth).
        `max_dets`: detections scored per image (None: `evaluation_max_dets(model)`; keypoints
        keep COCO's 20)."""
        from pixelwise.engine.distributed import all_gather_objects
        from pixelwise.metrics.coco import CocoEvaluator

        limits = {t: (max_dets if max_dets is not None else evaluation_max_dets(model))
                  if t != "keypoints" else max_dets for t in self.iou_types}

        def evaluators_for(gt: dict[str, Any]) -> dict[str, CocoEvaluator]:
            return {t: CocoEvaluator(gt, t, max_dets=limits[t]) for t in self.iou_types}

        evaluators: dict[str, CocoEvaluator] = {}
        source: str | None = None
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                if batch is None:  # only bad samples (--skip-bad)
                    continue
                images, targets = self.to_device(batch, device)
                if not images:
                    continue
                detections = self.detect(model, images, device=device, amp=amp)
                results, ids = [], []
                for image, target, det in zip(images, targets, detections):
                    det = rescale_detections(det, image.shape[-2:], target["orig_size"])
                    results += self.results(det, target["image_id"])
                    ids.append(target["image_id"])
                    if source is None:
                        source = target["annotation_file"]
                    elif target["annotation_file"] != source:
                        raise UserError("one evaluation covers one annotation file; got "
                                        f"{source} and {target['annotation_file']}")
                if not evaluators:
                    gt = self.ground_truth(source)
                    evaluators = evaluators_for(gt)
                for evaluator in evaluators.values():
                    evaluator.update(results, ids)
        finally:
            model.train(was_training)
        # merge the ranks' per-image tables (CocoEvaluator keeps them in `_tables`: small arrays
        # of scores and matches, no masks)
        shards = all_gather_objects(
            (source, {t: e._tables for t, e in evaluators.items()}) if source else None)
        sources = [s[0] for s in shards if s is not None]
        if not sources:
            raise UserError("no images to evaluate")
        if not evaluators:  # this rank had no images
            gt = self.ground_truth(sources[0])
            evaluators = evaluators_for(gt)
        for rank, shard in enumerate(shards):
            if shard is None or shard[1] is None or rank == _rank():
                continue
            for iou_type, tables in shard[1].items():
                evaluators[iou_type]._tables.update(tables)
        metrics: dict[str, Any] = {}
        per_class: dict[str, dict[str, Any]] = {}
        for iou_type, evaluator in evaluators.items():
            metrics[iou_type], by_id = evaluator.compute_with_categories()
            for cat_id, values in by_id.items():
                name = (self.categories.names[self.categories.to_label(cat_id)]
                        if cat_id in self.categories else str(cat_id))
                per_class.setdefault(name, {})[iou_type] = values
        head_type = self.best_metric.rsplit("_", 1)[0]
        metrics[self.best_metric] = metrics[head_type]["AP"]
        metrics["per_class"] = per_class
        return metrics


def evaluation_max_dets(model: nn.Module) -> int | None:
    """Detections per image to score for boxes and masks: the model's own limit (R-CNN
    ``roi_heads.detections_per_img``, SOLOv2 ``max_detections``) when it exceeds COCO's 100,
    else None (pycocotools' 100)."""
    inner = getattr(model, "module", model)  # DDP
    heads = getattr(inner, "roi_heads", None)
    limit = getattr(heads, "detections_per_img", None) or getattr(inner, "max_detections", None)
    return int(limit) if limit is not None and int(limit) > 100 else None


def _takes_targets(model: nn.Module) -> bool:
    """Whether `model.forward` (under DDP: the wrapped model's) takes a second argument."""
    inner = getattr(model, "module", model)
    try:
        params = list(inspect.signature(inner.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _rank() -> int:
    from pixelwise.engine.distributed import get_rank

    return get_rank()


class KeypointTask(InstanceTask):
    """Keypoint detection (Keypoint R-CNN) with COCO data and COCO keypoint AP (OKS with the
    schema's sigmas), plus box AP.

    Args:
        schema: the keypoint category fields (``keypoints`` names, 1-based ``skeleton``,
            ``flip_pairs``, ``sigmas``; `KeypointSchema.to_coco_category`), shared by every
            category of the task. Other arguments as `InstanceTask`.
    """

    name = "keypoints"
    kind = "keypoints"
    iou_types = ("bbox", "keypoints")
    best_metric = "keypoints_AP"

    def __init__(self, num_classes: int, *, categories: Sequence[dict[str, Any]],
                 schema: dict[str, Any], **options: Any) -> None:
        from pixelwise.data.keypoints import KeypointSchema

        super().__init__(num_classes, categories=categories, **options)
        if not isinstance(schema, dict):
            raise UserError(f"keypoints task: schema must be a COCO category dict, got "
                            f"{type(schema).__name__}")
        self.schema = KeypointSchema.from_coco_category(schema, where="keypoints task schema")

    @classmethod
    def _open(cls, split: str, path: Path | None = None, *, root: str | Path,
              transforms: Any = None, train: bool = False, skip_bad: bool = False) -> Any:
        from pixelwise.data.coco import CocoKeypoints

        path = path or _annotation_file(root, cls.kind, split)
        if not path.is_file():
            raise UserError(f"{root}: no {cls.kind} annotations for split {split!r} ({path})")
        return CocoKeypoints(path, Path(root) / "images" / split, transforms=transforms,
                             skip_bad=skip_bad)

    @classmethod
    def _options_of(cls, dataset: Any) -> dict[str, Any]:
        return {"schema": dataset.schema.to_coco_category()}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "schema": self.schema.to_coco_category()}

    def model_options(self, model: str) -> dict[str, Any]:
        """``schema`` for builders that take one (keypoint_rcnn): the model predicts the
        dataset's keypoints, and its config (hence the checkpoint) keeps the schema."""
        from pixelwise.models import MODELS

        builder = MODELS.get(model)
        if builder is not None and "schema" in inspect.signature(builder).parameters:
            return {"schema": self.schema.to_coco_category()}
        return {}

    def check_data(self, root: str | Path) -> None:
        """A one-line `UserError` when the dataset's categories or keypoints differ."""
        other = type(self).from_data(root)
        self._check_categories(other.categories, root)
        self._check_schema(other.schema, root)

    def _check_dataset(self, dataset: Any, where: Path) -> None:
        self._check_schema(dataset.schema, where)

    def _check_schema(self, schema: Any, where: str | Path) -> None:
        mine, theirs = self.schema, schema
        if mine.num_keypoints != theirs.num_keypoints:
            raise UserError(
                f"the model predicts {mine.num_keypoints} keypoints ({_few(mine.names)}) but "
                f"{where} has {theirs.num_keypoints} ({_few(theirs.names)})")
        if mine.names != theirs.names:
            logger.warning("keypoint names differ: model %s, data %s", list(mine.names),
                           list(theirs.names))

    def loss(self, model: nn.Module, batch: tuple[list[torch.Tensor], list[dict[str, Any]]]
             ) -> dict[str, torch.Tensor]:
        predicted = getattr(model, "num_keypoints", None)
        predicted = getattr(getattr(model, "module", None), "num_keypoints", predicted)  # DDP
        if predicted is not None and predicted != self.schema.num_keypoints:
            raise UserError(f"the model predicts {predicted} keypoints but the data has "
                            f"{self.schema.num_keypoints} ({_few(self.schema.names)})")
        return super().loss(model, batch)


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")
