"""Benchmark: panoptic quality, pixelwise's vectorised PQ against a panopticapi-style loop.

    .venv/bin/python benchmarks/metrics.py [--images 100] [--size 512] [--repeats 3] [--seed 0]

Scenes: random realistic panoptic segmentations (stuff regions from a distorted Voronoi
partition, a few dozen overlapping thing ellipses of log-uniform sizes, crowd things, void blobs
and void rings around some things) and predictions derived from them (jittered shapes, missed,
confused and hallucinated segments). Both methods get the same in-memory id maps and
segments_info (PNG decoding, common to both, is left out).

The peer is panopticapi's ``pq_compute_single_core`` logic written out here: ``np.unique`` over
the combined (gt, pred) ids of every pixel, then Python loops over the pairs and segments. The
two are timed interleaved (alternating which goes first), median of the repeats, so a shared
machine's load hits both alike. The numbers must agree: TP/FP/FN per category exactly, IoU sums
and PQ/SQ/RQ to 1e-12 (the float sums are added in a different order). Goal: ratio >= 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

from pixelwise.metrics.panoptic import PanopticQuality

GOAL = 5.0
OFFSET = 256**3
THINGS = [{"id": i, "name": f"thing{i}", "isthing": 1} for i in range(1, 11)]
STUFF = [{"id": 100 + i, "name": f"stuff{i}", "isthing": 0} for i in range(6)]
CATEGORIES = THINGS + STUFF


# ---------------------------------------------------------------------------------------------
# scenes


def _stuff_map(rng, h, w, seeds, cats, jitter=0.0):
    """(H, W) index of the nearest seed under a smooth random distortion (a wobbly Voronoi)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # (H, W) each
    wobble = 0.06 * max(h, w)
    yy = yy + wobble * np.sin(xx / (0.17 * w) + seeds[0, 0])
    xx = xx + wobble * np.cos(yy / (0.21 * h) + seeds[0, 1])
    pts = seeds + jitter * rng.normal(size=seeds.shape)
    d = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    return cats[np.argmin(d, axis=0)]  # (H, W) stuff category per pixel


def _ellipse(h, w, cy, cx, ry, rx):
    """Bounding slices and the boolean ellipse inside them."""
    y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, h)
    x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, w)
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (slice(y0, y1), slice(x0, x1)), inside


def make_scene(rng, h, w):
    """One (gt_ids, gt_info, pred_ids, pred_info) with a few dozen segments per image."""
    used: set[int] = set()

    def new_id():
        while True:
            i = int(rng.integers(1, OFFSET))
            if i not in used:
                used.add(i)
                return i

    n_seeds = int(rng.integers(4, 9))
    seeds = rng.uniform(0, 1, (n_seeds, 2)) * [h, w]
    seed_cats = rng.choice([c["id"] for c in STUFF], n_seeds)
    things = []
    for _ in range(int(rng.integers(18, 36))):
        r = float(np.exp(rng.uniform(np.log(4), np.log(0.2 * min(h, w)))))
        things.append({
            "cat": int(rng.choice([c["id"] for c in THINGS])),
            "c": rng.uniform(0, 1, 2) * [h, w], "r": r * rng.uniform(0.5, 1.5, 2),
            "crowd": bool(rng.random() < 0.05 and r > 20), "ring": bool(rng.random() < 0.3),
        })  # fmt: skip

    def paint(seed_jitter, predicted):
        stuff = _stuff_map(rng, h, w, seeds, seed_cats, seed_jitter)
        ids = np.zeros((h, w), np.int64)
        info = []
        for cat in np.unique(stuff):  # one segment per stuff category
            cat_seg = cat
            if predicted and rng.random() < 0.1:
                cat_seg = int(rng.choice([c["id"] for c in STUFF]))
            seg = new_id()
            ids[stuff == cat] = seg
            info.append({"id": seg, "category_id": int(cat_seg), "iscrowd": 0})
        objects = [dict(t) for t in things]
        if predicted:
            objects = [t for t in objects if rng.random() > 0.08]  # missed
            for t in objects:
                t["c"] = t["c"] + rng.normal(0, 0.15, 2) * t["r"]
                t["r"] = t["r"] * rng.normal(1.0, 0.1, 2).clip(0.5)
                if rng.random() < 0.05:
                    t["cat"] = int(rng.choice([c["id"] for c in THINGS]))
                t["crowd"], t["ring"] = False, False
            for _ in range(3):  # hallucinated
                objects.append({"cat": int(rng.choice([c["id"] for c in THINGS])),
                                "c": rng.uniform(0, 1, 2) * [h, w], "r": rng.uniform(4, 12, 2),
                                "crowd": False, "ring": False})  # fmt: skip
        for t in objects:
            shape = _ellipse(h, w, *t["c"], *t["r"])
            if shape is None:
                continue
            box, inside = shape
            seg = new_id()
            if t["ring"]:  # a void ring of ~2 px around the object
                grown = _ellipse(h, w, *t["c"], *(t["r"] + 2))
                ids[grown[0]][grown[1]] = 0
            ids[box][inside] = seg
            info.append({"id": seg, "category_id": t["cat"], "iscrowd": int(t["crowd"])})
        if not predicted:
            for _ in range(int(rng.integers(0, 3))):  # unlabelled blobs
                blob = _ellipse(h, w, *(rng.uniform(0, 1, 2) * [h, w]), *rng.uniform(5, 30, 2))
                if blob is not None:
                    ids[blob[0]][blob[1]] = 0
        areas = dict(zip(*np.unique(ids, return_counts=True)))
        info = [dict(s, area=int(areas[s["id"]])) for s in info if s["id"] in areas]
        return ids, info

    gt_ids, gt_info = paint(0.0, predicted=False)
    pred_ids, pred_info = paint(0.04 * min(h, w), predicted=True)
    return gt_ids, gt_info, pred_ids, pred_info


# ---------------------------------------------------------------------------------------------
# the peer: panopticapi's per-image logic (pq_compute_single_core) on in-memory id maps


def pq_loop(scenes, categories):
    stats = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    for gt_ids, gt_info, pred_ids, pred_info in scenes:
        gt_segms = {el["id"]: el for el in gt_info}  # ground-truth areas from the json
        pred_segms = {el["id"]: dict(el) for el in pred_info}
        pred_labels = set(pred_segms)
        labels, counts = np.unique(pred_ids, return_counts=True)
        for label, count in zip(labels, counts):
            if label not in pred_segms:
                if label == 0:
                    continue
                raise KeyError(f"segment {label} in the PNG but not in the json")
            pred_segms[label]["area"] = count
            pred_labels.remove(label)
        if pred_labels:
            raise KeyError(f"segments {pred_labels} in the json but not in the PNG")
        combined = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
        pairs = {}
        labels, counts = np.unique(combined, return_counts=True)
        for label, inter in zip(labels, counts):
            pairs[label // OFFSET, label % OFFSET] = inter
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in pairs.items():
            if g not in gt_segms or p not in pred_segms:
                continue
            if gt_segms[g]["iscrowd"] == 1:
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
            if info["iscrowd"] == 1:
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


def loop_average(stats, categories, isthing):
    pq = sq = rq = n = 0.0
    for cat in categories:
        if isthing is not None and (cat["isthing"] == 1) != isthing:
            continue
        s = stats[cat["id"]]
        if s["tp"] + s["fp"] + s["fn"] == 0:
            continue
        n += 1
        pq += s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
        sq += s["iou"] / s["tp"] if s["tp"] else 0
        rq += s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": int(n)}


def pq_ours(scenes, categories):
    metric = PanopticQuality(categories)
    for gt_ids, gt_info, pred_ids, pred_info in scenes:
        metric.update(gt_ids, gt_info, pred_ids, pred_info)
    return metric


# ---------------------------------------------------------------------------------------------


def check_identical(metric: PanopticQuality, stats) -> list[str]:
    problems = []
    for i, cat in enumerate(CATEGORIES):
        s = stats[cat["id"]]
        ours = (int(metric.tp[i]), int(metric.fp[i]), int(metric.fn[i]))
        if ours != (s["tp"], s["fp"], s["fn"]):
            problems.append(f"{cat['name']}: TP/FP/FN {ours} vs {(s['tp'], s['fp'], s['fn'])}")
        if abs(metric.iou[i] - s["iou"]) > 1e-12 * max(1.0, s["iou"]):
            problems.append(f"{cat['name']}: IoU sum {metric.iou[i]!r} vs {s['iou']!r}")
    result = metric.compute()
    for group, isthing in (("all", None), ("things", True), ("stuff", False)):
        ref = loop_average(stats, CATEGORIES, isthing)
        for key in ("pq", "sq", "rq"):
            if abs(result[group][key] - ref[key]) > 1e-12:
                problems.append(f"{group} {key}: {result[group][key]!r} vs {ref[key]!r}")
        if result[group]["n"] != ref["n"]:
            problems.append(f"{group} n: {result[group]['n']} vs {ref['n']}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="square image side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    scenes = [make_scene(rng, args.size, args.size) for _ in range(args.images)]
    segs = [len(s[1]) + len(s[3]) for s in scenes]
    void = np.mean([np.mean(s[0] == 0) for s in scenes])
    crowd = sum(x["iscrowd"] for s in scenes for x in s[1])
    print(
        f"{args.images} scenes of {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s: "
        f"{np.mean(segs) / 2:.1f} segments per map on average, {100 * void:.1f}% void pixels, "
        f"{crowd} crowd segments"
    )

    times: dict[str, list[float]] = {"ours": [], "loop": []}
    runners = {
        "ours": lambda: pq_ours(scenes, CATEGORIES),
        "loop": lambda: pq_loop(scenes, CATEGORIES),
    }
    outputs = {}
    for r in range(args.repeats):
        order = ("ours", "loop") if r % 2 == 0 else ("loop", "ours")
        for name in order:
            start = time.perf_counter()
            outputs[name] = runners[name]()
            times[name].append(time.perf_counter() - start)

    problems = check_identical(outputs["ours"], outputs["loop"])
    result = outputs["ours"].compute()
    ours_s, loop_s = statistics.median(times["ours"]), statistics.median(times["loop"])
    ratio = loop_s / ours_s
    n = args.images
    print(f"\nPQ over {n} images of {args.size}x{args.size} (median of {args.repeats}, seconds)")
    print("| method | total s | ms / image | speed-up |")
    print("|---|---|---|---|")
    print(f"| panopticapi-style loop (peer) | {loop_s:.3f} | {1000 * loop_s / n:.1f} | 1.0x |")
    print(f"| pixelwise PanopticQuality | {ours_s:.3f} | {1000 * ours_s / n:.1f} | {ratio:.1f}x |")
    print(
        f"\nPQ {result['all']['pq']:.6f} (things {result['things']['pq']:.6f}, stuff "
        f"{result['stuff']['pq']:.6f}); identical to the loop: {'yes' if not problems else 'NO'}"
    )
    for p in problems:
        print("  mismatch:", p)
    print(f"goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
