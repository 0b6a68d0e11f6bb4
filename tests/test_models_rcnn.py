"""Mask / Keypoint R-CNN: heads' upsamplers, builders, training, eval format, and the fast eval
path checked against torchvision's own code (same weights) and its postprocessing functions."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
import torchvision.models.detection as tvd
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv_heatmaps
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import batched_nms

from pixelwise.data.coco import CocoInstances, collate_detection
from pixelwise.data.keypoints import KeypointSchema
from pixelwise.data.synthetic import synthesize
from pixelwise.errors import UserError
from pixelwise.models import fast_postprocess as fp
from pixelwise.models.rcnn import KEYPOINT_PIXEL_OFFSET, clean_targets, keypoint_rcnn, mask_rcnn
from pixelwise.models.rcnn_heads import (
    KeypointPredictor,
    MaskPredictor,
    torchvision_key_map,
    upsampler_of,
)
from pixelwise.upsample import UPSAMPLERS

HEAD_UPSAMPLERS = {k: v for k, v in UPSAMPLERS.items() if not v.needs_indices}
# small heads and samples keep the model tests fast (the RoI heads' convs dominate the time)
LIGHT = dict(backbone="resnet18", mask_head_layers=(32, 32), rpn_batch_size_per_image=64,
             box_batch_size_per_image=32, rpn_post_nms_top_n_train=300,
             rpn_post_nms_top_n_test=300)


pytestmark = pytest.mark.usefixtures("one_thread")

ANCHORS = (16, 32, 64, 128, 256)
TIE = 1e-4  # probabilities this close to 0.5 may fall either side (float rounding)


def _rcnn_kwargs(size: int, detections: int = 60) -> dict:
    return dict(min_size=size, max_size=size, box_score_thresh=0.0,
                box_detections_per_img=detections)


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", sorted(HEAD_UPSAMPLERS))
def test_mask_predictor_uses_the_chosen_upsampler(name: str) -> None:
    torch.manual_seed(0)
    predictor = MaskPredictor(32, 5, name)
    assert type(predictor.upsample) is UPSAMPLERS[name]
    assert upsampler_of(predictor) is predictor.upsample
    out = predictor(torch.randn(3, 32, 14, 14))
    assert out.shape == (3, 5, 28, 28)
    labels = torch.tensor([1, 4, 0])
    x = torch.randn(3, 32, 14, 14)
    torch.testing.assert_close(predictor.forward_selected(x, labels),
                               predictor(x)[torch.arange(3), labels], rtol=1e-5, atol=1e-5)


def test_class_agnostic_mask_predictor_gives_every_class_one_map() -> None:
    """class_agnostic: one 1x1 output shown as every class's map; torchvision's mask loss is
    the same whatever the labels, and its gradient reaches the one map's weights."""
    from torchvision.models.detection.roi_heads import maskrcnn_loss

    torch.manual_seed(0)
    predictor = MaskPredictor(16, 5, class_agnostic=True)
    assert predictor.mask_fcn_logits.out_channels == 1
    x = torch.randn(3, 16, 14, 14)
    out = predictor(x)
    assert out.shape == (3, 5, 28, 28)
    for k in range(1, 5):
        assert torch.equal(out[:, k], out[:, 0])
    torch.testing.assert_close(predictor.forward_selected(x, torch.tensor([1, 4, 2])), out[:, 0])
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 2.0, 30.0, 16.0], [1.0, 1.0, 9.0, 9.0]])]
    gt_masks = [(torch.rand(3, 32, 32) > 0.5).float()]
    losses = [maskrcnn_loss(out, boxes, gt_masks, [labels], [torch.arange(3)])
              for labels in (torch.tensor([1, 1, 1]), torch.tensor([4, 2, 3]))]
    torch.testing.assert_close(losses[0], losses[1])
    losses[1].backward()
    assert predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_default_mask_predictor_is_torchvisions() -> None:
    """'transposed' is the paper's 2x2 stride-2 deconvolution: torchvision's weights load and
    give the same logits."""
    torch.manual_seed(0)
    ref = MaskRCNNPredictor(16, 16, 4)
    ours = MaskPredictor(16, 4)
    conv = ours.upsample.conv
    assert (conv.kernel_size, conv.stride, conv.bias is not None) == ((2, 2), (2, 2), True)
    state = {f"roi_heads.mask_predictor.{k}": v for k, v in ref.state_dict().items()}

    class Holder(nn.Module):  # the key map looks the predictor up at model.roi_heads
        def __init__(self) -> None:
            super().__init__()
            self.roi_heads = nn.Module()
            self.roi_heads.mask_predictor = ours

    Holder().load_state_dict(torchvision_key_map(state, Holder()))
    x = torch.randn(2, 16, 14, 14)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name", sorted(HEAD_UPSAMPLERS))
def test_keypoint_predictor_uses_the_chosen_upsampler(name: str) -> None:
    torch.manual_seed(0)
    predictor = KeypointPredictor(32, 5, name)
    if name == "transposed":
        assert isinstance(upsampler_of(predictor), nn.ConvTranspose2d)
    else:
        assert type(upsampler_of(predictor)) is UPSAMPLERS[name]
    assert predictor(torch.randn(2, 32, 14, 14)).shape == (2, 5, 56, 56)


def test_default_keypoint_predictor_is_torchvisions() -> None:
    torch.manual_seed(0)
    ref = KeypointRCNNPredictor(32, 7)
    ours = KeypointPredictor(32, 7)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 14, 14)
    torch.testing.assert_close(ours(x), ref(x))


def test_bad_upsamplers_and_backbones() -> None:
    with pytest.raises(UserError, match="unknown upsampler 'cubic'.*bilinear"):
        MaskPredictor(8, 2, "cubic")
    with pytest.raises(UserError, match="max-pool indices"):
        KeypointPredictor(8, 2, "max_unpool")
    with pytest.raises(UserError, match="takes no options"):
        KeypointPredictor(8, 2, "transposed", kernel_size=2)
    with pytest.raises(UserError, match="unknown backbone 'vgg16'.*resnet18"):
        mask_rcnn(3, backbone="vgg16")
    with pytest.raises(UserError, match="anchor_sizes needs 5"):
        mask_rcnn(3, backbone="resnet18", anchor_sizes=(8, 16))
    with pytest.raises(UserError, match="mask_threshold"):
        mask_rcnn(3, backbone="resnet18", mask_threshold=1.5)


def test_upsample_option_reaches_the_heads() -> None:
    model = mask_rcnn(3, backbone="resnet18", upsample="resize_conv")
    assert type(model.roi_heads.mask_predictor.upsample) is UPSAMPLERS["resize_conv"]
    kp = keypoint_rcnn(2, num_keypoints=3, backbone="resnet18", upsample="bilinear",
                       keypoint_head_layers=(32,))
    assert type(kp.roi_heads.keypoint_predictor.upsample) is UPSAMPLERS["bilinear"]


# ----------------------------------------------------------------------------- fast postprocess


def _random_boxes(n: int, size: float, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[: n // 10, 2] = boxes[: n // 10, 0] + 0.3  # some very thin boxes
    return boxes


def test_batched_nms_top_k_equals_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    for n, k, classes in [(3000, 100, 30), (500, 1000, 3), (2000, 7, 1), (0, 5, 2)]:
        boxes = _random_boxes(n, 100.0, gen)
        scores = torch.rand(n, generator=gen)
        labels = torch.randint(1, classes + 1, (n,), generator=gen)
        expected = batched_nms(boxes, scores, labels, 0.5)[:k]
        assert torch.equal(fp.batched_nms_top_k(boxes, scores, labels, 0.5, k), expected)


def test_paste_masks_equals_torchvision() -> None:
    gen = torch.Generator().manual_seed(1)
    n, h, w = 40, 70, 90
    # boxes touching the borders (clipped, as the model's boxes are): the padded masks stick out
    boxes = torchvision.ops.clip_boxes_to_image(_random_boxes(n, 100.0, gen) - 10, (h, w))
    boxes[-1] = torch.tensor([5.0, 5.0, 5.4, 5.2])  # tiny
    probs = torch.rand(n, 1, 28, 28, generator=gen)
    ref = paste_masks_in_image(probs, boxes, (h, w))
    ours = fp.paste_masks(probs, boxes, (h, w))
    assert ours.shape == ref.shape == (n, 1, h, w)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    binary = fp.paste_masks(probs, boxes, (h, w), threshold=0.5)
    assert binary.dtype == torch.bool
    decided = (ref - 0.5).abs() > TIE
    assert torch.equal(binary[decided], (ref >= 0.5)[decided])
    assert fp.paste_masks(probs[:0], boxes[:0], (h, w)).shape == (0, 1, h, w)


@pytest.mark.parametrize("chunking", ["cpu", "gpu", "gpu-small"])
def test_heatmaps_to_keypoints_equals_torchvision(chunking: str, monkeypatch) -> None:
    """Also with the GPU's chunking (one padded batch; "gpu-small": budgets that split it)."""
    if chunking != "cpu":
        chunks = fp._keypoint_chunks
        monkeypatch.setattr(fp, "_keypoint_chunks", lambda *a, **kw: chunks(*a, cpu=False))
    if chunking == "gpu-small":
        monkeypatch.setattr(fp, "GPU_CHUNK_ELEMENTS", 5 * 3 * 120 * 120)
    gen = torch.Generator().manual_seed(2)
    rois = _random_boxes(30, 120.0, gen)
    rois[:3, 2:] = rois[:3, :2] + 0.2  # degenerate RoIs are clamped to 1 pixel
    # smooth maps like real heatmaps (white noise has many near-ties)
    maps = torch.nn.functional.interpolate(torch.randn(30, 5, 14, 14, generator=gen),
                                           size=(56, 56), mode="bilinear")
    ref_xy, ref_scores = tv_heatmaps(maps, rois)
    xy, scores = fp.heatmaps_to_keypoints(maps, rois)
    assert torch.equal(xy, ref_xy)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)
    if chunking == "gpu":  # these RoIs: several chunks on the CPU, one batch on the GPU
        hc = (rois[:, 3] - rois[:, 1]).clamp(min=1).ceil().long().tolist()
        wc = (rois[:, 2] - rois[:, 0]).clamp(min=1).ceil().long().tolist()
        assert len(chunks(hc, wc, 5)) > 1
        assert [len(c) for c in fp._keypoint_chunks(hc, wc, 5)] == [30]
    if chunking == "gpu-small":
        assert [len(c) for c in fp._keypoint_chunks([120] * 30, [120] * 30, 5)] == [3] * 10


def test_postprocessing_is_float32_under_autocast() -> None:
    """CUDA eval runs under float16 autocast; CPU bfloat16 autocast takes the same paths: the
    heatmap resizing and mask pasting stay float32 (keypoint eval failed on an index_put of
    bfloat16 scores into float32 before), and a keypoint model evaluates."""
    gen = torch.Generator().manual_seed(2)
    rois = _random_boxes(12, 120.0, gen)
    maps = torch.nn.functional.interpolate(torch.randn(12, 5, 14, 14, generator=gen),
                                           size=(56, 56), mode="bilinear")
    probs = torch.rand(12, 1, 28, 28, generator=gen)
    plain = fp.heatmaps_to_keypoints(maps, rois), fp.paste_masks(probs, rois, (130, 125))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (xy, scores), pasted = (fp.heatmaps_to_keypoints(maps, rois),
                                fp.paste_masks(probs, rois, (130, 125)))
    assert xy.dtype == scores.dtype == pasted.dtype == torch.float32
    assert torch.equal(xy, plain[0][0]) and torch.equal(scores, plain[0][1])
    assert torch.equal(pasted, plain[1])
    model = keypoint_rcnn(2, num_keypoints=5, backbone="resnet18", keypoint_head_layers=(16,),
                          **_rcnn_kwargs(96, detections=5)).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        (det,) = model([torch.rand(3, 96, 96)])
    assert det["keypoints"].shape == (5, 5, 3) and det["keypoints"].dtype == torch.float32


def test_fast_heads_equal_the_modules() -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 16, 14, 14)
    labels = torch.tensor([1, 2, 3, 0, 2, 1])
    for predictor in (MaskRCNNPredictor(16, 16, 4), MaskPredictor(16, 4),
                      MaskPredictor(16, 4, "bilinear"), MaskPredictor(16, 4, class_agnostic=True),
                      MaskPredictor(16, 4, "bilinear", class_agnostic=True),
                      MaskPredictor(16, 4, fc_fusion_size=14),
                      MaskPredictor(16, 4, "bilinear", fc_fusion_size=14)):
        torch.testing.assert_close(fp.selected_mask_logits(predictor, x, labels),
                                   predictor(x)[torch.arange(6), labels], rtol=1e-4, atol=1e-4)
    for kp in (KeypointRCNNPredictor(16, 3), KeypointPredictor(16, 3, "pixel_shuffle")):
        torch.testing.assert_close(fp.keypoint_logits(kp, x), kp(x), rtol=1e-4, atol=1e-4)
    head = KeypointRCNNHeads(16, (8, 8))
    with torch.no_grad():
        torch.testing.assert_close(fp.run_conv_stack(head, x), head(x), rtol=1e-4, atol=1e-4)


def _torchvision_twin(ours: nn.Module, kind: str, **extra) -> nn.Module:
    """torchvision's model of the same build as `ours` (resnet18-FPN), holding ours' weights."""
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                               norm_layer=nn.BatchNorm2d, trainable_layers=5)
    anchors = AnchorGenerator(tuple((s,) for s in ANCHORS), ((0.5, 1.0, 2.0),) * 5)
    if kind == "mask":
        ref = tvd.MaskRCNN(body, None, rpn_anchor_generator=anchors,
                           box_predictor=FastRCNNPredictor(1024, 5), **extra)
    else:
        ref = tvd.KeypointRCNN(body, 2, rpn_anchor_generator=anchors, **extra)
    ref.load_state_dict(ours.state_dict() if kind != "mask" else _to_torchvision(ours))
    return ref.eval()


def _to_torchvision(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    for kind in ("weight", "bias"):
        state[f"roi_heads.mask_predictor.conv5_mask.{kind}"] = state.pop(
            f"roi_heads.mask_predictor.upsample.conv.{kind}")
    return state


def test_mask_rcnn_eval_equals_torchvision() -> None:
    """Same weights: identical boxes, labels and scores; masks equal up to ties at 0.5."""
    torch.manual_seed(4)
    size = 128
    ours = mask_rcnn(5, backbone="resnet18", mask_head_layers=(32, 32), mask_threshold=None,
                     rpn_post_nms_top_n_test=300, **_rcnn_kwargs(size)).eval()
    with torch.no_grad():  # logits around 0: half the pixels foreground, many close calls
        ours.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
        ours.roi_heads.mask_predictor.mask_fcn_logits.bias.zero_()
    ref = _torchvision_twin(ours, "mask", **_rcnn_kwargs(size), rpn_post_nms_top_n_test=300,
                            mask_head=MaskRCNNHeads(256, (32, 32), 1),
                            mask_predictor=MaskRCNNPredictor(32, 32, 5))
    images = [torch.rand(3, size, size), torch.rand(3, 100, size)]
    with torch.inference_mode():
        expected, got = ref(images), ours(images)
        ours.transform.mask_threshold = 0.5
        binary = ours(images)
    for e, g, b in zip(expected, got, binary):
        assert len(g["boxes"]) == 60
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(g[key], e[key]), key
        torch.testing.assert_close(g["masks"], e["masks"], rtol=0, atol=1e-4)
        decided = (e["masks"] - 0.5).abs() > TIE
        ref_bin, our_bin = (e["masks"] >= 0.5) & decided, b["masks"] & decided
        inter = (ref_bin & our_bin).flatten(1).sum(1)
        union = (ref_bin | our_bin).flatten(1).sum(1)
        assert bool((inter[union > 0] / union[union > 0] >= 0.99).all())
        assert b["masks"].dtype == torch.bool


@pytest.mark.parametrize("tiled", [False, True])
def test_keypoint_rcnn_eval_equals_torchvision(tiled: bool, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """Also with the keypoint head's RoIs tiled into one map (as 512-channel heads are)."""
    if tiled:
        monkeypatch.setattr(fp, "MOSAIC_MIN_CHANNELS", 32)
    torch.manual_seed(5)
    size = 96
    ours = keypoint_rcnn(2, num_keypoints=5, backbone="resnet18", keypoint_head_layers=(32, 32),
                         **_rcnn_kwargs(size)).eval()
    ref = _torchvision_twin(ours, "keypoint", **_rcnn_kwargs(size),
                            keypoint_head=KeypointRCNNHeads(256, (32, 32)),
                            keypoint_predictor=KeypointRCNNPredictor(32, 5))
    images = [torch.rand(3, size, size)]
    with torch.inference_mode():
        (e,), (g,) = ref(images), ours(images)
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(g[key], e[key]), key
    # pixelwise reports COCO pixel indices: torchvision's cell centres minus the offset
    shifted = e["keypoints"].clone()
    shifted[..., :2] -= KEYPOINT_PIXEL_OFFSET
    torch.testing.assert_close(g["keypoints"], shifted, rtol=0, atol=1e-4)
    torch.testing.assert_close(g["keypoints_scores"], e["keypoints_scores"], rtol=1e-3,
                               atol=1e-3)


# ----------------------------------------------------------------------------- train and format


@pytest.fixture(scope="module")
def instance_batch(tmp_path_factory):
    root = synthesize("instance", tmp_path_factory.mktemp("inst") / "data", num=4,
                      size=(128, 128), val_fraction=0.0)
    ds = CocoInstances.from_layout(root, "train")
    images, targets = collate_detection([ds[i] for i in range(len(ds))])
    with_objects = [i for i, t in enumerate(targets) if len(t["boxes"])]
    return ds, [images[i] for i in with_objects[:2]], [targets[i] for i in with_objects[:2]]


def test_training_returns_losses_that_fall(instance_batch) -> None:
    ds, images, targets = instance_batch
    torch.manual_seed(0)
    model = mask_rcnn(ds.categories.num_classes, **LIGHT)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    totals = []
    for _ in range(6):
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask",
                               "loss_objectness", "loss_rpn_box_reg"}
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert sum(totals[-2:]) < 0.6 * sum(totals[:2]), totals


def test_eval_output_format(instance_batch) -> None:
    ds, images, _ = instance_batch
    model = mask_rcnn(ds.categories.num_classes, **LIGHT, box_score_thresh=0.0,
                      box_detections_per_img=7).eval()
    odd = torch.rand(3, 67, 71)
    with torch.inference_mode():
        out = model([images[0], odd])
    assert len(out) == 2
    for det, (h, w) in zip(out, [(128, 128), (67, 71)]):
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        d = len(det["boxes"])
        assert d == 7
        assert det["boxes"].shape == (d, 4) and det["scores"].shape == (d,)
        assert det["labels"].dtype == torch.int64
        assert bool(((det["labels"] >= 1) & (det["labels"] < ds.categories.num_classes)).all())
        assert det["masks"].shape == (d, 1, h, w) and det["masks"].dtype == torch.bool
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
    # min_size=None: images keep their size inside the model
    image_list, _ = model.transform([odd])
    assert image_list.image_sizes == [(67, 71)]


def test_degenerate_and_empty_targets_train(instance_batch, caplog) -> None:
    ds, images, targets = instance_batch
    torch.manual_seed(0)
    model = mask_rcnn(ds.categories.num_classes, **LIGHT).train()
    bad = dict(targets[0])
    boxes = bad["boxes"].clone()
    boxes[0, 2] = boxes[0, 0]  # zero width
    bad["boxes"] = boxes
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 128, 128, dtype=torch.uint8)}
    with caplog.at_level(logging.WARNING):
        losses = model([images[0], images[1]], [bad, empty])
    assert "degenerate" in caplog.text
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_clean_targets_drops_crowds_and_shifts_keypoints() -> None:
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [2, 2, 8, 9], [1, 1, 1, 5]]),
              "labels": torch.tensor([1, 2, 1]), "iscrowd": torch.tensor([0, 1, 0]),
              "keypoints": torch.tensor([[[3.0, 4, 2]], [[5, 5, 2]], [[1, 1, 1]]])}
    (out,) = clean_targets([target], keypoint_offset=0.5, num_keypoints=1)
    assert out["boxes"].tolist() == [[0.0, 0, 10, 10]]
    assert out["keypoints"].tolist() == [[[3.5, 4.5, 2.0]]]
    with pytest.raises(UserError, match="predicts 2 keypoints"):
        clean_targets([target], num_keypoints=2)


FIVE = KeypointSchema(("centre", "left_top", "right_top", "left_bottom", "right_bottom"),
                      skeleton=((0, 1), (0, 2), (0, 3), (0, 4)), sigmas=(0.05,) * 5)


def _corner_keypoints(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(1)
    pts = [((x1 + x2) / 2, (y1 + y2) / 2), (x1, y1), (x2 - 1, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)]
    xy = torch.stack([torch.stack(p, dim=1) for p in pts], dim=1)  # (N, 5, 2)
    return torch.cat([xy, torch.full((len(boxes), 5, 1), 2.0)], dim=2)  # (N, 5, 3)


def test_keypoint_rcnn_with_a_five_point_schema(instance_batch) -> None:
    _, images, targets = instance_batch
    assert FIVE.flip_pairs == ((1, 2), (3, 4))
    model = keypoint_rcnn(2, schema=FIVE, backbone="resnet18", keypoint_head_layers=(32, 32),
                          box_score_thresh=0.0, box_detections_per_img=5,
                          box_batch_size_per_image=32, rpn_post_nms_top_n_train=300)
    assert model.schema is FIVE and model.num_keypoints == 5
    kp_targets = [{"boxes": t["boxes"], "labels": torch.ones(len(t["boxes"]), dtype=torch.int64),
                   "keypoints": _corner_keypoints(t["boxes"])} for t in targets]
    model.train()
    losses = model(images, kp_targets)
    assert "loss_keypoint" in losses and torch.isfinite(losses["loss_keypoint"])
    # channels_last weights (`--channels-last`): torchvision's keypoint loss views the logits
    torch.manual_seed(0)
    expected = model(images, kp_targets)["loss_keypoint"]
    model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    torch.testing.assert_close(model(images, kp_targets)["loss_keypoint"], expected)
    wrong = [dict(t, keypoints=torch.zeros(len(t["boxes"]), 17, 3)) for t in kp_targets]
    with pytest.raises(UserError, match="predicts 5 keypoints"):
        model(images, wrong)
    model.eval()
    with torch.inference_mode():
        (det,) = model(images[:1])
    assert det["keypoints"].shape == (5, 5, 3) and det["keypoints_scores"].shape == (5, 5)
    with pytest.raises(UserError, match="num_keypoints=4 but the schema has 5"):
        keypoint_rcnn(2, schema=FIVE, num_keypoints=4, backbone="resnet18")
    built = keypoint_rcnn(2, schema=FIVE.to_coco_category() | {"name": "box"},
                          backbone="resnet18", keypoint_head_layers=(8,))
    assert built.schema.names == FIVE.names


def test_grey_images_and_mobilenet_backbone() -> None:
    """16-bit microscopy comes as one channel: in_channels=1 normalises with one mean / std."""
    torch.manual_seed(6)
    grey = mask_rcnn(2, **LIGHT, in_channels=1, box_score_thresh=0.0,
                     box_detections_per_img=3).eval()
    assert grey.transform.image_mean == [pytest.approx(0.449, abs=1e-3)]
    mobile = mask_rcnn(2, **dict(LIGHT, backbone="mobilenet_v3_large"), box_score_thresh=0.0,
                       box_detections_per_img=3).eval()
    with torch.inference_mode():
        (g,) = grey([torch.rand(1, 64, 80)])
        (m,) = mobile([torch.rand(3, 64, 80)])
    assert g["masks"].shape == (3, 1, 64, 80) and m["masks"].shape == (3, 1, 64, 80)


@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
def test_no_detections_keep_the_output_shapes(head_dtype: str) -> None:
    masks = mask_rcnn(3, **LIGHT, box_score_thresh=0.999, head_dtype=head_dtype).eval()
    points = keypoint_rcnn(2, num_keypoints=4, backbone="resnet18", keypoint_head_layers=(16,),
                           box_score_thresh=0.999, head_dtype=head_dtype).eval()
    with torch.inference_mode():
        (m,) = masks([torch.rand(3, 64, 48)])
        (k,) = points([torch.rand(3, 64, 48)])
    assert m["boxes"].shape == (0, 4) and m["masks"].shape == (0, 1, 64, 48)
    assert k["keypoints"].shape == (0, 4, 3) and k["keypoints_scores"].shape == (0, 4)


# ----------------------------------------------------------------------------- normalised heads


@pytest.mark.parametrize("norm, layer", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)])
def test_head_norm_normalises_the_fpn_and_heads(norm: str, layer: type) -> None:
    """head_norm puts a norm after every FPN conv and every mask / box head conv;
    box_head_convs makes torchvision's conv + fc box head. The same weights in torchvision's own
    v2-style assembly give identical detections through pixelwise's fast eval path."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

    torch.manual_seed(7)
    size = 96
    ours = mask_rcnn(4, backbone="resnet18", mask_head_layers=(16, 16), fpn_channels=32,
                     head_norm=norm, box_head_convs=2, rpn_post_nms_top_n_test=200,
                     mask_threshold=None, **_rcnn_kwargs(size, detections=20)).eval()
    fpn_norms = [m for m in ours.backbone.fpn.modules() if isinstance(m, layer)]
    assert len(fpn_norms) == 8  # 4 inner (1x1) + 4 layer (3x3) blocks
    box_head = ours.roi_heads.box_head
    assert isinstance(box_head, FastRCNNConvFCHead)
    assert sum(isinstance(m, nn.Conv2d) for m in box_head.modules()) == 2
    assert sum(isinstance(m, layer) for m in box_head.modules()) == 2
    assert sum(isinstance(m, layer) for m in ours.roi_heads.mask_head.modules()) == 2
    if norm == "gn":
        assert {m.num_groups for m in fpn_norms} == {32}
        assert {m.num_groups for m in ours.roi_heads.mask_head.modules()
                if isinstance(m, nn.GroupNorm)} == {16}
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for m in ours.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)

    from pixelwise.models.rcnn import norm_layer

    made = norm_layer(norm)
    tv_body = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                  norm_layer=nn.BatchNorm2d, trainable_layers=5)
    body = BackboneWithFPN(tv_body.body, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                           [64, 128, 256, 512], 32, norm_layer=made)
    anchors = AnchorGenerator(tuple((s,) for s in ANCHORS), ((0.5, 1.0, 2.0),) * 5)
    ref = tvd.MaskRCNN(
        body, None, rpn_anchor_generator=anchors, **_rcnn_kwargs(size, detections=20),
        rpn_post_nms_top_n_test=200,
        box_head=FastRCNNConvFCHead((32, 7, 7), [32, 32], [1024], norm_layer=made),
        box_predictor=FastRCNNPredictor(1024, 4),
        mask_head=MaskRCNNHeads(32, (16, 16), 1, norm_layer=made),
        mask_predictor=MaskRCNNPredictor(16, 16, 4))
    ref.load_state_dict(_to_torchvision(ours))
    ref.eval()
    images = [torch.rand(3, size, size)]
    with torch.inference_mode():
        (e,), (g,) = ref(images), ours(images)
    assert len(g["boxes"]) == 20
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(g[key], e[key]), key
    torch.testing.assert_close(g["masks"], e["masks"], rtol=0, atol=1e-4)


def test_normalised_heads_train_and_refuse_bad_settings(instance_batch) -> None:
    ds, images, targets = instance_batch
    torch.manual_seed(0)
    model = mask_rcnn(ds.categories.num_classes, **LIGHT, head_norm="gn", box_head_convs=1)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(6):
        total = sum(model(images, targets).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert sum(totals[-2:]) < 0.6 * sum(totals[:2]), totals
    with pytest.raises(UserError, match="head_norm.*'ln'.*bn, gn"):
        mask_rcnn(3, **LIGHT, head_norm="ln")
    with pytest.raises(UserError, match="box_head_convs must be an integer >= 0"):
        mask_rcnn(3, **LIGHT, box_head_convs=-1)


def test_mask_roi_size_sets_the_mask_resolution(instance_batch) -> None:
    """mask_roi_size 28: the mask head sees 28 x 28 RoIs and predicts (and is trained on)
    56 x 56 masks; torchvision's mask loss takes its target size from the logits."""
    ds, images, targets = instance_batch
    torch.manual_seed(0)
    model = mask_rcnn(ds.categories.num_classes, **LIGHT, mask_roi_size=28)
    shapes: list[tuple[int, ...]] = []
    model.roi_heads.mask_predictor.register_forward_hook(
        lambda module, args, out: shapes.append(tuple(out.shape)))
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_mask"])
    losses["loss_mask"].backward()
    assert shapes[-1][-2:] == (56, 56) and shapes[-1][1] == ds.categories.num_classes
    model.eval()
    with torch.inference_mode():
        (det,) = model([images[0]])
    assert shapes[-1][-2:] == (56, 56) and det["masks"].shape[-2:] == images[0].shape[-2:]
    with pytest.raises(UserError, match="mask_roi_size must be a positive integer, got 0"):
        mask_rcnn(3, **LIGHT, mask_roi_size=0)


def test_mask_head_dilation_widens_what_a_mask_pixel_sees() -> None:
    """Four 3x3 convs: a corner output pixel reads input pixels up to 4 away (dilation 1) or 8
    away (dilation 2), i.e. the whole 14 x 14 RoI from its centre."""
    reach = {}
    for dilation in (1, 2):
        torch.manual_seed(0)
        head = mask_rcnn(3, **{**LIGHT, "mask_head_layers": (8,) * 4},
                         mask_head_dilation=dilation).roi_heads.mask_head
        x = torch.randn(1, head[0][0].in_channels, 14, 14, requires_grad=True)
        out = head(x)
        assert out.shape == (1, 8, 14, 14)
        out[0, :, 0, 0].sum().backward()
        rows, cols = torch.nonzero(x.grad[0].abs().sum(0)).unbind(1)
        reach[dilation] = (int(rows.max()), int(cols.max()))
    assert reach == {1: (4, 4), 2: (8, 8)}
    with pytest.raises(UserError, match="mask_head_dilation must be a positive integer, got 0"):
        mask_rcnn(3, **LIGHT, mask_head_dilation=0)


def test_mask_fc_fusion_adds_one_map_that_sees_the_whole_roi(instance_batch) -> None:
    """PANet's fc fusion: the predictor's logits are the conv path's plus one class-agnostic map
    (the same for every class), a corner mask pixel depends on the far corner of the RoI, and
    the model trains (finite mask loss, gradient to the fc) and its fast eval path gives what
    torchvision's plain one does with the same weights."""
    torch.manual_seed(0)
    predictor = MaskPredictor(8, 4, fc_fusion_size=14)
    x = torch.randn(2, 8, 14, 14, requires_grad=True)
    out = predictor(x)
    conv_only = predictor.mask_fcn_logits(predictor.features(x))  # (2, 4, 28, 28)
    extra = out - conv_only
    for k in range(1, 4):
        torch.testing.assert_close(extra[:, k], extra[:, 0])
    torch.testing.assert_close(extra[:, 0], predictor.fused(x))
    out[0, :, 0, 0].sum().backward()
    assert x.grad[0, :, 13, 13].abs().sum() > 0  # the far corner reaches the corner pixel
    with pytest.raises(UserError, match="fc fusion was built for 14 x 14 RoIs, got 7 x 7"):
        predictor(torch.randn(1, 8, 7, 7))
    with pytest.raises(UserError, match="fc_fusion_size must be a positive integer, got 0"):
        MaskPredictor(8, 4, fc_fusion_size=0)

    ds, images, targets = instance_batch
    model = mask_rcnn(ds.categories.num_classes, **LIGHT, mask_fc_fusion=True).train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_mask"])
    losses["loss_mask"].backward()
    assert model.roi_heads.mask_predictor.fc_fusion.fc.weight.grad.abs().sum() > 0
    options = dict(LIGHT, mask_fc_fusion=True, mask_threshold=None, rpn_post_nms_top_n_test=100)
    fast = mask_rcnn(ds.categories.num_classes, fast=True, **options).eval()
    plain = mask_rcnn(ds.categories.num_classes, fast=False, **options).eval()
    plain.load_state_dict(fast.state_dict())
    with torch.inference_mode():
        (got,), (expected,) = fast(images[:1]), plain(images[:1])
    assert len(got["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(got["masks"], expected["masks"], rtol=0, atol=1e-4)


def test_mask_roi_levels_pools_every_mask_roi_from_the_finest_levels(instance_batch) -> None:
    """mask_roi_levels 1: the mask head's input for every RoI, large or small, is RoIAlign on
    the stride-4 level alone (checked against torchvision's roi_align on that map); 2: a RoI
    too large for P3 is clamped to it. The box branch keeps all four levels."""
    ds, images, targets = instance_batch
    torch.manual_seed(0)
    model = mask_rcnn(ds.categories.num_classes, **LIGHT, mask_roi_levels=1).eval()
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0"]
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    image = images[0]
    side = image.shape[-1]
    with torch.inference_mode():
        features = model.backbone(((image - 0.45) / 0.225)[None])
        boxes = [torch.tensor([[2.0, 3.0, 18.0, 21.0], [0.0, 0.0, 300.0, 300.0]])]
        pooled = model.roi_heads.mask_roi_pool(features, boxes, [(side, side)])
        rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)  # (2, 5): image index, box
        expected = torchvision.ops.roi_align(features["0"], rois, (14, 14), 0.25, 2)
        torch.testing.assert_close(pooled, expected)
        two = mask_rcnn(ds.categories.num_classes, **LIGHT, mask_roi_levels=2).eval()
        two.load_state_dict(model.state_dict())
        pooled = two.roi_heads.mask_roi_pool(features, boxes, [(side, side)])
        big = torchvision.ops.roi_align(features["1"], rois[1:], (14, 14), 0.125, 2)
        torch.testing.assert_close(pooled[1:], big)
        every = mask_rcnn(ds.categories.num_classes, **LIGHT).eval()  # torchvision's levels
        every.load_state_dict(model.state_dict())
        pooled = every.roi_heads.mask_roi_pool(features, boxes, [(side, side)])
        big = torchvision.ops.roi_align(features["2"], rois[1:], (14, 14), 0.0625, 2)
        torch.testing.assert_close(pooled[1:], big)
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_mask"])
    for bad in (0, 5, True, 1.5):
        with pytest.raises(UserError, match="mask_roi_levels must be an integer from 1 to 4"):
            mask_rcnn(3, **LIGHT, mask_roi_levels=bad)


def test_class_agnostic_mask_rcnn_fast_path_equals_the_plain_one() -> None:
    """mask_class_agnostic: the fast eval path gives what torchvision's own path does with the
    same weights, and every detection's mask is the one map whatever its label."""
    torch.manual_seed(5)
    options = dict(backbone="resnet18", mask_head_layers=(16,), mask_threshold=None,
                   mask_class_agnostic=True, rpn_post_nms_top_n_test=100, **_rcnn_kwargs(96))
    fast = mask_rcnn(4, fast=True, **options).eval()
    plain = mask_rcnn(4, fast=False, **options).eval()
    plain.load_state_dict(fast.state_dict())
    images = [torch.rand(3, 96, 96)]
    with torch.inference_mode():
        (got,), (expected,) = fast(images), plain(images)
    assert len(got["labels"].unique()) > 1  # several classes: their masks share the one map
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(got["masks"], expected["masks"], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- bfloat16 heads


def _twins(build, **options) -> tuple[nn.Module, nn.Module]:
    """(float32 heads, bfloat16 heads) models with the same weights, in eval mode."""
    torch.manual_seed(6)
    plain = build(head_dtype="float32", **options).eval()
    low = build(head_dtype="bfloat16", **options).eval()
    low.load_state_dict(plain.state_dict())
    return plain, low


def test_bfloat16_mask_head_keeps_boxes_and_scores() -> None:
    """head_dtype bfloat16: the box branch is untouched (identical boxes, labels, scores); the
    mask head runs in bfloat16 (its cached copy), masks close to the float32 ones; a change of
    the weights reaches the copy."""
    plain, low = _twins(mask_rcnn, num_classes=5, backbone="resnet18",
                        mask_head_layers=(32, 32), mask_threshold=None,
                        rpn_post_nms_top_n_test=100, **_rcnn_kwargs(96, detections=30))
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))]

    def compare() -> float:
        with torch.inference_mode():
            (e,), (g,) = plain(images), low(images)
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(g[key], e[key]), key
        assert g["masks"].dtype == torch.float32 and g["masks"].shape == e["masks"].shape
        diff = (g["masks"] - e["masks"]).abs()  # bfloat16 keeps ~3 significant digits
        assert float(diff.mean()) < 2e-3
        inside = e["masks"] > 0  # the boxes' pixels: how many change side at 0.5
        flips = ((g["masks"] >= 0.5) != (e["masks"] >= 0.5)) & inside
        assert float(flips.sum()) <= 0.005 * float(inside.sum())
        return float(diff.max())

    assert compare() > 0  # bfloat16 numbers, not float32's
    copy_ = low.roi_heads.__dict__["_low_precision_copies"]["mask_head"][1]
    assert all(p.dtype == torch.bfloat16 for p in copy_.parameters())
    with torch.no_grad():  # new weights: the copy must follow
        for model in (plain, low):
            model.roi_heads.mask_head[0][0].weight.mul_(-2.0)
    compare()
    assert low.roi_heads.__dict__["_low_precision_copies"]["mask_head"][1] is not copy_


def test_bfloat16_keypoint_head_and_training_unchanged(instance_batch) -> None:
    plain, low = _twins(keypoint_rcnn, num_classes=2, num_keypoints=5, backbone="resnet18",
                        keypoint_head_layers=(32, 32), **_rcnn_kwargs(96, detections=20))
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2))]
    with torch.inference_mode():
        (e,), (g,) = plain(images), low(images)
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(g[key], e[key]), key
    # a heatmap's peak may move to a neighbouring cell where two cells nearly tie
    same = (g["keypoints"] - e["keypoints"]).abs().amax(-1) < 1e-4
    assert float(same.float().mean()) >= 0.9
    torch.testing.assert_close(g["keypoints_scores"], e["keypoints_scores"], rtol=0.05,
                               atol=0.05)
    # training is torchvision's float32 path whatever head_dtype says
    _, images, targets = instance_batch
    plain = mask_rcnn(5, head_dtype="float32", **LIGHT).train()
    low = mask_rcnn(5, head_dtype="bfloat16", **LIGHT).train()
    low.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    expected = plain(images, targets)
    torch.manual_seed(0)
    got = low(images, targets)
    assert {k: float(v.detach()) for k, v in got.items()} == {
        k: float(v.detach()) for k, v in expected.items()}


def test_bad_head_dtype_settings() -> None:
    with pytest.raises(UserError, match="head_dtype"):
        mask_rcnn(3, backbone="resnet18", head_dtype="float16")
    with pytest.raises(UserError, match="head_dtype bfloat16 .* fast"):
        keypoint_rcnn(2, backbone="resnet18", head_dtype="bfloat16", fast=False)


@pytest.mark.parametrize(("fraction", "positives"), [(0.25, 8), (0.75, 24)])
def test_box_positive_fraction_sets_how_many_positives_train_the_heads(
        fraction: float, positives: int) -> None:
    """Of box_batch_size_per_image (32) proposals sampled per image at most fraction x 32 are
    positives: the box classifier's positives and the mask head's training RoIs."""
    for build, extra in ((mask_rcnn, {}), (keypoint_rcnn, {"num_keypoints": 3})):
        model = build(2, backbone="resnet18", box_batch_size_per_image=32,
                      box_positive_fraction=fraction, **extra)
        labels = torch.tensor([1] * 100 + [0] * 100)  # 100 positive, 100 background proposals
        (pos,), (neg,) = model.roi_heads.fg_bg_sampler([labels])
        assert int(pos.sum()) == positives and int(pos.sum() + neg.sum()) == 32
    for bad in (0, 1.5, True):
        with pytest.raises(UserError, match=r"box_positive_fraction must be in \(0, 1\]"):
            mask_rcnn(2, backbone="resnet18", box_positive_fraction=bad)
