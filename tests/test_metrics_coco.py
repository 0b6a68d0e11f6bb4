"""COCO AP wrapper: hand-built cases with known AP, and equality with pycocotools itself."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pixelwise.data.keypoints import COCO_PERSON_KEYPOINTS
from pixelwise.errors import UserError
from pixelwise.metrics.coco import COCO_STAT_NAMES, CocoEvaluator, coco_evaluate

H, W = 120, 160
HAND_SIGMAS = [0.05, 0.1, 0.08]
CATEGORIES = [
    {"id": 3, "name": "square"},
    {"id": 7, "name": "disk"},
    {"id": 1, "name": "person", "keypoints": list(COCO_PERSON_KEYPOINTS), "skeleton": []},
    {"id": 9, "name": "hand", "keypoints": ["wrist", "thumb", "index"], "sigmas": HAND_SIGMAS},
]
NUM_KP = {1: 17, 9: 3}


def _box_mask(box):
    x, y, w, h = box
    m = np.zeros((H, W), np.uint8, order="F")
    m[y : y + h, x : x + w] = 1
    return m


def _rle(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")  # as it comes from JSON
    return rle


def _keypoints(rng, box, k):
    x, y, w, h = box
    xs = rng.uniform(x, x + w, k)
    ys = rng.uniform(y, y + h, k)
    v = rng.choice([0, 1, 2], k, p=[0.2, 0.3, 0.5])
    v[0] = 2
    kp = np.stack([xs * (v > 0), ys * (v > 0), v], 1).ravel()
    return [float(a) for a in kp], int((v > 0).sum())


def make_gt(seed=0, num_images=4):
    """Boxes of all three COCO size buckets, a crowd region, keypoint objects."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id * 10, "width": W, "height": H, "file_name": f"{img_id}.png"})
        for cat in (3, 7, 1, 9):
            for size in (rng.integers(8, 28), rng.integers(40, 80), rng.integers(100, 115)):
                if rng.random() < 0.3:
                    continue
                w_, h_ = int(size), int(max(4, size * rng.uniform(0.6, 1.0)))
                box = [int(rng.integers(0, W - w_)), int(rng.integers(0, H - h_)), w_, h_]
                ann = {
                    "id": len(anns) + 1,
                    "image_id": img_id * 10,
                    "category_id": cat,
                    "bbox": [float(b) for b in box],
                    "area": float(box[2] * box[3]),
                    "segmentation": _rle(_box_mask(box)),
                    "iscrowd": int(rng.random() < 0.08),
                }
                if cat in NUM_KP:
                    ann["keypoints"], ann["num_keypoints"] = _keypoints(rng, box, NUM_KP[cat])
                anns.append(ann)
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def make_results(gt, iou_type, seed=1):
    """Jittered copies of most ground truths, random scores, some false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        if iou_type == "keypoints" and ann["category_id"] not in NUM_KP:
            continue
        for _ in range(1 + int(rng.random() < 0.3)):  # sometimes a duplicate
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.12 * np.sqrt(w * h) ** 0.5, 4)
            box = [x + jitter[0], y + jitter[1], max(2.0, w + jitter[2]), max(2.0, h + jitter[3])]
            res = {"image_id": ann["image_id"], "category_id": ann["category_id"],
                   "score": float(rng.random())}  # fmt: skip
            if iou_type == "bbox":
                res["bbox"] = [float(b) for b in box]
            elif iou_type == "segm":
                res["segmentation"] = _rle(_box_mask([round(b) for b in box]))
            else:
                kp = np.array(ann["keypoints"], float).reshape(-1, 3)
                kp[:, :2] += rng.normal(0, 2.0, (len(kp), 2))
                kp[:, 2] = 1
                res["keypoints"] = [float(a) for a in kp.ravel()]
            results.append(res)
    for img in gt["images"]:  # false positives
        cat = 1 if iou_type == "keypoints" else 3
        box = [float(rng.integers(0, 100)), float(rng.integers(0, 60)), 30.0, 40.0]
        res = {"image_id": img["id"], "category_id": cat, "score": float(rng.random())}
        if iou_type == "bbox":
            res["bbox"] = box
        elif iou_type == "segm":
            res["segmentation"] = _rle(_box_mask([int(b) for b in box]))
        else:
            kp = np.c_[rng.uniform(0, W, 17), rng.uniform(0, H, 17), np.ones(17)]  # (17, 3)
            res["keypoints"] = [float(a) for a in kp.ravel()]
        results.append(res)
    return results


def direct_pycocotools(gt, results, iou_type, cat_ids=None, sigmas=None):
    """pycocotools as its README shows it: files on disk, COCO(), loadRes, COCOeval."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.array(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(COCO_STAT_NAMES[iou_type], ev.stats.tolist()))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_equals_pycocotools(iou_type):
    gt = make_gt()
    results = make_results(gt, iou_type)
    expected = direct_pycocotools(gt, results, iou_type)
    gt_before, res_before = copy.deepcopy(gt), copy.deepcopy(results)
    got = coco_evaluate(gt, results, iou_type)
    assert got == expected
    assert list(got) == list(COCO_STAT_NAMES[iou_type])
    assert 0.05 < got["AP"] < 0.95  # a non-trivial case
    assert gt == gt_before and results == res_before  # inputs untouched


def test_keypoints_person_equals_pycocotools():
    gt = make_gt()
    gt["categories"] = [c for c in gt["categories"] if c["id"] != 9]
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != 9]
    results = make_results(gt, "keypoints")
    # pycocotools' default sigmas are COCO's 17 person sigmas; only the person category scores
    expected = direct_pycocotools(gt, results, "keypoints", cat_ids=[1])
    got = coco_evaluate(gt, results, "keypoints")
    assert got == expected
    assert list(got) == list(COCO_STAT_NAMES["keypoints"])
    assert 0.05 < got["AP"] < 0.95


def test_keypoints_per_category_sigmas():
    gt = make_gt(seed=4)
    results = make_results(gt, "keypoints", seed=5)
    hand = direct_pycocotools(gt, results, "keypoints", cat_ids=[9], sigmas=HAND_SIGMAS)
    person = direct_pycocotools(gt, results, "keypoints", cat_ids=[1])
    got = coco_evaluate(gt, results, "keypoints")
    # pycocotools averages precision over every (category, ...) cell that has ground truth, so
    # with both categories it is the mean of the two per-category numbers (ignoring -1)
    for name in COCO_STAT_NAMES["keypoints"]:
        valid = [s[name] for s in (hand, person) if s[name] > -1]
        assert got[name] == pytest.approx(sum(valid) / len(valid) if valid else -1, abs=1e-12)
    assert hand["AP"] != pytest.approx(person["AP"], abs=1e-3)  # the two really differ


def _single_category_gt():
    boxes = [[10, 10, 20, 20], [60, 50, 50, 40]]
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 3, "bbox": b, "area": b[2] * b[3],
         "iscrowd": 0, "segmentation": _rle(_box_mask(b))}
        for i, b in enumerate(boxes)
    ]  # fmt: skip
    images = [{"id": 1, "width": W, "height": H}]
    return {"images": images, "annotations": anns, "categories": [CATEGORIES[0]]}, boxes


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_and_known_miss(iou_type):
    gt, boxes = _single_category_gt()

    def result(b):
        res = {"image_id": 1, "category_id": 3, "score": 0.9}
        if iou_type == "bbox":
            res["bbox"] = b
        else:
            res["segmentation"] = _rle(_box_mask(b))
        return res

    perfect = coco_evaluate(gt, [result(b) for b in boxes], iou_type)
    # one small (400 px) and one medium (2000 px) object, no large one
    assert perfect["AP"] == perfect["AP50"] == perfect["AP75"] == 1.0
    # (pycocotools' precision is tp / (tp + fp + eps): 1 - 2e-16 in the size buckets)
    assert perfect["APs"] == perfect["APm"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["APl"] == -1.0
    assert perfect["AR1"] == 0.5 and perfect["AR10"] == perfect["AR100"] == 1.0
    # the medium object is missed: precision 1 up to recall 1/2, so 51 of the 101 recall points
    missed = coco_evaluate(gt, [result(boxes[0])], iou_type)
    assert missed["AP"] == pytest.approx(51 / 101, abs=1e-12)
    assert missed["APs"] == pytest.approx(1.0, abs=1e-12)
    assert missed["APm"] == 0.0 and missed["AR100"] == 0.5


def test_empty_results_score_zero():
    gt, _ = _single_category_gt()
    got = coco_evaluate(gt, [], "bbox")
    assert got["AP"] == 0.0 and got["AR100"] == 0.0 and got["APl"] == -1.0


def test_files_and_dict_results(tmp_path):
    gt = make_gt(num_images=2)
    results = make_results(gt, "bbox")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps({"annotations": results}))
    assert coco_evaluate(tmp_path / "gt.json", tmp_path / "res.json", "bbox") == coco_evaluate(
        gt, results, "bbox"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(category_id=0), "category_id 0 is not in the ground truth"),
        (lambda r: r.update(image_id=999), "image_id 999 is not in the ground truth"),
        (lambda r: r.pop("bbox"), "has no 'bbox'"),
        (lambda r: r.pop("score"), "has no 'score'"),
    ],
)
def test_bad_results(change, message):
    gt, boxes = _single_category_gt()
    res = {"image_id": 1, "category_id": 3, "score": 0.9, "bbox": boxes[0]}
    change(res)
    with pytest.raises(UserError, match=message):
        coco_evaluate(gt, [res], "bbox")


def test_bad_keypoint_count_and_iou_type():
    gt = make_gt(num_images=1)
    res = [{"image_id": 10, "category_id": 9, "score": 1.0, "keypoints": [1.0, 2.0, 1.0] * 4}]
    with pytest.raises(UserError, match="12 keypoint values; the schema has 3"):
        coco_evaluate(gt, res, "keypoints")
    with pytest.raises(UserError, match="unknown iou type 'mask'"):
        coco_evaluate(gt, [], "mask")


@pytest.mark.parametrize(
    "iou_type, drop, message",
    [
        ("bbox", "area", "annotation id 1 has no 'area'"),
        ("segm", "segmentation", "annotation id 1 has no 'segmentation'"),
        ("bbox", "bbox", "annotation id 1 has no 'bbox'"),
    ],
)
def test_bad_ground_truth(iou_type, drop, message):
    gt, _ = _single_category_gt()
    del gt["annotations"][0][drop]
    with pytest.raises(UserError, match=message):
        coco_evaluate(gt, [], iou_type)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_streaming_equals_one_call(iou_type):
    gt = make_gt(seed=2, num_images=6)
    results = make_results(gt, iou_type, seed=3)
    expected = coco_evaluate(gt, results, iou_type)
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    ids = [img["id"] for img in gt["images"]]  # 10, 20, ..., 60
    a, b = CocoEvaluator(gt, iou_type), CocoEvaluator(gt, iou_type)
    a.update(by_image[30] + by_image[10])  # a batch of two images, out of order
    a.update([], image_ids=[50])  # an image with nothing detected on it (dropped results)
    b.update(by_image[20])
    b.update(by_image[60], image_ids=[60])
    # image 40 is never updated: it counts as an image without detections, like image 50
    results_seen = [r for r in results if r["image_id"] not in (40, 50)]
    assert a.merge(b).compute() == coco_evaluate(gt, results_seen, iou_type)
    full = CocoEvaluator(gt, iou_type)
    for i in ids:
        full.update(by_image.get(i, []), image_ids=[i])
    assert full.compute() == expected
    with pytest.raises(UserError, match=r"images \[10\] were already evaluated"):
        full.update(by_image[10])


def _crowded(n=150):
    """One image with n small disjoint squares (a 15 x 10 grid) and perfect detections whose
    scores fall with the index."""
    boxes = [[1 + 10 * (i % 15), 1 + 12 * (i // 15), 8, 8] for i in range(n)]
    gt = {"images": [{"id": 1, "width": W, "height": H, "file_name": "1.png"}],
          "categories": [CATEGORIES[0]],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 3, "bbox": b, "area": 64,
                           "iscrowd": 0, "segmentation": _rle(_box_mask(b))}
                          for i, b in enumerate(boxes)]}
    results = [{"image_id": 1, "category_id": 3, "score": 1.0 - i / (2 * n), "bbox": b,
                "segmentation": _rle(_box_mask(b))} for i, b in enumerate(boxes)]
    return gt, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_max_dets_lifts_the_recall_cap_of_crowded_images(iou_type):
    """150 objects found perfectly: pycocotools' default 100 detections cap recall at 2/3 (AP50
    = 67/101 recall points); max_dets=150 scores every one. Both equal pycocotools itself with
    params.maxDets set by hand."""
    gt, results = _crowded()
    capped = coco_evaluate(gt, results, iou_type)
    assert capped["AP50"] == pytest.approx(67 / 101, abs=1e-12)
    assert capped["AR100"] == pytest.approx(100 / 150)
    full = coco_evaluate(gt, results, iou_type, max_dets=150)
    assert full["AP"] == full["AP50"] == full["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert full["AR150"] == 1.0 and full["AR10"] == pytest.approx(10 / 150)
    assert list(full) == [("AR150" if k == "AR100" else k) for k in COCO_STAT_NAMES[iou_type]]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools by hand, same limits
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        ev.params.maxDets = [1, 10, 150]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # every stat but AP, which pycocotools' summarize reports as -1 under a limit other than 100
    assert ev.stats[0] == -1.0 and list(full.values())[1:] == ev.stats.tolist()[1:]
    streamed = CocoEvaluator(gt, iou_type, max_dets=150)
    streamed.update(results, [1])
    assert streamed.compute() == full
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="max detections per image"):
            coco_evaluate(gt, results, iou_type, max_dets=bad)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_own_limit_stats_equal_pycocotools_summarize_at_its_limits(iou_type):
    """The stats read from the accumulated tables (used for max_dets) equal pycocotools'
    summarize() when the limits are its defaults (100 / 20)."""
    from pixelwise.metrics.coco import _stats_at_own_max_dets

    gt = make_gt(seed=2)
    if iou_type == "keypoints":
        gt["categories"] = [c for c in gt["categories"] if c["id"] != 9]
        gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != 9]
    results = make_results(gt, iou_type, seed=3)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        if iou_type == "keypoints":
            ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert _stats_at_own_max_dets(ev, iou_type) == ev.stats.tolist()
    assert 0.05 < ev.stats[0] < 0.95
    limit = 20 if iou_type == "keypoints" else 100  # the same limit, given explicitly
    default = coco_evaluate(gt, results, iou_type)
    explicit = coco_evaluate(gt, results, iou_type, max_dets=limit)
    assert list(explicit.values()) == list(default.values())


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_per_category_ap_equals_pycocotools_on_that_category_alone(iou_type):
    """Each category's AP / AP50 (detectron2's per-category table) equals pycocotools'
    summary of an evaluation restricted to that category."""
    gt = make_gt(seed=4, num_images=5)
    results = make_results(gt, iou_type, seed=5)
    evaluator = CocoEvaluator(gt, iou_type)
    evaluator.update(results, image_ids=[img["id"] for img in gt["images"]])
    stats, per_category = evaluator.compute_with_categories()
    assert stats == coco_evaluate(gt, results, iou_type)
    cats = sorted(NUM_KP) if iou_type == "keypoints" else sorted(c["id"] for c in CATEGORIES)
    assert sorted(per_category) == cats
    nontrivial = 0
    for cat_id in cats:
        # pycocotools' COCOeval takes one set of sigmas: the hand's for the hand alone
        sigmas = HAND_SIGMAS if cat_id == 9 and iou_type == "keypoints" else None
        alone = direct_pycocotools(gt, results, iou_type, cat_ids=[cat_id], sigmas=sigmas)
        assert per_category[cat_id]["AP"] == pytest.approx(alone["AP"], abs=1e-12)
        assert per_category[cat_id]["AP50"] == pytest.approx(alone["AP50"], abs=1e-12)
        nontrivial += 0.05 < alone["AP"] < 0.95
    assert nontrivial >= 1


def test_per_category_ap_is_none_without_ground_truth():
    gt, _ = _single_category_gt()
    gt["categories"] = [*gt["categories"], {"id": 99, "name": "never"}]
    evaluator = CocoEvaluator(gt, "bbox")
    evaluator.update([{"image_id": gt["images"][0]["id"], "category_id": 99,
                       "bbox": [0, 0, 10, 10], "score": 0.9}])
    _, per_category = evaluator.compute_with_categories()
    assert per_category[99] == {"AP": None, "AP50": None}
