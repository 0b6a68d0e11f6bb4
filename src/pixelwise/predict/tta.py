"""Test-time augmentation for semantic models (`--tta flip`, `--tta-scales 0.75,1,1.25` in
`pixelwise eval` and `pixelwise predict`).

The class probabilities of several views of an image are averaged, as MMSegmentation's
`--tta` / `aug_test` (flip and image ratios) and `ttach` do: each scale `s` resizes the image
by `s` (antialiased when shrinking), `flip` adds each view's mirror image; every view's
probabilities are brought back to the image (mirrored back, resized bilinearly) and averaged.
The result is returned as log-probabilities, so that it takes the place of logits: its argmax
is the label of the averaged probabilities, its softmax those probabilities.

On the default synthetic semantic set the 10-minute U-Net of `benchmarks/quality.py` scores val
mIoU 0.843 in one pass, 0.866 with `flip` (2 passes) and 0.881 with `flip` and scales
0.75, 1, 1.25 (6 passes).

Instance models average inside the model, where their views can be matched: `flip` switches on
a model's own test-time flip (`set_flip_test`; SOLOv2 averages each grid cell with its mirror
cell, see `SOLOv2`; Mask R-CNN merges the two views' detections by NMS and votes their masks,
see `pixelwise.models.rcnn_tta`). Keypoint R-CNN has none, and scales are for semantic runs only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError

TTA_NAMES = ("flip",)
MAX_SCALE = 4.0


@dataclass(frozen=True)
class TTA:
    """Which views of an image are averaged: each of `scales`, and its mirror image if `flip`."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @property
    def views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def to_dict(self) -> dict[str, Any]:
        return {"flip": self.flip, "scales": list(self.scales)}

    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor],
                 images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, K, H', W') log of the views' mean class probabilities,
        where `forward` maps images to logits; (H', W') is its output size at scale 1."""
        total: torch.Tensor | None = None
        for scale in self.scales:
            view = images if scale == 1 else _resize(images, scale, antialias=scale < 1)
            for mirrored in (False, True) if self.flip else (False,):
                logits = forward(view.flip(-1) if mirrored else view).float()
                probs = torch.softmax(logits.flip(-1) if mirrored else logits, dim=1)
                if scale != 1:
                    if probs.shape[-2:] != view.shape[-2:]:
                        raise UserError("--tta-scales needs a model whose output has its input's "
                                        "size (not unet padding='valid')")
                    probs = F.interpolate(probs, size=images.shape[-2:], mode="bilinear",
                                          align_corners=False)  # back to (N, K, H, W)
                total = probs if total is None else total + probs
        assert total is not None  # at least one scale (parse_tta)
        # finite everywhere: a probability that underflowed to 0 would give -inf, and bilinear
        # resizing of -inf gives NaN where a weight is 0
        return (total / self.views).clamp_min(torch.finfo(total.dtype).tiny).log()


def _resize(images: torch.Tensor, scale: float, *, antialias: bool) -> torch.Tensor:
    h, w = images.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                         antialias=antialias)


def parse_tta(name: str | None, scales: Sequence[float] | None, task: str | None) -> TTA | None:
    """The `TTA` of the command line's `--tta NAME` / `--tta-scales S,...` (None: neither
    given); unknown names, scales outside (0, 4], tasks other than semantic and scales for
    instance runs (flip only) are refused in one line."""
    if name is None and scales is None:
        return None
    if name is not None and name not in TTA_NAMES:
        from pixelwise.errors import unknown_name

        raise unknown_name("test-time augmentation", name, TTA_NAMES)
    if scales is not None:
        scales = tuple(float(s) for s in scales)
        if not scales or not all(0 < s <= MAX_SCALE for s in scales):
            raise UserError(f"--tta-scales must be factors in (0, {MAX_SCALE:g}], got "
                            f"{','.join(f'{s:g}' for s in scales) or 'none'}")
    if task == "instance":
        if scales is not None:
            raise UserError("--tta-scales is for semantic runs; instance runs take --tta flip "
                            "(solov2, mask_rcnn)")
        return TTA(flip=True)
    if task != "semantic":
        raise UserError(f"--tta/--tta-scales are for semantic runs (and --tta flip for instance "
                        f"runs), not {task} runs")
    return TTA(flip=name == "flip", scales=scales or (1.0,))


def apply_tta(model: nn.Module, tta: TTA | None, task: str | None, source: Any = "") -> nn.Module:
    """The model that evaluates `tta` (None: `model` itself): a semantic model wrapped in
    `AugmentedModel`; an instance model with its own test-time flip switched to it (a model
    without one is refused in one line naming `source`, e.g. the checkpoint)."""
    if tta is None:
        return model
    if task == "semantic":
        return AugmentedModel(model, tta)
    if not hasattr(model, "set_flip_test"):
        raise UserError(f"{source}: --tta flip is for solov2 and mask_rcnn among instance "
                        f"models, not {type(model).__name__}")
    model.set_flip_test(True)
    return model


class AugmentedModel(nn.Module):
    """`model` whose forward averages the views of `tta` (what `pixelwise eval --tta`
    evaluates); each view is padded to the model's output stride and cropped back."""

    def __init__(self, model: nn.Module, tta: TTA) -> None:
        super().__init__()
        from pixelwise.predict.tiling import output_stride

        self.model, self.tta = model, tta
        self.align = output_stride(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from pixelwise.predict.tiling import predict_padded

        return self.tta(lambda x: predict_padded(self.model, x, align=self.align), images)
