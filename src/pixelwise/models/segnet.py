"""SegNet (Badrinarayanan et al. 2017): max-pool indices carried from encoder to decoder."""

from __future__ import annotations

from pathlib import Path

from pixelwise.decoders._upsample import UpsampleArg, needs_indices, per_stage
from pixelwise.decoders.segnet import SegNetDecoder
from pixelwise.models._encoder_options import build_encoder
from pixelwise.models.base import EncoderDecoder


def segnet(
    num_classes: int,
    in_channels: int = 3,
    *,
    encoder: str = "plain",
    depth: int | None = None,
    width: int | None = None,
    upsample: UpsampleArg = "max_unpool",
    norm: str = "batch",
    weights: str | Path | None = None,
) -> EncoderDecoder:
    """SegNet: the decoder max-unpools with the encoder's pooling indices, then densifies.

    Plain encoder recording its max-pool indices (depth 4, width 32 by default); no skip
    concatenation.
    """
    names = upsample if isinstance(upsample, (list, tuple)) else [upsample]
    record = any(needs_indices(n) for n in per_stage(names, len(names), "segnet"))
    enc = build_encoder(
        "segnet",
        encoder,
        in_channels,
        depth=depth,
        width=width,
        default_depth=4,
        default_width=32,
        norm=norm,
        weights=weights,
        record_indices=record,
    )
    dec = SegNetDecoder(enc.output_shape(), upsample=upsample, norm=norm)
    model = EncoderDecoder(enc, dec, num_classes)
    model.in_channels = in_channels
    return model
