"""What every semantic model promises."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pixelwise.encoders.base import Encoder


class SegmentationModel(nn.Module):
    """forward(images (N, C_in, H, W) float) -> logits (N, num_classes, H, W), any H, W.

    `config` (set by `build_model`): a plain dict, `build_model(**model.config)` rebuilds the
    architecture. `rf_path()`: modules on the longest path, for `receptive_field`.
    """

    num_classes: int
    in_channels: int
    config: dict[str, Any]

    def rf_path(self) -> list[Any]:
        raise NotImplementedError


class EncoderDecoder(SegmentationModel):
    """encoder -> decoder -> 1x1 conv head. The decoder is called as
    decoder(features, indices, size=(H, W)) and returns (N, decoder.out_channels, H, W)."""

    def __init__(self, encoder: Encoder, decoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = nn.Conv2d(decoder.out_channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder.forward_features(images)
        x = self.decoder(out.features, out.indices, size=images.shape[-2:])
        return self.head(x)

    def rf_path(self) -> list[Any]:
        return (
            [m for stage in self.encoder.stage_paths() for m in stage]
            + self.decoder.rf_path()
            + [self.head]
        )
