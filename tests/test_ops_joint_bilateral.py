"""Joint bilateral upsampling: equal to the definition computed pixel by pixel, a hand-computed
edge, float32 inside bfloat16 autocast, gradients, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixelwise.ops.joint_bilateral import joint_bilateral_upsample


def _by_definition(values: torch.Tensor, guide: torch.Tensor, k: int, sigma_color: float,
                   sigma_space: float, radius: int) -> torch.Tensor:
    """Kopf et al.'s sum, one output pixel at a time: the cells within `radius` of the pixel's
    own cell (indices clamped at the borders), weighted by exp(-d_space^2 / 2 ss^2) (the pixel's
    centre to the cell's centre, in cells) times exp(-|pixel - mean of the cell's block|^2 /
    2 sc^2), normalised."""
    n, c, h, w = values.shape
    out = torch.zeros(n, c, h * k, w * k, dtype=torch.float64)
    for b in range(n):
        for y in range(h * k):
            for x in range(w * k):
                pixel = guide[b, :, y, x]
                total, weight_sum = torch.zeros(c, dtype=torch.float64), 0.0
                for di in range(-radius, radius + 1):
                    for dj in range(-radius, radius + 1):
                        i = min(max(y // k + di, 0), h - 1)
                        j = min(max(x // k + dj, 0), w - 1)
                        cell = guide[b, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean((1, 2))
                        # the window cell's centre (unclamped: a padded cell sits beyond the edge)
                        dy = (y // k + di + 0.5) - (y + 0.5) / k
                        dx = (x // k + dj + 0.5) - (x + 0.5) / k
                        weight = math.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2)
                                          - float((pixel - cell).square().sum())
                                          / (2 * sigma_color**2))
                        total += weight * values[b, :, i, j]
                        weight_sum += weight
                out[b, :, y, x] = total / weight_sum
    return out


@pytest.mark.parametrize("k, radius, sigmas", [(3, 1, (0.3, 1.0)), (2, 2, (0.5, 2.0)),
                                               (4, 0, (0.2, 1.0))])
def test_equals_the_definition_pixel_by_pixel(k: int, radius: int,
                                              sigmas: tuple[float, float]) -> None:
    gen = torch.Generator().manual_seed(k)
    values = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64)
    guide = torch.rand(2, 2, 3 * k, 4 * k, generator=gen, dtype=torch.float64)
    got = joint_bilateral_upsample(values, guide, k, sigma_color=sigmas[0],
                                   sigma_space=sigmas[1], radius=radius)
    assert got.dtype == torch.float64 and got.shape == (2, 3, 3 * k, 4 * k)
    want = _by_definition(values, guide, k, sigmas[0], sigmas[1], radius)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_an_edge_inside_a_block_follows_the_guide() -> None:
    """Two cells (values 0 and 1) of 4 x 4 pixels each; the guide's edge (0 -> 1) lies one pixel
    before the cells' border, so the first block's mean is 0.25. Pixel 3 (guide 1) takes the
    second cell's value, where bilinear upsampling gives 0.375."""
    values = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    guide = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1.0]).expand(1, 1, 4, 8)  # every row alike
    got = joint_bilateral_upsample(values, guide, 4, sigma_color=0.05, sigma_space=2.0, radius=1)
    torch.testing.assert_close(got[0, 0], torch.tensor([0, 0, 0, 1, 1, 1, 1, 1.0]).expand(4, 8),
                               rtol=0, atol=1e-5)
    bilinear = F.interpolate(values, scale_factor=4, mode="bilinear", align_corners=False)
    assert bilinear[0, 0, 1, 3] == pytest.approx(0.375)


def test_far_colours_do_not_underflow() -> None:
    """A pixel far in colour from every cell of its window (sigma 0.01: exp(-1e4) is 0 in any
    float): the weights are a softmax, so it still gets a weighted mean, not 0 / 0."""
    values = torch.randn(1, 2, 2, 2)
    guide = torch.zeros(1, 1, 4, 4)
    guide[0, 0, 0, 0] = 1.0  # its block's mean is 0.25: every cell is >= 0.75 away
    got = joint_bilateral_upsample(values, guide, 2, sigma_color=0.01, radius=1)
    assert torch.isfinite(got).all()
    assert values.min() - 1e-6 <= got.min() and got.max() <= values.max() + 1e-6


def test_float32_inside_bfloat16_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1, 3, 4, 4, generator=gen).bfloat16()
    guide = torch.rand(1, 3, 16, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = joint_bilateral_upsample(values, guide, 4)
    assert got.dtype == torch.bfloat16
    want = joint_bilateral_upsample(values.float(), guide, 4).bfloat16()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradients_reach_the_values() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1, 2, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(1, 3, 4, 6, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v: joint_bilateral_upsample(v, guide, 2, sigma_color=0.3, radius=1), (values,))


def test_refusals() -> None:
    values = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="does not match"):
        joint_bilateral_upsample(values, torch.zeros(1, 3, 12, 11), 4)
    with pytest.raises(ValueError, match="does not match"):
        joint_bilateral_upsample(values, torch.zeros(2, 3, 12, 12), 4)
    with pytest.raises(ValueError, match="sigmas must be > 0"):
        joint_bilateral_upsample(values, torch.zeros(1, 3, 12, 12), 4, sigma_color=0)
    with pytest.raises(ValueError, match="radius >= 0"):
        joint_bilateral_upsample(values, torch.zeros(1, 3, 12, 12), 4, radius=-1)
