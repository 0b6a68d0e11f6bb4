"""Reading images and label maps from disk, safely.

`read_image` returns a `(C, H, W)` tensor with C = 1 (grayscale) or 3 (colour), dtype uint8 for
8-bit files and uint16 for 16-bit ones; `image_to_float` scales it to float32 in [0, 1].
`read_label_png` returns the `(H, W)` int64 class indices of an index or palette PNG.

What is read, and how:
- PNG, JPEG, BMP, WebP, GIF (first frame) through Pillow; EXIF orientation applied
  (`PIL.ImageOps.exif_transpose`), so pixels come out as a viewer shows them.
- Grayscale stays one channel; palette images become RGB; the alpha channel of RGBA / LA images
  is dropped (not composited: the colour values are kept as stored).
- 16-bit grayscale PNG (Pillow mode ``I;16``) stays uint16. Pillow silently reduces 16-bit
  *colour* PNGs to 8 bits, so those are decoded with `torchvision.io.decode_png` instead.
- TIFF through `tifffile` (microscopy: 16-bit, many samples per pixel, planar layouts), first
  page only, TIFF orientation tag applied; Pillow is the fallback for palette TIFFs and for
  compressions that need the optional `imagecodecs` package (LZW, ...).

Safety: the pixel count is read from the header and checked against ``max_pixels`` *before*
anything is decoded (a decompression bomb is refused without allocating it), and the file is
decoded completely, so a truncated or corrupt file fails here, with a `BadFileError` naming it,
not later inside a training step.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelwise.data.layout import BadFileError

logger = logging.getLogger(__name__)

# 2**27 = 134,217,728 pixels (e.g. 16384 x 8192, or 11585 x 11585): far above any training
# image, yet one such RGB image is already 400 MB as uint8 and 1.6 GB as float32. It is below
# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS, about 179 Mpx), so this limit is the one
# users meet. Larger images (whole slides) should be tiled; pass max_pixels=None to lift it.
DEFAULT_MAX_PIXELS = 2**27

TIFF_SUFFIXES = (".tif", ".tiff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_EXIF_ORIENTATION = 0x0112  # the EXIF / TIFF tag number of "Orientation"
_PIL_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")
_pil_limit_lock = threading.Lock()

# Pillow modes that hold one 16-bit channel
_PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow modes converted to RGB for images (palette -> its colours; alpha dropped)
_PIL_TO_RGB = ("P", "PA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")


def read_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read an image file as a `(C, H, W)` tensor, C = 1 or 3, dtype uint8 or uint16.

    Raises `BadFileError` (a `UserError`) naming the file when it is missing, not an image,
    corrupt, truncated, of an unsupported kind, or has more than `max_pixels` pixels.
    """
    path = Path(path)
    if _is_tiff(path):
        array = _read_tiff(path, max_pixels, label=False)
    else:
        array = _read_pil(path, max_pixels, label=False)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    # Pillow's arrays are read-only views of bytes; torch wants a writable, contiguous buffer
    tensor = torch.from_numpy(np.require(array, requirements=["C", "W"]))
    return tensor.permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)


def read_label_png(
    path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Read a label map as `(H, W)` int64 class indices.

    Index (8/16-bit grayscale) and palette PNGs (the palette *indices*, as PASCAL VOC stores
    them), also single-channel TIFFs. An RGB file is accepted only when its three channels are
    equal; a colour-coded mask needs its colour table and is refused. Errors as `read_image`.
    """
    path = Path(path)
    if _is_tiff(path):
        array = _read_tiff(path, max_pixels, label=True)
    else:
        array = _read_pil(path, max_pixels, label=True)
    return torch.from_numpy(array.astype(np.int64))  # astype copies: contiguous, writable


def image_to_float(img: torch.Tensor) -> torch.Tensor:
    """Scale an integer image `(C, H, W)` to float32 in [0, 1] by its dtype's maximum.

    uint8 is divided by 255, uint16 by 65535; a floating-point image is only cast to float32.
    """
    if img.is_floating_point():
        return img.to(torch.float32)
    if img.dtype == torch.bool:
        return img.to(torch.float32)
    # torch has few kernels for uint16 (no division), so cast to float32 first; exact for both
    top = 65535.0 if img.dtype == torch.uint16 else float(torch.iinfo(img.dtype).max)
    return img.to(torch.float32) / top


# ----------------------------------------------------------------------------- Pillow path


def _read_pil(path: Path, max_pixels: int | None, *, label: bool) -> np.ndarray:
    """Decode with Pillow; returns (H, W) or (H, W, C) uint8 / uint16 (int for labels)."""
    image = _open_checked(path, max_pixels)
    with image:
        _decode_fully(path, image)
        orientation = _exif_orientation(path, image)
        png16 = _png_16bit_colour(path) if image.format == "PNG" else False
        if png16 and not label:
            # Pillow reduced this 16-bit colour PNG to 8 bits; libpng (torchvision) keeps 16.
            array = _decode_png16(path)
            return _orient(array, orientation)
        if orientation > 1:
            image = ImageOps.exif_transpose(image)
        if label:
            return _label_array(path, image)
        return _image_array(path, image)


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and refuse an image over `max_pixels` before decoding."""
    if not path.is_file():
        raise BadFileError(path, "file not found" if not path.exists() else "not a file")
    try:
        with warnings.catch_warnings():
            # our own limit below decides; Pillow's warning threshold is lower than our default
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _pil_limit_lifted(max_pixels):
                image = Image.open(path)
    except Image.DecompressionBombError as exc:
        found = _PIL_BOMB_SIZE.search(str(exc))
        count = f"{int(found.group(1)):,} pixels" if found else "its pixel count"
        raise BadFileError(path, _over_limit(count, max_pixels)) from None
    except UnidentifiedImageError:
        raise BadFileError(path, "not an image file (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on bad headers
        raise BadFileError(path, f"corrupt image header ({_why(exc)})") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise BadFileError(path, _over_limit(f"{height}x{width} = {width * height:,} pixels",
                                             max_pixels))
    return image


@contextlib.contextmanager
def _pil_limit_lifted(max_pixels: int | None):
    """Lift Pillow's global bomb limit while opening, only when ours is higher (or None).

    Pillow checks its own limit inside `Image.open`; when the caller allows more, that check
    must be off for the header read (ours follows it). The lock keeps threads of this module
    from interleaving the save/restore of the module-level setting.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None or (max_pixels is not None and max_pixels <= 2 * pil_limit):
        yield
        return
    with _pil_limit_lock:
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _over_limit(count: str, max_pixels: int | None) -> str:
    return (f"{count} is over the pixel limit of {max_pixels:,} (possible decompression bomb); "
            "refused")


def _decode_fully(path: Path, image: Image.Image) -> None:
    """Decode every pixel now so that truncation and corruption surface here."""
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error ...
        raise BadFileError(path, f"corrupt or truncated image ({_why(exc)})") from None


def _exif_orientation(path: Path, image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF blocks raise various errors
        raise BadFileError(path, f"corrupt EXIF data ({_why(exc)})") from None
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _image_array(path: Path, image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L"))
    if mode in _PIL_16BIT_MODES:
        return np.asarray(image).astype(np.uint16)  # big-endian I;16B -> native order
    if mode == "I":
        return _int32_to_uint16(path, np.asarray(image))
    if mode in _PIL_TO_RGB:
        try:
            return np.asarray(image.convert("RGB"))
        except Exception as exc:  # noqa: BLE001
            raise BadFileError(path, f"cannot convert {mode} image to RGB ({_why(exc)})") from None
    raise BadFileError(path, f"unsupported image mode {mode!r} (pixelwise reads 8- and 16-bit "
                             "grayscale, RGB, RGBA and palette images)")


def _label_array(path: Path, image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("P", "L", "1"):
        return np.asarray(image)  # palette images give their indices, not the colours
    if mode in ("PA", "LA", "La"):
        return np.asarray(image)[:, :, 0]  # (H, W, 2) -> (H, W): drop alpha
    if mode in _PIL_16BIT_MODES:
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        return np.asarray(image)
    if mode in ("RGB", "RGBA"):
        return _equal_channels(path, np.asarray(image)[:, :, :3])
    raise BadFileError(path, f"unsupported label image mode {mode!r}: expected an index or "
                             "palette PNG (one class index per pixel)")


def _equal_channels(path: Path, array: np.ndarray) -> np.ndarray:
    """A label map stored as RGB with R = G = B (a common export) -> (H, W); else refused."""
    first = array[:, :, 0]
    if not all(np.array_equal(first, array[:, :, c]) for c in range(1, array.shape[2])):
        raise BadFileError(path, "colour label image: expected an index or palette PNG (one "
                                 "class index per pixel), not colours")
    return first


def _int32_to_uint16(path: Path, array: np.ndarray) -> np.ndarray:
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise BadFileError(path, "32-bit integer image with values outside 0..65535 "
                                 "(pixelwise reads 8- and 16-bit images)")
    return array.astype(np.uint16)


def _png_16bit_colour(path: Path) -> bool:
    """True for a 16-bit RGB, RGBA or gray+alpha PNG (IHDR: bit depth 16, colour type 2/4/6)."""
    with open(path, "rb") as f:
        head = f.read(26)  # 8-byte signature, chunk length and type, then IHDR's fields
    return len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6)


def _decode_png16(path: Path) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_png, read_file

    try:
        tensor = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except Exception as exc:  # noqa: BLE001 - libpng errors arrive as RuntimeError
        raise BadFileError(path, f"corrupt or truncated image ({_why(exc)})") from None
    channels = 1 if tensor.shape[0] <= 2 else 3  # drop alpha: gray+alpha -> gray, RGBA -> RGB
    # tensor (C, H, W) uint16 -> array (H, W, C)
    return tensor[:channels].permute(1, 2, 0).numpy().astype(np.uint16)


# ----------------------------------------------------------------------------- TIFF path


def _is_tiff(path: Path) -> bool:
    if path.suffix.lower() in TIFF_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False  # the Pillow path reports the missing file


def _read_tiff(path: Path, max_pixels: int | None, *, label: bool) -> np.ndarray:
    """Decode the first page with tifffile; (H, W) or (H, W, C), orientation applied."""
    import tifffile

    if not path.is_file():
        raise BadFileError(path, "file not found" if not path.exists() else "not a file")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            shape, axes = tuple(page.shape), page.axes
            if "Y" not in axes or "X" not in axes:
                raise BadFileError(path, f"unsupported TIFF layout (axes {axes!r})")
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            if max_pixels is not None and height * width > max_pixels:
                raise BadFileError(path, _over_limit(
                    f"{height}x{width} = {height * width:,} pixels", max_pixels))
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE and not label:
                return _read_pil(path, max_pixels, label=label)  # Pillow applies the colour map
            if len(tif.pages) > 1:
                logger.debug("%s: %d TIFF pages, reading the first", path, len(tif.pages))
            try:
                array = page.asarray()
            except ValueError as exc:
                if "imagecodecs" not in str(exc):
                    raise
                # compressions such as LZW need the optional imagecodecs package: Pillow has them
                logger.debug("%s: %s; decoding with Pillow", path, exc)
                return _read_pil(path, max_pixels, label=label)
            orientation = page.tags.valueof(_EXIF_ORIENTATION, default=1)
            miniswhite = page.photometric == tifffile.PHOTOMETRIC.MINISWHITE
    except BadFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises ValueError, TiffFileError, ...
        raise BadFileError(path, f"corrupt or truncated TIFF ({_why(exc)})") from None
    array = _tiff_to_hwc(path, array, axes, label=label)
    if miniswhite and array.dtype != bool:
        array = np.iinfo(array.dtype).max - array  # 0 = white in this photometric
    if array.dtype == bool:
        array = array.astype(np.uint8) * (1 if label else 255)
    return _orient(array, int(orientation) if 1 <= int(orientation) <= 8 else 1)


def _tiff_to_hwc(path: Path, array: np.ndarray, axes: str, *, label: bool) -> np.ndarray:
    # drop singleton axes other than Y, X, S (e.g. a depth of 1)
    keep = [i for i, a in enumerate(axes) if a in "YXS" or array.shape[i] != 1]
    array = array.reshape([array.shape[i] for i in keep])  # squeeze singleton extra axes
    axes = "".join(axes[i] for i in keep)
    if set(axes) - set("YXS"):
        raise BadFileError(path, f"unsupported TIFF layout (axes {axes!r}, shape {array.shape})")
    order = [axes.index(a) for a in "YXS" if a in axes]
    array = array.transpose(order)  # -> (H, W) or (H, W, S)
    if array.dtype not in (np.uint8, np.uint16, np.bool_) and not (
        label and np.issubdtype(array.dtype, np.integer)
    ):
        raise BadFileError(path, f"unsupported TIFF sample type {array.dtype} (pixelwise reads "
                                 "8- and 16-bit unsigned images)")
    if array.ndim == 2:
        return array
    samples = array.shape[2]
    if label:
        if samples == 1:
            return array[:, :, 0]
        return _equal_channels(path, array[:, :, : min(samples, 3)])
    if samples in (1, 2):
        return array[:, :, 0]  # gray, or gray + alpha: drop alpha
    if samples in (3, 4):
        return array[:, :, :3]  # RGB, or RGBA: drop alpha
    raise BadFileError(path, f"TIFF with {samples} samples per pixel is not supported "
                             "(1 to 4: gray, gray+alpha, RGB, RGBA)")


# ----------------------------------------------------------------------------- helpers


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF orientation (1..8) to an (H, W[, C]) array, as exif_transpose does.

    Written by hand for the decoders that do not go through Pillow (tifffile, libpng);
    tests compare it with `PIL.ImageOps.exif_transpose` for all eight values.
    """
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _why(exc: BaseException) -> str:
    """A one-line reason from a library exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
