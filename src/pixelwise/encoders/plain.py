"""The plain convolutional encoder: U-Net's contracting path (and SegNet's VGG-like encoder)."""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.encoders.base import Encoder, EncoderOutput, ShapeSpec
from pixelwise.encoders.blocks import check_norm, check_padding, conv_block
from pixelwise.errors import UserError
from pixelwise.upsample import MaxPoolWithIndices


class PlainEncoder(Encoder):
    """Stage 0: `convs` 3x3 conv-norm-ReLU at full resolution, `width` channels. Stage i (1..depth):
    2x2 max-pool (stride 2), then `convs` convs; channels double at each stage (U-Net: 64 ... 1024
    with width=64, depth=4). Stage i has stride 2**i.

    padding "same" keeps sizes (odd sizes: the pool floors, decoders upsample to the skip's size);
    "valid" is the paper's unpadded version (each conv takes 2 pixels off).
    record_indices=True pools with `MaxPoolWithIndices` and returns the indices (SegNet).
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        width: int = 32,
        depth: int = 4,
        padding: str = "same",
        norm: str = "batch",
        record_indices: bool = False,
        convs: int = 2,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("width", width, 1),
            ("depth", depth, 0),
            ("convs", convs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"plain encoder: {name} must be an integer >= {low}, got {value!r}")
        self.padding = check_padding(padding)
        check_norm(norm)
        self.records_indices = bool(record_indices)
        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = conv_block(in_channels, widths[0], convs=convs, padding=padding, norm=norm)
        pool = (lambda: MaxPoolWithIndices(2)) if record_indices else (lambda: nn.MaxPool2d(2))
        self.pools = nn.ModuleList(pool() for _ in range(depth))
        self.blocks = nn.ModuleList(
            conv_block(widths[i], widths[i + 1], convs=convs, padding=padding, norm=norm)
            for i in range(depth)
        )
        self.shapes = tuple(ShapeSpec(c, 2**i) for i, c in enumerate(widths))
        self.convs = convs

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        x = self.stem(x)
        features: list[torch.Tensor] = [x]
        indices: list[torch.Tensor | None] = [None]
        for pool, block in zip(self.pools, self.blocks):
            if self.records_indices:
                x, idx = pool(x)
            else:
                x, idx = pool(x), None
            x = block(x)
            features.append(x)
            indices.append(idx)
        return EncoderOutput(features, indices)

    def stage_paths(self) -> list[list[nn.Module]]:
        return [[self.stem]] + [[p, b] for p, b in zip(self.pools, self.blocks)]
