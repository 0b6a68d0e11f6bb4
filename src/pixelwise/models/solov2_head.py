"""SOLOv2's three branches (Wang et al. 2020, Fig. 2): category, kernel, unified mask features.

* `SOLOv2Head` -- on each FPN level, resized to an S x S grid: the **category branch** predicts
  per grid cell the class scores (N, K, S, S) (K = things, no background channel) and the
  **kernel branch** a dynamic 1x1 kernel (N, E, S, S). Both are `stacked_convs` x (3x3 conv,
  GroupNorm, ReLU) shared over the levels; the kernel branch sees CoordConv inputs (normalised
  x, y in [-1, 1] appended as two channels), as in the paper and official code.
* `MaskFeatureBranch` -- fuses FPN levels P2..P5 into one map at 1/4 resolution (N, E, H/4, W/4):
  level i gets i stages of (3x3 conv, GroupNorm, ReLU, 2x upsampling), the level-0 map one conv,
  the deepest level CoordConv inputs; the maps are summed and a 1x1 conv (+ GroupNorm, ReLU)
  gives E channels. The paper upsamples bilinearly; here the upsampler is chosen by name from
  `pixelwise.upsample` (`upsample`), each step to the next finer level's exact size.

A mask is then sigmoid(kernel . features): the E-vector of a grid cell dotted with the feature
map at every pixel (a 1x1 convolution with a per-instance kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.decoders._upsample import needs_indices, per_stage
from pixelwise.errors import UserError
from pixelwise.models.norm import GroupNorm
from pixelwise.upsample import make_upsampler


def coord_features(x: torch.Tensor) -> torch.Tensor:
    """CoordConv channels for x (N, C, H, W): (N, 2, H, W), x then y, linspace(-1, 1)."""
    n, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([xx, yy]).expand(n, 2, h, w)  # (2, H, W) -> (N, 2, H, W)


def with_coords(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C + 2, H, W) with the CoordConv channels appended."""
    return torch.cat([x, coord_features(x)], dim=1)


def conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int = 3,
                 num_groups: int = 32) -> nn.Sequential:
    """conv (no bias) -> GroupNorm (groups reduced to a divisor of the channels) -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        GroupNorm(math.gcd(num_groups, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class SOLOv2Head(nn.Module):
    """Category and kernel branches over the grids of several levels (shared weights).

    Args:
        num_things: K, the category channels (dataset classes without background).
        in_channels: channels of every FPN level (torchvision's FPN: 256).
        grid_sizes: S per level, e.g. (40, 36, 24, 16, 12).
        channels: tower width (official 512).
        stacked_convs: convs per tower (official 4).
        kernel_channels: E, the dynamic kernel length (= the mask feature channels).
        prior: initial foreground probability of the category branch (focal-loss init, 0.01).
    """

    def __init__(self, num_things: int, in_channels: int, grid_sizes: Sequence[int], *,
                 channels: int = 512, stacked_convs: int = 4, kernel_channels: int = 256,
                 num_groups: int = 32, prior: float = 0.01) -> None:
        super().__init__()
        self.grid_sizes = tuple(int(s) for s in grid_sizes)
        self.kernel_channels = kernel_channels
        self.cate_tower = nn.Sequential(*(
            conv_gn_relu(in_channels if i == 0 else channels, channels, num_groups=num_groups)
            for i in range(stacked_convs)))
        self.kernel_tower = nn.Sequential(*(
            conv_gn_relu(in_channels + 2 if i == 0 else channels, channels, num_groups=num_groups)
            for i in range(stacked_convs)))
        last = channels if stacked_convs else in_channels
        self.cate_out = nn.Conv2d(last, num_things, 3, padding=1)
        self.kernel_out = nn.Conv2d(last + (0 if stacked_convs else 2), kernel_channels, 3,
                                    padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cate_out.bias, -math.log((1 - prior) / prior))

    def forward(self, levels: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """levels: one (N, C, h, w) map per grid size. Returns category logits, one
        (N, K, S, S) per level, and kernels, one (N, E, S, S) per level."""
        if len(levels) != len(self.grid_sizes):
            raise UserError(f"SOLOv2 head: {len(levels)} feature levels for "
                            f"{len(self.grid_sizes)} grid sizes")
        cates, kernels = [], []
        for x, s in zip(levels, self.grid_sizes):
            x = F.interpolate(with_coords(x), size=(s, s), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_out(self.kernel_tower(x)))  # (N, E, S, S)
            cates.append(self.cate_out(self.cate_tower(x[:, :-2])))  # (N, K, S, S), no coords
        return cates, kernels


class MaskFeatureBranch(nn.Module):
    """Unified mask features at the finest level's resolution (SOLOv2's MaskFeatHead).

    Args:
        in_channels: channels of the FPN levels.
        num_levels: how many levels are fused, finest first (official: 4, P2..P5).
        channels: width of the per-level stages (official 128).
        out_channels: E, the feature channels the dynamic kernels are dotted with.
        upsample: an upsampler name of `pixelwise.upsample.UPSAMPLERS` or a factory (paper:
            bilinear); `max_unpool` is refused (an FPN keeps no pooling indices).
    """

    def __init__(self, in_channels: int = 256, num_levels: int = 4, *, channels: int = 128,
                 out_channels: int = 256, upsample: str | Callable[..., nn.Module] = "bilinear",
                 num_groups: int = 32) -> None:
        super().__init__()
        name = per_stage(upsample, 1, "SOLOv2 mask feature branch")[0]
        if needs_indices(name):
            raise UserError("SOLOv2 mask feature branch: upsample 'max_unpool' needs max-pool "
                            "indices, which an FPN does not keep; choose another upsampler")
        self.num_levels = num_levels
        # level i: max(1, i) conv stages, each but level 0's followed by a 2x upsampling
        self.convs = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in range(num_levels):
            coords = 2 if i == num_levels - 1 else 0
            self.convs.append(nn.ModuleList(
                conv_gn_relu((in_channels + coords) if k == 0 else channels, channels,
                             num_groups=num_groups)
                for k in range(max(1, i))))
            self.upsamplers.append(nn.ModuleList(
                make_upsampler(name, channels, 2) for _ in range(i)))
        self.predictor = conv_gn_relu(channels, out_channels, 1, num_groups=num_groups)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """levels: `num_levels` (N, C, H/s, W/s) maps, finest first, each level twice the size
        of the next. Returns (N, E, H/s0, W/s0) at the finest level's size."""
        if len(levels) != self.num_levels:
            raise UserError(f"SOLOv2 mask feature branch: {len(levels)} levels given, built for "
                            f"{self.num_levels}")
        sizes = [tuple(x.shape[-2:]) for x in levels]
        total = None
        for i, (x, convs, ups) in enumerate(zip(levels, self.convs, self.upsamplers)):
            if i == self.num_levels - 1:
                x = with_coords(x)
            for k, conv in enumerate(convs):
                x = conv(x)
                if k < len(ups):  # to the next finer level's exact size
                    x = ups[k](x, size=sizes[i - 1 - k])
            total = x if total is None else total + x
        return self.predictor(total)
