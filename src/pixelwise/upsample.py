"""Every upsampling operator of the lecture behind one interface.

`make_upsampler(name, channels, scale=2, **options)` builds one by name from `UPSAMPLERS`:

| name | what it does | learnable |
|---|---|---|
| `bed_of_nails` | each value at the top-left of its s x s block, zeros elsewhere | no |
| `nearest` | nearest-neighbour interpolation (`F.interpolate(mode="nearest")`) | no |
| `bilinear` | bilinear interpolation, `align_corners` option (default False) | no |
| `bicubic` | bicubic convolution (A = -0.75), `align_corners` option (default False) | no |
| `max_unpool` | values back where the paired `MaxPoolWithIndices` found its maxima | no |
| `transposed` | `ConvTranspose2d`, FCN's bilinear initialisation by default | yes |
| `resize_conv` | nearest (or bilinear) resize, then a 3x3 conv (Odena et al. 2016) | yes |
| `pixel_shuffle` | conv to C*s^2 channels + `PixelShuffle`, ICNR initialisation | yes |

Every module keeps the channel count and is called as `forward(x, size=None, indices=None)`:
`x` is (N, C, H, W); the output is (N, C, s*H, s*W), or exactly `size` = (H', W') when given
(H' >= H, W' >= W: e.g. 67x71 -> 134x142, or the size of a skip connection). How `size` is met:

- interpolation ops (`nearest`, `bilinear`, `bicubic`, `resize_conv`) pass it straight to
  `F.interpolate`, which resamples to that exact size;
- fixed-stride ops (`bed_of_nails`, `transposed`, `pixel_shuffle`) compute the s*H x s*W map and
  crop or zero-pad it at the bottom/right. The top-left stays aligned, so output pixel (i, j) always
  sits at input position (i/s, j/s) -- the same convention as a floor-mode pool, whose dropped last
  row/column comes back as zeros;
- `max_unpool` reads `size` as the pre-pool size (what torch's `output_size` means).

`indices` is used by `max_unpool` alone (attribute `needs_indices`); the others accept and ignore
it, so a decoder can call any upsampler the same way.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError, check_positive_int, unknown_name

logger = logging.getLogger(__name__)

SizeArg = int | Sequence[int] | torch.Size | None


# --------------------------------------------------------------------------- validation helpers


def _check_scale(scale: object, op: str, *, integer: bool) -> int | float:
    """A scale >= 1; an int when `integer` (fractional scales only make sense for resampling)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise UserError(f"{op}: scale must be a number, got {scale!r}")
    if not math.isfinite(scale) or scale < 1:
        raise UserError(f"{op}: scale must be >= 1, got {scale!r}")
    if float(scale).is_integer():
        return int(scale)
    if integer:
        raise UserError(
            f"{op}: scale must be an integer, got {scale!r} "
            "(nearest, bilinear, bicubic and resize_conv accept fractional scales)"
        )
    return float(scale)


def _check_channels(channels: object, op: str) -> int:
    return check_positive_int(f"{op}: channels", channels, numpy_ok=True)


def _is_int(value: object) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def _check_input(x: torch.Tensor, op: str, channels: int | None = None) -> None:
    if x.dim() != 4:
        raise UserError(f"{op}: expected input of shape (N, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise UserError(f"{op}: built for {channels} channels, got input with {x.shape[1]}")


def _output_size(x: torch.Tensor, size: SizeArg, scale: int | float, op: str) -> tuple[int, int]:
    """The (H', W') to produce: `size` when given (checked >= the input), else floor(s*H, s*W)."""
    h, w = x.shape[-2:]
    if size is None:
        if isinstance(scale, int):
            return h * scale, w * scale
        return math.floor(h * scale), math.floor(w * scale)
    out = (size, size) if _is_int(size) else tuple(size)
    if len(out) != 2 or not all(_is_int(v) for v in out):
        raise UserError(f"{op}: size must be an int or two ints (H, W), got {size!r}")
    if out[0] < h or out[1] < w:
        raise UserError(
            f"{op}: output size {tuple(out)} is smaller than the input size {(h, w)}; "
            "an upsampler cannot shrink"
        )
    return out[0], out[1]


def _fit(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop or zero-pad (N, C, h, w) at the bottom/right to (N, C, *size); top-left stays put."""
    dh, dw = size[0] - y.shape[-2], size[1] - y.shape[-1]
    if dh < 0 or dw < 0:
        y = y[..., : size[0], : size[1]]
    if dh > 0 or dw > 0:
        y = F.pad(y, (0, max(dw, 0), 0, max(dh, 0)))
    return y


# --------------------------------------------------------------------------- operators


class Upsampler(nn.Module):
    """Base of every operator: records channels and scale; subclasses implement `forward`.

    Class attributes: `needs_indices` (max_unpool only), `learnable` (has weights),
    `integer_scale` (False where fractional scales are meaningful: the resampling ops).
    """

    needs_indices: bool = False
    learnable: bool = False
    integer_scale: bool = True

    def __init__(self, channels: int, scale: int | float = 2) -> None:
        super().__init__()
        op = _name_of(type(self))
        self.channels = _check_channels(channels, op)
        self.scale = _check_scale(scale, op, integer=self.integer_scale)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale}"


class BedOfNails(Upsampler):
    """Each input value at the top-left corner of its s x s output block, zeros elsewhere.

    (N, C, H, W) -> (N, C, s*H, s*W). Written as one constant pad of a (N, C, H, 1, W, 1) view to
    (N, C, H, s, W, s): a single kernel, no slower than nearest interpolation forward and faster
    backward (the gradient is a strided slice; a zeros tensor filled through a strided view costs
    an extra full-size copy in backward), and it exports to ONNX as one Pad. With `size`, the
    s*H x s*W map is cropped / zero-padded at the bottom/right.
    """

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_input(x, "bed_of_nails")
        s = self.scale
        out_size = _output_size(x, size, s, "bed_of_nails")
        n, c, h, w = x.shape
        nails = F.pad(x.reshape(n, c, h, 1, w, 1), (0, s - 1, 0, 0, 0, s - 1))  # (N, C, H, s, W, s)
        return _fit(nails.reshape(n, c, h * s, w * s), out_size)  # (N, C, sH, sW)


class _Interpolate(Upsampler):
    """`F.interpolate` with a fixed mode; `size` goes straight to it."""

    mode: str = "nearest"
    integer_scale = False

    def __init__(
        self, channels: int, scale: int | float = 2, *, align_corners: bool = False
    ) -> None:
        super().__init__(channels, scale)
        if not isinstance(align_corners, bool):
            raise UserError(
                f"{self.mode}: align_corners must be True or False, got {align_corners!r}"
            )
        self.align_corners = align_corners

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _interpolate(x, size, self.scale, self.mode, self.align_corners)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, align_corners={self.align_corners}"


def _interpolate(
    x: torch.Tensor, size: SizeArg, scale: int | float, mode: str, align_corners: bool
) -> torch.Tensor:
    _check_input(x, mode)
    out_size = _output_size(x, size, scale, mode)
    corners = None if mode == "nearest" else align_corners
    if size is None:
        return F.interpolate(x, scale_factor=scale, mode=mode, align_corners=corners)
    return F.interpolate(x, size=out_size, mode=mode, align_corners=corners)


class Nearest(Upsampler):
    """Nearest-neighbour interpolation: each value copied into its s x s block.

    (N, C, H, W) -> (N, C, s*H, s*W); fractional scales work. torch's "nearest" mode (source index
    floor(i * H / H')), which for integer scales is the same as "nearest-exact".
    """

    integer_scale = False

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _interpolate(x, size, self.scale, "nearest", False)


class Bilinear(_Interpolate):
    """Bilinear interpolation. (N, C, H, W) -> (N, C, s*H, s*W).

    `align_corners=False` (default, torch's and OpenCV's convention): pixels are squares and output
    pixel i samples input position (i + 0.5) / s - 0.5, edges clamped. `align_corners=True`: the
    corner pixels' centres coincide, input position i * (H - 1) / (H' - 1).
    """

    mode = "bilinear"


class Bicubic(_Interpolate):
    """Bicubic convolution interpolation (Keys' cubic kernel with A = -0.75, as torch and OpenCV).

    (N, C, H, W) -> (N, C, s*H, s*W); may overshoot the input range. `align_corners` as `Bilinear`.
    """

    mode = "bicubic"


class MaxUnpool(Upsampler):
    """Puts each value back where the paired max-pool found its maximum; zeros elsewhere.

    forward(x, size=None, indices) with x and indices (N, C, h, w) from `MaxPoolWithIndices`
    (indices flat over each H x W plane, as torch's `max_pool2d(return_indices=True)`). The output
    is the pre-pool size: `size` when given, else (h - 1) * s + kernel_size. Written as a scatter on
    the flattened plane because torch's `MaxUnpool2d` has no rule in the TorchScript ONNX exporter
    (pytorch#25088); the scatter exports (ScatterElements) with both exporters.
    """

    needs_indices = True

    def __init__(self, channels: int, scale: int = 2, *, kernel_size: int | None = None) -> None:
        super().__init__(channels, scale)
        kernel_size = self.scale if kernel_size is None else kernel_size
        if not _is_int(kernel_size) or kernel_size < self.scale:
            raise UserError(
                f"max_unpool: kernel_size must be an integer >= scale ({self.scale}), "
                f"got {kernel_size!r}"
            )
        self.kernel_size = int(kernel_size)

    def _size_range(self, n: int) -> tuple[int, int]:
        """Pre-pool lengths a max-pool (kernel k, stride s, floor or ceil mode) maps to n."""
        s, k = self.scale, self.kernel_size
        return max(n, (n - 2) * s + k + 1), (n - 1) * s + k + s - 1

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_input(x, "max_unpool")
        if indices is None:
            raise UserError(
                "max_unpool needs the indices of its max-pool: call it as up(x, indices=idx) with "
                "idx from MaxPoolWithIndices"
            )
        if indices.shape != x.shape or indices.dtype != torch.int64:
            raise UserError(
                f"max_unpool: indices must be int64 of the input's shape {tuple(x.shape)}, "
                f"got {indices.dtype} {tuple(indices.shape)}"
            )
        n, c, h, w = x.shape
        if size is None:
            out_h, out_w = (
                (h - 1) * self.scale + self.kernel_size,
                (w - 1) * self.scale + self.kernel_size,
            )
        else:
            out_h, out_w = _output_size(x, size, self.scale, "max_unpool")
            (lo_h, hi_h), (lo_w, hi_w) = self._size_range(h), self._size_range(w)
            if not (lo_h <= out_h <= hi_h and lo_w <= out_w <= hi_w):
                raise UserError(
                    f"max_unpool: size {(out_h, out_w)} cannot be the pre-pool size of a "
                    f"{(h, w)} map pooled with kernel {self.kernel_size}, stride {self.scale}; "
                    f"expected {lo_h}..{hi_h} x {lo_w}..{hi_w}"
                )
        out = x.new_zeros(n, c, out_h * out_w)  # (N, C, H'*W') flat planes
        # scatter along the flat plane: out[n, c, indices[n, c, k]] = x[n, c, k]
        try:
            out.scatter_(2, indices.flatten(2), x.flatten(2))  # flatten: (N, C, h*w)
        except RuntimeError as exc:  # an index past H'*W': torch's message names no cause
            raise UserError(
                f"max_unpool: indices point outside the {out_h}x{out_w} output; pass size= the "
                f"pre-pool size ({exc})"
            ) from exc
        return out.view(n, c, out_h, out_w)  # (N, C, H', W')

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}"


class MaxPoolWithIndices(nn.Module):
    """The encoder-side companion of `max_unpool`: a max-pool that also returns its arg-maxima.

    forward(x) -> (pooled, indices), both (N, C, h, w); indices are flat positions in each H x W
    plane (torch's `max_pool2d(return_indices=True)`). stride defaults to kernel_size.
    """

    def __init__(
        self, kernel_size: int = 2, stride: int | None = None, ceil_mode: bool = False
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.max_pool2d(
            x, self.kernel_size, self.stride, ceil_mode=self.ceil_mode, return_indices=True
        )

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, ceil_mode={self.ceil_mode}"


def bilinear_kernel(kernel_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FCN's bilinear filter (Long et al., `surgery.upsample_filt`): (k, k), a 2-D tent."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor  # (k,)
    return torch.outer(filt, filt).to(dtype)  # (k, k)


class TransposedConv(Upsampler):
    """Learnable transposed convolution (`nn.ConvTranspose2d`, C -> C channels, stride = scale).

    Defaults give s*H exactly: kernel 2s - s % 2 (4 for s = 2), padding and output_padding chosen so
    (H - 1) s - 2p + k + output_padding = s H (kernel 3, stride 2 -> padding 1, output_padding 1);
    whatever they give is then cropped / zero-padded at the bottom/right to s*H (or `size`).
    init="bilinear" (default; FCN's): each channel's kernel is `bilinear_kernel(k)`, no
    cross-channel weights, zero bias -- with the default kernel and padding it equals
    `F.interpolate(mode="bilinear", align_corners=False)` away from the border. init="default":
    torch's own (Kaiming-uniform). `stride`, if given, must equal `scale`.
    """

    learnable = True

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        *,
        kernel_size: int | None = None,
        stride: int | None = None,
        padding: int | None = None,
        output_padding: int | None = None,
        bias: bool = False,
        init: str = "bilinear",
    ) -> None:
        super().__init__(channels, scale)
        s = self.scale
        if stride is not None and stride != s:
            raise UserError(f"transposed: stride ({stride!r}) must equal scale ({s})")
        k = 2 * s - s % 2 if kernel_size is None else kernel_size
        if not _is_int(k) or k < 1:
            raise UserError(f"transposed: kernel_size must be a positive integer, got {k!r}")
        if padding is None:
            padding = max(0, -(-(k - s) // 2))  # ceil((k - s) / 2)
        if output_padding is None:
            # the a of Dumoulin & Visin that brings the output to s*H; torch needs it < stride
            output_padding = s + 2 * padding - k
            if not 0 <= output_padding < s:
                output_padding = 0
        if init not in _TRANSPOSED_INITS:
            raise unknown_name("transposed init", init, _TRANSPOSED_INITS)
        self.conv = nn.ConvTranspose2d(
            channels,
            channels,
            k,
            stride=s,
            padding=padding,
            output_padding=output_padding,
            bias=bias,
        )
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)apply the init in the weights' current dtype (so float64 copies are exact)."""
        if self.init == "default":
            self.conv.reset_parameters()
            return
        weight = self.conv.weight  # (C_in, C_out, k, k)
        with torch.no_grad():
            weight.zero_()
            idx = torch.arange(self.channels)
            weight[idx, idx] = bilinear_kernel(weight.shape[-1], weight.dtype)
            if self.conv.bias is not None:
                self.conv.bias.zero_()

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_input(x, "transposed", self.channels)
        out_size = _output_size(x, size, self.scale, "transposed")
        return _fit(self.conv(x), out_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}"


_TRANSPOSED_INITS = ("bilinear", "default")


class ResizeConv(Upsampler):
    """Resize-convolution (Odena, Dumoulin & Olah 2016): interpolate, then a stride-1 convolution.

    (N, C, H, W) -> resize (mode "nearest", their best, or "bilinear") -> pad (padding_mode,
    default "replicate": padding before the conv avoids dark borders) -> k x k conv C -> C.
    No uneven overlap, so no checkerboard whatever the weights. Torch's default init.
    """

    learnable = True
    integer_scale = False

    def __init__(
        self,
        channels: int,
        scale: int | float = 2,
        *,
        mode: str = "nearest",
        kernel_size: int = 3,
        padding_mode: str = "replicate",
        align_corners: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__(channels, scale)
        if mode not in _RESIZE_MODES:
            raise unknown_name("resize_conv mode", mode, _RESIZE_MODES)
        _check_odd_kernel(kernel_size, "resize_conv")
        if padding_mode not in _PADDING_MODES:
            raise unknown_name("resize_conv padding_mode", padding_mode, _PADDING_MODES)
        self.mode = mode
        self.align_corners = align_corners
        self.conv = nn.Conv2d(
            channels,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            padding_mode=padding_mode,
            bias=bias,
        )

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_input(x, "resize_conv", self.channels)
        return self.conv(_interpolate(x, size, self.scale, self.mode, self.align_corners))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


_RESIZE_MODES = ("nearest", "bilinear")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_odd_kernel(kernel_size: object, op: str) -> None:
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError(f"{op}: kernel_size must be a positive odd integer, got {kernel_size!r}")


def icnr_(weight: torch.Tensor, bias: torch.Tensor | None, scale: int) -> None:
    """ICNR (Aitken et al. 2017) in place: the s^2 sub-pixel kernels of each channel made equal.

    weight (C*s^2, C_in, k, k), bias (C*s^2,). A C-channel conv is initialised as torch does, then
    each of its output channels is repeated s^2 times, consecutively -- `PixelShuffle` takes
    channel c*s^2 + i*s + j to sub-pixel (i, j) of channel c -- so conv + shuffle starts as nearest
    upsampling of that conv's output: no checkerboard at initialisation.
    """
    r = scale * scale
    base = nn.Conv2d(
        weight.shape[1],
        weight.shape[0] // r,
        weight.shape[2:],
        bias=bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        weight.copy_(
            base.weight.repeat_interleave(r, dim=0)
        )  # (C, C_in, k, k) -> (C*s^2, C_in, k, k)
        if bias is not None:
            bias.copy_(base.bias.repeat_interleave(r))  # (C,) -> (C*s^2,)


class PixelShuffleUp(Upsampler):
    """Sub-pixel convolution (Shi et al. 2016): k x k conv C -> C*s^2, then `nn.PixelShuffle(s)`.

    (N, C, H, W) -> (N, C*s^2, H, W) -> (N, C, s*H, s*W), then cropped / zero-padded at the
    bottom/right to `size`. init="icnr" (default, see `icnr_`): starts as nearest upsampling of a
    C -> C conv, free of checkerboard; init="default": torch's, independent sub-pixel kernels.
    """

    learnable = True

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        *,
        kernel_size: int = 3,
        padding_mode: str = "zeros",
        bias: bool = True,
        init: str = "icnr",
    ) -> None:
        super().__init__(channels, scale)
        _check_odd_kernel(kernel_size, "pixel_shuffle")
        if padding_mode not in _PADDING_MODES:
            raise unknown_name("pixel_shuffle padding_mode", padding_mode, _PADDING_MODES)
        if init not in _PIXEL_SHUFFLE_INITS:
            raise unknown_name("pixel_shuffle init", init, _PIXEL_SHUFFLE_INITS)
        s = self.scale
        self.conv = nn.Conv2d(
            channels,
            channels * s * s,
            kernel_size,
            padding=kernel_size // 2,
            padding_mode=padding_mode,
            bias=bias,
        )
        self.shuffle = nn.PixelShuffle(s)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)apply the init: ICNR or torch's default."""
        if self.init == "icnr":
            icnr_(self.conv.weight, self.conv.bias, self.scale)
        else:
            self.conv.reset_parameters()

    def forward(
        self, x: torch.Tensor, size: SizeArg = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_input(x, "pixel_shuffle", self.channels)
        out_size = _output_size(x, size, self.scale, "pixel_shuffle")
        return _fit(self.shuffle(self.conv(x)), out_size)  # (N, C*s^2, H, W) -> (N, C, sH, sW)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}"


_PIXEL_SHUFFLE_INITS = ("icnr", "default")


UPSAMPLERS: dict[str, type[Upsampler]] = {
    "bed_of_nails": BedOfNails,
    "nearest": Nearest,
    "bilinear": Bilinear,
    "bicubic": Bicubic,
    "max_unpool": MaxUnpool,
    "transposed": TransposedConv,
    "resize_conv": ResizeConv,
    "pixel_shuffle": PixelShuffleUp,
}


def _name_of(cls: type) -> str:
    for name, value in UPSAMPLERS.items():
        if value is cls:
            return name
    return cls.__name__


def upsampler_options(name: str) -> list[str]:
    """The keyword options `make_upsampler(name, ...)` accepts beyond channels and scale."""
    if name not in UPSAMPLERS:
        raise unknown_name("upsampler", name, UPSAMPLERS)
    params = inspect.signature(UPSAMPLERS[name].__init__).parameters
    return [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]


def make_upsampler(
    name: str | Callable[..., nn.Module], channels: int, scale: int | float = 2, **options: object
) -> nn.Module:
    """Build an upsampler that keeps `channels` and multiplies H and W by `scale`.

    `name` is a key of `UPSAMPLERS` or a callable `f(channels, scale=scale, **options)` returning a
    module with the same `forward(x, size=None, indices=None)` contract. Unknown names and options
    raise `UserError` listing the valid ones.
    """
    if callable(name) and not isinstance(name, str):
        module = name(channels, scale=scale, **options)
        if not isinstance(module, nn.Module):
            raise UserError(
                f"upsampler factory {name!r} returned {type(module).__name__}, not a module"
            )
        return module
    if name not in UPSAMPLERS:
        raise unknown_name("upsampler", name, UPSAMPLERS)
    valid = upsampler_options(name)
    for key in options:
        if key not in valid:
            raise UserError(
                f"unknown option {key!r} for upsampler {name!r}; valid options: "
                f"{', '.join(valid) if valid else '(none)'}"
            )
    return UPSAMPLERS[name](channels, scale, **options)
