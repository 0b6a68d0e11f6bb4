"""Simple Copy-Paste for instance samples: hand-computed pastes (occluded masks shrink, their
boxes follow, covered objects are dropped, crowds are never pasted), boxes against a naive
loop, sources of other sizes, the seeded dataset wrapper, and training through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.data.copy_paste import CopyPaste, paste_objects
from pixelwise.data.transforms import mask_boxes
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.loader import SeededDataset
from pixelwise.errors import UserError
from tests.test_tasks_instance import MASK

H = W = 8


def _sample(fill: float, objects: list[tuple[int, int, int, int, int, int]]
            ) -> tuple[tv_tensors.Image, dict]:
    """An image of `fill` with objects (y0, y1, x0, x1, label, crowd): rectangle masks."""
    masks = torch.zeros(len(objects), H, W, dtype=torch.uint8)
    for k, (y0, y1, x0, x1, _, _) in enumerate(objects):
        masks[k, y0:y1, x0:x1] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[x0, y0, x1, y1] for y0, y1, x0, x1, _, _ in objects],
                         dtype=torch.float32).reshape(-1, 4),
            format="XYXY", canvas_size=(H, W)),
        "labels": torch.tensor([o[4] for o in objects], dtype=torch.int64),
        "iscrowd": torch.tensor([o[5] for o in objects], dtype=torch.int64),
        "area": masks.flatten(1).sum(1).float(),
        "masks": tv_tensors.Mask(masks),
        "image_id": 5,
    }
    return tv_tensors.Image(torch.full((1, H, W), fill)), target


def test_an_occluded_object_shrinks_and_a_covered_one_is_dropped() -> None:
    # target: A (rows 0-3, cols 0-3), B (rows 6-7, cols 6-7), D (rows 2-3, cols 4-5)
    image, target = _sample(0.0, [(0, 4, 0, 4, 1, 0), (6, 8, 6, 8, 2, 0), (2, 4, 4, 6, 1, 0)])
    # source: C (rows 0-3, cols 2-7): one candidate, always pasted; same size: offset 0
    source_image, source = _sample(1.0, [(0, 4, 2, 8, 3, 0)])
    out_image, out = paste_objects(image, target, source_image, source)
    assert isinstance(out_image, tv_tensors.Image)
    expected_image = torch.zeros(1, H, W)
    expected_image[:, 0:4, 2:8] = 1
    assert torch.equal(out_image.as_subclass(torch.Tensor), expected_image)
    # A keeps cols 0-1 (box and area follow), B is untouched, D is covered: dropped
    assert out["labels"].tolist() == [1, 2, 3]
    assert out["boxes"].tolist() == [[0, 0, 2, 4], [6, 6, 8, 8], [2, 0, 8, 4]]
    assert out["area"].tolist() == [8, 4, 24]
    assert out["iscrowd"].tolist() == [0, 0, 0]
    assert int(out["masks"][0].sum()) == 8 and int(out["masks"][0][:, 2:].sum()) == 0
    assert out["image_id"] == 5 and out["boxes"].canvas_size == (H, W)
    assert isinstance(out["masks"], tv_tensors.Mask)


def test_crowds_are_never_pasted_and_min_area_drops_slivers() -> None:
    image, target = _sample(0.0, [(0, 2, 0, 8, 1, 0)])
    source_image, crowd_only = _sample(1.0, [(0, 8, 0, 8, 2, 1)])
    same_image, same = paste_objects(image, target, source_image, crowd_only)
    assert same is target and same_image is image
    # what the paste leaves of the target object: one row (8 px) < min_area 9 -> dropped
    source_image, source = _sample(1.0, [(1, 8, 0, 8, 3, 0)])
    _, out = paste_objects(image, target, source_image, source, min_area=9)
    assert out["labels"].tolist() == [3]


def test_mask_boxes_equal_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 13, 17, generator=gen) > 0.93).to(torch.uint8)
    masks[:, 6, 8] = 1  # none empty
    got = mask_boxes(masks)
    for k in range(6):
        ys, xs = torch.nonzero(masks[k], as_tuple=True)
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # exclusive right / bottom
        assert got[k].tolist() == [float(v) for v in expected]


@pytest.mark.parametrize("source_size", [5, 13])
def test_a_source_of_another_size_is_placed_or_cut_at_random(source_size: int) -> None:
    image, target = _sample(0.0, [])
    big = torch.zeros(1, source_size, source_size, dtype=torch.uint8)
    big[0, 1:4, 1:source_size - 1] = 1
    source = {"masks": tv_tensors.Mask(big), "labels": torch.tensor([2]),
              "iscrowd": torch.tensor([0]), "area": big.flatten(1).sum(1).float()}
    source_image = torch.full((1, source_size, source_size), 1.0)
    placements = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out = paste_objects(image, target, source_image, source)
        if not len(out["labels"]):  # the window missed the object
            continue
        mask = out["masks"][0].bool()
        assert torch.equal(out_image.as_subclass(torch.Tensor)[0] == 1, mask)  # pixels = mask
        assert out["boxes"].tolist() == mask_boxes(mask[None]).tolist()
        assert out["area"].tolist() == [float(mask.sum())]
        placements.add(tuple(out["boxes"][0].tolist()))
    assert len(placements) > 1  # the offset is random


def test_the_wrapper_is_seeded_per_item_and_p_zero_changes_nothing() -> None:
    items = [_sample(float(i), [(i % 4, i % 4 + 3, 0, 5, 1 + i % 3, 0)]) for i in range(5)]
    untouched = CopyPaste(items, 0.0)
    for i in range(5):
        assert untouched[i] is items[i]
    seeded = SeededDataset(CopyPaste(items, 1.0), seed=3)
    a, b = seeded[(1, 2)], seeded[(1, 2)]  # (epoch, index)
    assert torch.equal(a[0], b[0]) and a[1]["labels"].tolist() == b[1]["labels"].tolist()
    assert not torch.equal(a[0], items[2][0])  # something was pasted
    others = [seeded[(epoch, 2)] for epoch in range(2, 8)]
    assert any(not torch.equal(o[0], a[0]) for o in others)  # another draw in another epoch
    with pytest.raises(UserError, match=r"copy-paste probability must be in \[0, 1\]"):
        CopyPaste(items, 1.5)
    keypoints = [(img, {**t, "keypoints": torch.zeros(len(t["labels"]), 3, 3)})
                 for img, t in items]
    with pytest.raises(UserError, match="copy-paste pastes masks, not keypoints"):
        CopyPaste(keypoints, 1.0)[0]


def test_training_with_copy_paste_and_refusals(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.data.synthetic import synthesize

    data = synthesize("instance", tmp_path / "data", num=5, size=(80, 80), seed=2,
                      val_fraction=0.2)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--copy-paste", "1", "--json", *MASK]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["copy_paste"] == 1.0
    with pytest.raises(UserError, match="copy_paste is for the instance task"):
        TrainConfig(task="semantic", copy_paste=0.5)
    with pytest.raises(UserError, match=r"copy_paste must be in \[0, 1\], got 2"):
        TrainConfig(task="instance", copy_paste=2)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "kp"), "--task",
                 "keypoints", "--copy-paste", "0.5"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "copy_paste is for the instance task" in err and "Traceback" not in err
