"""Faster R-CNN-family inference on CPU: the same detections as torchvision, in less time.

Where torchvision's eval time goes at 256x256 with 100 detections (`benchmarks/instance.py`):
mostly the RoI heads -- the mask head's four 3x3 convs (8 x 512 for keypoints) on every
detection, the mask predictor, then Python loops in NMS and mask pasting. What is changed here,
and why it gives the same answer:

* `batched_nms_top_k` -- torchvision runs class-wise NMS over every (proposal, class) pair
  (1000 x 90 = 90k boxes with score_thresh 0: a Python loop over the classes) and then keeps the
  first `detections_per_img`. Greedy NMS decides each box from the higher-scored boxes alone,
  so NMS on the top-m boxes keeps exactly the first kept boxes of NMS on all of them; m grows
  until `k` boxes survive. The per-class `torchvision.ops.nms` calls see the very same boxes, so
  boxes and scores are bit-identical.
* `run_conv_stack` -- the RoI heads' 3x3 convolutions run through NNPACK (bundled with PyTorch;
  Winograd transforms), about twice as fast as the default oneDNN direct convolution on these
  (R, C, 14, 14) shapes; 512-channel stacks (the keypoint head) on the RoIs tiled into one map
  (`pixelwise.ops.roi_mosaic`: NNPACK's one-image inference path, 1.05-1.3x faster again).
  Inference only (no autograd), float32 CPU tensors only; any NNPACK failure falls back to the
  module for good.
* `selected_mask_logits` -- only the detected class's 28x28 logits are computed (a per-RoI dot
  product, not all `num_classes` maps), and the paper's 2x2 stride-2 transposed conv, whose taps
  never overlap, is one GEMM fused with it (no NCHW upsampled map).
* `keypoint_logits` -- torchvision's 4x4 stride-2 transposed conv as a GEMM + col2im (`F.fold`).
* `paste_masks` -- torchvision pastes each mask with its own `interpolate` and slice copy (a
  Python loop). Bilinear resizing is separable, so pasting N masks is two batched matmuls with
  (N, H, M) and (N, W, M) interpolation matrices that are zero outside each box: the same
  geometry (1-pixel padded mask, integer box, `align_corners=False`, edge clamp) and weights as
  `torchvision.models.detection.roi_heads.paste_mask_in_image`. Thresholding (`threshold`)
  happens after pasting, at full resolution, chunk by chunk.
* `FastRoIHeads.head_dtype` (`mask_rcnn(head_dtype="bfloat16")`, off by default) -- the
  mask / keypoint head and its predictor in bfloat16: a bf16 copy of the head with
  channels_last weights (made again whenever its weights change) through oneDNN. Where the
  CPU has native bf16 (AVX512-BF16, AMX) the mask head's convs run 1.9x and its predictor 3x
  faster than the float32 path above (the keypoint head's 1.6x and 4x; `benchmarks/
  instance.py`, ResNet-50-FPN, 100 detections); the box branch stays float32, so boxes and
  scores are unchanged; mask probabilities move by ~1e-3 (a few pixels near 0.5 change side),
  keypoint peaks may move to a near-tied cell.
* `heatmaps_to_keypoints` -- torchvision resizes each RoI's heatmaps with a bicubic
  `interpolate` in a Python loop; here RoIs of similar size at once, as matmuls with bicubic
  interpolation matrices (torch's kernel: A = -0.75, `align_corners=False`, clamped taps),
  padding masked out of the argmax. Same keypoints (it is not where the time goes, though:
  ~50 ms of torchvision's seconds; faster for large boxes, on par for small ones).

* `FastRoIHeads.maskness` (`mask_rcnn(maskness=p)`, off by default; not torchvision's: a
  pixelwise addition) -- each detection's score times its RoI mask's maskness ** p (SOLOv2's
  mask score: the mean probability over the mask's pixels >= 0.5), so that a confident box
  with an unsure mask ranks below one with a sure mask; the boxes are the same, the scores
  and their order are not.

The backbone, RPN and box branch are torchvision's, untouched (bit-identical proposals, boxes,
scores): at 256x256 they are ~40% of torchvision's mask eval time, which bounds the speedup.

`FastRoIHeads` (torchvision `RoIHeads` with that eval path; training is torchvision's) and
`RCNNTransform` (torchvision's transform with `paste_masks`, a mask threshold and an optional
no-resize mode) put them together.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    expand_boxes,
    paste_masks_in_image,
)
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
    resize_keypoints,
)
from torchvision.ops import boxes as box_ops

from pixelwise.ops.roi_mosaic import Mosaic
from pixelwise.upsample import TransposedConv

logger = logging.getLogger(__name__)

# float32 elements one chunk of pasted masks / upsampled heatmaps may hold (64 MB)
CHUNK_ELEMENTS = 1 << 24
# off the CPU: padded keypoint heatmaps of up to 2**27 floats (512 MB) resized in one batch
GPU_CHUNK_ELEMENTS = 1 << 27
# RoIs per chunk of the fused mask predictor (16 x 784 x 256 floats: 13 MB)
MASK_CHUNK = 16
# RoIs per tiled map of `run_conv_stack` at most (256 RoIs of 14 x 14 at 512 channels: 120 MB)
MOSAIC_ROIS = 256
# tiling pays for convolutions this wide (output channels). Per-RoI / tiled time, 2 threads:
# one 3x3 conv on 100 RoIs: 0.69x at 64 channels, 0.99x at 128, 1.14x at 256, 1.22x at 512;
# whole stacks (packing, separators, NNPACK's kernel transform on every call included): the
# keypoint head (8 x 512) 1.30x / 1.20x / 1.12x / 1.05x on 30 / 100 / 200 / 300 RoIs, the
# mask head (4 x 256) 1.24x / 1.09x / 0.98x / 0.92x
MOSAIC_MIN_CHANNELS = 512


# ----------------------------------------------------------------------------- NMS


def _classwise_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                   iou_threshold: float) -> torch.Tensor:
    """NMS within each label, as torchvision's `_batched_nms_vanilla` (one `nms` per class).

    Inputs sorted by score (descending); returns kept positions (ascending = by score)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for label in torch.unique(labels):
        pos = torch.where(labels == label)[0]
        keep[pos[box_ops.nms(boxes[pos], scores[pos], iou_threshold)]] = True
    return torch.where(keep)[0]


def batched_nms_top_k(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                      iou_threshold: float, k: int) -> torch.Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)[:k]`` computed on
    the top-scored boxes only (see the module docstring). boxes (n, 4), scores (n,), labels (n,)
    -> kept indices (<= k,), by decreasing score."""
    n = scores.numel()
    if n == 0 or k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    # a stable sort: equal scores keep index order, as torchvision's (stable) nms orders them
    order = scores.sort(descending=True, stable=True).indices
    m = min(n, max(4 * k, 256))
    while True:
        top = order[:m]
        kept = _classwise_nms(boxes[top], scores[top], labels[top], iou_threshold)
        if kept.numel() >= k or m == n:
            return top[kept[:k]]
        m = min(n, 4 * m)


def postprocess_detections(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    proposals: list[torch.Tensor],
    image_shapes: list[tuple[int, int]],
    box_coder: Any,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """torchvision's `RoIHeads.postprocess_detections` with `batched_nms_top_k`.

    class_logits (R, C), box_regression (R, 4C), proposals [(R_i, 4)] -> per image boxes
    (D_i, 4), scores (D_i,), labels (D_i,) with D_i <= detections_per_img."""
    num_classes = class_logits.shape[-1]
    boxes_per_image = [len(p) for p in proposals]
    pred_boxes = box_coder.decode(box_regression, proposals)  # (R, C, 4)
    pred_scores = F.softmax(class_logits, -1)  # (R, C)
    all_boxes, all_scores, all_labels = [], [], []
    for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image, 0),
                                          pred_scores.split(boxes_per_image, 0), image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
        # drop the background column, then one candidate per (proposal, class)
        boxes = boxes[:, 1:].reshape(-1, 4)  # (R_i, C-1, 4) -> (R_i (C-1), 4)
        scores = scores[:, 1:].reshape(-1)  # (R_i, C-1) -> (R_i (C-1),)
        labels = labels[:, 1:].reshape(-1)
        inds = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms_top_k(boxes, scores, labels, nms_thresh, detections_per_img)
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels


# ----------------------------------------------------------------------------- convolutions


def _nnpack_ok(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether NNPACK computes this convolution (see the module docstring)."""
    return (
        NNPACK_AVAILABLE
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and x.dim() == 4
        and x.shape[0] > 0
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and all(p < k for p, k in zip(conv.padding, conv.kernel_size))
        and max(conv.kernel_size) <= 16
    )


def run_conv_stack(module: nn.Module, x: torch.Tensor, *, mosaic: bool = True
                   ) -> torch.Tensor:
    """Run `module` (e.g. torchvision's `MaskRCNNHeads`, a Sequential of conv / norm / ReLU) on
    x (R, C, h, w), its stride-1 convolutions through NNPACK when `_nnpack_ok`; with `mosaic`,
    RoIs tiled into one map (`pixelwise.ops.roi_mosaic`) when every layer allows it."""
    layers = _leaf_layers(module)
    pad = _mosaic_pad(layers, x) if mosaic else None
    if pad is None:
        for layer in layers:
            x = _run_module(layer, x)
        return x
    r, _, h, w = x.shape
    per_map = math.ceil(r / math.ceil(r / MOSAIC_ROIS))  # maps of equal RoI counts
    outputs = []
    for lo in range(0, r, per_map):
        chunk = x[lo:lo + per_map]
        layout = Mosaic.for_rois(len(chunk), h, w, pad)
        separators = layout.separators(x.device)
        y = layout.pack(chunk)  # (n, C, h, w) -> (1, C, H, W)
        clear = False  # separators still zero
        for layer in layers:
            if isinstance(layer, nn.Conv2d) and clear:
                # each RoI must see only its own pixels and zeros
                y = layout.clear_separators_(y, separators)
            y = _run_module(layer, y)
            clear = True
        outputs.append(layout.unpack(y))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _leaf_layers(module: nn.Module) -> list[nn.Module]:
    """The modules a (nested) Sequential runs, in order; any other module as one layer."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaf_layers(child)]
    return [module]


def _mosaic_pad(layers: list[nn.Module], x: torch.Tensor) -> int | None:
    """The separator width tiling needs (the largest conv padding), or None where a layer is
    not pointwise or a size-preserving NNPACK convolution (e.g. GroupNorm: per-RoI statistics;
    NNPACK missing: oneDNN is slower on one large map than on the RoI batch), or a convolution
    has fewer than MOSAIC_MIN_CHANNELS outputs."""
    if x.dim() != 4 or x.shape[0] == 0:
        return None
    pad = 0
    for layer in layers:
        if type(layer) is nn.Conv2d:
            k, p = layer.kernel_size, layer.padding
            if (not _nnpack_ok(layer, x) or k[0] != k[1] or not isinstance(p, tuple)
                    or p[0] != p[1] or k[0] != 2 * p[0] + 1
                    or layer.out_channels < MOSAIC_MIN_CHANNELS):
                return None
            pad = max(pad, p[0])
        elif isinstance(layer, nn.BatchNorm2d):
            if layer.training or layer.running_mean is None:  # batch statistics
                return None
        elif not isinstance(layer, (nn.ReLU, nn.Identity)):
            return None
    return pad if pad > 0 else None


def _run_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One layer of `run_conv_stack` (a leaf of `_leaf_layers`)."""
    if type(module) is nn.Conv2d and _nnpack_ok(module, x):
        try:
            return torch._nnpack_spatial_convolution(x.contiguous(), module.weight, module.bias,
                                                     list(module.padding), [1, 1])
        except RuntimeError as exc:  # NNPACK refused (e.g. an unsupported CPU): never again
            global NNPACK_AVAILABLE
            NNPACK_AVAILABLE = False
            logger.warning("NNPACK convolution failed (%s); using the default convolution", exc)
    return module(x)


def _is_deconv(conv: nn.Module, kernel: int, stride: int, padding: int) -> bool:
    return (isinstance(conv, nn.ConvTranspose2d) and conv.kernel_size == (kernel, kernel)
            and conv.stride == (stride, stride) and conv.padding == (padding, padding)
            and conv.output_padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)


def selected_mask_logits(predictor: nn.Module, x: torch.Tensor, labels: torch.Tensor
                         ) -> torch.Tensor:
    """Mask logits of each RoI's own class: x (R, C, h, w), labels (R,) -> (R, 2h, 2w).

    For the paper's predictor (2x2 stride-2 transposed conv, ReLU, 1x1 conv: `MaskPredictor`
    with ``"transposed"``) the transposed conv is one GEMM (its four kernel taps never overlap)
    and the 1x1 conv a per-RoI dot product, fused without building the upsampled map in
    NCHW; other predictors: their ``forward_selected``, else the full forward then a gather."""
    if getattr(predictor, "class_agnostic", False):  # one map for every class
        labels = torch.zeros_like(labels)
    conv = getattr(predictor, "conv5_mask", None)  # torchvision's MaskRCNNPredictor
    up = getattr(predictor, "upsample", None)
    if conv is None and isinstance(up, TransposedConv):  # pixelwise's (output exactly 2h x 2w)
        conv = up.conv
    last = getattr(predictor, "mask_fcn_logits", None)
    r, c, h, w = x.shape
    if (conv is not None and _is_deconv(conv, 2, 2, 0) and conv.bias is not None
            and isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1)):
        o = conv.out_channels
        rows = x.permute(0, 2, 3, 1).reshape(r, h * w, c)  # (R, C, h, w) -> (R, h*w, C)
        taps = conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * o)  # (C, O, 2, 2) -> (C, 4*O)
        bias = conv.bias.repeat(4)  # (4*O,) in the (a, b, o) order of `taps`' columns
        weight = last.weight[labels, :, 0, 0].unsqueeze(2)  # (R, O, 1)
        parts = []
        # RoIs in small chunks: the (chunk*h*w, 4*O) upsampled features stay in cache
        for lo in range(0, r, MASK_CHUNK):
            hi = min(r, lo + MASK_CHUNK)
            feats = torch.addmm(bias, rows[lo:hi].reshape(-1, c), taps).clamp_(min=0)
            parts.append(torch.bmm(feats.view(hi - lo, h * w * 4, o), weight[lo:hi]))
        logits = torch.cat(parts) if parts else x.new_zeros(0, h * w * 4, 1)  # (R, h*w*4, 1)
        logits = logits.view(r, h, w, 2, 2).permute(0, 1, 3, 2, 4)  # (R, h*w*4, 1) -> (R,h,2,w,2)
        logits = logits.reshape(r, 2 * h, 2 * w)  # (R, h, 2, w, 2) -> (R, 2h, 2w)
        if last.bias is not None:
            logits = logits + last.bias[labels].view(r, 1, 1)
        fused = predictor.fused(x) if hasattr(predictor, "fused") else None
        return logits if fused is None else logits + fused
    if hasattr(predictor, "forward_selected"):
        return predictor.forward_selected(x, labels)
    return predictor(x)[torch.arange(r, device=labels.device), labels]  # (R, 2h, 2w)


def keypoint_logits(predictor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Heatmap logits (R, K, 4h, 4w) of x (R, C, h, w).

    torchvision's predictor (a 4x4 stride-2 transposed conv C -> K, then bilinear x2: also
    `KeypointPredictor` with ``"transposed"``) runs its transposed conv as a GEMM and a col2im
    (`F.fold`), the way PyTorch's reference implementation defines it, about twice as fast as the
    oneDNN deconvolution on these shapes; other predictors run as they are."""
    conv = getattr(predictor, "kps_score_lowres", None)
    if conv is None or not _is_deconv(conv, 4, 2, 1):
        return predictor(x)
    r, c, h, w = x.shape
    k = conv.out_channels
    cols = torch.matmul(conv.weight.reshape(c, k * 16).t(), x.reshape(r, c, h * w))
    # cols (R, K*4*4, h*w) -> overlapping 4x4 patches summed into (R, K, 2h, 2w)
    y = F.fold(cols, (2 * h, 2 * w), 4, stride=2, padding=1)
    if conv.bias is not None:
        y = y + conv.bias.view(1, k, 1, 1)
    return F.interpolate(y, scale_factor=float(predictor.up_scale), mode="bilinear",
                         align_corners=False, recompute_scale_factor=False)


def _nnpack_available() -> bool:
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


# also NNPACK's initialisation: without a `torch._nnpack_available()` call first in the process,
# `torch._nnpack_spatial_convolution` fails ("SpatialConvolution_updateOutput failed"; torch 2.14)
NNPACK_AVAILABLE = _nnpack_available()


# ----------------------------------------------------------------------------- mask pasting


def _linear_weights(start: torch.Tensor, length: torch.Tensor, size: int, src: int
                    ) -> torch.Tensor:
    """Bilinear (align_corners=False) weights resizing `src` samples to `length` pixels placed
    at `start`, on an axis of `size` pixels: (N,) ints -> (N, size, src); rows outside
    [start, start + length) are zero.

    Computed as torch's `upsample_bilinear2d` CPU kernel does: output p reads source
    s = max((p - start + 0.5) * src / length - 0.5, 0), i0 = floor(s), lambda = s - i0, with
    weight 1 - lambda at i0 and lambda at i0 + 1 (i0 itself at the last sample), so that
    saturated probabilities (0 and 1) paste to the very same values."""
    pos = torch.arange(size, device=start.device, dtype=torch.float32)  # (size,)
    local = pos[None, :] - start[:, None].to(torch.float32)  # (N, size)
    scale = src / length.to(torch.float32)  # (N,)
    s = ((local + 0.5) * scale[:, None] - 0.5).clamp(min=0)  # (N, size)
    i0 = s.to(torch.int64).clamp(max=src - 1)  # (N, size)
    lam = (s - i0).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=src - 1)
    inside = ((local >= 0) & (local < length[:, None].to(torch.float32))).to(torch.float32)
    weights = torch.zeros((*s.shape, src), device=start.device, dtype=torch.float32)
    weights.scatter_add_(2, i0[..., None], ((1 - lam) * inside)[..., None])
    weights.scatter_add_(2, i1[..., None], (lam * inside)[..., None])
    return weights  # (N, size, src)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: Sequence[int], *,
                padding: int = 1, threshold: float | None = None) -> torch.Tensor:
    """Paste RoI masks into the image, as torchvision's `paste_masks_in_image`, vectorised.

    masks (N, 1, M, M) or (N, M, M) probabilities; boxes (N, 4) x1, y1, x2, y2 in image pixels;
    image_size (H, W). Returns (N, 1, H, W): float probabilities, or bool ``>= threshold`` when
    `threshold` is given (thresholded after pasting, at full resolution)."""
    # float32 matmuls also under autocast (CUDA eval runs in float16): the pasted geometry and
    # the threshold must not depend on it
    with torch.autocast(masks.device.type, enabled=False):
        return _paste_masks(masks, boxes, image_size, padding, threshold)


def _paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: Sequence[int],
                 padding: int, threshold: float | None) -> torch.Tensor:
    if masks.dim() == 4:
        masks = masks[:, 0]  # (N, 1, M, M) -> (N, M, M)
    height, width = int(image_size[0]), int(image_size[1])
    n, m = masks.shape[0], masks.shape[-1]
    dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((n, 1, height, width), dtype=dtype, device=masks.device)
    if n == 0:
        return out
    # torchvision's geometry: pad by one pixel, grow the box to match, truncate it to ints
    padded = F.pad(masks, (padding,) * 4).to(torch.float32)  # (N, M+2p, M+2p)
    src = m + 2 * padding
    ibox = expand_boxes(boxes, src / m).to(torch.int64)  # (N, 4)
    widths = (ibox[:, 2] - ibox[:, 0] + 1).clamp(min=1)
    heights = (ibox[:, 3] - ibox[:, 1] + 1).clamp(min=1)
    chunk = max(1, CHUNK_ELEMENTS // max(1, height * width))
    for lo in range(0, n, chunk):
        sl = slice(lo, lo + chunk)
        rows = _linear_weights(ibox[sl, 1], heights[sl], height, src)  # (n, H, src)
        cols = _linear_weights(ibox[sl, 0], widths[sl], width, src)  # (n, W, src)
        # x inside, y outside, as torch's kernel sums: rows @ (mask @ cols^T)
        pasted = rows @ (padded[sl] @ cols.transpose(1, 2))  # (n,H,src)((n,src,src)(n,src,W))
        if threshold is not None:
            out[sl, 0] = pasted >= threshold
        else:
            out[sl, 0] = pasted.to(dtype)
    return out


# ----------------------------------------------------------------------------- keypoints


def _cubic_weights(length: torch.Tensor, size: int, src: int) -> torch.Tensor:
    """Bicubic (A = -0.75, align_corners=False) weights resizing `src` samples to `length`
    (N,) outputs, padded to `size`: (N, size, src); rows >= length are zero. As torch's
    `upsample_bicubic2d`: source x = (p + 0.5) * src / length - 0.5 (not clamped), taps at
    floor(x) - 1 .. floor(x) + 2 clamped into [0, src - 1] (repeated taps add up)."""
    a = -0.75
    pos = torch.arange(size, device=length.device, dtype=torch.float32)  # (size,)
    scale = src / length.to(torch.float32)  # (N,)
    x = (pos[None, :] + 0.5) * scale[:, None] - 0.5  # (N, size)
    x0 = x.floor()
    t = x - x0
    coeffs = torch.stack([
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ], dim=-1)  # (N, size, 4)
    taps = (x0.to(torch.int64)[..., None] + torch.arange(-1, 3, device=length.device)
            ).clamp(0, src - 1)  # (N, size, 4)
    inside = (pos[None, :] < length[:, None].to(torch.float32))[..., None]  # (N, size, 1)
    weights = torch.zeros((*x.shape, src), device=length.device, dtype=torch.float32)
    return weights.scatter_add_(2, taps, coeffs * inside)  # (N, size, src)


def _keypoint_chunks(hc: list[int], wc: list[int], k: int, *, cpu: bool = True
                     ) -> list[list[int]]:
    """Group RoIs (heatmap sizes hc x wc) into chunks whose padded (n, K, Hmax, Wmax) maps stay
    under CHUNK_ELEMENTS and waste at most half their area on padding (sorted by height, then
    width, so that neighbours have similar shapes). Off the CPU (cpu False) the chunks are as
    large as GPU_CHUNK_ELEMENTS allows, padding regardless: a GPU is fastest with one batch,
    and each chunk costs a synchronisation."""
    budget = CHUNK_ELEMENTS if cpu else GPU_CHUNK_ELEMENTS
    order = sorted(range(len(hc)), key=lambda i: (hc[i], wc[i]))
    chunks: list[list[int]] = []
    current: list[int] = []
    hmax = wmax = area = 0
    for i in order:
        h2, w2, a2 = max(hmax, hc[i]), max(wmax, wc[i]), area + hc[i] * wc[i]
        padded = (len(current) + 1) * h2 * w2
        wasteful = cpu and padded > 1.5 * a2 + 4096
        if current and (padded * k > budget or wasteful):
            chunks.append(current)
            current, h2, w2, a2 = [], hc[i], wc[i], hc[i] * wc[i]
        current.append(i)
        hmax, wmax, area = h2, w2, a2
    if current:
        chunks.append(current)
    return chunks


def heatmaps_to_keypoints(maps: torch.Tensor, rois: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's `heatmaps_to_keypoints`, RoIs batched (see the module docstring).

    maps (N, K, S, S) heatmap logits, rois (N, 4) boxes -> keypoints (N, K, 3) x, y, 1 (in the
    same continuous frame as torchvision: a heatmap cell's centre) and scores (N, K) (the
    resized heatmap at the maximum)."""
    with torch.autocast(maps.device.type, enabled=False):  # float32 also under autocast
        return _heatmaps_to_keypoints(maps.to(torch.float32), rois.to(torch.float32))


def _heatmaps_to_keypoints(maps: torch.Tensor, rois: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    n, k, sh, sw = maps.shape
    xy = torch.zeros((n, k, 3), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((n, k), dtype=torch.float32, device=maps.device)
    if n == 0:
        return xy, scores
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    wc = widths.ceil().to(torch.int64)
    hc = heights.ceil().to(torch.int64)
    for chunk in _keypoint_chunks(hc.tolist(), wc.tolist(), k,
                                  cpu=maps.device.type == "cpu"):
        idx = torch.tensor(chunk, device=maps.device)
        c = len(chunk)
        hmax, wmax = int(hc[idx].max()), int(wc[idx].max())
        rows = _cubic_weights(hc[idx], hmax, sh)  # (c, Hmax, S)
        cols = _cubic_weights(wc[idx], wmax, sw)  # (c, Wmax, S)
        # resize along x, then along y: two batched matmuls
        t = torch.bmm(maps[idx].reshape(c, k * sh, sw), cols.transpose(1, 2))  # (c, K*S, Wmax)
        t = t.view(c, k, sh, wmax).transpose(1, 2).reshape(c, sh, k * wmax)  # (c, S, K*Wmax)
        up = torch.bmm(rows, t).view(c, hmax, k, wmax)  # (c, Hmax, K*Wmax) -> (c, Hmax, K, Wmax)
        valid = ((torch.arange(hmax, device=maps.device)[None, :, None] < hc[idx, None, None])
                 & (torch.arange(wmax, device=maps.device)[None, None, :] < wc[idx, None, None]))
        up.masked_fill_(~valid[:, :, None, :], float("-inf"))  # padding never wins
        # row-major first maximum, as torchvision's argmax over the flattened map: the first
        # maximum of each row, then the first row holding the overall maximum
        row_best, row_x = up.max(dim=3)  # (c, Hmax, K)
        best, y_int = row_best.max(dim=1)  # (c, K)
        x_int = row_x.gather(1, y_int[:, None, :])[:, 0]  # (c, K)
        w_corr = (widths[idx] / wc[idx])[:, None]
        h_corr = (heights[idx] / hc[idx])[:, None]
        xy[idx, :, 0] = (x_int.float() + 0.5) * w_corr + rois[idx, 0, None]
        xy[idx, :, 1] = (y_int.float() + 0.5) * h_corr + rois[idx, 1, None]
        xy[idx, :, 2] = 1
        scores[idx] = best
    return xy, scores


# ----------------------------------------------------------------------------- modules


def mask_maskness(probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """SOLOv2's maskness of masks (D, ...) of probabilities: the mean probability over each
    mask's pixels at or above `threshold` (0 for a mask without any), shape (D,)."""
    flat = probabilities.to(torch.float32).flatten(1)  # (D, ...) -> (D, P)
    inside = flat >= threshold
    return (flat * inside).sum(1) / inside.sum(1).clamp_min(1)


def _rescored_by_maskness(detections: dict[str, torch.Tensor], power: float
                          ) -> dict[str, torch.Tensor]:
    """One image's detections (masks (D, 1, m, m) probabilities) with scores x maskness **
    power, sorted by the new score (descending; ties keep their order)."""
    scores = detections["scores"] * mask_maskness(detections["masks"]) ** power
    order = torch.argsort(scores, descending=True, stable=True)
    out = {key: value[order] for key, value in detections.items()}
    out["scores"] = scores[order]
    return out


class FastRoIHeads(RoIHeads):
    """torchvision's `RoIHeads` with the fast eval path of this module (training unchanged).

    Same constructor as `RoIHeads`; `FastRoIHeads.like(heads)` rebuilds one around the modules
    and settings of an existing `RoIHeads`. Eval returns torchvision's per-image dicts: boxes,
    labels, scores, and masks (D, 1, 28, 28) probabilities / keypoints (D, K, 3) and
    keypoints_scores (D, K) when the heads are there.
    """

    @classmethod
    def like(cls, heads: RoIHeads) -> FastRoIHeads:
        fast = cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh,
            heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor, keypoint_roi_pool=heads.keypoint_roi_pool,
            keypoint_head=heads.keypoint_head, keypoint_predictor=heads.keypoint_predictor,
        )
        fast.proposal_matcher.allow_low_quality_matches = \
            heads.proposal_matcher.allow_low_quality_matches
        fast.head_dtype = getattr(heads, "head_dtype", None)
        fast.maskness = getattr(heads, "maskness", 0.0)
        return fast

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        return postprocess_detections(class_logits, box_regression, proposals, image_shapes,
                                      self.box_coder, self.score_thresh, self.nms_thresh,
                                      self.detections_per_img)

    #: at eval, each detection's score times its mask's maskness (`mask_maskness` of
    #: the RoI mask, as SOLOv2 scores its masks) to this power, detections re-sorted by the new
    #: score; 0 keeps the box head's scores (torchvision's)
    maskness: float = 0.0

    #: the dtype the mask / keypoint head and predictor run in at eval on CPU: None keeps
    #: float32 (torchvision's numbers); torch.bfloat16 runs them in bfloat16 (module docstring)
    head_dtype: torch.dtype | None = None

    def _low_precision(self, name: str, module: nn.Module) -> nn.Module:
        """`module` in `head_dtype` with channels_last weights: a copy made once and again
        whenever a parameter or buffer of `module` changed (training, `load_state_dict`)."""
        cache = self.__dict__.setdefault("_low_precision_copies", {})
        tensors = [*module.parameters(), *module.buffers()]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            # plain tensors without autograd, whether or not this eval runs in inference mode
            with torch.inference_mode(False), torch.no_grad():
                low = copy.deepcopy(module).to(self.head_dtype).requires_grad_(False)
                low = low.to(memory_format=torch.channels_last).eval()
            cache[name] = hit = (key, low)
        return hit[1]

    def _run_head(self, name: str, head: nn.Module, feats: torch.Tensor,
                  predict: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`predict(head(feats))` in float32 (NNPACK stack) or in `head_dtype` (module
        docstring); float32 logits either way."""
        if self.head_dtype is None or feats.device.type != "cpu":
            return predict(run_conv_stack(head, feats))
        x = feats.to(self.head_dtype).contiguous(memory_format=torch.channels_last)
        x = self._low_precision(name, head)(x)
        with torch.autocast("cpu", dtype=self.head_dtype):
            return predict(x).float()

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            return super().forward(features, proposals, image_shapes, targets)
        box_features = self.box_roi_pool(features, proposals, image_shapes)
        box_features = self.box_head(box_features)
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression,
                                                            proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s}
                  for b, s, lab in zip(boxes, scores, labels)]
        per_image = [len(b) for b in boxes]
        if self.has_mask():
            feats = self.mask_roi_pool(features, boxes, image_shapes)  # (D, C, 14, 14)
            selected = torch.cat(labels)
            logits = self._run_head(
                "mask_head", self.mask_head, feats,
                lambda x: selected_mask_logits(self.mask_predictor, x, selected))
            # float32 probabilities, as without autocast
            probs = logits.float().sigmoid()[:, None]  # (D, 28, 28) -> (D, 1, 28, 28)
            for r, p in zip(result, probs.split(per_image, 0)):
                r["masks"] = p
        if self.has_keypoint():
            feats = self.keypoint_roi_pool(features, boxes, image_shapes)  # (D, C, 14, 14)
            logits = self._run_head(  # (D, K, 56, 56)
                "keypoint_head", self.keypoint_head, feats,
                lambda x: keypoint_logits(self.keypoint_predictor, x))
            for r, maps, b in zip(result, logits.split(per_image, 0), boxes):
                r["keypoints"], r["keypoints_scores"] = heatmaps_to_keypoints(maps, b)
        if self.maskness > 0 and self.has_mask():
            result = [_rescored_by_maskness(r, self.maskness) for r in result]
        return result, {}


class RCNNTransform(GeneralizedRCNNTransform):
    """torchvision's `GeneralizedRCNNTransform` (normalise, resize, batch; map predictions back)
    with three additions:

    * min_size None: images are not resized (train and eval), only normalised and batched;
    * mask_threshold: pasted masks are thresholded (``>=``) at the original image's resolution
      and returned as bool (N, 1, H, W); None returns the probabilities as torchvision;
    * fast: paste with `paste_masks` (vectorised) instead of torchvision's loop.
    """

    def __init__(self, min_size: int | Sequence[int] | None, max_size: int,
                 image_mean: Sequence[float], image_std: Sequence[float], *,
                 mask_threshold: float | None = 0.5, fast: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(1 if min_size is None else min_size, max_size, list(image_mean),
                         list(image_std), **kwargs)
        self.resize_images = min_size is not None
        self.mask_threshold = mask_threshold
        self.fast = fast

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform, *, resize: bool = True,
             mask_threshold: float | None = 0.5, fast: bool = True) -> RCNNTransform:
        new = cls(transform.min_size if resize else None, transform.max_size,
                  transform.image_mean, transform.image_std, mask_threshold=mask_threshold,
                  fast=fast, size_divisible=transform.size_divisible,
                  fixed_size=transform.fixed_size)
        new._skip_resize = transform._skip_resize
        return new

    def resize(self, image, target=None):
        if not self.resize_images:
            return image, target
        return super().resize(image, target)

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            boxes = resize_boxes(pred["boxes"], im_s, o_im_s)
            pred["boxes"] = boxes
            if "masks" in pred:
                if self.fast:
                    pred["masks"] = paste_masks(pred["masks"], boxes, o_im_s,
                                                threshold=self.mask_threshold)
                else:
                    masks = paste_masks_in_image(pred["masks"], boxes, o_im_s)
                    if self.mask_threshold is not None:
                        masks = masks >= self.mask_threshold
                    pred["masks"] = masks
            if "keypoints" in pred:
                pred["keypoints"] = resize_keypoints(pred["keypoints"], im_s, o_im_s)
        return result

    def __repr__(self) -> str:
        text = super().__repr__()
        if not self.resize_images:
            text = text.replace(f"Resize(min_size={self.min_size}", "Resize(off")
        return text


__all__ = [
    "CHUNK_ELEMENTS", "FastRoIHeads", "NNPACK_AVAILABLE", "RCNNTransform", "batched_nms_top_k",
    "heatmaps_to_keypoints", "keypoint_logits", "mask_maskness", "paste_masks",
    "postprocess_detections", "run_conv_stack", "selected_mask_logits",
]
