"""Joint bilateral upsampling (Kopf et al., SIGGRAPH 2007): coarse scores -> full resolution,
guided by the full-resolution image.

Each output pixel averages the scores of the coarse cells around it (a (2r+1)^2 window), each
weighted by how near the cell is (a Gaussian in cell units) and by how close the cell's mean
colour is to the pixel's own colour (a Gaussian in guide units). A pixel beside an edge thus
takes the scores of the cells on its own side of the edge, where bilinear upsampling blends
both sides: the boundaries of a network run at 1/4 resolution follow the image's edges.

Written by hand: torchvision has no guided upsampling (kornia's `joint_bilateral_blur` filters
at one resolution and is not a dependency). The weights of a pixel are a softmax over its
window's log-weights, so that no colour difference, however large, leaves a pixel with all
weights underflowed to zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def joint_bilateral_upsample(values: torch.Tensor, guide: torch.Tensor, factor: int, *,
                             sigma_color: float = 0.075, sigma_space: float = 2.0,
                             radius: int = 2) -> torch.Tensor:
    """(N, C, h, w) `values` -> (N, C, h k, w k), k = `factor`, guided by `guide`
    (N, G, h k, w k) (e.g. the image; `sigma_color` is in its units, `sigma_space` in coarse
    cells). Cell (i, j) of `values` covers the guide's k x k block (i, j), whose mean colour
    stands for it; cells beyond the border repeat the edge cells (as replicate padding).
    """
    n, c, h, w = values.shape
    k = int(factor)
    if k < 1 or guide.dim() != 4 or guide.shape[0] != n or guide.shape[-2:] != (h * k, w * k):
        raise ValueError(f"joint_bilateral_upsample: guide of shape {tuple(guide.shape)} does not "
                         f"match values {tuple(values.shape)} at factor {factor}")
    if sigma_color <= 0 or sigma_space <= 0 or radius < 0:
        raise ValueError("joint_bilateral_upsample: sigmas must be > 0 and radius >= 0")
    # float32 at least, whatever the autocast: the colour log-weights reach |p.c| / sigma^2 ~ 500,
    # which bfloat16's 8 bits would round by whole units
    dtype = torch.promote_types(values.dtype, torch.float32)
    with torch.autocast(values.device.type, enabled=False):
        # one image at a time, so that its (2r+1)^2 x k^2 weights per cell stay in cache (8
        # images of 256 x 256 at k = 4 took 2.7x longer per image in one piece); in one piece
        # when traced for export, where the batch size is symbolic
        if torch.compiler.is_exporting() or torch.compiler.is_compiling() or n <= 1:
            out = _upsample(values.to(dtype), guide.to(dtype), k, sigma_color, sigma_space,
                            radius)
        else:
            out = torch.cat([_upsample(values[i:i + 1].to(dtype), guide[i:i + 1].to(dtype), k,
                                       sigma_color, sigma_space, radius) for i in range(n)])
    return out.to(values.dtype)


def _upsample(values: torch.Tensor, guide: torch.Tensor, k: int, sigma_color: float,
              sigma_space: float, radius: int) -> torch.Tensor:
    # Layout: the B = N h w coarse cells innermost everywhere, so that every elementwise step
    # runs over long contiguous rows (small inner dimensions of C or k^2 vectorise badly, and
    # torch's bmm loops over B tiny matrices one at a time: 3x slower here)
    n, c, h, w = values.shape
    g, size = guide.shape[1], 2 * radius + 1
    b, shifts = n * h * w, size * size
    pad = (radius,) * 4
    # each cell's window of S = (2r+1)^2 neighbour cells (replicate-padded borders)
    window_values = F.unfold(F.pad(values, pad, mode="replicate"), size)  # (N, C S, h w)
    window_values = window_values.reshape(n, c, shifts, h * w).permute(2, 1, 0, 3)
    window_values = window_values.reshape(shifts, c, b)  # (S, C, N h w)
    cell_colour = F.avg_pool2d(guide, k)  # (N, G, h, w): what stands for each cell
    window_colour = F.unfold(F.pad(cell_colour, pad, mode="replicate"), size)  # (N, G S, h w)
    window_colour = window_colour.reshape(n, g, shifts, h * w).permute(1, 2, 0, 3)
    window_colour = window_colour.reshape(g, shifts, b)  # (G, S, N h w)
    pixels = guide.reshape(n, g, h, k, w, k).permute(1, 3, 5, 0, 2, 4)  # (G, k, k, N, h, w)
    pixels = pixels.reshape(g, k * k, b)  # (G, k^2, N h w): the pixels of each cell's block
    # squared distance of each pixel (its offset from its block's centre) to each window cell
    offset = (torch.arange(k, dtype=values.dtype, device=values.device) + 0.5) / k - 0.5
    shift = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    along = (shift[:, None] - offset[None, :]).square()  # (2r + 1, k): cell -> pixel offset
    space_dist = (along[:, None, :, None] + along[None, :, None, :]).reshape(shifts, k * k)
    # log-weight of cell s for pixel p: -|p - c_s|^2 / (2 sc^2) - d(p, s)^2 / (2 ss^2). |p|^2 is
    # the same for all s and drops out of the softmax, leaving p.c_s / sc^2 - |c_s|^2 / (2 sc^2)
    log_weights = (-space_dist / (2 * sigma_space**2))[:, :, None].expand(shifts, k * k, b)
    log_weights = log_weights - (window_colour.square().sum(0) / (2 * sigma_color**2))[:, None]
    window_colour = window_colour / sigma_color**2
    for i in range(g):
        log_weights.addcmul_(window_colour[i, :, None, :], pixels[i, None, :, :])
    weights = log_weights.softmax(0)  # (S, k^2, N h w)
    out = values.new_zeros(c, k * k, b)
    for s in range(shifts):
        out.addcmul_(window_values[s, :, None, :], weights[s, None, :, :])  # (C, k^2, N h w)
    out = out.reshape(c, k, k, n, h, w).permute(3, 0, 4, 1, 5, 2)  # (N, C, h, k, w, k)
    return out.reshape(n, c, h * k, w * k)  # (N, C, h, k, w, k) -> (N, C, H, W)
