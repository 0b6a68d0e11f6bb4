"""FCN-32s / 16s / 8s heads (Long, Shelhamer & Darrell 2015), for any encoder's stages.

A head on the deepest stage (the paper's fc6/fc7 turned into convolutions, then a 1x1 "score"
conv to class scores); for FCN-16s/8s, 1x1 score convs on the stages of stride 16 and 8 ("pool4",
"pool3"), **zero-initialised**, so training starts from the coarser net; each skip is **summed**
with the 2x-upsampled coarser scores. A last upsampler brings the scores to the input size. The
paper's upsamplers are transposed convolutions initialised to bilinear interpolation, the last one
kept fixed; any upsampler can be chosen by name (one for all, or one per upsampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pixelwise.decoders._upsample import UpsampleArg, needs_indices, per_stage
from pixelwise.encoders.base import ShapeSpec
from pixelwise.encoders.blocks import conv_norm_act
from pixelwise.errors import UserError
from pixelwise.upsample import TransposedConv, make_upsampler


class FCNDecoder(nn.Module):
    """forward(features, size) -> logits (N, num_classes, *size).

    skips: 0 (FCN-32s), 1 (16s: + stage of stride S/2) or 2 (8s: + S/4), S the deepest stride.
    """

    def __init__(
        self,
        encoder_shapes: Sequence[ShapeSpec],
        num_classes: int,
        *,
        skips: int,
        upsample: UpsampleArg = "transposed",
        head_channels: int = 256,
        norm: str = "batch",
        fixed_final: bool = True,
    ) -> None:
        super().__init__()
        shapes = list(encoder_shapes)
        if len(shapes) < skips + 2:
            raise UserError(f"fcn: the encoder has {len(shapes)} stages, too few for {skips} skips")
        names = per_stage(upsample, skips + 1, f"fcn{shapes[-1].stride}s")
        for name in names:
            if needs_indices(name):
                raise UserError(
                    "fcn: upsample 'max_unpool' cannot upsample class scores (FCN upsamples by "
                    "2 and by 8..32 with no pooling indices of those sizes); use segnet or unet"
                )
        deep = shapes[-1]
        self.head = nn.Sequential(  # fc6 (a 3x3 conv here) and fc7 (1x1), then the score layer
            conv_norm_act(deep.channels, head_channels, 3, norm=norm),
            conv_norm_act(head_channels, head_channels, 1, norm=norm),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.skip_scores = nn.ModuleList()
        self.skip_levels: list[int] = []
        self.upsamplers = nn.ModuleList()
        for j in range(skips):
            level = len(shapes) - 2 - j
            score = nn.Conv2d(shapes[level].channels, num_classes, 1)
            nn.init.zeros_(score.weight)  # the paper: "zero-initialised", so 16s starts as 32s
            nn.init.zeros_(score.bias)
            self.skip_scores.append(score)
            self.skip_levels.append(level)
            self.upsamplers.append(
                make_upsampler(
                    names[j], num_classes, shapes[level + 1].stride // shapes[level].stride
                )
            )
        final_stride = shapes[len(shapes) - 1 - skips].stride
        self.final = make_upsampler(names[-1], num_classes, final_stride)
        if fixed_final and isinstance(self.final, TransposedConv):
            self.final.requires_grad_(False)  # "the final deconv filters are fixed to bilinear"
        self.skips = skips

    def forward(self, features: Sequence[torch.Tensor], *, size: Sequence[int]) -> torch.Tensor:
        x = self.head(features[-1])
        for level, score, up in zip(self.skip_levels, self.skip_scores, self.upsamplers):
            skip = features[level]
            x = up(x, size=skip.shape[-2:]) + score(
                skip
            )  # summed ("max fusion made learning difficult")
        return self.final(x, size=tuple(size))

    def rf_path(self) -> list[nn.Module]:
        return [self.head, *self.upsamplers, self.final]
