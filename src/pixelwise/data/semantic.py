"""The semantic segmentation dataset: pixelwise layout, PASCAL VOC, or explicit file lists.

Each sample is ``(image, mask)``: `tv_tensors.Image` float32 `(C, H, W)` in [0, 1] (C = 1 for
grayscale, 3 for colour) and `tv_tensors.Mask` `(H, W)` int64 of class indices, with the
dataset's ignore index (255 by default) where no class applies. `transforms` (a torchvision
``transforms.v2`` callable) receives and returns the pair, so geometry moves both.

A bad sample (unreadable file, mask size differing from the image, label values outside the
classes) is refused with the message `pixelwise data check` prints for it; with
``skip_bad=True`` it is logged and ``__getitem__`` returns None instead: wrap the DataLoader's
collate function with `pixelwise.data.check.skip_none` to drop those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torchvision import tv_tensors

from pixelwise.data.check import mask_problems, refuse_or_skip
from pixelwise.data.images import DEFAULT_MAX_PIXELS, image_to_float, read_image, read_label_png
from pixelwise.data.layout import (
    DEFAULT_IGNORE_INDEX,
    BadFileError,
    Classes,
    Problem,
    detect_layout,
    semantic_pairs,
)
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

Transforms = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


class SemanticDataset(torch.utils.data.Dataset):
    """Images with semantic masks from a dataset folder (pixelwise or VOC layout, detected).

    root: the dataset folder; split: e.g. "train" or "val" (`UserError` listing the splits
    found when absent). Classes come from classes.json (pixelwise layout) or are VOC's 21.
    Attributes: `samples` (list of (image path, mask path)), `classes` (`Classes`),
    `class_names`, `num_classes`, `ignore_index`. cache: keep every sample read, as stored
    (uint8 images: H x W x (C + 1) bytes each), so that later epochs skip decoding and checking
    the files (Ultralytics' ``cache=ram``); the transforms still run on every read.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transforms | None = None,
        skip_bad: bool = False,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        cache: bool = False,
    ) -> None:
        layout = detect_layout(root)
        split_layout = layout.split(split)
        if not split_layout.has_masks:
            raise UserError(f"{split_layout.masks_dir}: folder not found; {layout.root} has no "
                            f"semantic masks for split {split!r}")
        classes = layout.classes()
        if classes is None:
            raise UserError(f"{layout.root / 'classes.json'}: not found; a semantic dataset "
                            "needs its class names")
        pairs, problems = semantic_pairs(split_layout)
        self._setup(pairs, problems, classes, transforms, skip_bad, max_pixels, cache)
        logger.debug("%s split %r: %d samples", layout.root, split, len(self.samples))

    @classmethod
    def from_files(
        cls,
        images: Sequence[str | Path],
        masks: Sequence[str | Path],
        classes: Sequence[str] | Classes | None = None,
        *,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        transforms: Transforms | None = None,
        skip_bad: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        cache: bool = False,
    ) -> SemanticDataset:
        """A dataset from explicit, paired lists of image and mask files (any folders).

        classes: class names (index = label value) or a `Classes`; None skips the label-range
        check (the number of classes is then unknown: `num_classes` is None).
        """
        if len(images) != len(masks):
            raise UserError(f"{len(images)} image files but {len(masks)} mask files; they pair "
                            "up one to one")
        if classes is not None and not isinstance(classes, Classes):
            classes = Classes(tuple(classes), ignore_index)
        pairs, problems = [], []
        for image, mask in zip(images, masks):
            missing = [Path(p) for p in (image, mask) if not Path(p).is_file()]
            problems += [Problem(p, "file not found") for p in missing]
            if not missing:
                pairs.append((Path(image), Path(mask)))
        dataset = cls.__new__(cls)
        dataset._setup(pairs, problems, classes, transforms, skip_bad, max_pixels, cache)
        return dataset

    def _setup(self, pairs, problems, classes, transforms, skip_bad, max_pixels,
               cache=False) -> None:
        refuse_or_skip(problems, skip_bad=skip_bad)  # raises unless skip_bad
        self.samples: list[tuple[Path, Path]] = list(pairs)
        self.classes: Classes | None = classes
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        # index -> (image as stored (C, H, W) uint8/16, mask (H, W) narrowest int), or None for a
        # skipped bad sample; each DataLoader worker fills its own copy
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] | None = (
            {} if cache else None)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.classes.names if self.classes else None

    @property
    def num_classes(self) -> int | None:
        return self.classes.num_classes if self.classes else None

    @property
    def ignore_index(self) -> int:
        return self.classes.ignore_index if self.classes else DEFAULT_IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image (C, H, W) float32, mask (H, W) int64), or None for a skipped bad sample."""
        if self._cache is not None and index in self._cache:
            read = self._cache[index]
        else:
            read = self._read(index)
            if self._cache is not None:
                self._cache[index] = None if read is None else (read[0], _narrow(read[1]))
        if read is None:
            return None
        image, mask = read
        pair = (tv_tensors.Image(image_to_float(image)), tv_tensors.Mask(mask.long()))
        if self.transforms is not None:
            pair = self.transforms(*pair)
        return pair

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The checked image (as stored) and mask (int64) of sample `index`; None when bad and
        skipped (`UserError` when bad and not)."""
        image_path, mask_path = self.samples[index]
        try:
            image = read_image(image_path, max_pixels=self.max_pixels)
            mask = read_label_png(mask_path, max_pixels=self.max_pixels)
        except BadFileError as exc:
            problems = [exc.problem]
        else:
            problems = mask_problems(mask, tuple(image.shape[-2:]), mask_path, self.classes)
        if not refuse_or_skip(problems, skip_bad=self.skip_bad):
            return None
        return image, mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes, "
                f"ignore_index={self.ignore_index})")


def _narrow(mask: torch.Tensor) -> torch.Tensor:
    """`mask` as uint8 when its labels fit (a quarter of int64's memory in the cache)."""
    if mask.numel() and int(mask.min()) >= 0 and int(mask.max()) <= 255:
        return mask.to(torch.uint8)
    return mask
