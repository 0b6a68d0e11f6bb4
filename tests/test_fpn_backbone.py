"""build_fpn_backbone: levels and strides, freezing, local weights, bad names and files."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.ops import misc as misc_nn_ops

from pixelwise.errors import UserError
from pixelwise.models.fpn_backbone import FPN_BACKBONES, build_fpn_backbone, feature_shapes


@pytest.mark.parametrize("name", sorted(FPN_BACKBONES))
def test_levels_have_the_advertised_strides(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_fpn_backbone(name)
    assert backbone.out_channels == 256
    h, w = 67, 93  # odd sizes: each level is ceil(H / stride) as the strided convs give
    shapes = feature_shapes(backbone, (h, w))
    assert list(shapes) == [*backbone.featmap_names, "pool"]
    assert len(backbone.strides) == len(shapes)
    for (level, shape), stride in zip(shapes.items(), backbone.strides):
        assert shape == (256, math.ceil(h / stride), math.ceil(w / stride)), level


def test_resnet_matches_torchvision_fpn_backbone() -> None:
    """Same module tree and parameter count as torchvision's resnet_fpn_backbone."""
    ours = build_fpn_backbone("resnet18")
    ref = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5)
    assert [k for k, _ in ours.named_parameters()] == [k for k, _ in ref.named_parameters()]
    assert [v.shape for v in ours.state_dict().values()] == [
        v.shape for v in ref.state_dict().values()]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_fpn_channels_sets_the_width_of_every_level(name: str) -> None:
    """A narrower FPN: every level (pool included) has `fpn_channels` maps; the body and its
    frozen stages are those of the default build, and the FPN equals torchvision's
    FeaturePyramidNetwork of that width on the same inputs."""
    torch.manual_seed(0)
    narrow = build_fpn_backbone(name, fpn_channels=64, trainable_layers=3)
    default = build_fpn_backbone(name, trainable_layers=3)
    assert narrow.out_channels == 64
    shapes = feature_shapes(narrow, (64, 96))
    assert {shape[0] for shape in shapes.values()} == {64}
    wide = feature_shapes(default, (64, 96))
    assert [s[1:] for s in shapes.values()] == [s[1:] for s in wide.values()]
    body = {k: p.requires_grad for k, p in narrow.named_parameters() if k.startswith("body.")}
    assert body == {k: p.requires_grad for k, p in default.named_parameters()
                    if k.startswith("body.")}
    widths = [block[0].in_channels for block in default.fpn.inner_blocks]
    ref = torchvision.ops.FeaturePyramidNetwork(
        widths, 64, extra_blocks=torchvision.ops.feature_pyramid_network.LastLevelMaxPool())
    ref.load_state_dict(narrow.fpn.state_dict())
    narrow.eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ours = narrow(x)
        theirs = ref(narrow.body(x))
    assert list(ours) == list(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


@pytest.mark.parametrize("name, width, stage_widths", [
    ("resnet18", 32, [32, 64, 128, 256]),
    ("resnet34", 16, [16, 32, 64, 128]),
    ("resnet50", 16, [64, 128, 256, 512]),  # bottlenecks: 4x the stage width out
])
def test_width_builds_every_stage_at_its_multiple(name: str, width: int,
                                                  stage_widths: list[int]) -> None:
    """A narrower ResNet: the stem at `width`, the stages at w..8w (x 4 for bottlenecks) with the
    same blocks per stage and strides; the FPN's levels keep their sizes."""
    torch.manual_seed(0)
    slim = build_fpn_backbone(name, width=width, fpn_channels=32)
    full = build_fpn_backbone(name, fpn_channels=32)
    body = slim.body
    assert body.conv1.out_channels == width and body.bn1.num_features == width
    for k, channels in enumerate(stage_widths, start=1):
        stage, ref = getattr(body, f"layer{k}"), getattr(full.body, f"layer{k}")
        assert len(stage) == len(ref)
        assert [type(b) for b in stage] == [type(b) for b in ref]
        assert stage[-1].conv1.in_channels == channels  # a stage's blocks take its output width
    assert [b[0].in_channels for b in slim.fpn.inner_blocks] == stage_widths
    assert feature_shapes(slim, (67, 93)) == feature_shapes(full, (67, 93))
    # ~1/4 of the parameters at half the width (each conv's weight scales with its width^2)
    ratio = sum(p.numel() for p in body.parameters()) / sum(
        p.numel() for p in full.body.parameters())
    assert ratio == pytest.approx((width / 64) ** 2, rel=0.05)


def test_width_64_is_torchvisions_resnet() -> None:
    """width=64 rebuilds torchvision's own layout: the same tree and shapes, and torchvision's
    initialisation (kaiming fan-out convs, unit BN)."""
    torch.manual_seed(0)
    ours = build_fpn_backbone("resnet18", width=64)
    ref = build_fpn_backbone("resnet18")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    weight = ours.body.layer3[0].conv2.weight  # 256 x 256 x 3 x 3, fan-out 256 * 9
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    assert torch.equal(ours.body.layer2[1].bn1.weight, torch.ones(128))


def test_width_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="width applies to the ResNets only"):
        build_fpn_backbone("mobilenet_v3_large", width=32)
    for bad in (0, 12.5, True):
        with pytest.raises(UserError, match="width must be a positive integer"):
            build_fpn_backbone("resnet18", width=bad)
    path = tmp_path / "r18.safetensors"  # torchvision's width 64 into a width 32 ResNet
    net = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="'conv1.weight' has shape .*expects \\(32, 3, 7, 7\\)"):
        build_fpn_backbone("resnet18", weights=path, width=32)


@pytest.mark.parametrize("trainable", [0, 3, 5])
def test_trainable_layers_freeze_like_torchvision(trainable: int) -> None:
    ours = build_fpn_backbone("resnet18", trainable_layers=trainable)
    ref = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d,
        trainable_layers=trainable)
    frozen = {k for k, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, p in ref.named_parameters() if not p.requires_grad}
    assert all(k.startswith("body.") for k in frozen)
    assert (len(frozen) == 0) == (trainable == 5)


def test_weights_file_loads_into_the_body(tmp_path) -> None:
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    backbone = build_fpn_backbone("resnet18", weights=path)
    body = backbone.body.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_var"):
        assert torch.equal(body[key], net.state_dict()[key])
    # pretrained weights get torchvision's frozen batch norm
    assert isinstance(backbone.body.bn1, misc_nn_ops.FrozenBatchNorm2d)

    grey = build_fpn_backbone("resnet18", weights=path, in_channels=1)
    expected = net.conv1.weight.sum(1, keepdim=True)  # a grey image is R = G = B
    torch.testing.assert_close(grey.body.conv1.weight, expected)


def test_torch_file_with_mobilenet(tmp_path) -> None:
    net = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pt"
    torch.save(net.state_dict(), path)
    backbone = build_fpn_backbone("mobilenet_v3_large", weights=path)
    assert torch.equal(backbone.body["0"][0].weight, net.features[0][0].weight)


def test_grey_input() -> None:
    backbone = build_fpn_backbone("resnet18", in_channels=1)
    assert backbone.body.conv1.in_channels == 1
    assert feature_shapes(backbone, (64, 64), in_channels=1)["0"] == (256, 16, 16)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UserError, match="unknown backbone 'resnet7'.*resnet18"):
        build_fpn_backbone("resnet7")


@pytest.mark.parametrize("kwargs, match", [
    ({"trainable_layers": 6}, "trainable_layers"),
    ({"returned_layers": [0, 1]}, "returned_layers"),
    ({"in_channels": 0}, "in_channels"),
    ({"fpn_channels": 0}, "fpn_channels"),
    ({"fpn_channels": 12.5}, "fpn_channels"),
])
def test_bad_options(kwargs, match) -> None:
    with pytest.raises(UserError, match=match):
        build_fpn_backbone("resnet18", **kwargs)


def test_bad_weights_files(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_fpn_backbone("resnet18", weights=tmp_path / "missing.safetensors")
    wrong = tmp_path / "r34.safetensors"
    net = torchvision.models.resnet34(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(wrong))
    with pytest.raises(UserError, match="has shape|tensors"):
        build_fpn_backbone("resnet18", weights=wrong)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        build_fpn_backbone("resnet18", weights=junk)


@pytest.mark.parametrize("model", ["mask_rcnn", "keypoint_rcnn", "solov2", "panoptic_fpn"])
def test_models_on_an_fpn_take_fpn_channels(model: str) -> None:
    from pixelwise.models import build_model

    extra = {"keypoint_rcnn": {"num_keypoints": 5}, "panoptic_fpn": {"num_things": 2}}
    net = build_model(model, num_classes=4, backbone="resnet18", fpn_channels=32,
                      **extra.get(model, {})).eval()
    fpn = next(m for m in net.modules() if isinstance(m, torchvision.ops.FeaturePyramidNetwork))
    assert {block[0].out_channels for block in fpn.layer_blocks} == {32}
    with torch.no_grad():
        out = net([torch.rand(3, 64, 64)])
    assert isinstance(out, list) and len(out) == 1  # every head takes the 32 maps


@pytest.mark.parametrize("model", ["mask_rcnn", "keypoint_rcnn", "solov2", "panoptic_fpn"])
def test_models_on_an_fpn_take_backbone_width(model: str) -> None:
    from pixelwise.models import build_model

    extra = {"keypoint_rcnn": {"num_keypoints": 5}, "panoptic_fpn": {"num_things": 2}}
    net = build_model(model, num_classes=4, backbone="resnet18", backbone_width=16,
                      fpn_channels=32, **extra.get(model, {})).eval()
    fpn = next(m for m in net.modules() if isinstance(m, torchvision.ops.FeaturePyramidNetwork))
    assert [block[0].in_channels for block in fpn.inner_blocks] == [16, 32, 64, 128]
    with torch.no_grad():
        out = net([torch.rand(3, 64, 64)])
    assert isinstance(out, list) and len(out) == 1


def test_slim_mask_rcnn_trains() -> None:
    """A training step of a half-width Mask R-CNN: every loss finite, the stem gets a gradient."""
    from pixelwise.models import build_model

    torch.manual_seed(0)
    net = build_model("mask_rcnn", num_classes=3, backbone="resnet18", backbone_width=32,
                      fpn_channels=32, mask_head_layers=[16, 16]).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:48, 8:40] = 1
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1]),
              "masks": masks}
    losses = net([torch.rand(3, 64, 64)], [target])
    assert {"loss_mask", "loss_classifier"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert net.backbone.body.conv1.weight.grad.abs().sum() > 0
