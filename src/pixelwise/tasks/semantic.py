"""The semantic segmentation task: data, loss terms and evaluation for the trainer.

The model maps images `(N, C, H, W)` to logits `(N, K, H, W)`; the task turns a batch into a
dict of loss terms (`"ce"`, `"dice"`, `"focal"`, as chosen by `loss="ce+dice"`) and evaluates
with `pixelwise.metrics.semantic.SemanticMetrics`, summing the confusion matrix over DDP ranks.

`loss_at="net"`: a model that runs on a k-times smaller map of the image (`unet` with
`input_scale` 1/k) is trained on its own logits against each k x k block's label counts
(`pixelwise.tasks.losses.area_targets`: the loss of the block's logits repeated over its
pixels), not on its logits upsampled to every pixel: the upsampling, softmax and loss at full
resolution were ~40 % of such a step on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from pixelwise.engine.distributed import all_reduce_sum
from pixelwise.errors import UserError, unknown_name
from pixelwise.ops.labels import argmax_labels
from pixelwise.tasks.losses import area_targets, make_losses

logger = logging.getLogger(__name__)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or torchvision's `{"out": ...}`."""
    if isinstance(output, dict):
        return output["out"]
    return output


def match_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The part of `target (N, H, W)` the logits `(N, K, h, w)` cover: itself when the sizes agree,
    the centre crop when the model outputs less than its input (U-Net with `padding="valid"`)."""
    h, w = logits.shape[-2:]
    big_h, big_w = target.shape[-2:]
    if (h, w) == (big_h, big_w):
        return target
    if h <= big_h and w <= big_w and (big_h - h) % 2 == 0 and (big_w - w) % 2 == 0:
        top, left = (big_h - h) // 2, (big_w - w) // 2
        return target[..., top:top + h, left:left + w]
    raise UserError(
        f"model output {h}x{w} does not fit target {big_h}x{big_w} (expected equal sizes, or a "
        "centred crop for valid convolutions)"
    )


LOSS_AT = ("image", "net")


@contextlib.contextmanager
def coarse_logits(model: nn.Module) -> Iterator[int]:
    """Within it, a model with a `coarse_output` switch (`UNet`; also inside DDP) returns its
    logits at its own resolution; yields the factor k its output is smaller than the image
    (1 for any other model, which is left as it is)."""
    net = getattr(model, "module", model)  # DistributedDataParallel -> the model
    factor = int(getattr(net, "input_factor", 1))
    if factor == 1 or not hasattr(net, "coarse_output"):
        yield 1
        return
    net.coarse_output = True
    try:
        yield factor
    finally:
        net.coarse_output = False


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `(image (C, H, W), mask (H, W))` pairs into `(N, C, H, W)` and `(N, H, W)` tensors."""
    sizes = {tuple(image.shape) for image, _ in samples}
    if len(sizes) > 1:
        listed = ", ".join("x".join(map(str, s)) for s in sorted(sizes))
        raise UserError(f"images of one batch differ in size ({listed}); pass --size HxW")
    images, masks = default_collate(samples)
    return images.as_subclass(torch.Tensor), masks.as_subclass(torch.Tensor).long()


class SemanticTask:
    """Per-pixel classification into `num_classes` classes.

    Args:
        num_classes: K, the number of model outputs.
        class_names: K names (metrics' `per_class` keys).
        ignore_index: target value of unlabelled pixels (not counted in loss or metrics).
        loss: loss terms joined by `+`, names from `pixelwise.tasks.losses.LOSSES`.
        class_weights: K weights for every loss term.
        class_colors: K display colours (r, g, b) from the dataset's classes.json, or None (the
            default palette, `pixelwise.viz.make_palette`).
        loss_at: "image": the loss on logits at the labels' resolution (default); "net": on a
            coarse model's own logits, against label counts (see the module docstring).
    """

    name = "semantic"
    best_metric = "miou"  # evaluate() key deciding the `best` checkpoint (higher is better)

    def __init__(
        self,
        num_classes: int,
        *,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = 255,
        loss: str = "ce",
        class_weights: Sequence[float] | None = None,
        class_colors: Sequence[Sequence[int]] | None = None,
        loss_at: str = "image",
    ) -> None:
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}")
        if loss_at not in LOSS_AT:
            raise unknown_name("loss_at", loss_at, LOSS_AT)
        self.loss_at = loss_at
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = ignore_index
        self.loss_spec = loss
        self.class_weights = list(class_weights) if class_weights is not None else None
        self.class_colors = None
        if class_colors is not None:  # checked (K x (r, g, b) in 0..255) by the palette builder
            from pixelwise.viz import class_palette

            self.class_colors = class_palette(self.num_classes, class_colors).tolist()
        self.losses = make_losses(loss, ignore_index=ignore_index, class_weights=class_weights,
                                  num_classes=self.num_classes)

    @classmethod
    def from_data(cls, root: str | Path, **options: Any) -> "SemanticTask":
        """The task for the dataset at `root` (classes and ignore index from its classes.json)."""
        from pixelwise.data.layout import detect_layout

        layout = detect_layout(root)
        classes = layout.classes()
        if classes is None:
            raise UserError(f"{root}: no classes.json (needed for semantic segmentation)")
        return cls(classes.num_classes, class_names=list(classes.names),
                   ignore_index=classes.ignore_index, class_colors=classes.colors, **options)

    def config(self) -> dict[str, Any]:
        """JSON settings; `SemanticTask(**config minus "name")` rebuilds the task."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "ignore_index": self.ignore_index,
            "loss": self.loss_spec,
            "class_weights": self.class_weights,
            "class_colors": self.class_colors,
            "loss_at": self.loss_at,
        }

    def check_data(self, root: str | Path) -> None:
        """A one-line `UserError` when the dataset's classes differ from this task's."""
        other = SemanticTask.from_data(root)
        if other.num_classes != self.num_classes:
            raise UserError(
                f"the model has {self.num_classes} classes but {root} has {other.num_classes} "
                f"({', '.join(other.class_names or [])})"
            )
        if self.class_names and other.class_names and other.class_names != self.class_names:
            logger.warning("class names differ: model %s, data %s", self.class_names,
                           other.class_names)

    def dataset(self, root: str | Path, split: str, *, size: tuple[int, int] | None = None,
                train: bool = False, skip_bad: bool = False,
                crop: tuple[int, int] | None = None, crop_balance: float = 0.0,
                scale: tuple[float, float] | None = None, rotate: float = 0.0,
                jitter: float = 0.0, class_mix: float = 0.0,
                mix_classes: Sequence[str] | None = None, mix_turn: bool = False,
                cache: bool = False) -> Dataset:
        """The `split` of the dataset at `root`, resized to `size` (H, W) when given (masks by
        nearest-exact). Training adds, in this order: a random rescale by a factor in `scale`
        (then cut back to `crop` or `size`, one of which it needs); a random `crop` (H, W) when
        given (an image smaller than it is padded: image 0, mask ignore; with probability
        `crop_balance` centred on a pixel of a class drawn uniformly among the image's, see
        `ClassBalancedCrop`); a random rotation within +-`rotate` degrees (corners: image 0,
        mask ignore); a horizontal flip; photometric jitter of strength `jitter` (brightness,
        contrast, saturation; hue a quarter of it); then, with probability `class_mix`, the
        pixels of some classes of another training image pasted on (`pixelwise.data.class_mix`:
        a random half of its classes, or every class named in `mix_classes`; `mix_turn`: that
        image turned by a random symmetry of the square first). `cache`: keep the
        decoded files in memory (`SemanticDataset`). `skip_bad`: a bad sample is logged and read
        as None (see `pixelwise.data.check`) instead of stopping."""
        from pixelwise.data.semantic import SemanticDataset
        from pixelwise.data.transforms import (
            IGNORE_INDEX,
            JointTransform,
            Resize,
            train_transforms,
        )

        steps: list[nn.Module] = []
        if size is not None:
            steps.append(Resize(list(size), antialias=True))
        if train:
            if scale is not None and crop is None:
                if size is None:
                    raise UserError("a random rescale needs a crop or a size to cut the images "
                                    "back to (one size per batch)")
                crop = size
            # JointTransform holds labels + 1 with 0 = ignore, so v2's zero fill (padding, the
            # corners of a rotation) is ignore
            steps += train_transforms(scale=scale, crop_size=None if crop is None else list(crop),
                                      crop_balance=crop_balance, rotate=rotate, flip=0.5,
                                      jitter=jitter).transforms
        ignore = IGNORE_INDEX if self.ignore_index is None else self.ignore_index
        transforms = JointTransform(steps, ignore_index=ignore) if steps else None
        data: Dataset = SemanticDataset(root, split, transforms=transforms, skip_bad=skip_bad,
                                        cache=cache)
        if train and class_mix > 0:
            from pixelwise.data.class_mix import ClassMix

            paste = None if mix_classes is None else self.class_indices(mix_classes)
            data = ClassMix(data, class_mix, ignore_index=self.ignore_index, classes=paste,
                            turn=mix_turn)
        return data

    def class_indices(self, names: Sequence[str]) -> list[int]:
        """The indices of class `names` (a one-line error naming the classes for an unknown one)."""
        known = list(self.class_names or [])
        unknown = [name for name in names if name not in known]
        if unknown:
            raise UserError(f"unknown class {unknown[0]!r}; the classes are: {', '.join(known)}")
        return [known.index(name) for name in names]

    collate = staticmethod(collate)

    def to_device(self, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch
        non_blocking = device.type == "cuda"
        return (images.to(device, non_blocking=non_blocking),
                targets.to(device, non_blocking=non_blocking))

    @staticmethod
    def num_images(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int(batch[0].shape[0])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        """`{term: scalar}` for one batch `(images (N, C, H, W), targets (N, H, W))`."""
        images, targets = batch
        coarse = coarse_logits(model) if self.loss_at == "net" else contextlib.nullcontext(1)
        with coarse as factor:
            logits = logits_of(model(images))
        logits = logits.float()  # losses in float32 also under autocast
        if factor > 1:  # (N, K, ceil(H/k), ceil(W/k)) against k x k blocks' label counts
            targets = area_targets(targets, factor, self.num_classes, self.ignore_index)
        else:
            targets = match_target(logits, targets)
        return {name: term(logits, targets) for name, term in self.losses.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, *, device: torch.device,
                 amp: bool = False) -> dict[str, Any]:
        """SemanticMetrics over all `batches` (this rank's share; the confusion matrix is summed
        over ranks). Returns `{miou, pixel_accuracy, mean_accuracy, fw_iou, dice, per_class}`."""
        from pixelwise.metrics.semantic import SemanticMetrics

        metrics = SemanticMetrics(self.num_classes, ignore_index=self.ignore_index,
                                  class_names=self.class_names)
        was_training = model.training
        model.eval()
        seen = 0
        try:
            for batch in batches:
                if batch is None:  # only bad samples (--skip-bad)
                    continue
                images, targets = self.to_device(batch, device)
                seen += len(images)
                with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    logits = logits_of(model(images))
                metrics.update(argmax_labels(logits, 1), match_target(logits, targets))
        finally:
            model.train(was_training)
        metrics.confusion = all_reduce_sum(metrics.confusion)
        if int(all_reduce_sum(torch.tensor([seen]))[0]) == 0:
            raise UserError("no images to evaluate")
        return metrics.compute()
