"""`--skip-bad` on `pixelwise train` and `pixelwise eval`: a synthetic set with one corrupt
training image and one corrupt validation image, for the semantic, instance and panoptic tasks.

Without the flag both commands stop with the one line `pixelwise data check` prints for that
file (and write no run); with it they log the file, train on the other images and evaluate the
good validation images only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.engine.loader import DropBadSamples, ReplaceBadSamples
from pixelwise.errors import UserError

LEAN_RCNN = ["--backbone", "resnet18", "--mask-head-layers", "16"]
for _key, _value in dict(box_batch_size_per_image=32, rpn_batch_size_per_image=32,
                         rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                         rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                         box_detections_per_img=10).items():
    LEAN_RCNN += ["--model-option", f"{_key}={_value}"]

TRAIN_ARGS = {
    "semantic": ["--model", "unet", "--width", "4", "--depth", "2"],
    "instance": ["--task", "instance", "--model", "mask_rcnn", *LEAN_RCNN],
    "panoptic": ["--task", "panoptic", "--model", "panoptic_fpn", *LEAN_RCNN,
                 "--model-option", "semantic_channels=16"],
}
COMMON = ["--batch-size", "2", "--epochs", "1", "--no-progress", "--lr", "1e-4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.fixture(scope="module", params=sorted(TRAIN_ARGS))
def broken(request, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    """(task, dataset, corrupt train image, corrupt val image)."""
    from pixelwise.data.synthetic import synthesize

    task = request.param
    root = synthesize(task, tmp_path_factory.mktemp(task) / "set", num=8, size=(64, 64), seed=3,
                      val_fraction=0.25)
    train_image = _truncate(sorted((root / "images" / "train").iterdir())[1])
    val_image = _truncate(sorted((root / "images" / "val").iterdir())[0])
    return task, root, train_image, val_image


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("pixelwise: error")]
    assert len(lines) == 1, err
    return lines[0]


def test_without_skip_bad_training_stops_on_the_bad_file_and_writes_no_checkpoint(
        broken, tmp_path, capsys) -> None:
    task, root, train_image, val_image = broken
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out), *TRAIN_ARGS[task],
                 *COMMON]) == EXIT_USER_ERROR
    line = _one_line(capsys.readouterr().err)
    # training reads the bad training image first
    assert f"/train/{train_image.name}:" in line or f"/val/{val_image.name}:" in line
    assert not (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()


def test_skip_bad_trains_around_the_bad_files_and_eval_leaves_them_out(
        broken, tmp_path, capsys, caplog) -> None:
    task, root, train_image, val_image = broken
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--data", str(root), "--out", str(out), *TRAIN_ARGS[task],
                     *COMMON, "--skip-bad", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3  # one epoch: 6 training images, batch 2, every one read
    assert train_image.name in caplog.text and val_image.name in caplog.text
    assert (out / "last.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["train"]["skip_bad"] is True

    assert main(["eval", str(out), "--data", str(root), "--json"]) == EXIT_USER_ERROR
    assert val_image.name in _one_line(capsys.readouterr().err)
    assert main(["eval", str(out), "--data", str(root), "--json", "--skip-bad"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics  # the task's metrics over the good val images


def test_eval_on_only_bad_images_says_there_is_nothing_to_evaluate(tmp_path, capsys) -> None:
    """A run evaluated on a val split whose every image has gone bad since training."""
    from pixelwise.data.synthetic import synthesize

    root = synthesize("semantic", tmp_path / "set", num=4, size=(32, 32), seed=3,
                      val_fraction=0.5)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out), *TRAIN_ARGS["semantic"],
                 *COMMON]) == 0
    for image in (root / "images" / "val").iterdir():
        _truncate(image)
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(root), "--skip-bad"]) == EXIT_USER_ERROR
    assert "no images to evaluate" in _one_line(capsys.readouterr().err)


class _Holey(torch.utils.data.Dataset):
    """Samples 0..n-1 where the indices in `bad` read as None."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad, self.name = n, bad, "holey"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return None if index in self.bad else index


def test_replace_bad_samples_takes_the_next_good_one_and_wraps_around() -> None:
    data = ReplaceBadSamples(_Holey(5, {1, 2, 4}))
    assert [data[i] for i in range(5)] == [0, 3, 3, 3, 0]
    assert len(data) == 5 and data.name == "holey"  # attributes of the wrapped dataset
    with pytest.raises(UserError, match="every sample of the training set is bad"):
        ReplaceBadSamples(_Holey(3, {0, 1, 2}))[1]


def test_drop_bad_samples_collates_the_good_ones_and_gives_none_for_an_all_bad_batch() -> None:
    collate = DropBadSamples(lambda batch: torch.tensor(batch))
    assert collate([None, 2, None, 5]).tolist() == [2, 5]
    assert collate([None, None]) is None
    import pickle

    assert pickle.loads(pickle.dumps(DropBadSamples(sorted)))([3, None, 1]) == [1, 3]
