"""Mask R-CNN's test-time flip (`rcnn_tta`: mirroring, merging by NMS, mask voting) and the
maskness re-scoring of the fast eval path, checked by hand and against torchvision's NMS."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from pixelwise.errors import UserError
from pixelwise.models.fast_postprocess import mask_maskness
from pixelwise.models.rcnn import mask_rcnn
from pixelwise.models.rcnn_tta import merge_views, mirror_detections
from pixelwise.predict.tta import TTA, apply_tta

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 96
# a small, fast model (the RoI heads' convs dominate the time)
SMALL = dict(backbone="resnet18", mask_head_layers=(16, 16), fpn_channels=32,
             rpn_post_nms_top_n_test=100, min_size=SIZE, max_size=SIZE, box_score_thresh=0.0,
             box_detections_per_img=25)


def _detections(boxes: list[list[float]], labels: list[int], scores: list[float],
                masks: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores), "masks": masks}


def test_mirror_detections_maps_boxes_and_masks_back() -> None:
    masks = torch.zeros(1, 1, 4, 10)
    masks[0, 0, 1, 2] = 1.0
    det = _detections([[1.0, 0.5, 3.0, 2.0]], [1], [0.5], masks)
    back = mirror_detections(det, 10)
    assert torch.equal(back["boxes"], torch.tensor([[7.0, 0.5, 9.0, 2.0]]))
    assert back["masks"][0, 0, 1, 7] == 1 and float(back["masks"].sum()) == 1
    assert torch.equal(back["labels"], det["labels"]) and torch.equal(back["scores"],
                                                                        det["scores"])
    again = mirror_detections(back, 10)  # an involution
    assert torch.equal(again["boxes"], det["boxes"]) and torch.equal(again["masks"], masks)


def test_merge_views_keeps_nms_winners_and_votes_their_masks() -> None:
    """Hand case: A's class-1 box wins NMS over B's near-copy (IoU 0.95) and over a shifted
    class-1 box (IoU 0.6: suppressed, but too far to vote); B's class-2 box on the same spot
    is another class (kept, no vote either way)."""
    ones, zeros = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    a = _detections([[0, 0, 10, 10], [0, 0, 10, 6]], [1, 1], [0.9, 0.7],
                    torch.cat([ones, torch.full((1, 1, 2, 2), 0.25)]))
    b = _detections([[0, 0, 10, 9.5], [0, 0, 10, 10]], [1, 2], [0.6, 0.8],
                    torch.cat([zeros, ones]))
    merged = merge_views([a, b], nms_thresh=0.5, max_detections=10, vote_iou=0.7)
    assert torch.equal(merged["scores"], torch.tensor([0.9, 0.8]))
    assert torch.equal(merged["labels"], torch.tensor([1, 2]))
    # (0.9 x 1 + 0.6 x 0) / (0.9 + 0.6): the shifted box (IoU 0.6) does not vote
    torch.testing.assert_close(merged["masks"][0], torch.full((1, 2, 2), 0.6))
    assert torch.equal(merged["masks"][1], ones[0])
    # a kept detection whose voters all score 0 keeps its own mask
    zero = _detections([[0, 0, 10, 10]], [3], [0.0], torch.full((1, 1, 2, 2), 0.8))
    (kept,) = merge_views([zero], nms_thresh=0.5, max_detections=10)["masks"]
    assert torch.equal(kept, torch.full((1, 2, 2), 0.8))
    # no voting: each kept detection's own mask; max_detections cuts by score
    plain = merge_views([a, b], nms_thresh=0.5, max_detections=1, vote_iou=None)
    assert torch.equal(plain["masks"], ones) and torch.equal(plain["scores"],
                                                               torch.tensor([0.9]))


def test_merge_views_keeps_what_torchvisions_batched_nms_keeps() -> None:
    gen = torch.Generator().manual_seed(0)
    views = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=gen) * 80
        wh = torch.rand(30, 2, generator=gen) * 30 + 2
        views.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(
            1, 4, (30,), generator=gen), "scores": torch.rand(30, generator=gen),
            "masks": torch.rand(30, 1, 8, 8, generator=gen)})
    merged = merge_views(views, nms_thresh=0.5, max_detections=100)
    pooled = {k: torch.cat([v[k] for v in views]) for k in views[0]}
    keep = batched_nms(pooled["boxes"], pooled["scores"], pooled["labels"], 0.5)
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(merged[key], pooled[key][keep]), key
    assert merged["masks"].shape == (len(keep), 1, 8, 8)
    assert float(merged["masks"].min()) >= 0 and float(merged["masks"].max()) <= 1


def test_mask_maskness_by_hand() -> None:
    probs = torch.tensor([[[0.9, 0.6], [0.2, 0.5]], [[0.1, 0.4], [0.0, 0.49]]])
    torch.testing.assert_close(mask_maskness(probs), torch.tensor([(0.9 + 0.6 + 0.5) / 3, 0.0]))


def _image(seed: int) -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_maskness_rescales_scores_and_reorders() -> None:
    """The heads' scores times the RoI masks' maskness ** p, sorted again; boxes unchanged."""
    torch.manual_seed(0)
    plain = mask_rcnn(5, **SMALL).eval()
    scored = mask_rcnn(5, maskness=2.0, **SMALL).eval()
    scored.load_state_dict(plain.state_dict())
    with torch.inference_mode():
        batch, _ = plain.transform([_image(1)])
        features = plain.backbone(batch.tensors)
        proposals, _ = plain.rpn(batch, features)
        (base,), _ = plain.roi_heads(features, proposals, batch.image_sizes)
        (got,), _ = scored.roi_heads(features, proposals, batch.image_sizes)
    assert len(base["scores"]) == SMALL["box_detections_per_img"]
    expected = base["scores"] * mask_maskness(base["masks"]) ** 2
    order = torch.argsort(expected, descending=True, stable=True)
    assert not torch.equal(order, torch.arange(len(order)))  # the order did change
    torch.testing.assert_close(got["scores"], expected[order], rtol=0, atol=0)
    for key in ("boxes", "labels", "masks"):
        assert torch.equal(got[key], base[key][order]), key


def test_bad_maskness_settings() -> None:
    with pytest.raises(UserError, match=r"^maskness must be a power >= 0, got -1$"):
        mask_rcnn(3, maskness=-1, **SMALL)
    with pytest.raises(UserError, match="leave fast on"):
        mask_rcnn(3, maskness=1.0, fast=False, **SMALL)


def _mirrored(det: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return mirror_detections(det, SIZE)


def test_flip_test_merges_both_views_and_is_mirror_equivariant() -> None:
    """The flip test of an image is the merge of its two views (the threshold applied after
    the vote, the model's threshold restored), and that of the mirror image is its mirror."""
    torch.manual_seed(0)
    model = mask_rcnn(5, **SMALL).eval()
    assert apply_tta(model, TTA(flip=True), "instance") is model and model.flip_test
    image = _image(2)
    with torch.inference_mode():
        (got,) = model([image])
        (of_mirror,) = model([image.flip(-1)])
        model.transform.mask_threshold = None
        plain, mirror = model._one_pass([image, image.flip(-1)], None, None)
        model.transform.mask_threshold = 0.5
    assert model.transform.mask_threshold == 0.5
    expected = merge_views([plain, _mirrored(mirror)], nms_thresh=0.5, max_detections=25)
    assert got["masks"].dtype == torch.bool and got["masks"].shape == (25, 1, SIZE, SIZE)
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(got["masks"], expected["masks"] >= 0.5)
    # both views pooled: some kept detections come from each
    from_mirror = torch.isin(got["scores"], mirror["scores"])
    assert bool(from_mirror.any()) and not bool(from_mirror.all())
    # equivariance: the same two views, the other way round
    back = _mirrored(of_mirror)
    torch.testing.assert_close(back["boxes"], got["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(back["scores"], got["scores"])
    assert torch.equal(back["labels"], got["labels"])
    differ = (back["masks"] != got["masks"]).float().mean()
    assert float(differ) < 1e-3  # votes exactly at 0.5 may fall either side
