"""pixelwise.data.images: every image mode, EXIF orientation, corrupt files and the pixel limit.

References are independent of the code under test: the numpy arrays the files were written
from, numpy palette look-ups and rotations, and Pillow's `ImageOps.exif_transpose`.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageOps

from pixelwise.data.images import (
    DEFAULT_MAX_PIXELS,
    BadFileError,
    image_to_float,
    read_image,
    read_label_png,
)
from pixelwise.errors import UserError

RNG = np.random.default_rng(0)
H, W = 13, 21  # non-square and odd, so a transposition shows


def _chw(array: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) numpy -> (C, H, W) torch, the expected layout."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)  # copy: writable, contiguous


def _png(width: int, height: int, depth: int, colour: int, rows: bytes, with_iend=True) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour or a lying header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
    return data + (chunk(b"IEND", b"") if with_iend else b"")


# ----------------------------------------------------------------------------- modes

MODES = {
    "rgb": (np.uint8, (H, W, 3), "RGB"),
    "gray": (np.uint8, (H, W), "L"),
}


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
@pytest.mark.parametrize("name", list(MODES))
def test_lossless_8bit_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    dtype, shape, _ = MODES[name]
    array = RNG.integers(0, 256, shape).astype(dtype)
    path = tmp_path / f"a{suffix}"
    Image.fromarray(array).save(path)
    image = read_image(path)
    assert image.dtype == torch.uint8
    assert torch.equal(image, _chw(array))


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), _chw(rgba[:, :, :3]))


def test_gray_alpha_drops_alpha(tmp_path: Path) -> None:
    la = RNG.integers(0, 256, (H, W, 2)).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), _chw(la[:, :, 0]))


def test_palette_image_becomes_its_colours(tmp_path: Path) -> None:
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = RNG.integers(0, 7, (H, W)).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.reshape(-1).tolist())
    image.save(tmp_path / "p.png")
    assert torch.equal(read_image(tmp_path / "p.png"), _chw(palette[indices]))  # (H, W, 3)


def test_bilevel_image(tmp_path: Path) -> None:
    bits = RNG.integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert torch.equal(read_image(tmp_path / "b.png"), _chw(bits.astype(np.uint8) * 255))


def test_16bit_gray_png(tmp_path: Path) -> None:
    array = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.dtype == torch.uint16 and image.shape == (1, H, W)
    assert np.array_equal(image[0].numpy(), array)
    expected = torch.from_numpy(array.astype(np.float64) / 65535).to(torch.float32)
    assert torch.equal(image_to_float(image)[0], expected)


@pytest.mark.parametrize("colour, channels", [(2, 3), (6, 4)])
def test_16bit_colour_png_keeps_16_bits(tmp_path: Path, colour: int, channels: int) -> None:
    array = RNG.integers(0, 65536, (H, W, channels)).astype(">u2")
    rows = b"".join(b"\x00" + array[i].tobytes() for i in range(H))  # filter 0 per row
    (tmp_path / "c.png").write_bytes(_png(W, H, 16, colour, rows))
    image = read_image(tmp_path / "c.png")
    assert image.dtype == torch.uint16 and image.shape == (3, H, W)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), array[:, :, :3].astype(np.uint16))


TIFFS = {
    "gray8": dict(shape=(H, W), dtype=np.uint8, kwargs={}),
    "gray16": dict(shape=(H, W), dtype=np.uint16, kwargs={}),
    "rgb8": dict(shape=(H, W, 3), dtype=np.uint8, kwargs={"photometric": "rgb"}),
    "rgb16": dict(shape=(H, W, 3), dtype=np.uint16, kwargs={"photometric": "rgb"}),
    "rgb16_planar": dict(shape=(H, W, 3), dtype=np.uint16,
                         kwargs={"photometric": "rgb", "planarconfig": "separate"}),
    "rgba16": dict(shape=(H, W, 4), dtype=np.uint16,
                   kwargs={"photometric": "rgb", "extrasamples": ["unassalpha"]}),
}


@pytest.mark.parametrize("name", list(TIFFS))
def test_tiff(tmp_path: Path, name: str) -> None:
    spec = TIFFS[name]
    array = RNG.integers(0, np.iinfo(spec["dtype"]).max + 1, spec["shape"]).astype(spec["dtype"])
    data = array
    if spec["kwargs"].get("planarconfig") == "separate":
        data = np.moveaxis(array, 2, 0)  # (H, W, 3) -> (3, H, W)
    tifffile.imwrite(tmp_path / "t.tif", data, **spec["kwargs"])
    image = read_image(tmp_path / "t.tif")
    expected = array[:, :, :3] if array.ndim == 3 else array
    assert image.dtype == torch.from_numpy(expected).dtype
    assert np.array_equal(image.permute(1, 2, 0).numpy().squeeze(-1) if image.shape[0] == 1
                          else image.permute(1, 2, 0).numpy(), expected)


def test_lzw_tiff_without_imagecodecs(tmp_path: Path) -> None:
    # LZW needs the optional imagecodecs package in tifffile; Pillow decodes it
    array = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "l.tif", compression="tiff_lzw")
    assert np.array_equal(read_image(tmp_path / "l.tif")[0].numpy(), array)


def test_tiff_detected_by_content_not_suffix(tmp_path: Path) -> None:
    array = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "t.tif", array)
    (tmp_path / "t.tif").rename(tmp_path / "misnamed.png")
    assert np.array_equal(read_image(tmp_path / "misnamed.png")[0].numpy(), array)


def test_float_tiff_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((H, W), np.float32))
    with pytest.raises(BadFileError, match=r"f\.tif: unsupported TIFF sample type float32"):
        read_image(tmp_path / "f.tif")


# ----------------------------------------------------------------------------- orientation

# PIL's transposition for each EXIF orientation, written out as numpy operations on (H, W, C)
NUMPY_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_matches_pillow(tmp_path: Path, orientation: int) -> None:
    array = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(tmp_path / "o.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    assert np.array_equal(expected, NUMPY_ORIENT[orientation](array))  # the table is right
    assert torch.equal(read_image(tmp_path / "o.png"), _chw(expected))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_tag(tmp_path: Path, orientation: int) -> None:
    array = RNG.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "o.tif", array, photometric="rgb",
                     extratags=[(274, "H", 1, orientation, True)])
    image = read_image(tmp_path / "o.tif")
    assert np.array_equal(image.permute(1, 2, 0).numpy(), NUMPY_ORIENT[orientation](array))


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    # a landscape photo stored sideways: orientation 6 = rotate 90 degrees clockwise to view
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :24] = (255, 0, 0)  # red top-left block of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "r.jpg")
    assert image.shape == (3, 48, 32)  # height and width swapped
    raw = np.asarray(Image.open(tmp_path / "r.jpg"))  # decoded, not rotated
    assert torch.equal(image, _chw(np.rot90(raw, -1)))
    # after a clockwise quarter turn the red block sits at the top right
    assert image[0, :20, 20:].float().mean() > 200 and image[0, 28:, :12].float().mean() < 50


# ----------------------------------------------------------------------------- labels


def test_palette_label_gives_indices_not_colours(tmp_path: Path) -> None:
    indices = RNG.integers(0, 21, (H, W)).astype(np.uint8)
    indices[0, :5] = 255
    image = Image.fromarray(indices, "P")
    image.putpalette(RNG.integers(0, 256, 768).tolist())
    image.save(tmp_path / "m.png")
    labels = read_label_png(tmp_path / "m.png")
    assert labels.dtype == torch.int64
    assert np.array_equal(labels.numpy(), indices)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_label(tmp_path: Path, dtype) -> None:
    indices = RNG.integers(0, 300 if dtype == np.uint16 else 256, (H, W)).astype(dtype)
    Image.fromarray(indices).save(tmp_path / "m.png")
    assert np.array_equal(read_label_png(tmp_path / "m.png").numpy(), indices)


def test_label_tiff(tmp_path: Path) -> None:
    indices = RNG.integers(0, 1000, (H, W)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", indices)
    assert np.array_equal(read_label_png(tmp_path / "m.tif").numpy(), indices)


def test_label_rgb_equal_channels_accepted_colours_refused(tmp_path: Path) -> None:
    indices = RNG.integers(0, 5, (H, W)).astype(np.uint8)
    Image.fromarray(np.stack([indices] * 3, -1)).save(tmp_path / "gray_as_rgb.png")
    assert np.array_equal(read_label_png(tmp_path / "gray_as_rgb.png").numpy(), indices)
    Image.fromarray(RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(BadFileError, match=r"c\.png: colour label image"):
        read_label_png(tmp_path / "c.png")


# ----------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_file_names_the_file(tmp_path: Path, suffix: str) -> None:
    array = RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    path = tmp_path / f"cut{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, array, photometric="rgb")
    else:
        Image.fromarray(array).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: corrupt or truncated")
    assert info.value.path == path and isinstance(info.value, UserError)
    if suffix == ".png":
        with pytest.raises(BadFileError, match="truncated"):
            read_label_png(path)


def test_not_an_image_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(BadFileError, match=r"x\.png: not an image file"):
        read_image(tmp_path / "x.png")
    with pytest.raises(BadFileError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(BadFileError, match=r"empty\.tif: corrupt"):
        read_image(tmp_path / "empty.tif")


def test_pixel_limit_refuses_from_the_header(tmp_path: Path) -> None:
    # the header claims 100000 x 100000 pixels (10 G); decoding would allocate 10 GB
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(100_000, 100_000, 8, 0, b"\x00" * 10))
    assert 100_000**2 > DEFAULT_MAX_PIXELS
    for read in (read_image, read_label_png):
        with pytest.raises(BadFileError) as info:
            read(path)
        assert str(info.value).startswith(f"{path}: ")
        assert "over the pixel limit" in str(info.value) and "refused" in str(info.value)


def test_pixel_limit_argument(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((H, W), np.uint8))
    for name in ("a.png", "a.tif"):
        with pytest.raises(BadFileError, match=f"{H}x{W} = {H * W} pixels is over"):
            read_image(tmp_path / name, max_pixels=H * W - 1)
        assert read_image(tmp_path / name, max_pixels=H * W).shape == (1, H, W)
        assert read_image(tmp_path / name, max_pixels=None).shape == (1, H, W)


def test_pillow_limit_lifted_only_when_ours_is_higher(tmp_path: Path, monkeypatch) -> None:
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow's hard limit becomes 100 pixels
    with pytest.raises(BadFileError, match="over the pixel limit of 100"):
        read_image(tmp_path / "a.png", max_pixels=100)  # Pillow refuses first, in our words
    assert read_image(tmp_path / "a.png", max_pixels=None).shape == (1, H, W)
    assert Image.MAX_IMAGE_PIXELS == 50  # restored


def test_image_to_float() -> None:
    u8 = torch.tensor([[[0, 128, 255]]], dtype=torch.uint8)
    assert torch.equal(image_to_float(u8), torch.tensor([[[0, 128 / 255, 1]]]))
    u16 = torch.from_numpy(np.array([[[0, 32768, 65535]]], np.uint16))
    assert torch.equal(image_to_float(u16), torch.tensor([[[0, 32768 / 65535, 1]]]))
    assert image_to_float(u16).dtype == torch.float32
