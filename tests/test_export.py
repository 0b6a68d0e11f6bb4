"""`pixelwise export`: ONNX (checked here again with onnxruntime) and torch.export programs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.errors import UserError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny U-Net run (a checkpoint as the trainer writes it), batch-norm statistics
    randomised so that eval mode is not the identity."""
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", num_classes=4, in_channels=1, width=4, depth=2,
                        upsample="transposed")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    out = tmp_path_factory.mktemp("runs") / "run"
    out.mkdir()
    meta = {"kind": "last", "model": model.config,
            "task": {"name": "semantic", "num_classes": 4, "class_names": list("abcd")}}
    save_checkpoint(out / "last.safetensors", {"model": model.state_dict()}, meta)
    return out


def _eager(run: Path, x: torch.Tensor) -> np.ndarray:
    from pixelwise.engine.checkpoint import load_model

    model, _ = load_model(run)
    with torch.no_grad():
        return model(x).numpy()


def _export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["export", *argv, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_onnx_export_runs_in_onnxruntime_like_eager_and_refuses_to_overwrite(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.onnx"
    code, report, _ = _export(capsys, str(run), "--out", str(out))
    assert code == 0 and out.is_file()
    assert report["format"] == "onnx" and report["max_abs_diff"] < 1e-4
    assert report["input"] == ["batch", 1, "height", "width"]
    onnx.checker.check_model(onnx.load(str(out)))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # dynamic batch and size, checked here on a shape the export was not checked on
    x = torch.rand(3, 1, 36, 52, generator=torch.Generator().manual_seed(7))
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (3, 4, 36, 52)
    np.testing.assert_allclose(got, _eager(run, x), rtol=0, atol=1e-4)

    before = out.read_bytes()
    code, report, err = _export(capsys, str(run), "--out", str(out))
    assert code == EXIT_USER_ERROR and report is None and "--overwrite" in err
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left


def test_pt2_export_at_a_fixed_size_replaces_a_file_with_overwrite(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pt2"
    out.write_bytes(b"old")
    code, report, _ = _export(capsys, str(run), "--format", "pt2", "--out", str(out),
                              "--size", "32x32", "--overwrite")
    assert code == 0 and report["max_abs_diff"] < 1e-5
    assert report["input"] == ["batch", 1, 32, 32] and report["checked"][0] == [2, 1, 32, 32]
    module = torch.export.load(str(out)).module()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(8))
    np.testing.assert_allclose(module(x).detach().numpy(), _eager(run, x), rtol=0, atol=1e-5)


def test_a_mismatching_export_is_refused_and_nothing_is_written(
        run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pixelwise import export
    from pixelwise.engine.checkpoint import load_model

    def write(model, example, path, size, opset):  # noqa: ANN001, ANN202
        path.write_bytes(b"stand-in")
        write.model = model

    def load(path):  # noqa: ANN001, ANN202 - off by 0.01 everywhere
        return lambda x: write.model(x) + 0.01

    monkeypatch.setitem(export.FORMATS, "fake", (write, load))
    model, _ = load_model(run)
    out = tmp_path / "model.fake"
    with pytest.raises(UserError, match="differs from eager by 0.01"):
        export.export_model(model, out, format="fake", in_channels=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="export format"):
        export.export_model(model, out, format="torchscript", in_channels=1)


@pytest.mark.parametrize("options", [
    {"input_scale": 0.5},
    {"input_scale": 0.25, "output_upsample": "joint_bilateral"},
], ids=["bilinear", "joint_bilateral"])
def test_a_unet_at_input_scale_exports_with_dynamic_odd_sizes(tmp_path: Path,
                                                              options: dict) -> None:
    """The pool, the edge padding and the final bilinear x k (or the joint bilateral
    upsampling: unfold, products, softmax) export too; onnxruntime matches eager on an odd size
    the export was not checked on."""
    from pixelwise import export
    from pixelwise.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", num_classes=3, width=4, depth=2, **options).eval()
    out = tmp_path / "scaled.onnx"
    export.export_model(model, out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 37, 50, generator=torch.Generator().manual_seed(3))
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (1, 3, 37, 50)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
