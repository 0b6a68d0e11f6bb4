"""pixelwise.models.norm.GroupNorm: torch's GroupNorm, computed on an NCHW copy."""

import pytest
import torch
from torch import nn

from pixelwise.models.norm import GroupNorm
from pixelwise.models.rcnn import norm_layer
from pixelwise.models.semantic_fpn_head import SemanticFPNHead
from pixelwise.models.solov2_head import conv_gn_relu


def _pair(groups: int, channels: int) -> tuple[GroupNorm, nn.GroupNorm]:
    ours, ref = GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(channels))
        ours.bias.copy_(torch.randn(channels))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_output_and_gradients_as_torch(channels_last: bool) -> None:
    torch.manual_seed(0)
    ours, ref = _pair(4, 8)
    x = torch.randn(2, 8, 5, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    torch.testing.assert_close(y_ours, y_ref)
    up = torch.randn_like(y_ref)
    (y_ours * up).sum().backward()
    (y_ref * up).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_normalises_each_group_of_a_channels_last_map() -> None:
    """Independent of torch's module: per sample and group of channels, mean 0 and variance 1
    (weight 1, bias 0), whatever the memory layout."""
    x = (torch.randn(3, 6, 4, 4) * torch.arange(1, 7).view(1, 6, 1, 1)).contiguous(
        memory_format=torch.channels_last)
    y = GroupNorm(2, 6, eps=0.0)(x)
    groups = y.reshape(3, 2, 3 * 16)  # (N, C, H, W) -> (N, groups, C/groups * H * W)
    torch.testing.assert_close(groups.mean(-1), torch.zeros(3, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(groups.var(-1, unbiased=False), torch.ones(3, 2))


def test_bfloat16_autocast_channels_last() -> None:
    ours, ref = _pair(4, 16)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_ref = ours(x.bfloat16()), ref(x.bfloat16())
    assert y_ours.dtype == y_ref.dtype
    torch.testing.assert_close(y_ours.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


def test_state_dicts_interchange_with_torch() -> None:
    ours, ref = _pair(2, 4)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    fresh = GroupNorm(2, 4)
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh.weight, ref.weight)


def test_models_use_it() -> None:
    assert isinstance(conv_gn_relu(8, 64)[1], GroupNorm)
    assert conv_gn_relu(8, 24)[1].num_groups == 8  # gcd(32, 24), as before
    gn = norm_layer("gn")(48)
    assert isinstance(gn, GroupNorm) and gn.num_groups == 16
    head = SemanticFPNHead(3, 16, [4, 8], ["0", "1"], channels=32)
    assert any(isinstance(m, GroupNorm) for m in head.modules())
    assert not any(type(m) is nn.GroupNorm for m in head.modules())
