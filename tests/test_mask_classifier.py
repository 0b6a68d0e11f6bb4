"""The second-stage mask classifier: boxes of masks, crops, the CNN, and its place in SOLOv2
(training loss on sampled positive cells; eval: classes re-decided, top-k, Matrix NMS again)."""

from __future__ import annotations

import math

import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.models.mask_classifier import MaskClassifier, crop_inputs
from pixelwise.models.solov2_targets import mask_boxes
from pixelwise.models.rcnn import mask_rcnn
from pixelwise.models.solov2 import solov2
from tests.test_solov2 import TINY as SOLOV2_TINY

TINY_RCNN = dict(backbone="resnet18", fpn_channels=32, mask_head_layers=[16],
                 box_score_thresh=0.0, rpn_post_nms_top_n_test=50, classifier_widths=[8, 16])
TINY = {**SOLOV2_TINY, "score_threshold": 0.0, "update_threshold": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_boxes_by_hand() -> None:
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:7] = True  # rows 1-2, columns 2-6
    masks[1, 5, 0] = True  # one pixel in the bottom-left corner
    boxes, valid = mask_boxes(masks)
    assert boxes.tolist() == [[2, 1, 7, 3], [0, 5, 1, 6], [0, 0, 0, 0]]
    assert valid.tolist() == [True, True, False]


def test_crops_follow_boxes_strides_and_images() -> None:
    images = torch.zeros(2, 3, 32, 32)
    images[1, :, 8:24, 8:24] = 1.0  # image 1: a bright square on input pixels 8..23
    masks = torch.zeros(2, 8, 8)
    masks[:, 2:6, 2:6] = 0.75  # the same square at stride 4
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0]] * 2)
    tight = crop_inputs(images, torch.tensor([0, 1]), masks, boxes, stride=4, size=8, margin=0)
    assert tight.shape == (2, 4, 8, 8)
    assert torch.equal(tight[0, :3], torch.zeros(3, 8, 8))  # image 0 has no square
    assert torch.equal(tight[1, :3], torch.ones(3, 8, 8))  # samples stay inside the box
    # the mask: 2 bins per mask pixel, samples 1/8 and 3/8 into a bin (aligned: pixel centres
    # at i + 0.5), so the edge bins blend with the zeros outside: (0.625 + 0.875) / 2 = 0.75
    edge = torch.tensor([0.75, 1, 1, 1, 1, 1, 1, 0.75])
    assert torch.equal(tight[:, 3], (0.75 * edge[:, None] * edge[None, :]).expand(2, 8, 8))
    wide = crop_inputs(images, torch.tensor([1, 1]), masks, boxes, stride=4, size=8, margin=0.5)
    # the box grown by half its side per side: the middle half is the square, the corners not
    assert torch.equal(wide[0, :3, 2:6, 2:6], torch.ones(3, 4, 4))
    assert wide[0, :3, 0, 0].abs().max() == 0 and wide[0, 3, 0, 0] == 0


def test_classifier_shapes_detached_masks_and_refusals() -> None:
    torch.manual_seed(0)
    net = MaskClassifier(3, 5, size=16, widths=(8, 16))
    images = torch.rand(2, 3, 32, 32)
    masks = torch.rand(3, 8, 8, requires_grad=True)
    boxes = torch.tensor([[1.0, 1.0, 5.0, 6.0], [0.0, 0.0, 8.0, 8.0], [3.0, 2.0, 4.0, 3.0]])
    logits = net(images, torch.tensor([0, 1, 1]), masks, boxes, stride=4)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert masks.grad is None  # the classifier never changes the masks it reads
    assert net.classify.weight.grad is not None
    for options, message in [({"widths": ()}, "widths"), ({"widths": (8, 0)}, "widths"),
                             ({"size": 2, "widths": (8, 16)}, "size"),
                             ({"margin": -0.1}, "margin")]:
        with pytest.raises(UserError, match=message):
            MaskClassifier(3, 5, **options)


def _scene() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 8:30, 10:40] = 1
    masks[1, 36:60, 44:76] = 1
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    targets = [{"masks": masks, "labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[10.0, 8, 40, 30], [44, 36, 76, 60]])},
               {"masks": torch.zeros(0, 48, 64, dtype=torch.uint8),
                "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, targets


def _build(name: str, **options):
    if name == "solov2":
        return solov2(4, **{**TINY, **options})
    return mask_rcnn(4, **{**TINY_RCNN, **options})


MODELS = ["solov2", "mask_rcnn"]


@pytest.mark.parametrize("name", MODELS)
def test_training_loss_reaches_only_the_classifier(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name, mask_classifier=True).train()
    images, targets = _scene()
    losses = model(images, targets)
    assert "loss_mask_class" in losses and "loss_mask" in losses
    # an untrained classifier (zero-initialised last layer... almost): about log K
    assert losses["loss_mask_class"].item() == pytest.approx(math.log(3), abs=0.05)
    losses["loss_mask_class"].backward()
    assert model.mask_classifier.classify.weight.grad.abs().sum() > 0
    others = [p.grad for n, p in model.named_parameters() if not n.startswith("mask_classifier")]
    assert all(g is None for g in others)  # detached masks, input images: nothing else learns


@pytest.mark.parametrize("name", MODELS)
def test_classifier_loss_without_objects(name: str) -> None:
    model = _build(name, mask_classifier=True).train()
    images, targets = _scene()
    loss = model(images[1:], targets[1:])["loss_mask_class"]
    assert loss.item() == 0.0
    loss.backward()  # still reaches every classifier parameter (DDP needs that)
    assert all(p.grad is not None for p in model.mask_classifier.parameters())


def _forced(model, probabilities: list[float]) -> None:
    """Make the classifier answer `probabilities` for every input (weights 0, log-biases)."""
    with torch.no_grad():
        model.mask_classifier.classify.weight.zero_()
        model.mask_classifier.classify.bias.copy_(torch.tensor(probabilities).log())


@pytest.mark.parametrize("name", MODELS)
def test_eval_relabels_with_the_top_classes(name: str) -> None:
    torch.manual_seed(1)
    plain = _build(name).eval()
    images, _ = _scene()
    with torch.no_grad():
        before = plain(images[:1])[0]
    assert len(before["scores"]) > 1
    top = before["scores"].max().item()

    for top_k, probabilities in [(1, [1e-12, 1e-12, 1.0]), (2, [0.3, 0.1, 0.6])]:
        model = _build(name, mask_classifier=True, classifier_top_k=top_k).eval()
        missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert missing and all(k.startswith("mask_classifier.") for k in missing)
        _forced(model, probabilities)
        with torch.no_grad():
            after = model(images[:1])[0]
        labels = after["labels"]
        if top_k == 1:  # every mask is class 3 now; one class, so NMS removes more
            assert set(labels.tolist()) == {3}
            assert len(labels) <= len(before["labels"])
            assert after["scores"].max().item() == pytest.approx(top, rel=1e-6)
            best = before["scores"].argmax()
            assert torch.equal(after["boxes"][0], before["boxes"][best])
            assert torch.equal(after["masks"][0], before["masks"][best])
        else:  # each mask as class 3 (x 0.6) and class 1 (x 0.3); the best of each undecayed
            assert set(labels.tolist()) == {1, 3}
            assert after["scores"][labels == 3].max().item() == pytest.approx(0.6 * top, rel=1e-5)
            assert after["scores"][labels == 1].max().item() == pytest.approx(0.3 * top, rel=1e-5)
        assert after["masks"].shape[1:] == (1, 64, 80) and len(after["boxes"]) == len(labels)
        assert torch.all(after["scores"][:-1] >= after["scores"][1:])


@pytest.mark.parametrize("name", MODELS)
def test_classifier_options_are_checked(name: str) -> None:
    bad = [({"classifier_top_k": 0}, "classifier_top_k"),
           ({"classifier_weight": 0.0}, "classifier_weight"),
           ({"classifier_widths": [8, -1]}, "widths")]
    bad += ([({"classifier_samples": 0}, "classifier_samples")] if name == "solov2" else
            [({"classifier_jitter": 0.5}, "classifier_jitter")])
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            _build(name, mask_classifier=True, **options)
    # top-k beyond the classes is capped at K (3 things)
    assert _build(name, mask_classifier=True, classifier_top_k=5).classifier_top_k == 3


def _d4(crops: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square as the 4 rotations of the crop and of its mirror image."""
    return [torch.rot90(c, k, dims=(-2, -1)) for c in (crops, crops.flip(-1)) for k in range(4)]


def test_symmetric_test_averages_the_eight_views() -> None:
    """`symmetries=True` (eval): the log of the mean softmax over the crop's 8 symmetries,
    computed here from rotations; mirrored inputs (image, mask and box) give the same answer."""
    torch.manual_seed(3)
    net = MaskClassifier(3, 4, size=16, widths=(8, 16))
    with torch.no_grad():  # BatchNorm statistics other than the identity
        net.train()(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), torch.rand(2, 8, 8),
                    torch.tensor([[1.0, 1.0, 6.0, 7.0]] * 2), stride=4)
        torch.nn.init.normal_(net.classify.weight)  # away from the near-uniform start
    net.eval()
    images, masks = torch.rand(1, 3, 32, 32), torch.rand(2, 8, 8)
    boxes = torch.tensor([[1.0, 2.0, 6.0, 7.0], [0.0, 0.0, 5.0, 3.0]])
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        got = net(images, index, masks, boxes, stride=4, symmetries=True)
        crops = crop_inputs(images, index, masks, boxes, stride=4, size=16, margin=net.margin)
        probs = [net.classify(net.features(v).mean(dim=(2, 3))).softmax(1) for v in _d4(crops)]
        expected = torch.stack(probs).mean(0)  # (2, 4)
        torch.testing.assert_close(got.exp(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, probs[0], atol=1e-3)  # the views differ
        # the mirror image of everything: each box x -> 8 - x in mask pixels
        mirrored_boxes = torch.stack([8 - boxes[:, 2], boxes[:, 1], 8 - boxes[:, 0],
                                      boxes[:, 3]], dim=1)
        mirrored = net(images.flip(-1), index, masks.flip(-1), mirrored_boxes, stride=4,
                       symmetries=True)
        torch.testing.assert_close(mirrored, got, rtol=1e-4, atol=1e-5)
        plain = net(images, index, masks, boxes, stride=4)
        torch.testing.assert_close(plain.softmax(1), probs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agnostic, resize", [(False, None), (True, None), (False, 128)])
def test_mask_rcnn_classifier_trained_on_its_own_masks(agnostic: bool, resize: int | None
                                                       ) -> None:
    """classifier_masks="predicted": the classifier reads the mask head's masks of the positive
    proposals, pasted into the image and thresholded at 0.5 as at eval (checked against
    torchvision's paste), at those proposals' boxes, each labelled with the class of the
    ground-truth box it overlaps most; the loss is its cross-entropy, and only it learns. With
    `resize` the detector sees the images resized (x2): boxes come back to the images' frame."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    model = _build("mask_rcnn", mask_classifier=True, classifier_masks="predicted",
                   mask_class_agnostic=agnostic, min_size=resize, max_size=400).train()
    images, targets = _scene()
    seen: dict = {}
    model.roi_heads.mask_predictor.register_forward_hook(
        lambda m, args, out: seen.__setitem__("logits", out.detach()))
    model.mask_classifier.register_forward_hook(
        lambda m, args, out: seen.update(inputs=args, out=out.detach()))
    losses = model(images, targets)
    _, index, masks, boxes = seen["inputs"]
    assert len(boxes) == len(seen["logits"]) > 0 and torch.all(index == 0)  # image 1: no objects
    overlap = box_iou(boxes, targets[0]["boxes"])  # (P, 2)
    assert torch.all(overlap.max(1).values >= 0.5)  # torchvision's positives (fg IoU 0.5)
    labels = targets[0]["labels"][overlap.argmax(1)]
    channel = torch.zeros_like(labels) if agnostic else labels
    probs = seen["logits"][torch.arange(len(labels)), channel].float().sigmoid()  # (P, 28, 28)
    expected = paste_masks_in_image(probs[:, None], boxes, (64, 80))[:, 0] >= 0.5  # (P, 64, 80)
    assert masks.shape == (len(boxes), 64, 80) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.bool() == expected).float().mean() > 0.999
    loss = losses["loss_mask_class"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(seen["out"], labels - 1))
    loss.backward()
    assert model.mask_classifier.classify.weight.grad.abs().sum() > 0
    others = [p.grad for n, p in model.named_parameters() if not n.startswith("mask_classifier")]
    assert all(g is None for g in others)
    # no object, no positive proposal: a zero loss that still reaches the classifier
    model.zero_grad()
    empty = model(images[1:], targets[1:])["loss_mask_class"]
    assert empty.item() == 0.0
    empty.backward()
    assert all(p.grad is not None for p in model.mask_classifier.parameters())
    with pytest.raises(UserError, match="classifier_masks.*'both'.*predicted, truth"):
        _build("mask_rcnn", mask_classifier=True, classifier_masks="both")
