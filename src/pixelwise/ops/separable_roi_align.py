"""RoIAlign as two matrix products per image: a fast CPU path for training.

RoIAlign (He et al. 2017; torchvision's `roi_align`) averages, for each RoI and output bin, the
bilinear samples of a regular grid of `sampling_ratio` x `sampling_ratio` points. A bilinear
weight is a product of a y weight and an x weight, and the grid is a product of its rows and its
columns, so the whole operator is separable: for a RoI k on image n and a channel c,

    out[k, c] = A_y[k] @ X[n, c] @ A_x[k]^T,    A_y[k]: (PH, H), A_x[k]: (PW, W),

where row p of A_y[k] holds the y weights of bin row p's samples (each sample's two neighbouring
rows, `1 - ly` and `ly`), divided by the samples per bin, and likewise A_x. The RoIs of one image
are stacked into one (K_n * PH, H) matrix, so the y step is a single GEMM per image over all
channels at once, and the x step one batched GEMM. Autograd gives the backward pass: the same
products transposed, each RoI's gradient summed into the image's by the GEMM itself (no scatter).

Why by hand: torchvision's CPU kernel loops over every (RoI, channel, bin, sample) on one thread,
recomputing the bilinear weights per channel, and its backward scatters each sample into the
feature gradient one float at a time; in the Mask R-CNN recipe's training step (256 x 256
images) forward and backward took 15-18 % of the step. The matrices here are mostly zeros (2-4
of H entries per row for 2 samples), but in bfloat16 a dense GEMM on them is still ~2-4x
faster, and the step 1.1-1.3x (`benchmarks/train_step.py`). The weights follow torchvision's
kernel exactly (its out-of-range rule, clamping at the borders, `aligned`), so in float32 /
float64 the output
agrees with `torchvision.ops.roi_align` to float rounding (not bit for bit: the sums run in
another order). pixelwise's poolers use it in bfloat16 training on maps small enough for the
dense products to pay (`pixelwise.ops.roi_align.SEPARABLE_MAX_RATIO`; in float32 it is about
even with the kernel) and keep torchvision's kernel for inference. Only a fixed
`sampling_ratio` > 0 (every R-CNN here uses 2): the adaptive grid (ceil(bin size) samples,
different for every RoI) is not a product of fixed-size matrices.

bfloat16 features (bfloat16 autocast training) are pooled in bfloat16: the weights rounded to it
(8 significant bits), the products accumulated in float32 by the GEMM, the output bfloat16 as
torchvision's. torchvision's autocast rule pools in float32 instead; in bfloat16 the GEMMs run
at about twice the rate, and the features and the output carry bfloat16's precision anyway.
float16 is pooled in float32 (CPU float16 GEMMs are slow) and cast back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def axis_weights(start: Tensor, length: Tensor, pooled: int, sampling_ratio: int, size: int
                 ) -> Tensor:
    """(K, pooled, size): row p holds the mean bilinear weights, along one axis, of the
    `sampling_ratio` samples of bin p of each RoI spanning [start, start + length) in feature
    pixels, as torchvision's `roi_align` kernel computes them."""
    k = start.shape[0]
    bins = (length / pooled)[:, None, None]  # (K, 1, 1)
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    s = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device)[None, None, :] + 0.5
    coords = start[:, None, None] + p * bins + s * bins / sampling_ratio  # (K, pooled, S)
    # torchvision: a sample more than one pixel outside the map contributes nothing
    inside = ((coords >= -1.0) & (coords <= size)).to(start.dtype)
    coords = coords.clamp(min=0)
    low = coords.floor()
    at_end = low >= size - 1  # the last row / column: both neighbours are it
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    frac = torch.where(at_end, torch.zeros_like(coords), coords - low)
    high = torch.where(at_end, low, low + 1)
    index = torch.cat([low, high], dim=2).long()  # (K, pooled, 2S)
    weight = torch.cat([(1 - frac) * inside, frac * inside], dim=2) / sampling_ratio
    out = torch.zeros(k, pooled, size, dtype=start.dtype, device=start.device)
    return out.scatter_add_(2, index, weight)


def separable_roi_align(input: Tensor, rois: Tensor, output_size: int | Sequence[int],  # noqa: A002
                        spatial_scale: float = 1.0, sampling_ratio: int = 2,
                        aligned: bool = False) -> Tensor:
    """`torchvision.ops.roi_align` for `rois` (K, 5) in (batch index, x1, y1, x2, y2) form as
    matrix products (see the module docstring), differentiable in `input` by autograd.

    input (N, C, H, W), any memory format (channels_last saves a copy); bfloat16 is pooled in
    bfloat16, float16 in float32 (see the module docstring). Returns (K, C, PH, PW) in the
    input's dtype, channels-last strides."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if sampling_ratio <= 0:
        raise ValueError("separable_roi_align needs a fixed sampling_ratio > 0")
    n, c, h, w = input.shape
    dtype = input.dtype
    x = input.float() if dtype == torch.float16 else input
    with torch.no_grad():
        r = rois.float() if x.dtype == torch.bfloat16 else rois.to(x.dtype)
        offset = 0.5 if aligned else 0.0
        x1, y1 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
        width, height = r[:, 3] * spatial_scale - offset - x1, r[:, 4] * spatial_scale - offset - y1
        if not aligned:  # torchvision: a RoI is at least one pixel
            width, height = width.clamp(min=1.0), height.clamp(min=1.0)
        a_y = axis_weights(y1, height, ph, sampling_ratio, h).to(x.dtype)  # (K, PH, H)
        a_x = axis_weights(x1, width, pw, sampling_ratio, w).to(x.dtype)  # (K, PW, W)
        batch = r[:, 0].long()
        order = torch.argsort(batch, stable=True)
        counts = torch.bincount(batch, minlength=n).tolist()
    with torch.autocast(x.device.type, enabled=False):
        maps = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view, contiguous for channels_last input
        pieces = []
        for image, rows in zip(range(n), order.split(counts)):
            if len(rows) == 0:
                continue
            k = len(rows)
            # y: all RoIs of the image at once, every channel: (k * PH, H) @ (H, W * C)
            t = a_y[rows].reshape(k * ph, h) @ maps[image].reshape(h, w * c)
            t = t.view(k, ph, w, c).transpose(1, 2).reshape(k, w, ph * c)  # (k, W, PH * C)
            # x: per RoI, (PW, W) @ (W, PH * C)
            pieces.append(torch.bmm(a_x[rows], t).view(k, pw, ph, c))
        if not pieces:
            return x.new_zeros((0, c, ph, pw)).to(dtype)
        out = torch.cat(pieces)  # (K, PW, PH, C), RoIs sorted by image
        out = out[torch.argsort(order)] if len(pieces) > 1 else out
        return out.permute(0, 3, 2, 1).to(dtype)  # (K, C, PH, PW), channels-last strides
