"""Panoptic quality (PQ, SQ, RQ), exactly as the COCO panoptic API (panopticapi) computes it.

Per image, a ground-truth segment g and a predicted segment p of the same category match when
IoU(p, g) > 0.5, where the union leaves out the prediction's void pixels:
``IoU = |p∩g| / (|p| + |g| - |p∩g| - |p∩void|)`` (void = id 0, unlabelled). With this threshold
a match is unique (Kirillov et al. 2019, Theorem 1), so no assignment problem is solved. Then:

* every match is a TP of its category and adds its IoU to the category's IoU sum;
* an unmatched non-crowd ground-truth segment is a FN; crowd ground truth is never matched and
  never a FN;
* an unmatched prediction is a FP unless more than half of it is void or the crowd region of its
  category: ``(|p∩void| + |p∩crowd_c|) / |p| > 0.5``. Like panopticapi, ``crowd_c`` is the *last*
  crowd segment of category c listed in the image's ``segments_info`` (COCO has at most one).

TP, FP, FN and IoU sums are added per category over the whole dataset; then per category
``PQ = ΣIoU / (TP + FP/2 + FN/2)``, ``SQ = ΣIoU / TP`` (0 when TP = 0), ``RQ = TP / (TP + FP/2 +
FN/2)``, and ``all`` / ``things`` / ``stuff`` are plain means over the categories of the group
with TP + FP + FN > 0 (``n`` of them). Differences from panopticapi, none in the numbers:
a group with n = 0 gives ``None`` (panopticapi divides by zero), a category with TP + FP + FN = 0
has ``None`` in ``per_class`` (panopticapi: 0.0; it is left out of the means in both), and segment
areas are always counted in the PNGs (panopticapi takes the ground truth's from the json ``area``;
a mismatch is logged).

Hand-written (no library computes PQ) and vectorised: the intersections of all segment pairs of an
image come from one ``np.unique`` over the (gt id, pred id) pairs of the image's runs of equal
pixels, so the cost is a few linear passes over the pixels plus work proportional to the number
of pairs; only the parsing of ``segments_info`` loops over segments in Python.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

OFFSET = 256**3  # panoptic ids are R + 256 G + 256^2 B < 2^24
VOID = 0


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint32 ids, id = R + 256 G + 256^2 B.

    The same formula as `pixelwise.data.panoptic.rgb2id` (a test checks it); kept here because
    that module loads torch and torchvision, which this numpy-only module does not need.
    """
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class _Segments:
    """The ``segments_info`` of one image as sorted arrays: ids, category index, crowd flag."""

    def __init__(
        self, segments: Sequence[Mapping], cat_index: Mapping[int, int], where: str, side: str
    ) -> None:
        ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            dup = sorted({int(i) for i in ids if np.count_nonzero(ids == i) > 1})
            raise UserError(f"{where}: duplicate {side} segment ids {dup} in segments_info")
        if (ids == VOID).any():
            raise UserError(f"{where}: {side} segment id 0 is reserved for void")
        cats = []
        for s in segments:
            cat = s.get("category_id")
            if cat not in cat_index:
                raise UserError(
                    f"{where}: {side} segment {s['id']} has category_id {cat} unknown to the "
                    "ground-truth categories"
                )
            cats.append(cat_index[cat])
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]  # (S,) sorted
        self.cat = np.array(cats, dtype=np.int64).reshape(-1)[order]  # (S,)
        self.crowd = np.array([bool(s.get("iscrowd", 0)) for s in segments], bool).reshape(-1)[
            order
        ]  # (S,)
        self.json_area = np.array(
            [float(s["area"]) if s.get("area") is not None else np.nan for s in segments]
        ).reshape(-1)  # (S,) in json order
        self.order = order  # sorted position -> position in segments_info
        self.where, self.side = where, side

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """(P,) ids (non-void) -> (P,) positions in ``self.ids``; raises if an id is not listed."""
        pos = np.searchsorted(self.ids, ids)
        pos_c = np.minimum(pos, max(len(self.ids) - 1, 0))
        known = (pos < len(self.ids)) & (self.ids[pos_c] == ids) if len(self.ids) else pos < 0
        if not known.all():
            missing = sorted({int(i) for i in ids[~known]})[:5]
            raise UserError(
                f"{self.where}: {self.side} PNG has segment ids {missing} that are not in "
                "segments_info"
            )
        return pos_c


def pair_counts(
    gt_ids: np.ndarray, pred_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts of every (gt id, pred id) pair occurring in an image.

    Args:
        gt_ids, pred_ids: (H, W) integer id maps with ids in [0, 2^24) (UserError otherwise).
    Returns:
        gt (P,), pred (P,), count (P,) int64, one entry per distinct pair (sorted by gt, pred).
    """
    g = gt_ids.ravel()  # (H*W,)
    p = pred_ids.ravel()  # (H*W,)
    n = g.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    # Runs of equal (gt, pred) along the raster order: segmentations are piecewise constant, so
    # there are far fewer runs than pixels, and the sort below only sees one key per run.
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(g[1:], g[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)  # (R,)
    lengths = np.diff(starts, append=n)  # (R,)
    g_run, p_run = g[starts].astype(np.int64), p[starts].astype(np.int64)  # (R,) each
    # every pixel value is some run's value: checking the runs checks the image, cheaply
    for side, values in (("ground-truth", g_run), ("prediction", p_run)):
        if values.min() < 0 or values.max() >= OFFSET:
            raise UserError(f"{side} ids must be in [0, 2^24)")
    keys = g_run * OFFSET + p_run  # (R,)
    order = np.argsort(keys, kind="stable")  # stable: much faster than quicksort on repeats
    keys = keys[order]  # (R,) sorted
    first = np.flatnonzero(np.diff(keys, prepend=-1))  # (P,) first run of each distinct pair
    counts = np.add.reduceat(lengths[order], first)  # (P,) pixels per pair
    uniq = keys[first]  # (P,)
    return uniq // OFFSET, uniq % OFFSET, counts.astype(np.int64)


class PanopticQuality:
    """Streaming PQ / SQ / RQ over a dataset (definitions in the module doc).

    Args:
        categories: COCO panoptic categories, each with ``id``, ``name`` and ``isthing`` (0/1).
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        if not categories:
            raise UserError("no panoptic categories given")
        self.categories = [dict(c) for c in categories]
        ids = [int(c["id"]) for c in self.categories]
        if len(set(ids)) != len(ids):
            raise UserError(f"duplicate category ids in {ids}")
        self.category_ids = ids
        self._cat_index = {cid: i for i, cid in enumerate(ids)}
        self.isthing = np.array([int(c.get("isthing", 0)) == 1 for c in self.categories])
        names = [str(c.get("name", c["id"])) for c in self.categories]
        # per_class keys: the names, or "name (id)" where a name is used twice
        self.class_names = [
            f"{name} ({cid})" if names.count(name) > 1 else name for name, cid in zip(names, ids)
        ]
        c = len(ids)
        self.tp = np.zeros(c, np.int64)
        self.fp = np.zeros(c, np.int64)
        self.fn = np.zeros(c, np.int64)
        self.iou = np.zeros(c, np.float64)
        self.num_images = 0

    def reset(self) -> None:
        for array in (self.tp, self.fp, self.fn, self.iou):
            array.fill(0)
        self.num_images = 0

    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add another shard's statistics (same categories); returns self."""
        if other.category_ids != self.category_ids:
            raise UserError("cannot merge panoptic statistics over different categories")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        self.num_images += other.num_images
        return self

    def update(
        self,
        gt_ids: np.ndarray,
        gt_segments: Sequence[Mapping[str, Any]],
        pred_ids: np.ndarray,
        pred_segments: Sequence[Mapping[str, Any]],
        *,
        image: object = "image",
    ) -> None:
        """Add one image.

        Args:
            gt_ids, pred_ids: (H, W) integer segment-id maps (0 = void), e.g. ``rgb2id`` of the
                PNGs; ids < 2^24.
            gt_segments, pred_segments: the ``segments_info`` lists (``id``, ``category_id``,
                ground truth also ``iscrowd``).
            image: names the image in error messages.
        """
        where = f"image {image}"
        gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
        if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
            raise UserError(
                f"{where}: prediction size {pred_ids.shape} != ground-truth size {gt_ids.shape}"
            )
        for ids, side in ((gt_ids, "ground-truth"), (pred_ids, "prediction")):
            if not np.issubdtype(ids.dtype, np.integer):
                raise UserError(f"{where}: {side} ids must be integers, got {ids.dtype}")
        gt = _Segments(gt_segments, self._cat_index, where, "ground-truth")
        pred = _Segments(pred_segments, self._cat_index, where, "prediction")
        k = len(self.category_ids)

        try:
            pair_gt, pair_pred, inter = pair_counts(gt_ids, pred_ids)  # (P,) each
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        gt_void, pred_void = pair_gt == VOID, pair_pred == VOID
        gi = np.full(pair_gt.shape, -1, np.int64)
        pi = np.full(pair_pred.shape, -1, np.int64)
        gi[~gt_void] = gt.index_of(pair_gt[~gt_void])
        pi[~pred_void] = pred.index_of(pair_pred[~pred_void])

        gt_area = np.bincount(gi[~gt_void], weights=inter[~gt_void], minlength=len(gt.ids))
        pred_area = np.bincount(pi[~pred_void], weights=inter[~pred_void], minlength=len(pred.ids))
        gt_area, pred_area = gt_area.astype(np.int64), pred_area.astype(np.int64)  # (Sg,), (Sp,)
        for seg, area in ((gt, gt_area), (pred, pred_area)):
            if (area == 0).any():
                missing = sorted(int(i) for i in seg.ids[area == 0])[:5]
                raise UserError(
                    f"{where}: {seg.side} segments {missing} are listed in segments_info but "
                    "absent from the PNG"
                )
        self._warn_area_mismatch(gt, gt_area)
        # |p ∩ void| per predicted segment
        on_void = gt_void & ~pred_void
        pred_void_area = np.bincount(
            pi[on_void], weights=inter[on_void], minlength=len(pred.ids)
        ).astype(np.int64)  # (Sp,)

        # candidate matches: labelled pairs of the same category, ground truth not crowd
        cand = ~gt_void & ~pred_void
        cand[cand] = ~gt.crowd[gi[cand]] & (gt.cat[gi[cand]] == pred.cat[pi[cand]])
        g_c, p_c, i_c = gi[cand], pi[cand], inter[cand]
        union = pred_area[p_c] + gt_area[g_c] - i_c - pred_void_area[p_c]
        iou = i_c / union
        match = 2 * i_c > union  # IoU > 0.5, in integers
        g_m, p_m, cat_m = g_c[match], p_c[match], gt.cat[g_c[match]]
        self.tp += np.bincount(cat_m, minlength=k)
        self.iou += np.bincount(cat_m, weights=iou[match], minlength=k)

        gt_matched = np.zeros(len(gt.ids), bool)
        gt_matched[g_m] = True
        pred_matched = np.zeros(len(pred.ids), bool)
        pred_matched[p_m] = True
        self.fn += np.bincount(gt.cat[~gt_matched & ~gt.crowd], minlength=k)

        # panopticapi keeps, per category, the last crowd segment in segments_info order
        crowd = np.flatnonzero(gt.crowd)  # sorted positions of the crowd segments
        last_json = np.full(k, -1, np.int64)
        np.maximum.at(last_json, gt.cat[crowd], gt.order[crowd])  # latest json index per category
        json_to_sorted = np.argsort(gt.order)  # inverse permutation
        crowd_of_cat = np.where(last_json >= 0, json_to_sorted[np.maximum(last_json, 0)], -1)
        on_crowd = ~gt_void & ~pred_void
        on_crowd[on_crowd] = crowd_of_cat[pred.cat[pi[on_crowd]]] == gi[on_crowd]
        pred_crowd_area = np.bincount(
            pi[on_crowd], weights=inter[on_crowd], minlength=len(pred.ids)
        ).astype(np.int64)  # (Sp,)
        ignored = 2 * (pred_void_area + pred_crowd_area) > pred_area  # fraction > 0.5
        self.fp += np.bincount(pred.cat[~pred_matched & ~ignored], minlength=k)
        self.num_images += 1

    def _warn_area_mismatch(self, gt: _Segments, gt_area: np.ndarray) -> None:
        listed = gt.json_area[gt.order]  # (Sg,) json areas in sorted order, NaN where absent
        wrong = ~np.isnan(listed) & (listed != gt_area)
        if wrong.any():
            j = int(np.flatnonzero(wrong)[0])
            logger.warning(
                "%s: %d ground-truth segments have a json area other than their pixel count "
                "(segment %d: %s in the json, %d pixels); using the pixel counts",
                gt.where, int(wrong.sum()), int(gt.ids[j]), listed[j], int(gt_area[j]),
            )  # fmt: skip

    def compute(self) -> dict[str, Any]:
        """``{all, things, stuff: {pq, sq, rq, n}, per_class: name -> {pq, sq, rq, tp, fp, fn,
        id, isthing}}``; pq/sq/rq are ``None`` where n = 0 (or for a class never seen)."""
        per_class: dict[str, dict[str, Any]] = {}
        scores = []
        for i, name in enumerate(self.class_names):
            tp, fp, fn, iou = int(self.tp[i]), int(self.fp[i]), int(self.fn[i]), float(self.iou[i])
            denom = tp + 0.5 * fp + 0.5 * fn
            if tp + fp + fn == 0:
                pq = sq = rq = None
            else:
                pq, sq, rq = iou / denom, (iou / tp if tp else 0.0), tp / denom
            scores.append((pq, sq, rq))
            per_class[name] = {
                "pq": pq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn,
                "id": self.category_ids[i], "isthing": bool(self.isthing[i]),
            }  # fmt: skip

        def average(select: np.ndarray) -> dict[str, Any]:
            chosen = [s for s, keep in zip(scores, select) if keep and s[0] is not None]
            n = len(chosen)
            if n == 0:
                return {"pq": None, "sq": None, "rq": None, "n": 0}
            pq, sq, rq = (sum(s[j] for s in chosen) / n for j in range(3))
            return {"pq": pq, "sq": sq, "rq": rq, "n": n}

        return {
            "all": average(np.ones(len(scores), bool)),
            "things": average(self.isthing),
            "stuff": average(~self.isthing),
            "per_class": per_class,
        }


# ---------------------------------------------------------------------------------------------
# reading the COCO panoptic format (json + PNG folders)


def _load_json(path: str | Path, what: str) -> Any:
    from pixelwise.metrics.coco import load_json

    return load_json(path, what)


def _inside(root: Path, name: str) -> Path:
    """root / name, refusing names that escape root (absolute, '..')."""
    try:
        from pixelwise.data.layout import safe_join  # helper D1's guard, when present
    except ImportError:  # pragma: no cover - depends on the build
        path = (root / name).resolve()
        if os.path.commonpath([path, root.resolve()]) != str(root.resolve()):
            raise UserError(f"file_name {name!r} escapes {root}") from None
        return path
    return safe_join(root, name)


def read_panoptic_png(path: Path) -> np.ndarray:
    """A COCO panoptic PNG -> (H, W) uint32 ids (R + 256 G + 256^2 B)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA", "P"):
                raise UserError(f"{path}: panoptic PNG must be RGB, got mode {img.mode}")
            rgb = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except FileNotFoundError:
        raise UserError(f"panoptic PNG not found: {path}") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt / truncated / too big files
        raise UserError(f"{path}: cannot read panoptic PNG ({exc})") from None
    return rgb2id(rgb)


def _annotations_by_image(data: Any, path: str | Path) -> dict[Any, dict]:
    if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path}: no 'annotations' list (not a COCO panoptic json?)")
    by_image: dict[Any, dict] = {}
    for ann in data["annotations"]:
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise UserError(f"{path}: an annotation has no {key!r}")
        if ann["image_id"] in by_image:
            raise UserError(f"{path}: two annotations for image_id {ann['image_id']}")
        by_image[ann["image_id"]] = ann
    return by_image


def evaluate_panoptic_files(
    gt_json: str | Path, gt_dir: str | Path, pred_json: str | Path, pred_dir: str | Path
) -> dict[str, Any]:
    """PQ of a COCO-format panoptic prediction against its ground truth, one image at a time.

    Ground truth and prediction are matched by ``image_id``; categories come from the ground-truth
    json. Returns :meth:`PanopticQuality.compute`'s dict.
    """
    gt_data = _load_json(gt_json, "ground-truth json")
    pred_data = _load_json(pred_json, "prediction json")
    if not isinstance(gt_data, Mapping) or not isinstance(gt_data.get("categories"), list):
        raise UserError(f"{gt_json}: no 'categories' list (not a COCO panoptic json?)")
    gt_anns = _annotations_by_image(gt_data, gt_json)
    pred_anns = _annotations_by_image(pred_data, pred_json)
    extra = set(pred_anns) - set(gt_anns)
    if extra:
        logger.warning("%d predicted images are not in the ground truth; ignored", len(extra))
    gt_root, pred_root = Path(gt_dir), Path(pred_dir)
    metric = PanopticQuality(gt_data["categories"])
    for image_id, gt_ann in gt_anns.items():
        pred_ann = pred_anns.get(image_id)
        if pred_ann is None:
            raise UserError(f"no prediction for image_id {image_id} ({gt_ann['file_name']})")
        gt_ids = read_panoptic_png(_inside(gt_root, gt_ann["file_name"]))
        pred_ids = read_panoptic_png(_inside(pred_root, pred_ann["file_name"]))
        metric.update(
            gt_ids,
            gt_ann["segments_info"],
            pred_ids,
            pred_ann["segments_info"],
            image=f"{image_id} ({gt_ann['file_name']})",
        )
    logger.info("panoptic quality over %d images", metric.num_images)
    return metric.compute()
