"""Synthetic datasets for every task, written in the pixelwise layout (no downloads needed).

One seeded generator draws scenes -- textured stuff (sky, ground, water), shapes (ellipse,
rectangle, triangle) with occlusion, stick figures with the 17 COCO keypoints, or, with
`cells=True`, a hundred and more small touching cells -- and every task's ground truth is read
off the same scene:

    DIR/images/{train,val}/NAME.{png,tif}
    DIR/masks/{train,val}/NAME.png + DIR/classes.json       task "semantic"
    DIR/annotations/instances_{train,val}.json              task "instance"
    DIR/annotations/keypoints_{train,val}.json              task "keypoints"
    DIR/annotations/panoptic_{train,val}.json + DIR/panoptic/{train,val}/NAME.png   "panoptic"

Image i is drawn from `numpy.random.default_rng([seed, i])`: the same seed gives the same bytes,
and `num` does not change the earlier images. Image i goes to val when
floor(i f) > floor((i - 1) f), f = val_fraction (so image 0 is val whenever f > 0).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pixelwise import __version__
from pixelwise.data.synth_scene import SCENE_CATEGORIES, Category, Scene, SceneConfig, draw_scene
from pixelwise.data.synth_shapes import COCO_KEYPOINT_NAMES, COCO_SKELETON
from pixelwise.data.synth_writers import TASK_WRITERS, save_image
from pixelwise.errors import UserError, check_positive_int, unknown_name

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_KEYPOINT_NAMES",
    "COCO_SKELETON",
    "IMAGE_FORMATS",
    "SCENE_CATEGORIES",
    "TASK_WRITERS",
    "Category",
    "Scene",
    "SceneConfig",
    "SynthesisSummary",
    "draw_scene",
    "run_synthesis",
    "scene_for",
    "split_of",
    "synthesize",
]

IMAGE_FORMATS: dict[str, str] = {"png": ".png", "tif": ".tif"}
# what `overwrite=True` removes from an existing output directory (nothing else is touched)
LAYOUT_ENTRIES = ("images", "masks", "annotations", "panoptic", "classes.json")
MIN_SIDE, MAX_SIDE = 16, 8192


@dataclass
class SynthesisSummary:
    """What a synthesis wrote: counts per split, class names and the main paths."""

    out: Path
    task: str
    size: tuple[int, int]
    seed: int
    splits: dict[str, dict[str, int]]
    classes: list[str]
    paths: dict[str, str] = field(default_factory=dict)
    scene: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["size"] = list(self.size)
        return d


def split_of(index: int, val_fraction: float) -> str:
    """ "val" or "train" for image `index`; independent of how many images are drawn."""
    if math.floor(index * val_fraction) > math.floor((index - 1) * val_fraction):
        return "val"
    return "train"


def scene_for(
    seed: int,
    index: int,
    size: tuple[int, int],
    *,
    cells: bool = False,
    gray16: bool = False,
    config: SceneConfig | None = None,
) -> Scene:
    """The scene that `synthesize` writes as image `index` for `seed` (any task)."""
    rng = np.random.default_rng([seed, index])
    return draw_scene(rng, size, cells=cells, gray16=gray16, config=config or SceneConfig())


def synthesize(
    task: str,
    out: str | Path,
    *,
    num: int,
    size: tuple[int, int] | int = (256, 256),
    seed: int = 0,
    val_fraction: float = 0.2,
    cells: bool = False,
    gray16: bool = False,
    image_format: str = "png",
    overwrite: bool = False,
    config: SceneConfig | None = None,
) -> Path:
    """Write `num` synthetic scenes of `size` (H, W) for `task` under `out`; return `out`.

    task: "semantic", "instance", "keypoints" or "panoptic" (see the module docstring for files).
    cells: many small touching cells of one class instead of shapes and figures.
    gray16: 16-bit grayscale images instead of 8-bit RGB. image_format: "png" or "tif".
    overwrite: allow a non-empty `out` (the layout's entries in it are replaced).
    config: what the scenes contain (`SceneConfig`; defaults when None).
    """
    return run_synthesis(
        task, out, num=num, size=size, seed=seed, val_fraction=val_fraction, cells=cells,
        gray16=gray16, image_format=image_format, overwrite=overwrite, config=config,
    ).out  # fmt: skip


def run_synthesis(
    task: str,
    out: str | Path,
    *,
    num: int,
    size: tuple[int, int] | int = (256, 256),
    seed: int = 0,
    val_fraction: float = 0.2,
    cells: bool = False,
    gray16: bool = False,
    image_format: str = "png",
    overwrite: bool = False,
    config: SceneConfig | None = None,
) -> SynthesisSummary:
    """`synthesize`, returning a summary of what was written (used by the CLI's `--json`)."""
    size = _check(task, num, size, val_fraction, cells, image_format)
    root = _prepare(Path(out), overwrite)
    config = config or SceneConfig()
    categories = SCENE_CATEGORIES["cells" if cells else "shapes"]
    info = {
        "description": "pixelwise synthetic scenes",
        "version": __version__,
        "task": task,
        "seed": seed,
        "size": list(size),
        "cells": cells,
        "gray16": gray16,
        "scene": asdict(config),
    }
    writer = TASK_WRITERS[task](root, categories, info)
    suffix = IMAGE_FORMATS[image_format]
    start = time.perf_counter()
    for index in range(num):
        scene = scene_for(seed, index, size, cells=cells, gray16=gray16, config=config)
        split = split_of(index, val_fraction)
        name = f"{index:06d}"
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        save_image(folder / f"{name}{suffix}", scene.image, gray16=gray16)
        image = {
            "id": index + 1,
            "file_name": f"{name}{suffix}",
            "height": size[0],
            "width": size[1],
        }
        writer.add(scene, split, name, image)
    splits = writer.finish()
    seconds = time.perf_counter() - start
    summary = SynthesisSummary(
        out=root,
        task=task,
        size=size,
        seed=seed,
        splits=splits,
        classes=_class_names(task, categories),
        paths=_paths(root, task, splits),
        scene=asdict(config),
        seconds=round(seconds, 3),
    )
    logger.debug(
        "wrote %d %s scenes of %dx%d to %s in %.1f s (%s)",
        num, task, size[0], size[1], root, seconds,
        ", ".join(f"{s}: {c['images']}" for s, c in splits.items()),
    )  # fmt: skip
    return summary


def _check(
    task: str,
    num: int,
    size: tuple[int, int] | int,
    val_fraction: float,
    cells: bool,
    image_format: str,
) -> tuple[int, int]:
    if task not in TASK_WRITERS:
        raise unknown_name("task", task, TASK_WRITERS)
    if image_format not in IMAGE_FORMATS:
        raise unknown_name("image format", image_format, IMAGE_FORMATS)
    num = check_positive_int("num", num, numpy_ok=True)
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or not all(MIN_SIDE <= s <= MAX_SIDE for s in size):
        raise UserError(f"size must be (H, W) with sides in [{MIN_SIDE}, {MAX_SIDE}], got {size}")
    if not 0.0 <= val_fraction <= 1.0:
        raise UserError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if cells and task == "keypoints":
        raise UserError("cells scenes have no keypoints; use --task instance, semantic or panoptic")
    return size  # type: ignore[return-value]


def _prepare(root: Path, overwrite: bool) -> Path:
    """Refuse a non-empty `root` unless `overwrite`; then remove only the layout's entries."""
    if root.exists() and not root.is_dir():
        raise UserError(f"output {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {root} is not empty; pass --overwrite to replace it")
        for entry in LAYOUT_ENTRIES:
            path = root / entry
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _class_names(task: str, categories: tuple[Category, ...]) -> list[str]:
    """The classes a task's files name: all (semantic, panoptic), things, or the person."""
    if task == "keypoints":
        return ["person"]
    return [c.name for c in categories if c.isthing or task in ("semantic", "panoptic")]


def _paths(root: Path, task: str, splits: dict) -> dict[str, str]:
    paths = {"images": str(root / "images")}
    if task == "semantic":
        paths.update(masks=str(root / "masks"), classes=str(root / "classes.json"))
    else:
        for split in splits:
            prefix = {"instance": "instances"}.get(task, task)
            paths[f"annotations_{split}"] = str(root / "annotations" / f"{prefix}_{split}.json")
        if task == "panoptic":
            paths["panoptic"] = str(root / "panoptic")
    return paths
