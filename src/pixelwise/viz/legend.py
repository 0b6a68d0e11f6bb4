"""Legends: a colour swatch and a name per class, and placing a legend beside an overlay."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pixelwise.errors import UserError
from pixelwise.viz.instances import default_font

BACKGROUND = (255, 255, 255)
SWATCH_BORDER = (64, 64, 64)  # so that white-ish and black swatches both show their extent
TEXT_COLOR = (0, 0, 0)


def legend_image(
    class_names: Sequence[str] | None,
    palette: Any,
    present: Any = None,
    *,
    font_size: int = 12,
    swatch: int | None = None,
    padding: int = 6,
    max_height: int | None = None,
) -> np.ndarray:
    """A legend (h, w, 3) uint8 on white: one row per class, a swatch of its palette colour
    (with a 1 px grey border) and its name, top to bottom in class order.

    class_names: K names (None: "class i"); palette: (>= K, 3) colours; present: the class
    indices to list (any array of labels works, e.g. the label map itself; values outside
    0..K-1, such as 255, are skipped); None lists all K. swatch: side in px (default
    font_size + 4); rows are `padding` apart. max_height: wrap into columns to fit.
    """
    palette = np.asarray(palette)
    k = len(palette) if class_names is None else len(class_names)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < k:
        raise UserError(f"legend: a palette of shape {palette.shape} cannot colour {k} classes")
    names = [f"class {i}" for i in range(k)] if class_names is None else list(class_names)
    if present is None:
        shown = list(range(k))
    else:
        values = np.unique(_as_array(present))
        shown = [int(v) for v in values if 0 <= v < k]
    swatch = font_size + 4 if swatch is None else swatch
    font = default_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((measure.textbbox((0, 0), names[c], font=font)[2] for c in shown), default=0)
    row = max(swatch, font_size) + padding
    rows = max(1, len(shown))
    if max_height is not None:
        rows = max(1, min(rows, (max_height - padding) // row))
    columns = max(1, math.ceil(len(shown) / rows))
    column_width = swatch + padding + text_width + 2 * padding
    width = padding + columns * column_width
    height = padding + rows * row
    legend = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for n, c in enumerate(shown):
        x = padding + (n // rows) * column_width
        y = padding + (n % rows) * row
        color = tuple(int(v) for v in palette[c])
        draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=color, outline=SWATCH_BORDER)
        text_y = y + swatch / 2
        draw.text((x + swatch + padding, text_y), names[c], fill=TEXT_COLOR, font=font,
                  anchor="lm")
    return np.asarray(legend).copy()


def enlarge_small(rgb: np.ndarray, min_side: int = 256, max_factor: int = 8) -> np.ndarray:
    """`rgb` (H, W, 3) repeated k x k per pixel (nearest, so labels stay crisp) with the smallest
    integer k that brings its shorter side to `min_side` (at most `max_factor`); a 64 x 64
    prediction is unreadable next to its legend otherwise. Large images come back unchanged."""
    shorter = min(rgb.shape[:2])
    factor = min(max_factor, -(-min_side // max(shorter, 1)))
    if factor <= 1:
        return rgb
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)  # (kH, kW, 3)


def with_legend(overlay: np.ndarray, legend: np.ndarray, *, gap: int = 4) -> np.ndarray:
    """The overlay (H, W, 3) with the legend (h, w, 3) to its right, tops aligned, on white:
    (max(H, h), W + gap + w, 3) uint8."""
    for name, array in (("overlay", overlay), ("legend", legend)):
        if array.ndim != 3 or array.shape[2] != 3:
            raise UserError(f"with_legend: the {name} must be (H, W, 3), got {array.shape}")
    height = max(overlay.shape[0], legend.shape[0])
    width = overlay.shape[1] + gap + legend.shape[1]
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    out[: overlay.shape[0], : overlay.shape[1]] = overlay
    out[: legend.shape[0], overlay.shape[1] + gap :] = legend
    return out


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(list(values) if isinstance(values, (set, frozenset)) else values).ravel()
