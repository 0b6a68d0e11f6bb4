"""pixelwise.upsample: the shape/dtype contract for every name, gradcheck, and naive references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError
from pixelwise.upsample import (
    UPSAMPLERS,
    MaxPoolWithIndices,
    bilinear_kernel,
    make_upsampler,
)

LEARNABLE = [name for name, cls in UPSAMPLERS.items() if cls.learnable]


def _inputs(
    name: str, shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float32, scale: int = 2
) -> tuple[torch.Tensor, dict]:
    """x of `shape` (the pooled shape for max_unpool, with indices from a real max-pool)."""
    n, c, h, w = shape
    if UPSAMPLERS[name].needs_indices:
        pooled, idx = MaxPoolWithIndices(scale)(
            torch.randn(n, c, h * scale, w * scale, dtype=dtype)
        )
        return pooled, {"indices": idx}
    return torch.randn(shape, dtype=dtype), {}


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_shape_and_dtype(name: str, dtype: torch.dtype, hw: tuple[int, int]) -> None:
    up = make_upsampler(name, 3).to(dtype)
    x, kw = _inputs(name, (2, 3, *hw), dtype)
    y = up(x, **kw)
    assert y.shape == (2, 3, 2 * hw[0], 2 * hw[1])
    assert y.dtype == dtype
    assert up.needs_indices == (name == "max_unpool")


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("scale", [3, 4])
def test_other_integer_scales(name: str, scale: int) -> None:
    up = make_upsampler(name, 2, scale=scale)
    x, kw = _inputs(name, (1, 2, 5, 6), scale=scale)
    assert up(x, **kw).shape == (1, 2, 5 * scale, 6 * scale)


@pytest.mark.parametrize("name", [n for n in UPSAMPLERS if n != "max_unpool"])
@pytest.mark.parametrize("size", [(134, 142), (135, 143), (67, 71), (140, 150)])
def test_size_argument(name: str, size: tuple[int, int]) -> None:
    """67x71 -> any size >= the input: exactly 2x, a skip's odd size, the input size, larger."""
    up = make_upsampler(name, 2)
    x = torch.randn(1, 2, 67, 71)
    assert up(x, size=size).shape == (1, 2, *size)
    assert up(x, size=torch.Size(size)).shape == (1, 2, *size)


@pytest.mark.parametrize("name", ["bed_of_nails", "transposed", "pixel_shuffle"])
def test_size_crops_or_pads_bottom_right(name: str) -> None:
    """Fixed-stride ops: `size` crops / zero-pads the s*H map, keeping the top-left aligned."""
    up = make_upsampler(name, 2)
    x = torch.randn(1, 2, 6, 7)
    full = up(x)
    torch.testing.assert_close(up(x, size=(11, 13)), full[..., :11, :13])
    padded = up(x, size=(13, 15))
    torch.testing.assert_close(padded[..., :12, :14], full)
    assert padded[..., 12:, :].abs().sum() == 0 and padded[..., :, 14:].abs().sum() == 0


@pytest.mark.parametrize("pre", [(66, 70), (67, 71)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_unpool_size_is_pre_pool_size(pre: tuple[int, int], ceil_mode: bool) -> None:
    pool = MaxPoolWithIndices(2, ceil_mode=ceil_mode)
    x = torch.randn(1, 2, *pre)
    pooled, idx = pool(x)
    y = make_upsampler("max_unpool", 2)(pooled, size=pre, indices=idx)
    assert y.shape == x.shape
    expected = F.max_unpool2d(pooled, idx, 2, output_size=pre)  # torch's own op
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # every kept value sits where it came from
    mask = y != 0
    torch.testing.assert_close(y[mask], x[mask], rtol=0, atol=0)


def test_max_unpool_overlapping_pool_kernel() -> None:
    """kernel 3, stride 2 pooling: pass kernel_size so the default output is torch's default."""
    x = torch.randn(1, 2, 11, 13)
    pooled, idx = MaxPoolWithIndices(3, 2)(x)
    up = make_upsampler("max_unpool", 2, kernel_size=3)
    torch.testing.assert_close(up(pooled, indices=idx), F.max_unpool2d(pooled, idx, 3, 2))
    torch.testing.assert_close(
        up(pooled, size=(12, 14), indices=idx),
        F.max_unpool2d(pooled, idx, 3, 2, output_size=(12, 14)),
    )


def test_indices_ignored_by_others() -> None:
    """A decoder may pass indices to any upsampler; only max_unpool uses them."""
    x = torch.randn(1, 2, 4, 4)
    idx = torch.zeros(1, 2, 4, 4, dtype=torch.int64)
    up = make_upsampler("nearest", 2)
    torch.testing.assert_close(up(x, indices=idx), up(x))


def test_fractional_scale_for_interpolation() -> None:
    x = torch.randn(1, 2, 10, 12)
    for name in ("nearest", "bilinear", "bicubic", "resize_conv"):
        assert make_upsampler(name, 2, scale=1.5)(x).shape == (1, 2, 15, 18)
    assert make_upsampler("nearest", 2, scale=2.0).scale == 2


def test_callable_factory() -> None:
    calls = []

    def factory(channels: int, scale: int = 2, **options: object) -> nn.Module:
        calls.append((channels, scale, options))
        return make_upsampler("nearest", channels, scale)

    up = make_upsampler(factory, 5, scale=3, foo=1)
    assert calls == [(5, 3, {"foo": 1})]
    assert up(torch.randn(1, 5, 2, 2)).shape == (1, 5, 6, 6)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", UPSAMPLERS)
def test_gradcheck_float64(name: str) -> None:
    """float64 gradcheck w.r.t. the input and (learnable ones) every parameter, at odd sizes."""
    up = make_upsampler(name, 2).double()
    x, kw = _inputs(name, (1, 2, 3, 4), torch.float64)
    x.requires_grad_(True)
    params = [p for p in up.parameters()]
    assert bool(params) == (name in LEARNABLE)

    def f(inp: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        state = dict(zip([n for n, _ in up.named_parameters()], weights, strict=True))
        return torch.func.functional_call(up, state, (inp,), {"size": (7, 9), **kw})

    weights = [p.detach().clone().requires_grad_(True) for p in params]
    # fast mode (a random vector-Jacobian product against finite differences) keeps this quick
    # with the 150 weights of pixel_shuffle; the input-only check below is the full Jacobian
    assert torch.autograd.gradcheck(f, (x, *weights), fast_mode=True)
    assert torch.autograd.gradcheck(lambda inp: f(inp, *weights), (x,))


# --------------------------------------------------------------------------- naive references


def _naive_bed_of_nails(x: torch.Tensor, s: int, size: tuple[int, int]) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros(n, c, *size, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            if i * s < size[0] and j * s < size[1]:
                out[:, :, i * s, j * s] = x[:, :, i, j]
    return out


@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("size", [None, (11, 13), (16, 20)])
def test_bed_of_nails_naive(scale: int, size: tuple[int, int] | None) -> None:
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = _naive_bed_of_nails(x, scale, size or (5 * scale, 6 * scale))
    got = make_upsampler("bed_of_nails", 3, scale=scale)(x, size=size)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [2, 3])
def test_nearest_naive(scale: int) -> None:
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    expected = torch.zeros(1, 2, 4 * scale, 5 * scale, dtype=torch.float64)
    for i in range(4 * scale):
        for j in range(5 * scale):
            expected[..., i, j] = x[..., i // scale, j // scale]
    got = make_upsampler("nearest", 2, scale=scale)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _source(o: int, n_in: int, n_out: int, align_corners: bool, cubic: bool) -> float:
    """Input coordinate sampled by output index o (torch's area_pixel_compute_source_index)."""
    if align_corners:
        return o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = (o + 0.5) * n_in / n_out - 0.5
    return src if cubic else max(src, 0.0)


def _naive_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros(n, c, *size, dtype=x.dtype)
    for i in range(size[0]):
        sy = _source(i, h, size[0], align_corners, False)
        y0 = min(int(math.floor(sy)), h - 1)
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for j in range(size[1]):
            sx = _source(j, w, size[1], align_corners, False)
            x0 = min(int(math.floor(sx)), w - 1)
            x1, lx = min(x0 + 1, w - 1), sx - x0
            out[..., i, j] = (1 - ly) * ((1 - lx) * x[..., y0, x0] + lx * x[..., y0, x1]) + ly * (
                (1 - lx) * x[..., y1, x0] + lx * x[..., y1, x1]
            )
    return out


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [None, (11, 17)])
def test_bilinear_naive(align_corners: bool, size: tuple[int, int] | None) -> None:
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    up = make_upsampler("bilinear", 2, align_corners=align_corners)
    expected = _naive_bilinear(x, size or (10, 14), align_corners)
    torch.testing.assert_close(up(x, size=size), expected, rtol=1e-12, atol=1e-12)


def _cubic_weight(t: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with torch's A = -0.75."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _naive_bicubic(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros(n, c, *size, dtype=x.dtype)
    for i in range(size[0]):
        sy = _source(i, h, size[0], align_corners, True)
        y0 = math.floor(sy)
        for j in range(size[1]):
            sx = _source(j, w, size[1], align_corners, True)
            x0 = math.floor(sx)
            acc = torch.zeros(n, c, dtype=x.dtype)
            for dy in range(-1, 3):
                wy = _cubic_weight(sy - (y0 + dy))
                yy = min(max(y0 + dy, 0), h - 1)  # taps outside the image repeat the edge
                for dx in range(-1, 3):
                    xx = min(max(x0 + dx, 0), w - 1)
                    acc += wy * _cubic_weight(sx - (x0 + dx)) * x[..., yy, xx]
            out[..., i, j] = acc
    return out


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [None, (11, 17)])
def test_bicubic_naive(align_corners: bool, size: tuple[int, int] | None) -> None:
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    up = make_upsampler("bicubic", 2, align_corners=align_corners)
    expected = _naive_bicubic(x, size or (10, 14), align_corners)
    torch.testing.assert_close(up(x, size=size), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pre", [(8, 10), (9, 11)])
def test_max_unpool_naive(pre: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *pre, dtype=torch.float64)
    pooled, idx = MaxPoolWithIndices(2)(x)
    # naive pool indices too: the arg-max of each 2x2 window, flat in the H x W plane
    for n in range(2):
        for c in range(3):
            for i in range(pre[0] // 2):
                for j in range(pre[1] // 2):
                    window = x[n, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten()
                    k = int(window.argmax())
                    assert int(idx[n, c, i, j]) == (2 * i + k // 2) * pre[1] + 2 * j + k % 2
    expected = torch.zeros(2, 3, pre[0] * pre[1], dtype=torch.float64)
    for n in range(2):
        for c in range(3):
            for i in range(pooled.shape[2]):
                for j in range(pooled.shape[3]):
                    expected[n, c, idx[n, c, i, j]] = pooled[n, c, i, j]
    got = make_upsampler("max_unpool", 3)(pooled, size=pre, indices=idx)
    torch.testing.assert_close(got, expected.view(2, 3, *pre), rtol=0, atol=0)


# --------------------------------------------------------------------------- learnable ones


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_transposed_bilinear_init_equals_bilinear_interpolation(scale: int) -> None:
    """FCN's init (kernel 2s - s%2, stride s, padding s//2) = bilinear (align_corners=False)
    away from the border."""
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    up = make_upsampler("transposed", 3, scale=scale).double()
    up.reset_parameters()  # the init again in float64: 1/3 exactly as a double
    conv = up.conv
    assert conv.kernel_size[0] == 2 * scale - scale % 2 and conv.padding[0] == scale // 2
    got = up(x)
    ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    b = scale  # the border where interpolation clamps and the transposed conv sees zeros
    torch.testing.assert_close(got[..., b:-b, b:-b], ref[..., b:-b, b:-b], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[..., :1, :], ref[..., :1, :])  # ... and only there


def test_bilinear_kernel_matches_fcn() -> None:
    """FCN's upsample_filt for k=4: the outer product of [1, 3, 3, 1] / 4."""
    f = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(bilinear_kernel(4), torch.outer(f, f))
    g = torch.tensor([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    torch.testing.assert_close(bilinear_kernel(5), torch.outer(g, g))


@pytest.mark.parametrize(
    ("kernel_size", "padding", "output_padding"), [(3, 1, 1), (4, 1, 0), (2, 0, 0), (5, 2, 1)]
)
def test_transposed_equals_torch_conv_transpose(
    kernel_size: int, padding: int, output_padding: int
) -> None:
    """Default padding/output_padding give s*H; the op is exactly nn.ConvTranspose2d there."""
    up = make_upsampler("transposed", 3, kernel_size=kernel_size, init="default")
    assert (up.conv.padding[0], up.conv.output_padding[0]) == (padding, output_padding)
    x = torch.randn(1, 3, 6, 7)
    ref = F.conv_transpose2d(
        x, up.conv.weight, stride=2, padding=padding, output_padding=output_padding
    )
    assert ref.shape[-2:] == (12, 14)
    torch.testing.assert_close(up(x), ref)


def test_transposed_explicit_padding_is_fitted() -> None:
    """kernel 3, stride 2, padding 1, output_padding 0 gives 2H-1: zero-padded to 2H."""
    up = make_upsampler("transposed", 2, kernel_size=3, padding=1, output_padding=0)
    x = torch.randn(1, 2, 5, 5)
    ref = F.conv_transpose2d(x, up.conv.weight, stride=2, padding=1)
    assert ref.shape[-1] == 9
    y = up(x)
    assert y.shape[-1] == 10
    torch.testing.assert_close(y[..., :9, :9], ref)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_resize_conv_is_resize_pad_conv(mode: str) -> None:
    up = make_upsampler("resize_conv", 3, mode=mode)
    x = torch.randn(1, 3, 6, 7)
    resized = F.interpolate(
        x, scale_factor=2, mode=mode, align_corners=None if mode == "nearest" else False
    )
    ref = F.conv2d(F.pad(resized, (1, 1, 1, 1), mode="replicate"), up.conv.weight, up.conv.bias)
    torch.testing.assert_close(up(x), ref)
    # padding before the conv: a constant input stays constant up to the border (all-ones weights)
    with torch.no_grad():
        up.conv.weight.fill_(1.0)
        up.conv.bias.zero_()
    y = up(torch.ones(1, 3, 6, 7))
    torch.testing.assert_close(y, torch.full_like(y, 27.0))


@pytest.mark.parametrize("scale", [2, 3])
def test_pixel_shuffle_icnr_starts_as_nearest(scale: int) -> None:
    """ICNR: conv + shuffle == nearest upsampling of a C -> C conv (its every s^2-th kernel)."""
    up = make_upsampler("pixel_shuffle", 3, scale=scale)
    x = torch.randn(2, 3, 5, 6)
    r = scale * scale
    conv_out = F.conv2d(x, up.conv.weight[::r], up.conv.bias[::r], padding=1)  # (N, C, H, W)
    ref = F.interpolate(conv_out, scale_factor=scale, mode="nearest")
    torch.testing.assert_close(up(x), ref)


def _interior_ratio(y: torch.Tensor, border: int) -> float:
    inner = y[..., border:-border, border:-border]
    return float(inner.max() / inner.min())


def test_pixel_shuffle_icnr_free_of_checkerboard() -> None:
    """Constant input: ICNR gives a flat interior; torch's default init gives a periodic pattern."""
    x = torch.ones(1, 4, 8, 8)
    for seed in range(3):
        torch.manual_seed(seed)
        icnr = make_upsampler("pixel_shuffle", 4)(x)
        default = make_upsampler("pixel_shuffle", 4, init="default")(x)
        inner = icnr[..., 2:-2, 2:-2]
        assert torch.allclose(inner, inner[..., :1, :1].expand_as(inner), atol=1e-6)
        spread = default[..., 2:-2, 2:-2]
        assert (spread.amax(dim=(-2, -1)) - spread.amin(dim=(-2, -1))).min() > 1e-3


@pytest.mark.parametrize(("kernel_size", "expected"), [(3, 4.0), (4, 1.0)])
def test_transposed_overlap_checkerboard(kernel_size: int, expected: float) -> None:
    """Odena et al.: all-ones kernel 3, stride 2 overlaps 1, 2 or 4 times; kernel 4 evenly."""
    up = make_upsampler("transposed", 1, kernel_size=kernel_size)
    with torch.no_grad():
        up.conv.weight.fill_(1.0)
        y = up(torch.ones(1, 1, 8, 8))
    assert _interior_ratio(y, kernel_size) == expected
    if kernel_size == 3:
        assert sorted(set(y[0, 0, 3:-3, 3:-3].flatten().tolist())) == [1.0, 2.0, 4.0]


# --------------------------------------------------------------------------- bad input


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(
        UserError, match="unknown upsampler 'deconv'; valid names: bed_of_nails, bicubic"
    ):
        make_upsampler("deconv", 3)


def test_unknown_option() -> None:
    with pytest.raises(UserError, match="unknown option 'kernel' for upsampler 'transposed'"):
        make_upsampler("transposed", 3, kernel=3)
    with pytest.raises(UserError, match="valid options: align_corners"):
        make_upsampler("bilinear", 3, mode="x")


def test_max_unpool_without_indices() -> None:
    with pytest.raises(ValueError, match="max_unpool needs the indices"):
        make_upsampler("max_unpool", 3)(torch.randn(1, 3, 4, 4))


def test_max_unpool_bad_indices_and_size() -> None:
    up = make_upsampler("max_unpool", 3)
    pooled, idx = MaxPoolWithIndices(2)(torch.randn(1, 3, 9, 9))
    with pytest.raises(ValueError, match="indices must be int64"):
        up(pooled, indices=idx.int())
    with pytest.raises(ValueError, match="cannot be the pre-pool size"):
        up(pooled, size=(12, 12), indices=idx)
    with pytest.raises(ValueError, match="indices point outside the 8x8 output"):
        up(pooled, size=(8, 8), indices=torch.full_like(idx, 80))


@pytest.mark.parametrize("name", ["bed_of_nails", "max_unpool", "transposed", "pixel_shuffle"])
@pytest.mark.parametrize("scale", [1.5, 2.5])
def test_non_integer_scale(name: str, scale: float) -> None:
    with pytest.raises(ValueError, match=f"{name}: scale must be an integer, got {scale}"):
        make_upsampler(name, 3, scale=scale)


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("scale", [0, 0.5, -2, "2"])
def test_bad_scale(name: str, scale: object) -> None:
    with pytest.raises(ValueError, match="scale must be"):
        make_upsampler(name, 3, scale=scale)


@pytest.mark.parametrize("name", [n for n in UPSAMPLERS if n != "max_unpool"])
def test_size_smaller_than_input(name: str) -> None:
    up = make_upsampler(name, 2)
    with pytest.raises(
        ValueError, match=r"output size \(6, 20\) is smaller than the input size \(7, 9\)"
    ):
        up(torch.randn(1, 2, 7, 9), size=(6, 20))
    with pytest.raises(ValueError, match="size must be an int or two ints"):
        up(torch.randn(1, 2, 7, 9), size=(14.0, 18.0))


@pytest.mark.parametrize("name", LEARNABLE)
def test_wrong_channels_and_rank(name: str) -> None:
    up = make_upsampler(name, 3)
    with pytest.raises(ValueError, match="built for 3 channels, got input with 4"):
        up(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, H, W\)"):
        up(torch.randn(3, 5, 5))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("transposed", {"init": "xavier"}, "unknown transposed init 'xavier'"),
        ("transposed", {"stride": 3}, r"stride \(3\) must equal scale \(2\)"),
        ("pixel_shuffle", {"init": "zero"}, "unknown pixel_shuffle init"),
        ("pixel_shuffle", {"kernel_size": 2}, "kernel_size must be a positive odd integer"),
        ("resize_conv", {"mode": "bicubic"}, "unknown resize_conv mode 'bicubic'"),
        ("resize_conv", {"padding_mode": "edge"}, "unknown resize_conv padding_mode"),
        ("bilinear", {"align_corners": "yes"}, "align_corners must be True or False"),
    ],
)
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        make_upsampler(name, 3, **options)


def test_bad_channels() -> None:
    with pytest.raises(UserError, match="channels must be a positive integer"):
        make_upsampler("nearest", 0)
