"""SegNet carries the encoder's max-pool indices to the decoder's unpooling."""

from __future__ import annotations

import torch

from pixelwise.models import build_model
from pixelwise.upsample import MaxPoolWithIndices, MaxUnpool


def test_decoder_unpools_where_the_encoder_pooled() -> None:
    model = build_model("segnet", 2, depth=2, width=4).eval()
    assert model.encoder.records_indices
    assert all(isinstance(p, MaxPoolWithIndices) for p in model.encoder.pools)
    assert all(isinstance(u, MaxUnpool) for u in model.decoder.upsamplers)
    seen = {}
    model.decoder.upsamplers[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    x = torch.randn(1, 3, 30, 34)
    with torch.no_grad():
        out = model.encoder.forward_features(x)
        model(x)
    idx = out.indices[-1]  # (1, C, 7, 8): positions in the 15 x 17 stage-1 map
    unpooled = seen["out"]  # (1, C, 15, 17)
    assert unpooled.shape[-2:] == out.features[1].shape[-2:]
    allowed = torch.zeros_like(unpooled, dtype=torch.bool).flatten(2)
    allowed.scatter_(2, idx.flatten(2), True)
    nonzero = unpooled.flatten(2) != 0
    assert nonzero.any() and not (nonzero & ~allowed).any()


def test_segnet_without_indices() -> None:
    model = build_model("segnet", 2, depth=2, width=4, upsample="bilinear")
    assert not model.encoder.records_indices
    assert model(torch.randn(1, 3, 31, 33)).shape == (1, 2, 31, 33)
    model = build_model("segnet", 2, encoder="resnet18", upsample="nearest")
    assert model(torch.randn(1, 3, 31, 33)).shape == (1, 2, 31, 33)
