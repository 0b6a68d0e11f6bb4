"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell 2015) on any encoder."""

from __future__ import annotations

from pathlib import Path

import torch

from pixelwise.decoders._upsample import UpsampleArg
from pixelwise.decoders.fcn import FCNDecoder
from pixelwise.encoders import Encoder
from pixelwise.models._encoder_options import build_encoder
from pixelwise.models.base import SegmentationModel


class FCN(SegmentationModel):
    """encoder -> FCNDecoder (scores, skips, upsampling). (N, C, H, W) -> (N, K, H, W)."""

    def __init__(self, encoder: Encoder, decoder: FCNDecoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images), size=images.shape[-2:])

    def rf_path(self) -> list:
        return [m for stage in self.encoder.stage_paths() for m in stage] + self.decoder.rf_path()


def _fcn(
    skips: int,
    num_classes: int,
    in_channels: int,
    encoder: str,
    depth: int | None,
    width: int | None,
    upsample: UpsampleArg,
    head_channels: int,
    norm: str,
    weights: str | Path | None,
) -> FCN:
    name = f"fcn{32 // 2**skips}s"
    enc = build_encoder(
        name,
        encoder,
        in_channels,
        depth=depth,
        width=width,
        default_depth=5,
        default_width=16,
        norm=norm,
        weights=weights,
    )
    dec = FCNDecoder(
        enc.output_shape(),
        num_classes,
        skips=skips,
        upsample=upsample,
        head_channels=head_channels,
        norm=norm,
    )
    model = FCN(enc, dec, num_classes)
    model.in_channels = in_channels
    return model


def fcn32s(
    num_classes: int,
    in_channels: int = 3,
    *,
    encoder: str = "plain",
    depth: int | None = None,
    width: int | None = None,
    upsample: UpsampleArg = "transposed",
    head_channels: int = 256,
    norm: str = "batch",
    weights: str | Path | None = None,
) -> FCN:
    """FCN-32s: class scores at stride 32, one 32x upsampling (Long et al. 2015).

    Plain encoder: depth 5, width 16 by default (VGG-like widths 16 ... 512).
    """
    return _fcn(
        0, num_classes, in_channels, encoder, depth, width, upsample, head_channels, norm, weights
    )


def fcn16s(
    num_classes: int,
    in_channels: int = 3,
    *,
    encoder: str = "plain",
    depth: int | None = None,
    width: int | None = None,
    upsample: UpsampleArg = "transposed",
    head_channels: int = 256,
    norm: str = "batch",
    weights: str | Path | None = None,
) -> FCN:
    """FCN-16s: FCN-32s + zero-initialised 1x1 scores of the stride-16 stage ("pool4"), summed."""
    return _fcn(
        1, num_classes, in_channels, encoder, depth, width, upsample, head_channels, norm, weights
    )


def fcn8s(
    num_classes: int,
    in_channels: int = 3,
    *,
    encoder: str = "plain",
    depth: int | None = None,
    width: int | None = None,
    upsample: UpsampleArg = "transposed",
    head_channels: int = 256,
    norm: str = "batch",
    weights: str | Path | None = None,
) -> FCN:
    """FCN-8s: FCN-32s + skip scores of the stride-16 and stride-8 stages ("pool4", "pool3")."""
    return _fcn(
        2, num_classes, in_channels, encoder, depth, width, upsample, head_channels, norm, weights
    )
