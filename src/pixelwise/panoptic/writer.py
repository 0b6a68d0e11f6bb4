"""Writing panoptic predictions in the COCO panoptic format.

``OUT/panoptic.json``::

    {"images": [{"id", "file_name", "height", "width"}],
     "annotations": [{"image_id", "file_name": "NAME.png",
                      "segments_info": [{"id", "category_id", "area", "bbox": [x, y, w, h],
                                         "iscrowd": 0}]}],
     "categories": <the ground truth's categories, copied>}

and ``OUT/panoptic/NAME.png``: RGB, segment id = R + 256 G + 256^2 B, 0 = void. This is what
``pixelwise metrics panoptic --pred-json OUT/panoptic.json --pred-dir OUT/panoptic`` (and
panopticapi's ``pq_compute``) reads.

Every image is checked before anything of it is written (`check_prediction`): ids must be
integers in [0, 2^24); every id in the map must be listed in ``segments_info`` and every listed
id must occur in the map; category ids must be the ground truth's; the map must have the image's
size. Each problem is one `UserError` line naming the image. Segments cannot overlap: a segment
is the set of pixels holding its id (`ids_from_masks` refuses overlapping masks). ``area`` and
``bbox`` are computed from the id map, never taken from the caller. Each PNG is written to a
temporary file and renamed; the json is written last, the same way, so an interrupted or refused
run leaves no panoptic.json that names a missing or half-written PNG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixelwise.atomic import write_json
from pixelwise.data.layout import safe_join
from pixelwise.data.panoptic import id2rgb
from pixelwise.data.synth_writers import segment_stats
from pixelwise.errors import UserError
from pixelwise.viz.palette import atomic_save

logger = logging.getLogger(__name__)

MAX_ID = 256**3  # ids are R + 256 G + 256^2 B < 2^24


def _as_numpy(ids: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy()
    return np.asarray(ids)


def ids_from_masks(masks: np.ndarray | torch.Tensor, segment_ids: Sequence[int], *,
                   image: object = "image") -> np.ndarray:
    """(S, H, W) boolean segment masks + their S ids -> the (H, W) int64 id map (0 = void).

    Raises a `UserError` naming `image` when two masks share a pixel: a panoptic segmentation
    gives each pixel at most one segment.
    """
    m = _as_numpy(masks).astype(bool)
    if m.ndim != 3 or m.shape[0] != len(segment_ids):
        raise UserError(f"image {image}: expected ({len(segment_ids)}, H, W) masks, got "
                        f"{m.shape}")
    per_pixel = m.sum(axis=0)  # (H, W) how many segments claim each pixel
    if (per_pixel > 1).any():
        y, x = np.argwhere(per_pixel > 1)[0]
        claim = [int(segment_ids[k]) for k in np.flatnonzero(m[:, y, x])]
        raise UserError(f"image {image}: segments {claim} overlap ({int((per_pixel > 1).sum())} "
                        f"pixels, e.g. x={x}, y={y}); panoptic segments must not overlap")
    ids = np.zeros(m.shape[1:], dtype=np.int64)
    for k, seg_id in enumerate(segment_ids):
        ids[m[k]] = int(seg_id)
    return ids


def check_prediction(
    ids: np.ndarray | torch.Tensor,
    segments: Sequence[Mapping[str, Any]],
    category_ids: set[int] | frozenset[int],
    *,
    image: object = "image",
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Check one image's prediction; return its (H, W) int64 id map and ``segments_info``.

    Args:
        ids: (H, W) integer segment ids, 0 = void.
        segments: per segment at least ``id`` and ``category_id`` (other keys are ignored).
        category_ids: the ground truth's category ids.
        image: names the image in error messages.
        size: the image's (H, W), when known: the id map must have it.
    Returns:
        ids as int64, and ``[{"id", "category_id", "area", "bbox": [x, y, w, h], "iscrowd": 0}]``
        in the order of `segments`, areas and boxes counted in `ids`.
    """
    where = f"image {image}"
    array = _as_numpy(ids)
    if array.ndim != 2:
        raise UserError(f"{where}: the panoptic id map must be (H, W), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise UserError(f"{where}: panoptic ids must be integers, got {array.dtype}")
    array = array.astype(np.int64)
    if size is not None and tuple(array.shape) != tuple(size):
        raise UserError(f"{where}: the panoptic map is {array.shape[0]}x{array.shape[1]} but the "
                        f"image is {size[0]}x{size[1]} (height x width)")
    if array.size and (array.min() < 0 or array.max() >= MAX_ID):
        raise UserError(f"{where}: panoptic ids must be in [0, 2^24), got "
                        f"{int(array.min())}..{int(array.max())}")
    listed: list[int] = []
    for j, seg in enumerate(segments):
        seg_id, cat = seg.get("id"), seg.get("category_id")
        if isinstance(seg_id, bool) or not isinstance(seg_id, (int, np.integer)) or seg_id <= 0:
            raise UserError(f"{where}: segments_info[{j}] needs a positive integer 'id', got "
                            f"{seg_id!r}")
        if int(seg_id) in listed:
            raise UserError(f"{where}: duplicate segment id {seg_id} in segments_info")
        if cat not in category_ids:
            raise UserError(f"{where}: segment {seg_id} has category_id {cat!r}, unknown to the "
                            f"ground-truth categories {sorted(category_ids)}")
        listed.append(int(seg_id))
    stats = segment_stats(array) if array.size else {}  # id -> (area, [x, y, w, h])
    in_map = set(stats) - {0}
    unlisted, absent = sorted(in_map - set(listed)), sorted(set(listed) - in_map)
    if unlisted:
        raise UserError(f"{where}: ids {unlisted[:5]} are in the panoptic map but not in "
                        "segments_info")
    if absent:
        raise UserError(f"{where}: segments_info ids {absent[:5]} do not occur in the panoptic map")
    info = [
        {"id": seg_id, "category_id": int(seg["category_id"]), "area": stats[seg_id][0],
         "bbox": stats[seg_id][1], "iscrowd": 0}
        for seg_id, seg in zip(listed, segments, strict=True)
    ]
    return array, info


class PanopticPredictionWriter:
    """Collects panoptic predictions and writes them as COCO panoptic files under `out`.

    Args:
        out: output folder; ``out/panoptic.json`` and ``out/panoptic/NAME.png`` are written.
        categories: the ground truth's ``categories`` (``id``, ``name``, ``isthing``, ...),
            copied into the json; segments must use these ids.

    Use as a context manager (the json is written on a clean exit) or call `close()`::

        with PanopticPredictionWriter(out, gt["categories"]) as writer:
            writer.add(image_id, "000001.jpg", result.ids, result.segments, size=(h, w))
    """

    json_name = "panoptic.json"
    png_dir = "panoptic"

    def __init__(self, out: str | Path, categories: Sequence[Mapping[str, Any]]) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output {self.out} exists and is not a directory")
        self.categories = [dict(c) for c in categories]
        if not self.categories:
            raise UserError("panoptic writer: no categories given")
        self.category_ids = frozenset(int(c["id"]) for c in self.categories)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self._pngs: set[str] = set()
        self._closed = False

    @property
    def json_path(self) -> Path:
        return self.out / self.json_name

    @property
    def png_root(self) -> Path:
        return self.out / self.png_dir

    def add(
        self,
        image_id: int,
        file_name: str,
        ids: np.ndarray | torch.Tensor,
        segments: Sequence[Mapping[str, Any]],
        *,
        size: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Check and write one image's PNG; return its annotation.

        Args:
            image_id: the ground truth's image id.
            file_name: the image's file name (relative); the PNG is named like it, ``.png``.
            ids: (H, W) segment ids, 0 = void (e.g. `PanopticResult.ids`).
            segments: ``id`` and ``category_id`` per segment (e.g. `PanopticResult.segments`).
            size: the image's (H, W), checked against the map when given.
        """
        if self._closed:
            raise RuntimeError("panoptic writer is closed")
        name = f"{image_id} ({file_name})"
        if any(im["id"] == image_id for im in self.images):
            raise UserError(f"image {name}: a prediction for image_id {image_id} was already "
                            "written")
        png_name = str(PurePosixPath(file_name).with_suffix(".png"))
        if png_name in self._pngs:
            raise UserError(f"image {name}: another image already wrote {png_name}")
        array, info = check_prediction(ids, segments, self.category_ids, image=name, size=size)
        path = safe_join(self.png_root, png_name)  # refuses absolute names and '..'
        rgb = id2rgb(array)  # (H, W) -> (H, W, 3) uint8
        atomic_save(Image.fromarray(rgb, mode="RGB"), path)
        self._pngs.add(png_name)
        self.images.append({"id": image_id, "file_name": file_name,
                            "height": int(array.shape[0]), "width": int(array.shape[1])})
        annotation = {"image_id": image_id, "file_name": png_name, "segments_info": info}
        self.annotations.append(annotation)
        logger.debug("wrote %s with %d segments", path, len(info))
        return annotation

    def close(self) -> Path:
        """Write ``panoptic.json`` (atomically); return its path."""
        if not self._closed:
            data = {"images": self.images, "annotations": self.annotations,
                    "categories": self.categories}
            write_json(self.json_path, data, indent=None)
            self._closed = True
            logger.info("wrote %d panoptic predictions to %s", len(self.annotations), self.out)
        return self.json_path

    def __enter__(self) -> PanopticPredictionWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
