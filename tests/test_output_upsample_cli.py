"""`pixelwise predict / eval --output-upsample`: a unet run at input_scale 1/2 predicted with
the image-guided upsampling gives the labels of its coarse logits guided up here by hand; eval
reports other metrics than with the run's own bilinear upsampling; misuse is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.ops.joint_bilateral import joint_bilateral_upsample
from tests import test_predict_semantic as semantic_predict
from tests.test_predict_semantic import _predict, _read_label, _scramble

rgb = semantic_predict.rgb  # the tiny trained run of the semantic prediction tests

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def half_scale(rgb: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the rgb run's U-Net rebuilt at input_scale 1/2 with random weights and
    batch-norm statistics (varied logits: label comparisons are not vacuous)."""
    return _scramble(rgb[1], tmp_path_factory.mktemp("half") / "half.safetensors",
                     input_scale=0.5)


def test_predict_with_the_guided_upsampling(half_scale: Path, rgb: tuple[Path, Path],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_model

    image = sorted((rgb[0] / "images" / "val").glob("*.png"))[0]
    runs = {}
    for name in ("bilinear", "joint_bilateral"):
        code, _, _ = _predict(capsys, str(half_scale), str(image), "--out", str(tmp_path / name),
                              "--size", "native", "--output-upsample", name)
        assert code == 0
        runs[name] = _read_label(tmp_path / name / image.name)
    model, _ = load_model(half_scale)
    model.coarse_output = True
    x = torch.from_numpy(np.asarray(Image.open(image)).astype(np.float32) / 255)
    x = x.permute(2, 0, 1)[None]  # (1, 3, 40, 48)
    with torch.no_grad():
        coarse = model(x)  # (1, K, 20, 24)
    guided = joint_bilateral_upsample(coarse, x, 2)  # the model's default sigmas and radius
    np.testing.assert_array_equal(runs["joint_bilateral"], guided[0].argmax(0).numpy())
    assert (runs["joint_bilateral"] != runs["bilinear"]).any()


def test_eval_with_the_guided_upsampling(half_scale: Path, rgb: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    results = {}
    for flags in ([], ["--output-upsample", "joint_bilateral"]):
        capsys.readouterr()
        assert main(["eval", str(half_scale), "--data", str(rgb[0]), "--json", *flags]) == 0
        results[len(flags)] = json.loads(capsys.readouterr().out)
    assert results[0]["pixel_accuracy"] != results[2]["pixel_accuracy"]


def test_misuse_is_one_line(half_scale: Path, rgb: tuple[Path, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((rgb[0] / "images" / "val").glob("*.png"))[0]
    for argv, message in [
        (["eval", str(half_scale), "--data", str(rgb[0]), "--output-upsample", "cubic"],
         "unknown unet output_upsample 'cubic'; valid names: bilinear, joint_bilateral"),
        (["eval", str(rgb[1]), "--output-upsample", "joint_bilateral"],
         "output_upsample 'joint_bilateral' needs input_scale < 1"),
        (["predict", str(rgb[1]), str(image), "--out", str(tmp_path / "o"),
          "--output-upsample", "joint_bilateral"],
         "output_upsample 'joint_bilateral' needs input_scale < 1"),
    ]:
        capsys.readouterr()
        assert main(argv) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_models_without_it_are_named() -> None:
    from pixelwise.cli._common import apply_output_upsample
    from pixelwise.errors import UserError

    apply_output_upsample(torch.nn.Conv2d(3, 2, 1), None, "run.safetensors")  # nothing asked
    with pytest.raises(UserError, match="run.safetensors: --output-upsample applies to unet "
                                        "runs with input_scale < 1, not to a Conv2d"):
        apply_output_upsample(torch.nn.Conv2d(3, 2, 1), "joint_bilateral", "run.safetensors")
