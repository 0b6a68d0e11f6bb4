"""RoIAlign on several CPU threads (torchvision's kernel, the RoIs split between threads) and the
multi-level pooler of the R-CNNs here.

torchvision's CPU `roi_align` (forward and backward) is one loop over the RoIs on one thread, so
with 2+ torch threads it leaves cores idle: in Mask R-CNN's eval at 256 x 256 the box branch's
1000 proposals alone take ~0.14 s of ~0.9 s (`benchmarks/instance.py`). Each RoI's output depends
on that RoI alone, so the RoIs are split into one contiguous chunk per thread and each chunk is
pooled by torchvision's own kernel (`torch.ops.torchvision.roi_align`, which releases the GIL) on
a thread of a small pool: the forward output is bit-identical. The backward pass runs
torchvision's `_roi_align_backward` per chunk the same way; each chunk returns a gradient for the
whole feature map and those are summed, so the input gradient equals torchvision's up to the
order of float additions where RoIs of different chunks overlap.

Written here because neither torch nor torchvision runs this kernel in parallel on CPU.
`ParallelMultiScaleRoIAlign` is torchvision's `MultiScaleRoIAlign` (same level mapping, same
scales) with this op per level; in bfloat16 autocast training (a gradient needed, bfloat16
features) it pools the levels small enough with `separable_roi_align` instead (two GEMMs per
image, 2-4x faster forward and backward there; see `SEPARABLE_MAX_RATIO`). It falls back to
torchvision's path off CPU, and without the separable op on one thread and for few RoIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from pixelwise.ops.cpu_threads import parts_for, run_split
from pixelwise.ops.separable_roi_align import separable_roi_align

# fewer RoIs than this per thread: not worth a thread hand-off (~20 us each)
MIN_ROIS_PER_THREAD = 32
# `separable_roi_align`'s dense GEMMs do H * W / (PW * sampling_ratio^2) times the multiply-adds
# of torchvision's samples; on bfloat16 features they were 2.4-3.8x (mask, 14 x 14: 73) and
# 1.9-2.4x (box, 7 x 7: 146) faster forward + backward on a 64 x 64 map, 64-256 channels
# (`benchmarks/train_step.py`); in float32 about even at 146 (a whole float32 Mask R-CNN step
# 6 % slower): the separable op only for bfloat16, up to this ratio
SEPARABLE_MAX_RATIO = 256


def _chunks(rois: Tensor) -> list[Tensor] | None:
    """`rois` split into one contiguous chunk per torch thread, None when not worth it."""
    parts = parts_for(len(rois), MIN_ROIS_PER_THREAD)
    return list(rois.chunk(parts)) if parts >= 2 else None


class _ParallelRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, rois: Tensor, spatial_scale: float,  # noqa: A002
                pooled: tuple[int, int], sampling_ratio: int, aligned: bool) -> Tensor:
        chunks = _chunks(rois)
        ctx.save_for_backward(rois)
        ctx.settings = (spatial_scale, pooled, sampling_ratio, aligned, input.shape)
        ph, pw = pooled

        def pool(part: Tensor) -> Tensor:
            return torch.ops.torchvision.roi_align(input, part, spatial_scale, ph, pw,
                                                   sampling_ratio, aligned)
        return torch.cat(run_split(pool, chunks)) if chunks else pool(rois)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        spatial_scale, (ph, pw), sampling_ratio, aligned, (n, c, h, w) = ctx.settings
        grad = grad.contiguous()
        splits = [len(part) for part in _chunks(rois) or [rois]]

        def back(pair: tuple[Tensor, Tensor]) -> Tensor:
            part_grad, part = pair
            return torch.ops.torchvision._roi_align_backward(
                part_grad, part, spatial_scale, ph, pw, n, c, h, w, sampling_ratio, aligned)
        pairs = list(zip(grad.split(splits), rois.split(splits)))
        grads = run_split(back, pairs)
        total = grads[0]
        for g in grads[1:]:
            total = total + g
        return total, None, None, None, None, None


def parallel_roi_align(input: Tensor, rois: Tensor, output_size: int | Sequence[int],  # noqa: A002
                       spatial_scale: float = 1.0, sampling_ratio: int = -1,
                       aligned: bool = False) -> Tensor:
    """`torchvision.ops.roi_align` for `rois` (K, 5) in (batch index, x1, y1, x2, y2) form, the
    RoIs split between torch's threads on CPU (torchvision's op elsewhere, or when not worth
    it). Float16 / bfloat16 features are pooled in float32 and cast back, as torchvision's
    autocast kernel does."""
    pooled = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if input.device.type != "cpu" or _chunks(rois) is None:
        return roi_align(input, rois, pooled, spatial_scale, sampling_ratio, aligned)
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16):
        input = input.float()  # noqa: A001
    rois = rois.to(input.dtype)
    out = _ParallelRoIAlign.apply(input, rois, float(spatial_scale), pooled,
                                  int(sampling_ratio), bool(aligned))
    return out.to(dtype)


class ParallelMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` (same arguments, levels and scales) pooling each level
    on CPU with `separable_roi_align` where it pays (`_separable_pays`: bfloat16 training), else
    with `parallel_roi_align` (torchvision's kernel, bit for bit)."""

    def _separable_pays(self, feature: Tensor) -> bool:
        """Whether `separable_roi_align` beats torchvision's kernel on this level: training
        (a gradient needed) on bfloat16 features, a fixed sampling grid, a small enough map."""
        pw, ratio = self.output_size[1], self.sampling_ratio
        return (torch.is_grad_enabled() and feature.requires_grad and ratio > 0
                and feature.dtype == torch.bfloat16
                and feature.shape[-2] * feature.shape[-1] <= SEPARABLE_MAX_RATIO * pw * ratio ** 2)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level)
        if features[0].device.type != "cpu":
            return super().forward(x, boxes, image_shapes)
        pools = [separable_roi_align if self._separable_pays(f) else parallel_roi_align
                 for f in features]
        if separable_roi_align not in pools and torch.get_num_threads() < 2:
            return super().forward(x, boxes, image_shapes)
        rois = _convert_to_roi_format(boxes)  # (K, 5): image index, x1, y1, x2, y2
        if len(features) == 1:
            return pools[0](features[0], rois, self.output_size, self.scales[0],
                            self.sampling_ratio)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale, pool) in enumerate(zip(features, self.scales, pools)):
            index = torch.where(levels == level)[0]
            pooled = pool(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            result[index] = pooled.to(result.dtype)  # autocast may mix the levels' dtypes
        return result
