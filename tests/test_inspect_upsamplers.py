"""The checkerboard inspection: scores against Odena et al.'s overlap counts, the files, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pixelwise import inspect_upsamplers
from pixelwise.cli import main
from pixelwise.inspect_upsamplers import VARIANTS, measure_upsamplers, write_report
from pixelwise.upsample import UPSAMPLERS

SMALL = (1, 4, 16, 16)  # timing shape for tests: 4 channels


@pytest.fixture(autouse=True)
def _short_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspect_upsamplers, "TIMING_BUDGET_S", 0.0)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return measure_upsamplers(timing_shape=SMALL, repeats=1)


def _row(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["name"] == name)


def test_every_operator_has_a_row(rows: list[dict]) -> None:
    assert [r["name"] for r in rows] == list(VARIANTS)
    assert {r["operator"] for r in rows} == set(UPSAMPLERS)
    assert {"transposed_k3s2", "transposed_k4s2"} <= {r["name"] for r in rows}
    for r in rows:
        assert {"name", "params", "checkerboard", "forward_ms"} <= set(r)
        assert r["forward_ms"] > 0


def test_checkerboard_scores(rows: list[dict]) -> None:
    """Kernel 3, stride 2: interior overlaps 1, 2 and 4 (factor 4); kernel 4: even (1)."""
    k3, k4 = _row(rows, "transposed_k3s2"), _row(rows, "transposed_k4s2")
    assert k3["checkerboard"] == 4.0 and k3["overlap_values"] == [1.0, 2.0, 4.0]
    assert k4["checkerboard"] == 1.0 and k4["overlap_values"] == [4.0]
    for name in ("bed_of_nails", "max_unpool"):  # most outputs receive nothing: min 0
        assert _row(rows, name)["checkerboard"] is None
    for name in ("nearest", "bilinear", "bicubic", "resize_conv", "pixel_shuffle"):
        assert _row(rows, name)["checkerboard"] == 1.0


def test_ripple_at_init(rows: list[dict]) -> None:
    """Own init, constant input: flat for bilinear-init deconv, resize-conv and ICNR; not for
    randomly initialised deconvolutions or sub-pixel convs (the artifacts exist before training)."""
    for name in ("nearest", "transposed", "resize_conv", "pixel_shuffle"):
        assert _row(rows, name)["init_ripple"] < 1e-5
    for name in ("transposed_k3s2", "transposed_k4s2", "pixel_shuffle_no_icnr"):
        assert _row(rows, name)["init_ripple"] > 0.05


def test_params(rows: list[dict]) -> None:
    c = SMALL[1]
    expected = {
        "nearest": 0,
        "max_unpool": 0,
        "transposed": c * c * 4 * 4,  # no bias (FCN)
        "transposed_k3s2": c * c * 3 * 3,
        "resize_conv": c * c * 9 + c,
        "pixel_shuffle": c * 4 * c * 9 + 4 * c,
    }
    for name, params in expected.items():
        assert _row(rows, name)["params"] == params


def test_write_report_files(tmp_path: Path) -> None:
    out = tmp_path / "report"
    rows = write_report(out, timing_shape=SMALL, repeats=1)
    assert sorted(p.name for p in out.iterdir()) == [
        "upsamplers.json",
        "upsamplers.md",
        "upsamplers.png",
    ]
    assert json.loads((out / "upsamplers.json").read_text()) == rows
    md = (out / "upsamplers.md").read_text()
    assert "| name | operator |" in md
    assert (
        "| transposed_k3s2 | transposed | kernel_size=3, init=default | 144 | 1, 2, 4 | 4 |" in md
    )
    with Image.open(out / "upsamplers.png") as img:
        assert img.format == "PNG" and img.width > 800 and img.height > 800


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small timing input and no figure rendering (test_write_report_files checks the real PNG)."""
    monkeypatch.setattr(inspect_upsamplers, "TIMING_SHAPE", SMALL)
    monkeypatch.setattr(inspect_upsamplers, "_figure_png", lambda rows, maps: b"png")


def test_cli_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture, quick: None) -> None:
    assert main(["upsamplers", "inspect", "--out", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert printed == json.loads((tmp_path / "upsamplers.json").read_text())
    assert _row(printed, "transposed_k3s2")["checkerboard"] == 4.0


def test_cli_inspect_table(tmp_path: Path, capsys: pytest.CaptureFixture, quick: None) -> None:
    assert main(["upsamplers", "inspect", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| transposed_k4s2 |" in out and "upsamplers.png" in out


def test_cli_list(capsys: pytest.CaptureFixture) -> None:
    assert main(["upsamplers", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == list(UPSAMPLERS)
    assert next(r for r in listed if r["name"] == "max_unpool")["needs_indices"] is True
    assert "init" in next(r for r in listed if r["name"] == "transposed")["options"]
    assert main(["upsamplers", "list"]) == 0
    assert "pixel_shuffle" in capsys.readouterr().out


def test_cli_out_is_a_file(tmp_path: Path) -> None:
    """Bad input through the real command: one line on stderr, exit 2, nothing written."""
    target = tmp_path / "taken"
    target.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "pixelwise", "upsamplers", "inspect", "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"pixelwise: error: --out {target} exists and is not a folder"
    ]
    assert target.read_text() == "x" and proc.stdout == ""


@pytest.mark.slow
def test_full_inspection_under_30_s(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_report(tmp_path)
    assert time.perf_counter() - start < 30
