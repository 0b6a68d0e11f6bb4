"""What a model costs and sees: parameters, FLOPs at a size, receptive field, output stride."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pixelwise.models.receptive_field import receptive_field


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


@torch.no_grad()
def count_flops(model: nn.Module, size: tuple[int, int], *, in_channels: int | None = None) -> int:
    """FLOPs of one forward pass on one (1, C, H, W) image, by `torch.utils.flop_counter`:
    convolutions and matrix products, 2 FLOPs per multiply-add (pooling, interpolation, norms and
    activations are not counted). Runs in eval mode; the mode is restored."""
    c = in_channels if in_channels is not None else getattr(model, "in_channels", 3)
    param = next(model.parameters())
    x = torch.zeros(1, c, *size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def detection_backbone(model: nn.Module) -> nn.Module | None:
    """The backbone + FPN (`build_fpn_backbone`) of a detection model (R-CNN, SOLOv2, panoptic
    FPN), else None."""
    detector = getattr(model, "detector", model)  # panoptic FPN wraps an R-CNN
    backbone = getattr(detector, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) and hasattr(backbone, "strides") else None


def model_info(model: nn.Module, size: tuple[int, int] = (256, 256)) -> dict[str, Any]:
    """A JSON-ready summary: name, parameters, trainable_parameters, size, flops,
    receptive_field (input pixels per side; None = the whole image) and output_stride.

    Detection models (no analytic receptive field; their heads' cost depends on how many
    proposals and detections an image gets) report the FLOPs of their backbone + FPN
    (``flops_of``: "backbone+fpn") and the stride of each FPN map (``feature_strides``)."""
    total, trainable = count_parameters(model)
    config = getattr(model, "config", {})
    info = {
        "name": config.get("name", type(model).__name__),
        "config": config,
        "parameters": total,
        "trainable_parameters": trainable,
        "size": list(size),
    }
    backbone = detection_backbone(model) if not hasattr(model, "rf_path") else None
    if backbone is None:
        rf = receptive_field(model)
        return {**info, "flops": count_flops(model, size), "flops_of": "model", **rf.to_dict()}
    in_channels = int(config.get("in_channels", 3))
    return {**info, "flops": count_flops(backbone, size, in_channels=in_channels),
            "flops_of": "backbone+fpn",
            "feature_strides": list(backbone.strides)}  # `build_fpn_backbone` records them
