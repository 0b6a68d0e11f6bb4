"""Receptive field and output stride, computed analytically from a model's longest path.

Each model lists the modules on its longest input-to-output path (`model.rf_path()`, in the
order they run: encoder stages, then decoder blocks). The window of input pixels one output pixel
can see is computed backwards along that path, from a window of 1 at the output (Araujo et al.,
Distill 2019, run in reverse so that upsamplers are exact too):

    conv / pool (kernel k, dilation d, stride s):  w_in = (w_out - 1) * s + (k - 1) * d + 1
    upsampler x s (an output unit sees `support` consecutive input units: nearest 1, bilinear 2,
    bicubic 4, transposed ceil(k / s)):             w_in = ceil((w_out - 1) / s) + support

Each step is the worst case over the pixel's alignment to the stride, so the result is an upper
bound; for chain models (patch classifier, flat FCN) it is exact, and the tests compare it with
`empirical_receptive_field` (gradient of one output pixel w.r.t. the input). The output stride is
the largest product of strides along the path (the coarsest map, in input pixels).
Skip connections and residual shortcuts are shorter paths, so the longest path bounds the
receptive field; for chain models (patch classifier, flat FCN) it is exact, and
`empirical_receptive_field` (gradient of one output pixel w.r.t. the input) checks it in the tests.
A squeeze-excitation or global pooling layer makes every output depend on the whole image:
`ReceptiveField.size` is then None ("global").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from pixelwise import upsample as ups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    """One step of the arithmetic: `kernel` units (spaced `dilation`) of the input map feed one
    output unit; `stride` multiplies the jump (a Fraction 1/s for an x s upsampler)."""

    kernel: int = 1
    stride: Fraction = Fraction(1)
    dilation: int = 1


GLOBAL = "global"  # a path entry meaning "every output sees the whole input"


@dataclass(frozen=True)
class ReceptiveField:
    """size: input pixels (per side) that can affect one output pixel, None if the whole image;
    output_stride: the largest jump on the path (coarsest map, in input pixels)."""

    size: int | None
    output_stride: int

    def to_dict(self) -> dict:
        return {"receptive_field": self.size, "output_stride": self.output_stride}


def _pair0(value: int | Sequence[int]) -> int:
    """First element of a torch (h, w) pair; pixelwise kernels are square."""
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


# An upsampler's output unit depends on `support` consecutive input units (integer scale,
# align_corners=False): nearest-like ops 1, bilinear 2 (the two neighbours), bicubic 4.
_INTERP_SUPPORT = {"nearest": 1, "bilinear": 2, "bicubic": 4}


def _upsampler_layers(module: ups.Upsampler) -> list[Layer]:
    s = Fraction(module.scale).limit_denominator(1000)
    up = Fraction(1) / s
    if isinstance(module, (ups.BedOfNails, ups.Nearest, ups.MaxUnpool)):
        return [Layer(1, up)]
    if isinstance(module, ups.Bilinear):
        return [Layer(2, up)]
    if isinstance(module, ups.Bicubic):
        return [Layer(4, up)]
    if isinstance(module, ups.TransposedConv):
        k, st = _pair0(module.conv.kernel_size), _pair0(module.conv.stride)
        return [Layer(math.ceil(k / st), up)]
    if isinstance(module, ups.ResizeConv):
        return [Layer(_INTERP_SUPPORT[module.mode], up), *layers_of([module.conv])]
    if isinstance(module, ups.PixelShuffleUp):
        return [*layers_of([module.conv]), Layer(1, up)]
    raise TypeError(f"no receptive-field rule for upsampler {type(module).__name__}")


def layers_of(path: Iterable[nn.Module | Layer | str | None]) -> list[Layer | str]:
    """Flatten a path of modules into `Layer`s (and `GLOBAL` markers), in order."""
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import SqueezeExcitation

    out: list[Layer | str] = []
    for m in path:
        if m is None:
            continue
        if isinstance(m, Layer) or m == GLOBAL:
            out.append(m)
        elif isinstance(m, ups.Upsampler):
            out.extend(_upsampler_layers(m))
        elif isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, ups.MaxPoolWithIndices)):
            stride = m.stride if m.stride is not None else m.kernel_size
            dilation = getattr(m, "dilation", 1)
            out.append(Layer(_pair0(m.kernel_size), Fraction(_pair0(stride)), _pair0(dilation)))
        elif isinstance(m, nn.ConvTranspose2d):
            k, s = _pair0(m.kernel_size), _pair0(m.stride)
            out.append(Layer(math.ceil(k / s), Fraction(1, s)))
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, SqueezeExcitation)):
            out.append(GLOBAL)
        elif isinstance(m, BasicBlock):  # main path; the shortcut is shorter
            out.extend(layers_of([m.conv1, m.conv2]))
        elif isinstance(m, Bottleneck):
            out.extend(layers_of([m.conv1, m.conv2, m.conv3]))
        elif isinstance(m, InvertedResidual):
            out.extend(layers_of(m.block))
        elif isinstance(m, (nn.Sequential, nn.ModuleList)):
            out.extend(layers_of(m))
        elif len(list(m.children())) == 0:
            pass  # norms, activations, dropout, identity: pointwise
        else:
            raise TypeError(
                f"no receptive-field rule for {type(m).__name__}; list its modules in rf_path()"
            )
    return out


def compose(layers: Iterable[Layer | str]) -> ReceptiveField:
    """Receptive field and output stride of a path of `layers` (see the module docstring)."""
    layers = list(layers)
    if any(layer == GLOBAL for layer in layers):
        size = None
    else:
        window = 1  # input pixels, walking from the output back to the input
        for layer in reversed(layers):
            if layer.stride >= 1:
                window = (window - 1) * int(layer.stride) + (layer.kernel - 1) * layer.dilation + 1
            else:
                up = int(1 / layer.stride)
                window = -(-(window - 1) // up) + (layer.kernel - 1) * layer.dilation + 1
        size = window
    jump, max_jump = Fraction(1), Fraction(1)
    for layer in layers:
        if layer != GLOBAL:
            jump *= layer.stride
            max_jump = max(max_jump, jump)
    return ReceptiveField(size, math.ceil(max_jump))


def receptive_field(model: nn.Module) -> ReceptiveField:
    """The analytic receptive field of a pixelwise model (one with `rf_path()`)."""
    if not hasattr(model, "rf_path"):
        raise TypeError(f"{type(model).__name__} has no rf_path(); not a pixelwise model")
    return compose(layers_of(model.rf_path()))


def empirical_receptive_field(
    model: nn.Module,
    size: tuple[int, int],
    *,
    in_channels: int = 3,
    position: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[int, int]:
    """(rows, cols) of the input region whose gradient w.r.t. one output pixel is non-zero.

    Runs `model` in eval mode in float64 on a random (1, in_channels, H, W) input and
    back-propagates the sum over classes of output pixel `position` (default: the centre).
    Dead ReLUs can only shrink it, so it is a lower bound of the analytic value.
    """
    was_training = model.training
    model = model.eval()
    dtype = next(model.parameters()).dtype
    try:
        model.double()
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(1, in_channels, *size, generator=gen, dtype=torch.float64).requires_grad_()
        y = model(x)
        py, px = position if position is not None else (size[0] // 2, size[1] // 2)
        y[0, :, py, px].sum().backward()
        nonzero = x.grad[0].abs().sum(0) > 0  # (H, W)
        rows = torch.nonzero(nonzero.any(1)).flatten()
        cols = torch.nonzero(nonzero.any(0)).flatten()
        if rows.numel() == 0:
            return (0, 0)
        return (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))
    finally:
        model.to(dtype)
        model.train(was_training)
