"""Mirror padding of any width, and the U-Net paper's overlap-tile prediction.

Overlap-tile (Ronneberger et al. 2015, Fig. 2): a valid-padding network maps an n x n tile to a
smaller (n - 2 b) x (n - 2 b) output; to predict an image of any size, mirror-pad it by b on each
side ("missing input data is extrapolated by mirroring") and slide the tile. Tiles start at
multiples of `align` (the network's output stride), so every pooling sees the same pixel phase as
it would in one pass over the whole padded image: with border-free upsamplers the tiled result
equals that one pass exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Source indices of a 1-D reflection ("reflect" mode: the edge is not repeated) that may be
    wider than n (reflected back and forth: period 2 (n - 1))."""
    pos = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(pos)
    period = 2 * (n - 1)
    pos = pos.remainder(period)
    return torch.where(pos < n, pos, period - pos)


def mirror_pad(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """x (..., H, W), pad (left, right, top, bottom) as `F.pad` -> (..., H + top + bottom,
    W + left + right), mirrored like `F.pad(mode="reflect")` but for any width (torch's reflect
    needs pad < size; this repeats the reflection, as numpy's "reflect")."""
    left, right, top, bottom = pad
    rows = _reflect_index(x.shape[-2], top, bottom, x.device)
    cols = _reflect_index(x.shape[-1], left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def overlap_tile(
    net: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    border: int,
    tile: int,
    align: int,
) -> torch.Tensor:
    """Predict (N, C, H, W) with `net`, a valid network mapping a `tile` x `tile` input to a
    (tile - 2 border)^2 output. Tiles step by the largest multiple of `align` <= the output tile.
    Returns (N, K, H, W)."""
    n, _, h, w = images.shape
    out_tile = tile - 2 * border
    step = (out_tile // align) * align
    if step < 1:
        raise ValueError(
            f"tile {tile} leaves an output tile of {out_tile}, less than the alignment {align}"
        )
    rows = 1 if h <= out_tile else -(-(h - out_tile) // step) + 1
    cols = 1 if w <= out_tile else -(-(w - out_tile) // step) + 1
    padded_h, padded_w = (rows - 1) * step + tile, (cols - 1) * step + tile
    padded = mirror_pad(images, (border, padded_w - w - border, border, padded_h - h - border))
    out: torch.Tensor | None = None
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * step, c * step
            y = net(padded[..., y0 : y0 + tile, x0 : x0 + tile])  # (N, K, out_tile, out_tile)
            if out is None:
                out = y.new_empty(
                    n, y.shape[1], (rows - 1) * step + out_tile, (cols - 1) * step + out_tile
                )
            out[..., y0 : y0 + out_tile, x0 : x0 + out_tile] = y
    return out[..., :h, :w]
