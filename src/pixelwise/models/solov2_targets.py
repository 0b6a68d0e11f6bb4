"""SOLOv2 training targets from instance masks alone (no boxes).

For each instance and each level whose scale range holds it (scale = sqrt(h * w) of the mask's
own bounding box, in pixels of the network input; ranges may overlap, so an instance can train
two levels), the grid cells of its **centre region** are positive: the region is the mask's
centre of mass +- `center_sigma` / 2 of its height / width (official sigma 0.2), at least the
centre's own cell, at most the 3 x 3 cells around it. The grid of a level splits the padded
input canvas (H, W) into S x S cells; a point at continuous coordinate y (pixel i spans
[i, i + 1)) falls in row floor(y * S / H). Positive cells get the instance's label (1..K) and
its mask as the target of the cell's kernel.

Differences from the official code (WXinlong/SOLO ``solov2_target_single``), each deliberate:

* the mask's centre of mass uses pixel centres (i + 0.5), matching the grid's cell boundaries and
  the bilinear resize of the features to S x S (the official code uses pixel indices i);
* a cell claimed by two instances belongs to one: instances are written largest first, so a
  small instance keeps its cells where a larger one's centre region covers them (the official
  code trains both masks on the cell's one kernel and keeps the last label). When a level has
  more instances than cells, some get no cell there -- unavoidable with S x S cells;
* the mask targets (`mask_targets`) are the area fractions of each stride-4 block (soft), so a
  thin or tiny object keeps a non-empty target (the official code rescales to a binary mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LevelTargets:
    """The targets of one image at one level of grid size S.

    labels: (S, S) int64, 0 = background, else the class 1..K of the cell's instance.
    instance: (S*S,) int64, the index (into the image's masks) of each cell's instance, -1 none.
    """

    labels: torch.Tensor
    instance: torch.Tensor

    @property
    def positive(self) -> torch.Tensor:
        """(P,) int64 flat indices (row * S + col) of the positive cells, ascending."""
        return torch.nonzero(self.instance >= 0).flatten()


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of binary masks (M, h, w): (M, 4) XYXY pixel edges [x1, y1, x2 + 1, y2 + 1] and
    (M,) bool, False where a mask is empty (its box is then all zeros)."""
    _, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)  # (M, h), (M, w)

    def span(present: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(length, device=present.device)
        first = torch.where(present, idx, length).min(1).values  # (M,)
        last = torch.where(present, idx, -1).max(1).values  # (M,)
        return first, last + 1

    y1, y2 = span(rows, h)
    x1, x2 = span(cols, w)
    valid = rows.any(1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)  # (M, 4)
    return boxes * valid[:, None], valid


def instance_geometry(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per mask of (N, H, W): centre of mass (N, 2) as continuous (y, x) (pixel centres at
    i + 0.5), bounding-box height / width (N, 2) in pixels, and area (N,). Empty masks: area 0
    (centre and size 0)."""
    n, h, w = masks.shape
    m = masks.to(torch.float32)
    rows = m.sum(2)  # (N, H)
    cols = m.sum(1)  # (N, W)
    area = rows.sum(1)  # (N,)
    ys = torch.arange(h, dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=masks.device) + 0.5
    safe = area.clamp_min(1)
    centre = torch.stack([(rows * ys).sum(1) / safe, (cols * xs).sum(1) / safe], dim=1)

    boxes, _ = mask_boxes(masks > 0)  # (N, 4) pixel edges; zeros for empty masks
    size = torch.stack([boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], dim=1)  # (N, 2)
    return centre, size, area


def solov2_targets(
    masks: torch.Tensor,
    labels: torch.Tensor,
    canvas: tuple[int, int],
    grid_sizes: Sequence[int],
    scale_ranges: Sequence[tuple[float, float]],
    center_sigma: float = 0.2,
) -> list[LevelTargets]:
    """Targets of one image, one `LevelTargets` per level.

    masks: (N, h, w) {0, 1} at the image's size (top-left of the canvas); labels: (N,) 1..K;
    canvas: the padded input size (H, W) the grids split; grid_sizes / scale_ranges: per level.
    """
    device = masks.device
    centre, size, area = instance_geometry(masks)
    scale = torch.sqrt(size[:, 0] * size[:, 1])  # (N,)
    height, width = canvas
    order = torch.argsort(area, descending=True, stable=True).tolist()  # largest first
    out = []
    for s, (low, high) in zip(grid_sizes, scale_ranges):
        cell_labels = torch.zeros(s, s, dtype=torch.int64)
        instance = torch.full((s, s), -1, dtype=torch.int64)
        for k in order:
            if area[k] <= 0 or not low <= float(scale[k]) <= high:
                continue
            cy, cx = float(centre[k, 0]), float(centre[k, 1])
            half_h = 0.5 * center_sigma * float(size[k, 0])
            half_w = 0.5 * center_sigma * float(size[k, 1])
            row, col = _cell(cy, height, s), _cell(cx, width, s)
            top = max(_cell(cy - half_h, height, s), row - 1)
            bottom = min(_cell(cy + half_h, height, s), row + 1)
            left = max(_cell(cx - half_w, width, s), col - 1)
            right = min(_cell(cx + half_w, width, s), col + 1)
            cell_labels[top:bottom + 1, left:right + 1] = int(labels[k])
            instance[top:bottom + 1, left:right + 1] = k
        out.append(LevelTargets(cell_labels.to(device), instance.flatten().to(device)))
    return out


def _cell(coordinate: float, length: int, s: int) -> int:
    """The grid row / column (0..S-1) holding a continuous coordinate of a side of `length`."""
    return min(max(math.floor(coordinate * s / length), 0), s - 1)


def mask_targets(masks: torch.Tensor, canvas: tuple[int, int], stride: int = 4) -> torch.Tensor:
    """Instance masks (N, h, w) {0, 1} at the image size -> soft targets (N, H/stride, W/stride)
    on the padded canvas (H, W): the fraction of each stride x stride block the mask covers."""
    n, h, w = masks.shape
    height, width = canvas
    padded = F.pad(masks.to(torch.float32), (0, width - w, 0, height - h))  # (N, H, W)
    if n == 0:
        return padded.new_zeros(0, height // stride, width // stride)
    return F.avg_pool2d(padded[:, None], stride)[:, 0]  # (N, 1, H/s, W/s) -> (N, H/s, W/s)
