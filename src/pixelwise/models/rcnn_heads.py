"""Mask and keypoint predictors for Mask / Keypoint R-CNN whose upsampler is chosen by name.

The convolution stacks before them are torchvision's (`MaskRCNNHeads`: four 3x3 convs, 256
channels; `KeypointRCNNHeads`: eight 3x3 convs, 512 channels). The predictors turn the RoI
features (R, C, 14, 14) into per-class mask logits (R, num_classes, 28, 28) or per-keypoint
heatmap logits (R, K, 56, 56); the upsampling inside is `pixelwise.upsample.make_upsampler`:

* `MaskPredictor`: upsampler (x2, C channels) -> ReLU -> 1x1 conv to num_classes. Default
  ``"transposed"`` with a 2x2 kernel, stride 2, bias, He init: the paper's deconvolution and
  exactly torchvision's `MaskRCNNPredictor` (``conv5_mask``); e.g. ``"bilinear"`` (no weights)
  or ``"resize_conv"`` (Odena et al.) instead. Optionally with PANet's fully-connected fusion
  (Liu et al. 2018, sec. 3.4): an fc layer over the whole RoI adds one class-agnostic mask.
* `KeypointPredictor`: a x2 step to K channels, then bilinear x2 (the paper: "a deconv and 2x
  bilinear upsampling" to 56x56). Default ``"transposed"``: torchvision's `KeypointRCNNPredictor`
  (``kps_score_lowres``, a 4x4 stride-2 transposed conv from C straight to K channels). Any
  other name: a 1x1 conv C -> K, then that upsampler on the K channels. (A channel-keeping
  learnable upsampler at C = 512 before the projection would cost 16x the whole head's
  last layer, so the projection comes first.)

`torchvision_key_map` renames torchvision's parameter names to these modules' for loading a
torchvision Mask / Keypoint R-CNN state dict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError, check_positive_int, unknown_name
from pixelwise.upsample import UPSAMPLERS, TransposedConv, make_upsampler

logger = logging.getLogger(__name__)

UpsampleArg = str | Callable[..., nn.Module]


def _check_upsample(upsample: UpsampleArg) -> None:
    if isinstance(upsample, str) and upsample not in UPSAMPLERS:
        raise unknown_name("upsampler", upsample, UPSAMPLERS)
    if isinstance(upsample, str) and UPSAMPLERS[upsample].needs_indices:
        raise UserError(f"upsampler {upsample!r} needs max-pool indices, which an R-CNN head "
                        f"does not have; choose another (e.g. transposed, bilinear, resize_conv)")


def _he_init(module: nn.Module) -> None:
    """torchvision's head init: He normal (fan_out, ReLU) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MaskPredictor(nn.Module):
    """Per-class mask logits: (R, C, 14, 14) -> upsample x2 -> ReLU -> 1x1 conv ->
    (R, num_classes, 28, 28).

    upsample: a `pixelwise.upsample.UPSAMPLERS` name or factory; upsample_options go to
    `make_upsampler`. ``"transposed"`` defaults to the paper's 2x2 stride-2 deconvolution with a
    bias and He init (torchvision's ``conv5_mask``); other learnable upsamplers keep their own
    init. class_agnostic: one mask map for every class (detectron2's CLS_AGNOSTIC_MASK): the
    1x1 conv has one output, shown to torchvision's loss and inference as `num_classes`
    identical maps (a view), so a box misnamed by the box head still gets the object's shape.
    fc_fusion_size: PANet's fully-connected fusion for RoIs of that side (None: off): a 3x3
    conv to C/2 channels and one fc layer map the whole (R, C, s, s) RoI to a class-agnostic
    (R, 2s, 2s) mask added to every class's logits. A conv pixel sees 9 x 9 of the 14 x 14 RoI
    through the four head convs; the fc sees all of it, so that it can tell the object the box
    is centred on from another one overlapping it (PANet: conv3 -> two convs -> fc; here the
    head's output -> one conv -> fc, the same depth).
    """

    def __init__(self, in_channels: int, num_classes: int, upsample: UpsampleArg = "transposed",
                 class_agnostic: bool = False, fc_fusion_size: int | None = None,
                 **upsample_options: Any) -> None:
        super().__init__()
        _check_upsample(upsample)
        if upsample == "transposed":
            upsample_options = {"kernel_size": 2, "bias": True, "init": "default",
                                **upsample_options}
        self.upsample = make_upsampler(upsample, in_channels, 2, **upsample_options)
        if upsample == "transposed" and upsample_options.get("init") == "default":
            _he_init(self.upsample)
        self.class_agnostic = bool(class_agnostic)
        self.mask_fcn_logits = nn.Conv2d(in_channels, 1 if class_agnostic else num_classes, 1)
        nn.init.kaiming_normal_(self.mask_fcn_logits.weight, mode="fan_out", nonlinearity="relu")
        # torchvision leaves this bias at PyTorch's default init; so do we (state dicts match)
        self.num_classes = num_classes
        self.fc_fusion = None if fc_fusion_size is None else _FcFusion(in_channels,
                                                                       fc_fusion_size)

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fc fusion's class-agnostic logits (R, 2h, 2w) of x (R, C, h, w); None if off."""
        return None if self.fc_fusion is None else self.fc_fusion(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, h, w) -> the upsampled, rectified features (R, C, 2h, 2w)."""
        return F.relu(self.upsample(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, h, w) -> mask logits (R, num_classes, 2h, 2w)."""
        logits = self.mask_fcn_logits(self.features(x))
        if self.class_agnostic:  # (R, 1, 2h, 2w) -> (R, num_classes, 2h, 2w), one map viewed
            logits = logits.expand(-1, self.num_classes, -1, -1)
        fused = self.fused(x)
        if fused is not None:
            logits = logits + fused.unsqueeze(1)  # (R, 2h, 2w) -> (R, 1, 2h, 2w), to each class
        return logits

    def forward_selected(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of one class per RoI: x (R, C, h, w), labels (R,) -> (R, 2h, 2w).

        Equal to ``forward(x)[arange(R), labels]`` without computing the other classes' maps
        (the 1x1 conv is a per-RoI dot product with the chosen class's weights)."""
        if self.class_agnostic:
            labels = torch.zeros_like(labels)
        feats = self.features(x)  # (R, C, H, W)
        weight = self.mask_fcn_logits.weight[labels, :, 0, 0]  # (R, C)
        r, c, h, w = feats.shape
        logits = torch.bmm(weight.unsqueeze(1), feats.reshape(r, c, h * w))  # (R, 1, H*W)
        logits = logits.reshape(r, h, w)  # (R, 1, H*W) -> (R, H, W)
        if self.mask_fcn_logits.bias is not None:
            logits = logits + self.mask_fcn_logits.bias[labels].view(r, 1, 1)
        fused = self.fused(x)
        return logits if fused is None else logits + fused


class _FcFusion(nn.Module):
    """PANet's fully-connected mask branch: (R, C, s, s) -> 3x3 conv to C/2 -> ReLU -> fc ->
    (R, 2s, 2s) class-agnostic logits (see `MaskPredictor`)."""

    def __init__(self, in_channels: int, size: int) -> None:
        super().__init__()
        check_positive_int("fc_fusion_size", size)
        mid = max(1, in_channels // 2)
        self.size = size
        self.conv = nn.Conv2d(in_channels, mid, 3, padding=1)
        _he_init(self.conv)
        self.fc = nn.Linear(mid * size * size, 4 * size * size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, _, h, w = x.shape
        if (h, w) != (self.size, self.size):
            raise UserError(f"the fc fusion was built for {self.size} x {self.size} RoIs, "
                            f"got {h} x {w}")
        y = F.relu(self.conv(x)).flatten(1)  # (R, C/2, s, s) -> (R, C/2*s*s)
        return self.fc(y).view(r, 2 * h, 2 * w)  # (R, 4*s*s) -> (R, 2s, 2s)


class KeypointPredictor(nn.Module):
    """Keypoint heatmap logits: (R, C, 14, 14) -> (R, K, 56, 56) (two x2 steps, the second
    bilinear, as the paper and torchvision).

    upsample ``"transposed"`` (default): torchvision's 4x4 stride-2 transposed conv C -> K
    (``kps_score_lowres``, He init). Any other `UPSAMPLERS` name (or factory): a 1x1 conv C -> K
    (``kps_score``), then that upsampler on the K maps.
    """

    def __init__(self, in_channels: int, num_keypoints: int,
                 upsample: UpsampleArg = "transposed", **upsample_options: Any) -> None:
        super().__init__()
        _check_upsample(upsample)
        check_positive_int("num_keypoints", num_keypoints)
        self.num_keypoints = num_keypoints
        self.up_scale = 2
        if upsample == "transposed":
            # torchvision's layer, kept as it is so its state dicts load (see module docstring)
            if upsample_options:
                raise UserError(
                    "the keypoint head's 'transposed' upsampler is torchvision's 4x4 stride-2 "
                    f"transposed conv and takes no options (got {sorted(upsample_options)})")
            self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2,
                                                       padding=1)
            _he_init(self.kps_score_lowres)
            self.kps_score = None
            self.upsample = None
        else:
            self.kps_score_lowres = None
            self.kps_score = nn.Conv2d(in_channels, num_keypoints, 1)
            _he_init(self.kps_score)
            self.upsample = make_upsampler(upsample, num_keypoints, 2, **upsample_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, h, w) -> heatmap logits (R, K, 4h, 4w), contiguous (torchvision's keypoint
        loss views them as (R * K, 16hw): channels_last weights would give channels_last
        logits)."""
        if self.kps_score_lowres is not None:
            x = self.kps_score_lowres(x)
        else:
            x = self.upsample(self.kps_score(x))
        return F.interpolate(x, scale_factor=float(self.up_scale), mode="bilinear",
                             align_corners=False, recompute_scale_factor=False).contiguous()


def upsampler_of(predictor: nn.Module) -> nn.Module:
    """The (first) upsampling module of a predictor (the transposed conv for torchvision's)."""
    for name in ("upsample", "kps_score_lowres"):
        module = getattr(predictor, name, None)
        if module is not None:
            return module
    raise UserError(f"{type(predictor).__name__} has no upsampler")


def torchvision_key_map(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """Rename torchvision Mask / Keypoint R-CNN keys to this model's (only where they differ):
    ``roi_heads.mask_predictor.conv5_mask.*`` -> ``...upsample.conv.*`` when the mask predictor
    uses the ``transposed`` upsampler. Everything else has torchvision's names already."""
    renamed = dict(state)
    predictor = getattr(getattr(model, "roi_heads", None), "mask_predictor", None)
    if isinstance(predictor, MaskPredictor) and isinstance(predictor.upsample, TransposedConv):
        prefix = "roi_heads.mask_predictor."
        for kind in ("weight", "bias"):
            old = f"{prefix}conv5_mask.{kind}"
            if old in renamed:
                renamed[f"{prefix}upsample.conv.{kind}"] = renamed.pop(old)
    return renamed
