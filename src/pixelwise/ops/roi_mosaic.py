"""RoI feature maps tiled into one large map, so that a stack of size-preserving convolutions
runs once on one image instead of on a batch of small ones.

Why (the R-CNN heads' eval on CPU): NNPACK, PyTorch's bundled Winograd convolution, takes a
batch of one image through its inference path, which on one 151 x 151 map of 100 tiled 14 x 14
RoIs is faster than its batched path on the (100, C, 14, 14) stack: 1.14x at C = 256, 1.22x at
512 for one 3x3 convolution (2 threads; slower below 128 channels, see
`pixelwise.models.fast_postprocess.MOSAIC_MIN_CHANNELS`). Written by hand: no library packs
RoIs this way.

Layout: each (h, w) RoI map sits in a cell of (h + p) x (w + p) pixels whose last p rows and
columns are zero, on a grid of rows x cols cells, with p zero rows and columns more at the top
and the left. Every RoI is thus surrounded by at least p zeros: exactly the zero padding that a
convolution with kernel 2p + 1 and padding p gives it alone. A convolution run on the whole map
(padding p) writes values mixed from neighbours into the separators; they are set back to zero
(`Mosaic.clear_separators_`) before the next convolution reads them, so every RoI's output
equals the output computed on it alone, up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mosaic:
    """Where `count` RoI maps of (height, width) pixels sit in one map with separators `pad`."""

    count: int
    height: int
    width: int
    pad: int
    rows: int
    cols: int

    @classmethod
    def for_rois(cls, count: int, height: int, width: int, pad: int) -> Mosaic:
        """A near-square grid of cells for `count` >= 1 RoIs."""
        cols = max(1, math.ceil(math.sqrt(count * (height + pad) / (width + pad))))
        rows = math.ceil(count / cols)
        return cls(count, height, width, pad, rows, cols)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the tiled map."""
        p = self.pad
        return self.rows * (self.height + p) + p, self.cols * (self.width + p) + p

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(count, C, h, w) -> (1, C, H, W), separators zero."""
        c, h, w = x.shape[1], self.height, self.width
        tiled = x.new_zeros((1, c, *self.size))
        cells = self._cells(tiled)  # (C, rows, h + p, cols, w + p) view
        full = self.count // self.cols  # grid rows holding `cols` RoIs
        # (full*cols, C, h, w) -> (full, cols, C, h, w) -> (C, full, h, cols, w)
        cells[:, :full, :h, :, :w] = x[: full * self.cols].reshape(
            full, self.cols, c, h, w).permute(2, 0, 3, 1, 4)
        rest = self.count - full * self.cols
        if rest:  # the last, partly filled grid row: (rest, C, h, w) -> (C, h, rest, w)
            cells[:, full, :h, :rest, :w] = x[full * self.cols:].permute(1, 2, 0, 3)
        return tiled

    def unpack(self, tiled: torch.Tensor) -> torch.Tensor:
        """(1, C, H, W) -> (count, C, h, w): each RoI's pixels without the separators."""
        c, h, w = tiled.shape[1], self.height, self.width
        rois = self._cells(tiled)[:, :, :h, :, :w].permute(1, 3, 0, 2, 4)
        # (C, rows, h, cols, w) -> (rows, cols, C, h, w) -> (rows*cols, C, h, w), a copy
        return rois.reshape(self.rows * self.cols, c, h, w)[: self.count]

    def _cells(self, tiled: torch.Tensor) -> torch.Tensor:
        """(1, C, H, W) -> a (C, rows, h + p, cols, w + p) view of the cells (each RoI first,
        then its separators)."""
        p = self.pad
        return tiled[0, :, p:, p:].view(tiled.shape[1], self.rows, self.height + p, self.cols,
                                         self.width + p)

    def separators(self, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the separator rows and columns of the (H, W) map."""
        out = []
        for length, inner in zip(self.size, (self.height, self.width)):
            i = torch.arange(length, device=device)
            out.append(torch.where((i < self.pad) | ((i - self.pad) % (inner + self.pad) >= inner)
                                   )[0])
        return out[0], out[1]

    def clear_separators_(self, tiled: torch.Tensor, separators: tuple[torch.Tensor, torch.Tensor]
                          ) -> torch.Tensor:
        """Zero the separators of (1, C, H, W) in place (`separators` from `separators()`)."""
        return tiled.index_fill_(2, separators[0], 0).index_fill_(3, separators[1], 0)


__all__ = ["Mosaic"]
