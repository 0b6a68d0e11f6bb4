"""COCO panoptic: segment id <-> RGB helpers and the panoptic dataset.

A COCO panoptic set is ``panoptic_{split}.json`` (images, categories with ``isthing``, and per
image an annotation ``{"image_id", "file_name", "segments_info": [{"id", "category_id",
"iscrowd", "bbox", "area"}]}``) plus one RGB PNG per image whose pixels hold the segment id
``R + 256 G + 256^2 B`` (0 = void / unlabelled). Layout: ``DIR/annotations/panoptic_{split}.json``,
``DIR/panoptic/{split}/NAME.png``, images under ``DIR/images/{split}/``.

`CocoPanoptic` returns ``(image, target)``: the instance fields of `pixelwise.data.coco`
for the *thing* segments (boxes from the masks, labels 1..T over thing categories, masks,
iscrowd, area, image_id), plus

    semantic     tv_tensors.Mask (H, W) int64: label 0..C-1 over *all* categories (things and
                 stuff, ordered by id; `classes`), 255 = void
    panoptic     tv_tensors.Mask (H, W) int64: the segment id of each pixel, 0 = void
    segment_ids  (N,) int64: the segment id of each thing instance
    segments     list of the json's segments_info dicts (describing the untransformed PNG)

Crowd segments are things with iscrowd = 1 in the instance fields and keep their class in
``semantic``. `rgb2id` / `id2rgb` are numpy-only (as panopticapi's) for the metrics to share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from pixelwise.data.check import panoptic_png_problems, refuse_or_skip
from pixelwise.data.coco import CategoryMap, TransformFn, _is_int, load_coco_json
from pixelwise.data.images import DEFAULT_MAX_PIXELS, image_to_float, read_image
from pixelwise.data.layout import BadFileError, Problem, safe_join
from pixelwise.data.transforms import mask_boxes
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

VOID = 255  # the semantic label of void pixels (segment id 0, or unlisted)
OFFSET = 256  # id = R + OFFSET * G + OFFSET**2 * B


def rgb2id(color: Any) -> Any:
    """RGB -> segment id: an (..., 3) uint8 array -> (...) int64 array; [r, g, b] -> int."""
    if isinstance(color, np.ndarray):
        if color.shape[-1:] != (3,):
            raise ValueError(f"rgb2id: expected (..., 3) colours, got shape {color.shape}")
        if color.dtype != np.uint8 and color.size and (color.min() < 0 or color.max() > 255):
            raise ValueError("rgb2id: colour values must be in 0..255")
        c = color.astype(np.int64)
        return c[..., 0] + OFFSET * c[..., 1] + OFFSET * OFFSET * c[..., 2]
    r, g, b = (int(v) for v in color)
    return r + OFFSET * g + OFFSET * OFFSET * b


def id2rgb(ids: Any) -> Any:
    """Segment id -> RGB: an (...) integer array -> (..., 3) uint8 array; an int -> [r, g, b]."""
    if isinstance(ids, np.ndarray):
        if ids.size and (ids.min() < 0 or ids.max() >= OFFSET**3):
            raise ValueError(f"id2rgb: ids must be in 0..{OFFSET**3 - 1}")
        rest = ids.astype(np.int64)
        rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
        for channel in range(3):
            rgb[..., channel] = rest % OFFSET
            rest = rest // OFFSET
        return rgb
    value = int(ids)
    if not 0 <= value < OFFSET**3:
        raise ValueError(f"id2rgb: id {value} outside 0..{OFFSET**3 - 1}")
    return [value % OFFSET, (value // OFFSET) % OFFSET, value // OFFSET // OFFSET]


class CocoPanoptic(torch.utils.data.Dataset):
    """COCO panoptic segmentation: ``(image, target)`` as in the module docstring.

    Attributes: `things` (CategoryMap of thing categories, labels 1..T as torchvision's
    detection), `classes` (CategoryMap of all categories, semantic labels 0..C-1), `is_thing`
    (per semantic label). transforms: called as ``transforms(image, target)``. A bad sample
    (unreadable file, PNG ids not in ``segments_info`` or the reverse, sizes that differ, ...)
    is refused with the message of ``pixelwise data check``; ``skip_bad=True`` logs it and
    returns None instead.
    """

    kind = "panoptic"

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        panoptic_dir: str | Path,
        *,
        transforms: TransformFn | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        skip_bad: bool = False,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.panoptic_dir = Path(panoptic_dir)
        self.transforms = transforms
        self.max_pixels = max_pixels
        self.skip_bad = skip_bad
        data = load_coco_json(self.annotation_file, kind="panoptic")
        self.dataset = data
        where = str(self.annotation_file)
        for cat in data["categories"]:
            if cat.get("isthing") not in (0, 1, True, False):
                raise UserError(f"{where}: category {cat.get('id')} needs 'isthing' (0 or 1)")
        self.classes = CategoryMap(data["categories"], background=False, where=where)
        if self.classes.num_classes >= VOID:
            raise UserError(f"{where}: {self.classes.num_classes} categories; at most {VOID} "
                            f"fit a semantic map with {VOID} = void")
        self.things = CategoryMap([c for c in data["categories"] if c["isthing"]], where=where)
        self.is_thing: tuple[bool, ...] = tuple(bool(c["isthing"]) for c in self.classes.categories)
        self.images: list[dict[str, Any]] = sorted(data["images"], key=lambda im: im["id"])
        self._anns = {ann["image_id"]: ann for ann in data["annotations"]}
        missing = [im["id"] for im in self.images if im["id"] not in self._anns]
        if missing:
            logger.warning("%s: %d image(s) without a panoptic annotation are all void (ids %s)",
                           where, len(missing), ", ".join(map(str, missing[:10])))

    @classmethod
    def from_layout(cls, root: str | Path, split: str, **options: Any) -> CocoPanoptic:
        """The dataset of ``root/annotations/panoptic_{split}.json``, ``root/images/{split}/``
        and ``root/panoptic/{split}/``."""
        root = Path(root)
        ann = root / "annotations" / f"panoptic_{split}.json"
        if not ann.is_file():
            raise UserError(f"{root}: no panoptic annotations for split {split!r} ({ann})")
        return cls(ann, root / "images" / split, root / "panoptic" / split, **options)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return safe_join(self.image_dir, self.images[index]["file_name"])

    def annotation(self, index: int) -> dict[str, Any] | None:
        """The json annotation (file_name, segments_info) of sample `index`, if any."""
        return self._anns.get(self.images[index]["id"])

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]] | None:
        """(image, target) of sample `index`; None for a bad sample when ``skip_bad``."""
        info = self.images[index]
        pixels, problems = self._read(index)
        ids, segments = None, []
        if pixels is not None:
            height, width = pixels.shape[-2:]
            if (info.get("height"), info.get("width")) not in ((height, width), (None, None)):
                problems.append(Problem(self.annotation_file, (
                    f"image id {info['id']}: the json says {info.get('width')}x"
                    f"{info.get('height')} but {info['file_name']} is {width}x{height} "
                    "(width x height)")))
            ann = self.annotation(index)
            if ann is None:
                ids = np.zeros((height, width), dtype=np.int64)
            elif not problems:
                ids, segments, problems = self._read_segments(ann, (height, width))
        if not refuse_or_skip(problems, skip_bad=self.skip_bad):
            return None
        image = tv_tensors.Image(image_to_float(pixels))
        target = self._target(int(info["id"]), ids, segments)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _read(self, index: int) -> tuple[torch.Tensor | None, list[Problem]]:
        """The image (C, H, W) of sample `index`, or the problem reading it."""
        info = self.images[index]
        try:
            path = self.image_path(index)
        except UserError as exc:
            return None, [Problem(self.annotation_file, f"image id {info['id']}: {exc}; refused")]
        try:
            return read_image(path, max_pixels=self.max_pixels), []
        except BadFileError as exc:
            return None, [exc.problem]

    def _read_segments(self, ann: dict[str, Any], size: tuple[int, int]
                       ) -> tuple[np.ndarray | None, list[dict[str, Any]], list[Problem]]:
        """The (H, W) int64 id map of an annotation's PNG, its segments_info, and the problems
        (the messages of ``pixelwise data check``)."""
        where = f"annotation of image id {ann['image_id']}"
        segments = ann.get("segments_info")
        if not isinstance(segments, list) or not isinstance(ann.get("file_name"), str):
            return None, [], [Problem(self.annotation_file,
                                      f"{where}: needs 'file_name' and a 'segments_info' list")]
        problems: list[Problem] = []
        listed: list[int] = []
        for j, seg in enumerate(segments):
            if not isinstance(seg, dict) or not _is_int(seg.get("id")) or seg["id"] <= 0:
                problems.append(Problem(self.annotation_file, (
                    f"{where}: segments_info[{j}] needs a positive integer 'id'")))
                continue
            if seg["id"] in listed:
                problems.append(Problem(self.annotation_file,
                                        f"{where}: duplicate segment id {seg['id']}"))
                continue
            listed.append(seg["id"])
            if seg.get("category_id") not in self.classes:
                problems.append(Problem(self.annotation_file, (
                    f"{where}, segment id {seg['id']}: category_id {seg.get('category_id')!r} "
                    "is not a category of the file")))
        try:
            png = safe_join(self.panoptic_dir, ann["file_name"])
            rgb = read_image(png, max_pixels=self.max_pixels)  # (3, H, W) uint8
        except BadFileError as exc:
            return None, [], problems + [exc.problem]
        except UserError as exc:
            return None, [], problems + [Problem(self.annotation_file, f"{where}: {exc}; refused")]
        if rgb.shape[0] != 3 or rgb.dtype != torch.uint8:
            problems.append(Problem(png, "a panoptic PNG must be 8-bit RGB (id = R + 256 G + "
                                         "256^2 B)"))
            return None, [], problems
        if tuple(rgb.shape[-2:]) != tuple(size):
            problems.append(Problem(png, (
                f"PNG size {rgb.shape[-2]}x{rgb.shape[-1]} differs from the image size "
                f"{size[0]}x{size[1]} (height x width)")))
            return None, [], problems
        ids = rgb2id(rgb.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3) -> (H, W)
        problems += panoptic_png_problems(torch.from_numpy(ids), listed, png,
                                          self.annotation_file.name)
        return ids, segments, problems

    def _target(self, image_id: int, ids: np.ndarray, segments: Sequence[dict[str, Any]]
                ) -> dict[str, Any]:
        height, width = ids.shape
        # semantic map by a lookup over the unique ids: (H, W) -> inverse (H*W,) -> (H, W)
        unique, inverse = np.unique(ids, return_inverse=True)
        by_id = {seg["id"]: self.classes.to_label(seg["category_id"]) for seg in segments}
        lut = np.array([by_id.get(int(i), VOID) for i in unique], dtype=np.int64)
        semantic = lut[inverse.reshape(height, width)]

        things = [seg for seg in segments if seg["category_id"] in self.things]
        ids_t = torch.from_numpy(ids)
        seg_ids = torch.tensor([seg["id"] for seg in things], dtype=torch.int64)
        masks = (ids_t.unsqueeze(0) == seg_ids.view(-1, 1, 1)).to(torch.uint8)  # (N, H, W)
        boxes = mask_boxes(masks)  # (N, 4), ending after the last pixel
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes.to(torch.float32),
                                              format=tv_tensors.BoundingBoxFormat.XYXY,
                                              canvas_size=(height, width)),
            "labels": torch.tensor([self.things.to_label(s["category_id"]) for s in things],
                                   dtype=torch.int64),
            "masks": tv_tensors.Mask(masks),
            "iscrowd": torch.tensor([1 if s.get("iscrowd") else 0 for s in things],
                                    dtype=torch.int64),
            "area": masks.flatten(1).sum(dim=1).to(torch.float32),  # (N, H*W) -> (N,)
            "image_id": image_id,
            "segment_ids": seg_ids,
            "semantic": tv_tensors.Mask(torch.from_numpy(semantic)),
            "panoptic": tv_tensors.Mask(ids_t),
            "segments": [dict(seg) for seg in segments],
        }
