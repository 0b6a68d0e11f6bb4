"""Drawing one synthetic scene: stuff regions, things with occlusion, stick figures, cells.

A scene is drawn once and every task's ground truth is read off it: the semantic label map, the
visible instance map (z-order resolved: later things cover earlier ones), per-thing polygons and
keypoints. The scene does not depend on the task, so the same (seed, index, size, options) give
the same image whichever task is written.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, fields

import numpy as np

from pixelwise.data import synth_shapes as shapes
from pixelwise.data.synth_textures import (
    fractal_noise,
    gaussian_blur,
    pattern,
    random_colour,
    smooth_noise,
    smoothstep,
)
from pixelwise.errors import UserError, unknown_name

IGNORE = 255


@dataclass(frozen=True)
class Category:
    """One category of the synthetic scenes; `id` is the COCO category id (non-contiguous)."""

    id: int
    name: str
    isthing: bool
    supercategory: str
    color: tuple[int, int, int]


# The one category table. Ids are deliberately non-contiguous (and "person" is 1 as in COCO) so
# that readers must map ids to contiguous labels. Order = semantic class index within a scene kind.
SCENE_CATEGORIES: dict[str, tuple[Category, ...]] = {
    "shapes": (
        Category(21, "sky", False, "stuff", (135, 170, 215)),
        Category(22, "ground", False, "stuff", (125, 105, 75)),
        Category(25, "water", False, "stuff", (40, 80, 160)),
        Category(1, "person", True, "person", (220, 20, 60)),
        Category(3, "ellipse", True, "shape", (250, 170, 30)),
        Category(7, "rectangle", True, "shape", (0, 160, 80)),
        Category(8, "triangle", True, "shape", (160, 60, 200)),
    ),
    "cells": (
        Category(30, "background", False, "stuff", (20, 20, 20)),
        Category(11, "cell", True, "cell", (80, 220, 100)),
    ),
}
SHAPE_KINDS = ("ellipse", "rectangle", "triangle")
THING_COLOURS = ("random", "category")


@dataclass(frozen=True)
class SceneConfig:
    """What a scene may contain; sizes are fractions of the shorter image side.

    empty_fraction: probability of a scene with no things (stuff only; shapes scenes).
    person_fraction: probability that a thing is a stick figure.
    crowd_fraction: probability of one iscrowd group of tiny ellipses in a non-empty scene.
    min_area: visible things smaller than this (px) are not annotated; their pixels become
        ignore (semantic 255) / void (panoptic 0).
    min_visible_fraction: a new thing may not hide more of an earlier thing than this leaves.
    ignore_border: width (px) of a VOC-style ignore band (255) around things in the semantic masks.
    noise, blur: ranges of the per-image Gaussian noise std (in [0, 1] units) and blur sigma (px).
    cell_spacing: range of the cell grid spacing in px (cells scenes; ~20 px gives 100+ cells at
        256 x 256).
    thing_colour: "random" (any hue: only its shape tells a thing's class) or "category" (the
        category's palette colour, jittered in hue, saturation and value, as real classes have
        typical colours; person shirts then take the person colour). Shapes scenes only.
    """

    max_things: int = 6
    empty_fraction: float = 0.1
    person_fraction: float = 0.3
    crowd_fraction: float = 0.1
    thing_size: tuple[float, float] = (0.05, 0.2)
    person_size: tuple[float, float] = (0.4, 0.9)
    min_area: int = 10
    min_visible_fraction: float = 0.35
    ignore_border: int = 0
    noise: tuple[float, float] = (0.005, 0.04)
    blur: tuple[float, float] = (0.0, 1.1)
    cell_spacing: tuple[float, float] = (17.0, 21.0)
    thing_colour: str = "random"

    def __post_init__(self) -> None:
        if self.thing_colour not in THING_COLOURS:
            raise unknown_name("thing_colour", self.thing_colour, THING_COLOURS)
        for name in ("empty_fraction", "person_fraction", "crowd_fraction", "min_visible_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"scene option {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_things", "min_area", "ignore_border"):
            if getattr(self, name) < (1 if name == "min_area" else 0):
                raise UserError(f"scene option {name} is too small: {getattr(self, name)}")
        lowest = {"thing_size": 0.005, "person_size": 0.05, "noise": 0.0, "blur": 0.0,
                  "cell_spacing": 6.0}  # fmt: skip
        for name, low in lowest.items():
            lo, hi = getattr(self, name)
            if not low <= lo <= hi:
                raise UserError(f"scene option {name} must be a range lo <= hi with lo >= {low}")

    @classmethod
    def parse(cls, items: list[str]) -> SceneConfig:
        """Build from "field=value" strings (ranges as "lo,hi"), e.g. ["person_fraction=0.6"]."""
        types = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        values: dict[str, object] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep:
                raise UserError(f"scene option {item!r} must look like field=value")
            if name not in types:
                raise unknown_name("scene option", name, types)
            try:
                if types[name] is tuple:
                    lo, hi = (float(v) for v in text.split(","))
                    values[name] = (lo, hi)
                else:
                    values[name] = types[name](text)
            except ValueError:
                raise UserError(f"scene option {name}: cannot read {text!r}") from None
        return cls(**values)


@dataclass
class SceneObject:
    """One annotated thing.

    polygons: the exact polygons it was rasterised from (None for cells); crowd groups too.
    keypoints: (17, 3) float64 x, y, v (COCO convention, x = y = 0 where v = 0) for persons.
    occluded: whether its visible mask differs from its full (drawn) mask.
    """

    category: str
    polygons: list[shapes.Polygon] | None = None
    iscrowd: bool = False
    keypoints: np.ndarray | None = None
    occluded: bool = False


@dataclass
class Scene:
    """A drawn scene and its ground truth.

    image: float32 in [0, 1], (H, W, 3) for RGB or (H, W) for grayscale.
    semantic: (H, W) uint8 class index into `categories`, 255 = ignore.
    stuff: (H, W) uint8 stuff class index under the things (what each pixel would be without them).
    instances: (H, W) int32, 0 = no thing (stuff or void), k = objects[k - 1] (visible pixels).
    void: (H, W) bool, pixels that belong to no annotated segment (tiny fragments).
    """

    image: np.ndarray
    semantic: np.ndarray
    stuff: np.ndarray
    instances: np.ndarray
    void: np.ndarray
    objects: list[SceneObject]
    categories: tuple[Category, ...]


def draw_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    cells: bool = False,
    gray16: bool = False,
    config: SceneConfig = SceneConfig(),
) -> Scene:
    """Draw one scene of `size` (H, W) from `rng`."""
    if cells:
        return _draw_cells(rng, size, gray16, config)
    return _draw_shapes(rng, size, gray16, config)


# ---------------------------------------------------------------------------- shapes scenes


def _draw_shapes(
    rng: np.random.Generator, size: tuple[int, int], gray16: bool, config: SceneConfig
) -> Scene:
    h, w = size
    categories = SCENE_CATEGORIES["shapes"]
    index = {c.name: i for i, c in enumerate(categories)}
    stuff, image = _stuff(rng, size, index)
    canvas = _Canvas(image, np.zeros(size, dtype=np.int32), config)

    n_things = (
        0 if rng.random() < config.empty_fraction else int(rng.integers(1, config.max_things + 1))
    )
    side = min(h, w)
    for _ in range(n_things):
        if rng.random() < config.person_fraction:
            canvas.place(lambda: _person(rng, size, side, config), rng)
        else:
            kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
            canvas.place(lambda kind=kind: _shape(rng, kind, size, side, config), rng)
    if n_things and rng.random() < config.crowd_fraction:
        canvas.place(lambda: _crowd(rng, size, side, config), rng)

    image = gaussian_blur(canvas.image, rng.uniform(*config.blur))
    if gray16:
        lum = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W, 3) -> (H, W)
        image = rng.uniform(0.005, 0.04) + lum * rng.uniform(0.25, 0.9)
        image = image + rng.uniform(0.002, 0.01) * rng.standard_normal(image.shape, np.float32)
    else:
        image = image + rng.uniform(*config.noise) * rng.standard_normal(image.shape, np.float32)
    return _finish(np.clip(image, 0, 1).astype(np.float32), stuff, canvas, categories, config)


def _stuff(
    rng: np.random.Generator, size: tuple[int, int], index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Sky above a wavy horizon, ground below, sometimes a water blob on the ground.

    Returns the stuff class map (H, W) uint8 and the textured RGB image (H, W, 3) float32.
    """
    h, w = size
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5  # (H, 1)
    horizon = h * rng.uniform(-0.15, 0.65) + 0.07 * h * smooth_noise(rng, (1, w), (2, 5))  # (1, W)
    stuff = np.where(yy < horizon, index["sky"], index["ground"]).astype(np.uint8)  # (H, W)
    below = stuff == index["ground"]
    if rng.random() < 0.65 and below.sum() > 16:
        field_ = fractal_noise(rng, size, 2.5, octaves=2) + 0.8 * (yy / h)
        threshold = np.quantile(field_[below], 1 - rng.uniform(0.15, 0.5))
        stuff[below & (field_ > threshold)] = index["water"]

    def tinted(base: tuple[float, float, float], jitter: float) -> np.ndarray:
        colour = np.clip(np.asarray(base) + rng.normal(0, jitter, 3), 0.05, 0.95)
        return colour.astype(np.float32)

    sky_rgb = tinted((0.53, 0.67, 0.84), 0.06)
    clouds = 0.35 * smoothstep((fractal_noise(rng, size, 3.0) - 0.2) / 0.8)
    brighten = 0.12 * np.clip(yy / max(float(horizon.max()), 1.0), 0, 1).astype(
        np.float32
    )  # lighter near horizon
    sky = sky_rgb * (1 + brighten)[..., None] + (clouds[..., None] * (1 - sky_rgb))

    ground_rgb = tinted((0.49, 0.41, 0.29) if rng.random() < 0.6 else (0.36, 0.46, 0.26), 0.07)
    grain = 0.12 * fractal_noise(rng, size, 12.0) + 0.07 * rng.standard_normal(size, np.float32)
    ground = ground_rgb * (1 + grain)[..., None]

    water_rgb = tinted((0.25, 0.38, 0.6), 0.06)
    streaks = 0.12 * fractal_noise(rng, size, 5.0, octaves=2, aspect=20.0)
    water = water_rgb * (1 + streaks)[..., None]

    image = ground
    for name, texture in (("sky", sky), ("water", water)):
        where = stuff == index[name]
        image[where] = texture[where]
    return stuff, np.clip(image, 0, 1, out=image)


@dataclass
class _Drawn:
    """A candidate thing: its object record, full mask and how to paint it."""

    obj: SceneObject
    mask: np.ndarray  # (H, W) bool
    layers: list[tuple[np.ndarray, np.ndarray]]  # (mask (H, W) bool, colour (3,)) painted in order
    dots: np.ndarray | None = None  # (D, 2) xy of dark dots (eyes)


class _Canvas:
    """The image being painted and the visible-instance map, with the occlusion rule."""

    def __init__(self, image: np.ndarray, instances: np.ndarray, config: SceneConfig) -> None:
        self.image = image
        self.instances = instances
        self.config = config
        self.objects: list[SceneObject] = []
        self.full_area: list[int] = []

    def place(self, make, rng: np.random.Generator, tries: int = 5) -> bool:
        """Draw candidates from `make()` until one fits the occlusion rule; paint it."""
        for _ in range(tries):
            drawn: _Drawn = make()
            area = int(drawn.mask.sum())
            if area < 2 * self.config.min_area:
                continue
            # visible pixels each earlier thing would lose under the new one
            covered = np.bincount(self.instances[drawn.mask], minlength=len(self.objects) + 1)[1:]
            visible = np.bincount(self.instances.ravel(), minlength=len(self.objects) + 1)[1:]
            if np.any(
                visible - covered < self.config.min_visible_fraction * np.asarray(self.full_area)
            ):
                continue
            self.objects.append(drawn.obj)
            self.full_area.append(area)
            self.instances[drawn.mask] = len(self.objects)
            self._paint(drawn, rng)
            return True
        return False

    def _paint(self, drawn: _Drawn, rng: np.random.Generator) -> None:
        ys, xs = np.nonzero(drawn.mask.any(axis=1))[0], np.nonzero(drawn.mask.any(axis=0))[0]
        window = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        shape = (ys[-1] + 1 - ys[0], xs[-1] + 1 - xs[0])
        region = self.image[window]
        for mask, colour in drawn.layers:
            texture = colour * (1 + pattern(rng, shape))[..., None]  # (h, w, 3)
            texture += 0.03 * rng.standard_normal((*shape, 1), np.float32)
            m = mask[window]
            region[m] = np.clip(texture[m], 0, 1)
        if drawn.dots is not None:
            h, w = self.instances.shape
            for x, y in drawn.dots:
                if 0 <= x < w and 0 <= y < h:
                    self.image[int(y), int(x)] = 0.05


def _shape(
    rng: np.random.Generator, kind: str, size: tuple[int, int], side: int, config: SceneConfig
) -> _Drawn:
    h, w = size
    center = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    s = side * rng.uniform(*config.thing_size)
    if kind == "ellipse":
        polygon = shapes.ellipse(center, (s, s * rng.uniform(0.5, 1.0)), rng.uniform(0, np.pi))
    elif kind == "rectangle":
        polygon = shapes.rectangle(center, (s, s * rng.uniform(0.4, 1.0)), rng.uniform(0, np.pi))
    else:
        polygon = shapes.triangle(rng, center, s * 1.2)
    mask = shapes.rasterize([polygon], h, w)
    return _Drawn(SceneObject(kind, [polygon]), mask, [(mask, _thing_colour(rng, kind, config))])


def _thing_colour(rng: np.random.Generator, category: str, config: SceneConfig) -> np.ndarray:
    """The colour (3,) of a thing of `category` under `config.thing_colour`."""
    if config.thing_colour == "random":
        return random_colour(rng)
    base = next(c.color for c in SCENE_CATEGORIES["shapes"] if c.name == category)
    hue, sat, val = colorsys.rgb_to_hsv(*(np.asarray(base) / 255.0))
    rgb = colorsys.hsv_to_rgb((hue + rng.uniform(-0.03, 0.03)) % 1.0,
                              float(np.clip(sat * rng.uniform(0.75, 1.1), 0.2, 1.0)),
                              float(np.clip(val * rng.uniform(0.7, 1.1), 0.2, 1.0)))
    return np.asarray(rgb, dtype=np.float32)


def _crowd(rng: np.random.Generator, size: tuple[int, int], side: int, config: SceneConfig
           ) -> _Drawn:
    """A cluster of 4-10 tiny ellipses annotated as one iscrowd=1 region."""
    h, w = size
    center = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    spread = side * rng.uniform(0.05, 0.1)
    polygons = [
        shapes.ellipse(
            center + rng.normal(0, spread, 2), (r, r * rng.uniform(0.6, 1)), rng.uniform(0, 3)
        )
        for r in rng.uniform(1.5, 3.0, int(rng.integers(4, 11)))
    ]
    mask = shapes.rasterize(polygons, h, w)
    return _Drawn(
        SceneObject("ellipse", polygons, iscrowd=True), mask,
        [(mask, _thing_colour(rng, "ellipse", config))],
    )


def _person(
    rng: np.random.Generator, size: tuple[int, int], side: int, config: SceneConfig
) -> _Drawn:
    h, w = size
    height = side * rng.uniform(*config.person_size)
    lo, hi = 0.35 * height, h - 0.2 * height
    hip = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(lo, max(lo, hi))])
    figure = shapes.stick_figure(rng, hip, height)
    colours = {
        "trousers": random_colour(rng, value=(0.15, 0.7)),
        "shirt": _thing_colour(rng, "person", config),
        "skin": np.asarray(
            colorsys.hsv_to_rgb(
                rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.4, 0.95)
            ),
            dtype=np.float32,
        ),
    }
    layers = [
        (shapes.rasterize(figure.parts[p], h, w), colours[p]) for p in ("trousers", "shirt", "skin")
    ]
    mask = layers[0][0] | layers[1][0] | layers[2][0]
    polygons = [poly for p in ("trousers", "shirt", "skin") for poly in figure.parts[p]]
    keypoints = np.concatenate([figure.keypoints, np.zeros((17, 1))], axis=1)  # (17, 2) -> (17, 3)
    dots = figure.eyes if figure.head_radius >= 3.5 else None
    return _Drawn(SceneObject("person", polygons, keypoints=keypoints), mask, layers, dots)


# ---------------------------------------------------------------------------- cells scenes


def _draw_cells(
    rng: np.random.Generator, size: tuple[int, int], gray16: bool, config: SceneConfig
) -> Scene:
    """Many small touching cells on a dark background (fluorescence-microscopy look)."""
    spacing = rng.uniform(*config.cell_spacing)
    layout = shapes.cell_layout(rng, size, spacing)
    inside = layout.labels > 0
    background = rng.uniform(0.03, 0.1) + 0.02 * fractal_noise(rng, size, 3.0)
    brightness = rng.uniform(0.3, 0.95, layout.count + 1).astype(np.float32)[
        layout.labels
    ]  # (H, W)
    depth, gap = layout.depth, layout.gap
    cell = brightness * (0.7 + 0.3 * (1 - depth**2)) + 0.3 * brightness * np.exp(
        -((depth / 0.35) ** 2)
    )
    cell = cell * (1 + 0.1 * fractal_noise(rng, size, max(size) / spacing * 2, octaves=2))
    cell = cell * (0.5 + 0.5 * smoothstep(gap / 0.3))  # dim membranes between touching cells
    rim = smoothstep((1 - depth) / 0.15)
    intensity = np.where(inside, background + (cell - background) * (0.45 + 0.55 * rim), background)
    intensity = gaussian_blur(intensity.astype(np.float32), rng.uniform(0.4, 1.0))
    if gray16:
        image = rng.uniform(0.005, 0.04) + intensity * rng.uniform(0.25, 0.9)
    else:
        tint = np.asarray(
            [(0.3, 1.0, 0.35), (1.0, 0.35, 0.3), (0.3, 0.8, 1.0)][rng.integers(3)], np.float32
        )
        image = intensity[..., None] * tint  # (H, W) -> (H, W, 3)
    noise_std = 0.005 + 0.03 * np.sqrt(np.clip(image, 0, 1))  # shot-noise-like
    image = image + noise_std * rng.standard_normal(image.shape, np.float32)

    categories = SCENE_CATEGORIES["cells"]
    canvas = _Canvas(np.zeros(0), layout.labels.astype(np.int32), config)
    canvas.objects = [SceneObject("cell") for _ in range(layout.count)]
    stuff = np.zeros(size, dtype=np.uint8)
    return _finish(np.clip(image, 0, 1).astype(np.float32), stuff, canvas, categories, config)


# ---------------------------------------------------------------------------- ground truth


def _finish(
    image: np.ndarray,
    stuff: np.ndarray,
    canvas: _Canvas,
    categories: tuple[Category, ...],
    config: SceneConfig,
) -> Scene:
    """Drop things too small to annotate (-> void), renumber, derive semantic map and keypoints."""
    instances = canvas.instances
    n = len(canvas.objects)
    areas = np.bincount(instances.ravel(), minlength=n + 1)
    keep = areas >= config.min_area
    keep[0] = True
    void = ~keep[instances]  # (H, W) pixels of dropped things
    new_id = np.cumsum(keep) - 1  # old id -> new id (0 stays 0)
    instances = np.where(void, 0, new_id[instances]).astype(np.int32)
    objects = [obj for obj, k in zip(canvas.objects, keep[1:], strict=True) if k]
    full_area = [a for a, k in zip(canvas.full_area, keep[1:], strict=False) if k]

    index = {c.name: i for i, c in enumerate(categories)}
    thing_class = np.array([0] + [index[o.category] for o in objects], dtype=np.uint8)
    semantic = np.where(instances > 0, thing_class[instances], stuff).astype(np.uint8)
    semantic[void] = IGNORE
    if config.ignore_border > 0:
        semantic[_borders(instances, config.ignore_border)] = IGNORE

    visible = np.bincount(instances.ravel(), minlength=len(objects) + 1)
    h, w = instances.shape
    for k, obj in enumerate(objects, start=1):
        if full_area:  # shapes scenes know each thing's drawn area
            obj.occluded = bool(visible[k] != full_area[k - 1])
        if obj.keypoints is not None:
            _visibility(obj.keypoints, instances, k, h, w)
    return Scene(image, semantic, stuff, instances, void, objects, categories)


def _visibility(keypoints: np.ndarray, instances: np.ndarray, k: int, h: int, w: int) -> None:
    """Set v in place: 2 visible, 1 inside the image but covered by a later thing, 0 outside."""
    keypoints[:, :2] = np.round(keypoints[:, :2], 2)  # the values the JSON holds
    x, y = keypoints[:, 0], keypoints[:, 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    col = np.clip(np.floor(x).astype(int), 0, w - 1)
    row = np.clip(np.floor(y).astype(int), 0, h - 1)
    keypoints[:, 2] = np.where(inside, np.where(instances[row, col] == k, 2, 1), 0)
    keypoints[:, :2] = np.where(inside[:, None], keypoints[:, :2], 0.0)


def _borders(instances: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within `width` px (chessboard) of a boundary that touches a thing."""
    edge = np.zeros(instances.shape, dtype=bool)
    a, b = instances[:, 1:], instances[:, :-1]
    diff = (a != b) & ((a > 0) | (b > 0))
    edge[:, 1:] |= diff
    edge[:, :-1] |= diff
    a, b = instances[1:], instances[:-1]
    diff = (a != b) & ((a > 0) | (b > 0))
    edge[1:] |= diff
    edge[:-1] |= diff
    for _ in range(width - 1):  # grow by one pixel in 8 directions
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        edge = grown
    return edge
