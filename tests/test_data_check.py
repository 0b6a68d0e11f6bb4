"""`pixelwise data check`: a corrupted copy of a synthetic set, one corruption per problem kind.

Each case copies a clean synthetic set (semantic, instance, keypoints or panoptic), breaks one
file, runs the CLI in-process and asserts exit 1 with a line naming the broken file and the
problem; the clean sets give exit 0. The RLE decoder is compared with pycocotools' encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.check import (
    annotation_problems,
    check_dataset,
    check_dataset_report,
    decode_rle_counts,
    rle_problem,
)
from pixelwise.data.synthetic import synthesize

TASKS = ("semantic", "instance", "keypoints", "panoptic")
SIZE = (32, 48)  # H, W


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synthetic")
    return {task: synthesize(task, base / task, num=6, size=SIZE, seed=7) for task in TASKS}


def _run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(["data", "check", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


@pytest.mark.parametrize("task", TASKS)
def test_clean_synthetic_sets_pass(clean, capsys, task: str) -> None:
    code, lines, _ = _run(capsys, str(clean[task]))
    assert code == 0, lines
    assert len(lines) == 1 and lines[0].startswith(f"OK: {clean[task]} (pixelwise layout")
    code, lines, _ = _run(capsys, str(clean[task]), "--json")
    report = json.loads("\n".join(lines))
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["counts"]["images"] == 6


# ----------------------------------------------------------------------------- corruptions


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def _first(root: Path, folder: str) -> Path:
    return sorted((root / folder / "train").iterdir())[0]


def _edit_json(root: Path, kind: str, edit: Callable[[dict], None]) -> Path:
    path = root / "annotations" / f"{kind}_train.json"
    data = _load(path)
    edit(data)
    _save(path, data)
    return path


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _first_ann(data: dict, test: Callable[[dict], bool]) -> dict:
    return next(a for a in data["annotations"] if test(a))


def truncated_image(root: Path) -> Path:
    return _truncate(_first(root, "images"))


def garbage_image(root: Path) -> Path:
    path = _first(root, "images")
    path.write_bytes(os.urandom(200))
    return path


def bomb_image(root: Path) -> Path:
    path = _first(root, "images")
    path.write_bytes(_bomb_png(60_000, 60_000))  # 3.6 G pixels claimed by the header
    return path


def _save_labels(path: Path, labels: np.ndarray) -> None:
    """Save class indices as a palette PNG (with a full palette, so Pillow keeps the indices)."""
    image = Image.fromarray(labels.astype(np.uint8))
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


def mask_size(root: Path) -> Path:
    path = _first(root, "masks")
    _save_labels(path, np.asarray(Image.open(path))[:-3])  # 3 rows short
    return path


def label_values(root: Path) -> Path:
    path = _first(root, "masks")
    labels = np.array(Image.open(path))
    labels[0, 0] = 200  # 7 classes and ignore 255: 200 is neither
    _save_labels(path, labels)
    return path


def missing_mask(root: Path) -> Path:
    _first(root, "masks").unlink()
    return _first(root, "images")


def _set_rle(data: dict, rle: dict) -> None:
    _first_ann(data, lambda a: isinstance(a["segmentation"], dict))["segmentation"] = rle


def rle_bad_counts(root: Path) -> Path:
    # a compressed RLE whose runs stop short of H*W (pycocotools would read uninitialised memory)
    def edit(data):
        _set_rle(data, {"size": list(SIZE), "counts": "0`0"})

    return _edit_json(root, "instances", edit)


def rle_bad_size(root: Path) -> Path:
    def edit(data):
        ann = _first_ann(data, lambda a: isinstance(a["segmentation"], dict))
        ann["segmentation"]["size"] = [SIZE[0] + 1, SIZE[1]]

    return _edit_json(root, "instances", edit)


def rle_bad_character(root: Path) -> Path:
    def edit(data):
        _set_rle(data, {"size": list(SIZE), "counts": "abc\u00e9~~"})

    return _edit_json(root, "instances", edit)


def polygon_odd(root: Path) -> Path:
    def edit(data):
        ann = _first_ann(data, lambda a: isinstance(a["segmentation"], list))
        ann["segmentation"][0] = ann["segmentation"][0][:-1]

    return _edit_json(root, "instances", edit)


def polygon_two_points(root: Path) -> Path:
    def edit(data):
        _first_ann(data, lambda a: isinstance(a["segmentation"], list))["segmentation"] = [
            [1.0, 1.0, 5.0, 5.0]]

    return _edit_json(root, "instances", edit)


def box_outside(root: Path) -> Path:
    def edit(data):
        data["annotations"][0]["bbox"] = [SIZE[1] - 2, 3, 10, 5]  # 8 px beyond the right border

    return _edit_json(root, "instances", edit)


def keypoint_count(root: Path) -> Path:
    def edit(data):
        data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]

    return _edit_json(root, "keypoints", edit)


def duplicate_image_id(root: Path) -> Path:
    def edit(data):
        data["images"][1]["id"] = data["images"][0]["id"]

    return _edit_json(root, "instances", edit)


def duplicate_annotation_id(root: Path) -> Path:
    def edit(data):
        data["annotations"][1]["id"] = data["annotations"][0]["id"]

    return _edit_json(root, "instances", edit)


def duplicate_segment_id(root: Path) -> Path:
    def edit(data):
        segments = data["annotations"][0]["segments_info"]
        segments[1]["id"] = segments[0]["id"]

    return _edit_json(root, "panoptic", edit)


def panoptic_unlisted_segment(root: Path) -> Path:
    path = root / "annotations" / "panoptic_train.json"
    data = _load(path)
    data["annotations"][0]["segments_info"].pop()
    _save(path, data)
    return root / "panoptic" / "train" / data["annotations"][0]["file_name"]


def panoptic_truncated_png(root: Path) -> Path:
    return _truncate(_first(root, "panoptic"))


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def escaping_file_name(root: Path) -> Path:
    (root.parent / "secret.png").write_bytes(_first(root, "images").read_bytes())

    def edit(data):
        data["images"][0]["file_name"] = "../../../secret.png"

    return _edit_json(root, "instances", edit)


def absolute_file_name(root: Path) -> Path:
    def edit(data):
        data["images"][0]["file_name"] = str(_first(root, "images").resolve())

    return _edit_json(root, "panoptic", edit)


def symlink_file_name(root: Path) -> Path:
    outside = root.parent / "outside.png"
    outside.write_bytes(_first(root, "images").read_bytes())
    os.symlink(outside, root / "images" / "train" / "link.png")

    def edit(data):
        data["images"][0]["file_name"] = "link.png"

    return _edit_json(root, "instances", edit)


def json_size_differs(root: Path) -> Path:
    def edit(data):
        data["images"][0]["width"] += 1

    return _edit_json(root, "instances", edit)


def invalid_json(root: Path) -> Path:
    path = root / "annotations" / "keypoints_train.json"
    path.write_text(path.read_text()[:100])
    return path


# name: (task, corruption returning the file that must be named, fragment of the message)
CORRUPTIONS = {
    "truncated_image": ("semantic", truncated_image, "corrupt or truncated image"),
    "garbage_image": ("instance", garbage_image, "not an image file"),
    "bomb_image": ("keypoints", bomb_image, "over the pixel limit"),
    "mask_size": ("semantic", mask_size, "mask size 29x48 differs from the image size 32x48"),
    "label_values": ("semantic", label_values, "label values [200] outside the 7 classes"),
    "missing_mask": ("semantic", missing_mask, "no mask"),
    "rle_bad_counts": ("instance", rle_bad_counts, "RLE runs cover"),
    "rle_bad_size": ("instance", rle_bad_size, "RLE size 33x48 differs"),
    "rle_bad_character": ("instance", rle_bad_character, "invalid compressed RLE counts"),
    "polygon_odd": ("instance", polygon_odd, "odd number of coordinates"),
    "polygon_two_points": ("instance", polygon_two_points, "a polygon needs at least 3"),
    "box_outside": ("instance", box_outside, "is outside the 48x32 image"),
    "keypoint_count": ("keypoints", keypoint_count, "16 keypoints but category 'person' has 17"),
    "duplicate_image_id": ("instance", duplicate_image_id, "duplicate image id"),
    "duplicate_annotation_id": ("instance", duplicate_annotation_id, "duplicate annotation id"),
    # (the PNG then also holds an id that segments_info no longer lists)
    "duplicate_segment_id": ("panoptic", duplicate_segment_id, "duplicate segment id"),
    "panoptic_unlisted_segment": ("panoptic", panoptic_unlisted_segment,
                                  "are in the PNG but not in panoptic_train.json"),
    "panoptic_truncated_png": ("panoptic", panoptic_truncated_png, "corrupt or truncated"),
    "escaping_file_name": ("instance", escaping_file_name, "escapes the dataset root"),
    "absolute_file_name": ("panoptic", absolute_file_name, "escapes the dataset root"),
    "symlink_file_name": ("instance", symlink_file_name, "escapes the dataset root"),
    "json_size_differs": ("instance", json_size_differs, "the json says 49x32"),
    "invalid_json": ("keypoints", invalid_json, "not valid JSON"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_problem_is_reported_naming_the_file(clean, tmp_path: Path, capsys, name: str
                                                  ) -> None:
    task, corrupt, fragment = CORRUPTIONS[name]
    root = Path(shutil.copytree(clean[task], tmp_path / "set"))
    broken = corrupt(root)
    code, lines, err = _run(capsys, str(root))
    assert code == 1
    assert "Traceback" not in err
    named = [line for line in lines if line.startswith(f"{broken}: ")]
    assert any(fragment in line for line in named), (fragment, lines)
    if "escapes" in fragment:
        assert any("refused" in line for line in named)
    # nothing else is blamed: every problem names the broken file
    others = [line for line in lines if not line.startswith(f"{broken}: ")]
    if name == "duplicate_segment_id":  # a consequence: the PNG id has lost its entry
        others = [line for line in others if "in the PNG but not in" not in line]
    if name == "symlink_file_name":  # the folder walk refuses the link itself too
        assert others == [f"{root}/images/train/link.png: symbolic link leads outside "
                          f"{root}/images/train; refused"]
        others = []
    assert others == []
    # --json carries the same problems
    code, out, _ = _run(capsys, str(root), "--json")
    report = json.loads("\n".join(out))
    assert code == 1 and not report["ok"]
    assert [f"{p['path']}: {p['message']}" for p in report["problems"]] == lines


def test_all_corruptions_at_once_one_report(clean, tmp_path: Path) -> None:
    # several problems in one set are all reported (the walk never stops at the first)
    root = Path(shutil.copytree(clean["instance"], tmp_path / "set"))
    broken = {box_outside(root), truncated_image(root)}
    broken.add(root / "annotations" / "instances_train.json")
    problems = check_dataset(root)
    assert {p.path for p in problems} == broken
    assert len(problems) >= 2


def test_max_pixels_option(clean, capsys) -> None:
    code, lines, _ = _run(capsys, str(clean["semantic"]), "--max-pixels", "100")
    assert code == 1 and lines and all("over the pixel limit of 100" in line for line in lines)
    assert _run(capsys, str(clean["semantic"]), "--max-pixels", "0")[0] == 0  # no limit


def test_not_a_dataset_is_a_user_error(tmp_path: Path, capsys) -> None:
    code, lines, err = _run(capsys, str(tmp_path))
    assert code == 2 and "no dataset found" in err and "Traceback" not in err


def test_missing_classes_json(clean, tmp_path: Path) -> None:
    root = Path(shutil.copytree(clean["semantic"], tmp_path / "set"))
    (root / "classes.json").unlink()
    problems = check_dataset(root)
    assert [str(p.path) for p in problems] == [str(root / "classes.json")]


def test_voc_problems(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "JPEGImages" / "a.jpg")
    _save_labels(root / "SegmentationClass" / "a.png", np.full((8, 10), 21))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    problems = [str(p) for p in check_dataset(root)]
    mask = root / "SegmentationClass" / "a.png"
    assert problems == [
        f"{root / 'JPEGImages' / 'b.jpg'}: file not found (listed in val.txt)",
        f"{root / 'SegmentationClass' / 'b.png'}: file not found (listed in val.txt)",
        f"{mask}: label values [21] outside the 21 classes (0..20, ignore 255)",
    ]


# ----------------------------------------------------------------------------- robustness

JUNK = [None, "x", -1, 1.5, [], {}, [[]], [None], {"size": "x"}, [1, 2, "a"], True, 1e300]


@pytest.mark.parametrize("kind", ["instances", "keypoints", "panoptic"])
def test_junk_values_never_traceback(clean, tmp_path: Path, kind: str) -> None:
    """Every field of the first image, annotation, category and segment set to junk in turn."""
    task = {"instances": "instance"}.get(kind, kind)
    root = Path(shutil.copytree(clean[task], tmp_path / "set"))
    path = root / "annotations" / f"{kind}_train.json"
    original = _load(path)
    entries = [("images", original["images"][0]), ("annotations", original["annotations"][0]),
               ("categories", original["categories"][0])]
    if kind == "panoptic":
        entries.append(("segments", original["annotations"][0]["segments_info"][0]))
    cases = [("top", key) for key in ("images", "annotations", "categories")]
    cases += [(where, key) for where, entry in entries for key in entry]
    for where, key in cases:
        for junk in JUNK:
            data = json.loads(json.dumps(original))
            if where == "top":
                data[key] = junk
            elif where == "segments":
                data["annotations"][0]["segments_info"][0][key] = junk
            else:
                data[where][0][key] = junk
            _save(path, data)
            problems = check_dataset(root)  # must not raise
            assert all(isinstance(str(p), str) for p in problems)
    for junk in (b"", b"\xff\xfe", b"[]", b"null", b"{" * 5000):
        path.write_bytes(junk)
        problems = check_dataset(root)
        assert problems and all(p.path == path for p in problems)


def test_subprocess_prints_one_line_per_problem(clean, tmp_path: Path) -> None:
    root = Path(shutil.copytree(clean["panoptic"], tmp_path / "set"))
    broken = _truncate(_first(root, "images"))
    result = subprocess.run([sys.executable, "-m", "pixelwise", "data", "check", str(root)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0].startswith(f"{broken}: corrupt or truncated image")


# ----------------------------------------------------------------------------- RLE and helpers


def test_decode_rle_counts_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        h, w = rng.integers(1, 40, 2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if trial % 3 == 0:
            mask[:] = trial % 2  # all zeros or all ones
        rle = mask_utils.encode(np.asfortranarray(mask))
        flat = mask.ravel(order="F")  # column-major, as COCO's RLE
        # naive run lengths, starting with a run of zeros
        runs, value, count = [], 0, 0
        for v in flat:
            if v == value:
                count += 1
            else:
                runs.append(count)
                value, count = v, 1
        runs.append(count)
        assert decode_rle_counts(rle["counts"]) == runs
        assert decode_rle_counts(rle["counts"].decode()) == runs
        assert rle_problem({"size": [int(h), int(w)], "counts": rle["counts"].decode()},
                           int(h), int(w)) is None


@pytest.mark.parametrize("counts, message", [
    ("0", "cover 0 pixels"),               # one empty run
    ("P", "the string ends inside a count"),  # continuation bit set on the last character
    ("0 ", "not in '0'..'o'"),
    ([3, -1, 4], "negative run lengths"),
    ([1, 2], "cover 3 pixels, not 2x3 = 6"),
    ("x", "not in '0'..'o'"),
])
def test_rle_problem_cases(counts, message: str) -> None:
    assert message in rle_problem({"size": [2, 3], "counts": counts}, 2, 3)


def test_annotation_problems_keypoints() -> None:
    category = {"id": 1, "name": "person", "keypoints": ["a", "b"]}
    ok = {"bbox": [1, 1, 2, 2], "keypoints": [1, 1, 2, 0, 0, 0], "num_keypoints": 1}
    assert annotation_problems(ok, 10, 10, category) == []
    assert annotation_problems(dict(ok, num_keypoints=2), 10, 10, category) == [
        "num_keypoints is 2 but 1 keypoints have v > 0"]
    assert "visibility values [3]" in annotation_problems(
        dict(ok, keypoints=[1, 1, 3, 0, 0, 0]), 10, 10, category)[0]
    assert "outside the 10x10 image" in annotation_problems(
        dict(ok, keypoints=[50, 1, 2, 0, 0, 0]), 10, 10, category)[0]
    assert "no keypoints" in annotation_problems({"bbox": [1, 1, 2, 2]}, 10, 10, category)[0]


def test_report_summary_counts(clean) -> None:
    report = check_dataset_report(clean["panoptic"])
    assert report.ok and report.kind == "pixelwise" and report.splits == ["train", "val"]
    assert report.counts["panoptic_pngs"] == 6 and report.counts["annotation_files"] == 2
