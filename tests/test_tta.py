"""Test-time augmentation (`--tta flip`, `--tta-scales`): the flip average is mirror-equivariant
and its probabilities are the mean of the passes, computed here one view at a time;
`pixelwise predict` and `pixelwise eval` with it agree with that; misuse is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.errors import UserError
from pixelwise.predict.tta import TTA, AugmentedModel, parse_tta
from tests import test_predict_semantic as semantic_predict
from tests.test_predict_semantic import _predict, _read_label

# the tiny trained runs of the semantic prediction tests (module fixtures)
rgb, gray16 = semantic_predict.rgb, semantic_predict.gray16
scrambled, scrambled16 = semantic_predict.scrambled, semantic_predict.scrambled16

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, (3, 5),
                                                                             padding=(1, 1)))


def _by_hand(model: nn.Module, x: torch.Tensor, scales: tuple[float, ...] = (1.0,)
             ) -> torch.Tensor:
    """The mean probabilities of the image and its mirror image at each scale (torchvision's
    resize, antialiased), one view at a time."""
    from torchvision.transforms.v2.functional import resize

    h, w = x.shape[-2:]
    views = []
    with torch.no_grad():
        for s in scales:
            scaled = x if s == 1 else resize(x, [round(h * s), round(w * s)], antialias=True)
            for mirrored in (False, True):
                probs = torch.softmax(model(scaled.flip(-1) if mirrored else scaled), 1)
                probs = probs.flip(-1) if mirrored else probs
                views.append(resize(probs, [h, w], antialias=False) if s != 1 else probs)
    return torch.stack(views).mean(0)


def test_flip_average_is_mirror_equivariant_and_the_mean_of_both_passes() -> None:
    model, x = _net().eval(), torch.rand(2, 3, 9, 11)
    averaged = AugmentedModel(model, TTA(flip=True))
    with torch.no_grad():
        out, out_of_mirror = averaged(x), averaged(x.flip(-1))
        plain, plain_of_mirror = model(x), model(x.flip(-1))
    assert out.shape == (2, 4, 9, 9)  # an unpadded 5-wide kernel: 2 columns fewer
    # the plain net is not equivariant (asymmetric kernels); the average is
    assert not torch.allclose(plain_of_mirror, plain.flip(-1), atol=1e-3)
    torch.testing.assert_close(out_of_mirror, out.flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exp(), _by_hand(model, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 9, 9))


def test_saturated_logits_stay_finite() -> None:
    class Saturated(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :1] * 1e4, -x[:, :1] * 1e4], 1)  # (N, 2, H, W)

    x = torch.rand(1, 1, 4, 4) + 0.5
    out = AugmentedModel(Saturated(), TTA(flip=True, scales=(1, 1.5)))(x)
    assert torch.isfinite(out).all() and (out.argmax(1) == 0).all()


def test_scales_average_the_resized_views() -> None:
    model, x = _net().eval(), torch.rand(1, 3, 12, 16)
    model[2].padding = (1, 2)  # output size = input size, as scales need
    tta = TTA(flip=True, scales=(0.75, 1.0, 1.5))
    with torch.no_grad():
        out = AugmentedModel(model, tta)(x)
    assert tta.views == 6 and out.shape == (1, 4, 12, 16)
    torch.testing.assert_close(out.exp(), _by_hand(model, x, tta.scales), rtol=0, atol=1e-6)
    model[2].padding = (1, 1)  # 2 columns fewer: the views cannot be laid over each other
    with pytest.raises(UserError, match="--tta-scales needs a model whose output has its "
                                        "input's size"):
        AugmentedModel(model, tta)(x)


def test_parse_tta_names_the_valid_choices_and_the_task() -> None:
    assert parse_tta(None, None, "instance") is None
    assert parse_tta("flip", None, "semantic") == TTA(flip=True, scales=(1.0,))
    assert parse_tta(None, [0.5, 1], "semantic") == TTA(flip=False, scales=(0.5, 1.0))
    with pytest.raises(UserError, match=r"unknown test-time augmentation 'rot'; valid names: "
                                        r"flip$"):
        parse_tta("rot", None, "semantic")
    with pytest.raises(UserError, match=r"^--tta-scales must be factors in \(0, 4\], got 0,1$"):
        parse_tta(None, [0, 1], "semantic")
    with pytest.raises(UserError, match=r"got none$"):
        parse_tta("flip", [], "semantic")
    assert parse_tta("flip", None, "instance") == TTA(flip=True)  # the model's own flip test
    with pytest.raises(UserError, match=r"^--tta-scales is for semantic runs; instance runs "
                                        r"take --tta flip \(solov2, mask_rcnn\)$"):
        parse_tta("flip", [1, 1.5], "instance")
    with pytest.raises(UserError, match=r"^--tta/--tta-scales are for semantic runs \(and "
                                        r"--tta flip for instance runs\), not keypoints "
                                        r"runs$"):
        parse_tta("flip", None, "keypoints")


def test_apply_tta_wraps_semantic_models_and_switches_solov2() -> None:
    from pixelwise.models.solov2 import SOLOv2
    from pixelwise.predict.tta import apply_tta
    from tests.test_solov2 import tiny

    semantic = nn.Conv2d(3, 2, 1)
    assert apply_tta(semantic, None, "semantic") is semantic
    assert isinstance(apply_tta(semantic, TTA(flip=True), "semantic"), AugmentedModel)
    model = tiny()
    assert isinstance(model, SOLOv2) and not model.flip_test
    assert apply_tta(model, TTA(flip=True), "instance") is model and model.flip_test
    with pytest.raises(UserError, match=r"^run/best.safetensors: --tta flip is for solov2 "
                                        r"and mask_rcnn among instance models, not Conv2d$"):
        apply_tta(semantic, TTA(flip=True), "instance", "run/best.safetensors")


def _image_tensor(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path))
    top = 65535.0 if array.dtype == np.uint16 else 255.0
    x = torch.from_numpy(array.astype(np.float32) / top)
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None]  # (1, C, H, W)


def test_predict_with_flip_is_the_argmax_of_the_mean_probabilities(
        scrambled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_model

    gen = np.random.default_rng(1)
    image = tmp_path / "in" / "img.png"
    image.parent.mkdir()
    # a multiple of the stride 4: no padding, so both passes see exactly the image
    Image.fromarray(gen.integers(0, 256, (96, 112, 3), dtype=np.uint8)).save(image)
    code, summary, _ = _predict(capsys, str(scrambled), str(image), "--size", "native",
                                "--tta", "flip", "--out", str(tmp_path / "tta"))
    assert code == 0 and summary["tta"] == {"flip": True, "scales": [1.0]}
    got = _read_label(tmp_path / "tta" / "img.png")
    model, _ = load_model(scrambled)
    expected = _by_hand(model, _image_tensor(image))[0].argmax(0).numpy()
    assert len(np.unique(expected)) >= 2
    np.testing.assert_array_equal(got, expected)
    plain = _read_label(_plain(capsys, scrambled, image, tmp_path) / "img.png")
    assert (plain != expected).any()  # the option changes something here

    # tiles that equal one pass: tiled prediction with the average equals the untiled one
    code, summary, _ = _predict(capsys, str(scrambled), str(image), "--tile", "80", "--tta",
                                "flip", "--out", str(tmp_path / "tiles"))
    assert code == 0 and summary["overlap"] == 54
    np.testing.assert_array_equal(_read_label(tmp_path / "tiles" / "img.png"), got)

    # scales: 0.75 and 1.25 of 96 x 112 are multiples of the stride 4 too
    code, summary, _ = _predict(capsys, str(scrambled), str(image), "--size", "native",
                                "--tta", "flip", "--tta-scales", "0.75,1,1.25", "--out",
                                str(tmp_path / "scales"))
    assert code == 0 and summary["tta"] == {"flip": True, "scales": [0.75, 1.0, 1.25]}
    expected = _by_hand(model, _image_tensor(image), (0.75, 1, 1.25))[0].argmax(0).numpy()
    got = _read_label(tmp_path / "scales" / "img.png")
    np.testing.assert_array_equal(got, expected)
    assert (got != plain).any()


def _plain(capsys: pytest.CaptureFixture[str], run: Path, image: Path, tmp_path: Path) -> Path:
    code, _, _ = _predict(capsys, str(run), str(image), "--size", "native", "--out",
                          str(tmp_path / "plain"))
    assert code == 0
    return tmp_path / "plain"


def test_eval_with_flip_scores_the_averaged_predictions(
        gray16: tuple[Path, Path], scrambled16: Path) -> None:
    from pixelwise.cli.eval import evaluate_run
    from pixelwise.engine.checkpoint import load_model

    data, _ = gray16
    got = evaluate_run(scrambled16, data, tta="flip", tta_scales=[1, 0.5], batch_size=2)
    plain = evaluate_run(scrambled16, data, batch_size=2)
    model, meta = load_model(scrambled16)
    hits = total = 0
    for image in sorted((data / "images" / "val").glob("*.png")):
        labels = _by_hand(model, _image_tensor(image), (1, 0.5))[0].argmax(0).numpy()
        truth = np.asarray(Image.open(data / "masks" / "val" / image.name)).astype(np.int64)
        keep = truth != meta["task"]["ignore_index"]
        hits += int((labels == truth)[keep].sum())
        total += int(keep.sum())
    assert total > 0
    assert got["pixel_accuracy"] == pytest.approx(hits / total, abs=1e-12)
    assert got["pixel_accuracy"] != plain["pixel_accuracy"]


def test_tta_misuse_is_one_line(scrambled: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for argv, message in [
        (["predict", str(scrambled), str(image), "--out", str(tmp_path / "o"), "--tta", "spin"],
         "unknown test-time augmentation 'spin'; valid names: flip"),
        (["predict", "--semantic", "a", "--instance", "b", str(image), "--out",
          str(tmp_path / "f"), "--tta", "flip"],
         "--tile/--overlap/--tta/--tta-scales/--output-upsample are not available with "
         "--semantic/--instance"),
        (["eval", str(scrambled), "--tta-scales", "1,5"],
         "--tta-scales must be factors in (0, 4], got 1,5"),
    ]:
        capsys.readouterr()
        assert main(argv) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()
