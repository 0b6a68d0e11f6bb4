"""SOLOv2 (Wang, Zhang, Kong, Li, Shen 2020): box-free instance segmentation with Matrix NMS.

The padded input canvas is split into S x S grids on five FPN levels. The cell holding an
object's centre predicts its class (category branch) and a dynamic 1x1 kernel (kernel branch);
the kernel dotted with a unified mask-feature map at 1/4 resolution gives the object's mask.
Matrix NMS (`pixelwise.ops.matrix_nms`) removes duplicates in parallel. Boxes are never used in
training; in eval they are derived from the predicted masks (for COCO ``bbox`` AP).

Contract (torchvision's detection models, so the instance task shares predict / eval code with
`mask_rcnn`): ``forward(images, targets=None)`` with images a list of (C, H, W) float tensors in
[0, 1] (sizes may differ) and targets a list of dicts with ``masks`` (N, H, W) {0, 1} and
``labels`` (N,) int64 1..K (``iscrowd`` == 1 instances are left out; ``boxes`` are ignored).
Training: ``{"loss_category", "loss_mask"}`` (and ``"loss_mask_class"`` with a mask
classifier). Eval: per image ``{"boxes" (D, 4) float XYXY, "labels" (D,) int64 1..K, "scores"
(D,), "masks" (D, 1, H, W) float probabilities}``, by score descending.

Levels and defaults follow the official code: the head sees P2 (downsampled 2x), P3, P4, P5 and
P6 (resized to P5), strides 8, 8, 16, 32, 32, with grids (40, 36, 24, 16, 12) and scale ranges
((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)) -- sqrt(h w) of the mask's box in input
pixels, made for COCO images of ~800 x 1333. For small images give smaller ones (e.g. for
256 x 256: ``grid_sizes=(24, 20, 16, 12, 8)``, ``scale_ranges=((1, 48), (24, 96), (48, 160),
(96, 256), (160, 512))``). The heads default to the official widths (tower 512 x 4 convs,
E = 256, mask branch 128); `head_channels`, `stacked_convs`, `kernel_channels` make it lighter.
One test-time default differs from the official code: candidate masks are not dropped for being
smaller than their level's stride (`min_mask_area`, see `SOLOv2`), which would remove every
object under ~11 x 11 pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes

from pixelwise.decoders._upsample import per_stage
from pixelwise.errors import UserError, check_positive_int, unknown_name
from pixelwise.models.fpn_backbone import build_fpn_backbone
from pixelwise.models.mask_classifier import MaskClassifier, top_k_classes
from pixelwise.models.solov2_head import MaskFeatureBranch, SOLOv2Head
from pixelwise.models.solov2_loss import category_loss, dice_loss
from pixelwise.models.solov2_targets import (LevelTargets, mask_boxes, mask_targets,
                                             solov2_targets)
from pixelwise.ops import DECAY_KERNELS, matrix_nms

logger = logging.getLogger(__name__)

GRID_SIZES = (40, 36, 24, 16, 12)
SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
# the backbone levels SOLOv2 expects (torchvision FPN: "0".."3" + "pool") and the head's strides
FPN_STRIDES = (4, 8, 16, 32, 64)
HEAD_STRIDES = (8, 8, 16, 32, 32)
MASK_STRIDE = 4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def points_nms(probs: torch.Tensor) -> torch.Tensor:
    """Keep grid-cell scores that are the maximum of their 2 x 2 window with the cells above
    and to the left (the official code's ``points_nms``); others become 0. (N, K, S, S)."""
    hmax = F.max_pool2d(probs, 2, stride=1, padding=1)[..., :-1, :-1]  # (N, K, S, S)
    return probs * (hmax == probs)


class SOLOv2(nn.Module):
    """SOLOv2 from finished parts; `solov2(...)` builds the defaults.

    Args:
        backbone: a torchvision-style FPN backbone (`build_fpn_backbone`): forward ->
            OrderedDict of five maps at strides 4, 8, 16, 32, 64, attribute `out_channels`.
        head: `SOLOv2Head` (category + kernel branches); mask_branch: `MaskFeatureBranch`.
        num_classes: labels including the background (K + 1, torchvision's convention).
        scale_ranges: per level (low, high) of sqrt(h w) in input pixels; center_sigma: the
            centre region's fraction of the object's size.
        dice_weight, focal_alpha, focal_gamma: loss settings (3, 0.25, 2).
        score_threshold: category probability for a candidate (0.1); mask_threshold: mask
            probability for a pixel (0.5); pre_nms_top_n: candidates into Matrix NMS (500);
            update_threshold: decayed score to keep (0.05); nms_kernel / nms_sigma: Matrix NMS
            decay ("gaussian", 2.0); max_detections: per image (100). min_mask_area: candidate
            masks of at most this many input pixels are dropped (0: keep every non-empty mask);
            None: the official rule, area at 1/4 resolution <= the level's stride (8, 8, 16, 32,
            32), i.e. <= 128 input pixels at the finest levels -- it drops every object under
            about 11 x 11 pixels, which small images are full of.
        image_mean, image_std: per-channel normalisation; size_divisible: canvas padding.
        mask_classifier: an optional second-stage `MaskClassifier` (a pixelwise addition, not
            in the paper) that re-decides each detection's class from its mask and image
            crop. Training: `classifier_samples` positive cells per image (at random) give it
            their predicted masks, labelled with their instance's class ("loss_mask_class",
            cross-entropy x `classifier_weight`). Eval: after Matrix NMS each kept mask is
            classified once; it is emitted with its `classifier_top_k` most probable classes,
            score = the first stage's score x the class probability, and Matrix NMS runs again.

    Test-time flip (`set_flip_test`, what `pixelwise eval/predict --tta flip` switch on; off
    by default): the padded canvas and its mirror image both go through the network. A grid
    cell's category probabilities are averaged with those of its mirror cell (row i, column
    S-1-j) of the mirrored canvas, before `points_nms`; each candidate's mask probabilities
    with the mirror cell's mask (its kernel on the mirrored mask features) mirrored back; a
    mask classifier averages its probabilities over the 8 symmetries of each crop. The rest of
    the test steps are unchanged. Twice the network's time. A pixelwise addition: the official
    code has no test-time augmentation for SOLOv2.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: SOLOv2Head,
        mask_branch: MaskFeatureBranch,
        num_classes: int,
        *,
        scale_ranges: Sequence[tuple[float, float]] = SCALE_RANGES,
        center_sigma: float = 0.2,
        dice_weight: float = 3.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_threshold: float = 0.1,
        mask_threshold: float = 0.5,
        pre_nms_top_n: int = 500,
        update_threshold: float = 0.05,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        max_detections: int = 100,
        min_mask_area: float | None = 0,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
        mask_classifier: MaskClassifier | None = None,
        classifier_samples: int = 16,
        classifier_top_k: int = 2,
        classifier_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_branch = mask_branch
        self.num_classes = num_classes
        self.grid_sizes = head.grid_sizes
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in scale_ranges)
        self.center_sigma = center_sigma
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.pre_nms_top_n = pre_nms_top_n
        self.update_threshold = update_threshold
        self.nms_kernel = nms_kernel
        self.nms_sigma = nms_sigma
        self.max_detections = max_detections
        self.min_mask_area = min_mask_area
        self.size_divisible = size_divisible
        self.mask_classifier = mask_classifier
        self.classifier_samples = classifier_samples
        self.classifier_top_k = min(classifier_top_k, num_classes - 1)
        self.classifier_weight = classifier_weight
        self.flip_test = False
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32),
                             persistent=False)

    # ------------------------------------------------------------------------- input

    def batch_images(self, images: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad images to one canvas (N, C, H, W), H and W multiples of
        `size_divisible`. Returns the batch and each image's (h, w)."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        if not images:
            raise UserError("solov2: no images given")
        channels = self.image_mean.numel()
        for img in images:
            if img.dim() != 3 or img.shape[0] != channels:
                raise UserError(f"solov2: expected images of shape ({channels}, H, W), got "
                                f"{tuple(img.shape)}")
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        d = self.size_divisible
        height = math.ceil(max(h for h, _ in sizes) / d) * d
        width = math.ceil(max(w for _, w in sizes) / d) * d
        batch = images[0].new_zeros(len(images), channels, height, width)
        mean, std = self.image_mean[:, None, None], self.image_std[:, None, None]
        for k, img in enumerate(images):
            batch[k, :, : img.shape[-2], : img.shape[-1]] = (img - mean) / std
        return batch, sizes

    def head_levels(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The head's inputs from P2..P6: P2 halved, P3, P4, P5, P6 resized to P5 (official)."""
        p2, p3, p4, p5, p6 = maps
        return [F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False),
                p3, p4, p5,
                F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False)]

    def forward(self, images: Sequence[torch.Tensor],
                targets: Sequence[dict[str, torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Loss dict in training (targets needed), detections per image in eval."""
        if self.training and targets is None:
            raise UserError("solov2: training mode needs targets (masks and labels)")
        batch, sizes = self.batch_images(images)
        cates, kernels, mask_features = self.predict_maps(batch)
        canvas = (batch.shape[-2], batch.shape[-1])
        if self.training:
            return self.losses(cates, kernels, mask_features, targets, sizes, canvas, batch)
        mirror = self.predict_maps(batch.flip(-1)) if self.flip_test else None
        return [self.detect([c[b] for c in cates], [k[b] for k in kernels], mask_features[b],
                            sizes[b], canvas, batch[b],
                            mirror=None if mirror is None else
                            ([c[b] for c in mirror[0]], [k[b] for k in mirror[1]], mirror[2][b]))
                for b in range(len(sizes))]

    def predict_maps(self, batch: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The network on a normalised canvas (N, C, H, W): category logits per level (N, K, S,
        S), kernels per level (N, E, S, S), mask features (N, E, H/4, W/4)."""
        maps = list(self.backbone(batch).values())  # 5 x (N, C, H/s, W/s), s = 4..64
        mask_features = self.mask_branch(maps[:4])  # (N, E, H/4, W/4)
        cates, kernels = self.head(self.head_levels(maps))  # per level (N, K, S, S), (N, E, S, S)
        return cates, kernels, mask_features

    def set_flip_test(self, enabled: bool) -> None:
        """Switch the test-time flip (see the class docstring) on or off."""
        self.flip_test = bool(enabled)

    # ------------------------------------------------------------------------- training

    def targets_for(self, target: dict[str, torch.Tensor], size: tuple[int, int],
                    canvas: tuple[int, int]) -> tuple[list[LevelTargets], torch.Tensor]:
        """One image's grid targets (per level) and its soft mask targets (N, H/4, W/4)."""
        if "masks" not in target or "labels" not in target:
            raise UserError("solov2: each target needs 'masks' (N, H, W) and 'labels' (N,)")
        masks, labels = target["masks"], target["labels"]
        if masks.dim() != 3 or tuple(masks.shape[-2:]) != size or len(labels) != len(masks):
            raise UserError(f"solov2: target masks of shape {tuple(masks.shape)} and "
                            f"{len(labels)} labels for an image of size {size}")
        if labels.numel() and (labels.min() < 1 or labels.max() >= self.num_classes):
            raise UserError(f"solov2: target labels must be in 1..{self.num_classes - 1}, got "
                            f"{labels.min().item()}..{labels.max().item()}")
        crowd = target.get("iscrowd")
        if crowd is not None and crowd.numel() and bool(crowd.any()):
            keep = crowd == 0
            masks, labels = masks[keep], labels[keep]
        levels = solov2_targets(masks, labels, canvas, self.grid_sizes, self.scale_ranges,
                                self.center_sigma)
        return levels, mask_targets(masks, canvas, MASK_STRIDE)

    def losses(self, cates: list[torch.Tensor], kernels: list[torch.Tensor],
               mask_features: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]],
               sizes: list[tuple[int, int]], canvas: tuple[int, int],
               batch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss_category": focal, "loss_mask": dice_weight * Dice} of a batch, and
        "loss_mask_class" with a mask classifier (`batch`: the normalised images, needed then)."""
        if len(targets) != len(sizes):
            raise UserError(f"solov2: {len(sizes)} images but {len(targets)} targets")
        all_levels, dice = [], []
        samples: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        num_positive = 0
        for b, (target, size) in enumerate(zip(targets, sizes)):
            levels, soft = self.targets_for(target, size, canvas)
            all_levels.append(levels)
            chosen, wanted, classes = [], [], []
            for level, lt in enumerate(levels):
                pos = lt.positive
                if pos.numel():
                    chosen.append(kernels[level][b].flatten(1)[:, pos].T)  # (E, S*S) -> (P, E)
                    wanted.append(soft[lt.instance[pos]])  # (P, H/4, W/4)
                    classes.append(lt.labels.flatten()[pos])  # (P,)
            if chosen:
                k = torch.cat(chosen)  # (P, E)
                feat = mask_features[b]  # (E, h, w)
                logits = (k @ feat.flatten(1)).reshape(-1, *feat.shape[-2:])  # (P, h, w)
                wanted_masks = torch.cat(wanted)  # (P, h, w)
                dice.append(dice_loss(logits.sigmoid(), wanted_masks))
                num_positive += k.shape[0]
                if self.mask_classifier is not None:
                    pick = torch.randperm(len(k), device=k.device)[: self.classifier_samples]
                    samples.append((b, logits[pick].detach().sigmoid(),
                                    wanted_masks[pick], torch.cat(classes)[pick]))
        loss_category = category_loss(cates, all_levels, num_positive,
                                      alpha=self.focal_alpha, gamma=self.focal_gamma)
        if dice:
            loss_mask = torch.cat(dice).mean() * self.dice_weight
        else:  # no object in the batch: a zero that still reaches every mask parameter (DDP)
            loss_mask = (mask_features.sum() + sum(k.sum() for k in kernels)) * 0.0
        losses = {"loss_category": loss_category, "loss_mask": loss_mask}
        if self.mask_classifier is not None:
            losses["loss_mask_class"] = self.classifier_loss(samples, batch)
        return losses

    def classifier_loss(self, samples: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
                        batch: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy of the mask classifier on sampled positive cells: per image (b,
        predicted probabilities (P, h, w), target masks (P, h, w), labels (P,) 1..K)."""
        classifier = self.mask_classifier
        if batch is None:
            raise UserError("solov2: the mask classifier's loss needs the batch of images")
        if not samples:  # no object in the batch: a zero that still reaches its parameters
            return sum(p.sum() for p in classifier.parameters()) * 0.0
        probs = torch.cat([p for _, p, _, _ in samples])  # (M, h, w)
        labels = torch.cat([c for _, _, _, c in samples])  # (M,)
        index = torch.cat([torch.full((len(p),), b, device=probs.device)
                           for b, p, _, _ in samples])  # (M,)
        boxes, found = mask_boxes(probs > self.mask_threshold)
        # a mask the model does not find yet is cropped at its target's box
        wanted_boxes, _ = mask_boxes(torch.cat([t for _, _, t, _ in samples]) > 0)
        boxes = torch.where(found[:, None], boxes, wanted_boxes)
        logits = classifier(batch, index, probs, boxes, stride=MASK_STRIDE)  # (M, K)
        return F.cross_entropy(logits.float(), labels - 1) * self.classifier_weight

    # ------------------------------------------------------------------------- inference

    @torch.no_grad()
    def detect(self, cates: list[torch.Tensor], kernels: list[torch.Tensor],
               mask_features: torch.Tensor, size: tuple[int, int], canvas: tuple[int, int],
               image: torch.Tensor | None = None,
               mirror: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
        """One image: cates per level (K, S, S) logits, kernels per level (E, S, S),
        mask_features (E, H/4, W/4), image (C, H, W) normalised on the canvas (needed by a mask
        classifier) -> the detections dict (see the module docstring). `mirror`: the same three
        of the mirrored canvas, for the test-time flip (see `SOLOv2`).

        The official test steps: category probabilities kept where they are 2 x 2 local maxima
        (`points_nms`) and > score_threshold; each candidate's mask = sigmoid(kernel . features),
        binarised at mask_threshold; small masks dropped (see `min_mask_area`); score *=
        maskness (mean probability inside the binary mask); Matrix NMS; masks upsampled 4x to
        the canvas, cropped to the image. One addition: at most pre_nms_top_n candidates (by
        category probability) have their masks computed, which bounds time and memory when an
        untrained model scores thousands of cells. The area filter is `min_mask_area`'s. With a
        mask classifier, its step (see `SOLOv2`) follows Matrix NMS.
        """
        num_things = cates[0].shape[0]
        grid_probs = [c.sigmoid() for c in cates]  # per level (K, S, S)
        if mirror is not None:  # cell (i, j) of the canvas is cell (i, S-1-j) of its mirror
            grid_probs = [(p + m.sigmoid().flip(-1)) / 2 for p, m in zip(grid_probs, mirror[0])]
        probs = torch.cat([points_nms(p[None])[0].permute(1, 2, 0).reshape(-1, num_things)
                           for p in grid_probs])  # per level (K, S, S) -> (S*S, K); (cells, K)
        kern = _cell_kernels(kernels)  # (cells, E)
        strides = torch.cat([torch.full((s * s,), float(stride), device=kern.device)
                             for s, stride in zip(self.grid_sizes, HEAD_STRIDES)])  # (cells,)
        cell, cls = torch.nonzero(probs > self.score_threshold, as_tuple=True)
        scores = probs[cell, cls]
        if scores.numel() > self.pre_nms_top_n:
            top = torch.topk(scores, self.pre_nms_top_n).indices
            cell, cls, scores = cell[top], cls[top], scores[top]
        seg = _mask_probabilities(kern[cell], mask_features)  # (M, h4, w4)
        if mirror is not None:  # the mirror cells' masks, mirrored back
            mirrored = [k.flip(-1) for k in mirror[1]]  # per level (E, S, S), cells as the canvas
            seg = (seg + _mask_probabilities(_cell_kernels(mirrored)[cell], mirror[2]).flip(-1)) / 2
        binary = seg > self.mask_threshold
        areas = binary.flatten(1).sum(1).to(seg.dtype)  # (M,)
        if self.min_mask_area is None:  # the official filter
            keep = areas > strides[cell]
        else:  # areas at 1/4 resolution -> input pixels
            keep = (areas > 0) & (areas * MASK_STRIDE**2 > self.min_mask_area)
        seg, binary, areas = seg[keep], binary[keep], areas[keep]
        scores, labels, cell = scores[keep], cls[keep] + 1, cell[keep]
        scores = scores * (seg * binary).flatten(1).sum(1) / areas.clamp_min(1)  # maskness
        kept, scores = matrix_nms(binary, labels, scores, kernel=self.nms_kernel,
                                  sigma=self.nms_sigma, areas=areas,
                                  pre_nms_top_n=self.pre_nms_top_n,
                                  score_threshold=self.update_threshold,
                                  max_detections=self.max_detections)
        seg, labels = seg[kept], labels[kept]
        if self.mask_classifier is not None and len(seg):
            seg, labels, scores = self.reclassify(seg, binary[kept], areas[kept], scores,
                                                  cell[kept], image)
        h, w = size
        if len(seg) == 0:
            return {"boxes": seg.new_zeros(0, 4), "labels": labels, "scores": scores,
                    "masks": seg.new_zeros(0, 1, h, w)}
        masks = F.interpolate(seg[None], size=canvas, mode="bilinear",
                              align_corners=False)[0, :, :h, :w]  # (1, D, H, W) -> (D, h, w)
        full = masks > self.mask_threshold
        nonempty = full.flatten(1).any(1)  # a mask may vanish when upsampled: no detection
        masks, full = masks[nonempty], full[nonempty]
        labels, scores = labels[nonempty], scores[nonempty]
        boxes = masks_to_boxes(full) if len(full) else masks.new_zeros(0, 4)
        boxes[:, 2:] += 1  # pixel edges, as COCO's boxes of masks: [x1, y1, x2 + 1, y2 + 1]
        return {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks[:, None]}

    def reclassify(self, seg: torch.Tensor, binary: torch.Tensor, areas: torch.Tensor,
                   scores: torch.Tensor, cell: torch.Tensor, image: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask classifier's step on Matrix NMS's survivors (D of them: masks (D, h, w)
        probabilities and binary, areas, scores, grid cells): each distinct cell's mask is
        classified once; every mask comes back with its top-k classes (score x probability),
        and Matrix NMS runs again. Returns masks, labels, scores."""
        if image is None:
            raise UserError("solov2: the mask classifier needs the image")
        unique, inverse = torch.unique(cell, return_inverse=True)
        first = torch.full_like(unique, len(cell)).scatter_reduce(
            0, inverse, torch.arange(len(cell), device=cell.device), "amin")  # (U,)
        boxes, _ = mask_boxes(binary[first])  # every survivor's mask is non-empty
        logits = self.mask_classifier(image[None], torch.zeros_like(first), seg[first], boxes,
                                      stride=MASK_STRIDE, symmetries=self.flip_test)  # (U, K)
        probs = logits.float().softmax(1)[inverse]  # (U, K) -> (D, K)
        index, labels, scores = top_k_classes(probs, scores, self.classifier_top_k)
        seg, binary, areas = seg[index], binary[index], areas[index]
        # no score threshold this time: the first pass applied it, and a class probability
        # below 1 would otherwise drop masks the first pass kept (recall: AR100 0.58 vs 0.63)
        kept, scores = matrix_nms(binary, labels, scores, kernel=self.nms_kernel,
                                  sigma=self.nms_sigma, areas=areas,
                                  pre_nms_top_n=self.pre_nms_top_n,
                                  max_detections=self.max_detections)
        return seg[kept], labels[kept], scores


def _cell_kernels(kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every grid cell's kernel, level by level, row-major: per level (E, S, S) -> (cells, E)."""
    dim = kernels[0].shape[0]
    return torch.cat([k.permute(1, 2, 0).reshape(-1, dim) for k in kernels])  # (S*S, E) each


def _mask_probabilities(kernels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """sigmoid(kernel . features): kernels (M, E), features (E, h, w) -> (M, h, w)."""
    h, w = features.shape[-2:]
    return (kernels @ features.flatten(1)).sigmoid().reshape(-1, h, w)  # (M, h*w) -> (M, h, w)


def solov2(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    backbone_width: int | None = None,
    weights: str | Path | None = None,
    trainable_layers: int = 5,
    in_channels: int = 3,
    fpn_channels: int = 256,
    upsample: str | Callable[..., nn.Module] = "bilinear",
    grid_sizes: Sequence[int] = GRID_SIZES,
    scale_ranges: Sequence[Sequence[float]] = SCALE_RANGES,
    center_sigma: float = 0.2,
    head_channels: int = 512,
    stacked_convs: int = 4,
    kernel_channels: int = 256,
    mask_channels: int = 128,
    dice_weight: float = 3.0,
    score_threshold: float = 0.1,
    mask_threshold: float = 0.5,
    pre_nms_top_n: int = 500,
    update_threshold: float = 0.05,
    nms_kernel: str = "gaussian",
    nms_sigma: float = 2.0,
    max_detections: int = 100,
    min_mask_area: float | None = 0,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    mask_classifier: bool = False,
    classifier_size: int = 32,
    classifier_widths: Sequence[int] = (32, 64, 128),
    classifier_margin: float = 0.15,
    classifier_samples: int = 16,
    classifier_top_k: int = 2,
    classifier_weight: float = 1.0,
) -> SOLOv2:
    """SOLOv2 (box-free, Matrix NMS) on an FPN backbone; num_classes counts the background.

    backbone: resnet18 / resnet34 / resnet50 / mobilenet_v3_large + FPN (`build_fpn_backbone`:
    random init unless `weights` names a local torchvision file; `trainable_layers` as
    torchvision's; `fpn_channels` its FPN's width, 256 as torchvision; `backbone_width` a ResNet's
    stem width, None: torchvision's 64). upsample: the mask
    feature branch's upsampler (`pixelwise.upsample`).
    grid_sizes / scale_ranges: one per FPN level (5). head_channels, stacked_convs: category /
    kernel towers; kernel_channels: E; mask_channels: the mask feature branch's width.
    image_mean / image_std: per channel (None: ImageNet's, or its channel average when
    in_channels != 3, as `mask_rcnn`). mask_classifier: add the second-stage
    `MaskClassifier` (a pixelwise addition; off by default, as the paper), of crops
    `classifier_size` px, CNN widths `classifier_widths`, box margin `classifier_margin`.
    The rest: see `SOLOv2`.
    """
    grid_sizes = tuple(grid_sizes)
    scale_ranges = tuple(tuple(r) for r in scale_ranges)
    _check_options(num_classes, grid_sizes, scale_ranges, center_sigma, nms_kernel,
                   min_mask_area, stacked_convs=stacked_convs, head_channels=head_channels,
                   kernel_channels=kernel_channels, mask_channels=mask_channels,
                   max_detections=max_detections, pre_nms_top_n=pre_nms_top_n,
                   classifier_samples=classifier_samples, classifier_top_k=classifier_top_k)
    if not classifier_weight > 0:
        raise UserError(f"solov2: classifier_weight must be > 0, got {classifier_weight!r}")
    if image_mean is None:
        image_mean = IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,) * in_channels
    if image_std is None:
        image_std = IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,) * in_channels
    if len(image_mean) != in_channels or len(image_std) != in_channels:
        raise UserError(f"solov2: image_mean and image_std need {in_channels} values (one per "
                        "channel)")
    upsample = per_stage(upsample, 1, "solov2")[0]
    body = build_fpn_backbone(backbone, weights, trainable_layers, in_channels=in_channels,
                              fpn_channels=fpn_channels, width=backbone_width)
    strides = tuple(getattr(body, "strides", FPN_STRIDES))
    if strides != FPN_STRIDES:
        raise UserError(f"solov2: backbone {backbone!r} gives levels at strides {strides}, "
                        f"SOLOv2 needs {FPN_STRIDES}")
    head = SOLOv2Head(num_classes - 1, body.out_channels, grid_sizes, channels=head_channels,
                      stacked_convs=stacked_convs, kernel_channels=kernel_channels)
    mask_branch = MaskFeatureBranch(body.out_channels, 4, channels=mask_channels,
                                    out_channels=kernel_channels, upsample=upsample)
    classifier = MaskClassifier(in_channels, num_classes - 1, size=classifier_size,
                                widths=classifier_widths, margin=classifier_margin
                                ) if mask_classifier else None
    return SOLOv2(
        body, head, mask_branch, num_classes,
        scale_ranges=scale_ranges, center_sigma=center_sigma, dice_weight=dice_weight,
        score_threshold=score_threshold, mask_threshold=mask_threshold,
        pre_nms_top_n=pre_nms_top_n, update_threshold=update_threshold, nms_kernel=nms_kernel,
        nms_sigma=nms_sigma, max_detections=max_detections, min_mask_area=min_mask_area,
        image_mean=image_mean, image_std=image_std, mask_classifier=classifier,
        classifier_samples=classifier_samples, classifier_top_k=classifier_top_k,
        classifier_weight=classifier_weight,
    )  # fmt: skip


def _check_options(num_classes: int, grid_sizes: tuple, scale_ranges: tuple,
                   center_sigma: float, nms_kernel: str, min_mask_area: float | None, *,
                   stacked_convs: int, **positive: int) -> None:
    """The builder's checks: one-line `UserError`s naming the option."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"solov2: num_classes counts the background and must be >= 2, got "
                        f"{num_classes!r}")
    levels = len(FPN_STRIDES)
    for name, values, what in (("grid sizes", grid_sizes, "grid sizes"),
                               ("scale ranges", scale_ranges, "(low, high) pairs")):
        if len(values) != levels:
            raise UserError(f"solov2: {len(values)} {name} for the {levels} FPN levels "
                            f"(strides {', '.join(map(str, FPN_STRIDES))}); give {levels} {what}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in grid_sizes):
        raise UserError(f"solov2: grid sizes must be positive integers, got {list(grid_sizes)}")
    if not all(len(r) == 2 and 0 <= r[0] <= r[1] for r in scale_ranges):
        raise UserError(f"solov2: scale ranges must be (low, high) pairs with 0 <= low <= high, "
                        f"got {[list(r) for r in scale_ranges]}")
    if not 0 < center_sigma <= 1:
        raise UserError(f"solov2: center_sigma must be in (0, 1], got {center_sigma!r}")
    if min_mask_area is not None and not (
            isinstance(min_mask_area, (int, float)) and min_mask_area >= 0):
        raise UserError(f"solov2: min_mask_area must be a number >= 0 or None (the official "
                        f"per-level rule), got {min_mask_area!r}")
    if nms_kernel not in DECAY_KERNELS:
        raise unknown_name("Matrix NMS kernel", nms_kernel, DECAY_KERNELS)
    for name, value in positive.items():
        check_positive_int(f"solov2: {name}", value)
    if isinstance(stacked_convs, bool) or not isinstance(stacked_convs, int) or stacked_convs < 0:
        raise UserError(f"solov2: stacked_convs must be a non-negative integer, got "
                        f"{stacked_convs!r}")
