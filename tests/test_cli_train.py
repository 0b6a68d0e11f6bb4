"""`pixelwise train` and `pixelwise eval` through the real CLI, in-process, on tiny data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pixelwise.cli import EXIT_USER_ERROR, build_parser, main
from pixelwise.upsample import UPSAMPLERS

METRIC_KEYS = {"miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice", "per_class"}
TINY = ["--model", "unet", "--width", "8", "--depth", "2", "--batch-size", "4", "--lr", "0.01",
        "--no-progress", "--seed", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("semantic", tmp_path_factory.mktemp("data") / "set", num=10,
                      size=(32, 32), seed=0)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--max-steps", "3", "--upsample", "pixel_shuffle", *TINY]) == 0
    return out


def upsampler_types(model: torch.nn.Module) -> list[type]:
    kinds = set(UPSAMPLERS.values())
    return [type(m) for m in model.modules() if type(m) in kinds]


def test_upsample_option_travels_from_the_command_line_to_every_decoder_stage() -> None:
    from pixelwise.cli.train import build_config
    from pixelwise.models import build_model

    args = build_parser().parse_args(["train", "--model", "unet", "--upsample", "pixel_shuffle",
                                      "--data", "D", "--out", "R"])
    cfg = build_config(args)
    assert cfg.model_options == {"upsample": "pixel_shuffle"}
    model = build_model(cfg.model, num_classes=3, **cfg.model_options)
    found = upsampler_types(model)
    assert len(found) == 4  # the default depth 4: one upsampler per decoder stage
    assert set(found) == {UPSAMPLERS["pixel_shuffle"]}


def test_channels_last_flag_reaches_the_config() -> None:
    from pixelwise.cli.train import build_config

    base = ["train", "--model", "unet", "--data", "D", "--out", "R"]
    assert build_config(build_parser().parse_args(base + ["--channels-last"])).channels_last
    assert not build_config(build_parser().parse_args(base)).channels_last


def test_train_writes_a_run_that_eval_rebuilds_from_the_checkpoint(
        trained: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_model

    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "metrics.jsonl", "curves.png", "last.safetensors",
            "best.safetensors"} <= names
    model, meta = load_model(trained)  # the model again, from the checkpoint alone
    assert set(upsampler_types(model)) == {UPSAMPLERS["pixel_shuffle"]}
    assert meta["model"]["upsample"] == "pixel_shuffle" and meta["model"]["num_classes"] == 7
    capsys.readouterr()
    assert main(["eval", str(trained), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == METRIC_KEYS
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["miou"] == pytest.approx(record["val"]["miou"], abs=1e-9)
    assert main(["eval", str(trained)]) == 0  # --data defaults to the run's data
    assert "pixel_accuracy" in capsys.readouterr().out
    assert main(["eval", str(trained), "--max-dets", "300"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-dets applies to the instance and keypoints tasks" in err[0]


def test_resume_continues_and_refuses_other_settings(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5"]) == EXIT_USER_ERROR
    assert "cannot change lr" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4]  # 8 train images / batch 4 = 2 steps per epoch


def test_existing_run_is_not_overwritten_and_errors_are_one_line(
        trained: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (trained / "last.safetensors").read_bytes()
    assert main(["train", "--data", str(data), "--out", str(trained), *TINY]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err
    assert (trained / "last.safetensors").read_bytes() == before
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--model", "unet",
                 "--upsample", "nope"]) == EXIT_USER_ERROR
    assert "pixel_shuffle" in capsys.readouterr().err  # lists the valid names
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--model", "unet",
                 "--loss", "ce+hinge"]) == EXIT_USER_ERROR
    assert "valid names: ce, dice, focal" in capsys.readouterr().err


def test_loss_at_net_trains_and_is_refused_where_it_does_nothing(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "coarse"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "2",
                 "--input-scale", "0.5", "--loss-at", "net", "--loss", "ce+dice", *TINY]) == 0
    assert json.loads((run / "config.json").read_text())["task"]["loss_at"] == "net"
    capsys.readouterr()
    for extra, message in ((["--loss-at", "net"], "input-scale 1/k"),
                           (["--loss-at", "pixels"], "valid names: image, net"),
                           (["--loss-at", "net", "--task", "instance", "--model", "mask_rcnn"],
                            "for the semantic task")):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "no"), *TINY,
                     *extra]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
        assert not (tmp_path / "no" / "last.safetensors").exists()


def test_eval_refuses_data_with_another_number_of_classes(
        trained: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert main(["eval", str(trained), "--data", str(other)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "model has 7 classes" in err and "has 3" in err


def test_nan_loss_is_one_line_and_keeps_the_checkpoint(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pixelwise.tasks.semantic import SemanticTask

    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", *TINY]) == 0
    good = (out / "last.safetensors").read_bytes()
    original = SemanticTask.loss
    monkeypatch.setattr(SemanticTask, "loss", lambda self, model, batch: {
        name: value * float("inf") for name, value in original(self, model, batch).items()})
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: loss became inf at step 5")
    assert "last good checkpoint" in err[0]
    assert (out / "last.safetensors").read_bytes() == good


def test_cells_in_16_bit_tiff_train_evaluate_and_predict(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Cell-like scenes as 16-bit grayscale TIFF (microscopy): a one-channel U-Net is built from
    the data, trained, evaluated and used on a TIFF, whose label PNG has the image's size."""
    import numpy as np
    import tifffile
    from PIL import Image

    from pixelwise.data.synthetic import synthesize
    from pixelwise.engine.checkpoint import load_model

    data = synthesize("semantic", tmp_path / "cells", num=6, size=(48, 40), seed=4, cells=True,
                      gray16=True, image_format="tif")
    image = sorted((data / "images" / "val").iterdir())[0]
    raw = tifffile.imread(image)
    assert image.suffix == ".tif" and raw.dtype == np.uint16 and raw.ndim == 2
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--max-steps", "2", *TINY]) == 0
    model, _ = load_model(run)
    assert model.in_channels == 1
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["pixel_accuracy"] <= 1.0
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "pred")]) == 0
    labels = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}.png"))
    assert labels.shape == raw.shape
