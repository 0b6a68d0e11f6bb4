"""`SemanticDataset(cache=True)` / `pixelwise train --cache`: later reads come from memory and
equal a fresh read, augmentation still runs on every read, bad samples stay skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.semantic import SemanticDataset
from pixelwise.engine.loader import SeededDataset
from pixelwise.tasks.semantic import SemanticTask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("semantic", tmp_path / "set", num=6, size=(32, 40), seed=0)


def test_cached_reads_equal_fresh_reads_without_the_files(data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    fresh = SemanticDataset(data, "train")
    cached = SemanticDataset(copy, "train", cache=True)
    first = [cached[i] for i in range(len(cached))]
    shutil.rmtree(copy / "images")  # later reads must not need the files
    for i in range(len(cached)):
        image, mask = cached[i]
        want_image, want_mask = fresh[i]
        assert torch.equal(image, want_image) and torch.equal(first[i][0], want_image)
        assert torch.equal(mask, want_mask) and mask.dtype == torch.int64
        assert type(image) is type(want_image) and type(mask) is type(want_mask)
    stored_image, stored_mask = cached._cache[0]
    assert stored_image.dtype == torch.uint8 and stored_mask.dtype == torch.uint8


def test_augmentation_runs_on_every_cached_read(data: Path) -> None:
    """Seeded items of a cached, augmented dataset equal those of an uncached one, epoch after
    epoch (so --cache changes no training stream)."""
    task = SemanticTask.from_data(data)
    options = dict(train=True, crop=(16, 16), class_mix=0.5)
    plain = SeededDataset(task.dataset(data, "train", **options), seed=1)
    cached = SeededDataset(task.dataset(data, "train", cache=True, **options), seed=1)
    crops = set()
    for epoch in range(3):
        for i in range(len(plain)):
            a, b = plain[(epoch, i)], cached[(epoch, i)]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            if i == 0:
                crops.add(b[0].numpy().tobytes())
    assert len(crops) == 3  # a new random crop of image 0 each epoch


def test_bad_samples_are_skipped_once_and_stay_skipped(data: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    mask_path = sorted((data / "masks" / "train").iterdir())[0]
    bad = np.array(Image.open(mask_path))
    bad[0, 0] = 77  # no such class
    Image.fromarray(bad).save(mask_path)
    cached = SemanticDataset(data, "train", skip_bad=True, cache=True)
    with caplog.at_level("WARNING"):
        assert cached[0] is None
    assert "77" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cached[0] is None and cached[1] is not None
    assert caplog.text == ""  # logged at the first read only


def test_cli_cache_flag_is_saved_and_may_change_on_resume(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--no-progress", "--cache",
                 "--max-steps", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["cache"] is True
    assert main(["train", "--out", str(out), "--resume", "--no-cache", "--max-steps", "2",
                 "--no-progress"]) == 0
