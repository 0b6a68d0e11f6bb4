"""Backbone + feature pyramid network (FPN, Lin et al. 2017) for the R-CNN family and friends.

`build_fpn_backbone(name, ...)` returns torchvision's `BackboneWithFPN` (``.out_channels`` = 256 by
default, `fpn_channels` otherwise),
made by torchvision's own extractors (`_resnet_fpn_extractor`, `_mobilenet_extractor`): random
init (torchvision ``weights=None``, nothing downloaded) unless `weights` names a local file.
``forward(images (N, C, H, W)) -> OrderedDict`` of (N, 256, H/s, W/s) maps named ``"0"``..``"3"``
(strides 4, 8, 16, 32) plus ``"pool"`` (stride 64, a max-pool of the last level).

Two attributes are added for the models built on top (anchors, RoI pooling):
``featmap_names`` (the levels without ``"pool"``: what `MultiScaleRoIAlign` pools from) and
``strides`` (one per level, ``"pool"`` included, in the dict's order).

| name | levels taken from | channels into the FPN |
|---|---|---|
| `resnet18`, `resnet34` | layer1..layer4 | 64, 128, 256, 512 |
| `resnet50` | layer1..layer4 | 256, 512, 1024, 2048 |
| `mobilenet_v3_large` | stages 1, 2, 3, 5 (strides 4, 8, 16, 32) | 24, 40, 80, 960 |

A ResNet may be built at another `width` (its stem's channels; torchvision's: 64): the stages then
have w, 2w, 4w, 8w channels (times 4 for ResNet-50's bottlenecks), the same depth and strides.
At width 32 a ResNet-18 costs ~1/4 of the FLOPs: more images per second for a CPU-trained model,
at the cost of capacity (on the 256² instance set the Mask R-CNN recipe lost more per step than
its 1.8x faster steps bought back: see the README).

For MobileNetV3 pixelwise differs from torchvision's default (`returned_layers=[4, 5]`, two maps
both at stride 32, made for 320-800 px photos): small images with small objects need the stride
4-16 levels, and four levels at the ResNet strides let one anchor / RoI setup serve every backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from pixelwise.encoders.torchvision_encoders import _adapt_first_conv, load_state_file
from pixelwise.errors import UserError, check_positive_int, unknown_name

logger = logging.getLogger(__name__)

# name -> torchvision classification model constructor (called with weights=None)
FPN_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
}

# the first convolution of each family (replaced for in_channels != 3; adapted when loading)
_FIRST_CONV = {"resnet": "conv1.weight", "mobilenet": "features.0.0.weight"}

# MobileNetV3-Large stages (torchvision's `stage_indices`: features 0, 2, 4, 7, 13, 16) whose
# outputs have strides 4, 8, 16, 32 -- see the module docstring.
MOBILENET_RETURNED_LAYERS = (1, 2, 3, 5)


def _family(name: str) -> str:
    return "mobilenet" if name.startswith("mobilenet") else "resnet"


def _replace_first_conv(net: nn.Module, family: str, in_channels: int) -> None:
    """Swap the 3-channel stem convolution for one with `in_channels` inputs (same geometry)."""
    if family == "resnet":
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                              padding=old.padding, bias=False)
    else:
        old = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size,
                                       stride=old.stride, padding=old.padding, bias=False)


def _resnet_at_width(net: nn.Module, width: int) -> None:
    """Rebuild a torchvision ResNet's stem and four stages at `width` (stages w, 2w, 4w, 8w;
    the same blocks, depth and strides) with torchvision's initialisation. Done with the
    ResNet's own `_make_layer` (torchvision builds the stages at 64..512 only)."""
    block = type(net.layer1[0])
    depths = [len(getattr(net, f"layer{k}")) for k in (1, 2, 3, 4)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(net.conv1.in_channels, width, 7, stride=2, padding=3, bias=False)
    net.bn1 = net._norm_layer(width)
    for k, depth in enumerate(depths):
        stage = net._make_layer(block, width * 2 ** k, depth, stride=1 if k == 0 else 2)
        setattr(net, f"layer{k + 1}", stage)
    net.fc = nn.Linear(net.inplanes, net.fc.out_features)
    for m in net.modules():  # as torchvision's ResNet.__init__
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _load_weights(net: nn.Module, path: str | Path, name: str, family: str) -> None:
    """Load a torchvision classification state dict (classifier keys ignored) into `net`."""
    state = load_state_file(path)
    own = net.state_dict()
    first = _FIRST_CONV[family]
    head = ("fc.",) if family == "resnet" else ("classifier.",)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    if first in state:
        state[first] = _adapt_first_conv(state[first], own[first].shape[1])
    # FrozenBatchNorm2d has no num_batches_tracked buffer; a BatchNorm2d file still fits it
    needed = [k for k in own if not k.startswith(head)]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(
            f"weights file {str(path)!r} lacks {len(missing)} of the {len(needed)} {name} "
            f"tensors (e.g. {missing[0]!r}); expected a torchvision {name} state dict"
        )
    wrong = [k for k in needed if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"weights file {str(path)!r}: {k!r} has shape {tuple(state[k].shape)}, "
                        f"the {name} backbone expects {tuple(own[k].shape)}")
    result = net.load_state_dict(state, strict=False)
    unknown = [k for k in result.unexpected_keys if "num_batches_tracked" not in k]
    if unknown:
        raise UserError(f"weights file {str(path)!r} has {len(unknown)} tensors the {name} "
                        f"backbone does not (e.g. {unknown[0]!r})")
    logger.info("loaded %d %s tensors from %s", len(needed), name, path)


def build_fpn_backbone(
    name: str,
    weights: str | Path | None = None,
    trainable_layers: int = 5,
    returned_layers: Sequence[int] | None = None,
    in_channels: int = 3,
    *,
    norm_layer: Callable[..., nn.Module] | None = None,
    fpn_norm_layer: Callable[..., nn.Module] | None = None,
    extra_blocks: nn.Module | None = None,
    fpn_channels: int = 256,
    width: int | None = None,
) -> BackboneWithFPN:
    """A torchvision backbone with an FPN on top (see the module docstring).

    name: a key of `FPN_BACKBONES`. weights: a local `.safetensors` / torch file holding the
    torchvision classification model's state dict (never downloaded). trainable_layers: stages
    left trainable counting from the top (torchvision's meaning: resnet 0..5, mobilenet 0..6; 5 =
    all of a resnet). returned_layers: the stages feeding the FPN (resnet 1..4; mobilenet 0..5).
    in_channels: image channels (1 for grey, e.g. 16-bit microscopy); pretrained stems are summed
    / repeated to fit. norm_layer: the backbone's normalisation (default `nn.BatchNorm2d` for
    random init, `FrozenBatchNorm2d` with `weights`, as torchvision). fpn_norm_layer: the FPN's
    (default none). extra_blocks: torchvision's (default `LastLevelMaxPool`, the "pool" level).
    fpn_channels: the FPN's width (torchvision's 256 by default; on small images on a CPU the
    stride-4 level's 3x3 conv at 256 channels costs more than a ResNet-18, and 128 halves the
    whole model's cost). width: a ResNet's stem width (None: torchvision's 64; see the module
    docstring); `weights` must then have been trained at that width.
    """
    if not isinstance(name, str) or name not in FPN_BACKBONES:
        raise unknown_name("backbone", name, FPN_BACKBONES)
    check_positive_int(f"backbone {name}: in_channels", in_channels)
    family = _family(name)
    max_trainable = 5 if family == "resnet" else 6
    if (isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int)
            or not 0 <= trainable_layers <= max_trainable):
        raise UserError(f"backbone {name}: trainable_layers must be an integer in "
                        f"0..{max_trainable}, got {trainable_layers!r}")
    if norm_layer is None:
        norm_layer = misc_nn_ops.FrozenBatchNorm2d if weights is not None else nn.BatchNorm2d
    net = FPN_BACKBONES[name](weights=None, norm_layer=norm_layer)
    if width is not None:
        check_positive_int(f"backbone {name}: width", width)
        if family != "resnet":
            raise UserError(f"backbone {name}: width applies to the ResNets only")
        _resnet_at_width(net, width)
    if in_channels != 3:
        _replace_first_conv(net, family, in_channels)
    if weights is not None:
        _load_weights(net, weights, name, family)

    if family == "resnet":
        layers = [1, 2, 3, 4] if returned_layers is None else list(returned_layers)
        if not layers or not all(isinstance(k, int) and 1 <= k <= 4 for k in layers):
            raise UserError(f"backbone {name}: returned_layers must be stages in 1..4, got "
                            f"{list(layers)}")
        body = _resnet_fpn_extractor(net, trainable_layers, layers, extra_blocks,
                                     norm_layer=fpn_norm_layer)
        strides = [2 ** (k + 1) for k in layers]
    else:
        layers = list(MOBILENET_RETURNED_LAYERS if returned_layers is None else returned_layers)
        if not layers or not all(isinstance(k, int) and 0 <= k <= 5 for k in layers):
            raise UserError(f"backbone {name}: returned_layers must be stages in 0..5, got "
                            f"{list(layers)}")
        body = _mobilenet_extractor(net, True, trainable_layers, layers, extra_blocks,
                                    norm_layer=fpn_norm_layer)
        # stage i ends on a stride-2 block, so its stride is 2^(i+1); the last stage (the final
        # 1x1 conv) keeps stage 4's stride 32
        strides = [2 ** (min(k, 4) + 1) for k in layers]
    check_positive_int("fpn_channels", fpn_channels)
    if fpn_channels != body.out_channels:  # torchvision's extractors fix 256: rebuild the FPN
        widths = [block[0].in_channels for block in body.fpn.inner_blocks]
        body.fpn = FeaturePyramidNetwork(widths, fpn_channels, extra_blocks=body.fpn.extra_blocks,
                                         norm_layer=fpn_norm_layer)
        body.out_channels = fpn_channels
    names = [str(i) for i in range(len(layers))]
    if extra_blocks is None:  # LastLevelMaxPool: one more level at twice the last stride
        strides.append(strides[-1] * 2)
    body.featmap_names = names
    body.strides = strides
    body.backbone_name = name
    return body


@torch.no_grad()
def feature_shapes(backbone: nn.Module, size: tuple[int, int] = (256, 256),
                   in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """{level name: (C, h, w)} of `backbone` for one image of `size` (eval mode, restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone(torch.zeros(1, in_channels, *size))
    finally:
        backbone.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}
