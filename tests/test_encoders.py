"""Encoders: the channels and strides they report are the ones they produce; local weights load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

from pixelwise.encoders import ENCODERS, encoders_recording_indices, make_encoder
from pixelwise.errors import UserError
from pixelwise.models.receptive_field import compose, layers_of

SMALL = {"plain": {"width": 4, "depth": 3}}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_reported_shapes_match_features(name: str) -> None:
    """Channels and strides of output_shape() are those of the features (even and odd sizes),
    and the modules listed for the receptive-field arithmetic compose to the same strides."""
    enc = make_encoder(name, 3, **SMALL.get(name, {})).eval()
    shapes = enc.output_shape()
    for size in [(64, 64), (67, 71)]:
        with torch.no_grad():
            feats = enc(torch.randn(1, 3, *size))
        assert len(feats) == len(shapes)
        for f, spec in zip(feats, shapes):
            assert f.shape[1] == spec.channels
            # floor (max-pool) or ceil (padded strided conv) of H / stride
            for n, m in zip(size, f.shape[-2:]):
                assert m in (n // spec.stride, math.ceil(n / spec.stride))
    assert (
        enc.strides == sorted(enc.strides)
        and enc.strides[-1] == 2 ** (len(shapes) - 1) * enc.strides[0]
    )
    paths = enc.stage_paths()
    for i, spec in enumerate(shapes):
        layers = layers_of([m for stage in paths[: i + 1] for m in stage])
        assert compose(layers).output_stride == spec.stride


@pytest.mark.parametrize("name", ["plain", "resnet18", "mobilenet_v3_large"])
def test_one_input_channel(name: str) -> None:
    enc = make_encoder(name, 1, **SMALL.get(name, {}))
    assert enc(torch.randn(2, 1, 32, 32))[-1].shape[1] == enc.output_shape()[-1].channels


def test_only_plain_records_indices() -> None:
    assert encoders_recording_indices() == ["plain"]
    enc = make_encoder("plain", 3, width=4, depth=2, record_indices=True)
    out = enc.forward_features(torch.randn(1, 3, 16, 16))
    assert out.indices[0] is None
    for i in (1, 2):  # indices into the previous stage's planes, shape of the pooled map
        assert out.indices[i].shape == (
            1,
            out.features[i - 1].shape[1],
            *out.features[i].shape[-2:],
        )
        assert out.indices[i].max() < out.features[i - 1].shape[-1] * out.features[i - 1].shape[-2]


def test_bad_names_and_options() -> None:
    with pytest.raises(UserError, match="unknown encoder 'vgg'.*plain"):
        make_encoder("vgg")
    with pytest.raises(UserError, match="encoder 'resnet18' has no option 'width'"):
        make_encoder("resnet18", 3, width=8)


@pytest.mark.parametrize(
    ("name", "factory", "first", "fmt"),
    [
        ("resnet18", torchvision.models.resnet18, "conv1.weight", "safetensors"),
        ("resnet18", torchvision.models.resnet18, "conv1.weight", "pth"),
        ("mobilenet_v3_large", torchvision.models.mobilenet_v3_large, "features.0.0.weight", "pth"),
    ],
)
def test_local_weights_load(tmp_path: Path, name: str, factory, first: str, fmt: str) -> None:
    torch.manual_seed(7)
    state = factory(weights=None).state_dict()  # a torchvision classification state dict (with fc)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    enc = make_encoder(name, 3, weights=str(path))
    own = enc.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    grey = make_encoder(name, 1, weights=str(path))  # RGB kernel summed for one channel
    torch.testing.assert_close(grey.state_dict()[first], state[first].sum(1, keepdim=True))


def test_bad_weight_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        make_encoder("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        make_encoder("resnet18", 3, weights=str(junk))
    state = torchvision.models.resnet18(weights=None).state_dict()
    other = tmp_path / "wrong_shape.pth"
    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, other)
    with pytest.raises(UserError, match="'layer1.0.conv1.weight' has shape"):
        make_encoder("resnet18", 3, weights=str(other))
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, partial)
    with pytest.raises(UserError, match="lacks .* resnet18"):
        make_encoder("resnet18", 3, weights=str(partial))
