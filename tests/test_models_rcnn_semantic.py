"""Mask R-CNN's auxiliary semantic branch (`pixelwise.models.rcnn_semantic`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.models import build_model
from pixelwise.models.rcnn_semantic import instance_semantic_target, rescore_with_semantic
from pixelwise.models.semantic_fpn_head import VOID


def _box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_semantic_target_by_hand() -> None:
    masks = torch.stack([_box_mask(4, 5, 0, 2, 0, 3),   # label 1
                         _box_mask(4, 5, 1, 3, 2, 5),   # label 2, over the first
                         _box_mask(4, 5, 2, 4, 0, 5)])  # crowd: void where nothing else is
    target = {"masks": masks, "labels": torch.tensor([1, 2, 1]),
              "iscrowd": torch.tensor([0, 0, 1])}
    v = VOID
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 1, 2, 2, 2],
                             [v, v, 2, 2, 2],
                             [v, v, v, v, v]])
    assert torch.equal(instance_semantic_target(target, (4, 5)), expected)
    # no iscrowd field: all instances are things
    del target["iscrowd"]
    assert int(instance_semantic_target(target, (4, 5))[3, 0]) == 1
    with pytest.raises(UserError, match="masks of shape"):
        instance_semantic_target(target, (4, 6))


def test_rescore_by_hand() -> None:
    probs = torch.zeros(3, 4, 4)
    probs[1] = 0.25
    probs[2, :2] = 1.0  # class 2 everywhere in the top half, class 1 a quarter everywhere
    masks = torch.stack([_box_mask(4, 4, 0, 2, 0, 4),   # top half
                         _box_mask(4, 4, 1, 3, 0, 2),   # half in the top half
                         torch.zeros(4, 4, dtype=torch.uint8)]).bool()[:, None]
    det = {"boxes": torch.tensor([[0., 0, 4, 2], [0, 1, 2, 3], [0.5, 0, 1.5, 1]]),
           "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.9, 0.4, 0.1]),
           "masks": masks}
    out = rescore_with_semantic(det, probs, 0.5)
    # q: 0.25 (class 1 over the top half), 0.5 (half of the mask in the top half), and for the
    # empty mask its box, rows 0-1 x cols 0-1 (integer pixels covering [0.5, 1.5] x [0, 1]): 1
    expected = torch.tensor([0.9 ** 0.5 * 0.25 ** 0.5, 0.4 ** 0.5 * 0.5 ** 0.5, 0.1 ** 0.5])
    order = torch.argsort(expected, descending=True)
    assert torch.allclose(out["scores"], expected[order])
    assert torch.equal(out["labels"], det["labels"][order])
    assert torch.equal(out["boxes"], det["boxes"][order])
    assert torch.equal(out["masks"], det["masks"][order])
    assert rescore_with_semantic(det, probs, 0.0) is det
    # probability masks: the same, and the empty one is not overwritten by its box
    soft = {**det, "masks": det["masks"].float()}
    out = rescore_with_semantic(soft, probs, 0.5)
    assert torch.allclose(out["scores"], expected[order])
    assert float(soft["masks"][2].sum()) == 0.0
    with pytest.raises(UserError, match="in \\[0, 1\\]"):
        rescore_with_semantic(det, probs, 1.5)


def _model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"semantic_channels": 16, **options}
    return build_model("mask_rcnn", 3, backbone="resnet18", fpn_channels=32,
                       mask_head_layers=[16], rpn_post_nms_top_n_train=50,
                       box_batch_size_per_image=16, **options)


def _batch() -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    masks = torch.stack([_box_mask(64, 80, 10, 30, 10, 40), _box_mask(64, 80, 20, 50, 30, 70)])
    target = {"boxes": torch.tensor([[10., 10, 40, 30], [30, 20, 70, 50]]),
              "labels": torch.tensor([1, 2]), "masks": masks, "iscrowd": torch.tensor([0, 1])}
    return images, [target, dict(target)]


def test_training_adds_the_weighted_semantic_loss() -> None:
    model = _model(aux_semantic=0.5)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg", "loss_semantic"}
    # the same loss from the head's own output (train-mode BatchNorm: the same batch statistics)
    batch = model.transform(images)[0].tensors  # (2, 3, 64, 96): padded to a multiple of 32
    logits = model.semantic_head(model.backbone(batch), batch.shape[-2:])[..., :80]
    labels = torch.stack([instance_semantic_target(t, (64, 80)) for t in targets])
    assert int((labels == VOID).sum()) > 0
    reference = F.cross_entropy(logits, labels, ignore_index=VOID)
    assert torch.allclose(losses["loss_semantic"], 0.5 * reference, atol=1e-6)
    sum(losses.values()).backward()
    assert model.semantic_head.predictor.weight.grad.abs().sum() > 0
    assert len(_model()(images, targets)) == 5  # no branch, no loss_semantic


def test_eval_rescore_keeps_the_detections_and_reorders_them() -> None:
    model = _model(aux_semantic=1.0, semantic_rescore=0.5).eval()
    images, _ = _batch()
    with torch.no_grad():
        rescored = model(images)
        model.semantic_rescore = 0.0
        plain = model(images)
    for new, old in zip(rescored, plain):
        assert len(new["scores"]) == len(old["scores"]) > 0
        assert torch.all(new["scores"][:-1] >= new["scores"][1:])
        pairs = {(tuple(b.tolist()), int(c)) for b, c in zip(new["boxes"], new["labels"])}
        assert pairs == {(tuple(b.tolist()), int(c)) for b, c in zip(old["boxes"], old["labels"])}
        assert not torch.allclose(new["scores"].sort().values, old["scores"].sort().values)


def test_bad_semantic_options() -> None:
    with pytest.raises(UserError, match="needs the semantic branch"):
        _model(semantic_rescore=0.5)
    with pytest.raises(UserError, match="aux_semantic must be a weight"):
        _model(aux_semantic=-1)
    with pytest.raises(UserError, match="semantic_rescore must be in"):
        _model(aux_semantic=1, semantic_rescore=2)
    with pytest.raises(UserError, match="semantic_channels"):
        _model(aux_semantic=1, semantic_channels=0)
