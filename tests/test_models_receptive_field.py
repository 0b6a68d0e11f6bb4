"""Analytic receptive fields against the gradient of one output pixel."""

from __future__ import annotations

import pytest

from pixelwise.models import build_model
from pixelwise.models.receptive_field import (
    GLOBAL,
    Layer,
    compose,
    empirical_receptive_field,
    receptive_field,
)


def test_compose_hand_cases() -> None:
    from fractions import Fraction

    assert compose([Layer(3)] * 4).size == 9  # four 3x3 convs
    assert compose([Layer(3), Layer(2, Fraction(2)), Layer(3)]).size == 8  # 3 + 1, then 2 * 2
    rf = compose([Layer(2, Fraction(2)), Layer(1, Fraction(1, 2))])  # pool then nearest x2
    assert (rf.size, rf.output_stride) == (2, 2)
    assert compose([Layer(3), GLOBAL]).size is None


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("flat_fcn", {"depth": 3, "width": 4}),
        ("flat_fcn", {"depth": 2, "width": 4, "kernel_size": 5, "dilation": 3}),
        ("patch_classifier", {"patch_size": 15, "width": 4, "hidden": 4}),
        ("patch_classifier", {"patch_size": 33, "width": 4, "hidden": 4}),
    ],
)
def test_chain_models_exact(name: str, options: dict) -> None:
    model = build_model(name, 2, **options)
    rf = receptive_field(model)
    assert rf.output_stride == 1
    assert empirical_receptive_field(model, (48, 48)) == (rf.size, rf.size)
    if name == "flat_fcn":
        assert rf.size == 1 + options["depth"] * (options.get("kernel_size", 3) - 1) * options.get(
            "dilation", 1
        )
    else:
        assert rf.size == options["patch_size"]


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "bicubic"])
def test_unet_bound_is_reached(upsample: str) -> None:
    """For U-Net the analytic value is an upper bound; over one period of pixel positions (the
    output stride) some output pixel sees exactly that many input pixels."""
    model = build_model("unet", 2, depth=2, width=2, upsample=upsample)
    rf = receptive_field(model)
    assert rf.output_stride == 4
    seen = [
        empirical_receptive_field(model, (72, 72), position=(34 + i, 34 + i))
        for i in range(rf.output_stride)
    ]
    assert max(max(s) for s in seen) == rf.size


@pytest.mark.parametrize(("stem", "output_upsample"), [("pool", "bilinear"),
                                                        ("unshuffle", "bilinear"),
                                                        ("pool", "joint_bilateral")])
def test_unet_input_scale_bound_is_reached(stem: str, output_upsample: str) -> None:
    """input_scale 1/2: the pool (or unshuffle: the same 2 x 2 blocks) and the final bilinear x 2
    (or joint bilateral: a window of 2r + 1 cells) join the path (output stride x 2); the bound
    is still reached over one period of positions."""
    model = build_model("unet", 2, depth=2, width=2, input_scale=0.5, input_stem=stem,
                        output_upsample=output_upsample)
    rf = receptive_field(model)
    assert rf.output_stride == 8
    seen = [empirical_receptive_field(model, (160, 160), position=(76 + i, 76 + i))
            for i in range(rf.output_stride)]
    assert max(max(s) for s in seen) == rf.size


def test_torchvision_encoders_rf() -> None:
    assert receptive_field(build_model("unet", 2, encoder="mobilenet_v3_large")).size is None
    rf = receptive_field(build_model("fcn32s", 2, encoder="resnet18"))
    assert rf.output_stride == 32 and rf.size > 400
