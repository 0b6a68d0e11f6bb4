"""Panoptic quality: hand-computed cases (exact fractions), a per-segment loop reference written
after panopticapi's ``pq_compute_single_core`` on random segmentations, the file reader, errors."""

from __future__ import annotations

import json
from collections import defaultdict
from fractions import Fraction as Fr

import numpy as np
import pytest
from PIL import Image

from pixelwise.errors import UserError
from pixelwise.metrics.panoptic import PanopticQuality, evaluate_panoptic_files, pair_counts

CATEGORIES = [
    {"id": 1, "name": "car", "isthing": 1},
    {"id": 2, "name": "person", "isthing": 1},
    {"id": 5, "name": "sky", "isthing": 0},
    {"id": 6, "name": "road", "isthing": 0},
]


# ---------------------------------------------------------------------------------------------
# the reference: panopticapi's per-image logic, one segment (pair) at a time in Python


def reference_stats(images, categories):
    """images: (gt_ids, gt_segments, pred_ids, pred_segments) tuples -> per-category
    {tp, fp, fn, iou} summed over the dataset, exactly in panopticapi's order of operations."""
    stats = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
    for gt_ids, gt_info, pred_ids, pred_info in images:
        gt_segms = {s["id"]: dict(s) for s in gt_info}
        pred_segms = {s["id"]: dict(s) for s in pred_info}
        for seg in gt_segms.values():
            seg["area"] = int((gt_ids == seg["id"]).sum())
        for seg in pred_segms.values():
            seg["area"] = int((pred_ids == seg["id"]).sum())
        pairs = defaultdict(int)
        for g, p in zip(gt_ids.ravel().tolist(), pred_ids.ravel().tolist()):
            pairs[g, p] += 1
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in pairs.items():
            if g not in gt_segms or p not in pred_segms:
                continue
            if gt_segms[g].get("iscrowd", 0) == 1:
                continue
            if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
                continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - pairs.get((0, p), 0)
            iou = inter / union
            if iou > 0.5:
                stats[gt_segms[g]["category_id"]]["tp"] += 1
                stats[gt_segms[g]["category_id"]]["iou"] += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd_by_cat = {}
        for g, info in gt_segms.items():
            if g in gt_matched:
                continue
            if info.get("iscrowd", 0) == 1:
                crowd_by_cat[info["category_id"]] = g
                continue
            stats[info["category_id"]]["fn"] += 1
        for p, info in pred_segms.items():
            if p in pred_matched:
                continue
            inter = pairs.get((0, p), 0)
            if info["category_id"] in crowd_by_cat:
                inter += pairs.get((crowd_by_cat[info["category_id"]], p), 0)
            if inter / info["area"] > 0.5:
                continue
            stats[info["category_id"]]["fp"] += 1
    return stats


def reference_average(stats, categories, isthing):
    pq = sq = rq = n = 0
    for cat in categories:
        if isthing is not None and (cat["isthing"] == 1) != isthing:
            continue
        s = stats[cat["id"]]
        if s["tp"] + s["fp"] + s["fn"] == 0:
            continue
        n += 1
        denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        pq += s["iou"] / denom
        sq += s["iou"] / s["tp"] if s["tp"] else 0
        rq += s["tp"] / denom
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n} if n else None


# ---------------------------------------------------------------------------------------------
# random realistic segmentations


def random_scene(rng, h, w, categories, n_things=8, crowd_p=0.15, void_p=0.5):
    """A ground truth and a plausible prediction: stuff bands, overlapping thing boxes, void."""
    things = [c["id"] for c in categories if c["isthing"]]
    stuff = [c["id"] for c in categories if not c["isthing"]]
    used = set()

    def new_id():
        while True:
            i = int(rng.integers(1, 2**24))
            if i not in used:
                used.add(i)
                return i

    def paint(objects, jitter):
        ids = np.zeros((h, w), np.int64)
        info = []
        for kind, cat, box, crowd in objects:
            y0, x0, y1, x1 = box
            if jitter:
                y0, x0, y1, x1 = (int(v + rng.integers(-jitter, jitter + 1)) for v in box)
            seg = new_id()
            ids[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = seg
            info.append({"id": seg, "category_id": cat, "iscrowd": int(crowd)})
        present = set(np.unique(ids).tolist())
        return ids, [s for s in info if s["id"] in present]

    objects = []
    if stuff:
        cut = int(rng.integers(h // 4, 3 * h // 4))
        objects.append(("stuff", int(rng.choice(stuff)), (0, 0, cut, w), False))
        objects.append(("stuff", int(rng.choice(stuff)), (cut, 0, h, w), False))
    for _ in range(n_things if things else 0):
        bh, bw = int(rng.integers(3, h // 2)), int(rng.integers(3, w // 2))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        box = (y, x, y + bh, x + bw)
        objects.append(("thing", int(rng.choice(things)), box, rng.random() < crowd_p))
    gt_ids, gt_info = paint(objects, jitter=0)
    if rng.random() < void_p:  # an unlabelled patch
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        gt_ids[y : y + int(rng.integers(2, h // 3)), x : x + int(rng.integers(2, w // 3))] = 0
        present = set(np.unique(gt_ids).tolist())
        gt_info = [s for s in gt_info if s["id"] in present]
    pred_objects = []
    for kind, cat, box, crowd in objects:
        if rng.random() < 0.1:
            continue  # missed
        if rng.random() < 0.1:  # confused category
            cat = int(rng.choice(things if kind == "thing" else stuff))
        pred_objects.append((kind, cat, box, False))
    for _ in range(int(rng.integers(0, 3))):  # hallucinated things
        if things:
            y, x = int(rng.integers(0, h - 5)), int(rng.integers(0, w - 5))
            pred_objects.append(("thing", int(rng.choice(things)), (y, x, y + 5, x + 6), False))
    pred_ids, pred_info = paint(pred_objects, jitter=max(1, min(h, w) // 12))
    return gt_ids, gt_info, pred_ids, pred_info


def _check_against_reference(images, categories):
    metric = PanopticQuality(categories)
    for gt_ids, gt_info, pred_ids, pred_info in images:
        metric.update(gt_ids, gt_info, pred_ids, pred_info)
    got = metric.compute()
    stats = reference_stats(images, categories)
    for i, cat in enumerate(categories):
        s = stats[cat["id"]]
        assert (metric.tp[i], metric.fp[i], metric.fn[i]) == (s["tp"], s["fp"], s["fn"])
        assert metric.iou[i] == pytest.approx(s["iou"], abs=1e-12)
    for group, isthing in (("all", None), ("things", True), ("stuff", False)):
        expected = reference_average(stats, categories, isthing)
        if expected is None:
            assert got[group] == {"pq": None, "sq": None, "rq": None, "n": 0}
        else:
            assert got[group]["n"] == expected["n"]
            for key in ("pq", "sq", "rq"):
                assert got[group][key] == pytest.approx(expected[key], abs=1e-12)
    return got, stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_reference_loop(seed):
    rng = np.random.default_rng(seed)
    images = [random_scene(rng, 48, 64, CATEGORIES) for _ in range(12)]
    got, stats = _check_against_reference(images, CATEGORIES)
    totals = {k: sum(s[k] for s in stats.values()) for k in ("tp", "fp", "fn")}
    assert all(v > 0 for v in totals.values()), totals  # the case exercises every outcome
    assert 0.2 < got["all"]["pq"] < 0.95


@pytest.mark.parametrize("keep", ["things", "stuff"])
def test_without_stuff_or_things(keep):
    categories = [c for c in CATEGORIES if bool(c["isthing"]) == (keep == "things")]
    rng = np.random.default_rng(7)
    images = [random_scene(rng, 32, 40, categories) for _ in range(6)]
    got, _ = _check_against_reference(images, categories)
    empty = "stuff" if keep == "things" else "things"
    assert got[empty] == {"pq": None, "sq": None, "rq": None, "n": 0}
    assert got[keep]["n"] > 0


# ---------------------------------------------------------------------------------------------
# hand-computed cases


def seg(i, cat, crowd=0):
    return {"id": i, "category_id": cat, "iscrowd": crowd}


def _row(*runs):
    """One image row from (id, length) runs."""
    return np.concatenate([np.full(n, i, np.int64) for i, n in runs])[None]  # (1, W)


def test_hand_basic_and_void():
    m = PanopticQuality(CATEGORIES)
    # image 1: sky 8 px + car 8 px; the car predicted on 6 of its px, sky takes the other 2
    gt = _row((10, 8), (20, 8))
    pred = _row((11, 10), (21, 6))
    m.update(gt, [seg(10, 5), seg(20, 1)], pred, [seg(11, 5), seg(21, 1)])
    # image 2: car 6 px | void 4 px | road 6 px. The predicted car = 4 car px + 3 void px:
    # union = 7 + 6 - 4 - 3 = 6, IoU = 4/6 (it would be 4/9 without leaving void out); the
    # predicted road = 1 void px + 6 road px: union = 7 + 6 - 6 - 1 = 6, IoU = 1
    gt = _row((30, 6), (0, 4), (40, 6))
    pred = _row((0, 2), (31, 7), (42, 7))
    m.update(gt, [seg(30, 1), seg(40, 6)], pred, [seg(31, 1), seg(42, 6)])
    got = m.compute()
    pc = got["per_class"]
    # car: TP 6/8 (image 1), TP 4/6 (image 2); road: pred 7 px (1 on void) vs 6 px -> 6/6
    assert (pc["car"]["tp"], pc["car"]["fp"], pc["car"]["fn"]) == (2, 0, 0)
    assert pc["car"]["pq"] == pytest.approx(float((Fr(6, 8) + Fr(4, 6)) / 2), abs=1e-15)
    assert pc["sky"]["pq"] == pytest.approx(float(Fr(8, 10)), abs=1e-15)
    assert pc["road"]["pq"] == 1.0
    assert pc["person"] == {"pq": None, "sq": None, "rq": None, "tp": 0, "fp": 0, "fn": 0,
                            "id": 2, "isthing": True}  # fmt: skip
    assert got["things"]["n"] == 1 and got["stuff"]["n"] == 2
    assert got["all"]["pq"] == pytest.approx(float((Fr(17, 24) + Fr(4, 5) + 1) / 3), abs=1e-15)


def test_hand_iou_exactly_half_and_ignored_prediction():
    m = PanopticQuality(CATEGORIES)
    # car 6 px, void 4 px. Predicted car: 3 car px + 4 void px: union = 7 + 6 - 3 - 4 = 6,
    # IoU = 3/6 = 0.5 -> not a match (strictly > 0.5 is needed): the car is a FN, and the
    # prediction is 4/7 void > 0.5 -> not a FP.
    gt = _row((30, 6), (0, 4))
    pred = _row((0, 3), (31, 7))
    m.update(gt, [seg(30, 1)], pred, [seg(31, 1)])
    pc = m.compute()["per_class"]["car"]
    assert (pc["tp"], pc["fp"], pc["fn"], pc["pq"]) == (0, 0, 1, 0.0)


def test_hand_crowd():
    m = PanopticQuality(CATEGORIES)
    # road 8 | crowd car 8 | car 4 | crowd person 4
    gt = _row((1, 8), (2, 8), (3, 4), (4, 4))
    gt_info = [seg(1, 6), seg(2, 1, crowd=1), seg(3, 1), seg(4, 2, crowd=1)]
    # pred: road 7 | car A: 1 road px + 5 crowd-car px -> 5/6 crowd of its class: ignored
    #       car B: 3 crowd-car px + 4 car px -> IoU with car 4/(7+4-4) = 4/7: TP
    #       person: 4 crowd-person px -> ignored; car C on the crowd *person*: a FP
    pred = _row((10, 7), (11, 6), (12, 7), (13, 2), (14, 2))
    pred_info = [seg(10, 6), seg(11, 1), seg(12, 1), seg(13, 2), seg(14, 1)]
    m.update(gt, gt_info, pred, pred_info)
    pc = m.compute()["per_class"]
    assert (pc["car"]["tp"], pc["car"]["fp"], pc["car"]["fn"]) == (1, 1, 0)  # crowd is no FN
    assert pc["car"]["pq"] == pytest.approx(float(Fr(4, 7) / Fr(3, 2)), abs=1e-15)
    assert (pc["person"]["tp"], pc["person"]["fp"], pc["person"]["fn"]) == (0, 0, 0)
    assert pc["road"]["pq"] == pytest.approx(7 / 8, abs=1e-15)  # 7 px of 8


def test_two_crowd_regions_of_one_class_follow_panopticapi():
    # panopticapi keeps only the last crowd segment of a category per image
    gt = _row((1, 6), (2, 6), (3, 6))
    gt_info = [seg(1, 1, crowd=1), seg(2, 1, crowd=1), seg(3, 6)]
    pred = _row((10, 6), (11, 6), (12, 6))
    pred_info = [seg(10, 1), seg(11, 1), seg(12, 6)]
    images = [(gt, gt_info, pred, pred_info)]
    _check_against_reference(images, CATEGORIES)
    m = PanopticQuality(CATEGORIES)
    m.update(*images[0])
    # prediction 10 sits on the first crowd region, which panopticapi forgets: a FP
    assert int(m.fp[0]) == 1


def test_category_mismatch_is_fp_and_fn():
    m = PanopticQuality(CATEGORIES)
    gt = _row((1, 5))
    pred = _row((2, 5))
    m.update(gt, [seg(1, 1)], pred, [seg(2, 2)])
    pc = m.compute()["per_class"]
    assert (pc["car"]["fn"], pc["person"]["fp"]) == (1, 1)
    assert m.compute()["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_pair_counts_against_loop():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, (20, 30)).repeat(2, 0)
    pred = rng.integers(0, 3, (20, 30)).repeat(2, 1)[:, :30].repeat(2, 0)
    pred = pred * (2**23 - 1)  # ids up to 2^24 - 2
    g, p, c = pair_counts(gt, pred)
    expected = defaultdict(int)
    for a, b in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        expected[a, b] += 1
    assert dict(zip(zip(g.tolist(), p.tolist()), c.tolist())) == dict(expected)


def test_merge_and_reset():
    rng = np.random.default_rng(5)
    images = [random_scene(rng, 24, 24, CATEGORIES) for _ in range(4)]
    whole, a, b = (PanopticQuality(CATEGORIES) for _ in range(3))
    for i, im in enumerate(images):
        whole.update(*im)
        (a if i % 2 else b).update(*im)
    a.merge(b)
    assert a.tp.tolist() == whole.tp.tolist() and a.fp.tolist() == whole.fp.tolist()
    assert a.fn.tolist() == whole.fn.tolist() and a.num_images == 4
    assert a.iou == pytest.approx(whole.iou, abs=1e-12)
    whole.reset()
    assert whole.tp.sum() == 0 and whole.compute()["all"]["n"] == 0


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "gt_info, pred_ids, pred_info, message",
    [
        ([seg(1, 1)], _row((2, 4)), [seg(2, 99)], "category_id 99 unknown"),
        ([seg(1, 1)], _row((2, 2), (3, 2)), [seg(2, 1)], r"prediction PNG has segment ids \[3\]"),
        ([seg(1, 1)], _row((2, 4)), [seg(2, 1), seg(5, 1)], r"prediction segments \[5\] are"),
        ([seg(1, 1)], _row((2, 4)), [seg(2, 1), seg(2, 1)], r"duplicate prediction segment ids"),
        ([seg(1, 1)], _row((2, 5)), [seg(2, 1)], "size"),
        ([], _row((2, 4)), [seg(2, 1)], r"ground-truth PNG has segment ids \[1\]"),
    ],
)
def test_errors_name_the_image(gt_info, pred_ids, pred_info, message):
    m = PanopticQuality(CATEGORIES)
    with pytest.raises(UserError, match=message) as err:
        m.update(_row((1, 4)), gt_info, pred_ids, pred_info, image="42 (a.png)")
    assert str(err.value).startswith("image 42 (a.png): ")


# ---------------------------------------------------------------------------------------------
# files


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def write_panoptic(root, name, images, which):
    """Write a COCO panoptic json + PNG folder from (gt_ids, gt_info, pred_ids, pred_info)."""
    folder = root / name
    folder.mkdir()
    anns = []
    for i, im in enumerate(images):
        ids, info = (im[0], im[1]) if which == "gt" else (im[2], im[3])
        Image.fromarray(_id2rgb(ids)).save(folder / f"img{i}.png")
        info = [dict(s, area=int((ids == s["id"]).sum())) for s in info]
        anns.append({"image_id": 100 + i, "file_name": f"img{i}.png", "segments_info": info})
    data = {"annotations": anns[::-1], "categories": CATEGORIES}  # order must not matter
    (root / f"{name}.json").write_text(json.dumps(data))
    return root / f"{name}.json", folder


def test_files_equal_in_memory(tmp_path):
    rng = np.random.default_rng(11)
    images = [random_scene(rng, 30, 44, CATEGORIES) for _ in range(5)]
    gt_json, gt_dir = write_panoptic(tmp_path, "gt", images, "gt")
    pred_json, pred_dir = write_panoptic(tmp_path, "pred", images, "pred")
    got = evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir)
    m = PanopticQuality(CATEGORIES)
    for im in images:
        m.update(*im)
    expected = m.compute()
    for name, cls in expected["per_class"].items():
        assert {k: got["per_class"][name][k] for k in ("tp", "fp", "fn")} == {
            k: cls[k] for k in ("tp", "fp", "fn")
        }
    assert got["all"]["pq"] == pytest.approx(expected["all"]["pq"], abs=1e-12)
    assert got["all"]["n"] == expected["all"]["n"] == 4


def test_file_errors(tmp_path):
    rng = np.random.default_rng(12)
    images = [random_scene(rng, 16, 16, CATEGORIES) for _ in range(2)]
    gt_json, gt_dir = write_panoptic(tmp_path, "gt", images, "gt")
    pred_json, pred_dir = write_panoptic(tmp_path, "pred", images[:1], "pred")
    with pytest.raises(UserError, match="no prediction for image_id 101"):
        evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir)
    pred_json, pred_dir = write_panoptic(tmp_path, "pred2", images, "pred")
    (pred_dir / "img1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="img1.png: cannot read panoptic PNG"):
        evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir)


def test_rgb2id_agrees_with_the_data_package():
    data_panoptic = pytest.importorskip("pixelwise.data.panoptic")
    from pixelwise.metrics.panoptic import rgb2id

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    assert np.array_equal(rgb2id(rgb), data_panoptic.rgb2id(rgb))


@pytest.mark.parametrize("bad", [-1, 2**24])
def test_ids_out_of_range(bad):
    m = PanopticQuality(CATEGORIES)
    with pytest.raises(UserError, match=r"image 3: prediction ids must be in \[0, 2\^24\)"):
        m.update(_row((1, 4)), [seg(1, 1)], _row((2, 3), (bad, 1)), [seg(2, 1)], image=3)
