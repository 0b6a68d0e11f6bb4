"""Image ids of predicted files from the dataset they came from: prediction outputs (COCO
results, COCO panoptic) carry the dataset's own image ids when every input image is listed by
one json of the pixelwise layout, so that they evaluate against it directly."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pixelwise.errors import UserError

logger = logging.getLogger(__name__)


def dataset_image_ids(paths: Sequence[str | Path], kind: str = "panoptic"
                      ) -> tuple[list[Any] | None, str]:
    """The ids of image files in their dataset json (``DIR/images/SPLIT/NAME`` listed by
    ``DIR/annotations/{kind}_SPLIT.json``), when all of them are in one such json; else
    ``(None, "sequential")``. Returns (ids, the json's path)."""
    from pixelwise.data.coco import load_coco_json

    found: Path | None = None
    by_name: dict[str, Any] = {}
    ids = []
    for raw in paths:
        path = Path(raw).resolve()
        split_dir = path.parent
        while split_dir.parent.name != "images" and split_dir.parent != split_dir:
            split_dir = split_dir.parent
        if split_dir.parent.name != "images":
            return None, "sequential"
        json_path = split_dir.parent.parent / "annotations" / f"{kind}_{split_dir.name}.json"
        if found is None:
            if not json_path.is_file():
                return None, "sequential"
            try:
                data = load_coco_json(json_path, kind=kind)
            except UserError as exc:
                logger.warning("image ids: %s; numbering the images instead", exc)
                return None, "sequential"
            found = json_path
            by_name = {str(im["file_name"]): im["id"] for im in data["images"]}
        elif json_path != found:
            return None, "sequential"
        image_id = by_name.get(path.relative_to(split_dir).as_posix())
        if image_id is None:
            return None, "sequential"
        ids.append(image_id)
    if found is None:
        return None, "sequential"
    return ids, str(found)
