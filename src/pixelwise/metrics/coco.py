"""COCO AP for boxes, masks and keypoints: a thin wrapper around pycocotools' ``COCOeval``.

The numbers are pycocotools' own (nothing is re-implemented): the wrapper builds the ``COCO``
objects from in-memory dicts (no temporary files), silences pycocotools' prints (logged at DEBUG
level instead), and returns ``COCOeval.stats`` by name, as fractions in [0, 1] with pycocotools'
-1 kept for a size bucket without ground truth. :func:`coco_evaluate` scores a results list in
one call; :class:`CocoEvaluator` streams (pycocotools' per-image matching at each ``update``,
only the small match tables kept, ``accumulate`` at ``compute``) with the same numbers.

Additions around pycocotools, none of which changes its numbers:

* An empty results list is evaluated as "no detections" (pycocotools' ``loadRes`` crashes on it):
  every category with ground truth gets AP 0.
* Keypoints: only the categories with a keypoint schema (a non-empty ``keypoints`` list) are
  evaluated, each with its own OKS sigmas from
  :meth:`pixelwise.data.keypoints.KeypointSchema.from_coco_category` (COCO's 17 for the COCO person
  schema, the category's ``sigmas`` list, else a uniform default). pycocotools has one global
  ``kpt_oks_sigmas``; a subclass sets it per category just before pycocotools' own ``computeOks``.
* Mistakes are reported as one-line ``UserError``: a result whose image or category is not in the
  ground truth (a classic contiguous-label vs COCO-id bug), a missing field, a keypoint count that
  does not match the schema. Ground-truth annotations without ``iscrowd`` get ``iscrowd=0``, and
  keypoint annotations without ``num_keypoints`` get the count of labelled (v > 0) keypoints.
* ``max_dets``: pycocotools scores at most 100 detections per image for boxes and masks (20 for
  keypoints), which caps recall -- and AP -- on images with more objects (150 cells: AP50 <=
  0.67). ``max_dets=N`` sets pycocotools' own ``params.maxDets`` to ``[1, 10, N]`` (keypoints:
  ``[N]``); the recall stat ``AR100`` is then named ``AR{N}``. Default: pycocotools' values.
  pycocotools' own ``summarize`` reports -1 for AP under any limit but 100 (keypoints: 20), so
  the stats are then read from its accumulated tables by `_stats_at_own_max_dets`, the same
  selection and averaging (tested equal to ``summarize`` at the default limits).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

_BOX_STATS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
)  # fmt: skip
_KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

# iou type -> names of COCOeval.stats, in pycocotools' order
COCO_STAT_NAMES: dict[str, tuple[str, ...]] = {
    "bbox": _BOX_STATS,
    "segm": _BOX_STATS,
    "keypoints": _KEYPOINT_STATS,
}


def stat_names(iou_type: str, max_dets: int | None = None) -> tuple[str, ...]:
    """The names of the stats `iou_type` returns under `max_dets` (``AR100`` -> ``AR{N}``)."""
    names = COCO_STAT_NAMES[iou_type]
    if max_dets is None or iou_type == "keypoints":
        return names
    return tuple(f"AR{max_dets}" if name == "AR100" else name for name in names)


# iou type -> the field each result must carry
_RESULT_FIELD = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


def load_json(path: str | Path, what: str) -> Any:
    """Read a JSON file, turning every failure into a one-line error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


@contextlib.contextmanager
def _quiet():
    """Capture pycocotools' prints (it writes progress to stdout) and log them at DEBUG."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    text = buffer.getvalue().strip()
    if text:
        logger.debug("pycocotools:\n%s", text)


def _make_coco(dataset: dict) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _keypoint_sigmas(categories: Sequence[dict]) -> dict[int, np.ndarray]:
    """Category id -> OKS sigmas (K,), for the categories that have a keypoint schema."""
    from pixelwise.data.keypoints import KeypointSchema

    return {
        int(cat["id"]): np.asarray(KeypointSchema.from_coco_category(cat).sigmas, dtype=np.float64)
        for cat in categories
        if cat.get("keypoints")
    }


def _check_gt(gt: dict, iou_type: str) -> None:
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise UserError(f"ground truth has no {key!r} list (not a COCO annotation file?)")
    sizes = {img.get("id"): ("height" in img and "width" in img) for img in gt["images"]}
    keypoint_cats = {cat.get("id") for cat in gt["categories"] if cat.get("keypoints")}
    for ann in gt["annotations"]:
        needed = ["id", "image_id", "category_id", "area"]
        if iou_type != "keypoints":
            needed.append(_RESULT_FIELD[iou_type])
        elif ann.get("category_id") in keypoint_cats:
            needed += ["keypoints", "bbox"]  # OKS measures a GT without visible points to its box
        for key in needed:
            if key not in ann:
                raise UserError(f"ground-truth annotation id {ann.get('id')} has no {key!r}")
        if iou_type == "segm" and not sizes.get(ann["image_id"]):
            raise UserError(
                f"ground-truth image {ann['image_id']} needs 'height' and 'width' for segm"
            )
        ann.setdefault("iscrowd", 0)
        if iou_type == "keypoints" and "keypoints" in ann and "num_keypoints" not in ann:
            ann["num_keypoints"] = int(np.count_nonzero(np.asarray(ann["keypoints"])[2::3] > 0))


def _check_results(results: list, gt: dict, iou_type: str) -> None:
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    field = _RESULT_FIELD[iou_type]
    for i, res in enumerate(results):
        if not isinstance(res, Mapping):
            raise UserError(f"result #{i} is not an object")
        for key in ("image_id", "category_id", "score", field):
            if key not in res:
                raise UserError(f"result #{i} has no {key!r} (needed for iou type {iou_type})")
        if res["image_id"] not in image_ids:
            raise UserError(f"result #{i}: image_id {res['image_id']} is not in the ground truth")
        if res["category_id"] not in category_ids:
            raise UserError(
                f"result #{i}: category_id {res['category_id']} is not in the ground truth "
                f"(valid ids: {sorted(category_ids)})"
            )


@functools.cache
def _schema_cocoeval() -> type:
    """A COCOeval subclass whose OKS uses per-category sigmas (built lazily: pycocotools imports
    matplotlib)."""
    from pycocotools.cocoeval import COCOeval

    class SchemaCOCOeval(COCOeval):
        def __init__(self, *args: Any, sigmas_by_category: dict[int, np.ndarray], **kw: Any):
            super().__init__(*args, **kw)
            self.sigmas_by_category = sigmas_by_category

        def computeOks(self, imgId: int, catId: int):
            # pycocotools reads one global p.kpt_oks_sigmas: set this category's just before
            self.params.kpt_oks_sigmas = self.sigmas_by_category[catId]
            return super().computeOks(imgId, catId)

    return SchemaCOCOeval


def _check_keypoint_lengths(anns: list, sigmas: dict[int, np.ndarray], what: str) -> None:
    for i, ann in enumerate(anns):
        cat = ann["category_id"]
        if cat in sigmas and "keypoints" in ann and len(ann["keypoints"]) != 3 * len(sigmas[cat]):
            raise UserError(
                f"{what} #{i} (category {cat}) has {len(ann['keypoints'])} keypoint values; "
                f"the schema has {len(sigmas[cat])} keypoints (x, y, v each)"
            )


def _read_results(results: list[dict] | dict | str | Path) -> list[dict]:
    """A results list (a copy: pycocotools adds 'area', 'id' ... to each result)."""
    results = load_json(results, "results") if isinstance(results, (str, Path)) else results
    if isinstance(results, Mapping) and isinstance(results.get("annotations"), list):
        results = results["annotations"]
    if not isinstance(results, list):
        raise UserError("results must be a list of COCO result objects")
    return copy.deepcopy(results)


class _Setup:
    """The validated ground truth of one evaluation and how pycocotools is to be called."""

    def __init__(self, gt: dict | str | Path, iou_type: str, max_dets: int | None = None
                 ) -> None:
        if iou_type not in COCO_STAT_NAMES:
            raise unknown_name("iou type", iou_type, COCO_STAT_NAMES)
        if max_dets is not None and (isinstance(max_dets, bool) or not isinstance(max_dets, int)
                                     or max_dets < 1):
            raise UserError(f"max detections per image must be an integer >= 1, got {max_dets!r}")
        self.max_dets = max_dets
        gt = load_json(gt, "ground-truth") if isinstance(gt, (str, Path)) else gt
        if not isinstance(gt, Mapping):
            raise UserError("ground truth must be a COCO annotation object")
        # pycocotools mutates the ground truth (adds 'ignore', converts polygons): use a copy
        self.gt = copy.deepcopy(dict(gt))
        _check_gt(self.gt, iou_type)
        self.iou_type = iou_type
        self.cat_ids = sorted(cat["id"] for cat in self.gt["categories"])
        self.options: dict[str, Any] = {}
        self.sigmas: dict[int, np.ndarray] = {}
        if iou_type == "keypoints":
            self.sigmas = _keypoint_sigmas(self.gt["categories"])
            if not self.sigmas:
                raise UserError("no category in the ground truth has keypoints to evaluate")
            _check_keypoint_lengths(self.gt["annotations"], self.sigmas, "ground-truth annotation")
            self.cat_ids = sorted(self.sigmas)
            self.cocoeval_cls = _schema_cocoeval()
            self.options = {"sigmas_by_category": self.sigmas}
        else:
            from pycocotools.cocoeval import COCOeval

            self.cocoeval_cls = COCOeval
        self.coco_gt = _make_coco(self.gt)
        self.image_ids = sorted(self.coco_gt.getImgIds())

    def check(self, results: list[dict]) -> None:
        _check_results(results, self.gt, self.iou_type)
        if self.iou_type == "keypoints":
            _check_keypoint_lengths(results, self.sigmas, "result")
            skipped = sum(1 for r in results if r["category_id"] not in self.sigmas)
            if skipped:
                logger.info("%d results of categories without keypoints are not scored", skipped)

    def evaluator(
        self, results: list[dict], image_ids: list | None = None, *, run: bool = True
    ) -> Any:
        """A COCOeval over `results` (checked), restricted to `image_ids` (None: all), after
        its per-image matching (``evaluate()``) unless `run` is False."""
        if results:
            with _quiet():
                try:
                    coco_dt = self.coco_gt.loadRes(results)
                except (TypeError, ValueError, KeyError, IndexError) as exc:
                    raise UserError(
                        f"malformed results for iou type {self.iou_type}: {exc!r}"
                    ) from None
        else:  # pycocotools' loadRes fails on an empty list
            coco_dt = _make_coco(
                {
                    "images": self.gt["images"],
                    "categories": self.gt["categories"],
                    "annotations": [],
                }
            )
        with _quiet():
            ev = self.cocoeval_cls(self.coco_gt, coco_dt, iouType=self.iou_type, **self.options)
            ev.params.catIds = self.cat_ids
            if self.max_dets is not None:
                ev.params.maxDets = ([self.max_dets] if self.iou_type == "keypoints"
                                     else [1, 10, self.max_dets])
            if image_ids is not None:
                ev.params.imgIds = image_ids
            if run:
                ev.evaluate()
        return ev

    def summarize(self, ev: Any) -> dict[str, float]:
        with _quiet():
            ev.accumulate()
            if self.max_dets is None:
                ev.summarize()
                stats = list(ev.stats)
            else:
                stats = _stats_at_own_max_dets(ev, self.iou_type)
        names = stat_names(self.iou_type, self.max_dets)
        return {name: float(v) for name, v in zip(names, stats, strict=True)}

    def per_category(self, ev: Any) -> dict[int, dict[str, float | None]]:
        """AP and AP50 of each category id of an accumulated `ev` (None for a category without
        ground truth), as detectron2's per-category table reads them: the precision table
        (T, R, K, A, M) at area "all" and the largest detection limit, -1 entries left out."""
        precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
        out: dict[int, dict[str, float | None]] = {}
        for k, cat_id in enumerate(ev.params.catIds):
            values = {}
            for name, table in (("AP", precision[:, :, k]), ("AP50", precision[0, :, k])):
                kept = table[table > -1]
                values[name] = float(np.mean(kept)) if kept.size else None
            out[cat_id] = values
        return out


def _stats_at_own_max_dets(ev: Any, iou_type: str) -> list[float]:
    """`COCOeval.summarize()`'s stats from `ev.eval` for any `params.maxDets`.

    Written here because pycocotools' summarize looks the detection limit up by value (100 for
    boxes and masks, 20 for keypoints) and reports -1 for AP (keypoints: every stat) under any
    other limit. Same selection and averaging as its `_summarize`: precision (T, R, K, A, M) or
    recall (T, K, A, M) at an IoU threshold (or all), an area range and a limit, -1 entries left
    out, -1 when nothing is left.
    """
    p = ev.params

    def one(ap: bool, iou: float | None = None, area: str = "all", limit: int = 0) -> float:
        a = p.areaRngLbl.index(area)
        m = p.maxDets.index(limit)
        values = ev.eval["precision"] if ap else ev.eval["recall"]
        if iou is not None:
            values = values[np.where(iou == p.iouThrs)[0]]
        values = values[..., a, m]
        values = values[values > -1]
        return float(np.mean(values)) if values.size else -1.0

    if iou_type == "keypoints":
        top = p.maxDets[-1]
        return [one(True, limit=top), one(True, 0.5, limit=top), one(True, 0.75, limit=top),
                one(True, area="medium", limit=top), one(True, area="large", limit=top),
                one(False, limit=top), one(False, 0.5, limit=top), one(False, 0.75, limit=top),
                one(False, area="medium", limit=top), one(False, area="large", limit=top)]
    top = p.maxDets[2]
    return [one(True, limit=top), one(True, 0.5, limit=top), one(True, 0.75, limit=top),
            *(one(True, area=a, limit=top) for a in ("small", "medium", "large")),
            one(False, limit=p.maxDets[0]), one(False, limit=p.maxDets[1]), one(False, limit=top),
            *(one(False, area=a, limit=top) for a in ("small", "medium", "large"))]


def coco_evaluate(
    gt: dict | str | Path,
    results: list[dict] | dict | str | Path,
    iou_type: str,
    *,
    max_dets: int | None = None,
) -> dict[str, float]:
    """COCO AP/AR exactly as pycocotools' ``COCOeval`` computes them, in one call.

    Args:
        gt: a COCO annotation dict (or the path of its JSON file); not modified.
        results: a list of COCO results (``image_id``, ``category_id``, ``score`` and ``bbox`` /
            ``segmentation`` (RLE) / ``keypoints``), a dict with an ``annotations`` list, or the
            path of a JSON file holding either; not modified.
        iou_type: ``bbox``, ``segm`` or ``keypoints``.
        max_dets: detections scored per image (None: pycocotools' 100, keypoints 20).
    Returns:
        ``stat_names(iou_type, max_dets)`` -> value (floats in [0, 1]; -1 where pycocotools
        gives -1).
    """
    setup = _Setup(gt, iou_type, max_dets)
    results = _read_results(results)
    setup.check(results)
    if not results:
        logger.warning("no results to evaluate: every category with ground truth scores 0")
    return setup.summarize(setup.evaluator(results))


class CocoEvaluator:
    """Streaming COCO AP: ``update`` with the results of some images, ``compute`` at the end.

    Each update runs pycocotools' per-image matching (``COCOeval.evaluate``) on its images and
    keeps only the compact match tables (scores, matched flags; no boxes or masks); ``compute``
    hands all tables to ``COCOeval.accumulate`` / ``summarize``. Ground-truth images that were
    never updated count as images without detections, so the result equals :func:`coco_evaluate`
    over all results at once (a test checks equality). Each image may be updated only once.

    Args:
        gt: a COCO annotation dict or the path of its JSON file.
        iou_type: ``bbox``, ``segm`` or ``keypoints``.
        max_dets: detections scored per image (None: pycocotools' 100, keypoints 20).
    """

    def __init__(self, gt: dict | str | Path, iou_type: str, *, max_dets: int | None = None
                 ) -> None:
        self._setup = _Setup(gt, iou_type, max_dets)
        self.iou_type = iou_type
        self.reset()

    def reset(self) -> None:
        self._tables: dict[Any, list] = {}  # image id -> its evalImgs entries, [cat][area]

    def update(self, results: list[dict], image_ids: Sequence | None = None) -> None:
        """Evaluate the results of a batch of images.

        Args:
            results: COCO results (as for :func:`coco_evaluate`); not modified.
            image_ids: the images of the batch (default: those named by the results; pass them
                to record images on which nothing was detected).
        """
        results = _read_results(results)
        self._setup.check(results)
        ids = list(dict.fromkeys(image_ids if image_ids is not None else
                                 (r["image_id"] for r in results)))  # fmt: skip
        unknown = set(ids) - set(self._setup.image_ids)
        if unknown:
            raise UserError(f"image ids {sorted(unknown)[:5]} are not in the ground truth")
        again = set(ids) & set(self._tables)
        if again:
            raise UserError(f"images {sorted(again)[:5]} were already evaluated")
        missing = {r["image_id"] for r in results} - set(ids)
        if missing:
            raise UserError(f"results for images {sorted(missing)[:5]} not listed in image_ids")
        if not ids:
            return
        self._store(self._setup.evaluator(results, ids))

    def _store(self, ev: Any) -> None:
        ids = ev.params.imgIds  # sorted by evaluate()
        n_cat, n_area, n_img = len(ev.params.catIds), len(ev.params.areaRng), len(ids)
        table = np.empty(n_cat * n_area * n_img, dtype=object)
        table[:] = ev.evalImgs
        table = table.reshape(n_cat, n_area, n_img)  # pycocotools' layout [cat][area][image]
        for j, image_id in enumerate(ids):
            self._tables[image_id] = table[:, :, j]

    def merge(self, other: CocoEvaluator) -> CocoEvaluator:
        """Take over another shard's images (same ground truth, disjoint images); returns self."""
        again = set(other._tables) & set(self._tables)
        if again:
            raise UserError(f"images {sorted(again)[:5]} were evaluated in both shards")
        self._tables.update(other._tables)
        return self

    def compute(self) -> dict[str, float]:
        """The stats by name, as :func:`coco_evaluate` gives them."""
        return self.compute_with_categories()[0]

    def compute_with_categories(self) -> tuple[dict[str, float],
                                               dict[int, dict[str, float | None]]]:
        """The stats by name (as `compute`) and the AP / AP50 of each category id
        (`_Setup.per_category`), from one accumulation."""
        rest = [i for i in self._setup.image_ids if i not in self._tables]
        tables = dict(self._tables)
        if rest:  # ground-truth images nobody predicted on: no detections
            ev = self._setup.evaluator([], rest)
            n_cat, n_area = len(ev.params.catIds), len(ev.params.areaRng)
            table = np.empty(len(ev.evalImgs), dtype=object)
            table[:] = ev.evalImgs
            table = table.reshape(n_cat, n_area, len(rest))  # [cat][area][image]
            tables.update({image_id: table[:, :, j] for j, image_id in enumerate(rest)})
        ev = self._setup.evaluator([], run=False)  # an evaluator to accumulate into
        ids = self._setup.image_ids
        ev.params.imgIds = ids
        ev._paramsEval = copy.deepcopy(ev.params)
        stacked = np.stack([tables[i] for i in ids], axis=-1)  # (cat, area, image)
        ev.evalImgs = list(stacked.ravel())
        stats = self._setup.summarize(ev)  # accumulates
        return stats, self._setup.per_category(ev)
