"""Panoptic fusion: instance masks + a semantic map -> one non-overlapping panoptic id map.

The heuristic of Kirillov et al. ("Panoptic Segmentation", 2019, §7) as detectron2's
``combine_semantic_and_instance_outputs`` and panopticapi's ``combine_semantic_and_instance``
apply it (written here from the description, on plain tensors):

1. **Things**, by descending score. An instance with ``score < instance_score_thresh`` is
   dropped. Of the rest, each is kept when at most ``overlap_threshold`` of its mask is already
   covered by higher-scoring instances, i.e. ``new area / mask area >= 1 - overlap_threshold``
   (and the new area is not empty); only its uncovered part is added, as a new segment.
2. **Stuff**: on the still-uncovered pixels, the semantic argmax; each *stuff* class with at
   least ``stuff_area_threshold`` such pixels becomes one segment.
3. Everything else is **void** (id 0): uncovered pixels whose semantic class is a thing class
   (the instance branch found no object there), too-small stuff regions, semantic void (255).

Labels follow `pixelwise.data.panoptic.CocoPanoptic`: instance labels are 1..T over the *thing*
categories ordered by id (torchvision's detection convention, 0 = background), semantic labels are
0..C-1 over *all* categories ordered by id (255 = void). `PanopticCategories` maps both back to the
dataset's category ids, which is what the output `segments` carry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pixelwise.errors import UserError
from pixelwise.ops.labels import argmax_labels

logger = logging.getLogger(__name__)

VOID = 255  # the semantic label of void pixels (as in pixelwise.data.panoptic)


@dataclass(frozen=True)
class FusionConfig:
    """The parameters of panoptic fusion (defaults in brackets).

    instance_score_thresh [0.5]: instances scoring below it are dropped (detectron2: 0.5).
    overlap_threshold [0.5]: an instance is dropped when more than this fraction of its mask is
        already covered by higher-scoring instances (detectron2 / panopticapi: 0.5).
    stuff_area_threshold [64]: a stuff class needs at least this many uncovered pixels of the
        semantic argmax to become a segment, in pixels of the image being fused. detectron2 uses
        4096 at COCO's ~800 x 1200 (about 0.4% of the image); 64 is 0.1% of a 256 x 256 image, so
        the small stuff regions of the synthetic scenes survive. Scale it with the image area.
    mask_threshold [0.5]: probability masks (float) are binarised at ``>= mask_threshold``
        (torchvision's Mask R-CNN paste-back convention is 0.5); bool/integer masks are used as is.
    """

    instance_score_thresh: float = 0.5
    overlap_threshold: float = 0.5
    stuff_area_threshold: int = 64
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("instance_score_thresh", "overlap_threshold", "mask_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and 0.0 <= value <= 1.0):
                raise UserError(f"fusion: {name} must be a number in [0, 1], got {value!r}")
        area = self.stuff_area_threshold
        if isinstance(area, bool) or not isinstance(area, int) or area < 0:
            raise UserError(f"fusion: stuff_area_threshold must be an integer >= 0 (pixels), "
                            f"got {area!r}")


class PanopticCategories:
    """COCO panoptic categories and the contiguous labels the models predict.

    categories: the dataset's categories (``id``, ``name``, ``isthing``), any order.
    By default labels follow `CocoPanoptic`: semantic label s is the s-th category by id, instance
    label t the t-th *thing* category by id. ``semantic_order`` / ``thing_order`` (category ids
    by label) override that, e.g. for a semantic model and an instance model trained apart on
    other label orders (`from_class_names`). Attributes: ``semantic_ids[s]`` the category id of
    semantic label s (0..C-1), ``thing_ids[t - 1]`` that of instance label t (1..T),
    ``semantic_is_thing[s]``.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]], *,
                 semantic_order: Sequence[int] | None = None,
                 thing_order: Sequence[int] | None = None) -> None:
        cats = []
        for cat in categories:
            if not isinstance(cat, Mapping) or isinstance(cat.get("id"), bool) or not isinstance(
                    cat.get("id"), int):
                raise UserError(f"panoptic categories: every category needs an integer 'id', "
                                f"got {cat!r:.80}")
            if cat.get("isthing") not in (0, 1, True, False):
                raise UserError(f"panoptic categories: category {cat['id']} needs 'isthing' "
                                "(0 or 1)")
            cats.append(dict(cat))
        if not cats:
            raise UserError("panoptic categories: none given")
        cats.sort(key=lambda c: c["id"])
        ids = [c["id"] for c in cats]
        if len(set(ids)) != len(ids):
            raise UserError(f"panoptic categories: duplicate category ids in {ids}")
        if len(cats) >= VOID:
            raise UserError(f"panoptic categories: {len(cats)} categories; at most {VOID} fit a "
                            f"semantic map with {VOID} = void")
        things = [c["id"] for c in cats if c["isthing"]]
        if semantic_order is not None:
            if sorted(semantic_order) != ids:
                raise UserError(f"panoptic categories: semantic_order {list(semantic_order)} must "
                                f"list every category id {ids} once")
            ids = [int(i) for i in semantic_order]
        if thing_order is not None:
            if len(set(thing_order)) != len(thing_order) or not set(thing_order) <= set(things):
                raise UserError(f"panoptic categories: thing_order {list(thing_order)} must list "
                                f"thing category ids (of {things}) at most once each")
            things = [int(i) for i in thing_order]
        by_id = {c["id"]: c for c in cats}
        self.categories: tuple[dict[str, Any], ...] = tuple(cats)
        self.semantic_ids: tuple[int, ...] = tuple(ids)
        self.thing_ids: tuple[int, ...] = tuple(things)
        self.semantic_is_thing: tuple[bool, ...] = tuple(bool(by_id[i]["isthing"]) for i in ids)

    @classmethod
    def from_class_names(cls, semantic_classes: Sequence[str], thing_classes: Sequence[str],
                         categories: Sequence[Mapping[str, Any]] | None = None
                         ) -> PanopticCategories:
        """Label spaces of two models trained apart, matched by class name.

        semantic_classes: the semantic model's class names by label (0..C-1); thing_classes: the
        instance model's by label 1..T (no background entry). categories: the dataset's, whose
        names they must use; when None, categories with ids 1..C in semantic order are made,
        things being the classes named in `thing_classes`. Every thing class must also be a
        semantic class (the stuff comes from the semantic model).
        """
        missing = [n for n in thing_classes if n not in semantic_classes]
        if missing:
            raise UserError(f"panoptic fusion: instance classes {missing} are not classes of the "
                            f"semantic model ({list(semantic_classes)})")
        if categories is None:
            categories = [{"id": i + 1, "name": n, "isthing": int(n in thing_classes)}
                          for i, n in enumerate(semantic_classes)]
        by_name: dict[str, int] = {}
        for cat in categories:
            by_name.setdefault(str(cat.get("name")), cat.get("id"))
        unknown = [n for n in semantic_classes if n not in by_name]
        if unknown:
            raise UserError(f"panoptic fusion: classes {unknown} are not among the categories "
                            f"{sorted(by_name)}")
        return cls(categories, semantic_order=[by_name[n] for n in semantic_classes],
                   thing_order=[by_name[n] for n in thing_classes])

    def __repr__(self) -> str:
        return (f"PanopticCategories({self.num_things} things {list(self.thing_ids)}, "
                f"{self.num_classes - self.semantic_is_thing.count(True)} stuff)")

    @property
    def num_classes(self) -> int:
        """C, the number of semantic labels (all categories)."""
        return len(self.semantic_ids)

    @property
    def num_things(self) -> int:
        """T, the number of instance labels (thing categories the instance model predicts)."""
        return len(self.thing_ids)


@dataclass
class PanopticResult:
    """One fused image.

    ids: (H, W) int64 segment ids, 0 = void, segments numbered 1..S: things first, by score,
        then stuff by category id.
    segments: per segment ``{"id", "category_id", "isthing", "area"}``, things also ``"score"``
    and ``"instance"`` (the index of the instance it came from).
    """

    ids: torch.Tensor
    segments: list[dict[str, Any]]


def _binary_masks(masks: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) probabilities / bools -> (N, H, W) bool."""
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]  # (N, 1, H, W) -> (N, H, W), torchvision's Mask R-CNN output
    if masks.dim() != 3:
        raise UserError(f"fusion: instance masks must be (N, H, W) or (N, 1, H, W), got "
                        f"{tuple(masks.shape)}")
    if tuple(masks.shape[-2:]) != size and masks.shape[0] > 0:
        raise UserError(f"fusion: instance masks are {tuple(masks.shape[-2:])} but the semantic "
                        f"map is {size} (height, width)")
    if masks.dtype == torch.bool:
        return masks
    if masks.is_floating_point():
        return masks >= threshold
    return masks != 0


def _semantic_labels(semantic: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(H, W) labels or (C, H, W) logits -> (H, W) int64 labels in 0..C-1 or 255."""
    if semantic.dim() == 3:
        if semantic.shape[0] != num_classes:
            raise UserError(f"fusion: semantic logits have {semantic.shape[0]} classes, the "
                            f"categories {num_classes}")
        return argmax_labels(semantic, 0)
    if semantic.dim() != 2:
        raise UserError(f"fusion: the semantic prediction must be (H, W) labels or (C, H, W) "
                        f"logits, got {tuple(semantic.shape)}")
    if semantic.is_floating_point():
        raise UserError("fusion: a (H, W) semantic map must hold integer labels")
    labels = semantic.to(torch.int64)
    bad = (labels < 0) | ((labels >= num_classes) & (labels != VOID))
    if bad.any():
        raise UserError(f"fusion: semantic label {int(labels[bad][0])} is outside 0.."
                        f"{num_classes - 1} (and not {VOID} = void)")
    return labels


def fuse_panoptic(
    instances: Mapping[str, torch.Tensor],
    semantic: torch.Tensor,
    categories: PanopticCategories,
    config: FusionConfig | None = None,
) -> PanopticResult:
    """Fuse one image's instance and semantic predictions (see the module docstring).

    Args:
        instances: ``masks`` (N, H, W) or (N, 1, H, W) probabilities or bools, ``scores`` (N,),
            ``labels`` (N,) instance labels 1..T (torchvision Mask R-CNN's output dict fits).
        semantic: (H, W) integer labels 0..C-1 (255 = void) or (C, H, W) logits / scores.
        categories: the dataset's categories (labels -> category ids).
        config: fusion parameters (`FusionConfig()` when None).
    Returns:
        `PanopticResult` with ids (H, W) int64 on `semantic`'s device and the segments.
    """
    config = config or FusionConfig()
    labels_sem = _semantic_labels(semantic, categories.num_classes)  # (H, W)
    size = (int(labels_sem.shape[0]), int(labels_sem.shape[1]))
    device = labels_sem.device
    masks = _binary_masks(instances["masks"], size, config.mask_threshold).to(device)  # (N, H, W)
    scores = instances["scores"].detach().to(device=device, dtype=torch.float32).reshape(-1)
    labels = instances["labels"].detach().to(device=device, dtype=torch.int64).reshape(-1)
    if not masks.shape[0] == scores.numel() == labels.numel():
        raise UserError(f"fusion: {masks.shape[0]} masks, {scores.numel()} scores and "
                        f"{labels.numel()} labels; they must be as many")
    if labels.numel() and (labels.min() < 1 or labels.max() > categories.num_things):
        bad = labels[(labels < 1) | (labels > categories.num_things)][0]
        raise UserError(f"fusion: instance label {int(bad)} is outside 1..{categories.num_things} "
                        "(the thing categories)")

    ids = torch.zeros(size, dtype=torch.int64, device=device)
    covered = torch.zeros(size, dtype=torch.bool, device=device)
    segments: list[dict[str, Any]] = []
    # things: greedy in score order. Each decision depends on what the higher-scoring instances
    # covered, so this loop over instances cannot be vectorised; each step works on the mask's
    # bounding box only (the boxes of all candidates found at once), not on the whole image.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= config.instance_score_thresh]  # (M,) candidates, best first
    cand = masks[order]  # (M, H, W)
    rows, cols = cand.any(dim=2), cand.any(dim=1)  # (M, H), (M, W): rows / columns touched
    y0, x0 = rows.int().argmax(dim=1).tolist(), cols.int().argmax(dim=1).tolist()
    y1 = (size[0] - rows.flip(1).int().argmax(dim=1)).tolist()  # one past the last row
    x1 = (size[1] - cols.flip(1).int().argmax(dim=1)).tolist()
    empty = (~rows.any(dim=1)).tolist()
    score_list, label_list = scores.tolist(), labels.tolist()
    for k, i in enumerate(order.tolist()):
        if empty[k]:
            continue
        box = (slice(y0[k], y1[k]), slice(x0[k], x1[k]))
        mask = cand[k][box]  # (h, w) the mask inside its box
        area = int(mask.sum())
        new = mask & ~covered[box]
        new_area = int(new.sum())
        # covered fraction > overlap_threshold -> drop (the comparison detectron2 makes)
        if new_area == 0 or area - new_area > config.overlap_threshold * area:
            continue
        seg_id = len(segments) + 1
        ids[box][new] = seg_id  # ids[box] is a view: this writes into ids
        covered[box] |= new
        segments.append({
            "id": seg_id, "category_id": categories.thing_ids[label_list[i] - 1], "isthing": True,
            "area": new_area, "score": score_list[i], "instance": i,
        })

    # stuff: one bincount over the uncovered pixels of stuff classes, then a lookup table
    num_classes = categories.num_classes
    is_stuff = torch.zeros(VOID + 1, dtype=torch.bool, device=device)  # label -> stuff? (255: no)
    is_stuff[:num_classes] = ~torch.tensor(categories.semantic_is_thing, device=device)
    free = ~covered & is_stuff[labels_sem]  # (H, W)
    counts = torch.bincount(labels_sem[free], minlength=num_classes)  # (C,)
    kept = torch.nonzero(
        is_stuff[:num_classes] & (counts > 0) & (counts >= config.stuff_area_threshold)
    ).flatten().tolist()
    lut = torch.zeros(VOID + 1, dtype=torch.int64, device=device)  # label -> segment id, 0 = void
    for label in sorted(kept, key=lambda k: categories.semantic_ids[k]):  # by category id
        seg_id = len(segments) + 1
        lut[label] = seg_id
        segments.append({"id": seg_id, "category_id": categories.semantic_ids[label],
                         "isthing": False, "area": int(counts[label])})
    ids[free] = lut[labels_sem[free]]
    logger.debug("fused %d of %d instances and %d stuff segments", len(segments) - len(kept),
                 len(score_list), len(kept))
    return PanopticResult(ids=ids, segments=segments)
