"""`pixelwise demo` (semantic): the files it writes and a summary whose mIoU the files confirm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelwise.cli import main
from pixelwise.demos import semantic as demo


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "runs-demo"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(["demo", "--quick", "--out", str(out), "--json"])
    assert code == 0
    return out, json.loads(buffer.getvalue())


def test_demo_writes_data_run_predictions_and_summary(quick_demo: tuple[Path, dict]) -> None:
    out, summary = quick_demo
    for rel in ("data/classes.json", "run/config.json", "run/metrics.jsonl", "run/curves.png",
                "run/best.safetensors", "run/last.safetensors", "metrics.json", "examples.png",
                "demo.json"):
        assert (out / rel).is_file(), rel
    val_images = sorted(p.stem for p in (out / "data" / "images" / "val").iterdir())
    assert val_images
    assert sorted(p.stem for p in (out / "predictions").glob("*.png")) == val_images
    assert sorted(p.stem for p in (out / "predictions" / "overlays").glob("*.png")) == val_images
    assert summary["task"] == "semantic" and summary["model"] == "unet"
    assert summary["steps"] == demo.QUICK["budget_steps"]
    assert json.loads((out / "demo.json").read_text()) == summary
    assert Path(summary["checkpoint"]).is_file() and Path(summary["examples"]).is_file()


def test_demo_miou_matches_its_prediction_files(quick_demo: tuple[Path, dict]) -> None:
    """Recompute the val mIoU from predictions/*.png and masks/val/*.png with a plain numpy
    confusion matrix (FCN conventions: classes absent from both sides left out)."""
    out, summary = quick_demo
    classes = json.loads((out / "data" / "classes.json").read_text())
    k, ignore = len(classes["classes"]), classes["ignore_index"]
    confusion = np.zeros((k, k), dtype=np.int64)
    for mask_path in sorted((out / "data" / "masks" / "val").glob("*.png")):
        target = np.array(Image.open(mask_path))
        pred = np.array(Image.open(out / "predictions" / mask_path.name))
        assert pred.shape == target.shape
        keep = target != ignore
        np.add.at(confusion, (target[keep], pred[keep]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    miou = float(np.mean(tp[union > 0] / union[union > 0]))
    assert 0.0 <= summary["val_miou"] <= 1.0
    assert summary["val_miou"] == pytest.approx(miou, abs=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(miou, abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(tp.sum() / confusion.sum(), abs=1e-9)


def test_demo_replaces_only_its_own_entries(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "old.txt").write_text("old")
    (out / "notes.txt").write_text("mine")
    (out / demo.MARKER).write_text("{}")
    demo.prepare_out(out, demo.ENTRIES)
    assert not (out / "run").exists() and not (out / demo.MARKER).exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_demo_refuses_a_foreign_non_empty_folder(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "important.txt").write_text("keep")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no earlier demo" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["important.txt"]


def test_demo_unknown_model_lists_the_valid_ones(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--quick", "--model", "nope", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "unet" in err
    assert not (tmp_path / "d").exists()


def test_plain_output_leads_with_the_score_and_the_goal_then_the_paths(
        quick_demo: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.cli.demo import print_summary

    _, summary = quick_demo
    print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("semantic unet demo: val_miou ")
    assert f"goal_miou {summary['goal_miou']}" in lines[0]
    assert lines[1].startswith(f"trained {summary['steps']} steps")
    listed = dict(line.split(None, 1) for line in lines[2:-1])
    assert listed["overlays"] == summary["overlays"] and listed["curves"] == summary["curves"]
    assert lines[-1] == f"next: {summary['next']}"
