"""pixelwise.data.layout: safe paths, layout discovery (pixelwise and VOC), classes.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pixelwise.data.layout import (
    VOC_CLASSES,
    BadFileError,
    Problem,
    detect_layout,
    find_split,
    read_classes,
    safe_join,
    semantic_pairs,
)
from pixelwise.errors import UserError


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- safe_join


@pytest.mark.parametrize("relative", ["a.png", "sub/a.png", "./a.png", "sub/deeper/b.jpg"])
def test_safe_join_accepts_paths_inside(tmp_path: Path, relative: str) -> None:
    assert safe_join(tmp_path, relative) == tmp_path / relative


ESCAPES = {
    "dotdot": "../secret.png",
    "dotdot_inside": "sub/../../secret.png",
    "dotdot_windows": "..\\..\\secret.png",
    "absolute": "/etc/passwd",
    "windows_drive": "C:\\Windows\\win.ini",
    "windows_unc": "\\\\server\\share\\a.png",
    "empty": "",
    "nul": "a\0.png",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_safe_join_refuses_escapes(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError) as info:
        safe_join(tmp_path, ESCAPES[name])
    assert repr(ESCAPES[name]) in str(info.value) or name == "empty"


def test_safe_join_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _touch(outside / "secret.png")
    _touch(root / "real.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    os.symlink(root / "real.png", root / "inner.png")
    with pytest.raises(UserError, match="symbolic link"):
        safe_join(root, "link.png")
    with pytest.raises(UserError, match="symbolic link"):
        safe_join(root, "linkdir/secret.png")
    assert safe_join(root, "inner.png") == root / "inner.png"  # a link that stays inside


def test_safe_join_root_itself_a_symlink(tmp_path: Path) -> None:
    _touch(tmp_path / "data" / "a.png")
    os.symlink(tmp_path / "data", tmp_path / "alias")
    assert safe_join(tmp_path / "alias", "a.png") == tmp_path / "alias" / "a.png"


# ----------------------------------------------------------------------------- discovery


def test_pixelwise_layout_splits(tmp_path: Path) -> None:
    _touch(tmp_path / "images" / "val" / "a.png")
    _touch(tmp_path / "masks" / "val" / "a.png")
    _touch(tmp_path / "annotations" / "instances_train.json", b"{}")
    _touch(tmp_path / "annotations" / "panoptic_val.json", b"{}")
    _touch(tmp_path / "annotations" / "notes.json", b"{}")  # not a layout file: ignored
    _touch(tmp_path / "classes.json", b"{}")
    layout = detect_layout(tmp_path)
    assert layout.kind == "pixelwise" and list(layout.splits) == ["train", "val"]
    train, val = layout.split("train"), layout.split("val")
    assert not train.has_images and not train.has_masks
    assert train.annotations == {"instances": tmp_path / "annotations" / "instances_train.json"}
    assert val.has_images and val.has_masks and list(val.annotations) == ["panoptic"]
    assert layout.classes_json == tmp_path / "classes.json"
    with pytest.raises(UserError, match=r"no 'test' split \(found: train, val\)"):
        layout.split("test")
    assert find_split(tmp_path, "val") == val


def test_split_order_train_val_test_first(tmp_path: Path) -> None:
    for name in ("zeta", "val", "alpha", "test", "train"):
        (tmp_path / "images" / name).mkdir(parents=True)
    assert list(detect_layout(tmp_path).splits) == ["train", "val", "test", "alpha", "zeta"]


def _voc(root: Path, splits=("train", "val")) -> Path:
    for name in ("a", "b"):
        _touch(root / "JPEGImages" / f"{name}.jpg")
        _touch(root / "SegmentationClass" / f"{name}.png")
    for i, split in enumerate(splits):
        _touch(root / "ImageSets" / "Segmentation" / f"{split}.txt", f"{'ab'[i]}\n".encode())
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_voc_layout(tmp_path: Path, nested: bool) -> None:
    voc = _voc(tmp_path / "VOCdevkit" / "VOC2012")
    layout = detect_layout(tmp_path / "VOCdevkit" if nested else voc)
    assert layout.kind == "voc" and layout.root == voc
    assert list(layout.splits) == ["train", "val"]
    assert layout.split("val").image_ids == ("b",)
    classes = layout.classes()
    assert classes.names == VOC_CLASSES and classes.num_classes == 21
    assert classes.ignore_index == 255
    pairs, problems = semantic_pairs(layout.split("train"))
    assert pairs == [(voc / "JPEGImages" / "a.jpg", voc / "SegmentationClass" / "a.png")]
    assert problems == []


def test_voc_val_only_and_bad_ids(tmp_path: Path) -> None:
    voc = _voc(tmp_path, splits=("val",))
    lst = voc / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_text("a\n../../escape\nmissing\n")
    split = find_split(voc, "val")
    with pytest.raises(UserError, match="found: val"):
        find_split(voc, "train")
    pairs, problems = semantic_pairs(split)
    assert [p[0].name for p in pairs] == ["a.jpg"]
    assert problems[0].path == lst and "line 2" in problems[0].message
    assert "escapes the dataset root" in problems[0].message
    missing = {p.path.name for p in problems[1:]}
    assert missing == {"missing.jpg", "missing.png"}


def test_pixelwise_semantic_pairs_problems(tmp_path: Path) -> None:
    for name in ("a.png", "b.jpg", "b.png", "c.png"):
        _touch(tmp_path / "images" / "train" / name)
    for name in ("a.png", "b.png", "orphan.png"):
        _touch(tmp_path / "masks" / "train" / name)
    _touch(tmp_path / "images" / "train" / "README.txt")  # not an image: ignored
    pairs, problems = semantic_pairs(find_split(tmp_path, "train"))
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.jpg", "b.png")]
    text = [str(p) for p in problems]
    root = tmp_path
    assert text[0].startswith(f"{root}/images/train/b.png: two images named 'b'")
    assert text[1].startswith(f"{root}/images/train/c.png: no mask")
    assert text[2].startswith(f"{root}/masks/train/orphan.png: mask without an image")
    assert len(text) == 3


def test_semantic_pairs_refuse_links_leaving_their_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "elsewhere" / "x.png")
    _touch(tmp_path / "images" / "train" / "a.png")
    _touch(tmp_path / "masks" / "train" / "b.png")
    os.symlink(tmp_path / "elsewhere" / "x.png", tmp_path / "masks" / "train" / "a.png")
    os.symlink(tmp_path / "elsewhere" / "x.png", tmp_path / "images" / "train" / "b.png")
    pairs, problems = semantic_pairs(find_split(tmp_path, "train"))
    assert pairs == []
    assert [str(p) for p in problems] == [
        f"{tmp_path}/masks/train/a.png: symbolic link leads outside {tmp_path}/masks/train; "
        "refused",
        f"{tmp_path}/images/train/b.png: symbolic link leads outside {tmp_path}/images/train; "
        "refused",
    ]


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no dataset found"):
        detect_layout(tmp_path)
    with pytest.raises(UserError, match="not found"):
        detect_layout(tmp_path / "nope")


# ----------------------------------------------------------------------------- classes.json


def test_read_classes(tmp_path: Path) -> None:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": ["bg", "cat"], "ignore_index": 255}))
    classes = read_classes(path)
    assert classes.names == ("bg", "cat") and classes.ignore_index == 255
    path.write_text(json.dumps({"classes": ["bg", "cat"]}))
    assert read_classes(path).ignore_index == 255  # the default
    assert read_classes(path).colors is None
    path.write_text(json.dumps({"classes": ["bg", "cat"], "colors": [[0, 0, 0], [255, 9, 1]]}))
    assert read_classes(path).colors == ((0, 0, 0), (255, 9, 1))


BAD_CLASSES = {
    "not_json": ("{", "not valid JSON"),
    "no_list": ('{"names": []}', "expected"),
    "empty": ('{"classes": []}', "at least one"),
    "not_strings": ('{"classes": [1, 2]}', "expected"),
    "duplicates": ('{"classes": ["a", "a"]}', "duplicate class names"),
    "ignore_is_a_class": ('{"classes": ["a", "b"], "ignore_index": 1}', "also a class index"),
    "ignore_not_int": ('{"classes": ["a"], "ignore_index": "255"}', "must be an integer"),
    "colors_count": ('{"classes": ["a", "b"], "colors": [[1, 2, 3]]}', "colors must be one"),
    "colors_range": ('{"classes": ["a"], "colors": [[1, 2, 256]]}', "colors must be one"),
    "colors_shape": ('{"classes": ["a"], "colors": [[1, 2]]}', "colors must be one"),
    "colors_type": ('{"classes": ["a"], "colors": [[1, 2, true]]}', "colors must be one"),
}


@pytest.mark.parametrize("name", list(BAD_CLASSES))
def test_read_classes_errors_name_the_file(tmp_path: Path, name: str) -> None:
    text, fragment = BAD_CLASSES[name]
    path = tmp_path / "classes.json"
    path.write_text(text)
    with pytest.raises(BadFileError) as info:
        read_classes(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_problem_str_and_error() -> None:
    problem = Problem(Path("d/x.png"), "broken")
    assert str(problem) == "d/x.png: broken" == str(problem.to_error())
    assert problem.to_error().problem == problem
