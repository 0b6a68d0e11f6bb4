"""COCO panoptic: rgb2id / id2rgb and the dataset on a hand-built set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from pixelwise.data.check import check_dataset
from pixelwise.data.panoptic import CocoPanoptic, id2rgb, rgb2id
from pixelwise.data.transforms import JointTransform, Resize
from pixelwise.errors import UserError

H, W = 6, 8
BIG = 0xABCDEF  # a thing id that needs all three colour channels
CROWD, SKY, GROUND = 7, 1000, 300
CATEGORIES = [
    {"id": 40, "name": "cup", "isthing": 1},
    {"id": 20, "name": "sky", "isthing": 0},
    {"id": 5, "name": "ball", "isthing": 1},
    {"id": 30, "name": "ground", "isthing": 0},
]
SEGMENTS = [
    {"id": SKY, "category_id": 20, "iscrowd": 0},
    {"id": BIG, "category_id": 5, "iscrowd": 0},
    {"id": CROWD, "category_id": 5, "iscrowd": 1},
    {"id": GROUND, "category_id": 30, "iscrowd": 0},
]


def _ids() -> np.ndarray:
    ids = np.full((H, W), GROUND, dtype=np.int64)
    ids[0:2, :] = SKY
    ids[3:5, 1:4] = BIG
    ids[3:6, 5:7] = CROWD
    ids[5, 0:3] = 0  # void
    return ids


def _rgb(ids: np.ndarray) -> np.ndarray:
    """id -> RGB by the COCO formula, written independently of id2rgb."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _write(root: Path, ids: np.ndarray, segments: list, *, split: str = "train",
           images: list | None = None) -> Path:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "panoptic" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        root / "images" / split / "x.jpg", quality=95)
    Image.fromarray(_rgb(ids)).save(root / "panoptic" / split / "x.png")
    data = {
        "images": images or [{"id": 3, "file_name": "x.jpg", "height": H, "width": W}],
        "annotations": [{"image_id": 3, "file_name": "x.png", "segments_info": segments}],
        "categories": CATEGORIES,
    }
    path = root / "annotations" / f"panoptic_{split}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def panoptic_root(tmp_path: Path) -> Path:
    _write(tmp_path, _ids(), SEGMENTS)
    return tmp_path


def test_rgb2id_id2rgb_hand_values_and_round_trip():
    assert rgb2id([1, 2, 3]) == 1 + 2 * 256 + 3 * 65536
    assert id2rgb(1 + 2 * 256 + 3 * 65536) == [1, 2, 3]
    assert id2rgb(0) == [0, 0, 0] and id2rgb(256**3 - 1) == [255, 255, 255]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256**3, (5, 7))
    ids[0, 0], ids[0, 1] = 0, 256**3 - 1
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 7, 3)
    np.testing.assert_array_equal(rgb, _rgb(ids))
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError):
        id2rgb(np.array([256**3]))


def test_target_equals_hand_computation(panoptic_root: Path):
    ds = CocoPanoptic.from_layout(panoptic_root, "train")
    # all categories by id: 5 ball, 20 sky, 30 ground, 40 cup -> semantic labels 0..3
    assert ds.classes.names == ("ball", "sky", "ground", "cup")
    assert ds.is_thing == (True, False, False, True)
    assert ds.things.names == ("__background__", "ball", "cup")  # labels 1, 2
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, H, W)

    semantic = np.full((H, W), 2)
    semantic[0:2, :] = 1
    semantic[3:5, 1:4] = 0
    semantic[3:6, 5:7] = 0  # crowd pixels keep their class
    semantic[5, 0:3] = 255
    assert isinstance(target["semantic"], tv_tensors.Mask)
    assert target["semantic"].dtype == torch.int64
    np.testing.assert_array_equal(target["semantic"].numpy(), semantic)
    np.testing.assert_array_equal(target["panoptic"].numpy(), _ids())

    assert target["segment_ids"].tolist() == [BIG, CROWD]
    assert target["labels"].tolist() == [1, 1]
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["boxes"].tolist() == [[1, 3, 4, 5], [5, 3, 7, 6]]
    assert target["boxes"].canvas_size == (H, W)
    np.testing.assert_array_equal(target["masks"][0].numpy(), _ids() == BIG)
    np.testing.assert_array_equal(target["masks"][1].numpy(), _ids() == CROWD)
    assert target["masks"].dtype == torch.uint8
    assert target["area"].tolist() == [6.0, 6.0]
    assert target["image_id"] == 3
    assert [s["id"] for s in target["segments"]] == [SKY, BIG, CROWD, GROUND]


def test_image_without_annotation_is_void(tmp_path: Path, caplog):
    images = [{"id": 3, "file_name": "x.jpg", "height": H, "width": W},
              {"id": 4, "file_name": "x.jpg", "height": H, "width": W}]
    _write(tmp_path, _ids(), SEGMENTS, images=images)
    with caplog.at_level(logging.WARNING):
        ds = CocoPanoptic.from_layout(tmp_path, "train")
    assert "without a panoptic annotation" in caplog.text
    _, target = ds[1]
    assert (target["semantic"] == 255).all() and (target["panoptic"] == 0).all()
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)


BAD = {
    "unlisted_png_id": (SEGMENTS[:3],
                        r"segment ids \[300\] are in the PNG but not in panoptic_train"),
    "listed_missing": (SEGMENTS + [{"id": 55, "category_id": 5}],
                       r"segments_info ids \[55\] of panoptic_train.json do not appear in the PNG"),
    "unknown_category": ([dict(SEGMENTS[0], category_id=99)] + SEGMENTS[1:],
                         "segment id 1000: category_id 99 is not a category"),
    "duplicate_segment": (SEGMENTS + [SEGMENTS[0]], "duplicate segment id 1000"),
}


@pytest.mark.parametrize("segments, message", BAD.values(), ids=BAD.keys())
def test_bad_segments_refused(tmp_path: Path, segments, message):
    _write(tmp_path, _ids(), segments)
    ds = CocoPanoptic.from_layout(tmp_path, "train")
    with pytest.raises(UserError, match=message) as info:
        ds[0]
    # the very message `pixelwise data check` prints
    assert str(info.value) in [str(p) for p in check_dataset(tmp_path)]
    assert CocoPanoptic.from_layout(tmp_path, "train", skip_bad=True)[0] is None


def test_png_size_and_missing_isthing(tmp_path: Path):
    _write(tmp_path, _ids(), SEGMENTS)
    Image.fromarray(_rgb(_ids()[:, :5])).save(tmp_path / "panoptic" / "train" / "x.png")
    with pytest.raises(UserError, match="x.png: PNG size 6x5 differs from the image size 6x8"):
        CocoPanoptic.from_layout(tmp_path, "train")[0]
    path = tmp_path / "annotations" / "panoptic_train.json"
    data = json.loads(path.read_text())
    del data["categories"][0]["isthing"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="category 40 needs 'isthing'"):
        CocoPanoptic.from_layout(tmp_path, "train")


def test_resize_keeps_ids_and_void(panoptic_root: Path):
    transform = JointTransform([Resize([2 * H, 2 * W])])
    _, target = CocoPanoptic.from_layout(panoptic_root, "train", transforms=transform)[0]
    up = np.repeat(np.repeat(_ids(), 2, axis=0), 2, axis=1)  # nearest x2 by hand
    np.testing.assert_array_equal(target["panoptic"].numpy(), up)
    _, plain = CocoPanoptic.from_layout(panoptic_root, "train")[0]
    sem_up = np.repeat(np.repeat(plain["semantic"].numpy(), 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(target["semantic"].numpy(), sem_up)
    np.testing.assert_array_equal(target["masks"][0].numpy(), up == BIG)
    assert target["area"].tolist() == [24.0, 24.0]
    assert target["boxes"].tolist() == [[2, 6, 8, 10], [10, 6, 14, 12]]


def test_rotation_fill_is_void(panoptic_root: Path):
    torch.manual_seed(0)
    transform = JointTransform([v2.RandomRotation((45, 45))])
    _, target = CocoPanoptic.from_layout(panoptic_root, "train", transforms=transform)[0]
    # the corners come from outside the image: void in both maps, not class 0 / a segment
    assert int(target["semantic"][0, 0]) == 255 and int(target["panoptic"][0, 0]) == 0
    assert int(target["semantic"][-1, -1]) == 255 and int(target["panoptic"][-1, -1]) == 0
    valid = target["panoptic"] != 0
    lut = {0: 255, SKY: 1, BIG: 0, CROWD: 0, GROUND: 2}
    expected = target["panoptic"].clone().apply_(lambda i: lut[i])
    assert torch.equal(target["semantic"], expected) and valid.any()


@pytest.fixture(scope="module")
def synthetic_panoptic(tmp_path_factory) -> Path:
    synthetic = pytest.importorskip("pixelwise.data.synthetic")
    root = tmp_path_factory.mktemp("synthetic") / "panoptic"
    synthetic.synthesize("panoptic", root, num=5, size=(40, 56), seed=2, val_fraction=0.0)
    return root


def test_synthetic_panoptic_round_trip(synthetic_panoptic: Path):
    ds = CocoPanoptic.from_layout(synthetic_panoptic, "train")
    data = json.loads((synthetic_panoptic / "annotations" / "panoptic_train.json").read_text())
    anns = {a["image_id"]: a for a in data["annotations"]}
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    order = sorted(c["id"] for c in data["categories"])
    assert len(ds) == 5
    for index in range(len(ds)):
        _, target = ds[index]
        ann = anns[ds.images[index]["id"]]
        rgb = np.asarray(Image.open(synthetic_panoptic / "panoptic" / "train" / ann["file_name"]))
        ids = rgb2id(rgb)
        np.testing.assert_array_equal(target["panoptic"].numpy(), ids)
        label_of = {s["id"]: order.index(s["category_id"]) for s in ann["segments_info"]}
        semantic = np.vectorize(lambda i: label_of.get(i, 255))(ids)
        np.testing.assert_array_equal(target["semantic"].numpy(), semantic)
        segs = [s for s in ann["segments_info"] if s["category_id"] in things]
        assert target["segment_ids"].tolist() == [s["id"] for s in segs]
        for i, seg in enumerate(segs):
            x, y, w, h = seg["bbox"]
            assert target["boxes"][i].tolist() == [x, y, x + w, y + h]
            assert float(target["area"][i]) == seg["area"]
            assert ds.things.to_category_id(int(target["labels"][i])) == seg["category_id"]
            assert int(target["iscrowd"][i]) == seg["iscrowd"]
