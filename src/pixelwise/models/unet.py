"""U-Net (Ronneberger, Fischer & Brox 2015) on any encoder, "same" or the paper's "valid" padding.

With padding="valid" (plain encoder only), the raw network (`forward_valid`) maps a tile of a
valid size n to n - 2 * border (depth 4, two convs per level: 572 -> 388, border 92, valid sizes
16k + 12 >= 188); `forward` then predicts an image of any size by the paper's overlap-tile strategy
(mirror padding), in one pass (tile=None) or with `tile` x `tile` input tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.decoders._upsample import UpsampleArg, needs_indices, per_stage
from pixelwise.decoders.unet import UNetDecoder
from pixelwise.encoders import Encoder
from pixelwise.errors import UserError, unknown_name
from pixelwise.models._encoder_options import build_encoder
from pixelwise.models.base import EncoderDecoder
from pixelwise.models.receptive_field import Layer
from pixelwise.models.tiling import mirror_pad, overlap_tile
from pixelwise.ops.joint_bilateral import joint_bilateral_upsample


INPUT_STEMS = ("pool", "unshuffle")
# how a model run at input_scale 1/k brings its logits back to the image's resolution
OUTPUT_UPSAMPLES = ("bilinear", "joint_bilateral")


def input_factor(input_scale: float, input_stem: str = "pool", padding: str = "same") -> int:
    """k for `input_scale` 1/k, or a one-line error (not 1/k, valid padding, unknown stem)."""
    factor = round(1 / input_scale) if 1 / 1024 <= input_scale <= 1 else 0
    if factor < 1 or not math.isclose(input_scale * factor, 1.0, rel_tol=1e-6):
        raise UserError(f"unet: input_scale must be 1/k for an integer k from 1 to 1024 (1, 0.5, "
                        f"0.25, ...), got {input_scale}")
    if factor > 1 and padding == "valid":
        raise UserError("unet: input_scale applies to padding 'same' only")
    if input_stem not in INPUT_STEMS:
        raise unknown_name("unet input_stem", input_stem, INPUT_STEMS)
    return factor


def valid_output_size(n: int, depth: int, convs: int = 2) -> int | None:
    """Output length of a valid U-Net for input length n, None if some 2x2 pool would see an odd
    size (or nothing is left). depth 4, convs 2: 572 -> 388."""
    size = n
    for _ in range(depth):
        size -= 2 * convs
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 2 * convs
    for _ in range(depth):
        if size <= 0:
            return None
        size = 2 * size - 2 * convs
    return size if size > 0 else None


def smallest_valid_input(at_least: int, depth: int, convs: int = 2) -> int:
    """The smallest valid input length >= at_least."""
    n = max(1, at_least)
    while valid_output_size(n, depth, convs) is None:
        n += 1
    return n


class UNet(EncoderDecoder):
    """encoder -> UNetDecoder -> 1x1 conv. (N, C, H, W) -> (N, K, H, W) in both padding modes.

    `input_scale` 1/k ("same" padding): the network runs on a k-times smaller map of the image
    (edge-replicated to a multiple of k first) and its logits are upsampled x k (bilinear,
    pixel centres aligned) and cropped to (H, W): k^2 less compute, and each unit sees k times
    more of the image, for coarser boundaries (DeepLab and SegFormer predict at 1/4 or 1/8 too).
    `input_stem` makes that map: "pool" averages each k x k block (small shapes blur away);
    "unshuffle" stacks the block's pixels as channels (space-to-depth, `F.pixel_unshuffle`:
    (N, C, H, W) -> (N, C k^2, H/k, W/k), as YOLOv5's Focus layer), so nothing is lost and the
    first convolution learns the downsampling, for the cost of C k^2 input channels there.
    `output_upsample` brings the logits back: "bilinear" (default), or "joint_bilateral", guided
    by the image (`pixelwise.ops.joint_bilateral`; `guide_sigma_color` in the input's units,
    `guide_sigma_space` in network cells, a (2 `guide_radius` + 1)^2 window of cells): each
    pixel takes the logits of the nearby cells whose mean colour matches its own, so boundaries
    follow the image's edges. It has no parameters: a run can be evaluated with either.
    """

    def __init__(
        self, encoder: Encoder, decoder: UNetDecoder, num_classes: int, *, tile: int | None = None,
        input_scale: float = 1.0, input_stem: str = "pool", output_upsample: str = "bilinear",
        guide_sigma_color: float = 0.075, guide_sigma_space: float = 2.0, guide_radius: int = 2,
    ) -> None:
        super().__init__(encoder, decoder, num_classes)
        self.padding = encoder.padding
        self.tile = tile
        factor = input_factor(input_scale, input_stem, self.padding)
        self.input_factor = factor
        self.input_stem = input_stem
        # True: forward returns the network's own logits, (N, K, ceil(H/k), ceil(W/k)), not
        # upsampled (a loss at the network's resolution; see `coarse_logits`)
        self.coarse_output = False
        # the map the network runs on (None: the image itself)
        self.input_pool = (None if factor == 1 else nn.AvgPool2d(factor) if input_stem == "pool"
                           else nn.PixelUnshuffle(factor))
        self.guide = {"sigma_color": float(guide_sigma_color),
                      "sigma_space": float(guide_sigma_space), "radius": int(guide_radius)}
        if (guide_sigma_color <= 0 or guide_sigma_space <= 0 or guide_radius < 0
                or guide_radius != int(guide_radius)):
            raise UserError(f"unet: guide_sigma_color and guide_sigma_space must be > 0 and "
                            f"guide_radius an integer >= 0, got {guide_sigma_color}, "
                            f"{guide_sigma_space}, {guide_radius}")
        self.set_output_upsample(output_upsample)
        if self.padding == "valid":
            self.depth = len(encoder.output_shape()) - 1
            self.convs = encoder.convs
            n = smallest_valid_input(1, self.depth, self.convs)
            self.border = (n - valid_output_size(n, self.depth, self.convs)) // 2
            if tile is not None and valid_output_size(tile, self.depth, self.convs) is None:
                raise UserError(
                    f"unet: tile {tile} is not a valid input size for depth {self.depth}; nearest "
                    f"valid: {smallest_valid_input(tile, self.depth, self.convs)}"
                )
        elif tile is not None:
            raise UserError("unet: tile applies to padding 'valid' only")

    def set_output_upsample(self, name: str) -> None:
        """Switch how the logits of a model run at input_scale 1/k reach the image's resolution
        ("bilinear" or "joint_bilateral"; no weights change)."""
        if name not in OUTPUT_UPSAMPLES:
            raise unknown_name("unet output_upsample", name, OUTPUT_UPSAMPLES)
        if name != "bilinear" and self.input_pool is None:
            raise UserError(f"unet: output_upsample {name!r} needs input_scale < 1 (at "
                            f"input_scale 1 the logits are at the image's resolution already)")
        self.output_upsample = name

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        """The raw network: (N, C, n, m) -> (N, K, n - 2 border, m - 2 border) in valid mode
        (n, m valid sizes); same as forward in "same" mode."""
        if self.padding == "valid":
            for n in x.shape[-2:]:
                if valid_output_size(n, self.depth, self.convs) is None:
                    raise UserError(
                        f"unet (valid): input size {n} is not valid for depth {self.depth}; "
                        f"nearest valid: {smallest_valid_input(n, self.depth, self.convs)}"
                    )
        return super().forward(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_pool is not None:
            return self._forward_scaled(images)
        if self.padding == "same":
            return super().forward(images)
        h, w = images.shape[-2:]
        b = self.border
        if self.tile is None:  # one pass over the mirror-padded image
            nh = smallest_valid_input(h + 2 * b, self.depth, self.convs)
            nw = smallest_valid_input(w + 2 * b, self.depth, self.convs)
            y = self.forward_valid(mirror_pad(images, (b, nw - w - b, b, nh - h - b)))
            return y[..., :h, :w]
        return overlap_tile(
            self.forward_valid, images, border=b, tile=self.tile, align=2**self.depth
        )

    def _forward_scaled(self, images: torch.Tensor) -> torch.Tensor:
        k = self.input_factor
        h, w = images.shape[-2:]
        padded = F.pad(images, (0, (-w) % k, 0, (-h) % k), mode="replicate")
        logits = super().forward(self.input_pool(padded))  # (N, K, ceil(H/k), ceil(W/k))
        if self.coarse_output:
            return logits
        if self.output_upsample == "joint_bilateral":
            logits = joint_bilateral_upsample(logits, padded, k, **self.guide)
        else:
            logits = F.interpolate(logits, scale_factor=k, mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def rf_path(self) -> list[Any]:
        if self.input_pool is None:
            return super().rf_path()
        # the pool (or unshuffle: a k x k block, stride k), the network, then the logits'
        # bilinear x k (2 input units per output unit; joint bilateral: a window of 2r + 1)
        k = self.input_factor
        window = 2 * self.guide["radius"] + 1 if self.output_upsample == "joint_bilateral" else 2
        return [Layer(k, Fraction(k)), *super().rf_path(), Layer(window, Fraction(1, k))]


def _default_decoder_channels(encoder: Encoder, n_blocks: int) -> list[int]:
    shapes = encoder.output_shape()
    if shapes[0].stride == 1:  # plain: each block as wide as its skip (the paper)
        return [s.channels for s in reversed(shapes[:-1])]
    return [max(16, 256 // 2**i) for i in range(n_blocks)]  # SMP's (256, 128, 64, 32, 16)


def unet(
    num_classes: int,
    in_channels: int = 3,
    *,
    encoder: str = "plain",
    depth: int | None = None,
    width: int | None = None,
    padding: str = "same",
    upsample: UpsampleArg = "bilinear",
    decoder_channels: Sequence[int] | None = None,
    norm: str = "batch",
    weights: str | Path | None = None,
    tile: int | None = None,
    input_scale: float = 1.0,
    input_stem: str = "pool",
    output_upsample: str = "bilinear",
    guide_sigma_color: float = 0.075,
    guide_sigma_space: float = 2.0,
    guide_radius: int = 2,
) -> UNet:
    """U-Net: encoder-decoder with concatenated skips, "same" or "valid" (overlap-tile) padding.

    Plain encoder (depth 4, width 32 by default; the paper: width 64) or a torchvision one; decoder
    blocks upsample to the skip's size with `upsample` (one name or one per block).
    `input_scale` 1/k runs the network on a k-times smaller map of the image (`input_stem`:
    "pool" averages k x k blocks, "unshuffle" stacks them as channels) and upsamples its logits
    (`output_upsample`: "bilinear", or "joint_bilateral" guided by the image; see `UNet`).
    """
    names = upsample if isinstance(upsample, (list, tuple)) else [upsample]
    record = any(needs_indices(n) for n in per_stage(names, len(names), "unet"))
    # "unshuffle" feeds the encoder k^2 times the channels
    factor = input_factor(input_scale, input_stem, padding)
    stacked = factor**2 if input_stem == "unshuffle" else 1
    if stacked > 1 and weights is not None:
        raise UserError("unet: --weights with input_stem 'unshuffle' (the pretrained first "
                        "convolution expects the image's own channels); use input_stem 'pool'")
    enc = build_encoder(
        "unet",
        encoder,
        in_channels * stacked,
        depth=depth,
        width=width,
        default_depth=4,
        default_width=32,
        padding=padding,
        norm=norm,
        weights=weights,
        record_indices=record,
    )
    shapes = enc.output_shape()
    n_blocks = len(shapes) - 1 + (shapes[0].stride.bit_length() - 1)
    channels = (
        list(decoder_channels)
        if decoder_channels is not None
        else _default_decoder_channels(enc, n_blocks)
    )
    dec = UNetDecoder(shapes, channels, upsample=upsample, padding=padding, norm=norm)
    model = UNet(enc, dec, num_classes, tile=tile, input_scale=input_scale,
                 input_stem=input_stem, output_upsample=output_upsample,
                 guide_sigma_color=guide_sigma_color, guide_sigma_space=guide_sigma_space,
                 guide_radius=guide_radius)
    model.in_channels = in_channels
    return model
