"""RoIAlign split between threads equals torchvision's RoIAlign."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

import pixelwise.ops.roi_align as pra
from pixelwise.ops.roi_align import ParallelMultiScaleRoIAlign, parallel_roi_align


pytestmark = pytest.mark.usefixtures("two_threads")


def _boxes(n: int, size: float, generator: torch.Generator, small: float = 2.0) -> torch.Tensor:
    """(n, 4) x1 y1 x2 y2 boxes inside [0, size], sides from `small` to the whole image."""
    xy = torch.rand(n, 2, generator=generator) * size * 0.9
    wh = small + torch.rand(n, 2, generator=generator) * (size - xy - small).clamp(min=0)
    return torch.cat([xy, xy + wh], 1)


def _rois(n: int, images: int, size: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([index, _boxes(n, size, g)], 1)  # (n, 5)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (-1, False), (0, True)])
def test_forward_is_bit_identical_and_split(sampling_ratio: int, aligned: bool) -> None:
    x = torch.randn(2, 8, 24, 32)
    rois = _rois(301, 2, 90.0)
    assert [len(c) for c in pra._chunks(rois)] == [151, 150]
    ours = parallel_roi_align(x, rois, 7, 0.25, sampling_ratio, aligned)
    assert torch.equal(ours, roi_align(x, rois, 7, 0.25, sampling_ratio, aligned))


def test_backward_equals_torchvision() -> None:
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    rois = _rois(200, 2, 60.0, seed=1).double()
    weight = torch.randn(200, 4, 5, 5, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((parallel_roi_align(x, rois, 5, 0.25, 2) * weight).sum(), x)
    (grad_tv,) = torch.autograd.grad((roi_align(x, rois, 5, 0.25, 2) * weight).sum(), x)
    torch.testing.assert_close(grad_ours, grad_tv, rtol=0, atol=1e-12)


def test_gradcheck_with_every_roi_its_own_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pra, "MIN_ROIS_PER_THREAD", 1)
    torch.set_num_threads(3)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = _rois(3, 1, 6.0, seed=2).double()
    assert len(pra._chunks(rois)) == 3
    assert torch.autograd.gradcheck(lambda t: parallel_roi_align(t, rois, 2, 1.0, 2), (x,))


def test_falls_back_to_torchvision_when_not_worth_it() -> None:
    x = torch.randn(1, 3, 16, 16)
    few = _rois(2 * pra.MIN_ROIS_PER_THREAD - 1, 1, 60.0)
    assert pra._chunks(few) is None
    assert torch.equal(parallel_roi_align(x, few, 3, 0.25), roi_align(x, few, 3, 0.25))
    torch.set_num_threads(1)
    many = _rois(500, 1, 60.0)
    assert pra._chunks(many) is None
    assert torch.equal(parallel_roi_align(x, many, 3, 0.25), roi_align(x, many, 3, 0.25))


def test_bfloat16_features_are_pooled_in_float32() -> None:
    x = torch.randn(1, 4, 16, 16).bfloat16()
    rois = _rois(100, 1, 60.0)
    out = parallel_roi_align(x, rois, 4, 0.25, 2)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, roi_align(x.float(), rois, 4, 0.25, 2).bfloat16())


def _fpn(images: int = 2, size: int = 512, channels: int = 4) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((str(level), torch.randn(images, channels, size >> (level + 2),
                                                size >> (level + 2), requires_grad=True))
                       for level in range(4))


def test_multiscale_equals_torchvision_forward_and_backward() -> None:
    """Boxes of every size (so every FPN level gets RoIs: level 3 from ~450 px), two images of
    different sizes."""
    features = _fpn()
    g = torch.Generator().manual_seed(3)
    big = torch.tensor([[0.0, 0.0, 500.0, 480.0], [5.0, 10.0, 470.0, 505.0]])
    boxes = [torch.cat([_boxes(400, 512.0, g), big]), _boxes(250, 400.0, g)]
    shapes = [(512, 512), (400, 400)]
    names = list(features)
    ours = ParallelMultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    theirs = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    out_ours, out_theirs = ours(features, boxes, shapes), theirs(features, boxes, shapes)
    levels = theirs.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    assert torch.equal(out_ours, out_theirs)
    weight = torch.randn_like(out_ours)
    grads_ours = torch.autograd.grad((out_ours * weight).sum(), list(features.values()))
    grads_theirs = torch.autograd.grad((out_theirs * weight).sum(), list(features.values()))
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_multiscale_pools_with_the_separable_op_where_it_pays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only in bfloat16 training (a gradient, bfloat16 features), and only on the levels small
    enough (`SEPARABLE_MAX_RATIO`); the result equals torchvision's to bfloat16 rounding."""
    calls = []
    real = pra.separable_roi_align
    monkeypatch.setattr(pra, "separable_roi_align", lambda *a: calls.append(1) or real(*a))
    boxes = [_boxes(100, 256.0, torch.Generator().manual_seed(5))]
    fp32 = _fpn(images=1, size=256)  # levels 64², 32², 16², 8²
    bf16 = OrderedDict((k, v.detach().bfloat16().requires_grad_()) for k, v in fp32.items())
    pooler = ParallelMultiScaleRoIAlign(list(fp32), output_size=7, sampling_ratio=2)
    pooler(fp32, boxes, [(256, 256)])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # as the models train
    with torch.no_grad(), autocast:
        pooler(bf16, boxes, [(256, 256)])
    assert calls == []
    for threads in (2, 1):  # the separable op on one thread too
        torch.set_num_threads(threads)
        with autocast:
            out = pooler(bf16, boxes, [(256, 256)])
    assert len(calls) == 2 * 4  # one call per level
    rounded = OrderedDict((k, v.detach().float()) for k, v in bf16.items())
    expected = MultiScaleRoIAlign(list(fp32), output_size=7, sampling_ratio=2)(
        rounded, boxes, [(256, 256)])
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    calls.clear()
    big = _fpn(images=1, size=512)  # level 0 is 128²: 16384 > 256 * 7 * 2², torchvision's
    big = OrderedDict((k, v.detach().bfloat16().requires_grad_()) for k, v in big.items())
    pooler = ParallelMultiScaleRoIAlign(list(big), output_size=7, sampling_ratio=2)
    with autocast:
        pooler(big, [_boxes(100, 512.0, torch.Generator().manual_seed(6))], [(512, 512)])
    assert len(calls) == 3
    calls.clear()
    adaptive = ParallelMultiScaleRoIAlign(list(bf16), output_size=7, sampling_ratio=-1)
    with autocast:
        out = adaptive(bf16, boxes, [(256, 256)])  # no fixed grid: torchvision's kernel
    assert calls == [] and out.requires_grad


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_multiscale_without_autograd_and_on_one_thread(mode: type) -> None:
    features = _fpn(images=1)
    boxes = [_boxes(300, 512.0, torch.Generator().manual_seed(4))]
    names = list(features)
    theirs = MultiScaleRoIAlign(names, output_size=(14, 14), sampling_ratio=2)
    with mode():
        expected = theirs(features, boxes, [(512, 512)])
        for threads in (2, 1):
            torch.set_num_threads(threads)
            ours = ParallelMultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
            assert torch.equal(ours(features, boxes, [(512, 512)]), expected)
