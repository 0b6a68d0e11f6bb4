"""FCN skips: zero-initialised score layers make FCN-16s/8s start as FCN-32s."""

from __future__ import annotations

import torch

from pixelwise.models import build_model
from pixelwise.upsample import TransposedConv

OPTS = {"width": 2, "head_channels": 8}


def test_skip_scores_start_at_zero_and_learn() -> None:
    model = build_model("fcn8s", 3, **OPTS)
    assert len(model.decoder.skip_scores) == 2
    for score in model.decoder.skip_scores:
        assert score.weight.abs().sum() == 0 and score.bias.abs().sum() == 0
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(s.weight.grad.abs().sum() > 0 for s in model.decoder.skip_scores)


def test_fcn16s_and_8s_equal_fcn32s_at_init() -> None:
    """With the encoder and head of an FCN-32s and nearest upsampling (2 x 16 = 32 exactly),
    the zero skips make FCN-16s and FCN-8s compute the same function."""
    torch.manual_seed(0)
    fcn32 = build_model("fcn32s", 3, upsample="nearest", **OPTS).eval()
    x = torch.randn(2, 3, 64, 96)
    for name in ("fcn16s", "fcn8s"):
        other = build_model(name, 3, upsample="nearest", **OPTS).eval()
        missing, unexpected = other.load_state_dict(fcn32.state_dict(), strict=False)
        assert unexpected == [] and all("skip_scores" in k for k in missing)
        torch.testing.assert_close(other(x), fcn32(x))
        with torch.no_grad():  # and the skips do matter once they are non-zero
            other.decoder.skip_scores[0].bias.fill_(1.0)
        assert not torch.allclose(other(x), fcn32(x))


def test_default_upsamplers_are_bilinear_transposed_and_final_is_fixed() -> None:
    model = build_model("fcn8s", 3, **OPTS)
    ups = [*model.decoder.upsamplers, model.decoder.final]
    assert [u.scale for u in ups] == [2, 2, 8]
    assert all(isinstance(u, TransposedConv) and u.init == "bilinear" for u in ups)
    assert all(p.requires_grad for u in ups[:-1] for p in u.parameters())
    assert not any(p.requires_grad for p in ups[-1].parameters())  # "fixed to bilinear"
    assert [f"fcn{s}s" for s in (32, 16, 8)] == ["fcn32s", "fcn16s", "fcn8s"]
