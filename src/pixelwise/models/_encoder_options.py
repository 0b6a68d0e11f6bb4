"""The encoder options a model builder passes on (validated once, here, at the edge)."""

from __future__ import annotations

from pathlib import Path

from pixelwise.encoders import ENCODERS, Encoder, encoders_recording_indices, make_encoder
from pixelwise.errors import UserError, check_positive_int, unknown_name


def build_encoder(
    model: str,
    encoder: str,
    in_channels: int,
    *,
    depth: int | None,
    width: int | None,
    default_depth: int,
    default_width: int,
    padding: str = "same",
    norm: str = "batch",
    weights: str | Path | None = None,
    record_indices: bool = False,
) -> Encoder:
    """Build `encoder` for `model`; options that do not apply to it are a UserError."""
    if not isinstance(encoder, str) or encoder not in ENCODERS:
        raise unknown_name("encoder", encoder, ENCODERS)
    check_positive_int(f"{model}: in_channels", in_channels)
    if record_indices and encoder not in encoders_recording_indices():
        raise UserError(
            f"{model}: upsample 'max_unpool' needs max-pool indices, which encoder {encoder!r} "
            f"does not record; encoders that do: {', '.join(encoders_recording_indices())}"
        )
    if encoder == "plain":
        if weights is not None:
            raise UserError(
                f"{model}: weights= loads torchvision encoders; encoder 'plain' has none"
            )
        return make_encoder(
            "plain",
            in_channels,
            depth=default_depth if depth is None else depth,
            width=default_width if width is None else width,
            padding=padding,
            norm=norm,
            record_indices=record_indices,
        )
    given = [name for name, value in (("depth", depth), ("width", width)) if value is not None]
    if given:
        raise UserError(
            f"{model}: option {given[0]} applies to encoder 'plain' only, not {encoder!r}"
        )
    if padding != "same":
        raise UserError(
            f"{model}: padding {padding!r} needs encoder 'plain' (torchvision encoders pad)"
        )
    return make_encoder(encoder, in_channels, weights=weights)
