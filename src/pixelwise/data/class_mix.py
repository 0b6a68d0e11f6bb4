"""ClassMix: paste the pixels of some classes of one training image onto another.

ClassMix (Olsson et al., WACV 2021) mixes two segmentation samples along their labels: a set of
the classes present in a source image is chosen, their pixels (image and label) replace the
target's, and the mixed label map is exact, with no instance annotations needed. Chosen classes:
half of the source's classes at random (ceil(n / 2) of n), or, when a class
list is given, every listed class the source shows — which is Copy-Paste (Ghiasi et al., CVPR
2021) for semantic maps, e.g. pasting the thing classes of one scene into another.

Small data learns from it because every step shows objects in new contexts and more objects per
image; the labels stay exact. Written here since torchvision's v2 has MixUp / CutMix (for
classification labels) but no label-aware mixing. It is a dataset wrapper rather than a batch
transform so that its randomness is seeded per sample (`pixelwise.engine.loader.SeededDataset`)
like every other augmentation, and resumed runs reproduce it; the cost is one more sample read
per mixed sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from pixelwise.data.transforms import wrap_like
from pixelwise.data.wrapper import DatasetWrapper, pick_partner
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)


def choose_classes(mask: torch.Tensor, *, classes: Sequence[int] | None = None,
                   ignore_index: int | None = 255) -> torch.Tensor:
    """The classes of `mask (H, W)` to paste, as a 1-D tensor: every present class of `classes`
    when given, else ceil(n / 2) of its n present classes drawn at random (`ignore_index` never
    counts)."""
    present = _present(mask)
    if ignore_index is not None:
        present = present[present != ignore_index]
    if classes is not None:
        return present[torch.isin(present, torch.as_tensor(list(classes), dtype=present.dtype))]
    keep = math.ceil(present.numel() / 2)
    return present[torch.randperm(present.numel())[:keep]]


def _present(mask: torch.Tensor) -> torch.Tensor:
    """The distinct labels of `mask`, ascending (bincount: torch.unique sorts every pixel)."""
    labels = mask.as_subclass(torch.Tensor).flatten()  # (H * W,)
    if labels.numel() == 0:
        return labels
    if int(labels.min()) < 0:
        return torch.unique(labels)
    return torch.nonzero(torch.bincount(labels)).flatten()


def paste_classes(image: torch.Tensor, mask: torch.Tensor, source_image: torch.Tensor,
                  source_mask: torch.Tensor, chosen: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`image (C, H, W)` / `mask (H, W)` with the pixels of `source_mask`'s `chosen` classes taken
    from the source (image and label)."""
    labels = source_mask.as_subclass(torch.Tensor)
    chosen = chosen[chosen >= 0]
    if labels.numel() == 0 or chosen.numel() == 0:
        return image, mask
    # a lookup table indexed by label: torch.isin on every pixel is ~4x slower
    table = torch.zeros(max(int(labels.max()), int(chosen.max())) + 1, dtype=torch.bool)
    table[chosen] = True
    where = (labels >= 0) & table[labels.clamp(min=0)]  # (H, W)
    return (wrap_like(torch.where(where, source_image, image), image),
            wrap_like(torch.where(where, source_mask, mask), mask))


def turn_randomly(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`image (C, H, W)` and `mask (H, W)` turned alike by a random symmetry of their rectangle:
    of the square's 8 (rotations by k x 90 degrees, each mirrored or not) when H = W, else of
    the 4 that keep the shape (identity, the two flips, 180 degrees)."""
    square = image.shape[-1] == image.shape[-2]
    quarter_turns = int(torch.randint(4, ())) if square else 2 * int(torch.randint(2, ()))
    mirror = bool(torch.randint(2, ()))
    out = []
    for t in (image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)):
        t = torch.rot90(t, quarter_turns, dims=(-2, -1))
        out.append(t.flip(-1) if mirror else t)
    return wrap_like(out[0], image), wrap_like(out[1], mask)


class ClassMix(DatasetWrapper):
    """Wraps a semantic dataset of `(image (C, H, W), mask (H, W))`; with probability `p` an item
    gets the pixels of some classes of another random item pasted on (see the module docstring).

    classes: class indices to paste (all of those the source shows); None: ClassMix's random
    half of the source's classes. turn: before pasting, turn the source by one of the 8
    symmetries of the square (a random multiple of 90 degrees, mirrored or not; square images;
    non-square ones get one of their 4: the flips), so the pasted pixels land in new places and
    orientations — for classes whose look does not depend on the direction (shapes, cells), not
    for e.g. sky above ground. A source of another size than the item, or a bad (None) sample,
    leaves the item unmixed. Randomness comes from the global torch generator, which
    `SeededDataset` seeds per item.
    """

    def __init__(self, dataset: Dataset, p: float = 0.5, *, classes: Sequence[int] | None = None,
                 ignore_index: int | None = 255, turn: bool = False) -> None:
        if not 0.0 <= p <= 1.0:
            raise UserError(f"class mix probability must be in [0, 1], got {p}")
        if classes is not None and not list(classes):
            raise UserError("class mix: the list of classes to paste is empty")
        super().__init__(dataset)
        self.p = float(p)
        self.classes = None if classes is None else [int(c) for c in classes]
        self.ignore_index = ignore_index
        self.turn = bool(turn)
        self._size_warned = False

    def __getitem__(self, index: int) -> Any:
        sample, source = pick_partner(self.dataset, index, self.p)
        if source is None:
            return sample
        (image, mask), (source_image, source_mask) = sample, source
        if source_mask.shape != mask.shape or source_image.shape != image.shape:
            if not self._size_warned:
                logger.warning("class mix skips pairs of images of different sizes (pass --size "
                               "to mix every pair)")
                self._size_warned = True
            return sample
        if self.turn:
            source_image, source_mask = turn_randomly(source_image, source_mask)
        chosen = choose_classes(source_mask, classes=self.classes, ignore_index=self.ignore_index)
        return paste_classes(image, mask, source_image, source_mask, chosen)
