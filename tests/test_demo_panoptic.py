"""`pixelwise demo --task panoptic --quick`: synthesise, train, evaluate, predict and score,
with the PQ of the predicted files equal to the evaluation's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pixelwise.cli import EXIT_USER_ERROR, main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_demo_writes_everything_and_scores_agree(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--task", "panoptic", "--quick", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "panoptic" and summary["steps"] == 2
    assert summary["pq_of_predicted_files"] == pytest.approx(summary["pq"], abs=1e-12)
    assert set(summary["metrics"]) == {"pq", "all", "things", "stuff", "per_class"}
    for key in ("panoptic_json", "curves", "run"):
        assert Path(summary[key]).exists(), key
    pred = json.loads(Path(summary["panoptic_json"]).read_text())
    gt = json.loads((out / "data" / "annotations" / "panoptic_val.json").read_text())
    assert sorted(im["id"] for im in pred["images"]) == sorted(im["id"] for im in gt["images"])
    overlays = sorted(p.name for p in Path(summary["overlays"]).iterdir())
    assert overlays == sorted(im["file_name"] for im in gt["images"])
    assert json.loads((out / "summary.json").read_text())["pq"] == summary["pq"]


def test_demo_refuses_other_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--task", "panoptic", "--quick", "--model", "unet", "--out",
                 str(tmp_path / "d")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error:") and "panoptic_fpn" in err and "\n" not in err
    assert not (tmp_path / "d").exists()  # refused before anything was written
