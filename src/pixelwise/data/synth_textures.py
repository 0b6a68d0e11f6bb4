"""Noise, textures and image degradations for the synthetic scenes (numpy + PIL, no torch).

Everything draws from an explicit `numpy.random.Generator`, so a scene is a pure function of its
generator's seed. Images are float32 in [0, 1], shaped (H, W, C) or (H, W).
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], grid: tuple[int, int]
) -> np.ndarray:
    """Value noise: a (gy, gx) grid of N(0, 1) values upsampled bicubically to `shape` (H, W).

    PIL's C resize does the interpolation (float "F" images), which is much faster than numpy.
    Returns float32 (H, W), roughly unit variance.
    """
    gy, gx = max(2, int(grid[0])), max(2, int(grid[1]))
    coarse = rng.standard_normal((gy, gx)).astype(np.float32)
    fine = Image.fromarray(coarse).resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(fine, dtype=np.float32)


def fractal_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    cells: float,
    *,
    octaves: int = 3,
    persistence: float = 0.5,
    aspect: float = 1.0,
) -> np.ndarray:
    """Sum of `octaves` value noises; the first has about `cells` blobs across the longer side.

    `aspect` > 1 stretches the noise horizontally (streaks). Returns float32 (H, W), ~unit range.
    """
    h, w = shape
    longer = max(h, w)
    total = np.zeros(shape, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        n = cells * (2**octave)
        grid = (h / longer * n * aspect**0.5 + 1, w / longer * n / aspect**0.5 + 1)
        total += amplitude * smooth_noise(rng, shape, grid)
        norm += amplitude
        amplitude *= persistence
    return total / norm


def random_colour(
    rng: np.random.Generator,
    saturation: tuple[float, float] = (0.25, 1.0),
    value: tuple[float, float] = (0.25, 1.0),
) -> np.ndarray:
    """A random RGB colour (3,) float32 in [0, 1], any hue."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.asarray(rgb, dtype=np.float32)


def pattern(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random surface pattern for a thing: flat, gradient, stripes or blotches; (H, W) float32.

    Values are small offsets around 0 that get added to the object's colour.
    """
    h, w = shape
    kind = rng.integers(4)
    if kind == 0:  # flat
        return np.zeros(shape, dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = xx * np.cos(angle) + yy * np.sin(angle)  # (H, W) coordinate along a random direction
    if kind == 1:  # linear gradient across the object
        span = max(float(along.max() - along.min()), 1.0)
        return (rng.uniform(0.15, 0.35) * ((along - along.min()) / span - 0.5)).astype(np.float32)
    if kind == 2:  # stripes
        period = rng.uniform(3.0, 10.0)
        return (rng.uniform(0.06, 0.15) * np.sin(2 * np.pi * along / period)).astype(np.float32)
    return (rng.uniform(0.06, 0.15) * smooth_noise(rng, shape, (h / 6 + 2, w / 6 + 2))).astype(
        np.float32
    )


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W) or (H, W, C) float32 with edge replication.

    Hand-written (a few shifted sums) because scipy is not a runtime dependency and PIL's blur
    works on 8-bit images only.
    """
    if sigma < 0.3:
        return image
    radius = int(np.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        size = out.shape[axis]
        acc = np.zeros_like(out)
        for i, k in enumerate(kernel):
            index = [slice(None)] * image.ndim
            index[axis] = slice(i, i + size)
            acc += k * padded[tuple(index)]
        out = acc
    return out


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, a smooth cubic in between (same shape as x)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)
