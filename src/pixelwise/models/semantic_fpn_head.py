"""The semantic branch of Panoptic FPN (Kirillov, Girshick, He, Dollár 2019, Fig. 3).

From each FPN level (strides 4, 8, 16, 32 by default) a stack of stages brings the features to
stride 4: a stage is conv 3x3 -> GroupNorm -> ReLU, followed by a 2x upsampling while the level
is still coarser than stride 4 (the stride-4 level gets one stage and no upsampling; stride 32
gets three stages). The stride-4 maps of all levels are summed, a 1x1 conv gives class scores,
and a final upsampling by 4 brings them to the image size.

The paper upsamples bilinearly; here every upsampling is `pixelwise.upsample.make_upsampler`'s
`upsample` (one name for all, as in the other decoders), so learned upsamplers can be compared on
this branch too. `max_unpool` is refused: an FPN keeps no pooling indices.

`semantic_fpn(num_classes, backbone=...)` is the branch alone on its own backbone-FPN: a semantic
segmentation model (``images (N, C, H, W) -> logits (N, K, H, W)``), the semantic half of
`panoptic_fpn` (e.g. the peer of `benchmarks/panoptic.py`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.decoders._upsample import needs_indices, per_stage
from pixelwise.errors import UserError
from pixelwise.models.base import SegmentationModel
from pixelwise.models.fpn_backbone import build_fpn_backbone
from pixelwise.models.norm import GroupNorm
from pixelwise.upsample import make_upsampler

logger = logging.getLogger(__name__)

VOID = 255  # semantic label of void pixels (pixelwise.data.panoptic)


class SemanticFPNHead(nn.Module):
    """Per-pixel class scores from FPN features.

    Args:
        num_classes: K, the semantic classes (things and stuff).
        in_channels: channels of every FPN level (torchvision's FPN: 256).
        strides: stride of each level used, finest first (e.g. 4, 8, 16, 32); powers of 2.
        in_features: the names of those levels in the backbone's output dict ("0".."3").
        channels: width of the stages (paper: 128).
        upsample: an upsampler name of `pixelwise.upsample.UPSAMPLERS` or a factory.
        num_groups: GroupNorm groups (paper: 32; reduced so that it divides `channels` with at
            least 2 channels a group).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32),
        in_features: Sequence[str] = ("0", "1", "2", "3"),
        *,
        channels: int = 128,
        upsample: str | Callable[..., nn.Module] = "bilinear",
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        strides, in_features = list(strides), list(in_features)
        if len(strides) != len(in_features) or not strides:
            raise UserError(f"semantic FPN head: {len(strides)} strides for "
                            f"{len(in_features)} levels")
        if any(s & (s - 1) or s < 1 for s in strides) or strides != sorted(set(strides)):
            raise UserError(f"semantic FPN head: strides must be increasing powers of 2, got "
                            f"{strides}")
        name = per_stage(upsample, 1, "semantic FPN head")[0]
        if needs_indices(name):
            raise UserError("semantic FPN head: upsample 'max_unpool' needs max-pool indices, "
                            "which an FPN does not keep; choose another upsampler")
        self.in_features = in_features
        self.strides = strides
        self.common_stride = strides[0]
        # at least 2 channels a group: GroupNorm of one channel on a 1x1 map (stride 32 of a
        # 32 px image) would normalise a single value
        groups = math.gcd(num_groups, max(channels // 2, 1))
        self.levels = nn.ModuleList()
        for stride in strides:
            ups = int(math.log2(stride // self.common_stride))  # 2x upsamplings to stride 4
            stages: list[nn.Module] = []
            for k in range(max(1, ups)):
                stages.append(nn.Sequential(
                    nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1,
                              bias=False),
                    GroupNorm(groups, channels),
                    nn.ReLU(inplace=True),
                ))
                stages.append(make_upsampler(name, channels, 2) if k < ups else nn.Identity())
            self.levels.append(nn.ModuleList(stages))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        self.final = make_upsampler(name, num_classes, self.common_stride)
        self._init_weights()

    def _init_weights(self) -> None:
        for level in self.levels:
            for module in level.modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and (
                        module.bias is None):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: Mapping[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """features: the FPN's dict of (N, C, H/s, W/s) maps; size: the (H, W) to output.
        Returns (N, K, H, W) class scores (logits)."""
        maps = [features[name] for name in self.in_features]
        by_stride = {s: tuple(m.shape[-2:]) for s, m in zip(self.strides, maps)}
        total = None
        for stride, x, stages in zip(self.strides, maps, self.levels):
            for k in range(0, len(stages), 2):
                x = stages[k](x)
                if not isinstance(stages[k + 1], nn.Identity):
                    stride //= 2
                    x = stages[k + 1](x, size=by_stride.get(stride))  # that level's exact size
            total = x if total is None else total + x
        return self.final(self.predictor(total), size=tuple(size))


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of torchvision's backbones (and R-CNNs)
IMAGENET_STD = (0.229, 0.224, 0.225)


def logits_at_original(logits: torch.Tensor, resized: Sequence[int], original: Sequence[int]
                       ) -> torch.Tensor:
    """(K, Hpad, Wpad) scores of a padded batch -> (K, H, W) at the image's original size: crop
    the padding, then undo the transform's resize bilinearly (as torchvision pastes masks)."""
    crop = logits[:, : resized[0], : resized[1]]
    if tuple(resized) == tuple(original):
        return crop
    return F.interpolate(crop[None], size=tuple(original), mode="bilinear",
                         align_corners=False)[0]  # (1, K, h, w) -> (K, H, W)


def semantic_loss(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
                  ) -> torch.Tensor:
    """Pixel-averaged cross-entropy over all images' non-void pixels (0 if all are void)."""
    total = logits[0].new_zeros(())
    count = 0
    for scores, target in zip(logits, targets):
        target = target.as_subclass(torch.Tensor).to(scores.device, torch.int64)
        if tuple(target.shape) != tuple(scores.shape[-2:]):
            raise UserError(f"semantic target {tuple(target.shape)} differs from "
                            f"its image {tuple(scores.shape[-2:])}")
        total = total + F.cross_entropy(scores[None], target[None], ignore_index=VOID,
                                        reduction="sum")
        count += int((target != VOID).sum())
    return total / max(count, 1)


class SemanticFPN(SegmentationModel):
    """backbone-FPN -> `SemanticFPNHead`. forward(images (N, C, H, W) in [0, 1]) -> logits
    (N, K, H, W); images are normalised inside (mean / std per channel, as the R-CNNs do)."""

    def __init__(self, backbone: nn.Module, head: SemanticFPNHead, *,
                 image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, -1, 1, 1),
                             persistent=False)  # (C,) -> (1, C, 1, 1)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, -1, 1, 1),
                             persistent=False)  # (C,) -> (1, C, 1, 1)
        self.num_classes = head.predictor.out_channels
        self.in_channels = len(image_mean)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.image_mean) / self.image_std)
        return self.head(features, images.shape[-2:])


def semantic_fpn(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    weights: str | Path | None = None,
    trainable_layers: int = 5,
    in_channels: int = 3,
    upsample: str | Callable[..., nn.Module] = "bilinear",
    semantic_channels: int = 128,
) -> SemanticFPN:
    """Semantic FPN (Kirillov et al. 2019's semantic branch on its own backbone-FPN).

    backbone: resnet18, resnet34, resnet50 or mobilenet_v3_large (`build_fpn_backbone`; random
    init, or `weights`: a local classification state dict). upsample: every upsampling of the
    head (default bilinear, the paper's). semantic_channels: the head's width (paper: 128).
    """
    body = build_fpn_backbone(backbone, weights, trainable_layers, in_channels=in_channels)
    levels = list(body.featmap_names)
    head = SemanticFPNHead(num_classes, body.out_channels, body.strides[: len(levels)], levels,
                           channels=semantic_channels, upsample=upsample)
    mean = IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,) * in_channels
    std = IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,) * in_channels
    return SemanticFPN(body, head, image_mean=mean, image_std=std)
