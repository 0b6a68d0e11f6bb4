"""`pixelwise experiment NAME --quick`: md + png + json with one row per variant, sane values."""

from __future__ import annotations

import importlib
import io
import json
from contextlib import redirect_stdout
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.experiments import EXPERIMENTS, ExperimentOptions
from pixelwise.experiments.common import (
    Budget,
    Variant,
    dataset_classes,
    make_data,
    output_checkerboard,
    train_variant,
)
from pixelwise.experiments.report import count, fixed, markdown_table
from pixelwise.upsample import UPSAMPLERS

RATIOS = ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou")


def _expected_variants(name: str) -> list[str]:
    module = importlib.import_module(EXPERIMENTS[name])
    q = module.QUICK
    if name == "receptive-field":
        return list(module.variants(q))
    return list(module.variants(q["width"], q["depth"]))


pytestmark = pytest.mark.usefixtures("one_thread")


Report = tuple[str, Path, dict]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Report]:
    """quick(name) -> (name, out, report) of `pixelwise experiment NAME --quick --json`, run once
    per module."""
    done: dict[str, Report] = {}

    def get(name: str) -> Report:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            buffer = io.StringIO()
            with redirect_stdout(buffer):
                assert main(["experiment", name, "--quick", "--out", str(out), "--json"]) == 0
            done[name] = (name, out, json.loads(buffer.getvalue()))
        return done[name]

    return get


@pytest.fixture(params=list(EXPERIMENTS))
def quick_report(request: pytest.FixtureRequest, quick: Callable[[str], Report]) -> Report:
    return quick(request.param)


def test_report_files_and_one_row_per_variant(quick_report: Report) -> None:
    name, out, report = quick_report
    stem = name
    for suffix in (".md", ".png", ".json"):
        assert (out / f"{stem}{suffix}").is_file()
    assert json.loads((out / f"{stem}.json").read_text()) == {
        k: v for k, v in report.items() if k != "files"}
    names = [row["name"] for row in report["rows"]]
    assert names == _expected_variants(name)
    markdown = (out / f"{stem}.md").read_text()
    for variant in names:
        assert sum(line.startswith(f"| {variant} |") for line in markdown.splitlines()) == 1
    with Image.open(out / f"{stem}.png") as png:
        assert png.width >= 800 and png.height >= 600
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_rows_hold_sane_values(quick_report: Report) -> None:
    name, _, report = quick_report
    settings = report["settings"]
    for row in report["rows"]:
        for key in RATIOS:
            assert 0.0 <= row[key] <= 1.0, (row["name"], key)
        assert row["boundary_f"] is None or 0.0 <= row["boundary_f"] <= 1.0
        assert 0.0 <= row["output_checkerboard"] <= 1.0
        assert row["params"] > 0 and row["flops"] > 0
        assert row["ms_per_image"] > 0 and row["train_seconds"] > 0
        assert row["steps"] == settings["budget_steps"]
        assert set(row["per_class_iou"]) == {"sky", "ground", "water", "person", "ellipse",
                                             "rectangle", "triangle"}
        # pixel accuracy is the confusion matrix's trace share: never below mIoU's worst case
        assert row["pixel_accuracy"] >= row["fw_iou"] - 1e-9


def test_upsamplers_rows_cover_every_operator(quick: Callable[[str], Report]) -> None:
    _, _, report = quick("upsamplers")
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == set(UPSAMPLERS)
    # overlap-pattern scores: even for interpolations and the 4x4/2 transposed conv, none (holes)
    # for bed of nails and max unpooling
    for even in ("nearest", "bilinear", "bicubic", "transposed"):
        assert rows[even]["checkerboard"] == pytest.approx(1.0)
    assert rows["bed_of_nails"]["checkerboard"] is None
    assert rows["max_unpool"]["checkerboard"] is None
    # parameter-free upsamplers give U-Nets of equal size; learned ones add parameters
    assert rows["nearest"]["params"] == rows["bilinear"]["params"] == rows["bicubic"]["params"]
    for learned in ("transposed", "resize_conv", "pixel_shuffle"):
        assert rows[learned]["params"] > rows["bilinear"]["params"]


def test_fcn_rows_share_the_stride_32_encoder(quick: Callable[[str], Report]) -> None:
    _, _, report = quick("fcn-skips")
    assert [r["name"] for r in report["rows"]] == ["FCN-32s", "FCN-16s", "FCN-8s"]
    assert {r["output_stride"] for r in report["rows"]} == {32}
    assert [p["miou"] for p in report["paper"]] == [59.4, 62.4, 62.7]


def test_receptive_fields_match_hand_computed(quick: Callable[[str], Report]) -> None:
    name, _, report = quick("receptive-field")
    rows = {row["name"]: row for row in report["rows"]}
    q = importlib.import_module(EXPERIMENTS[name]).QUICK
    assert rows["patch_classifier"]["receptive_field"] == q["patch"]  # P x P patch
    assert rows["flat_fcn"]["receptive_field"] == 1 + 2 * 8  # 8 3x3 convs
    assert rows["flat_fcn_deep"]["receptive_field"] == 1 + 2 * 16
    assert rows["unet"]["receptive_field"] > report["settings"]["size"]
    assert rows["unet"]["output_stride"] == 8  # depth 3
    assert rows["patch_classifier"]["sliding_ms_per_image"] > 0
    assert all(rows[n]["sliding_ms_per_image"] is None for n in ("flat_fcn", "unet"))


def test_existing_report_is_not_replaced_without_overwrite(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "fcn-skips.md").write_text("earlier")
    assert main(["experiment", "fcn-skips", "--quick", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "fcn-skips.md").read_text() == "earlier"


def test_budget_options_are_exclusive_and_checked(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "upsamplers", "--budget-steps", "3", "--budget-seconds", "2"])
    assert exit_info.value.code == 2
    assert main(["experiment", "upsamplers", "--budget-steps", "0", "--out", str(tmp_path)]) == 2
    assert "--budget-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "nope"])
    with pytest.raises(ValueError, match="upsamplers"):
        from pixelwise.experiments import run_experiment

        run_experiment("nope", tmp_path, ExperimentOptions())


def test_seconds_budget_becomes_steps_within_limits(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", size=32, num=10, seed=0)
    trained = train_variant(Variant("u", "unet", {"width": 4, "depth": 2}), data, tmp_path / "run",
                            budget=Budget(seconds=1e-6), batch_size=4, lr=1e-3, min_steps=1,
                            max_steps=3)
    assert trained.steps == 1 and trained.step_seconds > 0  # 1e-6 s buys less than one step
    trained = train_variant(Variant("u", "unet", {"width": 4, "depth": 2}), data, tmp_path / "run",
                            budget=Budget(seconds=1e6), batch_size=4, lr=1e-3, max_steps=2)
    assert trained.steps == 2


def test_dataset_classes_reads_the_writers_colours(tmp_path: Path) -> None:
    from pixelwise.data.synth_scene import SCENE_CATEGORIES

    data = make_data(tmp_path / "data", size=16, num=3, seed=0)
    names, colors = dataset_classes(data)
    shapes = SCENE_CATEGORIES["shapes"]
    assert names == [c.name for c in shapes]
    assert colors == [list(c.color) for c in shapes]  # the synthetic writer's palette


def test_output_checkerboard_of_known_maps() -> None:
    h = w = 16
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((y + x) % 2).float()[None, None] * 2 - 1  # +-1 checkerboard (1, 1, H, W)
    stripes = (x % 2).float()[None, None]  # period 2 along x only
    ramp = (x + y).float()[None, None]
    assert output_checkerboard(checker) == pytest.approx(1.0)
    assert output_checkerboard(stripes) == pytest.approx(1.0)
    assert output_checkerboard(torch.full((1, 2, h, w), 3.0)) == 0.0
    # a ramp's energy sits at low frequencies: its Nyquist share is small but not zero
    assert 0.0 < output_checkerboard(ramp) < 0.05


def test_markdown_table_and_formatters() -> None:
    rows = [{"name": "a", "v": 0.12345, "n": 1234567}, {"name": "b", "v": None, "n": 12}]
    table = markdown_table(rows, [("name", "model", str), ("v", "value", fixed(2)),
                                  ("n", "params", count)])
    assert table.splitlines() == ["| model | value | params |", "|---|---|---|",
                                  "| a | 0.12 | 1.23M |", "| b | - | 12 |"]
