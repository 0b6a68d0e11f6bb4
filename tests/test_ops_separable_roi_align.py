"""separable_roi_align: torchvision's RoIAlign as two matrix products, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from pixelwise.ops.separable_roi_align import axis_weights, separable_roi_align


def _rois(n: int, images: int, span: float, seed: int) -> torch.Tensor:
    """(n, 5) RoIs, some partly or wholly outside a map of side `span`, some tiny."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, images, (n, 1), generator=g).float()
    xy = torch.rand(n, 2, generator=g) * span * 1.2 - 0.1 * span
    wh = torch.rand(n, 2, generator=g) * span * 0.6
    rois = torch.cat([index, xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([3.0, 3.0, 3.2, 3.1])  # under a pixel: torchvision widens it
    rois[1, 1:] = torch.tensor([-3.0 * span, -span, 3.0 * span, 2.0 * span])  # past every side
    return rois


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (5, 3)])
def test_equals_torchvision_forward_and_backward(aligned: bool, sampling_ratio: int,
                                                 output_size: tuple[int, int]) -> None:
    x = torch.randn(3, 5, 20, 24, dtype=torch.float64, requires_grad=True)
    rois = _rois(60, 3, 96.0, seed=sampling_ratio).double()
    ours = separable_roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
    theirs = roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    weight = torch.randn_like(theirs)
    (g_ours,) = torch.autograd.grad((ours * weight).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * weight).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-11)


def test_float32_channels_last_and_images_without_rois() -> None:
    x = torch.randn(4, 16, 32, 32).to(memory_format=torch.channels_last).requires_grad_()
    rois = _rois(80, 2, 128.0, seed=7)  # images 2 and 3 get none, RoIs not sorted by image
    assert not torch.equal(rois[:, 0].sort().values, rois[:, 0])
    ours = separable_roi_align(x, rois, 7, 0.25, 2)
    theirs = roi_align(x, rois, 7, 0.25, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(theirs)
    (g_ours,) = torch.autograd.grad((ours * weight).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * weight).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-5)
    assert g_ours[2:].abs().sum() == 0


def test_gradcheck() -> None:
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = _rois(4, 2, 7.0, seed=3).double()
    assert torch.autograd.gradcheck(lambda t: separable_roi_align(t, rois, 3, 1.0, 2), (x,))


def test_bfloat16_is_pooled_in_bfloat16_and_float16_in_float32() -> None:
    x = torch.randn(2, 4, 16, 16)
    rois = _rois(30, 2, 64.0, seed=4)
    expected = roi_align(x, rois, 4, 0.25, 2)
    out = separable_roi_align(x.bfloat16().requires_grad_(), rois, 4, 0.25, 2)
    assert out.dtype == torch.bfloat16
    # bfloat16 features, weights and output: ~3 significant digits
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    half = separable_roi_align(x.half(), rois, 4, 0.25, 2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=1e-3, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 features stay float32 inside
        inside = separable_roi_align(x, rois, 4, 0.25, 2)
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradient() -> None:
    x = torch.randn(2, 4, 16, 16)
    rois = _rois(30, 2, 64.0, seed=5)
    weight = torch.randn(30, 4, 4, 4)
    features = x.bfloat16().requires_grad_()
    (ours,) = torch.autograd.grad((separable_roi_align(features, rois, 4, 0.25, 2).float()
                                   * weight).sum(), features)
    reference = x.clone().requires_grad_()
    (theirs,) = torch.autograd.grad((roi_align(reference, rois, 4, 0.25, 2) * weight).sum(),
                                    reference)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs, rtol=3e-2, atol=3e-2)


def test_no_rois_and_adaptive_sampling() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert separable_roi_align(x, torch.zeros(0, 5), 7).shape == (0, 3, 7, 7)
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        separable_roi_align(x, _rois(3, 2, 8.0, seed=0), 7, 1.0, sampling_ratio=0)


def test_axis_weights_by_hand() -> None:
    """One RoI from 1.0 to 3.0 on a 4-pixel axis, 2 bins of 2 samples: samples at 1.25, 1.75
    (bin 0) and 2.25, 2.75 (bin 1); samples past the last pixel's centre take it alone, and a
    sample more than one pixel outside the axis counts for nothing."""
    w = axis_weights(torch.tensor([1.0]), torch.tensor([2.0]), 2, 2, 4)
    expected = torch.tensor([[[0.0, 0.5, 0.5, 0.0],      # (0.75 + 0.25) / 2, (0.25 + 0.75) / 2
                              [0.0, 0.0, 0.5, 0.5]]])
    torch.testing.assert_close(w, expected)
    edge = axis_weights(torch.tensor([3.0]), torch.tensor([1.0]), 1, 2, 4)  # 3.25, 3.75 -> 3
    torch.testing.assert_close(edge, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]))
    outside = axis_weights(torch.tensor([5.5]), torch.tensor([1.0]), 1, 1, 4)  # 6.0 > 4: none
    assert outside.abs().sum() == 0
