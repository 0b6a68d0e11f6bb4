"""Panoptic FPN (Kirillov, Girshick, He, Dollár, CVPR 2019): one FPN, two heads.

A single FPN backbone feeds both torchvision's Mask R-CNN heads (RPN + RoI box/mask heads: the
*thing* instances) and the semantic FPN branch (`SemanticFPNHead`: a class for every pixel, things
and stuff). The backbone runs once per image; both heads read the same feature dict. Training
minimises ``instance_loss_weight * (Mask R-CNN's five losses) + semantic_loss_weight *
loss_semantic`` (the paper balances the two with such weights). The panoptic output is made
afterwards, by `pixelwise.panoptic.fuse_panoptic`, from the eval outputs.

Contract (torchvision's R-CNN contract, plus the semantic map):

* ``forward(images, targets)`` in training: images a list of (C, H, W) float tensors in [0, 1],
  targets a list of dicts with the instance fields ``boxes`` (N, 4) XYXY, ``labels`` (N,) thing
  labels 1..T, ``masks`` (N, H, W) and, optionally, ``iscrowd`` (N,) (crowd instances are not
  fed to the instance heads: `rcnn.clean_targets`), and ``semantic`` (H, W) int64 labels 0..K-1 over
  all categories, 255 = void -- `pixelwise.data.panoptic.CocoPanoptic`'s target. Returns
  ``{"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
  "loss_semantic"}``, already weighted.
* in eval: a list with one dict per image: Mask R-CNN's ``boxes`` (N, 4), ``labels`` (N,),
  ``scores`` (N,), ``masks`` (N, 1, H, W) (bool at ``mask_threshold``, probabilities when it is
  None), plus ``semantic`` (K, H, W) logits, all at the input image's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixelwise.errors import UserError
from pixelwise.models.rcnn import (DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS, clean_targets,
                                   mask_rcnn)
from pixelwise.models.rcnn_heads import UpsampleArg
from pixelwise.models.semantic_fpn_head import (SemanticFPNHead, logits_at_original,
                                                semantic_loss)

logger = logging.getLogger(__name__)

# the target fields the instance branch reads (through rcnn.clean_targets)
INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "image_id")


class PanopticFPN(nn.Module):
    """Mask R-CNN + semantic FPN branch on one shared backbone.

    Args:
        detector: a torchvision `MaskRCNN` (its `transform`, `backbone`, `rpn`, `roi_heads` are
            used; its backbone is the shared one).
        semantic_head: reads the backbone's feature dict, ``(features, size) -> (N, K, H, W)``.
        instance_loss_weight, semantic_loss_weight: the joint loss's weights.
    """

    def __init__(self, detector: nn.Module, semantic_head: nn.Module, *,
                 instance_loss_weight: float = 1.0, semantic_loss_weight: float = 1.0) -> None:
        super().__init__()
        for name, value in (("instance_loss_weight", instance_loss_weight),
                            ("semantic_loss_weight", semantic_loss_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"panoptic_fpn: {name} must be a number >= 0, got {value!r}")
        self.detector = detector
        self.semantic_head = semantic_head
        self.instance_loss_weight = float(instance_loss_weight)
        self.semantic_loss_weight = float(semantic_loss_weight)

    @property
    def backbone(self) -> nn.Module:
        """The shared FPN backbone (the detector's; one module, one set of weights)."""
        return self.detector.backbone

    def forward(self, images: Sequence[torch.Tensor],
                targets: Sequence[dict[str, Any]] | None = None
                ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training and targets is None:
            raise UserError("panoptic_fpn: training needs targets (boxes, labels, masks, semantic)")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        instance_targets = None
        if self.training:  # plain tensors; crowd instances and degenerate boxes dropped
            instance_targets = clean_targets([{k: t[k] for k in INSTANCE_KEYS if k in t}
                                              for t in targets])
        det = self.detector
        batch, instance_targets = det.transform(list(images), instance_targets)
        features = det.backbone(batch.tensors)  # the one backbone pass
        proposals, proposal_losses = det.rpn(batch, features, instance_targets)
        detections, detector_losses = det.roi_heads(features, proposals, batch.image_sizes,
                                                    instance_targets)
        logits = self.semantic_head(features, batch.tensors.shape[-2:])  # (N, K, Hpad, Wpad)
        semantic = [logits_at_original(logits[i], resized, original)
                    for i, (resized, original) in enumerate(zip(batch.image_sizes, original_sizes))]
        if self.training:
            losses = {k: v * self.instance_loss_weight
                      for k, v in {**proposal_losses, **detector_losses}.items()}
            losses["loss_semantic"] = self.semantic_loss_weight * semantic_loss(
                semantic, [t["semantic"] for t in targets])
            return losses
        detections = det.transform.postprocess(detections, batch.image_sizes, original_sizes)
        for out, sem in zip(detections, semantic):
            out["semantic"] = sem  # (K, H, W)
        return detections


def panoptic_fpn(
    num_classes: int,
    *,
    num_things: int | None = None,
    backbone: str = "resnet50",
    backbone_width: int | None = None,
    weights: str | Path | None = None,
    trainable_layers: int = 5,
    in_channels: int = 3,
    fpn_channels: int = 256,
    upsample: str | Callable[..., nn.Module] = "bilinear",
    semantic_channels: int = 128,
    instance_loss_weight: float = 1.0,
    semantic_loss_weight: float = 1.0,
    mask_upsample: UpsampleArg = "transposed",
    mask_head_layers: Sequence[int] = (256, 256, 256, 256),
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    min_size: int | None = None,
    max_size: int = 1333,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    mask_threshold: float | None = 0.5,
) -> PanopticFPN:
    """Panoptic FPN: Mask R-CNN and a semantic FPN branch sharing one `backbone`-FPN.

    num_classes: C, the semantic classes (every category, things and stuff; `CocoPanoptic`'s
    ``classes``). num_things: T, the thing categories (the instance branch predicts labels 1..T,
    T + 1 classes with the background). upsample: the semantic branch's upsampler (a name of
    `pixelwise.upsample.UPSAMPLERS`; the paper's is bilinear). semantic_channels: its width (paper:
    128). instance_loss_weight / semantic_loss_weight: the joint loss's weights. mask_upsample: the
    mask predictor's upsampler (`mask_rcnn`'s ``upsample``). The remaining options are
    `mask_rcnn`'s (same names, same defaults; backbone choices: resnet18, resnet34, resnet50,
    mobilenet_v3_large).
    """
    if isinstance(num_things, bool) or not isinstance(num_things, int) or num_things < 1:
        raise UserError(f"panoptic_fpn needs num_things, the number of thing categories (>= 1), "
                        f"got {num_things!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
            num_classes <= num_things):
        raise UserError(f"panoptic_fpn: num_classes (all categories, {num_classes!r}) must be "
                        f"larger than num_things ({num_things}): stuff needs a class too")
    detector = mask_rcnn(
        num_things + 1, backbone=backbone, backbone_width=backbone_width, weights=weights,
        trainable_layers=trainable_layers,
        in_channels=in_channels, fpn_channels=fpn_channels, upsample=mask_upsample,
        mask_head_layers=mask_head_layers,
        anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios, min_size=min_size,
        max_size=max_size, rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image, box_score_thresh=box_score_thresh,
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image, mask_threshold=mask_threshold,
    )
    body = detector.backbone
    levels = list(body.featmap_names)  # the FPN levels without "pool"
    head = SemanticFPNHead(num_classes, body.out_channels, body.strides[: len(levels)], levels,
                           channels=semantic_channels, upsample=upsample)
    model = PanopticFPN(detector, head, instance_loss_weight=instance_loss_weight,
                        semantic_loss_weight=semantic_loss_weight)
    model.num_classes = num_classes
    model.num_things = num_things
    return model
