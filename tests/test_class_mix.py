"""ClassMix / copy-paste for semantic training (`--class-mix P`, `--mix-classes NAMES`): which
classes are pasted, that image and label move together and nothing else changes, seeding, and
the settings' checks through the config and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.data.class_mix import ClassMix, choose_classes, paste_classes, turn_randomly
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.loader import SeededDataset
from pixelwise.errors import UserError
from pixelwise.tasks.semantic import SemanticTask

IGNORE = 255
pytestmark = pytest.mark.usefixtures("one_thread")


class _Pairs(Dataset):
    """Item i: an image filled with i (C = 2) and a given mask; None where `masks[i]` is None."""

    def __init__(self, masks: list[torch.Tensor | None]) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        mask = self.masks[i]
        if mask is None:
            return None
        image = torch.full((2, *mask.shape), float(i))
        return tv_tensors.Image(image), tv_tensors.Mask(mask)


def test_paste_classes_by_hand() -> None:
    image = torch.zeros(1, 2, 3)
    mask = torch.tensor([[0, 0, 0], [1, 1, 1]])
    source_image = torch.ones(1, 2, 3)
    source_mask = torch.tensor([[2, 3, IGNORE], [3, 0, 2]])
    out_image, out_mask = paste_classes(image, mask, source_image, source_mask,
                                        torch.tensor([2, IGNORE]))
    assert out_mask.tolist() == [[2, 0, IGNORE], [1, 1, 2]]
    assert out_image[0].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]


def test_listed_classes_are_all_pasted_when_present() -> None:
    mask = torch.tensor([[0, 3, 5], [IGNORE, 3, 1]])
    assert sorted(choose_classes(mask, classes=[3, 4, 5]).tolist()) == [3, 5]
    assert choose_classes(mask, classes=[4]).numel() == 0
    assert choose_classes(mask, classes=[IGNORE, 1], ignore_index=IGNORE).tolist() == [1]


def test_random_half_of_the_present_classes() -> None:
    """ceil(n / 2) distinct present classes, never ignore; over many draws each class about half
    the time (n = 5: 3 of 5, so 0.6 each)."""
    mask = torch.tensor([0, 2, 4, 6, 8, IGNORE, IGNORE]).reshape(1, 7)  # (1, 7)
    torch.manual_seed(0)
    counts = {c: 0 for c in (0, 2, 4, 6, 8)}
    draws = 2000
    for _ in range(draws):
        chosen = choose_classes(mask).tolist()
        assert len(chosen) == math.ceil(5 / 2) == len(set(chosen))
        for c in chosen:
            counts[c] += 1
    assert all(abs(n / draws - 0.6) < 0.05 for n in counts.values()), counts
    assert choose_classes(torch.tensor([[1, 1]])).tolist() == [1]  # one class: that one
    assert choose_classes(torch.full((2, 2), IGNORE)).numel() == 0


def test_mixed_item_takes_the_source_pixels_of_the_chosen_classes_only() -> None:
    masks = [torch.randint(0, 4, (6, 7), generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    data = _Pairs(masks)
    mixed = ClassMix(data, 1.0, classes=[1, 3])
    torch.manual_seed(0)
    sources = set()
    for _ in range(30):
        image, mask = mixed[1]
        assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
        pasted = image[0] != 1.0  # (H, W): pixels from another item (images hold their index)
        source = {int(v) for v in image[0][pasted].unique()}
        assert len(source) <= 1 and 1 not in source
        if not source:  # the source showed none of the classes: unchanged
            assert torch.equal(mask, masks[1])
            continue
        s = source.pop()
        sources.add(s)
        expected = torch.isin(masks[s], torch.tensor([1, 3]))
        assert torch.equal(pasted, expected)
        assert torch.equal(mask, torch.where(expected, masks[s], masks[1]))
        assert torch.equal(image[1], image[0])  # every channel pasted alike
    assert sources == {0, 2}


def test_probability_zero_and_edge_cases_leave_items_unmixed() -> None:
    masks = [torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long),
             torch.ones(5, 4, dtype=torch.long), None]
    data = _Pairs(masks)
    torch.manual_seed(0)
    never = ClassMix(data, 0.0)
    assert torch.equal(never[0][1], masks[0]) and never[3] is None
    always = ClassMix(_Pairs(masks[:1]), 1.0)
    assert torch.equal(always[0][1], masks[0])  # a one-item dataset has no partner
    # the 5x4 item has partners of another size or a bad one only: never mixed
    for _ in range(10):
        image, mask = ClassMix(data, 1.0)[2]
        assert torch.equal(mask, masks[2]) and bool((image == 2).all())
    with pytest.raises(UserError, match="must be in"):
        ClassMix(data, 1.5)
    with pytest.raises(UserError, match="empty"):
        ClassMix(data, 0.5, classes=[])


def _symmetries(t: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of `t (..., H, W)` under the square's symmetries, by hand (transposes and
    flips, no rot90)."""
    views = [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    if t.shape[-1] == t.shape[-2]:
        views += [v.transpose(-1, -2) for v in views]
    return views


@pytest.mark.parametrize("shape, count", [((4, 4), 8), ((3, 5), 4)])
def test_turns_are_the_symmetries_of_the_rectangle(shape: tuple[int, int], count: int) -> None:
    mask = torch.arange(shape[0] * shape[1]).reshape(shape)  # (H, W): every pixel distinct
    image = torch.stack([mask * 2, mask * 3]).float()  # (2, H, W)
    allowed = [m.flatten().tolist() for m in _symmetries(mask)]
    assert len({tuple(a) for a in allowed}) == count
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        out_image, out_mask = turn_randomly(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert isinstance(out_mask, tv_tensors.Mask) and out_mask.shape == mask.shape
        assert out_mask.flatten().tolist() in allowed
        assert torch.equal(out_image, torch.stack([out_mask * 2, out_mask * 3]).float())
        seen.add(tuple(out_mask.flatten().tolist()))
    assert len(seen) == count


def test_turned_sources_paste_turned_pixels() -> None:
    masks = [torch.zeros(5, 5, dtype=torch.long) for _ in range(2)]
    masks[1][0, 1:3] = 1  # a 1x2 bar in the top row of item 1
    mixed = ClassMix(_Pairs(masks), 1.0, classes=[1], turn=True)
    torch.manual_seed(0)
    placed = set()
    for _ in range(60):
        _, mask = mixed[0]
        bar = mask == 1  # (5, 5)
        assert any(torch.equal(bar, m == 1) for m in _symmetries(masks[1]))
        placed.add(tuple(bar.flatten().tolist()))
    assert len(placed) == 8


def test_seeded_items_repeat_and_differ_between_epochs(tmp_path: Path) -> None:
    from pixelwise.data.synthetic import synthesize

    root = synthesize("semantic", tmp_path / "set", num=8, size=(32, 32), seed=0)
    task = SemanticTask.from_data(root)
    mixed = SeededDataset(task.dataset(root, "train", train=True, class_mix=1.0), seed=3)
    a, b = mixed[(0, 2)], mixed[(0, 2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    plain = task.dataset(root, "train")
    epochs = [mixed[(e, 2)][1] for e in range(6)]
    assert any(not torch.equal(m, epochs[0]) for m in epochs[1:])
    assert any(not torch.equal(m, plain[2][1]) and not torch.equal(m, plain[2][1].flip(-1))
               for m in epochs)


def test_unknown_class_names_and_settings_are_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.data.synthetic import synthesize

    root = synthesize("semantic", tmp_path / "set", num=6, size=(32, 32), seed=0)
    task = SemanticTask.from_data(root)
    with pytest.raises(UserError, match="unknown class 'cat'; the classes are: sky"):
        task.dataset(root, "train", train=True, class_mix=0.5, mix_classes=["person", "cat"])
    for bad, message in [
        ({"class_mix": 1.5}, "class_mix must be in"),
        ({"mix_classes": ("person",)}, "mix_classes needs class_mix"),
        ({"mix_turn": True}, "mix_turn needs class_mix"),
        ({"task": "instance", "class_mix": 0.5}, "class_mix is for the semantic task"),
    ]:
        with pytest.raises(UserError, match=message):
            TrainConfig(**bad)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--class-mix", "1",
                 "--mix-classes", "person,ellipse", "--mix-turn", "--max-steps", "2",
                 "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["class_mix"], saved["mix_classes"], saved["mix_turn"]) == (
        1.0, ["person", "ellipse"], True)
    capsys.readouterr()
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "other"), "--class-mix",
                 "0.5", "--mix-classes", "dog", "--max-steps", "1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown class 'dog'" in err[0]
