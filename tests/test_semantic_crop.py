"""Random-crop training for the semantic task (`--crop`): crops are windows of the image and its
mask, a smaller image is padded with ignore, the setting travels through the CLI and the run's
config, and the other tasks refuse it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.engine.config import TrainConfig
from pixelwise.errors import UserError
from pixelwise.tasks.semantic import SemanticTask

IGNORE = 255
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("semantic", tmp_path_factory.mktemp("data") / "set", num=6,
                      size=(48, 64), seed=0)


def _find_window(big: torch.Tensor, small: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where `small` (C, h, w) equals a window of `big` (C, H, W), by a loop."""
    h, w = small.shape[-2:]
    return [(y, x) for y in range(big.shape[-2] - h + 1) for x in range(big.shape[-1] - w + 1)
            if torch.equal(big[..., y:y + h, x:x + w], small)]


def test_crops_are_aligned_windows_of_image_and_mask(data: Path) -> None:
    task = SemanticTask.from_data(data)
    whole = task.dataset(data, "train")
    cropped = task.dataset(data, "train", train=True, crop=(24, 32))
    torch.manual_seed(0)
    places = set()
    for i in range(len(whole)):
        image, mask = whole[i]
        for _ in range(3):
            crop_image, crop_mask = cropped[i]
            assert crop_image.shape == (3, 24, 32) and crop_mask.shape == (24, 32)
            candidates = [(image, mask), (image.flip(-1), mask.flip(-1))]  # the flip is random
            hits = [(flipped, spot) for flipped, (im, ma) in enumerate(candidates)
                     for spot in _find_window(im, crop_image)
                     if torch.equal(ma[spot[0]:spot[0] + 24, spot[1]:spot[1] + 32], crop_mask)]
            assert hits, "the crop is not a window of the image with its own mask"
            places.add(hits[0])
    assert len(places) > 3  # random positions, not one fixed window


def test_a_crop_larger_than_the_image_pads_with_ignore(data: Path) -> None:
    task = SemanticTask.from_data(data)
    image, mask = task.dataset(data, "train")[0]
    big_image, big_mask = task.dataset(data, "train", train=True, crop=(64, 64))[0]
    assert big_image.shape == (3, 64, 64) and big_mask.shape == (64, 64)
    rows = [y for y in range(64) if bool((big_mask[y] != IGNORE).any())]
    top = rows[0]
    assert len(rows) == 48  # the 48 image rows, 16 rows of padding
    inside = big_mask[top:top + 48]
    assert torch.equal(inside, mask) or torch.equal(inside, mask.flip(-1))
    outside = torch.ones(64, dtype=torch.bool)
    outside[top:top + 48] = False
    assert bool((big_mask[outside] == IGNORE).all()) and bool((big_image[:, outside] == 0).all())


def test_crop_through_the_cli_is_saved_with_the_run(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--crop", "32", "--max-steps", "2",
                 "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["crop"] == [32, 32]
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0  # validation and eval see whole images
    assert 0.0 <= json.loads(capsys.readouterr().out)["miou"] <= 1.0
    assert main(["train", "--task", "instance", "--model", "mask_rcnn", "--data", str(data),
                 "--out", str(tmp_path / "other"), "--crop", "32"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crop is for the semantic task" in err[0]
    assert not (tmp_path / "other").exists()


def test_config_round_trip_and_checks() -> None:
    cfg = TrainConfig(crop=[16, 24])
    assert cfg.crop == (16, 24) and cfg.to_dict()["crop"] == [16, 24]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="crop must be positive"):
        TrainConfig(crop=(0, 8))
    with pytest.raises(UserError, match="crop is for the semantic task"):
        TrainConfig(task="panoptic", crop=(8, 8))


def test_padding_takes_the_dataset_ignore_index(tmp_path: Path) -> None:
    """A dataset whose ignore label is 254 gets 254 in the padding, not 255."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "set"
    for sub in ("images/train", "masks/train"):
        (root / sub).mkdir(parents=True)
    labels = np.arange(48, dtype=np.uint8).reshape(6, 8) % 3  # (H, W) classes 0..2
    Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(root / "images/train/a.png")
    Image.fromarray(labels).save(root / "masks/train/a.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"],
                                                   "ignore_index": 254}))
    task = SemanticTask.from_data(root)
    _, mask = task.dataset(root, "train", train=True, crop=(10, 8))[0]
    assert mask.shape == (10, 8)
    assert int((mask == 254).sum()) == 4 * 8 and int((mask == 255).sum()) == 0
