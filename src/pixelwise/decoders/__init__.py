"""Decoders: each builds its upsamplers by name (`upsample=`, one name or one per stage)."""

from pixelwise.decoders.fcn import FCNDecoder
from pixelwise.decoders.segnet import SegNetDecoder
from pixelwise.decoders.unet import UNetDecoder, UNetDecoderBlock, center_crop

__all__ = ["FCNDecoder", "SegNetDecoder", "UNetDecoder", "UNetDecoderBlock", "center_crop"]
