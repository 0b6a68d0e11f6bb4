"""Instance overlays: masks tinted per instance with outlines, boxes, "name 0.93" tags, keypoints
and skeletons -- what `pixelwise predict` draws for instance and keypoint models.

Masks go through the same id-map blend as the semantic overlay (`pixelwise.viz.overlay`): each
pixel shows the highest-scoring instance covering it. Boxes, tags and keypoints are drawn in
one PIL ImageDraw pass, by hand rather than with torchvision.utils.draw_bounding_boxes /
draw_keypoints because those cannot size the built-in font (labels stay 10 px tall on any
image), colour every skeleton line white and draw it over the joints, and each call converts
the whole image to PIL and back.

Sizes (line width, joint radius, text size) grow with the image; `DrawSizes` lets callers fix
them. Text uses Pillow's built-in default font (`ImageFont.load_default`), nothing downloaded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pixelwise.errors import UserError
from pixelwise.viz.overlay import paint_regions, to_display_rgb
from pixelwise.viz.palette import instance_colors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrawSizes:
    """Pixel sizes of drawn primitives: box line width, joint radius, bone width, text size."""

    box_width: int
    joint_radius: int
    bone_width: int
    font_size: int

    @classmethod
    def for_image(cls, height: int, width: int) -> DrawSizes:
        """Sizes that read well for an image of this size (a 512 px image: 2, 4, 2, 12)."""
        side = max(height, width)
        return cls(
            box_width=max(1, round(side / 300)),
            joint_radius=max(2, round(side / 120)),
            bone_width=max(1, round(side / 300)),
            font_size=int(np.clip(round(side / 42), 10, 40)),
        )


def overlay_instances(
    image: Any,
    masks: Any = None,
    boxes: Any = None,
    labels: Any = None,
    scores: Any = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    keypoints: Any = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
    score_threshold: float = 0.0,
    *,
    alpha: float = 0.5,
    mask_threshold: float = 0.5,
    outline_width: int | None = None,
    sizes: DrawSizes | None = None,
    show_tags: bool | None = None,
    stretch: bool | None = None,
) -> np.ndarray:
    """Instances drawn over the image: (H, W, 3) uint8. Every argument but the image is optional.

    masks: (N, H, W) or (N, 1, H, W) bool/uint8 (> 0) or float probabilities (> mask_threshold);
    boxes: (N, 4) XYXY pixels; labels: (N,) ints named by ``class_names[label]`` (torchvision's
    labels 1..K with "__background__" at 0, e.g. `CategoryMap.names`; a dict works too);
    scores: (N,); keypoints: (N, K, 3) x, y, v -- joints with v > 0 are drawn, and a
    ``skeleton`` pair (0-based, e.g. `KeypointSchema.skeleton`) only when both ends are.
    Instances scoring below `score_threshold` are dropped. Instance i (after dropping) has
    colour ``instance_colors(N)[i]``: its mask is tinted and outlined, its box, tag
    ("name 0.93") and skeleton drawn in it; where masks overlap the higher score is on top.
    show_tags: None = only when the objects are big enough to carry them (`tags_fit`).
    """
    rgb = to_display_rgb(image, stretch=stretch)
    h, w = rgb.shape[:2]
    fields = {
        "masks": _masks(masks, mask_threshold),
        "boxes": _array(boxes, "boxes", np.float64),
        "labels": _array(labels, "labels", np.int64),
        "scores": _array(scores, "scores", np.float64),
        "keypoints": _array(keypoints, "keypoints", np.float64),
    }
    n = _count(fields)
    if fields["scores"] is not None:
        keep = fields["scores"] >= score_threshold
        fields = {k: v if v is None else v[keep] for k, v in fields.items()}
        n = int(keep.sum())
    colors = instance_colors(n)
    sizes = sizes or DrawSizes.for_image(h, w)

    out = rgb
    masks = fields["masks"]
    if masks is not None:
        if masks.shape[1:] != (h, w):
            raise UserError(f"masks of size {masks.shape[1]}x{masks.shape[2]} do not match the "
                            f"image ({h}x{w})")
        out = _paint_masks(out, masks, fields["scores"], colors, alpha, outline_width)
    boxes = fields["boxes"]
    if boxes is not None and not (boxes.ndim == 2 and boxes.shape[1] == 4):
        raise UserError(f"boxes must be (N, 4) XYXY, got shape {boxes.shape}")
    tag_boxes = boxes
    if tag_boxes is None and masks is not None:
        tag_boxes = _mask_boxes(masks)
    tags = _tags(n, fields["labels"], fields["scores"], class_names)

    image_pil = Image.fromarray(out)
    draw = ImageDraw.Draw(image_pil)
    if boxes is not None:
        for box, color in zip(boxes, colors):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=tuple(int(c) for c in color),
                           width=sizes.box_width)
    if fields["keypoints"] is not None:
        _draw_keypoints(draw, fields["keypoints"], skeleton, colors, sizes)
    if show_tags is None and tag_boxes is not None:
        show_tags = tags_fit(tag_boxes, sizes)
    if show_tags and tags is not None and tag_boxes is not None:
        _draw_tags(draw, tag_boxes, tags, colors, sizes)
    return np.asarray(image_pil).copy()


def draw_tags(rgb: np.ndarray, boxes: np.ndarray, texts: Sequence[str], colors: Any,
              sizes: DrawSizes | None = None) -> np.ndarray:
    """Text tags (filled in each colour, text black or white for contrast) just above the
    top-left corner of each XYXY box (inside it at the image's top edge); (H, W, 3) uint8."""
    image_pil = Image.fromarray(rgb)
    _draw_tags(ImageDraw.Draw(image_pil), boxes, texts, np.asarray(colors),
               sizes or DrawSizes.for_image(*rgb.shape[:2]))
    return np.asarray(image_pil).copy()


def tags_fit(boxes: np.ndarray, sizes: DrawSizes) -> bool:
    """Whether objects are big enough for tags: the median XYXY box is at least two text lines
    tall (many small objects, such as cells, would be buried under their tags)."""
    heights = boxes[:, 3] - boxes[:, 1]
    heights = heights[boxes[:, 2] >= 0]  # boxes of empty masks are -1
    return bool(len(heights)) and float(np.median(heights)) >= 2 * sizes.font_size


def text_color(color: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `color` (ITU-R BT.601 luma threshold)."""
    r, g, b = (float(c) for c in color[:3])
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


@functools.lru_cache(maxsize=16)
def default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` px (Pillow >= 10.1); the fixed bitmap font before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _paint_masks(rgb: np.ndarray, masks: np.ndarray, scores: np.ndarray | None,
                 colors: np.ndarray, alpha: float, outline_width: int | None) -> np.ndarray:
    """Tint and outline (N, H, W) bool masks; each pixel belongs to its highest-score mask."""
    n = len(masks)
    ids = np.zeros(masks.shape[1:], dtype=np.int64)  # (H, W): 0 = no instance, i + 1 = mask i
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(n)[::-1]
    for i in order:  # ascending priority: later writes (higher scores) win
        ids[masks[i]] = i + 1
    table = np.concatenate([np.zeros((1, 3), np.uint8), colors]).reshape(n + 1, 3)
    tinted = np.arange(n + 1) > 0
    return paint_regions(rgb, ids, table, tinted, alpha, outline_width)


def _draw_keypoints(draw: ImageDraw.ImageDraw, keypoints: np.ndarray,
                    skeleton: Sequence[tuple[int, int]] | None, colors: np.ndarray,
                    sizes: DrawSizes) -> None:
    """Bones under joints, in the instance colour with a halo (joints: a rim) of black or white,
    whichever contrasts with the colour, so that they show on any background."""
    if keypoints.ndim != 3 or keypoints.shape[2] not in (2, 3):
        raise UserError(f"keypoints must be (N, K, 3) x, y, v, got shape {keypoints.shape}")
    k = keypoints.shape[1]
    pairs = [tuple(int(i) for i in pair) for pair in (skeleton or ())]
    bad = [p for p in pairs if not all(0 <= i < k for i in p)]
    if bad:
        raise UserError(f"skeleton pair {list(bad[0])} is out of range for {k} keypoints")
    r, bw = sizes.joint_radius, sizes.bone_width
    for person, color in zip(keypoints, colors):
        fill = tuple(int(c) for c in color)
        halo = text_color(fill)
        visible = person[:, 2] > 0 if person.shape[1] == 3 else np.ones(k, dtype=bool)
        xy = [(float(x), float(y)) for x, y in person[:, :2]]
        bones = [(xy[a], xy[b]) for a, b in pairs if visible[a] and visible[b]]
        for bone in bones:
            draw.line(bone, fill=halo, width=bw + 2)
        for bone in bones:
            draw.line(bone, fill=fill, width=bw)
        for j in np.flatnonzero(visible):
            x, y = xy[j]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=halo, width=1)


def _draw_tags(draw: ImageDraw.ImageDraw, boxes: np.ndarray, texts: Sequence[str],
               colors: np.ndarray, sizes: DrawSizes) -> None:
    font = default_font(sizes.font_size)
    image_width = draw.im.size[0]
    for box, text, color in zip(boxes, texts, colors):
        if not text or box[2] < 0:  # no text, or an empty mask's box
            continue
        x0, y0 = float(box[0]), float(box[1])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(1, sizes.font_size // 8)
        y = y0 - th - 2 * pad if y0 - th - 2 * pad >= 0 else y0  # above the box, else inside
        x = min(max(0.0, x0), max(0.0, image_width - tw - 2 * pad))  # keep on the image
        fill = tuple(int(c) for c in color)
        draw.rectangle((x, y, x + tw + 2 * pad, y + th + 2 * pad), fill=fill)
        draw.text((x + pad - left, y + pad - top), text, fill=text_color(fill), font=font)


def _tags(n: int, labels: np.ndarray | None, scores: np.ndarray | None,
          class_names: Sequence[str] | Mapping[int, str] | None) -> list[str] | None:
    """ "name 0.93" per instance (name only without scores, score only without labels)."""
    if labels is None and scores is None:
        return None
    tags = []
    for i in range(n):
        parts = []
        if labels is not None:
            parts.append(_name(int(labels[i]), class_names))
        if scores is not None:
            parts.append(f"{scores[i]:.2f}")
        tags.append(" ".join(parts))
    return tags


def _name(label: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _masks(masks: Any, threshold: float) -> np.ndarray | None:
    """(N, H, W) or (N, 1, H, W) masks (bool / integer > 0 / float > threshold) -> (N, H, W)
    bool."""
    if masks is None:
        return None
    array = _array(masks, "masks", None)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]  # (N, 1, H, W) -> (N, H, W), Mask R-CNN's output
    if array.ndim != 3:
        raise UserError(f"masks must be (N, H, W), got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array > threshold
    return array > 0


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY extents of (N, H, W) masks (-1 for empty ones): where tags go without boxes."""
    boxes = np.full((len(masks), 4), -1.0)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if len(xs):
            boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
    return boxes


def _array(value: Any, name: str, dtype: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array if dtype is None else array.astype(dtype, copy=False)


def _count(fields: dict[str, np.ndarray | None]) -> int:
    """The instance count N shared by every given field (UserError when they disagree)."""
    counts = {name: len(v) for name, v in fields.items() if v is not None}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise UserError(f"instance fields disagree on the number of instances: {listed}")
    return next(iter(counts.values()), 0)
