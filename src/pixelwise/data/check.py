"""Validate a dataset: every problem as one `Problem` ("PATH: message"), never a traceback.

`check_dataset(root)` reads every image, mask, annotation file and panoptic PNG of a dataset in
the pixelwise or PASCAL VOC layout (see `pixelwise.data.layout`) and lists what is wrong:

- an image or mask that is corrupt, truncated, not an image, or over the pixel limit (refused
  from its header, before decoding: a decompression bomb);
- a mask whose size differs from its image's, label values outside the classes (and not the
  ignore index), an image without its mask, a mask without its image;
- in COCO json (instances, keypoints): invalid JSON or structure, duplicate image / annotation /
  category ids, a `file_name` that escapes the dataset root (refused, never opened) or is
  missing, a width/height that differs from the file, an invalid polygon or RLE, a box outside
  the image, a keypoint count that differs from the category's schema;
- in COCO panoptic: the same for images, plus duplicate segment ids, PNG ids that are not in
  `segments_info` and the reverse, a PNG whose size differs from its image.

The per-sample checks (`mask_problems`, `annotation_problems`, `rle_problem`, ...) are the ones
the datasets use, so training refuses a bad sample with the very message `data check` prints;
`refuse_or_skip` applies the `skip_bad` policy.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pixelwise.data.images import DEFAULT_MAX_PIXELS, read_image, read_label_png
from pixelwise.data.keypoints import KeypointSchema
from pixelwise.data.layout import (
    IMAGE_SUFFIXES,
    BadFileError,
    Classes,
    DatasetLayout,
    Problem,
    SplitLayout,
    detect_layout,
    link_problem,
    safe_join,
    semantic_pairs,
)
from pixelwise.errors import UserError

__all__ = [
    "BOX_TOLERANCE",
    "CheckReport",
    "Problem",
    "annotation_problems",
    "box_problem",
    "check_dataset",
    "check_dataset_report",
    "decode_rle_counts",
    "keypoints_problem",
    "mask_problems",
    "panoptic_png_problems",
    "refuse_or_skip",
    "rle_problem",
    "segmentation_problem",
    "skip_none",
]

logger = logging.getLogger(__name__)

# Boxes, polygon vertices and keypoints may lie this many pixels outside the image: COCO's own
# boxes, derived from float polygons, overshoot the border by a fraction of a pixel.
BOX_TOLERANCE = 1.0
_MAX_LISTED = 8  # values listed in one message before "..."


@dataclass
class CheckReport:
    """What `check_dataset_report` found: the problems and how much it read."""

    root: Path
    kind: str
    splits: list[str]
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        read = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.counts.items() if n)
        splits = ", ".join(self.splits) or "no splits"
        return f"{self.root} ({self.kind} layout; {splits}): {read or 'nothing to read'}"


def check_dataset(root: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
                  ) -> list[Problem]:
    """Every problem of the dataset at `root` (empty when clean). See the module docstring.

    Raises `UserError` only when `root` is not a dataset folder at all.
    """
    return check_dataset_report(root, max_pixels=max_pixels).problems


def check_dataset_report(root: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
                         ) -> CheckReport:
    """`check_dataset` with a summary of what was read (for the CLI)."""
    try:
        layout = detect_layout(root)
    except BadFileError as exc:  # e.g. an unreadable VOC split list
        report = CheckReport(Path(root), "unknown", [])
        report.problems.append(exc.problem)
        return report
    checker = _Checker(layout, max_pixels)
    checker.run()
    # a file met twice (say a link found by the folder walk and by the mask pairing) once
    checker.report.problems = list(dict.fromkeys(checker.report.problems))
    return checker.report


# ============================================================================ per-sample checks


def mask_problems(
    mask: torch.Tensor,
    image_size: tuple[int, int],
    mask_path: str | Path,
    classes: Classes | None,
) -> list[Problem]:
    """Problems of a semantic mask `(H, W)` int against its image's `(height, width)`.

    Size mismatch; label values that are neither a class index (0..K-1) nor the ignore index.
    With `classes` None only the size is checked.
    """
    problems = []
    mask_hw = (int(mask.shape[-2]), int(mask.shape[-1]))
    if mask_hw != tuple(image_size):
        problems.append(Problem(Path(mask_path), f"mask size {_hw(mask_hw)} differs from the "
                                                 f"image size {_hw(image_size)} (height x width)"))
    if classes is not None:
        # an elementwise test first: torch.unique sorts the whole mask (it was the slowest step
        # of reading a training sample); the bad values are listed only when there are some
        outside = ((mask < 0) | (mask >= classes.num_classes)) & (mask != classes.ignore_index)
        bad = torch.unique(mask[outside]) if bool(outside.any()) else mask.new_empty(0)
        if bad.numel():
            problems.append(Problem(Path(mask_path), (
                f"label values {_listed(bad.tolist())} outside the {classes.num_classes} classes "
                f"(0..{classes.num_classes - 1}, ignore {classes.ignore_index})")))
    return problems


def box_problem(bbox: Any, height: int, width: int) -> str | None:
    """A COCO box ``[x, y, w, h]`` that is malformed, has a negative size or leaves the image.

    A zero width or height is allowed here: the loaders drop such boxes with a warning.
    """
    if not _numbers(bbox) or len(bbox) != 4:
        return f"bbox must be 4 numbers [x, y, width, height], got {_short(bbox)}"
    x, y, w, h = bbox
    if w < 0 or h < 0:
        return f"bbox {_fmt(bbox)} has a negative width or height"
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or (
        y + h > height + BOX_TOLERANCE
    ):
        return f"bbox {_fmt(bbox)} is outside the {width}x{height} image (width x height)"
    return None


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """A COCO segmentation (polygon list or RLE dict) that is invalid for this image."""
    if isinstance(segmentation, dict):
        return rle_problem(segmentation, height, width)
    if not isinstance(segmentation, list):
        return f"segmentation must be a list of polygons or an RLE dict, got {_short(segmentation)}"
    if not segmentation:
        return "segmentation is an empty list of polygons"
    for i, polygon in enumerate(segmentation):
        problem = polygon_problem(polygon, height, width)
        if problem:
            return f"polygon {i}: {problem}"
    return None


def polygon_problem(polygon: Any, height: int, width: int) -> str | None:
    """One COCO polygon ``[x1, y1, x2, y2, ...]``: >= 3 points, even length, not off the image.

    Vertices outside the image are allowed (pycocotools clips the polygon to the image, so an
    object cut by the border may keep its whole outline); a polygon entirely off it is not.
    """
    if not _numbers(polygon):
        return f"must be a flat list of numbers [x1, y1, x2, y2, ...], got {_short(polygon)}"
    if len(polygon) % 2:
        return f"odd number of coordinates ({len(polygon)})"
    if len(polygon) < 6:
        # pycocotools would even read a 4-number polygon as a box
        return f"{len(polygon) // 2} points; a polygon needs at least 3"
    xs, ys = polygon[0::2], polygon[1::2]
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
        return f"lies entirely outside the {width}x{height} image (width x height)"
    return None


def rle_problem(rle: Any, height: int, width: int) -> str | None:
    """A COCO RLE ``{"size": [h, w], "counts": str | list}`` that is invalid for the image.

    Checks the size against the image and that the run lengths are non-negative and cover
    exactly h*w pixels; compressed strings are decoded by `decode_rle_counts`.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return f"RLE must be a dict with 'size' and 'counts', got {_short(rle)}"
    size = rle["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0
                                                              for v in size)):
        return f"RLE size must be [height, width], got {_short(size)}"
    if tuple(size) != (height, width):
        return (f"RLE size {_hw(size)} differs from the image size {_hw((height, width))} "
                "(height x width)")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            runs = decode_rle_counts(counts)
        except ValueError as exc:
            return f"invalid compressed RLE counts: {exc}"
    elif isinstance(counts, list) and all(_is_int(c) for c in counts):
        runs = counts
    else:
        return "RLE counts must be a compressed string or a list of integers"
    if any(c < 0 for c in runs):
        return "RLE has negative run lengths"
    if sum(runs) != height * width:
        return f"RLE runs cover {sum(runs)} pixels, not {height}x{width} = {height * width}"
    return None


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the inverse of pycocotools' rleToString).

    Written by hand because pycocotools neither validates a string nor bounds-checks its
    decoder (a bad string can write past the mask buffer). Each count is stored as 5-bit groups
    in characters 48..111 (bit 0x20: more groups follow; 0x10 in the last group: negative);
    from the third count on, the value is a difference to the count two before. Raises
    ValueError on a character out of range or a string that ends inside a count.
    """
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
    runs: list[int] = []
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("the string ends inside a count")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(data[p])!r} at position {p} is not in '0'..'o'")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend the last 5-bit group
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def keypoints_problem(keypoints: Any, num_keypoints: int, height: int, width: int,
                      num_labelled: Any = None, category: str = "the category") -> str | None:
    """COCO keypoints ``[x1, y1, v1, ...]`` against a schema of `num_keypoints` names.

    The count must match, v in {0, 1, 2}, labelled points (v > 0) inside the image, and the
    annotation's ``num_keypoints`` (if given) must equal the number of labelled points.
    """
    if not _numbers(keypoints):
        return f"keypoints must be a flat list of numbers [x, y, v, ...], got {_short(keypoints)}"
    if len(keypoints) % 3:
        return f"{len(keypoints)} keypoint values, not a multiple of 3 (x, y, v per keypoint)"
    if len(keypoints) // 3 != num_keypoints:
        return (f"{len(keypoints) // 3} keypoints but {category} has {num_keypoints} "
                "keypoint names")
    triples = [keypoints[i:i + 3] for i in range(0, len(keypoints), 3)]
    bad_v = sorted({v for _, _, v in triples if v not in (0, 1, 2)})
    if bad_v:
        return f"keypoint visibility values {_listed(bad_v)} are not 0, 1 or 2"
    labelled = [(x, y) for x, y, v in triples if v > 0]
    if any(x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x > width + BOX_TOLERANCE
           or y > height + BOX_TOLERANCE for x, y in labelled):
        return f"labelled keypoints outside the {width}x{height} image (width x height)"
    if num_labelled is not None and num_labelled != len(labelled):
        return f"num_keypoints is {_short(num_labelled)} but {len(labelled)} keypoints have v > 0"
    return None


def annotation_problems(ann: dict, height: int, width: int, category: dict | None) -> list[str]:
    """Problems of one COCO instance/keypoint annotation on an image of `height` x `width`.

    `category` is the annotation's category dict (its ``keypoints`` names, if any, are the
    schema). Returns messages without the file name (the caller names the json file).
    """
    problems = []
    if "bbox" in ann:
        problems.append(box_problem(ann["bbox"], height, width))
    if "segmentation" in ann:
        problems.append(segmentation_problem(ann["segmentation"], height, width))
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        problems.append(f"iscrowd must be 0 or 1, got {_short(ann['iscrowd'])}")
    names = (category or {}).get("keypoints")
    if isinstance(names, list) and names:
        label = f"category {category.get('name', category.get('id'))!r}"
        if "keypoints" not in ann:
            problems.append(f"no keypoints, but {label} has {len(names)} keypoint names")
        else:
            problems.append(keypoints_problem(ann["keypoints"], len(names), height, width,
                                              ann.get("num_keypoints"), label))
    elif "keypoints" in ann and category is not None and "keypoints" not in category:
        problems.append(f"keypoints given, but category {category.get('id')!r} has no "
                        "'keypoints' names")
    return [p for p in problems if p]


def panoptic_png_problems(
    ids: torch.Tensor, segment_ids: Sequence[int], png_path: str | Path, json_name: str
) -> list[Problem]:
    """A panoptic PNG's segment ids `(H, W)` against the ids of its ``segments_info``.

    Non-zero ids in the PNG missing from ``segments_info`` and listed ids absent from the PNG
    (0 is "void", never a segment).
    """
    in_png = set(torch.unique(ids).tolist()) - {0}
    listed = set(segment_ids)
    unlisted, absent = sorted(in_png - listed), sorted(listed - in_png)
    problems = []
    if unlisted:
        problems.append(Problem(Path(png_path), f"segment ids {_listed(unlisted)} are in the PNG "
                                                f"but not in {json_name}"))
    if absent:
        problems.append(Problem(Path(png_path), f"segments_info ids {_listed(absent)} of "
                                                f"{json_name} do not appear in the PNG"))
    return problems


_warned: set[str] = set()


def refuse_or_skip(problems: Sequence[Problem], *, skip_bad: bool) -> bool:
    """The bad-sample policy: True when `problems` is empty (use the sample).

    Otherwise, with `skip_bad` False raise the first problem as a `BadFileError` (the message
    `data check` prints); with `skip_bad` True log each problem (a warning the first time in
    this process, debug after) and return False (skip the sample).
    """
    if not problems:
        return True
    if not skip_bad:
        raise problems[0].to_error()
    for problem in problems:
        text = str(problem)
        level = logging.DEBUG if text in _warned else logging.WARNING
        _warned.add(text)
        logger.log(level, "skipping a bad sample: %s", text)
    return False


def skip_none(batch: Sequence) -> list:
    """The samples of a batch without the None that ``skip_bad`` datasets return for a bad one.

    Use inside a DataLoader collate function: ``collate_fn=lambda b: collate(skip_none(b))``.
    """
    return [sample for sample in batch if sample is not None]


# ============================================================================ the dataset walk


class _Checker:
    """Walks one dataset, collecting problems; each image file is read once."""

    def __init__(self, layout: DatasetLayout, max_pixels: int | None) -> None:
        self.layout = layout
        self.max_pixels = max_pixels
        self.report = CheckReport(layout.root, layout.kind, list(layout.splits))
        self.report.counts = {"images": 0, "masks": 0, "annotation_files": 0,
                              "annotations": 0, "panoptic_pngs": 0}
        self._sizes: dict[Path, tuple[int, int] | None] = {}
        self._classes: Classes | None = None

    def add(self, path: Path, message: str) -> None:
        self.report.problems.append(Problem(path, message))

    def run(self) -> None:
        layout = self.layout
        if not layout.splits:
            where = (layout.root / "ImageSets" / "Segmentation" if layout.kind == "voc"
                     else layout.root)
            self.add(where, "no split found (expected images/{split}/ or "
                            "annotations/*_{split}.json; for VOC, ImageSets/Segmentation/*.txt)")
        try:
            self._classes = layout.classes()
        except BadFileError as exc:
            self.report.problems.append(exc.problem)
        needs_classes = any(s.has_masks for s in layout.splits.values())
        if needs_classes and layout.classes_json is None and layout.kind == "pixelwise":
            self.add(layout.root / "classes.json", "missing: the masks need it to name their "
                                                   "classes, label values cannot be checked")
        for split in layout.splits.values():
            self.check_split(split)

    def check_split(self, split: SplitLayout) -> None:
        if split.image_ids is None and split.has_images:
            # every image file, also those no mask or annotation refers to
            for path in sorted(split.images_dir.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not any(
                    part.startswith(".") for part in path.relative_to(split.images_dir).parts
                ):
                    link = link_problem(path, split.images_dir)
                    if link is None:
                        self.image_size(path)
                    elif path not in self._sizes:
                        self._sizes[path] = None  # reported once, never read
                        self.report.problems.append(link)
        if split.has_masks:
            self.check_masks(split)
        for kind, path in split.annotations.items():
            self.report.counts["annotation_files"] += 1
            data = self.load_json(path)
            if data is None:
                continue
            if kind == "panoptic":
                self.check_panoptic(path, data, split)
            else:
                self.check_coco(path, data, split)

    # ------------------------------------------------------------------ images and masks

    def image_size(self, path: Path) -> tuple[int, int] | None:
        """(height, width) of a readable image; None (problem recorded once) otherwise."""
        if path not in self._sizes:
            try:
                image = read_image(path, max_pixels=self.max_pixels)
                self._sizes[path] = (int(image.shape[-2]), int(image.shape[-1]))
                self.report.counts["images"] += 1
            except BadFileError as exc:
                self._sizes[path] = None
                self.report.problems.append(exc.problem)
        return self._sizes[path]

    def check_masks(self, split: SplitLayout) -> None:
        pairs, problems = semantic_pairs(split)
        self.report.problems += problems
        for image_path, mask_path in pairs:
            try:
                mask = read_label_png(mask_path, max_pixels=self.max_pixels)
            except BadFileError as exc:
                self.report.problems.append(exc.problem)
                continue
            self.report.counts["masks"] += 1
            size = self.image_size(image_path)
            if size is not None:
                self.report.problems += mask_problems(mask, size, mask_path, self._classes)
            elif self._classes is not None:
                # the image is unreadable: still report the mask's own label values
                self.report.problems += mask_problems(mask, tuple(mask.shape), mask_path,
                                                      self._classes)

    # ------------------------------------------------------------------ json

    def load_json(self, path: Path) -> dict | None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            self.add(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
            return None
        except (OSError, UnicodeDecodeError, RecursionError) as exc:
            self.add(path, f"cannot read ({type(exc).__name__}: {exc})")
            return None
        if not isinstance(data, dict):
            self.add(path, "expected a JSON object with 'images', 'annotations', 'categories'")
            return None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                self.add(path, f"{key!r} must be a list" if key in data else f"no {key!r} list")
                return None
        return data

    def check_categories(self, path: Path, categories: list, panoptic: bool) -> dict[int, dict]:
        by_id: dict[int, dict] = {}
        for i, cat in enumerate(categories):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                self.add(path, f"categories[{i}]: needs an integer 'id'")
                continue
            if cat["id"] in by_id:
                self.add(path, f"duplicate category id {cat['id']}")
                continue
            by_id[cat["id"]] = cat
            if panoptic and cat.get("isthing", 0) not in (0, 1):
                self.add(path, f"category {cat['id']}: isthing must be 0 or 1")
            if "keypoints" in cat:
                try:
                    KeypointSchema.from_coco_category(cat)
                except UserError as exc:
                    self.add(path, str(exc))
                except Exception as exc:  # noqa: BLE001 - junk types may surface as TypeError
                    self.add(path, f"category {cat['id']}: invalid keypoint schema "
                                   f"({type(exc).__name__}: {exc})")
        return by_id

    def check_images(self, path: Path, images: list, split: SplitLayout
                     ) -> dict[int, tuple[int, int]]:
        """The json's image entries -> {id: (height, width)} of the valid ones."""
        by_id: dict[int, tuple[int, int]] = {}
        seen: set = set()
        for i, image in enumerate(images):
            if not isinstance(image, dict) or not _is_int(image.get("id")):
                self.add(path, f"images[{i}]: needs an integer 'id'")
                continue
            image_id = image["id"]
            if image_id in seen:
                self.add(path, f"duplicate image id {image_id}")
                continue
            seen.add(image_id)
            where = f"image id {image_id}"
            height, width, name = image.get("height"), image.get("width"), image.get("file_name")
            if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
                self.add(path, f"{where}: needs positive integer 'width' and 'height'")
                continue
            if not isinstance(name, str):
                self.add(path, f"{where}: needs a 'file_name' string")
                continue
            try:
                file = safe_join(split.images_dir, name)
            except UserError as exc:
                self.add(path, f"{where}: {exc}; refused")
                continue
            if not file.is_file():
                self.add(path, f"{where}: file_name {name!r} not found in {split.images_dir}")
                continue
            by_id[image_id] = (height, width)
            size = self.image_size(file)
            if size is not None and size != (height, width):
                self.add(path, f"{where}: the json says {width}x{height} but {name} is "
                               f"{size[1]}x{size[0]} (width x height)")
        return by_id

    def check_coco(self, path: Path, data: dict, split: SplitLayout) -> None:
        categories = self.check_categories(path, data["categories"], panoptic=False)
        images = self.check_images(path, data["images"], split)
        image_ids = {im["id"] for im in data["images"]
                     if isinstance(im, dict) and _is_int(im.get("id"))}
        seen: set = set()
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                self.add(path, f"annotations[{i}]: needs an integer 'id'")
                continue
            self.report.counts["annotations"] += 1
            where = f"annotation id {ann['id']}"
            if ann["id"] in seen:
                self.add(path, f"duplicate annotation id {ann['id']}")
                continue
            seen.add(ann["id"])
            image_id, category_id = ann.get("image_id"), ann.get("category_id")
            if not _is_int(image_id) or image_id not in image_ids:
                self.add(path, f"{where}: image_id {_short(image_id)} is not an image of the file")
                continue
            if not _is_int(category_id) or category_id not in categories:
                self.add(path, f"{where}: category_id {_short(category_id)} is not a category "
                               "of the file")
                continue
            if image_id not in images:
                continue  # its image entry is already reported
            height, width = images[image_id]
            for message in annotation_problems(ann, height, width, categories[category_id]):
                self.add(path, f"{where} (image id {image_id}): {message}")

    def check_panoptic(self, path: Path, data: dict, split: SplitLayout) -> None:
        categories = self.check_categories(path, data["categories"], panoptic=True)
        images = self.check_images(path, data["images"], split)
        image_ids = {im["id"] for im in data["images"]
                     if isinstance(im, dict) and _is_int(im.get("id"))}
        seen: set = set()
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not _is_int(ann.get("image_id")):
                self.add(path, f"annotations[{i}]: needs an integer 'image_id'")
                continue
            image_id = ann["image_id"]
            where = f"annotation of image id {image_id}"
            if image_id in seen:
                self.add(path, f"duplicate annotation for image id {image_id} (one per image)")
                continue
            seen.add(image_id)
            if image_id not in image_ids:
                self.add(path, f"{where}: image_id is not an image of the file")
                continue
            segments = ann.get("segments_info")
            if not isinstance(segments, list) or not isinstance(ann.get("file_name"), str):
                self.add(path, f"{where}: needs 'file_name' and a 'segments_info' list")
                continue
            self.report.counts["annotations"] += 1
            size = images.get(image_id)
            segment_ids = self.check_segments(path, where, segments, categories, size)
            try:
                png = safe_join(split.panoptic_dir, ann["file_name"])
            except UserError as exc:
                self.add(path, f"{where}: {exc}; refused")
                continue
            if not png.is_file():
                self.add(path, f"{where}: panoptic PNG {ann['file_name']!r} not found in "
                               f"{split.panoptic_dir}")
                continue
            self.check_panoptic_png(png, path.name, segment_ids, size)

    def check_segments(self, path: Path, where: str, segments: list, categories: dict,
                       size: tuple[int, int] | None) -> list[int]:
        ids: list[int] = []
        for j, seg in enumerate(segments):
            if not isinstance(seg, dict) or not _is_int(seg.get("id")) or seg["id"] <= 0:
                self.add(path, f"{where}: segments_info[{j}] needs a positive integer 'id'")
                continue
            label = f"{where}, segment id {seg['id']}"
            if seg["id"] in ids:
                self.add(path, f"{where}: duplicate segment id {seg['id']}")
                continue
            ids.append(seg["id"])
            if not _is_int(seg.get("category_id")) or seg["category_id"] not in categories:
                self.add(path, f"{label}: category_id {_short(seg.get('category_id'))} is not a "
                               "category of the file")
            if seg.get("iscrowd", 0) not in (0, 1):
                self.add(path, f"{label}: iscrowd must be 0 or 1")
            if "bbox" in seg and size is not None:
                problem = box_problem(seg["bbox"], *size)
                if problem:
                    self.add(path, f"{label}: {problem}")
        return ids

    def check_panoptic_png(self, png: Path, json_name: str, segment_ids: list[int],
                           size: tuple[int, int] | None) -> None:
        try:
            rgb = read_image(png, max_pixels=self.max_pixels)
        except BadFileError as exc:
            self.report.problems.append(exc.problem)
            return
        self.report.counts["panoptic_pngs"] += 1
        if rgb.shape[0] != 3 or rgb.dtype != torch.uint8:
            self.add(png, "a panoptic PNG must be 8-bit RGB (id = R + 256 G + 256^2 B)")
            return
        rgb = rgb.to(torch.int64)
        ids = rgb[0] + 256 * rgb[1] + 256 * 256 * rgb[2]  # (H, W)
        if size is not None and tuple(ids.shape) != size:
            self.add(png, f"PNG size {_hw(tuple(ids.shape))} differs from the image size "
                          f"{_hw(size)} (height x width)")
        self.report.problems += panoptic_png_problems(ids, segment_ids, png, json_name)


# ============================================================================ small helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(values: Any) -> bool:
    """A list of finite int/float numbers (bool excluded)."""
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    )


def _hw(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _listed(values: Sequence) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(values) > _MAX_LISTED else ''}]"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
