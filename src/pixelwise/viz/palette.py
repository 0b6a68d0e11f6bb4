"""Colours for classes and instances, colour label maps, and PNG writing.

- `make_palette(n)`: (n, 3) uint8 class colours. The first 21 are the PASCAL VOC palette (the
  standard bit-interleaving construction, `voc_palette`), so VOC-style data looks as users know
  it; beyond 21 the colours are picked greedily to be as far as possible (in CIELAB) from every
  colour already chosen, from the VOC ones, from `IGNORE_COLOR` and from white.
- `instance_colors(n)`: (n, 3) uint8 bright colours whose hues step by the golden ratio, so
  neighbouring instance indices always differ strongly.
- `colorize_labels(labels, palette)`: (H, W) class indices -> (H, W, 3) RGB; the ignore index is
  drawn in `IGNORE_COLOR`, PASCAL VOC's own colour for its 255 "void" label (224, 224, 192) --
  a pale neutral that none of the class colours uses (black is VOC's background class, and
  (128, 128, 128) is its class 7, so neither can mean "ignore").
- `save_label_png(path, labels, palette)`: a palette ("P" mode) PNG whose pixel values are the
  class indices (what `pixelwise.data.images.read_label_png` reads back) while viewers show the
  palette colours; index 255 shows as `IGNORE_COLOR`. `save_png` writes an RGB array. Both write
  atomically (temporary file in the same directory, then `os.replace`).
"""

from __future__ import annotations

import colorsys
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixelwise.atomic import atomic_path
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_COLOR: tuple[int, int, int] = (224, 224, 192)  # PASCAL VOC's colour of its 255 label
VOC_CLASSES = 21  # the VOC palette colours used as they are

# A palette extension is drawn from this RGB grid (16 levels per channel), keeping colours that
# are neither near-black nor near-white (CIELAB lightness in this range).
_GRID_LEVELS = np.arange(0, 256, 17)
_LIGHTNESS_RANGE = (20.0, 90.0)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette: (n, 3) uint8, n <= 256.

    Colour i spreads the bits of i over the channels, most significant colour bit first:
    bit 3k of i -> bit 7-k of red, bit 3k+1 -> green, bit 3k+2 -> blue.
    """
    if not 0 <= n <= 256:
        raise UserError(f"the VOC palette has 256 colours, asked for {n}")
    index = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.int64)
    for k in range(8):
        for channel in range(3):
            bit = (index >> (3 * k + channel)) & 1
            palette[:, channel] |= bit << (7 - k)
    return palette.astype(np.uint8)


def make_palette(n: int) -> np.ndarray:
    """Class colours: (n, 3) uint8; VOC's for the first 21, well-separated colours beyond."""
    if n < 0:
        raise UserError(f"number of colours must be >= 0, got {n}")
    most = VOC_CLASSES + len(_candidates()[0])
    if n > most:
        raise UserError(f"at most {most} distinct class colours, asked for {n}")
    voc = voc_palette(min(n, VOC_CLASSES))
    return np.concatenate([voc, _extension_colors(max(0, n - VOC_CLASSES))]).astype(np.uint8)


def class_palette(n: int, colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(n, 3) uint8: the dataset's own class `colors` (classes.json "colors") when given, else
    `make_palette(n)`."""
    if colors is None:
        return make_palette(n)
    palette = np.asarray(colors, dtype=np.int64)
    if palette.shape != (n, 3) or palette.min() < 0 or palette.max() > 255:
        raise UserError(f"expected {n} class colours (r, g, b) in 0..255, got {palette.shape}")
    return palette.astype(np.uint8)


def instance_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 instance colours: hue steps by the golden ratio, bright and saturated."""
    golden = (5**0.5 - 1) / 2  # 0.618...: consecutive hues never land close to each other
    values = (0.95, 0.78, 0.88)
    colors = [
        colorsys.hsv_to_rgb((0.07 + i * golden) % 1.0, 0.8, values[i % len(values)])
        for i in range(n)
    ]
    return np.round(np.asarray(colors, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def colorize_labels(labels: Any, palette: np.ndarray | None = None, ignore_index: int = 255
                    ) -> np.ndarray:
    """(H, W) integer class indices -> (H, W, 3) uint8 colours; `ignore_index` -> `IGNORE_COLOR`.

    palette: (K, 3) uint8 (default `make_palette(max label + 1)`); a label outside 0..K-1 that is
    not the ignore index is a `UserError`.
    """
    labels = as_label_array(labels)
    valid = labels != ignore_index
    palette = palette_for(labels[valid], palette)
    out = np.empty(labels.shape + (3,), dtype=np.uint8)  # (H, W, 3)
    out[valid] = palette[labels[valid]]
    out[~valid] = IGNORE_COLOR
    return out


def save_label_png(path: str | Path, labels: Any, palette: np.ndarray | None = None,
                   ignore_index: int = 255) -> None:
    """Write (H, W) class indices 0..255 as a palette PNG (pixel value = class index).

    palette: (K, 3) uint8 colours of the indices 0..K-1, K <= 256 (default `make_palette`);
    the ignore index shows as `IGNORE_COLOR`, unused entries as black.
    """
    labels = as_label_array(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise UserError(
            f"{path}: a palette PNG holds class indices 0..255, got {labels.min()}..{labels.max()}"
        )
    palette = palette_for(labels[labels != ignore_index], palette)
    if len(palette) > 256:
        raise UserError(f"{path}: a palette PNG has 256 colours, got a palette of {len(palette)}")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    if 0 <= ignore_index <= 255:
        table[ignore_index] = IGNORE_COLOR
    image = Image.fromarray(labels.astype(np.uint8))  # mode "L" ...
    image.putpalette(table.reshape(-1).tolist())  # ... becomes "P"; (256, 3) -> (768,)
    atomic_save(image, path)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as an RGB PNG, atomically."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UserError(f"{path}: expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    atomic_save(Image.fromarray(rgb), path)


def atomic_save(image: Image.Image, path: str | Path, **options: Any) -> None:
    """Save a PIL image as PNG via a temporary file in the same directory and `os.replace`."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", **options)


def as_label_array(labels: Any) -> np.ndarray:
    """An (H, W) integer array (numpy or torch) as a numpy int64 array."""
    if hasattr(labels, "detach"):  # a torch tensor (tv_tensors.Mask included)
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise UserError(f"expected an (H, W) label map, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise UserError(f"expected integer class indices, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def palette_for(used: np.ndarray, palette: np.ndarray | None) -> np.ndarray:
    """`palette` as (K, 3) uint8 (default: `make_palette(max(used) + 1)`), checked to cover
    every value of `used` (the non-ignore labels)."""
    top = int(used.max()) if used.size else -1
    if palette is None:
        return make_palette(top + 1)
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise UserError(f"a palette is (K, 3) RGB colours, got shape {palette.shape}")
    if used.size and (used.min() < 0 or top >= len(palette)):
        bad = int(used.min()) if used.min() < 0 else top
        raise UserError(f"label {bad} has no colour: the palette has {len(palette)} colours")
    return palette.astype(np.uint8)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> (..., 3) CIELAB (D65). Hand-written: ten lines of standard
    formulas, not worth a colour-science dependency."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])  # fmt: skip
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])  # (..., 3), white-normalised
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


@functools.lru_cache(maxsize=1)
def _candidates() -> tuple[np.ndarray, np.ndarray]:
    """The RGB grid colours (M, 3) a palette extension draws from, and their CIELAB (M, 3)."""
    grid = np.stack(np.meshgrid(_GRID_LEVELS, _GRID_LEVELS, _GRID_LEVELS, indexing="ij"), -1)
    grid = grid.reshape(-1, 3)  # (16, 16, 16, 3) -> (4096, 3)
    lab = srgb_to_lab(grid)
    keep = (lab[:, 0] >= _LIGHTNESS_RANGE[0]) & (lab[:, 0] <= _LIGHTNESS_RANGE[1])
    return grid[keep], lab[keep]


@functools.lru_cache(maxsize=8)
def _extension_colors(count: int) -> np.ndarray:
    """(count, 3) uint8 colours after VOC's 21: greedy farthest-point sampling in CIELAB over
    `_candidates()`, starting from VOC's 21, `IGNORE_COLOR` and white. Deterministic (ties go
    to the first grid colour), and a longer extension starts with the shorter one."""
    grid, lab = _candidates()
    taken = np.concatenate([voc_palette(VOC_CLASSES), [IGNORE_COLOR, (255, 255, 255)]])
    dist = np.full(len(grid), np.inf)  # (M,) distance to the nearest colour taken
    for lab_taken in srgb_to_lab(taken):
        dist = np.minimum(dist, np.linalg.norm(lab - lab_taken, axis=1))
    chosen = np.empty((count, 3), dtype=np.uint8)
    for k in range(count):
        i = int(np.argmax(dist))
        chosen[k] = grid[i]
        dist = np.minimum(dist, np.linalg.norm(lab - lab[i], axis=1))
    return chosen
