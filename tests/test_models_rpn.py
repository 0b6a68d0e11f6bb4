"""ParallelRPN: torchvision's proposals, the batch's images filtered on several threads."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from pixelwise.models.rcnn import mask_rcnn
from pixelwise.models.rpn import ParallelRPN
from pixelwise.ops import cpu_threads


pytestmark = pytest.mark.usefixtures("two_threads")


def _rpn(pre_nms: int = 300) -> RegionProposalNetwork:
    torch.manual_seed(0)
    anchors = AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3)
    return RegionProposalNetwork(anchors, RPNHead(8, 3), 0.7, 0.3, 64, 0.5,
                                 {"training": pre_nms, "testing": pre_nms},
                                 {"training": 200, "testing": 100}, 0.7, 0.0)


def _inputs(images: int) -> tuple[ImageList, OrderedDict[str, torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(1)
    batch = ImageList(torch.zeros(images, 3, 128, 128), [(128, 128), (120, 100), (128, 90),
                                                         (96, 128), (128, 128)][:images])
    features = OrderedDict((str(k), torch.randn(images, 8, 32 >> k, 32 >> k, generator=g))
                           for k in range(3))
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 70.0], [60.0, 20.0, 90.0, 40.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(images)]
    return batch, features, targets


@pytest.mark.parametrize("images", [1, 3, 5])
@pytest.mark.parametrize("training", [True, False])
def test_proposals_and_losses_are_torchvisions(images: int, training: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _rpn().train(training)
    parallel = ParallelRPN.like(plain).train(training)
    assert parallel.head is plain.head and parallel.anchor_generator is plain.anchor_generator
    assert parallel.state_dict().keys() == plain.state_dict().keys()
    groups: list[int] = []
    real = cpu_threads.run_split
    monkeypatch.setattr("pixelwise.models.rpn.run_split",
                        lambda fn, chunks: groups.append(len(chunks)) or real(fn, chunks))
    batch, features, targets = _inputs(images)
    ours, our_losses = parallel(batch, features, targets if training else None)
    theirs, their_losses = plain(batch, features, targets if training else None)
    assert len(ours) == images
    for mine, tv in zip(ours, theirs):
        assert torch.equal(mine, tv)
    assert our_losses.keys() == their_losses.keys()
    if training:  # the same sampled anchors: the losses follow the seed, so reseed each run
        torch.manual_seed(3)
        _, first = parallel(batch, features, targets)
        torch.manual_seed(3)
        _, second = plain(batch, features, targets)
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert groups == ([] if images == 1 else [2] * (2 if training else 1))


def test_settings_carry_over_and_bfloat16_autocast_works() -> None:
    plain = _rpn(pre_nms=150)
    parallel = ParallelRPN.like(plain)
    for name in ("_pre_nms_top_n", "_post_nms_top_n", "nms_thresh", "score_thresh",
                 "min_size"):
        assert getattr(parallel, name) == getattr(plain, name), name
    assert parallel.proposal_matcher.high_threshold == 0.7
    assert parallel.proposal_matcher.low_threshold == 0.3
    assert parallel.fg_bg_sampler.batch_size_per_image == 64
    assert parallel.fg_bg_sampler.positive_fraction == 0.5
    batch, features, _ = _inputs(4)
    parallel.eval()
    plain.eval()
    # the worker threads run under the caller's autocast: torchvision's NMS has no bf16 kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = parallel(batch, features)
        theirs, _ = plain(batch, features)
    for mine, tv in zip(ours, theirs):
        assert torch.equal(mine, tv)


def test_rcnn_models_use_it() -> None:
    model = mask_rcnn(3, backbone="resnet18", mask_head_layers=(8,), fast=False)
    assert isinstance(model.rpn, ParallelRPN)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
