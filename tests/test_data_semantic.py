"""pixelwise.data.semantic.SemanticDataset: pixelwise layout, VOC, explicit files, bad samples.

References: the files read back directly with Pillow / tifffile / numpy, and `check_dataset`'s
messages (the dataset must refuse a bad sample with the very same line).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from pixelwise.data.check import check_dataset, skip_none
from pixelwise.data.layout import VOC_CLASSES
from pixelwise.data.semantic import SemanticDataset
from pixelwise.data.synthetic import synthesize
from pixelwise.errors import UserError

SIZE = (24, 40)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthesize("semantic", tmp_path_factory.mktemp("sem") / "set", num=5, size=SIZE,
                      seed=3)


@pytest.fixture
def copy(synthetic: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic, tmp_path / "set"))


def _palette_png(path: Path, indices: np.ndarray) -> None:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_pixelwise_layout_samples_match_files(synthetic: Path) -> None:
    classes = json.loads((synthetic / "classes.json").read_text())
    for split in ("train", "val"):
        dataset = SemanticDataset(synthetic, split)
        names = sorted(p.name for p in (synthetic / "images" / split).iterdir())
        assert [image.name for image, _ in dataset.samples] == names
        assert dataset.class_names == tuple(classes["classes"])
        assert dataset.num_classes == len(classes["classes"])
        assert dataset.ignore_index == classes["ignore_index"]
        for (image_path, mask_path), (image, mask) in zip(dataset.samples, dataset):
            assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
            assert image.dtype == torch.float32 and image.shape == (3, *SIZE)
            assert mask.dtype == torch.int64 and mask.shape == SIZE
            pixels = np.asarray(Image.open(image_path), dtype=np.float64) / 255  # (H, W, 3)
            assert torch.allclose(image.permute(1, 2, 0).double(), torch.from_numpy(pixels))
            assert np.array_equal(mask.numpy(), np.asarray(Image.open(mask_path)))  # indices


def test_sixteen_bit_tiff_images(tmp_path: Path) -> None:
    root = synthesize("semantic", tmp_path / "g16", num=3, size=SIZE, seed=1, gray16=True,
                      image_format="tif")
    dataset = SemanticDataset(root, "train")
    image, mask = dataset[0]
    raw = tifffile.imread(dataset.samples[0][0])  # (H, W) uint16
    assert raw.dtype == np.uint16 and image.shape == (1, *SIZE)
    assert torch.equal(image[0], torch.from_numpy(raw.astype(np.float32) / 65535))


def test_transforms_move_image_and_mask(synthetic: Path) -> None:
    plain = SemanticDataset(synthetic, "train")
    flipped = SemanticDataset(synthetic, "train", transforms=v2.RandomHorizontalFlip(p=1.0))
    (image, mask), (image_f, mask_f) = plain[0], flipped[0]
    assert torch.equal(image_f, image.flip(-1)) and torch.equal(mask_f, mask.flip(-1))
    assert isinstance(mask_f, tv_tensors.Mask)


def _voc(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "JPEGImages").mkdir(parents=True)
    for i, name in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        image = rng.integers(0, 256, (10 + i, 14, 3)).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg")
        labels = rng.integers(0, 21, (10 + i, 14))
        labels[0] = 255  # object boundary
        _palette_png(root / "SegmentationClass" / f"{name}.png", labels)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2007_000039\n")
    (lists / "val.txt").write_text("2007_000063\n")
    return root


def test_voc_layout(tmp_path: Path) -> None:
    voc = _voc(tmp_path / "VOCdevkit" / "VOC2012")
    train = SemanticDataset(tmp_path / "VOCdevkit", "train")
    val = SemanticDataset(voc, "val")
    assert len(train) == 2 and len(val) == 1
    assert train.class_names == VOC_CLASSES and train.ignore_index == 255
    image, mask = val[0]
    assert image.shape == (3, 12, 14) and mask.shape == (12, 14)
    expected = np.asarray(Image.open(voc / "SegmentationClass" / "2007_000063.png"))
    assert np.array_equal(mask.numpy(), expected) and (mask[0] == 255).all()
    assert check_dataset(voc) == []


def test_from_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images, masks = [], []
    for i in range(3):
        images.append(tmp_path / "img" / f"{i}.png")
        masks.append(tmp_path / "lab" / f"label_{i}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 9)).astype(np.uint8)).save(images[-1])
        _palette_png(masks[-1], rng.integers(0, 4, (8, 9)))
    dataset = SemanticDataset.from_files(images, masks, ["a", "b", "c", "d"])
    assert len(dataset) == 3 and dataset.num_classes == 4
    image, mask = dataset[2]
    assert image.shape == (1, 8, 9)
    assert np.array_equal(mask.numpy(), np.asarray(Image.open(masks[2])))
    # without classes there is no label-range check
    _palette_png(masks[0], np.full((8, 9), 9))
    assert SemanticDataset.from_files(images, masks)[0][1].max() == 9
    with pytest.raises(UserError, match="outside the 4 classes"):
        dataset[0]
    with pytest.raises(UserError, match="3 image files but 2 mask files"):
        SemanticDataset.from_files(images, masks[:2])
    with pytest.raises(UserError, match=r"nope\.png: file not found"):
        SemanticDataset.from_files([tmp_path / "nope.png"], masks[:1])


def test_val_only_dataset(tmp_path: Path, copy: Path) -> None:
    shutil.rmtree(copy / "images" / "train")
    shutil.rmtree(copy / "masks" / "train")
    assert len(SemanticDataset(copy, "val")) > 0
    with pytest.raises(UserError, match=r"no 'train' split \(found: val\)"):
        SemanticDataset(copy, "train")


def test_missing_classes_json_or_masks(copy: Path) -> None:
    (copy / "classes.json").unlink()
    with pytest.raises(UserError, match=r"classes\.json: not found"):
        SemanticDataset(copy, "train")
    shutil.rmtree(copy / "masks")
    with pytest.raises(UserError, match="no semantic masks"):
        SemanticDataset(copy, "train")


BAD_SAMPLES = {
    "labels_out_of_range": lambda mask: _palette_png(mask, np.full(SIZE, 9)),
    "mask_size": lambda mask: _palette_png(mask, np.zeros((SIZE[0] + 1, SIZE[1]))),
    "truncated_mask": lambda mask: mask.write_bytes(mask.read_bytes()[:60]),
}


@pytest.mark.parametrize("name", list(BAD_SAMPLES))
def test_bad_sample_refused_with_the_check_message(copy: Path, name: str, caplog) -> None:
    dataset = SemanticDataset(copy, "train")
    BAD_SAMPLES[name](dataset.samples[1][1])
    problems = check_dataset(copy)
    assert len(problems) == 1 and problems[0].path == dataset.samples[1][1]
    with pytest.raises(UserError) as info:
        dataset[1]
    assert str(info.value) == str(problems[0])
    # skip_bad: None, one warning naming the file, and the collate helper drops it
    skipping = SemanticDataset(copy, "train", skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="pixelwise.data.check"):
        assert skipping[1] is None
    assert str(problems[0]) in caplog.text
    loader = torch.utils.data.DataLoader(
        skipping, batch_size=len(skipping),
        collate_fn=lambda batch: torch.utils.data.default_collate(skip_none(batch)))
    images, masks = next(iter(loader))
    assert images.shape[0] == len(skipping) - 1 == masks.shape[0]


def test_worker_error_keeps_the_one_line_message(copy: Path) -> None:
    dataset = SemanticDataset(copy, "train")
    BAD_SAMPLES["truncated_mask"](dataset.samples[0][1])
    expected = str(check_dataset(copy)[0])
    loader = torch.utils.data.DataLoader(dataset, num_workers=1, collate_fn=list)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert str(info.value) == expected  # not "Caught BadFileError in DataLoader worker ..."
    assert info.value.path == dataset.samples[0][1]


def test_missing_mask_refused_or_skipped(copy: Path) -> None:
    first = sorted((copy / "masks" / "train").iterdir())[0]
    first.unlink()
    with pytest.raises(UserError, match="no mask"):
        SemanticDataset(copy, "train")
    n_images = len(list((copy / "images" / "train").iterdir()))
    assert len(SemanticDataset(copy, "train", skip_bad=True)) == n_images - 1
