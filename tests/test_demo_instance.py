"""`pixelwise demo --task instance / keypoints --quick`: every output written and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pixelwise.cli import EXIT_USER_ERROR, main


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("task", "model", "headline"), [
    ("instance", "mask_rcnn", "segm"),
    ("keypoints", "keypoint_rcnn", "keypoints"),
    ("instance", "solov2", "segm"),
])
def test_quick_demo_writes_run_metrics_and_predictions(
        task: str, model: str, headline: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--task", task, "--model", model, "--quick", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == task and summary["model"] == model
    assert summary["steps"] == 2
    for key in ("checkpoint", "curves", "metrics", "results"):
        assert Path(summary[key]).is_file(), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary[f"val_{headline}_AP"] == round(metrics[headline]["AP"], 4)
    assert json.loads((out / "demo.json").read_text()) == summary
    val_images = sorted((out / "data" / "images" / "val").iterdir())
    overlays = sorted((out / "predictions" / "overlays").iterdir())
    assert [p.stem for p in overlays] == [p.stem for p in val_images]
    results = json.loads(Path(summary["results"]).read_text())
    assert isinstance(results, list)
    # the results carry the val json's image ids (the images are in the dataset's layout)
    kind = "instances" if task == "instance" else "keypoints"
    gt = json.loads((out / "data" / "annotations" / f"{kind}_val.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in gt["images"]}
    # a non-empty folder that holds no earlier demo is refused before any work
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["demo", "--task", task, "--quick", "--out", str(foreign)]) == EXIT_USER_ERROR
    assert (foreign / "notes.txt").read_text() == "keep"
