"""torchvision's region proposal network with its proposal filtering split between CPU threads.

torchvision's `RegionProposalNetwork.filter_proposals` handles a batch one image after another,
and its NMS (`torchvision.ops.nms`, the largest part: one call per FPN level and image over up to
`pre_nms_top_n` boxes) runs on one thread. Each image's proposals depend on that image alone
(its own top-k per level, clipping, thresholds and NMS), so `ParallelRPN` splits the batch into
one contiguous group of images per torch thread and filters each group with torchvision's own
method on a thread of `pixelwise.ops.cpu_threads`: the proposals and scores are exactly
torchvision's. In the recipe's Mask R-CNN training step (4 images of 256 x 256, 2 threads) the
RPN's NMS took ~60 ms of the ~0.2 s forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork

from pixelwise.ops.cpu_threads import parts_for, run_split


class ParallelRPN(RegionProposalNetwork):
    """`RegionProposalNetwork` (the same modules, settings and state dict) whose
    `filter_proposals` runs one group of images per torch thread on CPU."""

    @classmethod
    def like(cls, rpn: RegionProposalNetwork) -> ParallelRPN:
        """A `ParallelRPN` with `rpn`'s anchor generator, head and settings."""
        matcher, sampler = rpn.proposal_matcher, rpn.fg_bg_sampler
        return cls(rpn.anchor_generator, rpn.head, matcher.high_threshold,
                   matcher.low_threshold, sampler.batch_size_per_image,
                   sampler.positive_fraction, dict(rpn._pre_nms_top_n),
                   dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor,
                         image_shapes: list[tuple[int, int]], num_anchors_per_level: list[int]
                         ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's result: per image (P, 4) boxes and (P,) objectness probabilities."""
        num_images = proposals.shape[0]
        parts = parts_for(num_images, 1)
        if proposals.device.type != "cpu" or parts < 2:
            return super().filter_proposals(proposals, objectness, image_shapes,
                                            num_anchors_per_level)
        per_image = objectness.detach().reshape(num_images, -1)  # (N * A, 1) -> (N, A)
        groups = [index.tolist() for index in torch.arange(num_images).chunk(parts)]

        def filter_group(images: list[int]) -> tuple[list[Tensor], list[Tensor]]:
            first, end = images[0], images[-1] + 1
            return super(ParallelRPN, self).filter_proposals(
                proposals[first:end], per_image[first:end], image_shapes[first:end],
                num_anchors_per_level)
        results = run_split(filter_group, groups)
        return ([b for boxes, _ in results for b in boxes],
                [s for _, scores in results for s in scores])
