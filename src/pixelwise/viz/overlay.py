"""Colour overlays of label maps on images: display conversion, blending, outlines, semantic and
panoptic overlays (instances: `pixelwise.viz.instances`).

Every overlay returns an (H, W, 3) uint8 numpy array (save it with `pixelwise.viz.save_png`).
Inputs may be numpy or torch: images are (H, W[, C]) numpy arrays or (C, H, W) tensors with
C = 1, 3 (or 4: alpha dropped), uint8, uint16 or float in [0, 1]; `to_display_rgb` explains
how each is shown. A tinted pixel is ``round((1 - alpha) * image + alpha * colour)``; outline
pixels take the region's colour opaquely.

Why not torchvision.utils.draw_segmentation_masks: it paints pixels where masks overlap black,
makes one full-image pass per mask (K passes for K classes) and truncates instead of rounding.
Here every overlay first builds one id map (H, W), so a blend is one table lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pixelwise.errors import UserError
from pixelwise.viz.palette import as_label_array, instance_colors, make_palette, palette_for

logger = logging.getLogger(__name__)

# 16-bit (and other non-uint8 integer) images are contrast-stretched to these percentiles of
# their values, as ImageJ's "auto" display range does: 12-bit data in a 16-bit file shows up,
# and one hot pixel does not darken the rest.
STRETCH_PERCENTILES = (0.1, 99.9)
_STRETCH_SAMPLE = 1 << 20  # percentiles from at most ~1M pixels (a strided subsample)


def to_display_rgb(image: Any, *, stretch: bool | None = None) -> np.ndarray:
    """Any image -> (H, W, 3) uint8 for display.

    image: numpy (H, W) or (H, W, C), or a torch tensor (C, H, W) or (H, W); C = 1 (shown as
    grey), 3, or 4 (alpha dropped). uint8 is shown as is; uint16 (other integers likewise) as
    ``round(v / 257)`` (65535 -> 255) with ``stretch=False``; float as ``round(255 v)`` with v
    clipped to [0, 1]. stretch: map the `STRETCH_PERCENTILES` of the values to 0..255 linearly
    (clipping outside); None = True for 16-bit/integer images, False for uint8, bool and float.
    """
    array = _hwc(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    integer = np.issubdtype(array.dtype, np.integer)
    if stretch is None:
        stretch = integer and array.dtype != np.uint8
    if stretch:
        sample = array[:: _stride(array), :: _stride(array)]
        lo, hi = (float(v) for v in np.percentile(sample, STRETCH_PERCENTILES))
        scaled = (array.astype(np.float32) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    elif array.dtype == np.uint8:
        scaled = array
    elif integer:
        scaled = array.astype(np.float32) / 257.0  # 65535 / 255 = 257: 16-bit -> 8-bit
    else:
        scaled = array.astype(np.float32) * 255.0
    if scaled.dtype != np.uint8:
        scaled = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    if scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)  # (H, W, 1) -> (H, W, 3)
    return np.ascontiguousarray(scaled)


def blend(rgb: np.ndarray, colors: np.ndarray, where: np.ndarray, alpha: float) -> np.ndarray:
    """rgb (H, W, 3) uint8 with the pixels `where` (H, W) bool tinted by `colors` (H, W, 3):
    ``round((1 - alpha) * rgb + alpha * colors)``; other pixels unchanged. Returns a new array."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    # full-frame arithmetic: boolean gathers/scatters of the tinted pixels are ~5x slower
    mixed = rgb.astype(np.float32)
    mixed *= 1.0 - alpha
    mixed += np.float32(alpha) * colors
    np.rint(mixed, out=mixed)
    out = np.where(where[:, :, None], mixed.astype(np.uint8), rgb)  # (H, W, 3)
    return out


def label_boundaries(ids: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool: the inner band, `width` pixels wide, of every region of equal id.

    A pixel is on the band when a pixel of another id lies within 4-connected (city-block)
    distance `width` of it; the image border is not a boundary. Both sides of an edge between
    two regions are marked. Hand-written with array shifts (no morphology dependency at run time).
    """
    h, w = ids.shape
    band = np.zeros((h, w), dtype=bool)
    if width <= 0:
        return band
    same_v = ids[1:, :] == ids[:-1, :]  # (H-1, W): pixel and the one below share an id
    same_h = ids[:, 1:] == ids[:, :-1]  # (H, W-1): pixel and the one to the right
    band[:-1, :] |= ~same_v
    band[1:, :] |= ~same_v
    band[:, :-1] |= ~same_h
    band[:, 1:] |= ~same_h
    for _ in range(width - 1):  # grow inwards: a same-id neighbour of the band joins it
        grown = band.copy()
        grown[:-1, :] |= band[1:, :] & same_v
        grown[1:, :] |= band[:-1, :] & same_v
        grown[:, :-1] |= band[:, 1:] & same_h
        grown[:, 1:] |= band[:, :-1] & same_h
        band = grown
    return band


def auto_outline_width(shape: Sequence[int]) -> int:
    """Outline width for an image of `shape` (H, W, ...): 1 px below 300 px, +1 per 300 px."""
    return 1 + max(shape[0], shape[1]) // 300


def paint_regions(rgb: np.ndarray, ids: np.ndarray, table: np.ndarray, tinted: np.ndarray,
                  alpha: float, outline_width: int | None, outlined: np.ndarray | None = None
                  ) -> np.ndarray:
    """Tint and outline the regions of an id map: the shared core of every overlay.

    ids: (H, W) int64 indices into `table` (R, 3) uint8 colours; tinted: (R,) bool, which ids are
    drawn (the others stay untouched); outlined: (R,) bool, which ids get outlines (default:
    the tinted ones); outline_width: None = `auto_outline_width`, 0 = no outlines.
    """
    colors = table[ids]  # (H, W, 3)
    out = blend(rgb, colors, tinted[ids], alpha)
    width = auto_outline_width(ids.shape) if outline_width is None else outline_width
    if width > 0:
        edge = label_boundaries(ids, width) & (tinted if outlined is None else outlined)[ids]
        out[edge] = colors[edge]
    return out


def overlay_semantic(image: Any, labels: Any, palette: np.ndarray | None = None,
                     alpha: float = 0.5, *, ignore_index: int = 255,
                     outline_width: int | None = None, stretch: bool | None = None) -> np.ndarray:
    """Class colours blended over the image, with class boundaries: (H, W, 3) uint8.

    labels: (H, W) class indices; palette: (K, 3) uint8 (default `make_palette(max label + 1)`).
    Pixels of `ignore_index` are left exactly as the image (no tint, no outline); the pixels of
    a class next to another class (or to ignore) are drawn in the opaque class colour,
    `outline_width` pixels wide (None: `auto_outline_width`; 0: none).
    """
    rgb = to_display_rgb(image, stretch=stretch)
    labels = as_label_array(labels)
    _check_same_size(rgb, labels, "labels")
    valid = labels != ignore_index
    palette = palette_for(labels[valid], palette)
    # one extra table row for ignore pixels, so the id map indexes the table directly
    table = np.concatenate([palette, np.zeros((1, 3), np.uint8)])  # (K + 1, 3)
    ids = np.where(valid, labels, len(palette))  # (H, W)
    tinted = np.arange(len(table)) < len(palette)
    return paint_regions(rgb, ids, table, tinted, alpha, outline_width)


def category_colors(categories: Sequence[Mapping[str, Any]], palette: np.ndarray | None = None
                    ) -> np.ndarray:
    """(C, 3) uint8 colours of COCO categories in the order ``sorted(categories, key=id)``.

    palette given: its first C colours; else each category's "color" when all have one (COCO
    panoptic categories do); else `make_palette(C)`.
    """
    cats = sorted(categories, key=lambda c: c["id"])
    if palette is not None:
        palette = np.asarray(palette, dtype=np.uint8)
        if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < len(cats):
            raise UserError(
                f"a palette of shape {palette.shape} cannot colour {len(cats)} categories"
            )
        return palette[: len(cats)]
    if cats and all(isinstance(c.get("color"), (list, tuple)) and len(c["color"]) == 3
                    for c in cats):
        return np.asarray([c["color"] for c in cats], dtype=np.uint8).reshape(len(cats), 3)
    return make_palette(len(cats))


def overlay_panoptic(image: Any, panoptic: Any, segments_info: Sequence[Mapping[str, Any]],
                     categories: Sequence[Mapping[str, Any]], alpha: float = 0.5, *,
                     palette: np.ndarray | None = None, outline_width: int | None = None,
                     show_names: bool | None = None, stretch: bool | None = None) -> np.ndarray:
    """A panoptic segmentation over the image: (H, W, 3) uint8.

    panoptic: (H, W) segment ids, or the (H, W, 3) uint8 COCO panoptic PNG (id = R + 256 G +
    256^2 B); segments_info: dicts with "id" and "category_id"; categories: COCO categories
    ("id", "name", "isthing"; colours from `category_colors(categories, palette)`).
    Stuff segments are tinted by their category colour, thing segments by `instance_colors`
    (in segments_info order) with outlines and, with `show_names`, their category name (None:
    when the things are big enough to carry a name, `pixelwise.viz.instances.tags_fit`).
    Void (id 0) and ids not listed in segments_info (or of unknown categories) stay untouched.
    """
    from pixelwise.viz.instances import DrawSizes, draw_tags, tags_fit  # (imports this module)

    rgb = to_display_rgb(image, stretch=stretch)
    ids = _panoptic_ids(panoptic)
    _check_same_size(rgb, ids, "panoptic ids")
    cats = sorted(categories, key=lambda c: c["id"])
    rank = {c["id"]: i for i, c in enumerate(cats)}
    class_table = category_colors(cats, palette)

    segments = [s for s in segments_info if s.get("category_id") in rank and s.get("id", 0) != 0]
    unknown = len(segments_info) - len(segments)
    if unknown:
        logger.debug("overlay_panoptic: %d segments with id 0 or an unknown category", unknown)
    # one table row per listed segment, plus a last row for void / unlisted ids
    table = np.zeros((len(segments) + 1, 3), dtype=np.uint8)
    is_thing = np.array([bool(cats[rank[s["category_id"]]].get("isthing")) for s in segments]
                        + [False])  # (R,)
    table[:-1] = class_table[[rank[s["category_id"]] for s in segments]].reshape(-1, 3)
    table[np.flatnonzero(is_thing)] = instance_colors(int(is_thing.sum()))
    seg_ids = np.array([s["id"] for s in segments], dtype=np.int64)
    rows = _lookup(ids, seg_ids, default=len(segments))  # (H, W) table row of each pixel
    tinted = np.arange(len(table)) < len(segments)
    out = paint_regions(rgb, rows, table, tinted, alpha, outline_width, outlined=is_thing)
    if show_names is not False and is_thing.any():
        boxes = region_boxes(rows, len(table))  # (R, 4)
        drawn = np.flatnonzero(is_thing & (boxes[:, 2] >= 0))
        sizes = DrawSizes.for_image(*rgb.shape[:2])
        if show_names or tags_fit(boxes[drawn], sizes):
            names = [str(cats[rank[segments[r]["category_id"]]].get("name", "?")) for r in drawn]
            out = draw_tags(out, boxes[drawn], names, table[drawn], sizes)
    return out


def region_boxes(ids: np.ndarray, count: int) -> np.ndarray:
    """(count, 4) float64 XYXY pixel extents (inclusive) of the ids 0..count-1 of an (H, W) id
    map; -1 rows for ids that do not occur. One sort instead of a mask per region."""
    boxes = np.full((count, 4), -1.0)
    flat = ids.ravel()  # (H*W,)
    order = np.argsort(flat, kind="stable")
    present, starts = np.unique(flat[order], return_index=True)
    ys, xs = np.divmod(order, ids.shape[1])  # pixel coordinates in sorted order
    for k, coords in enumerate((xs, ys)):
        boxes[present, k] = np.minimum.reduceat(coords, starts)
        boxes[present, k + 2] = np.maximum.reduceat(coords, starts)
    return boxes


def _lookup(values: np.ndarray, keys: np.ndarray, default: int) -> np.ndarray:
    """Index of each of `values` in `keys` (unique), `default` where absent; same shape."""
    if len(keys) == 0:
        return np.full(values.shape, default, dtype=np.int64)
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys, values, sorter=order), 0, len(keys) - 1)
    found = keys[order[pos]] == values
    return np.where(found, order[pos], default)


def _panoptic_ids(panoptic: Any) -> np.ndarray:
    """(H, W) int64 segment ids from ids or an (H, W, 3) RGB-coded panoptic PNG array."""
    from pixelwise.data.panoptic import rgb2id

    if hasattr(panoptic, "detach"):
        panoptic = panoptic.detach().cpu().numpy()
    panoptic = np.asarray(panoptic)
    if panoptic.ndim == 3 and panoptic.shape[2] == 3:
        return rgb2id(panoptic.astype(np.uint8))
    return as_label_array(panoptic)


def _hwc(image: Any) -> np.ndarray:
    """An image as a numpy (H, W, C) array, C in {1, 3} (tensors are (C, H, W))."""
    if hasattr(image, "detach"):  # torch tensor (tv_tensors.Image included): (C, H, W)
        tensor = image.detach().cpu()
        if tensor.ndim == 3:
            tensor = tensor.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        array = tensor.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise UserError(
            f"expected an image (H, W), (H, W, C) or a tensor (C, H, W) with C = 1, 3 or 4; "
            f"got shape {tuple(np.shape(image))}"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise UserError(f"expected a numeric image, got dtype {array.dtype}")
    return array[:, :, :3]


def _stride(array: np.ndarray) -> int:
    """Subsampling stride so that a strided view has at most ~`_STRETCH_SAMPLE` pixels."""
    return max(1, int(np.sqrt(array.shape[0] * array.shape[1] / _STRETCH_SAMPLE)))


def _check_same_size(rgb: np.ndarray, labels: np.ndarray, what: str) -> None:
    if labels.shape != rgb.shape[:2]:
        raise UserError(
            f"{what} of size {labels.shape[0]}x{labels.shape[1]} do not match the image "
            f"({rgb.shape[0]}x{rgb.shape[1]})"
        )
