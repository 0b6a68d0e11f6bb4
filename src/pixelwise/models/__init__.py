"""Semantic segmentation models by name: `MODELS` and `build_model`.

| name | what |
|---|---|
| `patch_classifier` | labels the centre pixel of a P x P patch; `.sliding_window()` vs dense |
| `flat_fcn` | equal-size FCN, no downsampling |
| `fcn32s`, `fcn16s`, `fcn8s` | FCN with 0/1/2 zero-initialised score skips (Long et al. 2015) |
| `segnet` | decoder unpools with the encoder's max-pool indices |
| `unet` | U-Net, "same" or "valid" (overlap-tile) padding, any encoder |

`model_options(name)` lists each one's options and defaults.

Every model: `in_channels` (default 3), `forward(images (N, C, H, W)) -> logits (N, K, H, W)` at
the input size. `build_model(**model.config)` rebuilds a model's architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from pixelwise.errors import UserError, check_positive_int, unknown_name
from pixelwise.models.base import EncoderDecoder, SegmentationModel
from pixelwise.models.fcn import FCN, fcn8s, fcn16s, fcn32s
from pixelwise.models.flat_fcn import FlatFCN
from pixelwise.models.panoptic_fpn import panoptic_fpn
from pixelwise.models.patch_classifier import PatchClassifier
from pixelwise.models.rcnn import keypoint_rcnn, mask_rcnn
from pixelwise.models.segnet import segnet
from pixelwise.models.semantic_fpn_head import semantic_fpn
from pixelwise.models.solov2 import solov2
from pixelwise.models.unet import UNet, unet

# dense models: `forward(images (N, C, H, W)) -> logits (N, K, H, W)` at the input size
SEMANTIC_MODELS: dict[str, Callable[..., nn.Module]] = {
    "patch_classifier": PatchClassifier,
    "flat_fcn": FlatFCN,
    "fcn32s": fcn32s,
    "fcn16s": fcn16s,
    "fcn8s": fcn8s,
    "segnet": segnet,
    "unet": unet,
    "semantic_fpn": semantic_fpn,
}

# torchvision's detection contract: `forward(list of (C, H, W), targets=None)` -> a loss dict in
# training, a list of dicts in eval (panoptic_fpn adds "semantic" logits to each)
DETECTION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mask_rcnn": mask_rcnn,
    "keypoint_rcnn": keypoint_rcnn,
    "solov2": solov2,
    "panoptic_fpn": panoptic_fpn,
}

MODELS: dict[str, Callable[..., nn.Module]] = {**SEMANTIC_MODELS, **DETECTION_MODELS}

# options that locate files rather than describe the architecture: not stored in `config`
_NOT_IN_CONFIG = ("weights",)


def model_options(name: str) -> dict[str, Any]:
    """{option: default} of model `name` (keyword options beyond num_classes)."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    params = inspect.signature(MODELS[name]).parameters
    return {p: v.default for p, v in params.items() if p != "num_classes"}


def describe(name: str) -> str:
    """First line of model `name`'s docstring."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    doc = inspect.getdoc(MODELS[name]) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build model `name` for `num_classes` classes; `options` are the builder's keyword
    arguments (see `model_options(name)`). Unknown names/options raise UserError listing the valid
    ones. The model gets `config` = {"name", "num_classes", every option with its value}, so
    `build_model(**model.config)` rebuilds it (without `weights`: a checkpoint carries them)."""
    if not isinstance(name, str) or name not in MODELS:
        raise unknown_name("model", name, MODELS)
    check_positive_int("num_classes", num_classes)
    valid = model_options(name)
    for key in options:
        if key not in valid:
            raise UserError(
                f"model {name!r} has no option {key!r}; its options: {', '.join(valid)}"
            )
    model = MODELS[name](num_classes, **options)
    resolved = {**valid, **options}
    model.config = {
        "name": name,
        "num_classes": num_classes,
        **{k: _jsonable(v) for k, v in resolved.items() if k not in _NOT_IN_CONFIG},
    }
    return model


__all__ = [
    "FCN",
    "DETECTION_MODELS",
    "MODELS",
    "SEMANTIC_MODELS",
    "EncoderDecoder",
    "FlatFCN",
    "PatchClassifier",
    "SegmentationModel",
    "UNet",
    "build_model",
    "describe",
    "model_options",
]
