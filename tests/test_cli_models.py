"""`pixelwise models` and `pixelwise models info`."""

from __future__ import annotations

import json

import pytest

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.models import MODELS


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in MODELS)
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(MODELS)
    assert rows[-1]["options"]["upsample"] == "bilinear"


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "models",
            "info",
            "flat_fcn",
            "--depth",
            "3",
            "--width",
            "4",
            "--size",
            "32x48",
            "--num-classes",
            "5",
            "--json",
        ]
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    # hand count: conv 3->4 (108, no bias), BN (8), 2 x [4->4 (144) + BN (8)], head 4->5 (20 + 5)
    assert info["parameters"] == 108 + 8 + 2 * (144 + 8) + 25
    # FLOPs: 2 per multiply-add over 32*48 pixels: 108 + 144 + 144 + 20 MACs per pixel
    assert info["flops"] == 2 * 32 * 48 * (108 + 144 + 144 + 20)
    assert info["receptive_field"] == 7 and info["output_stride"] == 1
    assert info["config"]["num_classes"] == 5


def test_info_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "models",
                "info",
                "unet",
                "--depth",
                "2",
                "--width",
                "4",
                "--upsample",
                "transposed,nearest",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs at 256x256" in out and "output stride     4" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "info", "resnet"], "unknown model 'resnet'; valid names: fcn16s"),
        (["models", "info", "unet", "--encoder", "vgg"], "unknown encoder 'vgg'"),
        (["models", "info", "unet", "--upsample", "cubic"], "unknown upsampler 'cubic'"),
        (
            ["models", "info", "unet", "--encoder", "resnet18", "--upsample", "max_unpool"],
            "encoders that do: plain",
        ),
    ],
)
def test_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("pixelwise: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["mask_rcnn", "keypoint_rcnn", "solov2", "panoptic_fpn"])
def test_info_detection_models(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Detectors have no analytic receptive field: the backbone + FPN's FLOPs and map strides."""
    flops = {}
    extra = ["--model-option", "num_things=2"] if name == "panoptic_fpn" else []
    for size in ("64x64", "128x128"):
        args = ["models", "info", name, "--backbone", "resnet18", "--size", size,
                "--num-classes", "3", *extra, "--json"]
        assert main(args) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["flops_of"] == "backbone+fpn" and info["feature_strides"] == [4, 8, 16, 32, 64]
        assert info["parameters"] > info["trainable_parameters"] * 0.5 > 0
        flops[size] = info["flops"]
    # convolutions only: 4x the pixels, 4x the FLOPs
    assert flops["128x128"] == 4 * flops["64x64"] > 0
    assert main(["models", "info", name, "--backbone", "resnet18", "--size", "64x64",
                 "--num-classes", "3", *extra]) == 0
    out = capsys.readouterr().out
    assert "backbone + FPN only" in out and "FPN map strides   4, 8, 16, 32, 64" in out
