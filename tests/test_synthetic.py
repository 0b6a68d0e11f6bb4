"""Synthetic scenes: determinism, layout, and consistency of every task's ground truth.

References are independent of the generator: pycocotools decodes the COCO segmentations, plain
numpy recomputes areas and boxes pixel by pixel, and the tasks are checked against each other
(the same seed draws the same scene for every task).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tifffile
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.synth_writers import segment_stats, uncompressed_rle
from pixelwise.data.synthetic import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    SCENE_CATEGORIES,
    TASK_WRITERS,
    SceneConfig,
    scene_for,
    split_of,
    synthesize,
)
from pixelwise.errors import UserError

# pycocotools 2.0.11 + numpy 2 warn about the `copy` keyword inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SIZE = (48, 64)  # non-square on purpose
NUM, SEED = 12, 0  # these 12 scenes hold every feature checked below (asserted)
# more persons and crowds than the default, so that a small set shows every kind of annotation
RICH = SceneConfig(person_fraction=0.5, crowd_fraction=0.5, max_things=8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small dataset per task, all from the same seed (hence the same scenes)."""
    root = tmp_path_factory.mktemp("synth")
    return {
        task: synthesize(
            task, root / task, num=NUM, size=SIZE, seed=SEED, val_fraction=0.25, config=RICH
        )
        for task in TASK_WRITERS
    }


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _decode(ann: dict, h: int, w: int) -> np.ndarray:
    """pycocotools' own decoding (as COCO.annToMask): polygons, compressed or uncompressed RLE."""
    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool)


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _naive_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a = _files(synthesize("panoptic", tmp_path / "a", num=4, size=SIZE, seed=5))
    b = _files(synthesize("panoptic", tmp_path / "b", num=4, size=SIZE, seed=5))
    c = _files(synthesize("panoptic", tmp_path / "c", num=4, size=SIZE, seed=6))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.startswith("images")]
    assert all(a[k] != c[k] for k in images)


def test_num_does_not_change_earlier_images(tmp_path: Path) -> None:
    few = _files(synthesize("semantic", tmp_path / "few", num=3, size=SIZE, seed=1))
    many = _files(synthesize("semantic", tmp_path / "many", num=7, size=SIZE, seed=1))
    for name, data in few.items():
        if name != "classes.json":
            assert many[name] == data, name


def test_scenes_do_not_depend_on_task(sets: dict[str, Path]) -> None:
    reference = {k: v for k, v in _files(sets["semantic"]).items() if k.startswith("images")}
    for task in ("instance", "keypoints", "panoptic"):
        images = {k: v for k, v in _files(sets[task]).items() if k.startswith("images")}
        assert images == reference, task


def test_split_is_stable_and_close_to_fraction() -> None:
    splits = [split_of(i, 0.2) for i in range(100)]
    assert splits.count("val") == 20 and splits[0] == "val"
    assert all(split_of(i, 0.0) == "train" for i in range(50))
    assert all(split_of(i, 1.0) == "val" for i in range(50))


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("task", sorted(TASK_WRITERS))
def test_layout(sets: dict[str, Path], task: str) -> None:
    root = sets[task]
    for split in ("train", "val"):
        images = sorted((root / "images" / split).iterdir())
        assert images, split
        for path in images:
            with Image.open(path) as im:
                assert im.size == (SIZE[1], SIZE[0])
                assert im.mode == "RGB"
        if task == "semantic":
            masks = sorted((root / "masks" / split).iterdir())
            assert [p.stem for p in masks] == [p.stem for p in images]
            continue
        data = _load(
            root / "annotations" / f"{dict(instance='instances').get(task, task)}_{split}.json"
        )
        assert [im["file_name"] for im in data["images"]] == [p.name for p in images]
        assert all((im["height"], im["width"]) == SIZE for im in data["images"])
        ids = [c["id"] for c in data["categories"]]
        assert len(set(ids)) == len(ids)
        if task != "keypoints":
            assert ids != list(range(1, len(ids) + 1)), "category ids should be non-contiguous"
        if task == "panoptic":
            files = sorted(p.name for p in (root / "panoptic" / split).iterdir())
            assert [a["file_name"] for a in data["annotations"]] == files
        else:
            ann_ids = [a["id"] for a in data["annotations"]]
            assert len(set(ann_ids)) == len(ann_ids)
    if task == "semantic":
        classes = _load(root / "classes.json")
        assert classes == {
            "classes": [c.name for c in SCENE_CATEGORIES["shapes"]],
            "ignore_index": 255,
            "colors": [list(c.color) for c in SCENE_CATEGORIES["shapes"]],
        }


def test_category_names_and_ids_agree_across_tasks(sets: dict[str, Path]) -> None:
    by_name = {}
    for task, prefix in (
        ("instance", "instances"),
        ("keypoints", "keypoints"),
        ("panoptic", "panoptic"),
    ):
        for cat in _load(sets[task] / "annotations" / f"{prefix}_train.json")["categories"]:
            assert by_name.setdefault(cat["name"], cat["id"]) == cat["id"]
    classes = _load(sets["semantic"] / "classes.json")["classes"]
    assert set(classes) == set(by_name)


# ----------------------------------------------------------------------------- consistency


def test_instances_decode_exactly_and_union_is_the_semantic_mask(sets: dict[str, Path]) -> None:
    classes = _load(sets["semantic"] / "classes.json")["classes"]
    kinds = {"polygons": 0, "rle": 0, "uncompressed_rle": 0, "empty_images": 0}
    for split in ("train", "val"):
        data = _load(sets["instance"] / "annotations" / f"instances_{split}.json")
        names = {c["id"]: c["name"] for c in data["categories"]}
        for image in data["images"]:
            h, w = image["height"], image["width"]
            stem = Path(image["file_name"]).stem
            semantic = np.asarray(Image.open(sets["semantic"] / "masks" / split / f"{stem}.png"))
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            kinds["empty_images"] += not anns
            union = np.full((h, w), -1)
            for ann in anns:
                segm = ann["segmentation"]
                if isinstance(segm, list):
                    kinds["polygons"] += 1
                elif isinstance(segm["counts"], list):
                    kinds["uncompressed_rle"] += 1
                    assert ann["iscrowd"] == 1
                else:
                    kinds["rle"] += 1
                mask = _decode(ann, h, w)
                assert ann["area"] == mask.sum() and ann["bbox"] == _naive_bbox(mask)
                assert np.all(union[mask] == -1), "instance masks must not overlap"
                union[mask] = classes.index(names[ann["category_id"]])
            things = np.isin(semantic, [classes.index(n) for n in names.values()])
            assert np.array_equal(union >= 0, things)
            assert np.array_equal(union[things], semantic[things])
    assert all(count > 0 for count in kinds.values()), kinds


def test_panoptic_png_matches_segments_info(sets: dict[str, Path]) -> None:
    classes = _load(sets["semantic"] / "classes.json")["classes"]
    for split in ("train", "val"):
        data = _load(sets["panoptic"] / "annotations" / f"panoptic_{split}.json")
        cats = {c["id"]: c for c in data["categories"]}
        assert {c["isthing"] for c in cats.values()} == {0, 1}
        images = {im["id"]: im for im in data["images"]}
        for ann in data["annotations"]:
            ids = _panoptic_ids(sets["panoptic"] / "panoptic" / split / ann["file_name"])
            segments = {s["id"]: s for s in ann["segments_info"]}
            assert len(segments) == len(ann["segments_info"])
            assert set(np.unique(ids)) - {0} == set(segments)
            stuff_seen = []
            for seg_id, seg in segments.items():
                mask = ids == seg_id
                assert seg["area"] == mask.sum() and seg["bbox"] == _naive_bbox(mask)
                if not cats[seg["category_id"]]["isthing"]:
                    stuff_seen.append(seg["category_id"])
                    assert seg["iscrowd"] == 0
            assert len(stuff_seen) == len(set(stuff_seen)), "one stuff segment per class"
            # the semantic mask of the same scene, read off the panoptic segments
            stem = Path(images[ann["image_id"]]["file_name"]).stem
            semantic = np.asarray(Image.open(sets["semantic"] / "masks" / split / f"{stem}.png"))
            expected = np.full(ids.shape, 255)
            for seg_id, seg in segments.items():
                expected[ids == seg_id] = classes.index(cats[seg["category_id"]]["name"])
            assert np.array_equal(expected, semantic)


def test_panoptic_things_equal_instance_annotations(sets: dict[str, Path]) -> None:
    inst = _load(sets["instance"] / "annotations" / "instances_train.json")
    pano = _load(sets["panoptic"] / "annotations" / "panoptic_train.json")
    thing_cats = {c["id"] for c in pano["categories"] if c["isthing"]}
    for ann in pano["annotations"]:
        ids = _panoptic_ids(sets["panoptic"] / "panoptic" / "train" / ann["file_name"])
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_cats]
        masks = [
            _decode(a, *ids.shape) for a in inst["annotations"] if a["image_id"] == ann["image_id"]
        ]
        assert len(things) == len(masks)
        for seg in things:
            seg_mask = ids == seg["id"]
            ious = [(m & seg_mask).sum() / (m | seg_mask).sum() for m in masks]
            assert max(ious) == 1.0


def test_void_pixels_are_ignore_and_unannotated(tmp_path: Path) -> None:
    # cells cut by the image border leave fragments too small to annotate: void / ignore
    sem = synthesize("semantic", tmp_path / "s", num=3, size=SIZE, seed=2, cells=True)
    pan = synthesize("panoptic", tmp_path / "p", num=3, size=SIZE, seed=2, cells=True)
    data = _load(pan / "annotations" / "panoptic_train.json")
    void_pixels = 0
    for ann in data["annotations"]:
        ids = _panoptic_ids(pan / "panoptic" / "train" / ann["file_name"])
        semantic = np.asarray(Image.open(sem / "masks" / "train" / ann["file_name"]))
        assert np.array_equal(ids == 0, semantic == 255)
        void_pixels += int((ids == 0).sum())
        assert min(s["area"] for s in ann["segments_info"]) >= SceneConfig().min_area
    assert void_pixels > 0


def test_keypoints_inside_masks_or_occluded(sets: dict[str, Path]) -> None:
    seen = {0: 0, 1: 0, 2: 0}
    for split in ("train", "val"):
        data = _load(sets["keypoints"] / "annotations" / f"keypoints_{split}.json")
        (cat,) = data["categories"]
        assert cat["name"] == "person" and cat["keypoints"] == list(COCO_KEYPOINT_NAMES)
        pano = _load(sets["panoptic"] / "annotations" / f"panoptic_{split}.json")
        stuff = {c["id"] for c in pano["categories"] if not c["isthing"]}
        pano_files = {a["image_id"]: a for a in pano["annotations"]}
        for ann in data["annotations"]:
            assert ann["category_id"] == cat["id"] and ann["iscrowd"] == 0
            h, w = SIZE
            mask = _decode(ann, h, w)
            assert ann["area"] == mask.sum()
            kp = np.asarray(ann["keypoints"], dtype=float).reshape(17, 3)  # (51,) -> (17, 3)
            assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum())
            pano_ann = pano_files[ann["image_id"]]
            ids = _panoptic_ids(sets["panoptic"] / "panoptic" / split / pano_ann["file_name"])
            stuff_ids = {s["id"] for s in pano_ann["segments_info"] if s["category_id"] in stuff}
            for x, y, v in kp:
                seen[int(v)] += 1
                if v == 0:
                    assert x == 0 and y == 0
                    continue
                assert 0 <= x < w and 0 <= y < h
                row, col = int(y), int(x)
                if v == 2:
                    assert mask[row, col]
                else:  # labelled but covered by a thing drawn later (or a dropped fragment)
                    assert not mask[row, col] and ids[row, col] not in stuff_ids
    assert all(seen.values()), seen


def test_keypoint_schema_is_cocos() -> None:
    assert len(COCO_KEYPOINT_NAMES) == 17 and len(COCO_SKELETON) == 19
    assert COCO_KEYPOINT_NAMES[0] == "nose" and COCO_KEYPOINT_NAMES[-1] == "right_ankle"
    # the skeleton is left/right symmetric: swapping sides maps it onto itself
    swap = {
        n: n.replace("left", "@").replace("right", "left").replace("@", "right")
        for n in COCO_KEYPOINT_NAMES
    }
    index = {n: i + 1 for i, n in enumerate(COCO_KEYPOINT_NAMES)}
    edges = {frozenset(e) for e in COCO_SKELETON}
    mirrored = {
        frozenset(index[swap[COCO_KEYPOINT_NAMES[i - 1]]] for i in e) for e in COCO_SKELETON
    }
    assert edges == mirrored


def test_person_left_side_is_on_image_right() -> None:
    config = SceneConfig(person_fraction=1.0, empty_fraction=0.0, crowd_fraction=0.0)
    figures = [o for i in range(8) for o in scene_for(0, i, (96, 96), config=config).objects]
    assert figures
    for name in ("shoulder", "hip", "eye"):
        li, ri = (
            COCO_KEYPOINT_NAMES.index(f"left_{name}"),
            COCO_KEYPOINT_NAMES.index(f"right_{name}"),
        )
        for obj in figures:
            kp = obj.keypoints
            if kp[li, 2] > 0 and kp[ri, 2] > 0:
                assert kp[li, 0] > kp[ri, 0]


# ----------------------------------------------------------------------------- options


def test_cells_have_a_hundred_touching_objects(tmp_path: Path) -> None:
    root = synthesize("instance", tmp_path / "c", num=2, size=(256, 256), seed=0, cells=True)
    data = _load(root / "annotations" / "instances_train.json")
    (cat,) = data["categories"]
    assert cat["name"] == "cell"
    counts = [sum(a["image_id"] == im["id"] for a in data["annotations"]) for im in data["images"]]
    assert min(counts) >= 100, counts
    # touching: some 4-neighbours belong to two different cells
    scene = scene_for(0, 1, (256, 256), cells=True)
    a, b = scene.instances[:, 1:], scene.instances[:, :-1]
    assert np.sum((a != b) & (a > 0) & (b > 0)) > 100
    assert len(scene.objects) == counts[0]


@pytest.mark.parametrize("cells", [True, False])
@pytest.mark.parametrize("image_format", ["png", "tif"])
def test_gray16_images(tmp_path: Path, image_format: str, cells: bool) -> None:
    root = synthesize(
        "semantic", tmp_path / "g", num=2, size=SIZE, seed=4, cells=cells, gray16=True,
        image_format=image_format,
    )  # fmt: skip
    rgb = synthesize("semantic", tmp_path / "rgb", num=2, size=SIZE, seed=4, cells=cells)
    (path,) = (root / "images" / "train").iterdir()
    assert path.suffix == f".{image_format}"
    data = tifffile.imread(path) if image_format == "tif" else np.asarray(Image.open(path))
    assert data.dtype == np.uint16 and data.shape == SIZE
    assert data.max() > 255  # uses the 16-bit range, not 8-bit values in a 16-bit file
    assert _files(root / "masks") == _files(rgb / "masks")  # same scenes, other rendering


def test_ignore_border_marks_only_pixels_near_things() -> None:
    plain = scene_for(3, 1, SIZE, config=SceneConfig(empty_fraction=0.0))
    border = scene_for(3, 1, SIZE, config=SceneConfig(empty_fraction=0.0, ignore_border=2))
    assert np.array_equal(plain.image, border.image)
    changed = border.semantic != plain.semantic
    assert changed.any() and np.all(border.semantic[changed] == 255)
    # a naive check: every changed pixel is within 2 px of a pixel with another instance id
    inst = plain.instances
    for r, c in zip(*np.nonzero(changed), strict=True):
        window = inst[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3]
        assert (window != inst[r, c]).any() and (window > 0).any()


def test_rle_and_stats_helpers_match_references() -> None:
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (16, 3)]:
        for fill in (0.0, 0.5, 1.0):
            mask = rng.random(shape) < fill
            rle = mask_utils.frPyObjects(uncompressed_rle(mask), *shape)
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    ids = rng.integers(0, 4, (9, 11))
    stats = segment_stats(ids)
    for value in range(4):
        assert stats[value] == (int((ids == value).sum()), _naive_bbox(ids == value))


# ----------------------------------------------------------------------------- bad input, CLI


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="valid names: instance, keypoints, panoptic, semantic"):
        synthesize("depth", tmp_path / "x", num=1)
    with pytest.raises(UserError, match="no keypoints"):
        synthesize("keypoints", tmp_path / "x", num=1, cells=True)
    with pytest.raises(UserError, match="size"):
        synthesize("semantic", tmp_path / "x", num=1, size=(8, 64))
    with pytest.raises(UserError, match="image format"):
        synthesize("semantic", tmp_path / "x", num=1, image_format="jpg")
    assert not (tmp_path / "x").exists()
    root = synthesize("semantic", tmp_path / "y", num=2, size=SIZE)
    with pytest.raises(UserError, match="not empty"):
        synthesize("semantic", root, num=2, size=SIZE)


def test_scene_options_parse_and_validate() -> None:
    config = SceneConfig.parse(["person-fraction=0.6", "thing_size=0.1,0.3", "max_things=3"])
    assert config == SceneConfig(person_fraction=0.6, thing_size=(0.1, 0.3), max_things=3)
    with pytest.raises(UserError, match="valid names: blur, cell_spacing"):
        SceneConfig.parse(["colour=red"])
    for bad in (["person_fraction=1.5"], ["blur=2,1"], ["max_things=many"], ["max_things"]):
        with pytest.raises(UserError, match="scene option"):
            SceneConfig.parse(bad)


def test_thing_colour_category_paints_things_in_their_palette_colour() -> None:
    """thing_colour=category: each shape's median colour lies near its category's palette colour
    (jitter and patterns aside) and is nearer to it than to the other categories'; "random"
    draws hues that do not follow the class. An unknown value is refused."""
    shapes_ = {c.name: np.asarray(c.color) / 255 for c in SCENE_CATEGORIES["shapes"]
               if c.name in ("ellipse", "rectangle", "triangle")}
    quiet = dict(empty_fraction=0.0, person_fraction=0.0, crowd_fraction=0.0,
                 thing_size=(0.3, 0.4), noise=(0.0, 0.0), blur=(0.0, 0.0))
    nearest = {"category": [], "random": []}
    for mode in nearest:
        config = SceneConfig(thing_colour=mode, **quiet)
        for index in range(12):
            scene = scene_for(SEED, index, (64, 64), config=config)
            for k, obj in enumerate(scene.objects, start=1):
                colour = np.median(scene.image[scene.instances == k], axis=0)  # (3,)
                distance = {name: float(np.abs(colour - c).max()) for name, c in shapes_.items()}
                nearest[mode].append(min(distance, key=distance.get) == obj.category)
                if mode == "category":
                    assert distance[obj.category] < 0.3, (index, obj.category, colour)
    assert len(nearest["category"]) >= 20 and all(nearest["category"])
    assert sum(nearest["random"]) < 0.7 * len(nearest["random"])
    with pytest.raises(UserError, match="valid names: category, random"):
        SceneConfig.parse(["thing_colour=pastel"])


def test_overwrite_replaces_only_the_layout(tmp_path: Path) -> None:
    root = synthesize("instance", tmp_path / "d", num=6, size=SIZE)
    (root / "notes.txt").write_text("mine")
    synthesize("semantic", root, num=2, size=SIZE, overwrite=True)
    assert (root / "notes.txt").read_text() == "mine"
    assert not (root / "annotations").exists()
    assert len(list((root / "images").rglob("*.png"))) == 2


def test_cli_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(
        ["data", "synth", "--task", "keypoints", "--num", "5", "--size", "40x56", "--seed", "3",
         "--out", str(out), "--val-fraction", "0.4", "--json"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["size"] == [40, 56] and summary["classes"] == ["person"]
    for split, counts in summary["splits"].items():
        data = _load(out / "annotations" / f"keypoints_{split}.json")
        assert counts == {"images": len(data["images"]), "annotations": len(data["annotations"])}
    assert summary["splits"]["val"]["images"] == 2
    assert main(["data", "synth", "--task", "semantic", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "synth", "--task", "semantic", "--size", "12x", "--out", str(out)]) == 2
    other = tmp_path / "persons"
    args = [
        "data",
        "synth",
        "--task",
        "keypoints",
        "--num",
        "3",
        "--size",
        "64",
        "--out",
        str(other),
    ]
    assert main([*args, "--scene", "nonsense=1"]) == 2 and not other.exists()
    assert (
        main([*args, "--scene", "person_fraction=1", "--scene", "empty_fraction=0", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["scene"]["person_fraction"] == 1.0
    assert sum(c["annotations"] for c in summary["splits"].values()) >= 3  # a person per image


def test_polygons_of_parts_off_the_image_are_left_out(tmp_path: Path) -> None:
    # seed 3 at 320x320 draws a person with a limb wholly left of the image: its polygon would
    # rasterise to nothing and `data check` refuses such polygons, so the writer leaves it out
    from pixelwise.data.check import check_dataset

    synthesize("instance", tmp_path, num=3, size=(320, 320), seed=3)
    assert check_dataset(tmp_path) == []
