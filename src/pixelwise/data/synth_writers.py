"""Writing synthetic scenes in the pixelwise dataset layout, one writer per task.

Each writer takes scenes one by one (`add`) and writes the per-image files at once; the JSON files
are written last (`finish`), atomically, so an interrupted run never leaves a half-written JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pixelwise.atomic import write_json
from pixelwise.data.check import polygon_problem
from pixelwise.data.synth_scene import IGNORE, Category, Scene, SceneObject
from pixelwise.data.synth_shapes import COCO_KEYPOINT_NAMES, COCO_SKELETON

IGNORE_COLOUR = (224, 224, 192)  # PASCAL VOC's colour for its 255 "boundary" label

# ------------------------------------------------------------------------- files


def save_image(path: Path, image: np.ndarray, *, gray16: bool) -> None:
    """Save a float [0, 1] image: 8-bit RGB, or 16-bit grayscale with `gray16`; PNG or TIFF.

    image: (H, W, 3) or (H, W) float32. The suffix of `path` picks the format.
    """
    if gray16:
        data = np.round(image * 65535).astype(np.uint16)  # (H, W)
    else:
        data = np.round(image * 255).astype(np.uint8)  # (H, W, 3)
    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, data, photometric="minisblack" if data.ndim == 2 else "rgb")
    else:
        # noisy images barely compress: the fastest zlib level costs ~10% size, saves ~40% time
        Image.fromarray(data).save(path, compress_level=1)


def save_label_png(path: Path, labels: np.ndarray, categories: tuple[Category, ...]) -> None:
    """Save (H, W) uint8 class indices as a palette PNG (indices, with colours for viewing)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(categories)] = [c.color for c in categories]
    palette[IGNORE] = IGNORE_COLOUR
    image = Image.fromarray(labels)  # mode "L"
    image.putpalette(palette.reshape(-1).tolist())  # (256, 3) -> (768,)
    image.save(path)


def save_panoptic_png(path: Path, ids: np.ndarray) -> None:
    """Save (H, W) segment ids as the COCO panoptic RGB PNG: id = R + 256 G + 256^2 B."""
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1)  # (H, W, 3)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


# ------------------------------------------------------------------------- masks


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a (H, W) bool mask, `counts` as a str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (as used for crowd regions): run lengths in column-major order,
    starting with a run of zeros.

    Hand-written because pycocotools can read this form but has no writer for it.
    """
    flat = mask.astype(np.uint8).ravel(order="F")  # (H, W) -> (H*W,) column-major
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def segment_stats(ids: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """For every value of a (H, W) id map: (pixel count, COCO bbox [x, y, w, h]).

    Vectorised: one stable sort of the pixels by id, then `reduceat` per run.
    """
    h, w = ids.shape
    flat = ids.ravel()  # (H*W,)
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    values, counts = ordered[starts], np.diff(np.append(starts, flat.size))
    rows, cols = order // w, order % w
    y0, y1 = np.minimum.reduceat(rows, starts), np.maximum.reduceat(rows, starts)
    x0, x1 = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts)
    return {
        int(v): (int(n), [int(a), int(b), int(c - a + 1), int(d - b + 1)])
        for v, n, a, b, c, d in zip(values, counts, x0, y0, x1, y1, strict=True)
    }


def segmentation(obj: SceneObject, visible: np.ndarray) -> list | dict:
    """COCO segmentation of one thing: uncompressed RLE for crowds, its exact polygons when it is
    not occluded (they decode to exactly the visible mask), compressed RLE otherwise."""
    if obj.iscrowd:
        return uncompressed_rle(visible)
    if obj.polygons is not None and not obj.occluded:
        height, width = visible.shape
        # a part (a limb) wholly off the image rasterises to nothing: leave it out, the decoded
        # mask stays exactly the visible one and `data check` accepts every polygon
        on_image = [poly for poly in obj.polygons if polygon_problem(poly, height, width) is None]
        if on_image:
            return on_image
    return compressed_rle(visible)


# ------------------------------------------------------------------------- writers


class _Writer:
    """Common bookkeeping: one image list per split, written at the end."""

    def __init__(self, root: Path, categories: tuple[Category, ...], info: dict) -> None:
        self.root = root
        self.categories = categories
        self.info = info
        self.images: dict[str, list[dict]] = {}
        self.annotations: dict[str, list[dict]] = {}

    def add(self, scene: Scene, split: str, name: str, image: dict) -> None:
        self.images.setdefault(split, []).append(image)
        self.annotations.setdefault(split, [])
        self._add(scene, split, name, image)

    def _add(self, scene: Scene, split: str, name: str, image: dict) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, dict[str, int]]:
        """Write the JSON files; return counts per split."""
        raise NotImplementedError

    def _coco(self, split: str, categories: list[dict]) -> dict:
        return {
            "info": self.info,
            "licenses": [],
            "images": self.images[split],
            "annotations": self.annotations[split],
            "categories": categories,
        }

    def _counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {"images": len(self.images[split]), "annotations": len(self.annotations[split])}
            for split in sorted(self.images)
        }

    def things(self) -> list[Category]:
        return [c for c in self.categories if c.isthing]


class SemanticWriter(_Writer):
    """masks/{split}/NAME.png (palette PNG of class indices, 255 = ignore) + classes.json."""

    def _add(self, scene: Scene, split: str, name: str, image: dict) -> None:
        folder = self.root / "masks" / split
        folder.mkdir(parents=True, exist_ok=True)
        save_label_png(folder / f"{name}.png", scene.semantic, self.categories)

    def finish(self) -> dict[str, dict[str, int]]:
        classes = {"classes": [c.name for c in self.categories], "ignore_index": IGNORE,
                   "colors": [list(c.color) for c in self.categories]}  # the masks' palette
        write_json(self.root / "classes.json", classes, indent=None)
        return {split: {"images": len(self.images[split])} for split in sorted(self.images)}


class InstanceWriter(_Writer):
    """annotations/instances_{split}.json: every visible thing, COCO style."""

    json_name = "instances"

    def _annotate(self, obj: SceneObject) -> bool:
        return True

    def _add(self, scene: Scene, split: str, name: str, image: dict) -> None:
        ids = {c.name: c.id for c in self.categories}
        stats = segment_stats(scene.instances)
        instances = np.asfortranarray(scene.instances)  # masks from it are Fortran-ordered too
        annotations = self.annotations[split]
        for k, obj in enumerate(scene.objects, start=1):
            if not self._annotate(obj):
                continue
            area, bbox = stats[k]
            ann = {
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "category_id": ids[obj.category],
                "segmentation": segmentation(obj, instances == k),
                "area": area,
                "bbox": bbox,
                "iscrowd": int(obj.iscrowd),
            }
            self._extra(ann, obj)
            annotations.append(ann)

    def _extra(self, ann: dict, obj: SceneObject) -> None:
        pass

    def _categories(self) -> list[dict]:
        return [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in self.things()
        ]

    def finish(self) -> dict[str, dict[str, int]]:
        for split in self.images:
            path = self.root / "annotations" / f"{self.json_name}_{split}.json"
            write_json(path, self._coco(split, self._categories()), indent=None)
        return self._counts()


class KeypointWriter(InstanceWriter):
    """annotations/keypoints_{split}.json: persons with 17 COCO keypoints (x, y, v)."""

    json_name = "keypoints"

    def _annotate(self, obj: SceneObject) -> bool:
        return obj.keypoints is not None

    def _extra(self, ann: dict, obj: SceneObject) -> None:
        kp = obj.keypoints  # (17, 3)
        flat = [[round(float(x), 2), round(float(y), 2), int(v)] for x, y, v in kp]
        ann["keypoints"] = [value for triple in flat for value in triple]  # (17, 3) -> (51,)
        ann["num_keypoints"] = int((kp[:, 2] > 0).sum())

    def _categories(self) -> list[dict]:
        person = next(c for c in self.categories if c.name == "person")
        return [
            {
                "id": person.id,
                "name": person.name,
                "supercategory": person.supercategory,
                "keypoints": list(COCO_KEYPOINT_NAMES),
                "skeleton": [list(pair) for pair in COCO_SKELETON],
            }
        ]


class PanopticWriter(_Writer):
    """panoptic/{split}/NAME.png + annotations/panoptic_{split}.json (COCO panoptic).

    Segment ids: a thing k of category c gets c * 65536 + k, a stuff class c gets c * 65536;
    0 is void (pixels of things too small to annotate).
    """

    def _add(self, scene: Scene, split: str, name: str, image: dict) -> None:
        cat_id = np.array([c.id for c in scene.categories], dtype=np.int64)
        index = {c.name: i for i, c in enumerate(scene.categories)}
        obj_cat = np.array([0] + [cat_id[index[o.category]] for o in scene.objects], np.int64)
        ids = np.where(
            scene.instances > 0,
            obj_cat[scene.instances] * 65536 + scene.instances,  # thing k of category c
            np.where(scene.void, 0, cat_id[scene.stuff] * 65536),  # stuff class c, or void
        )  # (H, W) int64
        folder = self.root / "panoptic" / split
        folder.mkdir(parents=True, exist_ok=True)
        save_panoptic_png(folder / f"{name}.png", ids)

        crowd = {int(obj_cat[k] * 65536 + k): o.iscrowd for k, o in enumerate(scene.objects, 1)}
        segments = [
            {
                "id": seg_id,
                "category_id": seg_id // 65536,
                "area": area,
                "bbox": bbox,
                "iscrowd": int(crowd.get(seg_id, False)),
            }
            for seg_id, (area, bbox) in segment_stats(ids).items()
            if seg_id != 0
        ]
        self.annotations[split].append(
            {"image_id": image["id"], "file_name": f"{name}.png", "segments_info": segments}
        )

    def finish(self) -> dict[str, dict[str, int]]:
        categories = [
            {
                "id": c.id,
                "name": c.name,
                "supercategory": c.supercategory,
                "isthing": int(c.isthing),
                "color": list(c.color),
            }
            for c in self.categories
        ]
        for split in self.images:
            path = self.root / "annotations" / f"panoptic_{split}.json"
            write_json(path, self._coco(split, categories), indent=None)
        counts = self._counts()
        for split, anns in self.annotations.items():
            counts[split]["segments"] = sum(len(a["segments_info"]) for a in anns)
            del counts[split]["annotations"]
        return counts


TASK_WRITERS: dict[str, type[_Writer]] = {
    "semantic": SemanticWriter,
    "instance": InstanceWriter,
    "keypoints": KeypointWriter,
    "panoptic": PanopticWriter,
}
