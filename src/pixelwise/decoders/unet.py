"""U-Net's expansive path (Ronneberger et al. 2015), for any encoder's stages.

Each block: upsample the coarser map to the skip's exact size (any upsampler, by name), concatenate
the skip, then two 3x3 conv-norm-ReLU. When the encoder's shallowest stage is coarser than the
input (torchvision encoders start at stride 2), blocks without a skip continue to stride 1, as in
segmentation_models_pytorch's Unet. In "valid" mode (unpadded convs) the skip is centre-cropped to
the upsampled map instead, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.decoders._upsample import UpsampleArg, needs_indices, per_stage
from pixelwise.encoders.base import ShapeSpec
from pixelwise.encoders.blocks import check_padding, conv_block
from pixelwise.errors import UserError
from pixelwise.upsample import Nearest, make_upsampler


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size), the centre (the paper's cropping of the skip)."""
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


class UNetDecoderBlock(nn.Module):
    """[reduce] -> up -> concat skip -> convs.

    x (N, C_in, h, w), skip (N, C_skip, H, W) -> (N, C_out, H, W). `reduce` (a 1x1 conv) brings x
    to the skip's channels first when the upsampler is `max_unpool`, whose indices have them.
    """

    def __init__(
        self,
        upsample: nn.Module,
        convs: nn.Module,
        *,
        reduce: nn.Module | None = None,
        crop_skip: bool = False,
    ) -> None:
        super().__init__()
        self.reduce = reduce
        self.upsample = upsample
        self.convs = convs
        self.crop_skip = crop_skip

    def forward(
        self,
        x: torch.Tensor,
        skip: torch.Tensor | None = None,
        *,
        size: Sequence[int] | None = None,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        if self.crop_skip:  # valid mode: exact 2x, then crop the skip to match
            x = self.upsample(x, indices=indices)
            if skip is not None:
                skip = center_crop(skip, x.shape[-2:])
        else:
            target = skip.shape[-2:] if skip is not None else size
            x = self.upsample(x, size=target, indices=indices)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (N, C_in + C_skip, H, W)
        return self.convs(x)

    def rf_path(self) -> list[nn.Module]:
        return [self.reduce, self.upsample, self.convs]

    def fused_for_inference(self) -> nn.Module | None:
        """The exact sub-pixel rewrite of this block (`NearestUpConcatConv`) when it applies:
        nearest x2 upsampling, same padding, BN already folded into the first conv; else None."""
        first = self.convs[0] if isinstance(self.convs, nn.Sequential) else None
        if (
            self.reduce is not None
            or self.crop_skip
            or type(self.upsample) is not Nearest
            or self.upsample.scale != 2
            or not isinstance(first, nn.Sequential)
            or len(first) != 3
            or not isinstance(first[1], nn.Identity)
            or not isinstance(first[2], nn.ReLU)
        ):
            return None
        conv = first[0]
        if not (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        ):
            return None
        return NearestUpConcatConv(self, conv, self.upsample.channels)


# Sub-pixel taps: a 3x3 conv (taps at offsets -1, 0, +1) over a nearest-upsampled map reads, at
# even output rows 2m, input rows m-1 (tap -1) and m (taps 0, +1); at odd rows 2m+1, rows m
# (taps -1, 0) and m+1 (tap +1). _PHASE[a] (2 x 3) sums the taps into those two input rows.
_PHASE = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class NearestUpConcatConv(nn.Module):
    """Inference-only rewrite of [nearest x2 -> concat skip -> 3x3 conv -> ReLU], same numbers.

    Conv over a concatenation = conv of the upsampled part + conv of the skip part; and a 3x3 conv
    of a nearest-upsampled map is, for each of the 4 output phases (a, b), a 2x2 conv of the
    coarse map (the sub-pixel convolution equivalence, Shi et al. 2016; Odena et al. 2016). The
    upsampled part then costs 4 x 4 instead of 4 x 9 multiply-adds per coarse pixel and the
    upsampled map and the concatenation are never stored. Falls back to the original block when
    the skip is not exactly twice the coarse size (odd sizes).
    """

    def __init__(self, block: UNetDecoderBlock, conv: nn.Conv2d, up_channels: int) -> None:
        super().__init__()
        self.block = block  # the original, for sizes that are not exactly x2
        self.upsample = block.upsample  # keeps `needs_indices` etc. visible to the decoder
        w = conv.weight.detach()  # (O, C_up + C_skip, 3, 3)
        out_c = w.shape[0]
        wu = w[:, :up_channels]
        phases = [
            _PHASE[a].to(w) @ wu @ _PHASE[b].to(w).T  # (2, 3) @ (O, C_up, 3, 3) @ (3, 2)
            for a in (0, 1)
            for b in (0, 1)
        ]  # -> (O, C_up, 2, 2) each
        has_skip = w.shape[1] > up_channels
        where = {"device": w.device, "dtype": w.dtype}  # the rewrite lives beside the original
        self.up_conv = nn.Conv2d(up_channels, 4 * out_c, 2, bias=not has_skip, **where)
        self.up_conv.weight.data.copy_(torch.cat(phases))  # (4 O, C_up, 2, 2), phase-major
        self.skip_conv = None
        if has_skip:
            self.skip_conv = nn.Conv2d(w.shape[1] - up_channels, out_c, 3, padding=1, **where)
            self.skip_conv.weight.data.copy_(w[:, up_channels:])
            self.skip_conv.bias.data.copy_(conv.bias.detach())
        else:
            self.up_conv.bias.data.copy_(conv.bias.detach().repeat(4))
        self.rest = block.convs[1:]
        self.out_c = out_c
        self.requires_grad_(False)

    def forward(
        self,
        x: torch.Tensor,
        skip: torch.Tensor | None = None,
        *,
        size: Sequence[int] | None = None,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, _, h, w = x.shape
        target = (
            tuple(skip.shape[-2:])
            if skip is not None
            else (tuple(size) if size is not None else (2 * h, 2 * w))
        )
        if target != (2 * h, 2 * w) or (skip is None) != (self.skip_conv is None):
            return self.block(x, skip, size=size, indices=indices)
        y = self.up_conv(F.pad(x, (1, 1, 1, 1)))  # (N, 4 O, h + 1, w + 1)
        o = self.out_c
        if skip is not None:
            out = self.skip_conv(skip)  # (N, O, 2h, 2w)
        else:
            out = torch.empty(
                n, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=_format_of(y)
            )
        for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            phase = y[:, k * o : (k + 1) * o, a : a + h, b : b + w]  # (N, O, h, w)
            if skip is not None:
                out[:, :, a::2, b::2] += phase
            else:
                out[:, :, a::2, b::2] = phase
        return self.rest(out.relu_())

    def rf_path(self) -> list[nn.Module]:
        return self.block.rf_path()


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        else torch.contiguous_format
    )


class UNetDecoder(nn.Module):
    """Blocks from the deepest stage up to stride 1.

    encoder_shapes: the encoder's `output_shape()`; decoder_channels: one width per block
    (len = number of blocks = stages - 1 + log2(stride of stage 0)); upsample: one name or one per
    block. forward(features, indices, size) -> (N, decoder_channels[-1], H, W).
    """

    def __init__(
        self,
        encoder_shapes: Sequence[ShapeSpec],
        decoder_channels: Sequence[int],
        *,
        upsample: UpsampleArg = "bilinear",
        padding: str = "same",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        shapes = list(encoder_shapes)
        check_padding(padding)
        skips = len(shapes) - 1
        extra = int(math.log2(shapes[0].stride))
        if 2**extra != shapes[0].stride:
            raise UserError(
                f"unet: the encoder's first stride must be a power of 2, got {shapes[0].stride}"
            )
        n_blocks = skips + extra
        if len(decoder_channels) != n_blocks:
            raise UserError(
                f"unet: decoder_channels lists {len(decoder_channels)} widths, the decoder has "
                f"{n_blocks} blocks"
            )
        names = per_stage(upsample, n_blocks, "unet")
        self.blocks = nn.ModuleList()
        in_c = shapes[-1].channels
        for i, (out_c, name) in enumerate(zip(decoder_channels, names)):
            level = skips - 1 - i  # encoder stage of the skip; < 0: no skip
            skip_c = shapes[level].channels if level >= 0 else 0
            scale = shapes[level + 1].stride // shapes[level].stride if level >= 0 else 2
            reduce = None
            up_c = in_c
            if needs_indices(name):
                if level < 0:
                    raise UserError("unet: max_unpool needs a pooling below every stage")
                reduce = nn.Conv2d(in_c, skip_c, 1)  # indices carry the skip's channels
                up_c = skip_c
            self.blocks.append(
                UNetDecoderBlock(
                    make_upsampler(name, up_c, scale, **_valid_options(name, padding)),
                    conv_block(up_c + skip_c, out_c, padding=padding, norm=norm),
                    reduce=reduce,
                    crop_skip=padding == "valid",
                )
            )
            in_c = out_c
        self.skips = skips
        self.strides = [s.stride for s in shapes]
        self.out_channels = in_c

    def forward(
        self,
        features: Sequence[torch.Tensor],
        indices: Sequence[torch.Tensor | None] | None = None,
        *,
        size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        x = features[-1]
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            level = self.skips - 1 - i
            skip = features[level] if level >= 0 else None
            idx = indices[level + 1] if (indices is not None and level >= 0) else None
            target = None
            if skip is None and size is not None:  # stride 2**(n-1-i) of the input size
                f = 2 ** (n - 1 - i)
                target = (-(-size[0] // f), -(-size[1] // f))
            x = block(x, skip, size=target, indices=idx if block.upsample.needs_indices else None)
        return x

    def rf_path(self) -> list[nn.Module]:
        return [m for block in self.blocks for m in block.rf_path()]


def _valid_options(name: object, padding: str) -> dict:
    """In valid mode the transposed upsampler is the paper's 2x2 up-convolution: kernel 2 has no
    border effect, so overlap-tile prediction is exact."""
    if padding == "valid" and name == "transposed":
        return {"kernel_size": 2}
    return {}
