"""torchvision ResNet-18/34/50 and MobileNetV3-Large as encoders (random init, or local weights).

Built with `weights=None`: nothing is ever downloaded. `weights=FILE` loads a local state dict
of the torchvision classification model (a `.safetensors` file, or a `torch.save`d dict read
with `torch.load(weights_only=True)`); the classifier keys (`fc.*`, `classifier.*`) are ignored.
The encoder keeps torchvision's module names, so those files load as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from pixelwise.encoders.base import Encoder, EncoderOutput, ShapeSpec
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torch file (weights_only). UserError if it
    is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, ...: one line naming the file
        raise UserError(f"cannot read weights file {str(path)!r}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(C_out, 3, k, k) pretrained kernel -> (C_out, in_channels, k, k): summed over RGB for one
    channel (a grey image is R = G = B), else repeated cyclically and scaled by 3 / in_channels."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _load_into(encoder: nn.Module, path: str | Path, first_conv: str, arch: str) -> None:
    state = load_state_file(path)
    own = encoder.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    if first_conv in state:
        state[first_conv] = _adapt_first_conv(state[first_conv], own[first_conv].shape[1])
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(
            f"weights file {str(path)!r} lacks {len(missing)} of the {len(own)} {arch} encoder "
            f"tensors (e.g. {missing[0]!r}); expected a torchvision {arch} state dict"
        )
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"weights file {str(path)!r}: {k!r} has shape {tuple(state[k].shape)}, the {arch} "
            f"encoder expects {tuple(own[k].shape)}"
        )
    encoder.load_state_dict(state)
    logger.info("loaded %d encoder tensors from %s", len(state), path)


_RESNETS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


class ResNetEncoder(Encoder):
    """torchvision ResNet without avgpool/fc. Stages: stem conv (stride 2, 64 channels), then
    layer1..layer4 (strides 4, 8, 16, 32; channels 64/128/256/512, x4 for resnet50)."""

    def __init__(
        self, arch: str, in_channels: int = 3, *, weights: str | Path | None = None
    ) -> None:
        super().__init__()
        net = _RESNETS[arch](weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        channels = [64] + [
            layer[-1].conv3.out_channels
            if hasattr(layer[-1], "conv3")
            else layer[-1].conv2.out_channels
            for layer in layers
        ]
        self.shapes = tuple(ShapeSpec(c, 2 ** (i + 1)) for i, c in enumerate(channels))
        self.arch = arch
        if weights is not None:
            _load_into(self, weights, "conv1.weight", arch)

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.layer1(self.maxpool(x))
        features.append(x)
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return EncoderOutput(features, [None] * len(features))

    def stage_paths(self) -> list[list[nn.Module]]:
        return [
            [self.conv1],
            [self.maxpool, self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4],
        ]


class MobileNetV3Encoder(Encoder):
    """torchvision MobileNetV3-Large `features`. Stages end where the resolution next halves:
    strides 2, 4, 8, 16, 32 with 16, 24, 40, 112, 960 channels. Its squeeze-excitation blocks pool
    globally, so every output depends on the whole image (receptive field "global")."""

    STAGE_ENDS = (1, 3, 6, 12, 16)  # index of the last `features` module of each stage

    def __init__(self, in_channels: int = 3, *, weights: str | Path | None = None) -> None:
        super().__init__()
        self.features = torchvision.models.mobilenet_v3_large(weights=None).features
        if in_channels != 3:
            old = self.features[0][0]
            self.features[0][0] = nn.Conv2d(
                in_channels, old.out_channels, 3, stride=2, padding=1, bias=False
            )
        self.shapes = tuple(
            ShapeSpec(self.features[end].out_channels, 2 ** (i + 1))
            for i, end in enumerate(self.STAGE_ENDS)
        )
        if weights is not None:
            _load_into(self, weights, "features.0.0.weight", "mobilenet_v3_large")

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        features = []
        ends = set(self.STAGE_ENDS)
        for i, module in enumerate(self.features):
            x = module(x)
            if i in ends:
                features.append(x)
        return EncoderOutput(features, [None] * len(features))

    def stage_paths(self) -> list[list[nn.Module]]:
        starts = (0,) + tuple(e + 1 for e in self.STAGE_ENDS[:-1])
        return [list(self.features[s : e + 1]) for s, e in zip(starts, self.STAGE_ENDS)]


def resnet18(in_channels: int = 3, *, weights: str | Path | None = None) -> ResNetEncoder:
    """ResNet-18 encoder (torchvision, random init unless `weights`)."""
    return ResNetEncoder("resnet18", in_channels, weights=weights)


def resnet34(in_channels: int = 3, *, weights: str | Path | None = None) -> ResNetEncoder:
    """ResNet-34 encoder (torchvision, random init unless `weights`)."""
    return ResNetEncoder("resnet34", in_channels, weights=weights)


def resnet50(in_channels: int = 3, *, weights: str | Path | None = None) -> ResNetEncoder:
    """ResNet-50 encoder (torchvision, random init unless `weights`)."""
    return ResNetEncoder("resnet50", in_channels, weights=weights)


def mobilenet_v3_large(
    in_channels: int = 3, *, weights: str | Path | None = None
) -> MobileNetV3Encoder:
    """MobileNetV3-Large encoder (torchvision, random init unless `weights`)."""
    return MobileNetV3Encoder(in_channels, weights=weights)
