"""`pixelwise predict` on tiny trained runs: outputs, labels equal to an independent argmax,
size policy, grayscale/16-bit input, tiling, unreadable images and overwrite refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.errors import UserError

TINY = {"width": 4, "depth": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(data: Path, out: Path, **changes) -> Path:
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train

    cfg = TrainConfig(data=str(data), out=str(out), model="unet", model_options=dict(TINY),
                      epochs=1, batch_size=4, max_steps=2, lr=0.01, progress=False, seed=1,
                      **changes)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, run): RGB 40x48 scenes, a U-Net trained 2 steps at --size 32x32."""
    from pixelwise.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("rgb")
    data = synthesize("semantic", root / "data", num=5, size=(40, 48), seed=0)
    return data, _train(data, root / "run", size=(32, 32))


@pytest.fixture(scope="module")
def gray16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, run): 16-bit grayscale scenes, a one-channel U-Net trained 2 steps."""
    from pixelwise.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("gray16")
    data = synthesize("semantic", root / "data", num=5, size=(32, 40), seed=3, gray16=True)
    return data, _train(data, root / "run")


def _scramble(run: Path, path: Path, **changes) -> Path:
    """A checkpoint file of `run` with random weights and batch-norm statistics: two training
    steps leave one class almost everywhere, which would make label comparisons vacuous.
    `changes`: model options to rebuild the architecture with first (e.g. input_scale)."""
    from pixelwise.engine.checkpoint import load_model, save_checkpoint
    from pixelwise.models import build_model

    model, meta = load_model(run)
    if changes:
        meta = dict(meta, model=dict(meta["model"], **changes))
        model = build_model(**meta["model"])
    gen = torch.Generator().manual_seed(5)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value  # num_batches_tracked
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.5
    return save_checkpoint(path, {"model": state}, meta)


@pytest.fixture(scope="module")
def scrambled(rgb: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scramble(rgb[1], tmp_path_factory.mktemp("scrambled") / "rgb.safetensors")


@pytest.fixture(scope="module")
def scrambled16(gray16: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scramble(gray16[1], tmp_path_factory.mktemp("scrambled") / "gray16.safetensors")


def _images(data: Path) -> list[Path]:
    return sorted((data / "images").glob("*/*.png"))


def _read_label(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "P"  # palette PNG: pixel values are the class indices
    return np.asarray(image).astype(np.int64)


def _independent_labels(run: Path, image: Path, size: tuple[int, int] | None = None
                        ) -> np.ndarray:
    """The model's argmax computed here: Pillow decode, scale by the dtype's max, forward;
    with `size`, resize there and the logits back (bilinear) before the argmax."""
    from torchvision.transforms.v2.functional import resize

    from pixelwise.engine.checkpoint import load_model

    model, _ = load_model(run)
    array = np.asarray(Image.open(image))
    top = 65535.0 if array.dtype == np.uint16 else 255.0
    x = torch.from_numpy(array.astype(np.float32) / top)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
    h, w = x.shape[-2:]
    if size is not None:
        x = resize(x, list(size), antialias=True)
    with torch.no_grad():
        logits = model(x[None])  # (1, K, h, w)
    if size is not None:
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).numpy()


def _predict(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["predict", *argv, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_predict_writes_labels_equal_to_the_models_argmax_and_overlays(
        rgb: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = rgb
    out = tmp_path / "pred"
    code, summary, _ = _predict(capsys, str(run), str(data / "images" / "train"),
                                str(data / "images" / "val"), "--out", str(out))
    assert code == 0
    images = _images(data)
    assert summary["count"] == len(images) and summary["failed"] == []
    assert summary["size"] == "32x32"  # the run's training size, by default
    for image in images:
        labels = _read_label(out / image.name)
        assert labels.shape == (40, 48)  # back at the image's size
        np.testing.assert_array_equal(labels, _independent_labels(run, image, size=(32, 32)))
        overlay = Image.open(out / "overlays" / image.name)
        assert overlay.mode == "RGB" and overlay.size[1] >= 40 and overlay.size[0] > 48  # legend
    row = summary["images"][0]
    assert set(row) == {"image", "labels", "overlay", "size", "classes"}


def test_native_size_policy_is_the_plain_argmax(
        rgb: tuple[Path, Path], scrambled: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    images = _images(rgb[0])
    code, summary, _ = _predict(capsys, str(scrambled), *map(str, images), "--out",
                                str(tmp_path / "p"), "--size", "native", "--batch-size", "3")
    assert code == 0 and summary["size"] == "native"
    for image in images:
        expected = _independent_labels(scrambled, image)
        assert len(np.unique(expected)) >= 2
        np.testing.assert_array_equal(_read_label(tmp_path / "p" / image.name), expected)


def test_gray16_run_predicts_16_bit_images_and_an_rgb_run_takes_grayscale(
        gray16: tuple[Path, Path], scrambled16: Path, rgb: tuple[Path, Path], scrambled: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _images(gray16[0])[0]
    assert np.asarray(Image.open(image)).dtype == np.uint16
    code, _, _ = _predict(capsys, str(scrambled16), str(image), "--out", str(tmp_path / "g"))
    assert code == 0
    expected = _independent_labels(scrambled16, image)
    assert len(np.unique(expected)) >= 2
    np.testing.assert_array_equal(_read_label(tmp_path / "g" / image.name), expected)

    # an 8-bit grayscale image for the RGB model: its one channel, repeated three times
    rgb_data, rgb_run = rgb[0], scrambled
    source = np.asarray(Image.open(_images(rgb_data)[0]))[..., 1]  # (H, W) uint8
    gray_path = tmp_path / "gray.png"
    Image.fromarray(source).save(gray_path)
    code, _, _ = _predict(capsys, str(rgb_run), str(gray_path), "--out", str(tmp_path / "r"),
                          "--size", "native")
    assert code == 0
    from pixelwise.engine.checkpoint import load_model

    model, _ = load_model(rgb_run)
    x = torch.from_numpy(source.astype(np.float32) / 255).expand(1, 3, -1, -1)
    with torch.no_grad():
        expected = model(x)[0].argmax(0).numpy()
    assert len(np.unique(expected)) >= 2
    np.testing.assert_array_equal(_read_label(tmp_path / "r" / "gray.png"), expected)


def test_tiled_prediction_equals_the_untiled_one(
        scrambled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = scrambled
    gen = np.random.default_rng(0)
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    # an odd size: both passes mirror-pad it to 140 x 124 (multiples of the stride 4)
    Image.fromarray(gen.integers(0, 256, (137, 123, 3), dtype=np.uint8)).save(big)
    code, _, _ = _predict(capsys, str(run), str(big), "--size", "native", "--out",
                          str(tmp_path / "whole"))
    assert code == 0
    code, summary, _ = _predict(capsys, str(run), str(big), "--out", str(tmp_path / "tiles"),
                                "--tile", "80", "--batch-size", "2")
    assert code == 0 and summary["tile"] == 80
    assert summary["size"] == "native"  # the default with --tile (the run was trained at 32x32)
    assert summary["overlap"] == 54  # receptive field 52 + stride 4 - 2
    whole = _read_label(tmp_path / "whole" / "big.png")
    assert len(np.unique(whole)) >= 3  # a comparison that can fail
    np.testing.assert_array_equal(_read_label(tmp_path / "tiles" / "big.png"), whole)


def test_an_unreadable_image_is_named_and_the_others_are_still_predicted(
        rgb: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = rgb
    folder = tmp_path / "in"
    folder.mkdir()
    good = _images(data)[:2]
    for image in good:
        shutil.copy(image, folder / image.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image: skipped by the folder listing")
    out = tmp_path / "out"
    code, summary, err = _predict(capsys, str(run), str(folder), str(tmp_path / "missing.jpg"),
                                  "--out", str(out))
    assert code == 1
    assert summary["count"] == 2 and len(summary["failed"]) == 2
    errors = [line for line in err.splitlines() if line.startswith("pixelwise: error:")]
    assert len(errors) == 2
    assert "broken.png" in errors[0] and "missing.jpg" in errors[1]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in good)
    assert not list(out.rglob("*.tmp"))


def test_an_existing_output_folder_is_not_overwritten_without_the_flag(
        rgb: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = rgb
    image = _images(data)[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / image.name).write_bytes(b"keep me")
    code, summary, err = _predict(capsys, str(run), str(image), "--out", str(out))
    assert code == EXIT_USER_ERROR and summary is None
    assert "--overwrite" in err and "Traceback" not in err
    assert (out / image.name).read_bytes() == b"keep me"
    code, _, _ = _predict(capsys, str(run), str(image), "--out", str(out), "--overwrite")
    assert code == 0 and _read_label(out / image.name).shape == (40, 48)


def test_clashing_names_and_outputs_over_inputs_are_refused_before_any_work(
        rgb: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = rgb
    image = _images(data)[0]
    twin = tmp_path / "twin" / (image.stem + ".jpg")
    twin.parent.mkdir()
    Image.open(image).convert("RGB").save(twin)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, str(run), str(image), str(twin), "--out", str(out))
    assert code == EXIT_USER_ERROR and "would both write" in err and not out.exists()
    code, _, err = _predict(capsys, str(run), str(image.parent), "--out", str(image.parent),
                            "--overwrite")
    assert code == EXIT_USER_ERROR and "replace an input" in err


def test_text_summary_and_bad_flags(rgb: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    data, run = rgb
    capsys.readouterr()
    assert main(["predict", str(run), str(_images(data)[0]), "--out", str(tmp_path / "o")]) == 0
    assert "predicted 1 image" in capsys.readouterr().out
    for flags, message in ((["--overlap", "8"], "--tile"), (["--tile", "40"], "too small"),
                           (["--batch-size", "0"], "--batch-size")):
        assert main(["predict", str(run), str(_images(data)[0]), "--out", str(tmp_path / "x"),
                     *flags]) == EXIT_USER_ERROR
        assert message in capsys.readouterr().err


def test_predictors_dispatch_on_the_checkpoints_task(rgb: tuple[Path, Path]) -> None:
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.predict import PREDICTORS, SemanticPredictor, make_predictor

    model, meta = load_model(rgb[1])
    assert isinstance(make_predictor(model, meta), PREDICTORS["semantic"])
    assert PREDICTORS["semantic"] is SemanticPredictor
    with pytest.raises(UserError, match="semantic"):
        make_predictor(model, {**meta, "task": {"name": "depth"}})


def test_running_out_of_memory_fails_that_image_only(tmp_path: Path) -> None:
    from pixelwise.predict import predict_files

    class Stub:  # a predictor whose model runs out of memory on images wider than 40 px
        batch_size, tile = 2, None

        def predict(self, images, names):  # noqa: ANN001, ANN202
            if any(img.shape[-1] > 40 for img in images):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return [torch.zeros(img.shape[-2:], dtype=torch.long) for img in images]

        def write(self, out, name, image, result):  # noqa: ANN001, ANN202
            (out / name).write_bytes(b"labels")
            return {"labels": str(out / name)}

    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (32, 32)).save(small)
    Image.new("RGB", (64, 32)).save(wide)
    errors: list[str] = []
    summary = predict_files(Stub(), [small, wide], tmp_path / "out",
                            on_error=lambda path, message: errors.append(message))
    assert summary["count"] == 1 and (tmp_path / "out" / "small.png").exists()
    assert len(errors) == 1 and "wide.png" in errors[0] and "--tile" in errors[0]


def test_labels_and_overlays_use_the_dataset_colours(rgb: tuple[Path, Path], tmp_path: Path
                                                    ) -> None:
    """classes.json "colors" (the synthetic writer puts the masks' palette there) travel with
    the checkpoint into the label PNG palette and the overlay legend; without them, the default
    palette."""
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.predict import SemanticPredictor
    from pixelwise.viz import make_palette

    data, run = rgb
    colors = json.loads((data / "classes.json").read_text())["colors"]
    mask = next((data / "masks").glob("*/*.png"))
    k = len(colors)
    assert np.asarray(Image.open(mask).getpalette()[:3 * k]).reshape(k, 3).tolist() == colors
    model, meta = load_model(run)
    assert meta["task"]["class_colors"] == colors
    assert SemanticPredictor(model, meta).palette.tolist() == colors
    assert main(["predict", str(run), str(_images(data)[0]), "--out", str(tmp_path / "p")]) == 0
    label = next((tmp_path / "p").glob("*.png"))
    assert np.asarray(Image.open(label).getpalette()[:3 * k]).reshape(k, 3).tolist() == colors
    plain = dict(meta, task={key: v for key, v in meta["task"].items() if key != "class_colors"})
    assert (SemanticPredictor(model, plain).palette == make_palette(k)).all()
