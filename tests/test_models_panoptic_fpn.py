"""panoptic_fpn: losses (finite, falling, weighted, the semantic one recomputed by hand), the
eval output, the upsampler option, and one shared backbone; the semantic FPN head alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.errors import UserError
from pixelwise.models.panoptic_fpn import PanopticFPN, panoptic_fpn
from pixelwise.models.semantic_fpn_head import semantic_loss
from pixelwise.models.semantic_fpn_head import SemanticFPN, SemanticFPNHead, semantic_fpn
from pixelwise.panoptic import PanopticCategories, fuse_panoptic
from pixelwise.upsample import UPSAMPLERS

RCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
               "loss_rpn_box_reg"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from pixelwise.data.panoptic import CocoPanoptic
    from pixelwise.data.synthetic import synthesize

    root = synthesize("panoptic", tmp_path_factory.mktemp("pfpn") / "d", num=3, size=(64, 64),
                      seed=5, val_fraction=0.0)
    dataset = CocoPanoptic.from_layout(root, "train")
    return dataset, [dataset[i] for i in range(len(dataset))]


def _tiny(dataset, **options) -> PanopticFPN:
    """A small, fast panoptic_fpn for the synthetic categories."""
    settings = dict(backbone="resnet18", semantic_channels=32, mask_head_layers=(32,),
                    rpn_batch_size_per_image=64, box_batch_size_per_image=32,
                    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                    rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)
    settings.update(options)
    return panoptic_fpn(dataset.classes.num_classes, num_things=len(dataset.things), **settings)


def test_training_losses_are_finite_and_fall(data) -> None:
    dataset, samples = data
    model = _tiny(dataset)
    images, targets = [s[0] for s in samples[:2]], [s[1] for s in samples[:2]]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    totals, semantic = [], []
    for _ in range(6):
        losses = model(images, targets)
        assert set(losses) == RCNN_LOSSES | {"loss_semantic"}
        assert all(v.dim() == 0 and math.isfinite(v.item()) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
        semantic.append(losses["loss_semantic"].item())
    assert totals[-1] < 0.8 * totals[0], totals
    assert semantic[-1] < semantic[0], semantic


def test_loss_weights_scale_the_terms(data) -> None:
    dataset, samples = data
    images, targets = [s[0] for s in samples[:2]], [s[1] for s in samples[:2]]
    torch.manual_seed(1)
    model = _tiny(dataset).train()
    torch.manual_seed(2)  # the samplers of the RPN and RoI heads draw random numbers
    plain = model(images, targets)
    model.instance_loss_weight, model.semantic_loss_weight = 2.0, 0.25
    torch.manual_seed(2)
    weighted = model(images, targets)
    for key in RCNN_LOSSES:
        torch.testing.assert_close(weighted[key], 2.0 * plain[key])
    torch.testing.assert_close(weighted["loss_semantic"], 0.25 * plain["loss_semantic"])


def test_semantic_loss_matches_cross_entropy_of_the_eval_output(data) -> None:
    """Images of two sizes (the batch is padded); the loss of the train pass equals the
    cross-entropy of the eval pass's per-image "semantic" logits over the non-void pixels."""
    dataset, samples = data
    (img0, t0), (img1, t1) = samples[0], samples[1]
    img1, sem1 = img1[:, :48, :56], t1["semantic"][:48, :56].clone()
    sem1[:5] = 255  # some void
    keep = t1["boxes"][:, 2] <= 56  # instance fields stay consistent enough for the R-CNN heads
    t1 = {**t1, "semantic": sem1, "boxes": t1["boxes"][keep].clamp(max=48),
          "labels": t1["labels"][keep], "masks": t1["masks"][keep][:, :48, :56],
          "iscrowd": t1["iscrowd"][keep]}
    model = _tiny(dataset).train()
    for module in model.modules():  # the same normalisation statistics in both passes
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        loss = model([img0, img1], [t0, t1])["loss_semantic"]
        model.eval()
        outputs = model([img0, img1])
    assert outputs[1]["semantic"].shape == (dataset.classes.num_classes, 48, 56)
    logits = torch.cat([o["semantic"].flatten(1) for o in outputs], dim=1)  # (K, P0 + P1)
    target = torch.cat([t0["semantic"].flatten(), sem1.flatten()])  # (P0 + P1,)
    expected = F.cross_entropy(logits.T, target, ignore_index=255)  # (P, K) rows
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_semantic_loss_of_all_void_is_zero() -> None:
    logits = [torch.randn(3, 4, 5, requires_grad=True)]
    loss = semantic_loss(logits, [torch.full((4, 5), 255)])
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    with pytest.raises(UserError, match="semantic target"):
        semantic_loss(logits, [torch.zeros(4, 6, dtype=torch.int64)])


def test_eval_output_format_and_fusion(data) -> None:
    dataset, _ = data
    model = _tiny(dataset, box_score_thresh=0.0).eval()
    images = [torch.rand(3, 67, 71), torch.rand(3, 64, 64)]
    with torch.no_grad():
        outputs = model(images)
    categories = PanopticCategories(dataset.dataset["categories"])
    for out, image in zip(outputs, images):
        h, w = image.shape[-2:]
        n = out["boxes"].shape[0]
        assert set(out) == {"boxes", "labels", "scores", "masks", "semantic"}
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == out["labels"].shape == (n,)
        assert out["masks"].shape == (n, 1, h, w)
        assert out["semantic"].shape == (dataset.classes.num_classes, h, w)
        assert n == 0 or 1 <= int(out["labels"].min()) <= int(out["labels"].max()) <= len(
            dataset.things)
        result = fuse_panoptic(out, out["semantic"], categories)
        assert result.ids.shape == (h, w)


@pytest.mark.parametrize("name", sorted(set(UPSAMPLERS) - {"max_unpool"}))
def test_semantic_head_upsamplers_at_odd_sizes(name: str) -> None:
    head = SemanticFPNHead(5, in_channels=8, channels=8, upsample=name)
    ups = [m for m in head.modules() if isinstance(m, UPSAMPLERS[name])]
    assert len(ups) == 1 + 2 + 3 + 1  # strides 8, 16, 32 need 1, 2, 3 steps; the final x4
    sizes = [(17, 18), (9, 9), (5, 5), (3, 3)]  # a resnet FPN's levels for a 67 x 71 image
    features = {str(i): torch.randn(2, 8, *s) for i, s in enumerate(sizes)}
    assert head(features, (67, 71)).shape == (2, 5, 67, 71)


def test_upsample_option_travels_and_max_unpool_is_refused(data) -> None:
    dataset, _ = data
    model = _tiny(dataset, upsample="pixel_shuffle")
    kinds = {type(m).__name__ for m in model.semantic_head.modules() if hasattr(m, "needs_indices")}
    assert kinds == {UPSAMPLERS["pixel_shuffle"].__name__}
    with pytest.raises(UserError, match="max_unpool"):
        _tiny(dataset, upsample="max_unpool")
    with pytest.raises(UserError, match="unknown upsampler"):
        _tiny(dataset, upsample="nope")


def test_one_backbone_shared_and_run_once(data) -> None:
    dataset, samples = data
    model = _tiny(dataset)
    assert model.backbone is model.detector.backbone
    backbones = [m for m in model.modules() if type(m).__name__ == "BackboneWithFPN"]
    assert len(backbones) == 1
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    images, targets = [s[0] for s in samples[:2]], [s[1] for s in samples[:2]]
    losses = model(images, targets)
    assert len(calls) == 1
    # both branches' losses reach the shared weights
    first_conv = model.backbone.body.conv1.weight
    for key in ("loss_semantic", "loss_objectness"):
        (grad,) = torch.autograd.grad(losses[key], first_conv, retain_graph=True)
        assert grad.abs().sum() > 0, key
    model.eval()
    with torch.no_grad():
        model(images)
    assert len(calls) == 2


def test_builder_errors(data) -> None:
    dataset, samples = data
    with pytest.raises(UserError, match="num_things"):
        panoptic_fpn(7, backbone="resnet18")
    with pytest.raises(UserError, match="larger than num_things"):
        panoptic_fpn(3, num_things=3, backbone="resnet18")
    with pytest.raises(UserError, match="unknown backbone"):
        panoptic_fpn(7, num_things=3, backbone="vgg")
    model = _tiny(dataset).train()
    with pytest.raises(UserError, match="needs targets"):
        model([samples[0][0]])


def test_semantic_fpn_model() -> None:
    model = semantic_fpn(4, backbone="resnet18", semantic_channels=16, upsample="transposed")
    assert isinstance(model, SemanticFPN) and model.num_classes == 4
    images = torch.rand(2, 3, 45, 50, requires_grad=True)
    logits = model(images)
    assert logits.shape == (2, 4, 45, 50)
    model.eval()  # no batch statistics: image 1 cannot influence image 0's output
    model(images)[0].sum().backward()
    assert images.grad[0].abs().sum() > 0
    assert images.grad[1].abs().sum() == 0
    grey = semantic_fpn(3, backbone="resnet18", in_channels=1, semantic_channels=16).eval()
    assert grey(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)
