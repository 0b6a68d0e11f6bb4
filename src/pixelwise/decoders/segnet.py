"""SegNet's decoder (Badrinarayanan et al. 2017): upsample with the encoder's max-pool indices.

Mirror of the plain encoder, without skip concatenation: at each level, convs bring the map to the
shallower stage's channels, then the upsampler takes it to that stage's size -- `max_unpool` puts
each value back where the encoder's max-pool found it ("2 bits per 2x2 window" instead of a whole
feature map), and the next convs densify the sparse map. Any upsampler can replace max_unpool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pixelwise.decoders._upsample import UpsampleArg, needs_indices, per_stage
from pixelwise.encoders.base import ShapeSpec
from pixelwise.encoders.blocks import conv_block
from pixelwise.errors import UserError
from pixelwise.upsample import make_upsampler


class SegNetDecoder(nn.Module):
    """forward(features, indices, size) -> (N, out_channels, *size); only the deepest feature map
    is used, the others give the sizes to upsample to."""

    def __init__(
        self,
        encoder_shapes: Sequence[ShapeSpec],
        *,
        upsample: UpsampleArg = "max_unpool",
        norm: str = "batch",
        convs: int = 2,
    ) -> None:
        super().__init__()
        shapes = list(encoder_shapes)
        extra = int(math.log2(shapes[0].stride))
        n_up = len(shapes) - 1 + extra
        names = per_stage(upsample, n_up, "segnet")
        self.convs = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        c = shapes[-1].channels
        for i, name in enumerate(names):
            level = len(shapes) - 2 - i  # stage the upsampler goes to; < 0: beyond the encoder
            out_c = shapes[level].channels if level >= 0 else shapes[0].channels
            if needs_indices(name) and level < 0:
                raise UserError("segnet: max_unpool needs a pooling below every stage")
            scale = shapes[level + 1].stride // shapes[level].stride if level >= 0 else 2
            self.convs.append(conv_block(c, out_c, convs=convs, norm=norm))
            self.upsamplers.append(make_upsampler(name, out_c, scale))
            c = out_c
        self.last = conv_block(c, c, convs=convs, norm=norm)  # densifies the last unpooled map
        self.out_channels = c
        self.levels = len(shapes) - 1

    def forward(
        self,
        features: Sequence[torch.Tensor],
        indices: Sequence[torch.Tensor | None] | None = None,
        *,
        size: Sequence[int],
    ) -> torch.Tensor:
        x = features[-1]
        n = len(self.upsamplers)
        for i, (convs, up) in enumerate(zip(self.convs, self.upsamplers)):
            level = self.levels - 1 - i
            x = convs(x)
            if level >= 0:
                target = features[level].shape[-2:]
                idx = indices[level + 1] if (indices is not None and up.needs_indices) else None
            else:
                f = 2 ** (n - 1 - i)
                target, idx = (-(-size[0] // f), -(-size[1] // f)), None
            x = up(x, size=target, indices=idx)
        return self.last(x)

    def rf_path(self) -> list[nn.Module]:
        path: list[nn.Module] = []
        for convs, up in zip(self.convs, self.upsamplers):
            path += [convs, up]
        return path + [self.last]
