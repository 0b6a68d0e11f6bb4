"""What every encoder promises: features per stage, with channels and stride (a ShapeSpec).

The shape contract between encoders and decoders (detectron2's `ShapeSpec`): an encoder returns
one feature map per stage, shallowest first, and `output_shape()` says each one's channels and
stride (input pixels per feature pixel). Decoders (U-Net, SegNet, FCN, later FPN) are built from
that list alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class ShapeSpec:
    """channels and stride of one feature map."""

    channels: int
    stride: int


class EncoderOutput(NamedTuple):
    """features[i]: (N, shapes[i].channels, ~H/stride_i, ~W/stride_i), shallowest first.
    indices[i]: the max-pool indices that took features[i-1] down to stage i (same shape as the
    pooled map, channels of stage i-1), or None (always None at stage 0 and for encoders that
    record none)."""

    features: list[torch.Tensor]
    indices: list[torch.Tensor | None]


class Encoder(nn.Module):
    """Base class. Subclasses set `shapes` and implement `forward_features` and `stage_paths`."""

    shapes: tuple[ShapeSpec, ...] = ()
    records_indices: bool = False  # True when forward_features fills `indices`
    padding: str = "same"  # "valid": unpadded convs, each stage shrinks (plain encoder only)

    def output_shape(self) -> list[ShapeSpec]:
        """One ShapeSpec per stage, shallowest first."""
        return list(self.shapes)

    @property
    def out_channels(self) -> list[int]:
        return [s.channels for s in self.shapes]

    @property
    def strides(self) -> list[int]:
        return [s.stride for s in self.shapes]

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        """x (N, C_in, H, W) -> EncoderOutput (features and pooling indices per stage)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, C_in, H, W) -> list of feature maps, shallowest first."""
        return self.forward_features(x).features

    def stage_paths(self) -> list[list[nn.Module]]:
        """stage_paths()[i]: the modules on the longest path from stage i-1's output (the input
        for i = 0) to stage i's output, in order (for the receptive-field arithmetic)."""
        raise NotImplementedError
