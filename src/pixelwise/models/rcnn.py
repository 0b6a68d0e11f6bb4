"""Mask R-CNN and Keypoint R-CNN (He et al. 2017) from torchvision's detection parts.

`mask_rcnn(num_classes, ...)` and `keypoint_rcnn(num_classes, ...)` assemble torchvision's
RPN, `MultiScaleRoIAlign`, RoI heads and FPN around a `build_fpn_backbone` backbone, with the
mask / keypoint predictor's upsampler picked by name (`rcnn_heads`). The model classes are
torchvision's, with five differences:

* eval runs `FastRoIHeads` / `RCNNTransform` (``fast=True``, see `fast_postprocess`): the same
  detections as torchvision, computed faster on CPU;
* masks are pasted into the image as probabilities and thresholded there, at full resolution
  (``mask_threshold``, default 0.5, gives bool masks; None gives torchvision's probabilities);
* RoIAlign splits the RoIs between torch's CPU threads (`ParallelMultiScaleRoIAlign`: the
  same pooled features; torchvision's kernel runs on one thread), in training and eval;
* ``min_size=None`` (the default) keeps images at their own size (torchvision resizes the
  short side to 800 px);
* targets are cleaned before torchvision sees them: crowd instances (``iscrowd`` = 1) and
  degenerate boxes (zero width or height) are dropped with a warning instead of an assertion.

Contract (torchvision's): ``model(images)`` with images a list of (C, H, W) float tensors in
[0, 1]. Training (``model.train()``, with targets: dicts of boxes (N, 4) XYXY float, labels (N,)
int64 in 1..num_classes-1, masks (N, H, W) uint8 / keypoints (N, K, 3) x, y, v) returns the loss
dict (loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg, and loss_mask or
loss_keypoint). Eval returns one dict per image: boxes (D, 4), labels (D,), scores (D,), and
masks (D, 1, H, W) or keypoints (D, K, 3) + keypoints_scores (D, K).

Keypoint coordinates: pixelwise's data (and COCO) give a keypoint as the pixel it lies on,
(x, y) = (column, row), whose centre is at (x + 0.5, y + 0.5) in the continuous frame that
boxes, RoIAlign and the heatmaps use. `KeypointRCNN.forward` is the one place that converts:
targets + `KEYPOINT_PIXEL_OFFSET` on the way in, predictions - `KEYPOINT_PIXEL_OFFSET` on the
way out (torchvision predicts the centre of the heatmap cell: detectron2 does the same shift).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.models.detection as tvd
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    RPNHead,
)
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops import batched_nms, box_iou

from pixelwise.data.keypoints import DEFAULT_SIGMA, KeypointSchema
from pixelwise.errors import UserError, check_positive_int, unknown_name
from pixelwise.models.fast_postprocess import FastRoIHeads, RCNNTransform, paste_masks
from pixelwise.models.fpn_backbone import build_fpn_backbone
from pixelwise.models.mask_classifier import MaskClassifier, top_k_classes
from pixelwise.models.norm import GroupNorm
from pixelwise.models.rcnn_heads import KeypointPredictor, MaskPredictor, UpsampleArg
from pixelwise.models.rcnn_semantic import instance_semantic_target, rescore_with_semantic
from pixelwise.models.rcnn_tta import merge_views, mirror_detections
from pixelwise.models.rpn import ParallelRPN
from pixelwise.models.semantic_fpn_head import (SemanticFPNHead, logits_at_original,
                                                semantic_loss)
from pixelwise.ops.roi_align import ParallelMultiScaleRoIAlign

logger = logging.getLogger(__name__)

# COCO keypoints are pixel indices; the model works with pixel centres (module docstring)
KEYPOINT_PIXEL_OFFSET = 0.5

# Anchors for small images (e.g. 256 x 256 scenes with 10-150 px objects): one size per FPN
# level (strides 4, 8, 16, 32 and the 64 "pool" level); torchvision's are 32..512 for 800 px.
DEFAULT_ANCHOR_SIZES = (16, 32, 64, 128, 256)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
BOX_REPRESENTATION = 1024  # torchvision's TwoMLPHead width
NORMS = ("bn", "gn")  # head_norm names
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- targets


def clean_targets(targets: list[dict[str, Any]], *, keypoint_offset: float = 0.0,
                  num_keypoints: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Training targets as torchvision wants them: plain tensors, crowd instances and
    degenerate boxes dropped (logged), keypoints shifted by `keypoint_offset` and checked
    against `num_keypoints` (UserError on a mismatch)."""
    cleaned = []
    for t in targets:
        boxes = torch.as_tensor(t["boxes"]).as_subclass(torch.Tensor).to(torch.float32)
        boxes = boxes.reshape(-1, 4)  # (N, 4) even when empty
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            logger.warning("image %s: dropped %d degenerate box(es) (zero width or height)",
                           t.get("image_id", "?"), int((~keep).sum()))
        if "iscrowd" in t:
            keep &= torch.as_tensor(t["iscrowd"]).reshape(-1) == 0
        out: dict[str, torch.Tensor] = {
            "boxes": boxes[keep],
            "labels": torch.as_tensor(t["labels"]).as_subclass(torch.Tensor).to(
                torch.int64)[keep],
        }
        if "masks" in t:
            out["masks"] = torch.as_tensor(t["masks"]).as_subclass(torch.Tensor)[keep].to(
                torch.uint8)
        if num_keypoints is not None:
            if "keypoints" not in t:
                raise UserError("keypoint training needs 'keypoints' in every target")
            kps = torch.as_tensor(t["keypoints"]).as_subclass(torch.Tensor).to(torch.float32)
            if kps.dim() != 3 or kps.shape[1:] != (num_keypoints, 3):
                raise UserError(f"targets have keypoints of shape {tuple(kps.shape)}, the model "
                                f"predicts {num_keypoints} keypoints (expected (N, "
                                f"{num_keypoints}, 3))")
            kps = kps[keep].clone()
            kps[..., :2] += keypoint_offset
            out["keypoints"] = kps
        cleaned.append(out)
    return cleaned


# ----------------------------------------------------------------------------- models


HEAD_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
# what `MaskRCNN`'s mask classifier is trained on
CLASSIFIER_MASKS = ("truth", "predicted")


def _padded_size(images: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(H, W) of the zero-padded batch that holds every (C, h, w) image at its own size."""
    return (max(int(img.shape[-2]) for img in images), max(int(img.shape[-1]) for img in images))


def _zero_loss(module: nn.Module) -> torch.Tensor:
    """A zero that reaches every parameter of `module` (DDP needs a gradient for each)."""
    return sum(p.sum() for p in module.parameters()) * 0.0


@contextlib.contextmanager
def _mask_branch_inputs(roi_heads: nn.Module) -> Iterator[dict[str, Any]]:
    """Within the block, the dict gets the training mask branch's positive proposals and image
    sizes (`mask_roi_pool`'s arguments in torchvision's `RoIHeads.forward`) and the mask
    predictor's logits."""
    seen: dict[str, Any] = {}

    def pooled(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen["proposals"], seen["image_shapes"] = args[1], args[2]

    def predicted(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        seen["logits"] = output
    handles = [roi_heads.mask_roi_pool.register_forward_pre_hook(pooled),
               roi_heads.mask_predictor.register_forward_hook(predicted)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _fast_parts(model: tvd.generalized_rcnn.GeneralizedRCNN, *, resize: bool,
                mask_threshold: float | None, fast: bool, head_dtype: str = "float32") -> None:
    """Swap torchvision's RPN, RoI heads and transform for the pixelwise ones (same modules;
    the RPN always, its proposals are torchvision's)."""
    if mask_threshold is not None and not 0.0 < float(mask_threshold) < 1.0:
        raise UserError(f"mask_threshold must be in (0, 1) or None, got {mask_threshold!r}")
    if head_dtype not in HEAD_DTYPES:
        raise unknown_name("head_dtype", head_dtype, HEAD_DTYPES)
    if head_dtype != "float32" and not fast:
        raise UserError(f"head_dtype {head_dtype} is a setting of the fast eval path: "
                        "leave fast on")
    model.rpn = ParallelRPN.like(model.rpn)
    if fast:
        model.roi_heads = FastRoIHeads.like(model.roi_heads)
        model.roi_heads.head_dtype = HEAD_DTYPES[head_dtype]
    model.transform = RCNNTransform.like(model.transform, resize=resize,
                                         mask_threshold=mask_threshold, fast=fast)


class MaskRCNN(tvd.MaskRCNN):
    """torchvision's `MaskRCNN` (same arguments: finished modules, settings) plus
    ``mask_threshold`` and ``fast`` (module docstring). ``min_size=None`` keeps image sizes.

    ``semantic_head`` (a `SemanticFPNHead` over the FPN, `rcnn_semantic`): trained on labels
    made from the instance masks, its loss ``loss_semantic`` weighted by ``aux_semantic``; at
    eval it re-scores the detections when ``semantic_rescore`` > 0 (and is not run otherwise).

    ``mask_classifier`` (a `MaskClassifier`, a pixelwise addition): a second stage that
    re-decides each detection's class from its pasted mask and the image around its box.
    Trained on the ground-truth masks at their boxes, each side moved at random by up to
    ``classifier_jitter`` of the box's size ("loss_mask_class", cross-entropy x
    ``classifier_weight``); at eval every detection is emitted with its ``classifier_top_k``
    most probable classes (score x probability), then the box head's per-class NMS runs again
    and the ``box_detections_per_img`` best are kept. ``classifier_masks="predicted"`` trains
    it instead on what it sees at eval: the mask head's own masks of the step's positive
    proposals (detached, pasted into the image and thresholded as at eval, the channel of the
    matched object's class, or the one map of a class-agnostic head), at the proposals' boxes,
    each named by the ground-truth object it overlaps most (as SOLOv2 trains it).

    ``maskness`` (> 0; the fast eval path's `FastRoIHeads.maskness`): scores times the RoI
    masks' maskness to that power. ``set_flip_test(True)`` (`pixelwise eval / predict --tta
    flip`): each image is detected together with its mirror image, and the two views are
    merged by `rcnn_tta.merge_views` (per-class NMS over both, masks voted) before the
    threshold; the semantic re-scoring runs in each view, the mask classifier on the merged
    detections."""

    #: the test-time flip (`set_flip_test`)
    flip_test: bool = False

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, *,
                 min_size: int | Sequence[int] | None = None, max_size: int = 1333,
                 mask_threshold: float | None = 0.5, fast: bool = True,
                 head_dtype: str = "float32", semantic_head: nn.Module | None = None,
                 aux_semantic: float = 0.0,
                 semantic_rescore: float = 0.0, mask_classifier: MaskClassifier | None = None,
                 classifier_top_k: int = 2, classifier_weight: float = 1.0,
                 classifier_jitter: float = 0.1, classifier_masks: str = "truth",
                 maskness: float = 0.0, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, min_size=1 if min_size is None else min_size,
                         max_size=max_size, **kwargs)
        _fast_parts(self, resize=min_size is not None, mask_threshold=mask_threshold, fast=fast,
                    head_dtype=head_dtype)
        if not (isinstance(maskness, (int, float)) and 0 <= maskness < math.inf):
            raise UserError(f"maskness must be a power >= 0, got {maskness!r}")
        if maskness > 0 and not fast:
            raise UserError("maskness is a setting of the fast eval path: leave fast on")
        if fast:
            self.roi_heads.maskness = float(maskness)
        self.semantic_head = semantic_head
        self.aux_semantic = float(aux_semantic)
        self.semantic_rescore = float(semantic_rescore)
        self.mask_classifier = mask_classifier
        self.classifier_top_k = classifier_top_k
        self.classifier_weight = float(classifier_weight)
        self.classifier_jitter = float(classifier_jitter)
        if classifier_masks not in CLASSIFIER_MASKS:
            raise unknown_name("classifier_masks", classifier_masks, CLASSIFIER_MASKS)
        self.classifier_masks = classifier_masks

    def forward(self, images: list[torch.Tensor],
                targets: list[dict[str, Any]] | None = None) -> Any:
        cleaned = clean_targets(targets) if self.training and targets is not None else None
        if self.mask_classifier is None or (self.training and targets is None):
            return self._detector_forward(images, targets, cleaned)
        if self.training and self.classifier_masks == "predicted":
            with _mask_branch_inputs(self.roi_heads) as seen:
                out = self._detector_forward(images, targets, cleaned)
            return {**out, "loss_mask_class": self.predicted_classifier_loss(images, cleaned,
                                                                             seen)}
        out = self._detector_forward(images, targets, cleaned)
        if self.training:
            return {**out, "loss_mask_class": self.classifier_loss(images, cleaned)}
        return [self.reclassify(image, det) for image, det in zip(images, out)]

    def _normalised(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images (C, H, W) in [0, 1], normalised as the backbone sees them (the transform's
        own `normalize`), zero-padded to one batch (N, C, H, W) at their own size (the
        classifier crops by image coordinates, not the transform's resized ones)."""
        height, width = _padded_size(images)
        batch = images[0].new_zeros(len(images), images[0].shape[0], height, width,
                                    dtype=torch.float32)
        for k, img in enumerate(images):
            batch[k, :, : img.shape[-2], : img.shape[-1]] = self.transform.normalize(
                img.to(torch.float32))
        return batch

    def classifier_loss(self, images: Sequence[torch.Tensor],
                        targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The mask classifier's cross-entropy on the ground-truth masks at jittered boxes."""
        classifier = self.mask_classifier
        boxes = [t["boxes"] for t in targets]
        if sum(len(b) for b in boxes) == 0:  # no object: a zero that reaches its parameters
            return _zero_loss(classifier)
        index = torch.cat([torch.full((len(b),), k, device=b.device)
                           for k, b in enumerate(boxes)])  # (M,)
        box = torch.cat(boxes)  # (M, 4)
        size = (box[:, 2:] - box[:, :2]).repeat(1, 2)  # (M, 4) w, h, w, h
        box = box + (torch.rand_like(box) * 2 - 1) * self.classifier_jitter * size
        height, width = _padded_size(images)
        masks = torch.cat([torch.nn.functional.pad(  # each (N_k, h, w) -> (N_k, H, W)
            t["masks"].to(torch.float32),
            (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]))
            for t in targets])  # (M, H, W)
        logits = classifier(self._normalised(images), index, masks, box, stride=1)
        labels = torch.cat([t["labels"] for t in targets])
        return torch.nn.functional.cross_entropy(logits.float(), labels - 1) * (
            self.classifier_weight)

    def predicted_classifier_loss(self, images: Sequence[torch.Tensor],
                                  targets: list[dict[str, torch.Tensor]],
                                  seen: dict[str, Any]) -> torch.Tensor:
        """The mask classifier's cross-entropy on the mask head's masks of this step's positive
        proposals (`seen`: what `_mask_branch_inputs` caught), in the original images' frame."""
        classifier = self.mask_classifier
        proposals = seen.get("proposals") or []
        if sum(len(p) for p in proposals) == 0:  # no positive: a zero reaching the parameters
            return _zero_loss(classifier)
        height, width = _padded_size(images)
        logits = seen["logits"].detach().float()  # (P, K or 1, 2m, 2m), images in order
        index, boxes, labels, masks = [], [], [], []
        for k, (props, logit, shape, target) in enumerate(zip(
                proposals, logits.split([len(p) for p in proposals]), seen["image_shapes"],
                targets)):
            if len(props) == 0:
                continue
            img_h, img_w = (int(v) for v in images[k].shape[-2:])
            scale = props.new_tensor([img_w / shape[1], img_h / shape[0]]).repeat(2)  # (4,)
            box = props.detach().float() * scale  # (P_k, 4) in the original image
            label = target["labels"][box_iou(box, target["boxes"].float()).argmax(1)]
            channel = 0 if logit.shape[1] == 1 else label
            probs = logit[torch.arange(len(box)), channel].sigmoid()  # (P_k, 2m, 2m)
            pasted = paste_masks(probs, box, (img_h, img_w),  # (P_k, 1, H, W)
                                 threshold=self.transform.mask_threshold)
            masks.append(torch.nn.functional.pad(pasted[:, 0].float(),
                                                 (0, width - img_w, 0, height - img_h)))
            index.append(torch.full((len(box),), k, device=box.device))
            boxes.append(box)
            labels.append(label)
        out = classifier(self._normalised(images), torch.cat(index), torch.cat(masks),
                         torch.cat(boxes), stride=1)  # (P, K)
        return torch.nn.functional.cross_entropy(out.float(), torch.cat(labels) - 1) * (
            self.classifier_weight)

    @torch.no_grad()
    def reclassify(self, image: torch.Tensor, det: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
        """One image's detections with the classes the mask classifier gives (class docstring)."""
        if len(det["scores"]) == 0:
            return det
        masks = det["masks"][:, 0].to(torch.float32)  # (D, 1, H, W) -> (D, H, W)
        zero = torch.zeros(len(masks), dtype=torch.int64, device=masks.device)
        logits = self.mask_classifier(self._normalised([image]), zero, masks, det["boxes"],
                                      stride=1)  # (D, K)
        index, labels, scores = top_k_classes(logits.float().softmax(1), det["scores"],
                                              self.classifier_top_k)
        boxes = det["boxes"][index]
        keep = batched_nms(boxes, scores, labels, self.roi_heads.nms_thresh)
        keep = keep[: self.roi_heads.detections_per_img]  # by score, descending
        out = {key: value[index][keep] for key, value in det.items()
               if torch.is_tensor(value) and len(value) == len(det["scores"])}
        out["labels"], out["scores"] = labels[keep], scores[keep]
        return out

    def set_flip_test(self, enabled: bool) -> None:
        """Switch the test-time flip (class docstring) on or off."""
        self.flip_test = bool(enabled)

    def _detector_forward(self, images: list[torch.Tensor],
                          targets: list[dict[str, Any]] | None,
                          cleaned: list[dict[str, torch.Tensor]] | None) -> Any:
        """`_one_pass`, or at eval with the test-time flip both views merged."""
        if self.training or not self.flip_test:
            return self._one_pass(images, targets, cleaned)
        threshold = self.transform.mask_threshold
        self.transform.mask_threshold = None  # probabilities, to vote with
        try:  # the images and their mirror images in one batch
            both = self._one_pass([*images, *(img.flip(-1) for img in images)], None, None)
        finally:
            self.transform.mask_threshold = threshold
        out = []
        for k, image in enumerate(images):
            mirrored = mirror_detections(both[len(images) + k], int(image.shape[-1]))
            merged = merge_views([both[k], mirrored], nms_thresh=self.roi_heads.nms_thresh,
                                 max_detections=self.roi_heads.detections_per_img)
            if threshold is not None:
                merged["masks"] = merged["masks"] >= threshold
            out.append(merged)
        return out

    def _one_pass(self, images: list[torch.Tensor], targets: list[dict[str, Any]] | None,
                  cleaned: list[dict[str, torch.Tensor]] | None) -> Any:
        """torchvision's forward (`cleaned`: the targets through `clean_targets`), with the
        semantic branch when there is one."""
        raw = targets
        if self.training and targets is not None:
            targets = cleaned
        use_semantic = self.semantic_head is not None and (
            self.training or self.semantic_rescore > 0)
        if not use_semantic or (self.training and targets is None):
            return super().forward(images, targets)
        # torchvision's GeneralizedRCNN.forward, with the semantic head on the same features
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(list(images), targets)
        features = self.backbone(batch.tensors)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes,
                                                     targets)
        logits = self.semantic_head(features, batch.tensors.shape[-2:])  # (N, K, Hpad, Wpad)
        semantic = [logits_at_original(logits[i], resized, original)  # (K, H, W) each
                    for i, (resized, original) in enumerate(zip(batch.image_sizes,
                                                                original_sizes))]
        if self.training:
            labels = [instance_semantic_target(t, size) for t, size in zip(raw, original_sizes)]
            return {**proposal_losses, **detector_losses,
                    "loss_semantic": self.aux_semantic * semantic_loss(semantic, labels)}
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        return [rescore_with_semantic(det, sem.float().softmax(0), self.semantic_rescore)
                for det, sem in zip(detections, semantic)]


class KeypointRCNN(tvd.KeypointRCNN):
    """torchvision's `KeypointRCNN` plus ``fast``, ``min_size=None`` and the keypoint pixel
    convention (module docstring); ``schema`` (a `KeypointSchema`) travels with the model."""

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, *,
                 min_size: int | Sequence[int] | None = None, max_size: int = 1333,
                 fast: bool = True, head_dtype: str = "float32",
                 schema: KeypointSchema | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, min_size=1 if min_size is None else min_size,
                         max_size=max_size, **kwargs)
        _fast_parts(self, resize=min_size is not None, mask_threshold=None, fast=fast,
                    head_dtype=head_dtype)
        self.schema = schema

    @property
    def num_keypoints(self) -> int:
        predictor = self.roi_heads.keypoint_predictor
        return int(getattr(predictor, "num_keypoints", None) or predictor.out_channels)

    def forward(self, images: list[torch.Tensor],
                targets: list[dict[str, Any]] | None = None) -> Any:
        if self.training and targets is not None:
            targets = clean_targets(targets, keypoint_offset=KEYPOINT_PIXEL_OFFSET,
                                    num_keypoints=self.num_keypoints)
        out = super().forward(images, targets)
        if not self.training:
            for det in out:
                kps = det["keypoints"].clone()
                kps[..., :2] -= KEYPOINT_PIXEL_OFFSET  # cell centres -> COCO pixel indices
                det["keypoints"] = kps
        return out


# ----------------------------------------------------------------------------- builders


def _anchor_generator(backbone: nn.Module, anchor_sizes: Sequence[int],
                      aspect_ratios: Sequence[float]) -> AnchorGenerator:
    levels = len(backbone.strides)
    sizes = [int(s) for s in anchor_sizes]
    if len(sizes) != levels or any(s <= 0 for s in sizes):
        raise UserError(f"anchor_sizes needs {levels} positive sizes (one per FPN level, strides "
                        f"{backbone.strides}), got {list(anchor_sizes)}")
    ratios = tuple(float(r) for r in aspect_ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise UserError(f"aspect_ratios must be positive numbers, got {list(aspect_ratios)}")
    return AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * levels)


def norm_layer(name: str | None) -> Callable[[int], nn.Module] | None:
    """`head_norm` as a layer factory of the channel count: "bn" BatchNorm2d, "gn" GroupNorm with
    32 groups (fewer when they do not divide the channels), None none."""
    if name is None:
        return None
    if name == "bn":
        return nn.BatchNorm2d
    if name == "gn":
        return _group_norm
    raise unknown_name("head_norm", name, NORMS)


def _group_norm(channels: int) -> GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return GroupNorm(groups, channels)


def _common(
    num_classes: int, backbone: str, weights: str | Path | None, trainable_layers: int,
    in_channels: int,
    anchor_sizes: Sequence[int], aspect_ratios: Sequence[float],
    image_mean: Sequence[float] | None, image_std: Sequence[float] | None,
    fpn_channels: int = 256, head_norm: str | None = None, box_head_convs: int = 0,
    backbone_width: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone and the keyword arguments every R-CNN here shares: the FPN normalised by
    `head_norm`; the box head torchvision's TwoMLPHead, or with `box_head_convs` > 0 that many
    3x3 convs (normalised by `head_norm`) and one 1024 fc, torchvision's v2 head."""
    norm = norm_layer(head_norm)
    if isinstance(box_head_convs, bool) or not isinstance(box_head_convs, int) \
            or box_head_convs < 0:
        raise UserError(f"box_head_convs must be an integer >= 0, got {box_head_convs!r}")
    body = build_fpn_backbone(backbone, weights, trainable_layers, in_channels=in_channels,
                              fpn_channels=fpn_channels, fpn_norm_layer=norm,
                              width=backbone_width)
    anchors = _anchor_generator(body, anchor_sizes, aspect_ratios)
    if image_mean is None:
        image_mean = IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,) * in_channels
    if image_std is None:
        image_std = IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,) * in_channels
    if len(image_mean) != in_channels or len(image_std) != in_channels:
        raise UserError(f"image_mean and image_std need {in_channels} values (one per channel)")
    kwargs = {
        "rpn_anchor_generator": anchors,
        "rpn_head": RPNHead(body.out_channels, anchors.num_anchors_per_location()[0]),
        "box_roi_pool": ParallelMultiScaleRoIAlign(body.featmap_names, output_size=7,
                                                   sampling_ratio=2),
        # box_head None: torchvision's TwoMLPHead (1024), built by FasterRCNN
        "box_head": None if box_head_convs == 0 else FastRCNNConvFCHead(
            (body.out_channels, 7, 7), [body.out_channels] * box_head_convs,
            [BOX_REPRESENTATION], norm_layer=norm),
        "box_predictor": FastRCNNPredictor(BOX_REPRESENTATION, num_classes),
        "image_mean": list(image_mean),
        "image_std": list(image_std),
    }
    return body, kwargs


# torchvision's RPN and box-branch settings, the same for every R-CNN builder here
RPN_BOX_OPTIONS = (
    "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_batch_size_per_image", "box_score_thresh",
    "box_nms_thresh", "box_detections_per_img", "box_batch_size_per_image", "box_positive_fraction",
)


def _pick(values: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: values[name] for name in names}


def _head_layers(name: str, values: Sequence[int]) -> tuple[int, ...]:
    """A head's conv widths as positive ints; a one-line error naming the option otherwise."""
    layers = tuple(int(c) for c in values)
    if not layers or any(c < 1 for c in layers):
        raise UserError(f"{name} must be positive channel counts, got {list(values)}")
    return layers


def _roi_levels(names: Sequence[str], levels: int | None, option: str) -> list[str]:
    """The `levels` finest of the FPN's feature map `names` (all for None); a one-line error
    naming `option` for a count out of range."""
    if levels is None:
        return list(names)
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= len(names):
        raise UserError(f"{option} must be an integer from 1 to {len(names)} (the FPN's levels), "
                        f"got {levels!r}")
    return list(names[:levels])


def _check_fraction(name: str, value: Any) -> None:
    """A one-line error unless 0 < value <= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UserError(f"{name} must be in (0, 1], got {value!r}")


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        check_positive_int(name, value)


def mask_rcnn(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    backbone_width: int | None = None,
    weights: str | Path | None = None,
    trainable_layers: int = 5,
    in_channels: int = 3,
    fpn_channels: int = 256,
    upsample: UpsampleArg = "transposed",
    mask_head_layers: Sequence[int] = (256, 256, 256, 256),
    mask_head_dilation: int = 1,
    mask_fc_fusion: bool = False,
    mask_roi_size: int = 14,
    mask_roi_levels: int | None = None,
    head_norm: str | None = None,
    box_head_convs: int = 0,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    min_size: int | None = None,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_batch_size_per_image: int = 256,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    mask_threshold: float | None = 0.5,
    maskness: float = 0.0,
    mask_class_agnostic: bool = False,
    aux_semantic: float = 0.0,
    semantic_channels: int = 64,
    semantic_rescore: float = 0.0,
    fast: bool = True,
    head_dtype: str = "float32",
    mask_classifier: bool = False,
    classifier_size: int = 32,
    classifier_widths: Sequence[int] = (32, 64, 128),
    classifier_margin: float = 0.15,
    classifier_top_k: int = 2,
    classifier_weight: float = 1.0,
    classifier_jitter: float = 0.1,
    classifier_masks: str = "truth",
) -> MaskRCNN:
    """Mask R-CNN with a `backbone`-FPN (resnet18/34/50, mobilenet_v3_large), random init or
    `weights` (a local classification state dict for the backbone).

    num_classes counts the background (K + 1). upsample: the mask predictor's upsampler
    (`rcnn_heads.MaskPredictor`). mask_head_layers: channels of the 3x3 convs before it;
    mask_head_dilation: their dilation (torchvision's MaskRCNNHeads; 1 as the paper: four
    convs see 9 x 9 of the 14 x 14 RoI; 2: 17 x 17, the whole RoI, at the same cost, so that a
    mask can tell the object its box is centred on from another one overlapping it).
    mask_fc_fusion: add PANet's fully-connected fusion to the mask predictor (an fc over the
    whole RoI adds a class-agnostic mask; `MaskPredictor`'s fc_fusion_size).
    mask_roi_size: the mask branch's RoIAlign output side; masks are predicted (and trained) at
    twice it (14: the paper's 28 x 28; 28 gives 56 x 56 masks, 4x the mask head's cost, for
    thin parts such as limbs).
    mask_roi_levels: how many of the finest FPN levels the mask branch pools from (None: all,
    each RoI from the level its size maps to, as torchvision; 1: every RoI from the stride-4
    level, so that a large object's 14 x 14 RoI samples 4-pixel features, not 16- or 32-pixel
    ones; RoIs too large for the levels kept go to the coarsest of them).
    fpn_channels: the FPN's width (256 as torchvision; 128 halves the cost on small images).
    backbone_width: a ResNet backbone's stem width (None: torchvision's 64; 32 builds its
    stages at half width, ~1/4 of its cost; `build_fpn_backbone`'s width).
    head_norm: "bn" or "gn" normalises the FPN and the mask (and conv box) head, as
    torchvision's v2 Mask R-CNN (BN) and training from scratch (He et al. 2019, GN) do; None
    (default) as the original. box_head_convs: 3x3 convs before the box head's fc (0: the two-fc
    head of the paper; torchvision v2: 4).
    anchor_sizes: one per FPN level (5). min_size None keeps images as they are; otherwise
    torchvision's resize (short side min_size, long side <= max_size). rpn_* / box_*:
    torchvision's settings (box_detections_per_img: raise it for crowded images, e.g. 300 for
    cells; box_positive_fraction: the largest share of positives among the
    box_batch_size_per_image proposals sampled per image, which are also the mask head's
    training RoIs). mask_threshold: threshold after pasting (None: probabilities).
    maskness: at eval, scores times each RoI mask's maskness (SOLOv2's mean probability over
    the mask's pixels >= 0.5) to this power (0, default: the box head's scores, as
    torchvision; 1: SOLOv2's product; a pixelwise addition, fast path only).
    mask_class_agnostic: one mask per RoI for every class instead of one per class
    (`MaskPredictor`'s class_agnostic). fast: the fast eval path of `fast_postprocess`.
    head_dtype: "bfloat16" runs the mask head and predictor in bfloat16 at eval on CPU (the
    fast path's `FastRoIHeads.head_dtype`: ~2x faster heads where the CPU has native bf16,
    masks within a few pixels of float32's; boxes and scores unchanged); "float32" (default)
    gives torchvision's numbers.
    aux_semantic: weight of an auxiliary per-pixel loss on a Panoptic-FPN semantic branch
    (`semantic_channels` wide) whose labels are made from the instance masks (`rcnn_semantic`;
    0: no branch, the plain Mask R-CNN). semantic_rescore in [0, 1]: at eval, how much that
    branch's class probabilities over each mask weigh in the detection's score (0: not at all;
    needs aux_semantic > 0).
    mask_classifier: add the second-stage `MaskClassifier` (crops `classifier_size` px, CNN
    `classifier_widths`, box margin `classifier_margin`; the rest: see `MaskRCNN`).
    classifier_masks: what it is trained on: "truth" (the ground-truth masks at jittered
    boxes) or "predicted" (the mask head's own masks of the positive proposals, as at eval).
    """
    settings = dict(locals())  # the RPN / box options are passed on as they are (RPN_BOX_OPTIONS)
    _check_positive(num_classes=num_classes, box_detections_per_img=box_detections_per_img,
                    mask_roi_size=mask_roi_size, semantic_channels=semantic_channels,
                    mask_head_dilation=mask_head_dilation)
    _check_fraction("box_positive_fraction", box_positive_fraction)
    if not (isinstance(aux_semantic, (int, float)) and aux_semantic >= 0):
        raise UserError(f"aux_semantic must be a weight >= 0, got {aux_semantic!r}")
    if not (isinstance(semantic_rescore, (int, float)) and 0 <= semantic_rescore <= 1):
        raise UserError(f"semantic_rescore must be in [0, 1], got {semantic_rescore!r}")
    if semantic_rescore > 0 and aux_semantic == 0:
        raise UserError("semantic_rescore needs the semantic branch: set aux_semantic > 0")
    _check_positive(classifier_top_k=classifier_top_k)
    if not (isinstance(classifier_weight, (int, float)) and classifier_weight > 0):
        raise UserError(f"classifier_weight must be > 0, got {classifier_weight!r}")
    if not (isinstance(classifier_jitter, (int, float)) and 0 <= classifier_jitter < 0.5):
        raise UserError(f"classifier_jitter must be in [0, 0.5), got {classifier_jitter!r}")
    body, kwargs = _common(num_classes, backbone, weights, trainable_layers, in_channels,
                           anchor_sizes, aspect_ratios, image_mean, image_std, fpn_channels,
                           head_norm, box_head_convs, backbone_width)
    layers = _head_layers("mask_head_layers", mask_head_layers)
    return MaskRCNN(
        body, None,
        min_size=min_size, max_size=max_size, mask_threshold=mask_threshold, fast=fast,
        head_dtype=head_dtype, maskness=maskness,
        **_pick(settings, RPN_BOX_OPTIONS),
        mask_roi_pool=ParallelMultiScaleRoIAlign(
            _roi_levels(body.featmap_names, mask_roi_levels, "mask_roi_levels"),
            output_size=mask_roi_size, sampling_ratio=2),
        mask_head=MaskRCNNHeads(body.out_channels, layers, mask_head_dilation,
                                norm_layer=norm_layer(head_norm)),
        mask_predictor=MaskPredictor(layers[-1], num_classes, upsample,
                                     class_agnostic=mask_class_agnostic,
                                     fc_fusion_size=mask_roi_size if mask_fc_fusion else None),
        semantic_head=None if aux_semantic == 0 else SemanticFPNHead(
            num_classes, body.out_channels, body.strides[: len(body.featmap_names)],
            list(body.featmap_names), channels=semantic_channels),
        aux_semantic=aux_semantic, semantic_rescore=semantic_rescore,
        mask_classifier=MaskClassifier(in_channels, num_classes - 1, size=classifier_size,
                                       widths=classifier_widths, margin=classifier_margin
                                       ) if mask_classifier else None,
        classifier_top_k=min(classifier_top_k, num_classes - 1),
        classifier_weight=classifier_weight, classifier_jitter=classifier_jitter,
        classifier_masks=classifier_masks,
        **kwargs,
    )


def _resolve_schema(num_keypoints: int | None, schema: KeypointSchema | dict | None
                    ) -> KeypointSchema:
    if isinstance(schema, dict):
        schema = KeypointSchema.from_coco_category(schema, where="keypoint_rcnn schema")
    if schema is None:
        if num_keypoints is None:
            return KeypointSchema.coco_person()
        _check_positive(num_keypoints=num_keypoints)
        if num_keypoints == 17:
            return KeypointSchema.coco_person()
        names = tuple(f"kp{i}" for i in range(num_keypoints))
        return KeypointSchema(names, sigmas=(DEFAULT_SIGMA,) * num_keypoints)
    if not isinstance(schema, KeypointSchema):
        raise UserError(f"schema must be a KeypointSchema or a COCO category dict, got "
                        f"{type(schema).__name__}")
    if num_keypoints is not None and num_keypoints != schema.num_keypoints:
        raise UserError(f"num_keypoints={num_keypoints} but the schema has "
                        f"{schema.num_keypoints} keypoints")
    return schema


def keypoint_rcnn(
    num_classes: int = 2,
    *,
    num_keypoints: int | None = None,
    schema: KeypointSchema | dict | None = None,
    backbone: str = "resnet50",
    backbone_width: int | None = None,
    weights: str | Path | None = None,
    trainable_layers: int = 5,
    in_channels: int = 3,
    fpn_channels: int = 256,
    upsample: UpsampleArg = "transposed",
    keypoint_head_layers: Sequence[int] = (512,) * 8,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    min_size: int | None = None,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_batch_size_per_image: int = 256,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    fast: bool = True,
    head_dtype: str = "float32",
) -> KeypointRCNN:
    """Keypoint R-CNN: each keypoint a one-hot 56x56 heatmap (softmax cross-entropy).

    The keypoints come from `schema` (a `KeypointSchema` or a COCO category dict: names,
    skeleton, flip pairs, OKS sigmas) or just `num_keypoints` (default: COCO's 17 person
    keypoints); `model.schema` keeps it. num_classes counts the background (2: one object class).
    upsample: the keypoint predictor's first x2 step (`rcnn_heads.KeypointPredictor`).
    keypoint_head_layers: channels of the 3x3 convs (torchvision: 8 x 512). Other options as
    `mask_rcnn` (head_dtype: the keypoint head and predictor). Horizontal flips (with
    left/right swaps) belong to the data transforms.
    """
    settings = dict(locals())  # the RPN / box options are passed on as they are (RPN_BOX_OPTIONS)
    _check_positive(num_classes=num_classes, box_detections_per_img=box_detections_per_img)
    _check_fraction("box_positive_fraction", box_positive_fraction)
    schema = _resolve_schema(num_keypoints, schema)
    body, kwargs = _common(num_classes, backbone, weights, trainable_layers, in_channels,
                           anchor_sizes, aspect_ratios, image_mean, image_std, fpn_channels,
                           backbone_width=backbone_width)
    layers = _head_layers("keypoint_head_layers", keypoint_head_layers)
    return KeypointRCNN(
        body, None,
        min_size=min_size, max_size=max_size, fast=fast, head_dtype=head_dtype, schema=schema,
        **_pick(settings, RPN_BOX_OPTIONS),
        keypoint_roi_pool=ParallelMultiScaleRoIAlign(body.featmap_names, output_size=14,
                                                     sampling_ratio=2),
        keypoint_head=KeypointRCNNHeads(body.out_channels, layers),
        keypoint_predictor=KeypointPredictor(layers[-1], schema.num_keypoints, upsample),
        **kwargs,
    )


# name -> builder (for the lead's MODELS dict)
RCNN_MODELS = {"mask_rcnn": mask_rcnn, "keypoint_rcnn": keypoint_rcnn}
