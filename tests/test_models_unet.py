"""U-Net: the paper's 572 -> 388 shapes and overlap-tile prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.models import build_model
from pixelwise.models.tiling import mirror_pad, overlap_tile
from pixelwise.models.unet import valid_output_size
from pixelwise.ops.joint_bilateral import joint_bilateral_upsample


def test_paper_shapes_572_to_388() -> None:
    # REFERENCES.md: 572->570->568 | 284->280 | 140->136 | 68->64 | 32->28 -> 56->52 -> ... -> 388
    assert valid_output_size(572, depth=4) == 388
    assert [n for n in range(100, 300) if valid_output_size(n, 4) is not None][:3] == [
        188,
        204,
        220,
    ]
    assert all(
        (n - 12) % 16 == 0 and valid_output_size(n, 4) == n - 184
        for n in range(188, 700)
        if valid_output_size(n, 4) is not None
    )
    model = build_model("unet", 2, padding="valid", width=2, upsample="transposed")
    assert model.border == 92
    with torch.no_grad():
        feats = model.encoder(torch.zeros(1, 3, 572, 572))
        assert [f.shape[-1] for f in feats] == [568, 280, 136, 64, 28]
        assert model.forward_valid(torch.zeros(1, 3, 572, 572)).shape == (1, 2, 388, 388)
    with pytest.raises(UserError, match="not valid.*nearest valid: 572"):
        model.forward_valid(torch.zeros(1, 3, 570, 572))


def _calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BN running stats set to one batch's statistics, so every level of the net (the deep,
    pooled ones too) contributes at unit scale: a misaligned pooling then shows."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.mark.parametrize("upsample", ["transposed", "nearest"])
def test_overlap_tile_equals_one_pass(upsample: str) -> None:
    """Valid-mode prediction of an arbitrary-size image by overlapping tiles equals one pass over
    the mirror-padded image (border-free upsamplers; tiles aligned to the output stride)."""
    opts = {"depth": 3, "width": 4, "padding": "valid", "upsample": upsample}
    x = torch.rand(1, 3, 67, 71)  # 2 x 2 tiles
    whole = _calibrated(build_model("unet", 3, **opts), x)
    # tile 140 -> output 52; tiles step by 48 (a multiple of the stride 8), overlapping by 4
    assert valid_output_size(140, depth=3) == 52
    tiled = build_model("unet", 3, tile=140, **opts).eval()
    tiled.load_state_dict(whole.state_dict())
    with torch.no_grad():
        a, b = whole(x), tiled(x)
        # the same tiles stepping by 52 (not a multiple of 8) pool with another phase
        misaligned = overlap_tile(whole.forward_valid, x, border=whole.border, tile=140, align=1)
    assert a.shape == b.shape == (1, 3, 67, 71)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - misaligned).abs().max() > 0.01


def test_bad_tile_size() -> None:
    with pytest.raises(UserError, match="tile 61 is not a valid input size"):
        build_model("unet", 2, depth=2, width=4, padding="valid", tile=61)
    with pytest.raises(UserError, match="padding 'valid' needs encoder 'plain'"):
        build_model("unet", 2, encoder="resnet18", padding="valid")


def test_mirror_pad_matches_torch_and_numpy() -> None:
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).view(1, 2, 5, 4)
    torch.testing.assert_close(mirror_pad(x, (1, 3, 2, 4)), F.pad(x, (1, 3, 2, 4), mode="reflect"))
    big = mirror_pad(x, (9, 11, 13, 7))  # wider than the image: numpy's repeated reflection
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (13, 7), (9, 11)), mode="reflect")
    np.testing.assert_array_equal(big.numpy(), ref)


def test_input_scale_runs_the_network_on_the_pooled_image() -> None:
    """input_scale 1/2 on an image whose pixels come in 2x2 blocks (`y` repeated): the pool gives
    `y` back exactly, so the output is the plain network on `y`, its logits bilinearly upsampled
    x 2 (align_corners False). Odd sizes keep their shape (edge-replicated, then cropped)."""
    torch.manual_seed(0)
    half = build_model("unet", num_classes=3, width=4, depth=2, input_scale=0.5).eval()
    y = torch.rand(2, 3, 12, 16, dtype=torch.float64)
    x = y.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # (2, 3, 24, 32)
    half.double()
    with torch.no_grad():
        inner = super(type(half), half).forward(y)  # the U-Net without the scaling
        expected = F.interpolate(inner, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(half(x), expected, rtol=0, atol=1e-12)
        assert half(torch.rand(1, 3, 37, 50, dtype=torch.float64)).shape == (1, 3, 37, 50)
    assert half.config["input_scale"] == 0.5


def test_unshuffle_stem_runs_the_network_on_the_stacked_blocks() -> None:
    """input_stem "unshuffle": the encoder sees each 2x2 block's pixels as 4 x C channels
    (channel c * 4 + 2i + j holds pixel (2r + i, 2s + j) of channel c, stacked by a hand loop),
    its logits upsampled x 2 as with the pool."""
    torch.manual_seed(0)
    model = build_model("unet", num_classes=3, width=4, depth=2, input_scale=0.5,
                        input_stem="unshuffle").eval().double()
    assert next(model.encoder.parameters()).shape[1] == 12 and model.in_channels == 3
    x = torch.rand(2, 3, 24, 32, dtype=torch.float64)
    stacked = torch.empty(2, 12, 12, 16, dtype=torch.float64)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                stacked[:, c * 4 + 2 * i + j] = x[:, c, i::2, j::2]
    with torch.no_grad():
        inner = super(type(model), model).forward(stacked)
        expected = F.interpolate(inner, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
        assert model(torch.rand(1, 3, 37, 50, dtype=torch.float64)).shape == (1, 3, 37, 50)
    assert model.config["input_stem"] == "unshuffle"


def test_unshuffle_stem_sees_what_the_pool_averages_away() -> None:
    """Swapping the pixels inside every 2x2 block (the mirror image of each block) leaves the
    pool's output unchanged and changes the unshuffle stem's: only the latter can tell shapes
    smaller than a block apart."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    swapped = x.clone()
    swapped[..., 0::2], swapped[..., 1::2] = x[..., 1::2], x[..., 0::2]
    with torch.no_grad():
        for stem, same in (("pool", True), ("unshuffle", False)):
            model = build_model("unet", num_classes=2, width=4, depth=2, input_scale=0.5,
                                input_stem=stem).eval()
            assert torch.allclose(model(x), model(swapped), atol=1e-6) is same, stem


def test_joint_bilateral_output_upsample() -> None:
    """output_upsample "joint_bilateral": the network's own logits, guided up by the
    edge-replicated image (`joint_bilateral_upsample` with the model's sigmas), then cropped;
    `set_output_upsample` switches to the bilinear logits of the same weights and back."""
    torch.manual_seed(0)
    model = build_model("unet", num_classes=3, width=4, depth=2, input_scale=0.25,
                        output_upsample="joint_bilateral", guide_sigma_color=0.2,
                        guide_radius=1).eval()
    x = torch.rand(2, 3, 30, 22) * 0.2  # not multiples of 4: replicated to 32 x 24, cropped
    x[..., 9:] += 0.8  # an edge inside the third column of 4 x 4 blocks
    model.head.weight.data.mul_(1000)  # a random tiny net's logits hardly vary otherwise
    with torch.no_grad():
        guided = model(x)
        model.coarse_output = True
        coarse = model(x)  # (2, 3, 8, 6)
        model.coarse_output = False
        padded = F.pad(x, (0, 2, 0, 2), mode="replicate")
        expected = joint_bilateral_upsample(coarse, padded, 4, sigma_color=0.2, sigma_space=2.0,
                                            radius=1)[..., :30, :22]
        torch.testing.assert_close(guided, expected, rtol=0, atol=0)
        model.set_output_upsample("bilinear")
        bilinear = model(x)
        expected = F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)
        torch.testing.assert_close(bilinear, expected[..., :30, :22], rtol=0, atol=0)
        assert not torch.allclose(guided, bilinear, atol=0.1)
        model.set_output_upsample("joint_bilateral")
        torch.testing.assert_close(model(x), guided, rtol=0, atol=0)
    assert model.config["output_upsample"] == "joint_bilateral"
    assert model.config["guide_radius"] == 1


def test_output_upsample_refusals() -> None:
    with pytest.raises(UserError, match="'joint_bilateral' needs input_scale < 1"):
        build_model("unet", num_classes=2, width=4, depth=2, output_upsample="joint_bilateral")
    with pytest.raises(UserError, match="unknown unet output_upsample 'nearest'"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=0.5,
                    output_upsample="nearest")
    with pytest.raises(UserError, match="guide_sigma_color and guide_sigma_space must be > 0"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=0.5,
                    output_upsample="joint_bilateral", guide_sigma_color=0)
    with pytest.raises(UserError, match="guide_radius an integer >= 0, got 0.075, 2.0, 1.5"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=0.5,
                    output_upsample="joint_bilateral", guide_radius=1.5)
    model = build_model("unet", num_classes=2, width=4, depth=2)
    with pytest.raises(UserError, match="needs input_scale < 1"):
        model.set_output_upsample("joint_bilateral")


def test_input_scale_refusals() -> None:
    with pytest.raises(UserError, match="input_scale must be 1/k"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=0.3)
    with pytest.raises(UserError, match="input_scale must be 1/k"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=2)
    with pytest.raises(UserError, match="applies to padding 'same' only"):
        build_model("unet", num_classes=2, width=4, depth=2, padding="valid", input_scale=0.5)
    with pytest.raises(UserError, match="input_scale must be 1/k"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=1e-9,
                    input_stem="unshuffle")  # refused before a 1e18-channel conv is built
    with pytest.raises(UserError, match="input_stem.*pool, unshuffle"):
        build_model("unet", num_classes=2, width=4, depth=2, input_scale=0.5, input_stem="max")
    with pytest.raises(UserError, match="weights with input_stem 'unshuffle'"):
        build_model("unet", num_classes=2, encoder="resnet18", input_scale=0.5,
                    input_stem="unshuffle", weights="any.safetensors")
