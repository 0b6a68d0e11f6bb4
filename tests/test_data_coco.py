"""COCO instance / keypoint datasets on hand-built json files, checked against pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import Params
from torchvision import tv_tensors

from pixelwise.data.coco import (
    CategoryMap,
    CocoInstances,
    CocoKeypoints,
    collate_detection,
    decode_segmentation,
)
from pixelwise.data.check import check_dataset
from pixelwise.errors import UserError

H, W = 12, 16


def _mask(rows: slice, cols: slice, height: int = H, width: int = W) -> np.ndarray:
    m = np.zeros((height, width), dtype=np.uint8)
    m[rows, cols] = 1
    return m


# Hand-drawn expectations for the annotations of the fixture (by annotation id).
POLYGON_RECT = [2, 1, 6, 1, 6, 4, 2, 4]  # pycocotools fills rows 1..3, columns 2..5
EXPECTED = {
    10: _mask(slice(1, 4), slice(2, 6)),  # polygon
    11: _mask(slice(5, 9), slice(8, 15)),  # compressed RLE
    12: _mask(slice(2, 10), slice(1, 5)),  # uncompressed RLE, crowd
}
KEYPOINT_NAMES = ["nose", "left_eye", "right_eye"]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros (COCO's uncompressed RLE), by a naive loop."""
    flat = mask.flatten(order="F").tolist()
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _write_image(path: Path, mode: str, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = size + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _coco_json() -> dict:
    """Three images (RGB with two objects, gray with a crowd region and a degenerate box, one
    empty), non-contiguous category ids 3, 7, 12 (+ 20, a keypoint category)."""
    return {
        "images": [
            {"id": 5, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "sub/b.png", "height": H, "width": W},
            {"id": 9, "file_name": "c.png", "height": H, "width": W},
        ],
        "categories": [
            {"id": 12, "name": "cell"},
            {"id": 3, "name": "disc"},
            {"id": 7, "name": "box"},
            {"id": 20, "name": "face", "keypoints": KEYPOINT_NAMES, "skeleton": [[1, 2], [1, 3]],
             "sigmas": [0.03, 0.02, 0.02]},
        ],
        "annotations": [
            {"id": 10, "image_id": 5, "category_id": 7, "segmentation": [POLYGON_RECT],
             "bbox": [2, 1, 4, 3], "area": 12.0, "iscrowd": 0},
            {"id": 11, "image_id": 5, "category_id": 3,
             "segmentation": _compressed_rle(EXPECTED[11]),
             "bbox": [8, 5, 7, 4], "area": 28.0, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 12,
             "segmentation": _uncompressed_rle(EXPECTED[12]),
             "bbox": [1, 2, 4, 8], "area": 32.0, "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 3, "segmentation": [[3, 3, 3, 6, 3, 9]],
             "bbox": [3, 3, 0, 6], "area": 0.0, "iscrowd": 0},  # degenerate: zero width
            {"id": 14, "image_id": 2, "category_id": 20, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]],
             "bbox": [0, 0, 4, 4], "area": 16.0, "iscrowd": 0,
             "keypoints": [1, 1, 2, 7, 7, 0, 3, 2, 1], "num_keypoints": 2},
        ],
    }


def _write_set(root: Path, data: dict, split: str = "train", kind: str = "instances") -> Path:
    images = root / "images" / split
    _write_image(images / "a.png", "RGB")
    _write_image(images / "sub" / "b.png", "L")
    _write_image(images / "c.png", "RGB")
    ann = root / "annotations" / f"{kind}_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return ann


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    _write_set(tmp_path, _coco_json())
    _write_set(tmp_path, _coco_json(), kind="keypoints")
    return tmp_path


def _pycocotools(ann_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(str(ann_file))


def _instances(root: Path, **options) -> CocoInstances:
    # the keypoint category 20 is a category like any other for instances
    return CocoInstances.from_layout(root, "train", **options)


# ----------------------------------------------------------------------------- categories


def test_category_map_contiguous_and_back():
    cats = CategoryMap([{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}])
    assert cats.category_ids == (3, 7, 12)
    assert [cats.to_label(i) for i in (3, 7, 12)] == [1, 2, 3]
    assert [cats.to_category_id(label) for label in (1, 2, 3)] == [3, 7, 12]
    assert cats.names == ("__background__", "a", "b", "c")
    assert cats.num_classes == 4 and len(cats) == 3
    assert cats.labels_to_category_ids(torch.tensor([3, 1, 1])).tolist() == [12, 3, 3]
    with pytest.raises(UserError, match="unknown category id 4"):
        cats.to_label(4)
    with pytest.raises(UserError, match="label 0 has no category"):
        cats.to_category_id(0)
    with pytest.raises(UserError, match="labels outside"):
        cats.labels_to_category_ids(torch.tensor([4]))


def test_category_map_without_background_and_json_round_trip():
    cats = CategoryMap([{"id": 21, "name": "sky"}, {"id": 1, "name": "p"}], background=False)
    assert cats.to_label(1) == 0 and cats.to_label(21) == 1
    assert cats.names == ("p", "sky") and cats.num_classes == 2
    again = CategoryMap(cats.to_json(), background=False)
    assert again.category_ids == cats.category_ids and again.names == cats.names
    with pytest.raises(UserError, match="duplicate category id 1"):
        CategoryMap([{"id": 1}, {"id": 1}])


# ----------------------------------------------------------------------------- instances


def test_masks_equal_pycocotools_and_hand_drawn(coco_root: Path):
    ds = _instances(coco_root)
    coco = _pycocotools(ds.annotation_file)
    checked = 0
    for index in range(len(ds)):
        _, target = ds[index]
        anns = ds.annotations(index)
        assert target["masks"].shape[0] == len(anns)
        for mask, ann in zip(target["masks"], anns):
            reference = coco.annToMask(ann)
            np.testing.assert_array_equal(mask.numpy(), reference)
            if ann["id"] in EXPECTED:
                np.testing.assert_array_equal(mask.numpy(), EXPECTED[ann["id"]])
                checked += 1
    assert checked == 3


def test_target_fields_and_types(coco_root: Path):
    ds = _instances(coco_root)
    assert [im["id"] for im in ds.images] == [2, 5, 9]  # sorted by id
    image, target = ds[1]  # image 5: polygon (cat 7) and compressed RLE (cat 3)
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
    assert image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (H, W)
    assert boxes.tolist() == [[2, 1, 6, 4], [8, 5, 15, 9]]  # [x, y, w, h] -> [x, y, x+w, y+h]
    # category ids 3, 7, 12, 20 -> labels 1, 2, 3, 4
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
    assert target["masks"].shape == (2, H, W)
    assert target["iscrowd"].tolist() == [0, 0] and target["area"].tolist() == [12.0, 28.0]
    assert target["image_id"] == 5
    assert "keypoints" not in target


def test_crowd_kept_degenerate_dropped_gray_image(coco_root: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="pixelwise.data.coco"):
        ds = _instances(coco_root)
    assert "zero width or height" in caplog.text and "13" in caplog.text
    image, target = ds[0]  # image 2 ("sub/b.png", grayscale)
    assert image.shape == (1, H, W)
    assert [a["id"] for a in ds.annotations(0)] == [12, 14]
    assert target["iscrowd"].tolist() == [1, 0]
    assert target["labels"].tolist() == [3, 4]


def test_empty_image_has_empty_tensors_of_the_right_shapes(coco_root: Path):
    ds = _instances(coco_root)
    _, target = ds[2]  # image 9
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["masks"].shape == (0, H, W) and target["masks"].dtype == torch.uint8
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["iscrowd"].shape == (0,) and target["area"].shape == (0,)
    kds = CocoKeypoints.from_layout(coco_root, "train")
    _, kt = kds[2]
    assert kt["keypoints"].shape == (0, 3, 3) and kt["keypoints"].dtype == torch.float32


def test_boxes_clipped_to_the_image(tmp_path: Path):
    data = _coco_json()
    data["annotations"][0]["bbox"] = [-0.5, 1, W + 0.9, 3]  # within check's 1-pixel tolerance
    _write_set(tmp_path, data)
    _, target = _instances(tmp_path)[1]
    assert target["boxes"][0].tolist() == [0, 1, W, 4]


def test_category_filter(coco_root: Path):
    ds = _instances(coco_root, category_ids=[3, 7])
    assert ds.categories.category_ids == (3, 7)
    _, target = ds[1]
    assert target["labels"].tolist() == [2, 1]
    assert ds.annotations(0) == []  # crowd cell (12) and face (20) are not kept
    with pytest.raises(UserError, match=r"category ids \[99\]"):
        _instances(coco_root, category_ids=[99])


def test_transforms_called_with_image_and_target(coco_root: Path):
    calls = []

    def transform(image, target):
        calls.append((image.shape, target["image_id"]))
        return image * 0, target

    image, _ = _instances(coco_root, transforms=transform)[1]
    assert calls == [((3, H, W), 5)] and image.abs().sum() == 0


def test_collate_and_dataloader(coco_root: Path):
    loader = torch.utils.data.DataLoader(_instances(coco_root), batch_size=2,
                                         collate_fn=collate_detection)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [2, 1]
    images, targets = batches[0]
    assert images[0].shape == (1, H, W) and images[1].shape == (3, H, W)
    assert [t["image_id"] for t in targets] == [2, 5]


# ----------------------------------------------------------------------------- keypoints


def test_keypoints_dataset(coco_root: Path):
    ds = CocoKeypoints.from_layout(coco_root, "train")
    assert ds.categories.category_ids == (20,)  # only the category with keypoints
    assert ds.schema.names == tuple(KEYPOINT_NAMES)
    assert ds.schema.sigmas == (0.03, 0.02, 0.02) and ds.schema.flip_pairs == ((1, 2),)
    _, target = ds[0]
    # v = 2 and v = 1 kept as given; v = 0 gets x = y = 0 (the json said 7, 7)
    expected = [[[1, 1, 2], [0, 0, 0], [3, 2, 1]]]
    assert target["keypoints"].tolist() == expected
    assert target["keypoints"].dtype == torch.float32
    assert target["labels"].tolist() == [1] and "masks" not in target
    _, with_masks = CocoKeypoints.from_layout(coco_root, "train", with_masks=True)[0]
    assert with_masks["masks"].shape == (1, H, W)
    assert ds[1][1]["keypoints"].shape == (0, 3, 3)  # image 5 has no face


def test_keypoint_count_differs_from_schema(tmp_path: Path):
    data = _coco_json()
    data["annotations"][4]["keypoints"] = [1, 1, 2, 3, 2, 1]
    _write_set(tmp_path, data, kind="keypoints")
    ds = CocoKeypoints.from_layout(tmp_path, "train")
    with pytest.raises(UserError, match="annotation id 14.*2 keypoints but category 'face' has 3"):
        ds[0]


def test_keypoint_file_without_keypoint_category(tmp_path: Path):
    data = _coco_json()
    del data["categories"][3]["keypoints"]
    _write_set(tmp_path, data, kind="keypoints")
    with pytest.raises(UserError, match="no category lists 'keypoints'"):
        CocoKeypoints.from_layout(tmp_path, "train")


def test_keypoint_schema_error_names_the_file(tmp_path: Path):
    data = _coco_json()
    data["categories"][3]["sigmas"] = [0.1]
    ann = _write_set(tmp_path, data, kind="keypoints")
    with pytest.raises(UserError, match=f"{ann}.*'face'.*1 sigmas for 3 keypoints"):
        CocoKeypoints.from_layout(tmp_path, "train")


# ----------------------------------------------------------------------------- bad input


def _set_ann(index: int, **fields):
    def change(data: dict) -> None:
        data["annotations"][index].update(fields)
    return change


BAD_SAMPLES = {
    "polygon_too_short": (_set_ann(0, segmentation=[[1, 1, 3, 1]]), "a polygon needs at least 3"),
    "polygon_odd": (_set_ann(0, segmentation=[[1, 1, 3, 1, 3]]), "odd number of coordinates"),
    "rle_size": (_set_ann(1, segmentation={"size": [H, W + 1], "counts": [0, H * (W + 1)]}),
                 "RLE size 12x17 differs from the image size 12x16"),
    "rle_short": (_set_ann(1, segmentation={"size": [H, W], "counts": [5, 3]}),
                  "RLE runs cover 8 pixels, not 12x16"),
    "rle_compressed_short": (_set_ann(1, segmentation={"size": [H, W], "counts": "522"}),
                             "RLE runs cover 9 pixels"),
    "rle_compressed_garbage": (_set_ann(1, segmentation={"size": [H, W], "counts": "\x01\x02"}),
                               "invalid compressed RLE"),
    "unknown_category": (_set_ann(0, category_id=99), "category_id 99 is not a category"),
    "bbox_not_numbers": (_set_ann(0, bbox=[1, "a", 2, 3]), "bbox must be 4 numbers"),
    "bbox_outside": (_set_ann(0, bbox=[10, 1, 9, 3]), "outside the 16x12 image"),
    "empty_segmentation": (_set_ann(0, segmentation=[]), "empty list of polygons"),
    "no_segmentation": (lambda d: d["annotations"][0].pop("segmentation"), "no segmentation"),
}


@pytest.mark.parametrize("change, message", BAD_SAMPLES.values(), ids=BAD_SAMPLES.keys())
def test_bad_annotation_refused_when_read(tmp_path: Path, change, message):
    data = _coco_json()
    change(data)
    _write_set(tmp_path, data)
    ds = _instances(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        ds[1]
    assert str(info.value).startswith(f"{ds.annotation_file}: annotation id 1")
    ds[2]  # other samples still load


def test_bad_sample_message_is_the_data_check_message(tmp_path: Path):
    data = _coco_json()
    data["annotations"][1]["segmentation"] = {"size": [H, W], "counts": [5, 3]}
    _write_set(tmp_path, data)
    with pytest.raises(UserError) as info:
        _instances(tmp_path)[1]
    assert str(info.value) in [str(p) for p in check_dataset(tmp_path)]


def test_skip_bad_returns_none_and_logs(tmp_path: Path, caplog):
    data = _coco_json()
    data["annotations"][0]["segmentation"] = [[1, 1, 3, 1]]
    _write_set(tmp_path, data)
    ds = _instances(tmp_path, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None
    assert "skipping a bad sample" in caplog.text and "annotation id 10" in caplog.text
    images, targets = collate_detection([ds[0], ds[1], ds[2]])
    assert [t["image_id"] for t in targets] == [2, 9] and len(images) == 2


def test_file_name_escaping_the_root_is_refused(tmp_path: Path):
    data = _coco_json()
    data["images"][0]["file_name"] = "../../secret.png"
    _write_set(tmp_path, data)
    with pytest.raises(UserError, match="escapes the dataset root"):
        _instances(tmp_path)[1]


def test_image_size_differs_from_json(tmp_path: Path):
    data = _coco_json()
    data["images"][0]["height"] = H + 1
    _write_set(tmp_path, data)
    with pytest.raises(UserError, match=f"the json says {W}x{H + 1} but a.png is {W}x{H}"):
        _instances(tmp_path)[1]


BAD_FILES = {
    "duplicate_image_id": (lambda d: d["images"].append(dict(d["images"][0])),
                           "duplicate image id 5"),
    "duplicate_annotation_id": (lambda d: d["annotations"].append(
        copy.deepcopy(d["annotations"][0])),
                                "duplicate annotation id 10"),
    "no_categories": (lambda d: d.pop("categories"), "missing the 'categories' list"),
    "no_file_name": (lambda d: d["images"][0].pop("file_name"), "no 'file_name'"),
}


@pytest.mark.parametrize("change, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_refused_when_loaded(tmp_path: Path, change, message):
    data = _coco_json()
    change(data)
    _write_set(tmp_path, data)
    with pytest.raises(UserError, match=message):
        _instances(tmp_path)


def test_not_json_and_missing_split(tmp_path: Path):
    ann = _write_set(tmp_path, _coco_json())
    ann.write_text("{not json")
    with pytest.raises(UserError, match="not a valid json"):
        _instances(tmp_path)
    with pytest.raises(UserError, match="no instances annotations for split 'val'"):
        CocoInstances.from_layout(tmp_path, "val")


# ----------------------------------------------------------------------------- decoding


def test_decode_segmentation_rle_forms_equal_the_mask():
    rng = np.random.default_rng(3)
    for height, width, p in [(1, 1, 0.5), (7, 5, 0.1), (40, 33, 0.5), (64, 80, 0.97)]:
        mask = (rng.random((height, width)) < p).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        np.testing.assert_array_equal(
            decode_segmentation({"size": [height, width], "counts": rle["counts"].decode()},
                                height, width), mask)
        np.testing.assert_array_equal(
            decode_segmentation(_uncompressed_rle(mask), height, width), mask)


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    synthetic = pytest.importorskip("pixelwise.data.synthetic")
    root = tmp_path_factory.mktemp("synthetic")
    for task in ("instance", "keypoints"):
        synthetic.synthesize(task, root / task, num=6, size=(48, 64), seed=3, val_fraction=0.34)
    synthetic.synthesize("instance", root / "cells", num=2, size=(40, 56), seed=4,
                         val_fraction=0.0, cells=True, gray16=True)
    return root


@pytest.mark.parametrize("name, split", [("instance", "train"), ("instance", "val"),
                                         ("cells", "train")])
def test_synthetic_instances_round_trip(synthetic_root: Path, name: str, split: str):
    ds = CocoInstances.from_layout(synthetic_root / name, split)
    coco = _pycocotools(ds.annotation_file)
    assert len(ds) == len(coco.getImgIds())
    for index in range(len(ds)):
        image, target = ds[index]
        info = ds.images[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        assert image.shape[-2:] == (info["height"], info["width"])
        assert image.shape[0] == (1 if name == "cells" else 3) and image.dtype == torch.float32
        assert len(target["labels"]) == len(anns)
        for i, ann in enumerate(anns):
            np.testing.assert_array_equal(target["masks"][i].numpy(), coco.annToMask(ann))
            x, y, w, h = ann["bbox"]
            assert target["boxes"][i].tolist() == pytest.approx([x, y, x + w, y + h])
            assert ds.categories.to_category_id(int(target["labels"][i])) == ann["category_id"]
            assert int(target["iscrowd"][i]) == ann["iscrowd"]


def test_synthetic_keypoints_round_trip(synthetic_root: Path):
    ds = CocoKeypoints.from_layout(synthetic_root / "keypoints", "train")
    coco = _pycocotools(ds.annotation_file)
    assert ds.schema.num_keypoints == 17 and ds.schema.sigmas == tuple(
        Params(iouType="keypoints").kpt_oks_sigmas.tolist()
    )
    seen = 0
    for index in range(len(ds)):
        _, target = ds[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[ds.images[index]["id"]]))
        assert target["keypoints"].shape == (len(anns), 17, 3)
        for i, ann in enumerate(anns):
            kps = np.array(ann["keypoints"], dtype=np.float32).reshape(17, 3)
            kps[kps[:, 2] == 0, :2] = 0
            np.testing.assert_array_equal(target["keypoints"][i].numpy(), kps)
            seen += 1
    assert seen > 0

