"""Simple Copy-Paste for instance segmentation: paste the objects of one training image onto
another (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance
Segmentation", CVPR 2021).

A random subset of the source's objects (each kept with probability 1/2, at least one) is
pasted, image pixels and masks, at a random offset: a source larger than the target is cut to
a random window of it, a smaller one lands at a random place. The target's own objects lose the
pixels now covered: their masks shrink, their boxes are recomputed from what is left, and an
object left with fewer than `min_area` pixels is dropped, as in the paper. Both samples arrive
already augmented (random scale, flip: the paper's scale jitter of both images). Boxes follow
the COCO convention of the datasets (exclusive right / bottom edges: the last pixel + 1).

Written here because torchvision's v2 transforms have no instance-aware pasting (MMDetection's
`CopyPaste` and Ultralytics' `copy_paste` play this role there). Like `ClassMix` it is a
dataset wrapper, so its randomness is seeded per sample (`SeededDataset`) and resumed runs
reproduce it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from pixelwise.data.transforms import mask_boxes, wrap_like
from pixelwise.data.wrapper import DatasetWrapper, pick_partner
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

# per-object fields of a target that copy-paste knows how to carry over
_OBJECT_FIELDS = ("boxes", "labels", "masks", "iscrowd", "area")


def _place(size: int, source_size: int) -> tuple[int, int, int]:
    """A random offset of a source side on a target side: (target start, source start,
    length) of the overlap."""
    if source_size <= size:
        offset = int(torch.randint(size - source_size + 1, ()))
        return offset, 0, source_size
    start = int(torch.randint(source_size - size + 1, ()))
    return 0, start, size


def paste_objects(image: torch.Tensor, target: dict[str, Any], source_image: torch.Tensor,
                  source_target: dict[str, Any], *, min_area: int = 1
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`image (C, H, W)` / `target` with a random subset of `source_target`'s objects pasted
    at a random offset (see the module docstring); other target fields are kept as they are.
    The source's objects must not be crowd regions to be chosen (crowds are never pasted)."""
    h, w = image.shape[-2:]
    source_masks = source_target["masks"].as_subclass(torch.Tensor)  # (Ns, Hs, Ws)
    candidates = torch.nonzero(source_target["iscrowd"] == 0).flatten()
    if candidates.numel() == 0:
        return image, target
    keep = candidates[torch.rand(candidates.numel()) < 0.5]
    if keep.numel() == 0:
        keep = candidates[torch.randint(candidates.numel(), (1,))]
    ty, sy, lh = _place(h, source_masks.shape[-2])
    tx, sx, lw = _place(w, source_masks.shape[-1])
    pasted = torch.zeros((keep.numel(), h, w), dtype=torch.uint8)  # (K, H, W)
    pasted[:, ty:ty + lh, tx:tx + lw] = source_masks[keep, sy:sy + lh, sx:sx + lw]
    visible = pasted.flatten(1).sum(1) >= min_area  # (K,) objects that stay in the window
    keep, pasted = keep[visible], pasted[visible]
    if keep.numel() == 0:
        return image, target
    covered = pasted.bool().any(0)  # (H, W)
    window = torch.zeros((image.shape[0], h, w), dtype=image.dtype)
    window[:, ty:ty + lh, tx:tx + lw] = source_image.as_subclass(torch.Tensor)[
        :, sy:sy + lh, sx:sx + lw]
    new_image = torch.where(covered, window, image.as_subclass(torch.Tensor))

    own = target["masks"].as_subclass(torch.Tensor)  # (N, H, W)
    shrunk = own * (~covered).to(own.dtype)  # (N, H, W) what stays visible
    areas = shrunk.flatten(1).sum(1)  # (N,)
    changed = areas < own.flatten(1).sum(1)
    stays = areas >= min_area
    boxes = target["boxes"].as_subclass(torch.Tensor).clone()  # (N, 4)
    if bool((changed & stays).any()):
        boxes[changed & stays] = mask_boxes(shrunk[changed & stays])
    area = target["area"].clone()
    area[changed] = areas[changed].to(area.dtype)

    out = dict(target)
    out["masks"] = tv_tensors.Mask(torch.cat([shrunk[stays], pasted]))  # (N' + K, H, W)
    out["boxes"] = tv_tensors.BoundingBoxes(
        torch.cat([boxes[stays], mask_boxes(pasted)]), format=tv_tensors.BoundingBoxFormat.XYXY,
        canvas_size=(h, w))
    out["labels"] = torch.cat([target["labels"][stays], source_target["labels"][keep]])
    out["iscrowd"] = torch.cat([target["iscrowd"][stays], source_target["iscrowd"][keep]])
    out["area"] = torch.cat([area[stays], pasted.flatten(1).sum(1).to(area.dtype)])
    return wrap_like(new_image, image), out


class CopyPaste(DatasetWrapper):
    """Wraps an instance dataset of `(image (C, H, W), target)` with masks; with probability
    `p` an item gets some objects of another random item pasted on (`paste_objects`). A bad
    (None) source leaves the item as it is. Randomness comes from the global torch generator,
    which `SeededDataset` seeds per item."""

    def __init__(self, dataset: Dataset, p: float = 0.5, *, min_area: int = 1) -> None:
        if not 0.0 <= p <= 1.0:
            raise UserError(f"copy-paste probability must be in [0, 1], got {p}")
        super().__init__(dataset)
        self.p = float(p)
        self.min_area = int(min_area)

    def __getitem__(self, index: int) -> Any:
        sample, source = pick_partner(self.dataset, index, self.p)
        if source is None or "masks" not in sample[1] or "masks" not in source[1]:
            return sample
        if "keypoints" in sample[1]:
            raise UserError("copy-paste pastes masks, not keypoints (instance task only)")
        return paste_objects(*sample, *source, min_area=self.min_area)
