"""Tiled inference (`pixelwise.predict.tiling`) equals one pass over the whole image."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pixelwise.errors import UserError
from pixelwise.models import build_model
from pixelwise.models.receptive_field import receptive_field
from pixelwise.models.tiling import mirror_pad
from pixelwise.predict.tiling import (
    min_overlap,
    predict_padded,
    predict_tiled,
    tile_count,
    tile_spans,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval-mode batch norms with non-trivial running statistics (not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def tiny(name: str, **options) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = build_model(name, num_classes=3, **options)
        return _randomise_norms(model).eval().double()
    return make


# name -> (model factory, image (H, W), tile): images span several tiles in both directions
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, int], int]] = {
    "flat_fcn_odd_size": (tiny("flat_fcn", depth=3, width=8), (67, 71), 24),
    "patch_classifier_reflect": (tiny("patch_classifier", patch_size=9, width=8, hidden=8,
                                      pad_mode="reflect"), (50, 43), 20),
    "unet_same": (tiny("unet", width=4, depth=2), (132, 120), 80),
    "unet_valid": (tiny("unet", width=4, depth=2, padding="valid"), (132, 120), 96),
    "unet_half_scale": (tiny("unet", width=4, depth=2, input_scale=0.5), (264, 240), 192),
    "unet_quarter_scale_guided": (tiny("unet", width=4, depth=2, input_scale=0.25,
                                       output_upsample="joint_bilateral"), (400, 368), 288),
    "segnet": (tiny("segnet", width=4, depth=2), (140, 136), 88),
}


def test_tile_spans_hand_computed() -> None:
    # length 10, tile 4, overlap 2: starts 0, 2, 4, 6; cuts in the middle of each overlap
    assert tile_spans(10, 4, 2) == [(0, 0, 3), (2, 3, 5), (4, 5, 7), (6, 7, 10)]
    # aligned to 4: step (12 - 3) // 4 * 4 = 8; the last tile is clamped to end at 24
    assert tile_spans(24, 12, 3, align=4) == [(0, 0, 10), (8, 10, 16), (12, 16, 24)]
    assert tile_spans(7, 16, 4) == [(0, 0, 7)]  # fits: one tile of the whole length


@pytest.mark.parametrize("length,tile,overlap,align", [(100, 30, 10, 1), (96, 32, 12, 8),
                                                        (33, 10, 9, 1), (64, 16, 0, 4)])
def test_tile_spans_partition_the_length_with_margins(length, tile, overlap, align) -> None:
    spans = tile_spans(length, tile, overlap, align)
    assert spans[0][1] == 0 and spans[-1][2] == length
    for (_, _, end), (_, nxt, _) in zip(spans, spans[1:]):
        assert end == nxt  # kept ranges are contiguous and disjoint
    for i, (start, keep_from, keep_to) in enumerate(spans):
        assert start % align == 0 and start + tile <= length
        if i > 0:
            assert keep_from - start >= overlap // 2  # inner edges: at least half the overlap
        if i < len(spans) - 1:
            assert start + tile - keep_to >= overlap // 2


@pytest.mark.parametrize("case", list(CASES))
def test_tiled_equals_whole_image_when_the_overlap_covers_the_receptive_field(case: str) -> None:
    make, (h, w), tile = CASES[case]
    model = make()
    overlap = min_overlap(model)
    assert overlap is not None and overlap < tile
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stride = receptive_field(model).output_stride
    assert tile_count(h, w, tile, overlap, stride) >= 4  # really tiled, in both directions
    with torch.no_grad():
        whole = model(x)
    tiled = predict_tiled(model, x, tile, overlap, batch_size=3)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-10)
    assert torch.equal(tiled.argmax(1), whole.argmax(1))


@pytest.mark.parametrize("case", ["flat_fcn_odd_size", "unet_same"])
def test_too_small_an_overlap_shows_the_tile_borders(case: str) -> None:
    make, (h, w), tile = CASES[case]
    model = make()
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        whole = model(x)
    tiled = predict_tiled(model, x, tile, 0)
    assert (tiled - whole).abs().max() > 1e-6


def test_float32_tiles_match_within_rounding() -> None:
    make, (h, w), tile = CASES["unet_same"]
    model = make().float()
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(x)
    tiled = predict_tiled(model, x, tile, min_overlap(model))
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(101, 90), (50, 150)])  # the second fits one tile in height
def test_a_size_off_the_stride_equals_the_pass_over_the_mirror_padded_image(size) -> None:
    model = CASES["unet_same"][0]()
    h, w = size  # not multiples of the output stride 4
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        reference = model(mirror_pad(x, (0, (-w) % 4, 0, (-h) % 4)))[..., :h, :w]
        unpadded = model(x)
    padded = predict_padded(model, x)
    torch.testing.assert_close(padded, reference, rtol=0, atol=0)
    assert (padded - unpadded).abs().max() > 1e-6  # the padding matters: odd sizes resample
    tiled = predict_tiled(model, x, 64, min_overlap(model))
    torch.testing.assert_close(tiled, reference, rtol=0, atol=1e-10)


def test_predict_padded_is_the_plain_pass_at_multiples_of_the_stride() -> None:
    model = CASES["unet_same"][0]()
    x = torch.rand(2, 3, 36, 44, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(predict_padded(model, x), model(x))


@pytest.mark.parametrize("case", ["unet_same", "segnet"])
def test_min_overlap_covers_the_empirical_reach_of_every_pixel_phase(case: str) -> None:
    """Gradient of one output pixel w.r.t. the input, at every phase of the output stride: the
    furthest input pixel it depends on is within min_overlap // 2 on either side."""
    model = CASES[case][0]()
    rf = receptive_field(model)
    n = 2 * rf.size + 16
    reach = 0
    for p in range(n // 2, n // 2 + rf.output_stride):
        x = torch.rand(1, 3, n, 24, dtype=torch.float64, requires_grad=True)
        model(x)[0, :, p, 12].sum().backward()
        rows = torch.nonzero(x.grad[0].abs().sum((0, 2)) > 0).flatten()  # (C, H, W) -> H
        reach = max(reach, p - int(rows[0]), int(rows[-1]) - p)
    assert reach <= min_overlap(model) // 2


def test_bad_arguments_are_user_errors() -> None:
    model = CASES["flat_fcn_odd_size"][0]()
    x = torch.rand(1, 3, 40, 40, dtype=torch.float64)
    with pytest.raises(UserError, match="pad mode"):
        predict_tiled(model, x, 16, 4, pad_mode="wrap")
    with pytest.raises(UserError, match="no step"):
        predict_tiled(model, x, 16, 16)
    with pytest.raises(UserError, match="N, C, H, W"):
        predict_tiled(model, x[0], 16, 4)
