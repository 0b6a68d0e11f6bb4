"""Inference optimisation: fold BatchNorm into the preceding convolution, channels_last, compile.

In eval mode BatchNorm is a per-channel affine map y = gamma (x - mean) / sqrt(var + eps) + beta,
so conv -> BN is one conv with rescaled weights and a new bias
(`torch.nn.utils.fusion.fuse_conv_bn_eval` does the arithmetic; this module finds the pairs).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a conv, in place; the model must be in eval
    mode. Pairs found: consecutive children of an `nn.Sequential` (conv-norm-act blocks, torchvision
    `Conv2dNormActivation`, ResNet `downsample`) and attribute pairs convK / bnK (torchvision ResNet
    blocks, stems). The BN becomes `nn.Identity`. Returns the number of folds."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first)")
    folds = 0
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            keys = list(parent._modules)
            for a, b in zip(keys, keys[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if isinstance(conv, _CONVS) and isinstance(bn, nn.BatchNorm2d):
                    parent._modules[a] = _fuse(conv, bn)
                    parent._modules[b] = nn.Identity()
                    folds += 1
        for name, conv in list(parent.named_children()):
            if not (name.startswith("conv") and isinstance(conv, _CONVS)):
                continue
            bn_name = "bn" + name[len("conv") :]
            bn = getattr(parent, bn_name, None)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(parent, name, _fuse(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                folds += 1
    logger.debug("folded %d BatchNorm layers", folds)
    return folds


def _fuse(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
    fused.requires_grad_(False)
    return fused


def fuse_upsample_conv(model: nn.Module) -> int:
    """Replace, in place, every decoder block that offers `fused_for_inference()` (U-Net blocks with
    nearest x2 upsampling whose BN is folded) by its exact sub-pixel rewrite. Returns the count."""
    count = 0
    for parent in list(model.modules()):
        if hasattr(parent, "block") and hasattr(parent, "up_conv"):
            continue  # already fused: its `block` is the fallback, leave it as is
        for name, child in list(parent.named_children()):
            fuse = getattr(child, "fused_for_inference", None)
            fused = fuse() if callable(fuse) else None
            if fused is not None:
                setattr(parent, name, fused)
                count += 1
    return count


def optimize_for_inference(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    fuse_upsample: bool = True,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """A copy of `model` for inference: eval mode, BatchNorm folded, nearest-upsample + conv
    fused into a sub-pixel conv (U-Net blocks, `fuse_upsample_conv`), channels_last memory format
    (feed it `x.contiguous(memory_format=torch.channels_last)` or any tensor: convs accept both),
    optionally `torch.compile`d. Same outputs up to float rounding; the original is untouched."""
    out = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(out)
        if fuse_upsample:
            fuse_upsample_conv(out)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if compile:
        out = torch.compile(out)
    return out
