"""`pixelwise metrics semantic|coco|panoptic`: JSON keys and values, tables, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction as Fr

import numpy as np
import pytest
from PIL import Image

from pixelwise.cli import main

SEMANTIC_KEYS = {"miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice", "per_class"}


def _semantic_set(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    # a.png: 2x4 gt [0 0 1 1 / 0 0 1 255], pred [0 1 1 1 / 0 0 0 2]
    gt_a = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
    pred_a = np.array([[0, 1, 1, 1], [0, 0, 0, 2]], np.uint8)
    # b.png: palette PNG (indices count, not colours): all class 1, predicted right
    gt_b = np.ones((3, 3), np.uint8)
    Image.fromarray(gt_a, mode="L").save(gt_dir / "a.png")
    Image.fromarray(pred_a, mode="L").save(pred_dir / "a.png")
    for folder in (gt_dir, pred_dir):
        img = Image.fromarray(gt_b, mode="P")
        img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
        img.save(folder / "b.png")
    return gt_dir, pred_dir


def test_semantic_json(tmp_path, capsys):
    gt_dir, pred_dir = _semantic_set(tmp_path)
    names = tmp_path / "classes.json"
    names.write_text(json.dumps({"classes": ["bg", "cat", "dog"], "ignore_index": 255}))
    code = main(["metrics", "semantic", "--gt", str(gt_dir), "--pred", str(pred_dir),
                 "--num-classes", "3", "--class-names", str(names), "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == SEMANTIC_KEYS
    # by hand: confusion rows gt, cols pred: bg [3, 1, 0], cat [1, 11, 0], dog [0, 0, 0]
    # (the ignored pixel's prediction "2" is not counted, so dog is absent on both sides)
    assert out["pixel_accuracy"] == pytest.approx(float(Fr(14, 16)))
    assert out["miou"] == pytest.approx(float((Fr(3, 5) + Fr(11, 13)) / 2))
    assert out["mean_accuracy"] == pytest.approx(float((Fr(3, 4) + Fr(11, 12)) / 2))
    assert out["per_class"]["dog"] == {"iou": None, "dice": None, "accuracy": None}
    assert out["per_class"]["cat"]["dice"] == pytest.approx(22 / 24)


def test_semantic_table_boundary_and_errors(tmp_path, capsys):
    gt_dir, pred_dir = _semantic_set(tmp_path)
    args = ["metrics", "semantic", "--gt", str(gt_dir), "--pred", str(pred_dir),
            "--num-classes", "3"]  # fmt: skip
    assert main(args + ["--boundary-tolerance", "1"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "boundary F (1 px)" in out and "\n  2 " in out
    assert main(args + ["--boundary-tolerance", "1", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["boundary_f"] <= 1
    (pred_dir / "b.png").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: no prediction for b.png") and "\n" not in err
    assert main(args[:-1] + ["1"]) == 2  # ground-truth label 1 is outside [0, 1)
    assert "a.png: target label 1 is outside [0, 1)" in capsys.readouterr().err


def test_coco_json(tmp_path, capsys):
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 4, "name": "box"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "area": 400,
             "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [50, 50, 40, 30], "area": 1200,
             "iscrowd": 0},
        ],
    }  # fmt: skip
    results = [{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.8}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    args = ["metrics", "coco", "--gt", str(tmp_path / "gt.json"), "--pred",
            str(tmp_path / "res.json"), "--iou-type", "bbox"]  # fmt: skip
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["AP", "AP50", "AP75", "APs", "APm", "APl",
                         "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]  # fmt: skip
    assert out["AP"] == pytest.approx(51 / 101) and out["APl"] == -1.0  # one of two found
    assert main(args) == 0
    assert "AP50" in capsys.readouterr().out
    results[0]["category_id"] = 1  # a contiguous label instead of the COCO id
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert main(args) == 2
    assert "category_id 1 is not in the ground truth" in capsys.readouterr().err


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _panoptic_set(tmp_path, things_only=False):
    cats = [{"id": 1, "name": "car", "isthing": 1}, {"id": 2, "name": "grass", "isthing": 0}]
    if things_only:
        cats = cats[:1]
    gt = np.zeros((6, 8), np.int64)
    gt[:, :4] = 300  # car (the id exercises G and B bytes: 300 = 44 + 256)
    pred = np.zeros_like(gt)
    pred[:, :3] = 70000  # 18 of 24 car px: IoU 3/4
    info_gt = [{"id": 300, "category_id": 1, "iscrowd": 0}]
    info_pred = [{"id": 70000, "category_id": 1}]
    if not things_only:
        gt[:, 4:] = 5
        pred[:, 3:] = 6  # grass predicted on 24 grass + 6 car px: IoU 24/30
        info_gt.append({"id": 5, "category_id": 2, "iscrowd": 0})
        info_pred.append({"id": 6, "category_id": 2})
    for name, ids, info in (("gt", gt, info_gt), ("pred", pred, info_pred)):
        (tmp_path / name).mkdir()
        Image.fromarray(_id2rgb(ids)).save(tmp_path / name / "x.png")
        data = {"annotations": [{"image_id": 9, "file_name": "x.png", "segments_info": info}],
                "categories": cats}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return ["metrics", "panoptic", "--gt-json", str(tmp_path / "gt.json"), "--gt-dir",
            str(tmp_path / "gt"), "--pred-json", str(tmp_path / "pred.json"), "--pred-dir",
            str(tmp_path / "pred")]  # fmt: skip


def test_panoptic_json_and_table(tmp_path, capsys):
    args = _panoptic_set(tmp_path)
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"all", "things", "stuff", "per_class"}
    assert out["things"] == {"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1}
    assert out["stuff"] == {"pq": 0.8, "sq": 0.8, "rq": 1.0, "n": 1}
    assert out["all"]["pq"] == pytest.approx(0.775)
    assert out["per_class"]["car"]["tp"] == 1
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "things" in table and "0.7750" in table


def test_panoptic_things_only_subprocess(tmp_path):
    """The real command: stdout is the JSON alone, and a group without classes is null."""
    args = _panoptic_set(tmp_path, things_only=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pixelwise", *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stuff"] == {"pq": None, "sq": None, "rq": None, "n": 0}
    assert out["all"] == out["things"] == {"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1}


def test_panoptic_on_a_synthetic_set(tmp_path, capsys):
    """The synthetic panoptic layout scores PQ 1 against itself; one dropped segment is one FN."""
    synthetic = pytest.importorskip("pixelwise.data.synthetic")
    root = synthetic.synthesize("panoptic", tmp_path / "set", num=3, size=(40, 56), seed=3)
    gt_json = root / "annotations" / "panoptic_train.json"
    gt_dir = root / "panoptic" / "train"
    args = ["metrics", "panoptic", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--json"]
    assert main([*args, "--pred-json", str(gt_json), "--pred-dir", str(gt_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["all"]["pq"] == 1.0 and out["all"]["n"] > 0
    # drop the first segment of the first image from the prediction: its pixels become void
    data = json.loads(gt_json.read_text())
    ann = data["annotations"][0]
    dropped = ann["segments_info"].pop(0)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for png in gt_dir.glob("*.png"):
        rgb = np.array(Image.open(png).convert("RGB"))
        if png.name == ann["file_name"]:
            ids = rgb.astype(np.int64) @ np.array([1, 256, 65536])  # (H, W)
            rgb[ids == dropped["id"]] = 0
        Image.fromarray(rgb).save(pred_dir / png.name)
    (tmp_path / "pred.json").write_text(json.dumps(data))
    assert (
        main([*args, "--pred-json", str(tmp_path / "pred.json"), "--pred-dir", str(pred_dir)]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    fns = {name: c["fn"] for name, c in out["per_class"].items() if c["fn"]}
    name = next(n for n, c in out["per_class"].items() if c["id"] == dropped["category_id"])
    expected_fn = 0 if dropped.get("iscrowd") else 1
    assert fns == ({name: 1} if expected_fn else {})
    assert sum(c["fp"] for c in out["per_class"].values()) == 0
