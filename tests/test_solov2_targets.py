"""SOLOv2 target assignment on hand-built masks: which cells are positive, at which level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from pixelwise.models.solov2_targets import instance_geometry, mask_targets, solov2_targets

CANVAS = (64, 64)


def boxes_to_masks(rects: list[tuple[int, int, int, int]], size=CANVAS) -> torch.Tensor:
    """(N, H, W) uint8 from half-open (top, bottom, left, right) rectangles."""
    masks = torch.zeros(len(rects), *size, dtype=torch.uint8)
    for k, (top, bottom, left, right) in enumerate(rects):
        masks[k, top:bottom, left:right] = 1
    return masks


def test_hand_built_assignment() -> None:
    # A: 16x16 square, scale 16 -> levels 0 and 1 (ranges overlap); centre (16, 16).
    # B: 32x32 square, scale 32 -> level 1 only; centre (48, 48).
    # C: 2x2 dot, smaller than a level-0 cell (8 px), scale 2 -> level 0 only; centre (61, 3).
    masks = boxes_to_masks([(8, 24, 8, 24), (32, 64, 32, 64), (60, 62, 2, 4)])
    labels = torch.tensor([1, 2, 3])
    level0, level1 = solov2_targets(masks, labels, CANVAS, grid_sizes=(8, 4),
                                    scale_ranges=((1, 20), (12, 64)), center_sigma=0.2)
    # level 0 (cells of 8 px): A's centre region 16 +- 1.6 -> rows / cols 1..2; C -> cell (7, 0)
    expect0 = torch.zeros(8, 8, dtype=torch.int64)
    expect0[1:3, 1:3] = 1
    expect0[7, 0] = 3
    assert torch.equal(level0.labels, expect0)
    assert level0.positive.tolist() == [9, 10, 17, 18, 56]
    assert level0.instance[level0.positive].tolist() == [0, 0, 0, 0, 2]
    # level 1 (cells of 16 px): A 16 +- 1.6 -> 0..1; B 48 +- 3.2 -> 2..3
    expect1 = torch.zeros(4, 4, dtype=torch.int64)
    expect1[0:2, 0:2] = 1
    expect1[2:4, 2:4] = 2
    assert torch.equal(level1.labels, expect1)
    assert level1.instance.reshape(4, 4)[2:, 2:].eq(1).all()
    assert (level1.instance >= 0).sum() == 8


def test_centre_region_is_at_most_three_by_three() -> None:
    masks = boxes_to_masks([(0, 64, 0, 64)])  # centre (32, 32), scale 64
    (level,) = solov2_targets(masks, torch.tensor([1]), CANVAS, (16,), ((1, 100),),
                              center_sigma=1.0)  # region would be the whole image
    rows, cols = torch.nonzero(level.labels, as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == \
        (7, 9, 7, 9)


def test_out_of_range_and_empty_masks_get_no_cells() -> None:
    masks = boxes_to_masks([(0, 4, 0, 4), (10, 10, 10, 10)])  # scale 4; an empty mask
    levels = solov2_targets(masks, torch.tensor([1, 2]), CANVAS, (8, 8),
                            ((10, 100), (0, 1000)))
    assert levels[0].positive.numel() == 0
    assert levels[1].instance[levels[1].positive].tolist() == [0]


def test_smaller_instance_keeps_a_shared_cell() -> None:
    """A small object at the centre of a large one: the centre cell is the small one's."""
    masks = boxes_to_masks([(8, 56, 8, 56), (34, 38, 34, 38)])  # centres (32, 32), (36, 36)
    for order in ([0, 1], [1, 0]):
        (level,) = solov2_targets(masks[order], torch.tensor([1, 2])[order], CANVAS, (8,),
                                  ((1, 100),))
        # the large one's region is 32 +- 4.8 -> cells 3..4; the small one's 36 +- 0.4 -> 4
        assert level.labels[4, 4].item() == 2
        assert level.labels[3:5, 3:5].flatten().tolist() == [1, 1, 1, 2]
        small = order.index(1)
        assert level.instance[4 * 8 + 4].item() == small


def test_more_objects_than_cells() -> None:
    """36 dots on a 2 x 2 grid: every cell positive, each to exactly one instance."""
    rects = [(4 + 10 * i, 6 + 10 * i, 4 + 10 * j, 6 + 10 * j) for i in range(6) for j in range(6)]
    masks = boxes_to_masks(rects)
    labels = torch.arange(36) % 3 + 1
    (level,) = solov2_targets(masks, labels, CANVAS, (2,), ((1, 100),))
    assert level.positive.tolist() == [0, 1, 2, 3]
    owners = level.instance[level.positive]
    assert torch.equal(level.labels.flatten()[level.positive], labels[owners])
    # each owner's centre lies in its cell
    centre, _, _ = instance_geometry(masks)
    for cell, k in zip(level.positive.tolist(), owners.tolist()):
        assert (int(centre[k, 0] // 32), int(centre[k, 1] // 32)) == divmod(cell, 2)


def test_geometry_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((6, 20, 30)) < 0.2).to(torch.uint8)
    masks[5] = 0
    centre, size, area = instance_geometry(masks)
    for k in range(5):
        m = masks[k].numpy()
        cy, cx = ndimage.center_of_mass(m)
        assert centre[k].tolist() == pytest.approx([cy + 0.5, cx + 0.5], abs=1e-4)
        rows, cols = np.nonzero(m)
        assert size[k].tolist() == [rows.max() - rows.min() + 1, cols.max() - cols.min() + 1]
        assert area[k].item() == m.sum()
    assert area[5].item() == 0 and size[5].tolist() == [0, 0]


def test_mask_targets_are_block_fractions() -> None:
    masks = boxes_to_masks([(0, 2, 0, 2), (8, 16, 4, 8)], size=(30, 30))  # padded to 32
    soft = mask_targets(masks, (32, 32), stride=4)
    assert soft.shape == (2, 8, 8)
    assert soft[0, 0, 0].item() == 0.25 and soft[0].sum().item() == 0.25
    assert soft[1, 2:4, 1].tolist() == [1.0, 1.0] and soft[1].sum().item() == 2.0
    assert mask_targets(masks[:0], (32, 32)).shape == (0, 8, 8)
