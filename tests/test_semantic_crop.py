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


# -- class-balanced crops (--crop-balance) -------------------------------------------------------


def _balanced(mask: torch.Tensor, size: tuple[int, int], balance: float, *, seed: int = 0,
              n: int = 300) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` crops of (image, mask) where the image's channel 0 holds each pixel's flat index, so
    a crop tells where it was cut (labels as inside `JointTransform`: 0 = void)."""
    from torchvision import tv_tensors

    from pixelwise.data.transforms import ClassBalancedCrop

    height, width = mask.shape
    index = torch.arange(height * width, dtype=torch.float32).reshape(1, height, width) + 1
    image = tv_tensors.Image(index)
    crop = ClassBalancedCrop(size, balance)
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        image_crop, sample = crop(image, {"semantic": tv_tensors.Mask(mask)})
        out.append((image_crop[0], sample["semantic"]))
    return out


def test_balanced_crops_centre_on_a_class_drawn_uniformly() -> None:
    """Classes 1 (most of the image), 2 (a band) and 3 (one pixel at (30, 40)): with balance 1 each
    is the centre class a third of the time, so the single pixel sits at the window's centre
    (8, 8) in about a third of the 16x16 crops; plain crops (balance 0) hold it anywhere in about
    (16/64) * (16/80) = 5 % of the crops."""
    mask = torch.ones(64, 80, dtype=torch.int64)
    mask[50:60] = 2
    mask[30, 40] = 3
    balanced = _balanced(mask, (16, 16), 1.0)
    centred = sum(int(m[8, 8]) == 3 for _, m in balanced)
    assert 0.25 < centred / len(balanced) < 0.42  # 1/3; 300 draws
    plain = sum(bool((m == 3).any()) for _, m in _balanced(mask, (16, 16), 0.0))
    assert plain / 300 < 0.12
    for index, m in balanced:  # the image window is the mask window
        top, left = divmod(int(index[0, 0]) - 1, 80)
        assert torch.equal(m, mask[top:top + 16, left:left + 16])


def test_balanced_crops_stay_inside_and_never_centre_on_void() -> None:
    """A class pixel in the corner gives the corner window; void (0) is never drawn; an all-void
    mask still gives a plain random crop."""
    mask = torch.zeros(20, 24, dtype=torch.int64)
    mask[0, 0] = 5
    for index, m in _balanced(mask, (8, 8), 1.0, n=20):
        assert int(index[0, 0]) == 1 and int(m[0, 0]) == 5  # window at (0, 0)
    tops = {int(index[0, 0]) for index, _ in _balanced(torch.zeros(20, 24, dtype=torch.int64),
                                                       (8, 8), 1.0, n=30)}
    assert len(tops) > 5


def test_balanced_crop_of_a_small_image_pads_and_keeps_the_class() -> None:
    """A 6x8 image in a 10x12 crop: padded by v2 (void), the whole image inside the window
    wherever the centre is (v2 pads by the shortfall on both sides, so any window of the padded
    image holds all of it)."""
    mask = torch.ones(6, 8, dtype=torch.int64)
    mask[5, 7] = 2
    for _, m in _balanced(mask, (10, 12), 1.0, n=20):
        assert m.shape == (10, 12)
        rows, cols = (m != 0).any(1).nonzero()[:, 0], (m != 0).any(0).nonzero()[:, 0]
        inside = m[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
        assert torch.equal(inside, mask) and int((m == 0).sum()) == 10 * 12 - 6 * 8


def test_crop_balance_refusals_and_cli(data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.data.transforms import ClassBalancedCrop

    with pytest.raises(UserError, match="crop balance must be in"):
        ClassBalancedCrop(8, 1.5)
    with pytest.raises(UserError, match="crop_balance needs a crop"):
        TrainConfig(crop_balance=0.5)
    with pytest.raises(UserError, match="crop_balance must be in"):
        TrainConfig(crop=(8, 8), crop_balance=-0.1)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--crop", "32", "--crop-balance",
                 "0.5", "--max-steps", "2", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["crop_balance"] == 0.5
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "other"),
                 "--crop-balance", "0.5"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crop_balance needs a crop" in err[0]


# -- rescale, rotation and colour jitter (--scale-jitter, --rotate, --color-jitter) -----------


def test_rescale_then_crop_gives_windows_of_the_rescaled_mask(data: Path) -> None:
    """scale (2, 2) and a crop of the original size: every mask is a window of the mask doubled
    by nearest-exact (each label a 2x2 block), flipped or not."""
    task = SemanticTask.from_data(data)
    image, mask = task.dataset(data, "train")[1]
    doubled = mask.repeat_interleave(2, 0).repeat_interleave(2, 1)  # (96, 128)
    augmented = task.dataset(data, "train", train=True, scale=(2.0, 2.0), crop=(48, 64))
    torch.manual_seed(0)
    for _ in range(4):
        out_image, out_mask = augmented[1]
        assert out_image.shape == (3, 48, 64) and out_mask.shape == (48, 64)
        hits = [spot for m in (doubled, doubled.flip(-1))
                for spot in _find_window(m[None], out_mask[None])]
        assert hits, "not a window of the doubled mask"


def test_rotation_keeps_labels_and_voids_the_corners(tmp_path: Path) -> None:
    """A mask of one class rotated: only that class and ignore (nearest, no blended labels);
    ignore in the corners that left the frame, where the (bilinear) image is black too, up to
    the blended pixels along the cut."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "set"
    for sub in ("images/train", "masks/train"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / "images/train/a.png")
    Image.fromarray(np.ones((40, 40), np.uint8)).save(root / "masks/train/a.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    task = SemanticTask.from_data(root)
    rotated = task.dataset(root, "train", train=True, rotate=45)
    torch.manual_seed(0)
    voids = []
    for _ in range(6):
        image, mask = rotated[0]
        assert set(mask.unique().tolist()) <= {1, IGNORE}
        void, black = mask == IGNORE, (image == 0).all(0)
        assert not bool((black & ~void).any())  # (H, W): no black pixel is labelled
        assert int(void.sum()) - int(black.sum()) <= 2 * 40 * 2  # the cut: 2 px per edge
        assert not bool(void[15:25, 15:25].any())  # the centre stays inside
        voids.append(int(void.sum()))
    assert max(voids) > 50  # angles up to 45 degrees cut the corners off


def test_colour_jitter_changes_the_image_not_the_mask(data: Path) -> None:
    task = SemanticTask.from_data(data)
    image, mask = task.dataset(data, "train")[0]
    torch.manual_seed(0)
    out_image, out_mask = task.dataset(data, "train", train=True, jitter=0.4)[0]
    flipped = not torch.equal(out_mask, mask)
    assert torch.equal(out_mask, mask.flip(-1) if flipped else mask)
    assert not torch.allclose(out_image, image.flip(-1) if flipped else image)


def test_augmentation_settings_checks_and_cli(data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for bad, message in [
        ({"scale_jitter": [0.5]}, "scale_jitter takes two factors"),
        ({"scale_jitter": [2.0, 1.0], "crop": (8, 8)}, "scale_jitter must satisfy"),
        ({"scale_jitter": [0.5, 2.0]}, "scale_jitter needs --crop or --size"),
        ({"rotate": 200.0}, "rotate must be in"),
        ({"color_jitter": 1.5}, "color_jitter must be in"),
        ({"task": "instance", "rotate": 10.0}, "rotate is for the semantic task"),
    ]:
        with pytest.raises(UserError, match=message):
            TrainConfig(**bad)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--crop", "32", "--scale-jitter",
                 "0.8,1.2", "--rotate", "10", "--color-jitter", "0.1", "--max-steps", "2",
                 "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["scale_jitter"], saved["rotate"], saved["color_jitter"]) == ([0.8, 1.2], 10, 0.1)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "other"),
                 "--scale-jitter", "0.8,1.2"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scale_jitter needs --crop or --size" in err[0]
