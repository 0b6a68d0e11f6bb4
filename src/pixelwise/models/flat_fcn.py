"""The equal-size FCN: stride-1 convolutions only, no downsampling.

Every layer works at full resolution, so each output sees only 1 + depth (k - 1) dilation pixels
-- the lecture's "receptive field is limited" -- and the cost grows with depth x width x H x W.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.encoders.blocks import conv_norm_act
from pixelwise.errors import UserError, check_positive_int
from pixelwise.models.base import SegmentationModel


class FlatFCN(SegmentationModel):
    """Equal-size FCN: `depth` stride-1 convs at full resolution, no downsampling.

    depth x (k x k conv-norm-ReLU, `width` channels, "same" padding) -> 1x1 conv to classes.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        *,
        depth: int = 8,
        width: int = 64,
        kernel_size: int = 3,
        dilation: int = 1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        for name, value in (("depth", depth), ("width", width), ("dilation", dilation)):
            check_positive_int(f"flat_fcn: {name}", value)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(
                f"flat_fcn: kernel_size must be a positive odd integer, got {kernel_size!r}"
            )
        self.body = nn.Sequential(
            *(
                conv_norm_act(
                    in_channels if i == 0 else width,
                    width,
                    kernel_size,
                    norm=norm,
                    dilation=dilation,
                )
                for i in range(depth)
            )
        )
        self.head = nn.Conv2d(width, num_classes, 1)
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))

    def rf_path(self) -> list[nn.Module]:
        return [self.body, self.head]
