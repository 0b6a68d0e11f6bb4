"""Every dense (semantic) model: shapes (even and odd sizes), backward, determinism, config round
trip, option travel and errors."""

from __future__ import annotations

import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.models import SEMANTIC_MODELS, build_model, model_options
from pixelwise.upsample import UPSAMPLERS

# small versions of every model, so the shared tests run in seconds
TINY: dict[str, dict] = {
    "patch_classifier": {"patch_size": 9, "width": 4, "hidden": 8},
    "flat_fcn": {"depth": 3, "width": 4},
    "fcn32s": {"width": 2, "head_channels": 8},
    "fcn16s": {"width": 2, "head_channels": 8},
    "fcn8s": {"width": 2, "head_channels": 8},
    "segnet": {"depth": 3, "width": 4},
    "unet": {"depth": 3, "width": 4},
    "semantic_fpn": {"backbone": "resnet18"},
}


def test_tiny_covers_every_dense_model() -> None:
    assert set(TINY) == set(SEMANTIC_MODELS)


@pytest.mark.parametrize("name", list(SEMANTIC_MODELS))
@pytest.mark.parametrize("size", [(64, 64), (67, 71)])
def test_shapes_and_backward(name: str, size: tuple[int, int]) -> None:
    model = build_model(name, 3, **TINY[name])
    x = torch.randn(2, 3, *size)
    y = model(x)
    assert y.shape == (2, 3, *size)
    assert y.dtype == torch.float32
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", list(SEMANTIC_MODELS))
def test_grayscale_input(name: str) -> None:
    model = build_model(name, 2, in_channels=1, **TINY[name])
    assert model(torch.randn(2, 1, 33, 35)).shape == (2, 2, 33, 35)


@pytest.mark.parametrize("name", list(SEMANTIC_MODELS))
def test_deterministic_with_seed(name: str) -> None:
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(name, 3, **TINY[name]).eval()
        outputs.append((model.state_dict(), model(torch.randn(1, 3, 40, 44))))
    (sd_a, y_a), (sd_b, y_b) = outputs
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(y_a, y_b)
    torch.manual_seed(124)
    other = build_model(name, 3, **TINY[name])
    assert any(
        not torch.equal(sd_a[k], v) for k, v in other.state_dict().items() if v.is_floating_point()
    )


@pytest.mark.parametrize("name", list(SEMANTIC_MODELS))
def test_config_rebuilds_the_model(name: str) -> None:
    model = build_model(name, 4, **TINY[name]).eval()
    config = model.config
    assert config["name"] == name and config["num_classes"] == 4
    assert set(config) == {"name", "num_classes"} | (set(model_options(name)) - {"weights"})
    rebuilt = build_model(**config).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture
    x = torch.randn(1, 3, 37, 41)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UserError, match="unknown model 'vgg'.*fcn16s.*unet"):
        build_model("vgg", 2)
    with pytest.raises(
        UserError, match="unknown encoder 'vgg16'.*mobilenet_v3_large.*plain.*resnet18"
    ):
        build_model("unet", 2, encoder="vgg16")
    with pytest.raises(UserError, match="unknown upsampler 'cubic'.*bicubic.*transposed"):
        build_model("unet", 2, upsample="cubic")
    with pytest.raises(UserError, match="has no option 'encoder'.*depth"):
        build_model("flat_fcn", 2, encoder="plain")
    with pytest.raises(UserError, match="num_classes"):
        build_model("unet", 0)


def test_max_unpool_needs_an_encoder_that_records_indices() -> None:
    for name in ("unet", "segnet"):
        with pytest.raises(UserError, match="max_unpool.*'resnet18'.*encoders that do: plain"):
            build_model(name, 2, encoder="resnet18", upsample="max_unpool")
    with pytest.raises(UserError, match="max_unpool"):
        build_model("fcn8s", 2, upsample="max_unpool")


def _decoder_upsamplers(model: torch.nn.Module) -> list[torch.nn.Module]:
    kinds = tuple(UPSAMPLERS.values())
    return [m for m in model.decoder.modules() if isinstance(m, kinds)]


# (model, its size flags, the number of upsamplers its decoder then has)
OPTION_TRAVEL = [
    ("unet", ["--depth", "3", "--width", "4"], 3),
    ("segnet", ["--depth", "3", "--width", "4"], 3),
    ("fcn32s", ["--width", "2"], 1),
    ("fcn16s", ["--width", "2"], 2),
    ("fcn8s", ["--width", "2"], 3),
]


@pytest.mark.parametrize(("name", "flags", "stages"), OPTION_TRAVEL)
def test_upsample_option_reaches_every_decoder_upsampler(
    name: str, flags: list[str], stages: int
) -> None:
    """STYLE.md's option-travel test: the CLI flag -> build_model -> decoder -> make_upsampler."""
    from pixelwise.cli import build_parser
    from pixelwise.cli.models import model_options_from_args

    args = build_parser().parse_args(
        ["models", "info", name, "--upsample", "pixel_shuffle", *flags]
    )
    options = model_options_from_args(args)
    assert options["upsample"] == "pixel_shuffle"
    model = build_model(name, 3, **options)
    ups = _decoder_upsamplers(model)
    assert len(ups) == stages
    assert all(type(u) is UPSAMPLERS["pixel_shuffle"] for u in ups)
    assert model(torch.randn(2, 3, 45, 51)).shape == (2, 3, 45, 51)


def test_one_upsampler_per_stage() -> None:
    names = ["transposed", "nearest", "pixel_shuffle"]
    model = build_model("unet", 2, depth=3, width=4, upsample=names)
    assert [type(u) for u in _decoder_upsamplers(model)] == [UPSAMPLERS[n] for n in names]
    assert model.config["upsample"] == names
    with pytest.raises(UserError, match="lists 2 upsamplers.*3 upsampling stages"):
        build_model("unet", 2, depth=3, width=4, upsample=["nearest", "bilinear"])


@pytest.mark.parametrize("upsample", list(UPSAMPLERS))
def test_unet_with_every_upsampler_at_odd_size(upsample: str) -> None:
    model = build_model("unet", 2, depth=2, width=4, upsample=upsample)
    assert model(torch.randn(1, 3, 35, 29)).shape == (1, 2, 35, 29)


def test_cli_flags_cover_every_model_option() -> None:
    from pixelwise.cli.models import MODEL_OPTION_FLAGS

    flags = {dest for _, dest, _, _ in MODEL_OPTION_FLAGS}
    # FPN-based and detection models take their many settings through --model-option KEY=VALUE
    for name in set(SEMANTIC_MODELS) - {"semantic_fpn"}:
        assert set(model_options(name)) <= flags, name
