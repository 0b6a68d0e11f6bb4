"""Tiled inference: predict an image of any size in `tile` x `tile` pieces that equal one pass.

`predict_tiled(model, images, tile, overlap)` returns the same logits as the whole-image pass
`predict_padded(model, images)` when the overlap covers the receptive field, and that pass is
`model(images)` itself whenever H and W are multiples of the model's output stride (always for
stride-1 models). How equality is made exact (not merely close):

1. **Tiles are crops of the image itself**, clamped inside it; nothing is padded around a tile.
   A tile that touches the image border therefore meets that border exactly as the whole-image
   pass does (same zero padding of every "same" convolution, same mirror padding of a valid
   U-Net or reflect patch classifier).
2. **Only the tile's centre is kept.** Neighbouring tiles overlap by at least `overlap` pixels
   and each keeps its part up to the middle of the overlap, so every kept pixel lies at least
   `overlap // 2` pixels inside its tile on every side that is not the image border. A pixel
   whose receptive field stays inside the tile sees exactly the values the whole-image pass
   sees: the corruption by the tile's own border padding spreads inwards by exactly the
   receptive field's reach (`min_overlap`).
3. **Tiles are aligned to the output stride s** (2^depth for a U-Net): tile sizes and tile
   origins are multiples of s, so every pooling and every x2 upsampler sees the same pixel phase
   as in the whole-image pass. This needs H and W to be multiples of s: an image that is not is
   padded once, at the bottom/right, to the next multiples (`pad_mode`, mirror by default)
   before tiling, and `predict_padded` (the whole-image pass `pixelwise predict` uses) pads it
   the same way. Without that padding no tiling could match: a strided model given an odd size
   resamples its skips by a non-integer factor that changes every pixel's interpolation weights.

Batch normalisation must be in eval mode (running statistics), which `load_model` sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError, unknown_name
from pixelwise.models.tiling import mirror_pad

logger = logging.getLogger(__name__)


def _zero_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    return F.pad(x, pad)


# How the image is padded at the bottom/right to a multiple of the output stride (only when a
# strided model needs it). "reflect" mirrors without repeating the edge, as the U-Net paper.
PAD_MODES: dict[str, Callable[[torch.Tensor, tuple[int, int, int, int]], torch.Tensor]] = {
    "reflect": mirror_pad,
    "zeros": _zero_pad,
}


def min_overlap(model: nn.Module) -> int | None:
    """The smallest `overlap` for which `predict_tiled` equals the whole-image pass, from the
    model's analytic receptive field R and output stride s: R + s - 2, rounded up to even.

    Why: a pixel's window of R input pixels is centred on the centre of its cell of the coarsest
    (stride s) grid, at most (s - 1) / 2 from the pixel, so it reaches at most
    (R - 1) / 2 + (s - 1) / 2 pixels to either side; the kept centre of a tile is `overlap // 2`
    from the tile's inner edges. None when the model has no `rf_path` or sees the whole image
    (global pooling: no overlap suffices).
    """
    rf = _receptive_field(model)
    if rf is None or rf.size is None:
        return None
    need = rf.size + rf.output_stride - 2
    return need + need % 2


def output_stride(model: nn.Module) -> int:
    """The model's output stride (tile alignment); 1 for a model without `rf_path`."""
    rf = _receptive_field(model)
    return 1 if rf is None else rf.output_stride


def _receptive_field(model: nn.Module):  # noqa: ANN202 - ReceptiveField | None
    from pixelwise.models.receptive_field import receptive_field

    if not hasattr(model, "rf_path"):
        return None
    try:
        return receptive_field(model)
    except TypeError as exc:  # a module without a receptive-field rule
        logger.debug("no receptive field for %s: %s", type(model).__name__, exc)
        return None


def tile_spans(length: int, tile: int, overlap: int, align: int = 1
               ) -> list[tuple[int, int, int]]:
    """1-D tile layout: `(start, keep_from, keep_to)` per tile; the tile covers
    `[start, start + tile)` (or the whole length when it fits in one tile) and supplies
    the output `[keep_from, keep_to)`. The kept ranges partition `[0, length)`.

    Starts step by the largest multiple of `align` <= tile - overlap; the last tile is clamped to
    end at `length` (its start must then be a multiple of `align`: `length` and `tile` are).
    Consecutive tiles meet in the middle of their overlap.
    """
    if length <= tile:
        return [(0, 0, length)]
    if tile % align or length % align:
        raise ValueError(f"tile {tile} and length {length} must be multiples of align {align}")
    step = (tile - overlap) // align * align
    if step < 1:
        raise UserError(f"tile {tile} leaves no step after an overlap of {overlap} px (output "
                        f"stride {align}); use a tile of at least {overlap + align} px")
    starts = list(range(0, length - tile, step)) + [length - tile]
    if len(starts) > 1 and starts[-1] == starts[-2]:
        starts.pop()
    cuts = [0] + [(nxt + prev + tile) // 2 for prev, nxt in zip(starts, starts[1:])] + [length]
    return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def check_tiling(tile: int, overlap: int, align: int = 1) -> int:
    """The tile side `predict_tiled` uses (`tile` rounded down to a multiple of `align`), or a
    `UserError` when that leaves no step between tiles after `overlap`."""
    if tile < 1 or overlap < 0:
        raise UserError(f"tile must be >= 1 and overlap >= 0, got {tile} and {overlap}")
    used = tile // align * align
    if used - overlap < align:
        least = -(-(overlap + align) // align) * align  # a multiple of the stride
        raise UserError(f"tile {tile} leaves no step after an overlap of {overlap} px (output "
                        f"stride {align}); use a tile of at least {least} px")
    return used


def pad_to_stride(images: torch.Tensor, align: int, pad_mode: str = "reflect") -> torch.Tensor:
    """(N, C, H, W) padded at the bottom/right to multiples of `align`: (N, C, H', W')."""
    if pad_mode not in PAD_MODES:
        raise unknown_name("pad mode", pad_mode, PAD_MODES)
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % align, (-w) % align
    if not (pad_h or pad_w):
        return images
    logger.debug("padded %dx%d to %dx%d (%s), multiples of the output stride %d", h, w,
                 h + pad_h, w + pad_w, pad_mode, align)
    return PAD_MODES[pad_mode](images, (0, pad_w, 0, pad_h))


def model_device(model: nn.Module, fallback: torch.device | None = None) -> torch.device:
    """Where `model`'s parameters are (`fallback`, else the CPU, for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return fallback if fallback is not None else torch.device("cpu")


@torch.no_grad()
def predict_padded(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    align: int | None = None,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """The whole-image pass that `predict_tiled` equals: `model` on `images` (N, C, H, W) padded
    to multiples of the output stride (`align`, default from the model), cropped back to
    (N, K, H, W); exactly `model(images)` when no padding is needed. Runs on the model's
    device, returns on `images`' device."""
    if align is None:
        align = output_stride(model) if isinstance(model, nn.Module) else 1
    h, w = images.shape[-2:]
    device = model_device(model, images.device) if isinstance(model, nn.Module) \
        else images.device
    logits = _logits(model(pad_to_stride(images, align, pad_mode).to(device)))
    return logits[..., :h, :w].to(images.device)  # (N, K, H', W') -> (N, K, H, W)


@torch.no_grad()
def predict_tiled(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    tile: int | tuple[int, int],
    overlap: int,
    *,
    align: int | None = None,
    pad_mode: str = "reflect",
    batch_size: int = 1,
) -> torch.Tensor:
    """Logits of `images` (N, C, H, W) computed tile by tile: (N, K, H, W), on `images`' device.

    tile: the tile side (or (h, w)); rounded down to a multiple of the output stride.
    overlap: pixels shared by neighbouring tiles; `overlap >= min_overlap(model)` makes the
    result equal `predict_padded(model, images)`, which is `model(images)` when H and W are
    multiples of `align` (module docstring). align: the output stride (default: from the
    model's receptive field, 1 without one). pad_mode: `PAD_MODES` key, how an image is padded
    to multiples of `align`. batch_size: tiles per forward pass.
    Tiles run on the model's device; only one batch of tiles is there at a time.
    """
    if pad_mode not in PAD_MODES:
        raise unknown_name("pad mode", pad_mode, PAD_MODES)
    if images.ndim != 4:
        raise UserError(f"predict_tiled expects images (N, C, H, W), got shape "
                        f"{tuple(images.shape)}")
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if overlap < 0 or batch_size < 1:
        raise UserError(f"overlap must be >= 0 and batch size >= 1, got {overlap}, {batch_size}")
    if isinstance(model, nn.Module):
        if model.training:
            logger.warning("predict_tiled: the model is in training mode; batch norm then uses "
                           "each tile's statistics and tiles will not match (call model.eval())")
        if align is None:
            align = output_stride(model)
        need = min_overlap(model)
        if need is None and hasattr(model, "rf_path"):
            logger.warning("the model's receptive field covers the whole image: tiled "
                           "prediction cannot equal the whole-image one")
        elif need is not None and overlap < need:
            logger.warning("overlap %d px < %d px (receptive field + stride - 2): tile borders "
                           "may show", overlap, need)
        device = model_device(model, images.device)
    else:
        device = images.device
    align = align or 1
    tile_h, tile_w = (check_tiling(t, overlap, align) for t in (tile_h, tile_w))

    n, _, h, w = images.shape
    padded = pad_to_stride(images, align, pad_mode)  # (N, C, H', W'), H' and W' multiples
    rows = tile_spans(padded.shape[-2], tile_h, overlap, align)
    cols = tile_spans(padded.shape[-1], tile_w, overlap, align)
    th, tw = min(tile_h, padded.shape[-2]), min(tile_w, padded.shape[-1])  # every tile's size
    jobs = [(r, c) for r in rows for c in cols]
    logger.debug("%d x %d tiles of %dx%d (overlap %d, stride %d)", len(rows), len(cols), th, tw,
                 overlap, align)

    out: torch.Tensor | None = None
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first:first + batch_size]
        crops = [padded[..., r[0]:r[0] + th, c[0]:c[0] + tw] for r, c in chunk]
        batch = torch.cat(crops).to(device)  # (len(chunk) * N, C, th, tw)
        logits = _logits(model(batch))  # (len(chunk) * N, K, th, tw)
        if logits.shape[-2:] != (th, tw):
            raise UserError(f"the model maps a {th}x{tw} tile to {tuple(logits.shape[-2:])}; "
                            "tiling needs outputs of the input's size")
        logits = logits.to(images.device)
        if out is None:
            out = logits.new_empty(n, logits.shape[1], h, w)
        for i, ((r0, r_from, r_to), (c0, c_from, c_to)) in enumerate(chunk):
            r_to, c_to = min(r_to, h), min(c_to, w)  # the padding is not part of the output
            if r_from >= r_to or c_from >= c_to:
                continue
            out[..., r_from:r_to, c_from:c_to] = logits[
                i * n:(i + 1) * n, :, r_from - r0:r_to - r0, c_from - c0:c_to - c0]
    assert out is not None
    return out


def _logits(output: object) -> torch.Tensor:
    from pixelwise.tasks.semantic import logits_of

    return logits_of(output)


def tile_count(height: int, width: int, tile: int, overlap: int, align: int = 1) -> int:
    """How many tiles `predict_tiled` runs for one (height, width) image."""
    t = check_tiling(tile, overlap, align)
    h, w = height + (-height) % align, width + (-width) % align
    return len(tile_spans(h, t, overlap, align)) * len(tile_spans(w, t, overlap, align))


__all__ = ["PAD_MODES", "check_tiling", "min_overlap", "output_stride", "pad_to_stride",
           "predict_padded", "predict_tiled", "tile_count", "tile_spans"]
