"""COCO instance and keypoint datasets (polygons, compressed / uncompressed RLE, iscrowd).

Layout (issue 3 §1): ``DIR/annotations/{instances,keypoints}_{split}.json`` with ``file_name``s
relative to ``DIR/images/{split}/``. A sample is ``(image, target)``::

    image   tv_tensors.Image (C, H, W) float32 in [0, 1]   (C = 1 or 3, as the file)
    target  boxes     tv_tensors.BoundingBoxes (N, 4) float32, XYXY, canvas_size (H, W)
            labels    (N,) int64, contiguous 1..K (0 = background, as torchvision detection)
            masks     tv_tensors.Mask (N, H, W) uint8            (CocoKeypoints: with_masks=True)
            iscrowd   (N,) int64;  area (N,) float32 (the json's area, else the mask's)
            image_id  int (the json's image id)
            keypoints (N, K, 3) float32 x, y, v               (CocoKeypoints only)

Keypoints keep COCO's convention: (x, y) is the pixel (column, row); v = 0 not labelled (x = y = 0),
1 labelled but not visible, 2 visible. Crowd annotations are kept with iscrowd = 1 (the model
side decides to drop them). Annotations whose box has zero width or height (after clipping to the
image) are dropped with one logged warning per file. Images without annotations give empty
tensors of the right shapes. Masks are decoded lazily, per sample, with pycocotools.

A bad sample (unreadable image, size differing from the json, invalid polygon or RLE, box
outside the image, keypoint count ≠ schema, unknown category) is refused when it is read, with
the message ``pixelwise data check`` prints for it (the checks of `pixelwise.data.check`); with
``skip_bad=True`` it is logged and ``__getitem__`` returns None instead (drop those in the
collate function: `collate_detection` does). Problems of the whole file (not json, duplicate
ids, ...) raise `UserError` when the dataset is built.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision import tv_tensors

from pixelwise.data.check import annotation_problems, refuse_or_skip, segmentation_problem
from pixelwise.data.images import DEFAULT_MAX_PIXELS, image_to_float, read_image
from pixelwise.data.keypoints import KeypointSchema
from pixelwise.data.layout import BadFileError, Problem, safe_join
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

Target = dict[str, Any]
TransformFn = Callable[[tv_tensors.Image, Target], tuple[tv_tensors.Image, Target]]

BACKGROUND = "__background__"


# ----------------------------------------------------------------------------- categories


class CategoryMap:
    """COCO category ids (any integers) <-> contiguous labels.

    With ``background=True`` (detection) labels are 1..K and 0 is the background; with
    ``background=False`` (semantic maps) labels are 0..K-1. Categories are ordered by id.
    ``names[label]`` is the label's name (``"__background__"`` at 0 with background).
    """

    def __init__(self, categories: Sequence[dict[str, Any]], *, background: bool = True,
                 where: str = "categories") -> None:
        cats = []
        seen: set[int] = set()
        for cat in categories:
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise UserError(f"{where}: every category needs an integer 'id', got {cat!r:.80}")
            if cat["id"] in seen:
                raise UserError(f"{where}: duplicate category id {cat['id']}")
            seen.add(cat["id"])
            cats.append(dict(cat, name=str(cat.get("name", cat["id"]))))
        self.categories: tuple[dict[str, Any], ...] = tuple(sorted(cats, key=lambda c: c["id"]))
        self.background = background
        self._offset = 1 if background else 0
        self._label_of = {c["id"]: i + self._offset for i, c in enumerate(self.categories)}

    @property
    def category_ids(self) -> tuple[int, ...]:
        return tuple(c["id"] for c in self.categories)

    @property
    def names(self) -> tuple[str, ...]:
        """Names indexed by label (length `num_classes`)."""
        names = tuple(c["name"] for c in self.categories)
        return (BACKGROUND, *names) if self.background else names

    @property
    def num_classes(self) -> int:
        """Number of labels, the background included (torchvision's ``num_classes``)."""
        return len(self.categories) + self._offset

    def __len__(self) -> int:
        return len(self.categories)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._label_of

    def to_label(self, category_id: int) -> int:
        """The contiguous label of a category id; `UserError` for an unknown id."""
        try:
            return self._label_of[category_id]
        except (KeyError, TypeError):
            raise UserError(
                f"unknown category id {category_id!r}; known ids: {list(self.category_ids)}"
            ) from None

    def to_category_id(self, label: int) -> int:
        """The category id of a contiguous label; `UserError` for background / out of range."""
        index = int(label) - self._offset
        if not 0 <= index < len(self.categories):
            valid = f"{self._offset}..{len(self.categories) + self._offset - 1}"
            raise UserError(f"label {label} has no category (valid labels {valid})")
        return self.categories[index]["id"]

    def labels_to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Vectorised `to_category_id`: labels (N,) int -> category ids (N,) int64."""
        ids = torch.tensor(self.category_ids, dtype=torch.int64)
        index = labels.to(torch.int64) - self._offset
        if index.numel() and (index.min() < 0 or index.max() >= len(ids)):
            raise UserError(f"labels outside {self._offset}..{len(ids) + self._offset - 1}")
        return ids[index]

    def to_json(self) -> list[dict[str, Any]]:
        """The COCO category dicts (for checkpoints and result files)."""
        return [dict(c) for c in self.categories]

    def __repr__(self) -> str:
        return f"CategoryMap({dict(zip(self.category_ids, self.names[self._offset:]))})"


# ----------------------------------------------------------------------------- json


def load_coco_json(path: str | Path, *, kind: str = "instances") -> dict[str, Any]:
    """Read a COCO json and check its structure: `images`, `annotations` and `categories` lists,
    unique image / annotation / category ids. Raises `UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid json file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a COCO json object, got {type(data).__name__}")
    keys = ("images", "annotations", "categories")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: missing the {key!r} list of a COCO {kind} file")
    for key in keys:
        seen: set[int] = set()
        id_key = "image_id" if (kind == "panoptic" and key == "annotations") else "id"
        for item in data[key]:
            if not isinstance(item, dict) or not _is_int(item.get(id_key)):
                raise UserError(f"{path}: an entry of {key!r} has no integer {id_key!r}")
            if item[id_key] in seen:
                raise UserError(f"{path}: duplicate {key[:-1]} id {item[id_key]} in {key!r}")
            seen.add(item[id_key])
    for img in data["images"]:
        if not isinstance(img.get("file_name"), str):
            raise UserError(f"{path}: image {img['id']} has no 'file_name'")
    return data


# ----------------------------------------------------------------------------- decoding


def decode_segmentation(segm: Any, height: int, width: int, *, where: str = "annotation"
                        ) -> np.ndarray:
    """Decode a COCO segmentation (polygons, compressed or uncompressed RLE) to (H, W) uint8.

    Checked first by `pixelwise.data.check.segmentation_problem` (pycocotools does not check:
    a short RLE decodes to uninitialised memory); `UserError` prefixed by `where` otherwise.
    """
    return mask_utils.decode(segmentation_to_rle(segm, height, width, where=where))


def segmentation_to_rle(segm: Any, height: int, width: int, *, where: str = "annotation"
                        ) -> dict[str, Any]:
    """A checked compressed RLE of a COCO segmentation (as pycocotools' `COCO.annToRLE`)."""
    problem = segmentation_problem(segm, height, width)
    if problem:
        raise UserError(f"{where}: {problem}")
    if isinstance(segm, list):  # polygons: one RLE each, merged
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    counts = segm["counts"]
    raw = counts.encode() if isinstance(counts, str) else counts
    return {"size": [height, width], "counts": raw}


def parse_keypoints(ann: dict[str, Any], num_keypoints: int, *, where: str = "annotation"
                    ) -> np.ndarray:
    """An annotation's ``keypoints`` list -> (K, 3) float32 x, y, v; `UserError` when its length
    is not 3 * K or v is not 0, 1 or 2. Unlabelled points (v = 0) get x = y = 0."""
    values = ann.get("keypoints")
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        raise UserError(f"{where}: 'keypoints' must be a list of numbers")
    if len(values) != 3 * num_keypoints:
        raise UserError(f"{where}: {len(values) / 3:g} keypoints, the schema has {num_keypoints} "
                        f"(expected {3 * num_keypoints} values x, y, v)")
    kps = np.asarray(values, dtype=np.float32).reshape(num_keypoints, 3)  # (3K,) -> (K, 3)
    if not np.isin(kps[:, 2], (0, 1, 2)).all():
        raise UserError(f"{where}: keypoint visibility must be 0, 1 or 2")
    kps[kps[:, 2] == 0, :2] = 0
    return kps


def coco_box_to_xyxy(bbox: Any, height: int, width: int, *, where: str = "annotation"
                     ) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2) clipped to the image (may be degenerate)."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
            and all(math.isfinite(v) for v in bbox)):
        raise UserError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


# ----------------------------------------------------------------------------- datasets


class CocoInstances(torch.utils.data.Dataset):
    """COCO instance segmentation: ``(image, target)`` as in the module docstring.

    annotation_file: the COCO json; image_dir: the folder its ``file_name``s are relative to
    (a ``file_name`` escaping it is refused). transforms: called as ``transforms(image, target)``
    (e.g. `pixelwise.data.transforms.make_transforms`). category_ids: keep only these categories.
    with_masks: decode the masks. skip_bad: log and skip bad samples (``__getitem__`` returns
    None) instead of raising. max_pixels: the image size limit of `read_image`.
    """

    kind = "instances"

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        *,
        transforms: TransformFn | None = None,
        with_masks: bool = True,
        category_ids: Sequence[int] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        skip_bad: bool = False,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.with_masks = with_masks
        self.max_pixels = max_pixels
        self.skip_bad = skip_bad
        data = load_coco_json(self.annotation_file, kind=self.kind)
        self.dataset = data
        self._category_dicts = {c["id"]: c for c in data["categories"]}
        self._category_filter = None if category_ids is None else set(category_ids)
        categories = self._select_categories(data["categories"], category_ids)
        self.categories = CategoryMap(categories, where=str(self.annotation_file))
        self.images: list[dict[str, Any]] = sorted(data["images"], key=lambda im: im["id"])
        self._anns = self._index_annotations(data["annotations"])

    # -- construction helpers -------------------------------------------------------------

    @classmethod
    def from_layout(cls, root: str | Path, split: str, **options: Any) -> CocoInstances:
        """The dataset of ``root/annotations/{kind}_{split}.json`` + ``root/images/{split}/``."""
        root = Path(root)
        ann = root / "annotations" / f"{cls.kind}_{split}.json"
        if not ann.is_file():
            raise UserError(f"{root}: no {cls.kind} annotations for split {split!r} ({ann})")
        return cls(ann, root / "images" / split, **options)

    def _select_categories(self, categories: list[dict[str, Any]],
                           category_ids: Sequence[int] | None) -> list[dict[str, Any]]:
        if category_ids is None:
            return categories
        known = {c.get("id") for c in categories}
        missing = [i for i in category_ids if i not in known]
        if missing:
            raise UserError(f"{self.annotation_file}: category ids {missing} are not in the file")
        return [c for c in categories if c.get("id") in set(category_ids)]

    def _keep_annotation(self, ann: dict[str, Any]) -> bool:
        """Whether an annotation belongs to this dataset (one of the chosen categories).

        Without a category filter every annotation is kept, so that one of an unknown category
        is refused when its sample is read."""
        return self._category_filter is None or ann.get("category_id") in self._category_filter

    def _index_annotations(self, annotations: list[dict[str, Any]]
                           ) -> dict[int, list[dict[str, Any]]]:
        """image id -> its annotations, degenerate boxes and unknown images left out (logged)."""
        sizes = {im["id"]: (im.get("height"), im.get("width")) for im in self.images}
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        degenerate: list[int] = []
        orphans: list[int] = []
        for ann in annotations:
            if not self._keep_annotation(ann):
                continue
            image_id = ann.get("image_id")
            if image_id not in sizes:
                orphans.append(ann["id"])
                continue
            height, width = sizes[image_id]
            bbox = ann.get("bbox")
            if _is_int(height) and _is_int(width) and isinstance(bbox, list) and len(bbox) == 4 \
                    and all(_is_number(v) and math.isfinite(v) for v in bbox):
                x1, y1, x2, y2 = coco_box_to_xyxy(bbox, height, width)
                if x2 <= x1 or y2 <= y1:
                    degenerate.append(ann["id"])
                    continue
            by_image[image_id].append(ann)
        if degenerate:
            logger.warning("%s: dropped %d annotation(s) whose box has zero width or height "
                           "(ids %s)", self.annotation_file, len(degenerate), _few(degenerate))
        if orphans:
            logger.warning("%s: ignored %d annotation(s) of image ids not in 'images' (ids %s)",
                           self.annotation_file, len(orphans), _few(orphans))
        return dict(by_image)

    # -- access ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        """The image file of sample `index` (refused when its file_name escapes image_dir)."""
        return safe_join(self.image_dir, self.images[index]["file_name"])

    def annotations(self, index: int) -> list[dict[str, Any]]:
        """The json annotations kept for sample `index`."""
        return self._anns.get(self.images[index]["id"], [])

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, Target] | None:
        """(image, target) of sample `index`; None for a bad sample when ``skip_bad``."""
        info = self.images[index]
        anns = self.annotations(index)
        pixels, problems = self._read(index)
        if pixels is not None:
            problems = self.sample_problems(index, tuple(pixels.shape[-2:]))
        if not refuse_or_skip(problems, skip_bad=self.skip_bad):
            return None
        height, width = pixels.shape[-2:]
        image = tv_tensors.Image(image_to_float(pixels))
        target = self._target(info, anns, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _read(self, index: int) -> tuple[torch.Tensor | None, list[Problem]]:
        """The image (C, H, W) uint8 / uint16 of sample `index`, or the problem reading it."""
        info = self.images[index]
        try:
            path = self.image_path(index)
        except UserError as exc:
            return None, [Problem(self.annotation_file, f"image id {info['id']}: {exc}; refused")]
        try:
            return read_image(path, max_pixels=self.max_pixels), []
        except BadFileError as exc:
            return None, [exc.problem]

    def sample_problems(self, index: int, size: tuple[int, int]) -> list[Problem]:
        """What is wrong with sample `index` whose image is `size` (H, W): the messages of
        ``pixelwise data check`` (`pixelwise.data.check`), naming the annotation file."""
        info = self.images[index]
        height, width = size
        problems = []
        if (info.get("height"), info.get("width")) not in ((height, width), (None, None)):
            problems.append(Problem(self.annotation_file, (
                f"image id {info['id']}: the json says {info.get('width')}x{info.get('height')} "
                f"but {info['file_name']} is {width}x{height} (width x height)")))
            return problems  # the annotations were drawn for another size
        for ann in self.annotations(index):
            where = f"annotation id {ann['id']}"
            category = self._category_dicts.get(ann.get("category_id"))
            if category is None or ann["category_id"] not in self.categories:
                problems.append(Problem(self.annotation_file, (
                    f"{where}: category_id {ann.get('category_id')!r} is not a category "
                    "of the file")))
                continue
            messages = annotation_problems(ann, height, width, category)
            if self.with_masks and "segmentation" not in ann:
                messages.append("no segmentation (the instance masks need one)")
            elif "bbox" not in ann and "segmentation" not in ann:
                messages.append("neither bbox nor segmentation")
            problems += [Problem(self.annotation_file, f"{where} (image id {info['id']}): {m}")
                         for m in messages]
        return problems

    def _target(self, info: dict[str, Any], anns: list[dict[str, Any]], height: int, width: int
                ) -> Target:
        boxes, labels, masks, crowd, areas = [], [], [], [], []
        extra = self._extra_fields()
        for ann in anns:  # checked by sample_problems
            where = f"{self.annotation_file}: annotation id {ann['id']} (image id {info['id']})"
            label = self.categories.to_label(ann["category_id"])
            mask = None
            if self.with_masks or "bbox" not in ann:
                rle = segmentation_to_rle(ann["segmentation"], height, width, where=where)
                if self.with_masks:
                    mask = mask_utils.decode(rle)  # (H, W) uint8
            if "bbox" in ann:
                box = coco_box_to_xyxy(ann["bbox"], height, width, where=where)
            else:
                x, y, w, h = mask_utils.toBbox(rle).tolist()
                box = (x, y, x + w, y + h)
            if box[2] <= box[0] or box[3] <= box[1]:
                logger.warning("%s: box with zero width or height dropped", where)
                continue
            area = ann.get("area")
            if not _is_number(area):
                area = float(mask.sum()) if mask is not None else float(mask_utils.area(rle))
            boxes.append(box)
            labels.append(label)
            crowd.append(1 if ann.get("iscrowd") else 0)
            areas.append(float(area))
            if mask is not None:
                masks.append(mask)
            self._add_extra(extra, ann, where)
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (N, 4)
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(height, width),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "image_id": int(info["id"]),
        }
        if self.with_masks:
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))  # (N, H, W) uint8
        target.update(self._finish_extra(extra))
        return target

    # Hooks for per-annotation fields beyond boxes and masks (CocoKeypoints adds keypoints).
    def _extra_fields(self) -> dict[str, list[Any]]:
        return {}

    def _add_extra(self, extra: dict[str, list[Any]], ann: dict[str, Any], where: str) -> None:
        pass

    def _finish_extra(self, extra: dict[str, list[Any]]) -> Target:
        return {}


class CocoKeypoints(CocoInstances):
    """COCO keypoints: `CocoInstances` of the categories that list ``keypoints``, plus
    ``target["keypoints"]`` (N, K, 3) float32 and the validated `schema`.

    All kept categories must share one schema (torchvision's Keypoint R-CNN predicts one K);
    pass `category_ids` to pick some. Masks are off by default (Keypoint R-CNN needs none).
    """

    kind = "keypoints"

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, *,
                 with_masks: bool = False, **options: Any) -> None:
        super().__init__(annotation_file, image_dir, with_masks=with_masks, **options)

    def _select_categories(self, categories: list[dict[str, Any]],
                           category_ids: Sequence[int] | None) -> list[dict[str, Any]]:
        selected = super()._select_categories(categories, category_ids)
        with_keypoints = [c for c in selected if c.get("keypoints")]
        if not with_keypoints:
            raise UserError(f"{self.annotation_file}: no category lists 'keypoints'")
        schemas = {
            c["id"]: KeypointSchema.from_coco_category(
                c, where=f"{self.annotation_file}: category {c.get('name', '?')!r} (id {c['id']})"
            )
            for c in with_keypoints
        }
        first = next(iter(schemas.values()))
        for cat_id, schema in schemas.items():
            if schema.names != first.names:
                raise UserError(
                    f"{self.annotation_file}: categories have different keypoints "
                    f"(id {with_keypoints[0]['id']}: {first.num_keypoints}, id {cat_id}: "
                    f"{schema.num_keypoints}); choose categories of one schema with category_ids"
                )
        self.schemas: dict[int, KeypointSchema] = schemas
        self.schema: KeypointSchema = first
        self._keypoint_category_ids = set(schemas)
        return with_keypoints

    def _keep_annotation(self, ann: dict[str, Any]) -> bool:
        return ann.get("category_id") in self._keypoint_category_ids

    def _extra_fields(self) -> dict[str, list[Any]]:
        return {"keypoints": []}

    def _add_extra(self, extra: dict[str, list[Any]], ann: dict[str, Any], where: str) -> None:
        extra["keypoints"].append(parse_keypoints(ann, self.schema.num_keypoints, where=where))

    def _finish_extra(self, extra: dict[str, list[Any]]) -> Target:
        k = self.schema.num_keypoints
        kps = np.stack(extra["keypoints"]) if extra["keypoints"] else np.zeros((0, k, 3),
                                                                               np.float32)
        return {"keypoints": torch.from_numpy(kps)}  # (N, K, 3) float32


def collate_detection(batch: Sequence[tuple[Any, Target] | None]
                      ) -> tuple[list[Any], list[Target]]:
    """Detection-style collate: [(image, target), ...] -> ([images], [targets]) (no stacking:
    images may differ in size, targets in instance count). Skipped samples (None) are left out."""
    kept = [sample for sample in batch if sample is not None]
    images = [sample[0] for sample in kept]
    targets = [sample[1] for sample in kept]
    return images, targets


# ----------------------------------------------------------------------------- small helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _few(ids: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
