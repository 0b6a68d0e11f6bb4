"""RoI maps tiled into one map: the layout, and conv stacks on it equal per-RoI convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

import pixelwise.models.fast_postprocess as fp
from pixelwise.ops.roi_mosaic import Mosaic


def test_layout_by_hand() -> None:
    # 3 RoIs of 2 x 3 pixels, separators 1: a 2 x 2 grid (one empty cell) of 3 x 4 cells
    x = torch.arange(1, 19, dtype=torch.float32).view(3, 1, 2, 3)
    layout = Mosaic.for_rois(3, 2, 3, 1)
    assert (layout.rows, layout.cols, layout.size) == (2, 2, (7, 9))
    expected = torch.tensor([
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 2, 3, 0, 7, 8, 9, 0],
        [0, 4, 5, 6, 0, 10, 11, 12, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 13, 14, 15, 0, 0, 0, 0, 0],
        [0, 16, 17, 18, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    tiled = layout.pack(x)
    assert torch.equal(tiled[0, 0], expected)
    assert torch.equal(layout.pack(x.transpose(2, 3).contiguous().transpose(2, 3)), tiled)
    assert torch.equal(layout.unpack(tiled), x)
    rows, cols = layout.separators()
    assert rows.tolist() == [0, 3, 6] and cols.tolist() == [0, 4, 8]
    filled = torch.full((1, 1, 7, 9), 5.0)
    layout.clear_separators_(filled, (rows, cols))
    separator = torch.zeros(7, 9, dtype=torch.bool)
    separator[[0, 3, 6], :] = True
    separator[:, [0, 4, 8]] = True
    assert torch.equal(filled[0, 0] == 0, separator)


@pytest.mark.parametrize("count, h, w, pad", [(1, 5, 5, 1), (7, 6, 4, 1), (12, 5, 7, 2),
                                              (16, 3, 3, 1)])
def test_convolutions_on_the_mosaic_equal_per_roi(count: int, h: int, w: int, pad: int) -> None:
    """conv (padding p) on the tiled map, separators cleared between layers == per RoI."""
    gen = torch.Generator().manual_seed(count)
    x = torch.randn(count, 3, h, w, generator=gen, dtype=torch.float64)
    weights = [torch.randn(4, 3, 2 * pad + 1, 2 * pad + 1, generator=gen, dtype=torch.float64),
               torch.randn(5, 4, 2 * pad + 1, 2 * pad + 1, generator=gen, dtype=torch.float64)]
    bias = torch.randn(4, generator=gen, dtype=torch.float64)  # non-zero separators next
    expected = F.conv2d(F.conv2d(x, weights[0], bias, padding=pad).relu(), weights[1],
                        padding=pad)
    layout = Mosaic.for_rois(count, h, w, pad)
    tiled = F.conv2d(layout.pack(x), weights[0], bias, padding=pad).relu()
    tiled = layout.clear_separators_(tiled, layout.separators())
    got = layout.unpack(F.conv2d(tiled, weights[1], padding=pad))
    assert got.shape == (count, 5, h, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _eval_bn_head(channels: int, layers: int) -> nn.Sequential:
    """conv, BatchNorm (eval, non-trivial statistics: its shift makes separators non-zero),
    ReLU, repeated."""
    blocks = []
    for _ in range(layers):
        bn = nn.BatchNorm2d(channels)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
        blocks.append(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), bn,
                                    nn.ReLU(inplace=True)))
    return nn.Sequential(*blocks).eval()


@pytest.mark.skipif(not fp.NNPACK_AVAILABLE, reason="NNPACK is not available on this CPU")
@pytest.mark.parametrize("count", [1, 9, 37])
def test_run_conv_stack_tiles_rois(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp, "MOSAIC_ROIS", 16)  # 37 RoIs: three tiled maps
    monkeypatch.setattr(fp, "MOSAIC_MIN_CHANNELS", 16)
    torch.manual_seed(count)
    x = torch.randn(count, 16, 14, 14)
    tiled_maps = []
    real_pack = Mosaic.pack

    def counting_pack(self: Mosaic, rois: torch.Tensor) -> torch.Tensor:
        tiled_maps.append(self.count)
        return real_pack(self, rois)

    monkeypatch.setattr(Mosaic, "pack", counting_pack)
    for head in (MaskRCNNHeads(16, (16, 16, 16), 1).eval(), _eval_bn_head(16, 3)):
        tiled_maps.clear()
        with torch.inference_mode():
            expected = head(x)
            got = fp.run_conv_stack(head, x)
            per_roi = fp.run_conv_stack(head, x, mosaic=False)
        assert tiled_maps == {1: [1], 9: [9], 37: [13, 13, 11]}[count]  # equal maps
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, per_roi, rtol=1e-4, atol=1e-4)


def test_what_is_not_tiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """GroupNorm normalises over each RoI's pixels, BatchNorm in training over the batch: the
    stack runs per RoI (tiling would change the statistics); so do strided convolutions, and
    convolutions thinner than MOSAIC_MIN_CHANNELS (tiling is slower there)."""
    monkeypatch.setattr(Mosaic, "pack", lambda *a: pytest.fail("tiled"))
    x = torch.randn(5, 8, 14, 14)
    thin = MaskRCNNHeads(8, (8, 8), 1).eval()
    group = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU()).eval()
    strided = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2)).eval()
    with torch.inference_mode():
        assert fp.MOSAIC_MIN_CHANNELS > 8
        torch.testing.assert_close(fp.run_conv_stack(thin, x), thin(x), rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(fp, "MOSAIC_MIN_CHANNELS", 8)
        for head in (group, strided, _eval_bn_head(8, 1).train()):
            torch.testing.assert_close(fp.run_conv_stack(head, x), head(x), rtol=1e-4,
                                       atol=1e-4)
