"""Conv-BN folding and the inference copy give the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pixelwise.decoders.unet import NearestUpConcatConv
from pixelwise.models import build_model
from pixelwise.models.fold import fold_batchnorm, optimize_for_inference


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random BN affine parameters, running stats from one batch (momentum 1): every layer then
    works at unit scale, so a wrong fold would show at the output. Returns the model in eval."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("unet", {"encoder": "resnet18", "upsample": "nearest"}),
        ("unet", {"depth": 2, "width": 4, "upsample": "transposed"}),
        ("segnet", {"depth": 2, "width": 4}),
        ("unet", {"encoder": "mobilenet_v3_large", "decoder_channels": [16, 8, 8, 8, 8]}),
        ("flat_fcn", {"depth": 3, "width": 8}),
    ],
)
def test_fold_batchnorm_equal_outputs(name: str, options: dict) -> None:
    x = torch.randn(2, 3, 64, 64) if name == "unet" else torch.randn(2, 3, 45, 51)
    model = _calibrate(build_model(name, 3, **options), x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        expected = model(x)
        fast = optimize_for_inference(model)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn > 0  # untouched
    if options.get("upsample") == "nearest":  # resnet18 U-Net: 5 blocks, the last without skip
        assert sum(isinstance(m, NearestUpConcatConv) for m in fast.modules()) == 5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (45, 51)])
def test_subpixel_fusion_equals_nearest_concat_conv(size: tuple[int, int]) -> None:
    """64x64: every block takes the sub-pixel path; 45x51: odd skips fall back to the original.
    (The resnet18 case above also covers the last block, which has no skip.)"""
    x = torch.randn(2, 3, *size)
    model = _calibrate(build_model("unet", 3, depth=3, width=4, upsample="nearest"), x)
    fast = optimize_for_inference(model, channels_last=False)
    assert sum(isinstance(m, NearestUpConcatConv) for m in fast.modules()) == 3
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    again = optimize_for_inference(fast)  # idempotent
    assert sum(isinstance(m, NearestUpConcatConv) for m in again.modules()) == 3


def test_fold_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(build_model("flat_fcn", 2, depth=1, width=2).train())


def test_subpixel_rewrite_keeps_the_models_dtype() -> None:
    """The rewrite's new convs take the original weights' dtype and device (a float64 model here;
    a model on a GPU likewise, tests/test_cuda.py)."""
    model = build_model("unet", 3, width=8, depth=2, upsample="nearest").double().eval()
    fast = optimize_for_inference(model, channels_last=False)
    assert any(isinstance(m, NearestUpConcatConv) for m in fast.modules())
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-9)
