"""SOLOv2 through the CLI, like `mask_rcnn`: train (and resume), eval with COCO AP, predict
with a COCO results json and overlays, all on a tiny synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pixelwise.cli import main

TINY = ["--task", "instance", "--model", "solov2", "--backbone", "resnet18",
        "--model-option", "grid_sizes=[8, 6, 4, 3, 2]",
        "--model-option", "scale_ranges=[[1, 24], [12, 48], [24, 64], [48, 128], [64, 256]]",
        "--model-option", "head_channels=16", "--model-option", "stacked_convs=1",
        "--model-option", "kernel_channels=16", "--model-option", "mask_channels=16",
        "--model-option", "score_threshold=0.0", "--model-option", "update_threshold=0.0",
        "--batch-size", "2", "--epochs", "2", "--lr", "1e-4", "--no-progress",
        "--deterministic"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("instance", tmp_path_factory.mktemp("solo") / "set", num=6,
                      size=(64, 80), seed=2, val_fraction=0.34)


def test_train_resume_eval_predict(data: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.models.solov2 import SOLOv2

    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "1",
                 *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["best_metric"] == "segm_AP"
    model, meta = load_model(run)
    assert isinstance(model, SOLOv2) and meta["model"]["name"] == "solov2"

    assert main(["eval", str(run), "--data", str(data), "--checkpoint", "last", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"bbox", "segm"} <= set(metrics) and "AP50" in metrics["segm"]
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["segm"]["AP"] == pytest.approx(record["val"]["segm"]["AP"], abs=1e-12)
    assert main(["eval", str(run), "--data", str(data), "--checkpoint", "last", "--json",
                 "--max-dets", "150"]) == 0  # more detections scored per image: AR100 -> AR150
    assert "AR150" in json.loads(capsys.readouterr().out)["segm"]
    # test-time flip: other detections, the same metrics' names
    assert main(["eval", str(run), "--data", str(data), "--checkpoint", "last", "--json",
                 "--tta", "flip"]) == 0
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["segm"].keys() == metrics["segm"].keys() and flipped != metrics
    assert main(["eval", str(run), "--data", str(data), "--tta-scales", "1,2"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--tta-scales is for semantic runs; instance runs take --tta flip (solov2, mask_rcnn)")

    out = tmp_path / "pred"
    assert main(["predict", str(run), str(data / "images" / "val"), "--out", str(out),
                 "--score-threshold", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "images" / "val"), "--out",
                 str(tmp_path / "pred_flip"), "--score-threshold", "0", "--tta", "flip",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tta"] == {"flip": True, "scales": [1.0]}
    assert json.loads((tmp_path / "pred_flip" / "results.json").read_text()) != results
    gt = json.loads((data / "annotations" / "instances_val.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in gt["images"]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    for r in results:  # a box derived from the mask, an RLE mask, a score
        assert len(r["bbox"]) == 4 and "counts" in r["segmentation"] and 0 <= r["score"] <= 1
    overlays = sorted(p.stem for p in (out / "overlays").iterdir())
    assert overlays == sorted(p.stem for p in (data / "images" / "val").iterdir())


def test_mask_classifier_through_the_cli(data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--model-option mask_classifier=true`: its loss is logged, the checkpoint rebuilds it,
    eval and predict use it."""
    from pixelwise.engine.checkpoint import load_model

    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "2", *TINY,
                 "--model-option", "mask_classifier=true", "--model-option", "classifier_size=8",
                 "--model-option", "classifier_widths=[8]"]) == 0
    capsys.readouterr()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_mask_class" in json.dumps(record)
    model, _ = load_model(run)
    assert model.mask_classifier is not None and model.mask_classifier.size == 8
    assert main(["eval", str(run), "--data", str(data), "--json"]) == 0
    assert "AP50" in json.loads(capsys.readouterr().out)["segm"]
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(data / "images" / "val"), "--out", str(out),
                 "--score-threshold", "0"]) == 0
    assert json.loads((out / "results.json").read_text())
