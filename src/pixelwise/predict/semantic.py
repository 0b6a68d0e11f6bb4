"""Prediction for the semantic task: image file -> label map, colour overlay and legend.

`SemanticPredictor(model, meta, ...)` turns images read by `pixelwise.data.images.read_image`
into `(H, W)` class-index maps at the image's own size, the way the model was trained:

* **channels**: the model's `in_channels` (from the checkpoint) decides. A grayscale image for a
  colour model is repeated to 3 channels; a colour image for a grayscale model is reduced to one
  channel (exactly, when its channels are equal, else by ITU-R 601 luma, with a warning).
* **values**: `image_to_float`, as the datasets do (uint8 / 255, uint16 / 65535).
* **size** (`size=`): "train" (default) resizes to the run's training `--size` (bilinear with
  antialias, as the training Resize) when it had one, else predicts at the native size;
  "native" always predicts at the native size (every pixelwise model is fully convolutional, but
  objects then appear at another scale than in training); (H, W) resizes to that size. The
  logits are resized back to the image's size (bilinear) before the argmax, so outputs always
  have the input's size. (`pixelwise predict --tile` defaults to "native": tiling is for large
  images, which a resize to the training size would defeat.)
* **one pass or tiles**: without `tile`, one forward pass (`predict_padded`: images whose size
  is not a multiple of the model's output stride are mirror-padded to the next multiple at the
  bottom/right and the logits cropped back, so that odd sizes cost no skip resampling), batching
  images of equal size; with `tile`/`overlap`, `predict_tiled`, which equals that pass when
  the overlap covers the receptive field.

`write(...)` saves `OUT/NAME.png` (palette PNG: pixel value = class index, readable by
`read_label_png`) and `OUT/overlays/NAME.png` (classes blended over the image, with a legend of
the classes present). Overlays live in a subfolder so that OUT holds exactly one label map per
image, under the image's name: a ready `masks/<split>` folder of the pixelwise layout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixelwise.data.images import image_to_float
from pixelwise.errors import UserError
from pixelwise.ops.labels import argmax_labels
from pixelwise.predict.tiling import (
    check_tiling,
    model_device,
    output_stride,
    predict_padded,
    predict_tiled,
)
from pixelwise.predict.tta import TTA

logger = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"
SIZE_POLICIES = ("train", "native")  # or an explicit (H, W)


def resolve_size(size: str | Sequence[int], trained: Sequence[int] | None
                 ) -> tuple[int, int] | None:
    """The (H, W) a predictor resizes images to, None for their own size: `size` is "train"
    (the run's training size `trained`, native if it had none), "native" or (H, W)."""
    if isinstance(size, str):
        if size not in SIZE_POLICIES:
            raise UserError(f"size must be one of {', '.join(SIZE_POLICIES)} or HxW, "
                            f"got {size!r}")
        return tuple(int(v) for v in trained) if size == "train" and trained else None
    h, w = (int(v) for v in size)
    if min(h, w) < 1:
        raise UserError(f"size must be positive, got {h}x{w}")
    return h, w


def describe_size(size: tuple[int, int] | None) -> str:
    """A resolved size for summaries: "native" or "HxW"."""
    return "native" if size is None else f"{size[0]}x{size[1]}"


def adapt_channels(image: torch.Tensor, in_channels: int, name: str = "image") -> torch.Tensor:
    """(C, H, W) with C = 1 or 3 -> (in_channels, H, W), same dtype (see the module docstring)."""
    c = image.shape[0]
    if c == in_channels:
        return image
    if c == 1 and in_channels == 3:
        return image.expand(3, -1, -1)  # (1, H, W) -> (3, H, W)
    if c == 3 and in_channels == 1:
        if bool((image[0] == image[1]).all() and (image[1] == image[2]).all()):
            return image[:1]
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        logger.warning("%s: colour image for a grayscale model; using its luma", name)
        gray = rgb_to_grayscale(image_to_float(image))  # (1, H, W) float in [0, 1]
        if image.is_floating_point():
            return gray
        top = 65535.0 if image.dtype == torch.uint16 else 255.0
        return (gray * top).round().to(torch.int32).to(image.dtype)  # (uint16 has few kernels)
    raise UserError(f"{name}: {c} channels, but the model takes {in_channels}")


class SemanticPredictor:
    """Label maps of images with a semantic model rebuilt by `load_model` (see module docstring).

    Args:
        model: in eval mode, on its device; (N, C, H, W) -> logits (N, K, H, W).
        meta: the checkpoint's description (`meta["task"]` class names, `meta["train"]` size).
        size: "train", "native" or (H, W).
        tile, overlap: tiled inference when `tile` is given (pixels).
        batch_size: images per forward pass (tiles per pass when tiling).
        pad_mode: how `predict_tiled` pads to the output stride when it must.
        tta: test-time augmentation (`pixelwise.predict.tta.TTA`), or None.
    """

    task = "semantic"

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        *,
        size: str | Sequence[int] = "train",
        tile: int | None = None,
        overlap: int = 0,
        batch_size: int = 1,
        pad_mode: str = "reflect",
        tta: TTA | None = None,
    ) -> None:
        self.tta = tta
        self.model = model
        self.meta = meta
        task = meta.get("task") or {}
        model_cfg = meta.get("model") or {}
        self.num_classes = int(task.get("num_classes") or model_cfg["num_classes"])
        names = task.get("class_names")
        self.class_names = list(names) if names else [f"class {i}" for i in range(self.num_classes)]
        self.in_channels = int(getattr(model, "in_channels", model_cfg.get("in_channels", 3)))
        self.size = resolve_size(size, (meta.get("train") or {}).get("size"))
        if tile is not None:
            check_tiling(tile, overlap, output_stride(model))  # once, not at every image
        elif overlap < 0:
            raise UserError(f"overlap must be >= 0, got {overlap}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.pad_mode = pad_mode
        from pixelwise.viz import class_palette

        # (K, 3) uint8: the dataset's colours (classes.json) when the checkpoint has them
        self.palette = class_palette(self.num_classes, task.get("class_colors"))
        self.device = model_device(model)

    @property
    def policy(self) -> str:
        """What `size` resolved to, for summaries: "native" or "HxW"."""
        return describe_size(self.size)

    def prepare(self, image: torch.Tensor, name: str = "image") -> torch.Tensor:
        """(C, H, W) uint8/uint16/float image -> (in_channels, h, w) float32 model input at the
        prediction size."""
        x = image_to_float(adapt_channels(image, self.in_channels, name))  # (C', H, W)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            from torchvision.transforms.v2.functional import resize

            x = resize(x, list(self.size), antialias=True)  # as the training Resize
        return x

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) prepared inputs -> (N, K, h, w) float32 logits on the CPU (with
        `tta`: the log of the augmentations' mean probabilities)."""
        if self.tta is not None:
            return self.tta(self._one_pass, inputs)
        return self._one_pass(inputs)

    def _one_pass(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.tile is not None:
            out = predict_tiled(self.model, inputs, self.tile, self.overlap,
                                batch_size=self.batch_size, pad_mode=self.pad_mode)
        else:
            out = predict_padded(self.model, inputs, pad_mode=self.pad_mode)
        return out.float().cpu()

    def predict(self, images: Sequence[torch.Tensor], names: Sequence[str] | None = None
                ) -> list[torch.Tensor]:
        """Label maps (H, W) int64 of `images` ((C, H, W) as `read_image` returns), each at its
        image's size. Images whose prepared inputs share a size go through one forward pass."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        inputs = [self.prepare(img, name) for img, name in zip(images, names)]
        labels: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(tuple(x.shape), []).append(i)
        for members in groups.values():
            step = 1 if self.tile is not None else self.batch_size
            for first in range(0, len(members), step):
                chunk = members[first:first + step]
                logits = self.logits(torch.stack([inputs[i] for i in chunk]))  # (n, K, h, w)
                for row, i in zip(logits, chunk):
                    labels[i] = self._to_labels(row, tuple(images[i].shape[-2:]))
        return [lab for lab in labels if lab is not None]  # (every entry is set above)

    @staticmethod
    def _to_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(K, h, w) logits -> (H, W) int64 labels at the image's `size`."""
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits[None], size=size, mode="bilinear",
                                   align_corners=False)[0]  # (1, K, H, W) -> (K, H, W)
        return argmax_labels(logits, 0)

    def outputs(self, out: Path, name: str) -> dict[str, Path]:
        """The files `write` makes for the image called `name` (its stem + .png)."""
        stem = Path(name).stem + ".png"
        return {"labels": out / stem, "overlay": out / OVERLAY_DIR / stem}

    def render(self, image: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
        """The arrays `write` saves: labels (H, W) uint8 and overlay (h, w, 3) uint8 with legend
        (a small image's overlay enlarged k times, see `enlarge_small`)."""
        from pixelwise.viz import enlarge_small, legend_image, overlay_semantic, with_legend

        lab = labels.to(torch.uint8).numpy() if self.num_classes <= 256 else labels.numpy()
        overlay = enlarge_small(overlay_semantic(image, lab, self.palette))
        legend = legend_image(self.class_names, self.palette, present=lab,
                              max_height=max(overlay.shape[0], 64))
        return {"labels": lab, "overlay": with_legend(overlay, legend)}

    def write(self, out: Path, name: str, image: torch.Tensor, labels: torch.Tensor
              ) -> dict[str, Any]:
        """Save the label PNG and overlay of one image (each atomically); returns a summary row."""
        from pixelwise.viz import save_label_png, save_png

        arrays = self.render(image, labels)  # everything computed before the first file is written
        paths = self.outputs(out, name)
        save_label_png(paths["labels"], arrays["labels"], self.palette)
        save_png(paths["overlay"], arrays["overlay"])
        present = sorted(int(c) for c in np.unique(arrays["labels"]))
        return {
            "labels": str(paths["labels"]),
            "overlay": str(paths["overlay"]),
            "size": [int(v) for v in labels.shape],
            "classes": [self.class_names[c] for c in present if c < len(self.class_names)],
        }
