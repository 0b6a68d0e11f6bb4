"""Prediction with a trained run: files in, label maps and overlays out.

* `PREDICTORS`: task name (as stored in the checkpoint's `meta["task"]["name"]`) -> predictor
  class; `make_predictor(model, meta, **options)` picks one. A predictor has
  `predict(images, names) -> list of results`, `outputs(out, name) -> {kind: Path}` and
  `write(out, name, image, result) -> summary row` (see `SemanticPredictor`). The instance and
  panoptic tasks add their own class here.
* `expand_inputs(paths)`: files and folders (their image files, not recursive) -> files.
* `check_outputs(...)`: refuses a non-empty output folder without `overwrite`, two inputs that
  would write the same output, and outputs that would replace an input.
* `predict_files(predictor, files, out)`: the loop of `pixelwise predict`; an unreadable image is
  reported (logged and returned), the others are still predicted.
* `predict_tiled` (tiling.py): tiled inference equal to one pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pixelwise.errors import UserError, unknown_name
from pixelwise.predict.instance import InstancePredictor
from pixelwise.predict.panoptic import PanopticPredictor
from pixelwise.predict.semantic import SemanticPredictor
from pixelwise.predict.tiling import PAD_MODES, min_overlap, output_stride, predict_tiled
from pixelwise.predict.tta import TTA, AugmentedModel

logger = logging.getLogger(__name__)

PREDICTORS: dict[str, type] = {"semantic": SemanticPredictor, "panoptic": PanopticPredictor,
                               "instance": InstancePredictor, "keypoints": InstancePredictor}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def make_predictor(model: Any, meta: dict[str, Any], **options: Any) -> Any:
    """The predictor of the checkpoint's task (`meta["task"]["name"]`) for `model`."""
    name = (meta.get("task") or {}).get("name")
    if name not in PREDICTORS:
        raise unknown_name("task to predict (no predictor for it)", name, PREDICTORS)
    return PREDICTORS[name](model, meta, **options)


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (even missing ones: they are reported when read) and the image files
    (`IMAGE_SUFFIXES`, any case, not hidden) of folders, sorted by name; duplicates dropped."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this "
                                "folder")
            files.extend(found)
        else:
            files.append(path)
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def check_outputs(files: Sequence[Path], out: Path, outputs: Callable[[Path, str], dict[str, Path]],
                  *, overwrite: bool = False) -> None:
    """Refuse, before any work: `out` being a file, or an existing non-empty folder without
    `overwrite`; two inputs with the same output name; an output that is one of the inputs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: folder exists and is not empty; pass --overwrite to write into "
                        "it (files of the same names are replaced)")
    inputs = {p.resolve() for p in files}
    claimed: dict[Path, Path] = {}
    for path in files:
        for target in outputs(out, path.name).values():
            key = target.resolve()
            if key in inputs:
                raise UserError(f"{path}: its output {target} would replace an input image; "
                                "choose another --out")
            if key in claimed:
                raise UserError(f"{claimed[key]} and {path} would both write {target}; "
                                "predict them into different --out folders")
            claimed[key] = path


# what running out of memory raises: CUDA's OutOfMemoryError (a RuntimeError), the CPU
# allocator's RuntimeError, or Python's MemoryError
_OUT_OF_MEMORY = (MemoryError, RuntimeError)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text


def predict_files(
    predictor: Any,
    files: Sequence[Path],
    out: Path,
    *,
    max_pixels: int | None = None,
    on_error: Callable[[Path, str], None] | None = None,
) -> dict[str, Any]:
    """Predict every file and write its outputs under `out`.

    An image that cannot be read or used (`UserError`, e.g. corrupt, truncated, too big, wrong
    channel count) is passed to `on_error(path, message)` and skipped. Returns
    `{"out", "count", "images": [row per image], "failed": [{"image", "error"}]}`.
    max_pixels: refuse images with more pixels (default `read_image`'s limit; 0 or None: none).
    """
    from pixelwise.data.images import DEFAULT_MAX_PIXELS, read_image

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []

    def fail(path: Path, exc: Exception) -> None:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if str(path) not in message:
            message = f"{path}: {message}"
        failed.append({"image": str(path), "error": message})
        if on_error is not None:
            on_error(path, message)
        logger.debug("skipped %s: %s", path, message)

    chunk = max(1, getattr(predictor, "batch_size", 1) if getattr(predictor, "tile", None) is None
                else 1)
    for first in range(0, len(files), chunk):
        loaded: list[tuple[Path, Any]] = []
        for path in files[first:first + chunk]:
            try:
                loaded.append((path, read_image(path, max_pixels=limit)))
            except (UserError, OSError) as exc:
                fail(path, exc)
        if not loaded:
            continue
        try:
            results = predictor.predict([img for _, img in loaded], [str(p) for p, _ in loaded])
            done = list(zip(loaded, results))
        except (UserError, *_OUT_OF_MEMORY):
            done = []  # find the image at fault: one by one
            for path, img in loaded:
                try:
                    done.append(((path, img), predictor.predict([img], [str(path)])[0]))
                except UserError as exc:
                    fail(path, exc)
                except _OUT_OF_MEMORY as exc:
                    if not _is_out_of_memory(exc):
                        raise
                    fail(path, UserError(f"{path}: out of memory for a {img.shape[-2]}x"
                                         f"{img.shape[-1]} image; predict it with --tile SIZE"))
        for (path, img), result in done:
            row = {"image": str(path), **predictor.write(out, path.name, img, result)}
            rows.append(row)
            logger.debug("%s -> %s", path, row)
    return {"out": str(out), "count": len(rows), "images": rows, "failed": failed}


__all__ = ["IMAGE_SUFFIXES", "PAD_MODES", "PREDICTORS", "TTA", "AugmentedModel",
           "SemanticPredictor", "check_outputs", "expand_inputs", "make_predictor", "min_overlap",
           "output_stride", "predict_files", "predict_tiled"]
