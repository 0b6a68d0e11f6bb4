"""Encoders: feature maps per stage with their channels and strides (`ShapeSpec`).

`ENCODERS` names them; `make_encoder(name, in_channels, **options)` builds one.

| name | stages (stride: channels) | options |
|---|---|---|
| `plain` | 1: w, 2: 2w, ... 2^depth: 2^depth w | width, depth, padding, norm, record_indices |
| `resnet18`, `resnet34` | 2: 64, 4: 64, 8: 128, 16: 256, 32: 512 | weights |
| `resnet50` | 2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048 | weights |
| `mobilenet_v3_large` | 2: 16, 4: 24, 8: 40, 16: 112, 32: 960 | weights |

Only `plain` can record max-pool indices (`record_indices=True`), which `max_unpool` needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from pixelwise.encoders.base import Encoder, EncoderOutput, ShapeSpec
from pixelwise.encoders.plain import PlainEncoder
from pixelwise.encoders.torchvision_encoders import (
    MobileNetV3Encoder,
    ResNetEncoder,
    load_state_file,
    mobilenet_v3_large,
    resnet18,
    resnet34,
    resnet50,
)
from pixelwise.errors import UserError, unknown_name

ENCODERS: dict[str, Callable[..., Encoder]] = {
    "plain": PlainEncoder,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v3_large": mobilenet_v3_large,
}


def encoder_options(name: str) -> list[str]:
    """Keyword options of encoder `name` (beyond in_channels)."""
    if name not in ENCODERS:
        raise unknown_name("encoder", name, ENCODERS)
    params = inspect.signature(ENCODERS[name]).parameters
    return [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]


def encoders_recording_indices() -> list[str]:
    """Names of the encoders that can record max-pool indices (for `max_unpool`)."""
    return [name for name in ENCODERS if "record_indices" in encoder_options(name)]


def make_encoder(
    name: str | Callable[..., Encoder], in_channels: int = 3, **options: object
) -> Encoder:
    """Build encoder `name` (a key of ENCODERS, or a callable `f(in_channels, **options)`).
    Unknown names or options raise UserError listing the valid ones."""
    if callable(name) and not isinstance(name, str):
        return name(in_channels, **options)
    valid = encoder_options(name)
    for key in options:
        if key not in valid:
            raise UserError(
                f"encoder {name!r} has no option {key!r}; "
                f"its options: {', '.join(valid) or '(none)'}"
            )
    return ENCODERS[name](in_channels, **options)


__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderOutput",
    "MobileNetV3Encoder",
    "PlainEncoder",
    "ResNetEncoder",
    "ShapeSpec",
    "encoder_options",
    "encoders_recording_indices",
    "load_state_file",
    "make_encoder",
]
