"""A second-stage classifier of predicted instances: the class from the object's mask and image.

SOLOv2 decides an object's class in the grid cell at its centre, from the category branch's
view of that cell's neighbourhood. On pixelwise's synthetic shapes, whose classes differ only in
outline (colours and textures are random), a trained SOLOv2's masks were right far more often
than its classes: class-agnostic segm AP50 0.79 against 0.62 with classes; 39 % of its
detections that matched an object (mask IoU >= 0.5) had the wrong class. `MaskClassifier` looks
at the whole object instead: the predicted mask and the image, both cropped around the mask's
box (plus a margin) and resized to R x R by `torchvision.ops.roi_align`, through a small CNN
-> K class logits. It is a pixelwise addition, not part of the paper (compare Mask Scoring
R-CNN's head that reads a predicted mask with the features). SOLOv2 trains it on its own
predicted masks (detached, so it never changes them), Mask R-CNN on the ground-truth masks;
`SOLOv2` and `rcnn.MaskRCNN` say how they use it.

Layout of the CNN for widths (w0, w1, ..., wn): a 3x3 conv to w0 at R x R, then per further width
a stride-2 3x3 conv and a 3x3 conv, then a stride-2 3x3 conv, global average pooling and a linear
layer. Each conv is followed by BatchNorm and ReLU: SOLOv2's GroupNorm with 32 groups would be
one channel per group at width 32 (each crop's channels normalised on their own); a first joint
trial with it, without the symmetries below, ended at a training cross-entropy of 0.55. In
training each crop is turned by a random symmetry of the square (flips, transposition): a
shape's class does not depend on its orientation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align

from pixelwise.errors import UserError


def top_k_classes(probabilities: torch.Tensor, scores: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each of D detections once per one of its `k` most probable classes.

    probabilities: (D, K) the classifier's softmax; scores: (D,) the first stage's scores.
    Returns (k*D,) each: the detection's index, its label 1..K and score x probability, every
    detection's best class first (then every second best, ...)."""
    top, classes = probabilities.topk(k, dim=1)  # (D, k) each
    index = torch.arange(len(scores), device=scores.device).repeat(k)  # (k*D,)
    labels = classes.T.reshape(-1) + 1  # (k, D) -> (k*D,)
    new_scores = (scores[None] * top.T.to(scores.dtype)).reshape(-1)  # (k, D) -> (k*D,)
    return index, labels, new_scores


def crop_inputs(images: torch.Tensor, image_index: torch.Tensor, masks: torch.Tensor,
                boxes: torch.Tensor, *, stride: int, size: int, margin: float) -> torch.Tensor:
    """The classifier's inputs: image and mask crops, (M, C + 1, size, size).

    images: (N, C, H, W); image_index: (M,) the image of each instance; masks: (M, h, w)
    probabilities at 1/stride of the images' resolution; boxes: (M, 4) XYXY in mask pixels.
    Each box grows by `margin` of its width / height on every side (the outline's context).
    """
    boxes = boxes.to(torch.float32)
    grow = (boxes[:, 2:] - boxes[:, :2]) * margin  # (M, 2) width, height
    grown = torch.cat([boxes[:, :2] - grow, boxes[:, 2:] + grow], dim=1)  # (M, 4)
    index = torch.arange(len(masks), device=masks.device, dtype=torch.float32)[:, None]
    mask_rois = torch.cat([index, grown], dim=1)  # (M, 5): own mask, box in mask pixels
    image_rois = torch.cat([image_index.to(torch.float32)[:, None], grown * stride], dim=1)
    mask_crops = roi_align(masks[:, None].to(torch.float32), mask_rois, size, 1.0, 2,
                           aligned=True)  # (M, 1, size, size)
    image_crops = roi_align(images.to(torch.float32), image_rois, size, 1.0, 2,
                            aligned=True)  # (M, C, size, size)
    return torch.cat([image_crops, mask_crops], dim=1)


class MaskClassifier(nn.Module):
    """Class logits (M, K) of instances from their image crop and predicted mask.

    Args:
        in_channels: image channels C (the crops have C + 1 with the mask).
        num_things: K, classes without the background.
        size: R, the crops' side; widths: the CNN's widths (see the module docstring).
        margin: context around the mask's box, a fraction of its width / height per side.
    """

    def __init__(self, in_channels: int, num_things: int, *, size: int = 32,
                 widths: Sequence[int] = (32, 64, 128), margin: float = 0.15) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise UserError(f"mask classifier: widths must be positive integers, got "
                            f"{list(widths)}")
        if not isinstance(size, int) or size < 2 ** len(widths):
            raise UserError(f"mask classifier: size must be an integer >= {2 ** len(widths)} "
                            f"for {len(widths)} widths, got {size!r}")
        if not 0 <= margin <= 1:
            raise UserError(f"mask classifier: margin must be in [0, 1], got {margin!r}")
        self.size, self.margin = size, float(margin)
        layers = [_conv_bn_relu(in_channels + 1, widths[0])]
        for previous, width in zip(widths, widths[1:]):
            layers += [_conv_bn_relu(previous, width, stride=2), _conv_bn_relu(width, width)]
        layers.append(_conv_bn_relu(widths[-1], widths[-1], stride=2))
        self.features = nn.Sequential(*layers)
        self.classify = nn.Linear(widths[-1], num_things)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classify.weight, std=0.01)
        nn.init.zeros_(self.classify.bias)

    def forward(self, images: torch.Tensor, image_index: torch.Tensor, masks: torch.Tensor,
                boxes: torch.Tensor, *, stride: int, symmetries: bool = False) -> torch.Tensor:
        """Logits (M, K); arguments as `crop_inputs` (masks are not differentiated).

        `symmetries` (eval only, test-time augmentation): the log of the class probabilities
        averaged over the crop's 8 symmetries, in place of logits (its softmax is that mean)."""
        crops = crop_inputs(images, image_index, masks.detach(), boxes, stride=stride,
                            size=self.size, margin=self.margin)  # (M, C + 1, R, R)
        crops = crops.to(self.classify.weight.dtype)
        if self.training:
            crops = random_symmetry(crops)
        elif symmetries:
            views = torch.cat([square_symmetry(crops, k) for k in range(8)])  # (8M, C + 1, R, R)
            logits = self.classify(self.features(views).mean(dim=(2, 3)))  # (8M, K)
            probs = logits.float().softmax(1).reshape(8, len(crops), -1)  # (8, M, K)
            return probs.mean(0).clamp_min(torch.finfo(probs.dtype).tiny).log()  # (M, K)
        return self.classify(self.features(crops).mean(dim=(2, 3)))  # (M, w) -> (M, K)


def square_symmetry(crops: torch.Tensor, k: int) -> torch.Tensor:
    """(M, C, R, R) crops under the square's symmetry k in 0..7: bit 0 flips left-right,
    bit 1 up-down, bit 2 transposes (applied in that order)."""
    if k & 1:
        crops = crops.flip(-1)
    if k & 2:
        crops = crops.flip(-2)
    return crops.transpose(-1, -2) if k & 4 else crops



def random_symmetry(crops: torch.Tensor) -> torch.Tensor:
    """Each (C, R, R) crop of (M, C, R, R) under one of the square's 8 symmetries, at random."""
    pick = torch.randint(0, 8, (len(crops), 1, 1, 1), device=crops.device)  # (M, 1, 1, 1)
    crops = torch.where(pick % 2 == 1, crops.flip(-1), crops)
    crops = torch.where(pick // 2 % 2 == 1, crops.flip(-2), crops)
    return torch.where(pick // 4 == 1, crops.transpose(-1, -2), crops)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
