"""Joint augmentation: torchvision ``transforms.v2`` on an image and its whole target.

`JointTransform(transforms)` runs a list of v2 transforms on ``(image, target)`` where target is
an instance / keypoint / panoptic dict of `pixelwise.data.coco` and `pixelwise.data.panoptic`,
or a semantic `tv_tensors.Mask` (H, W). Images, masks and boxes are tv_tensors, so every v2
transform moves them together. Around the v2 calls it

- carries ``keypoints`` (N, K, 3) as a `tv_tensors.KeyPoints` (N, K, 2) plus the visibility
  (N, K), so v2 moves the points too; on the way out a point that left the image gets v = 0 and
  unlabelled points (v = 0) get x = y = 0 (COCO's convention);
- carries keypoints in continuous coordinates (pixel centre = index + 0.5) inside the pipeline:
  v2 resizes, crops and warps points as continuous coordinates, so a COCO point (x, y) = pixel
  (column, row) stays on the same pixel of the transformed mask; see `HorizontalFlip` for the
  one v2 kernel that uses pixel indices instead;
- carries the semantic map with void (255) as 0 and class c as c + 1, so the zero fill of
  padding, crops and affine warps becomes void, not class 0 (255 - 1 classes at most);
- at the end clips boxes to the image and drops the instances whose box got smaller than
  ``min_size`` pixels or whose mask became empty (all per-instance fields together), and
  recomputes ``area`` (mask pixels, or box area without masks) for the transformed image.

`HorizontalFlip` mirrors everything and swaps left/right keypoints (`KeypointSchema.
flip_permutation`); v2's own flip moves the points but keeps ``left_eye`` on the (now) right eye.
`RandomScale` / `Resize` resize masks with ``nearest-exact`` (pixel centres aligned, as the
bilinear image resize) instead of v2's default legacy ``nearest``, which shifts masks by up to
half a source pixel against the image.

Presets (`TRANSFORM_PRESETS`, built with `make_transforms(name, **options)`):
``train``: random scale, optional crop, flip, photometric jitter; ``eval``: optional resize and
normalisation (off by default: torchvision's detection models normalise internally).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pixelwise.data.keypoints import KeypointSchema
from pixelwise.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

Target = dict[str, Any]

VISIBILITY = "keypoints_visibility"  # the key of the visibility (N, K) inside the pipeline
# Fields with one entry per instance, filtered together when instances are dropped.
INSTANCE_FIELDS = ("boxes", "labels", "masks", "iscrowd", "area", "keypoints", VISIBILITY,
                   "segment_ids")
IGNORE_INDEX = 255


class JointTransform:
    """Apply v2 transforms to ``(image, target)`` keeping masks, boxes and keypoints aligned.

    transforms: callables taking and returning ``(image, sample)`` (any v2 transform, and
    `HorizontalFlip`). min_size: instances whose box is narrower or lower than this (pixels)
    after the transforms are dropped. An empty list returns the inputs unchanged.
    """

    def __init__(self, transforms: Sequence[Callable[..., Any]], *, min_size: float = 1.0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.transforms = list(transforms)
        self.min_size = float(min_size)
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, target: Target | tv_tensors.Mask
                 ) -> tuple[torch.Tensor, Target | tv_tensors.Mask]:
        if not self.transforms:
            return image, target
        semantic_only = isinstance(target, tv_tensors.Mask)
        if semantic_only and all(isinstance(t, FILL_FREE) for t in self.transforms):
            # nothing is filled: the labels need no shift to make the fill void (a flip of a
            # 256² sample takes 0.5 ms less; the same result, tested)
            sample: Target = {"semantic": target}
            for transform in self.transforms:
                image, sample = transform(image, sample)
            return image, sample["semantic"]
        sample = self._unpack(image, {"semantic": target} if semantic_only else target)
        for transform in self.transforms:
            image, sample = transform(image, sample)
        target = self._pack(image, sample)
        return image, (target["semantic"] if semantic_only else target)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"JointTransform([\n  {inner}\n], min_size={self.min_size})"

    # -- in and out of the pipeline -------------------------------------------------------

    def _unpack(self, image: torch.Tensor, target: Target) -> Target:
        sample = dict(target)
        height, width = image.shape[-2:]
        kps = target.get("keypoints")
        if kps is not None:
            kps = torch.as_tensor(kps, dtype=torch.float32)
            # pixel index -> continuous coordinate (pixel centre); (N, K, 3) -> (N, K, 2) + (N, K)
            sample["keypoints"] = tv_tensors.KeyPoints(kps[..., :2] + 0.5,
                                                       canvas_size=(height, width))
            sample[VISIBILITY] = kps[..., 2].clone()
        sem = target.get("semantic")
        if sem is not None:
            labels = sem.as_subclass(torch.Tensor)  # (H, W): plain ops, no tv_tensor dispatch
            valid = labels != self.ignore_index
            if bool((valid & ((labels > self.ignore_index) | (labels < 0))).any()):
                raise UserError(f"semantic labels must be in 0..{self.ignore_index - 1} or "
                                f"{self.ignore_index} (void) for joint augmentation")
            sample["semantic"] = tv_tensors.wrap(torch.where(valid, labels + 1, 0), like=sem)
        return sample

    def _pack(self, image: torch.Tensor, sample: Target) -> Target:
        target = dict(sample)
        height, width = image.shape[-2:]
        if "semantic" in target:
            sem = target["semantic"]
            labels = sem.as_subclass(torch.Tensor)  # (H, W)
            target["semantic"] = tv_tensors.wrap(
                torch.where(labels == 0, self.ignore_index, labels - 1), like=sem)
        if "keypoints" in target:
            points = target["keypoints"].as_subclass(torch.Tensor)  # (N, K, 2) continuous
            vis = target.pop(VISIBILITY).clone()
            inside = ((points[..., 0] >= 0) & (points[..., 0] < width)
                      & (points[..., 1] >= 0) & (points[..., 1] < height))
            vis[~inside] = 0
            # continuous -> pixel index; a point in the image's first half pixel would get -0.5
            xy = (points - 0.5).clamp(min=0.0)
            xy[..., 0] = xy[..., 0].clamp(max=width - 1)
            xy[..., 1] = xy[..., 1].clamp(max=height - 1)
            xy = xy.masked_fill((vis == 0).unsqueeze(-1), 0.0)
            target["keypoints"] = torch.cat([xy, vis.unsqueeze(-1)], dim=-1)  # (N, K, 3)
        if "boxes" in target:
            self._sanitize(target)
        return target

    def _sanitize(self, target: Target) -> None:
        """Clip boxes to the image, drop small / emptied instances, recompute area (in place)."""
        boxes = F.clamp_bounding_boxes(target["boxes"])
        target["boxes"] = boxes
        xyxy = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY
                                             ).as_subclass(torch.Tensor)  # (N, 4)
        keep = ((xyxy[:, 2] - xyxy[:, 0]) >= self.min_size) & (
            (xyxy[:, 3] - xyxy[:, 1]) >= self.min_size)
        masks = target.get("masks")
        if masks is not None:
            keep &= masks.flatten(1).ne(0).any(dim=1)  # (N, H, W) -> (N, H*W) -> (N,)
        n = keep.numel()
        if not bool(keep.all()):
            for key in INSTANCE_FIELDS:
                value = target.get(key)
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                    target[key] = wrap_like(value[keep], value)
            xyxy = xyxy[keep]
        if "area" in target:
            if masks is not None:
                area = target["masks"].flatten(1).sum(dim=1)  # (N, H*W) -> (N,)
            else:
                area = box_area(xyxy)
            target["area"] = area.to(torch.float32)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks, each non-empty -> (N, 4) float32 XYXY boxes with exclusive right and
    bottom edges, as COCO boxes (`torchvision.ops.masks_to_boxes` gives the last pixel: + 1)."""
    from torchvision.ops import masks_to_boxes

    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    boxes = masks_to_boxes(masks.as_subclass(torch.Tensor).bool())  # (N, 4) last-pixel edges
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])


def wrap_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` as the tv_tensor type of `like`, when `like` is one (torch ops return plain
    tensors)."""
    return tv_tensors.wrap(value, like=like) if isinstance(like, tv_tensors.TVTensor) else value


class HorizontalFlip(torch.nn.Module):
    """Mirror image, masks, boxes and keypoints with probability p, swapping left/right keypoints.

    flip_permutation: after the flip, keypoint i is the old keypoint ``perm[i]``
    (`KeypointSchema.flip_permutation`); None keeps the keypoint order. Image, masks and boxes
    go through v2's ``horizontal_flip``; keypoints are mirrored here as continuous coordinates
    (x -> W - x), because v2 mirrors points as pixel indices (x -> W - 1 - x) while its resize,
    crop and affine treat them as continuous: inside `JointTransform` points are continuous.
    """

    def __init__(self, p: float = 0.5, flip_permutation: Sequence[int] | None = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise UserError(f"flip probability must be in [0, 1], got {p}")
        self.p = p
        self.flip_permutation = None if flip_permutation is None else list(flip_permutation)
        self._flip = v2.RandomHorizontalFlip(p=1.0)

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return sample
        # Take keypoints (and visibility) out of the target dicts, let v2 flip the rest, then
        # mirror and permute them here. Dicts are found at the top level of the sample.
        parts = list(sample) if isinstance(sample, (tuple, list)) else [sample]
        held: dict[int, tuple[Any, Any]] = {}
        for i, part in enumerate(parts):
            if isinstance(part, dict) and isinstance(part.get("keypoints"), tv_tensors.KeyPoints):
                rest = {k: v for k, v in part.items() if k not in ("keypoints", VISIBILITY)}
                held[i] = (part["keypoints"], part.get(VISIBILITY))
                parts[i] = rest
        flipped = self._flip(*parts) if len(parts) > 1 else [self._flip(parts[0])]
        flipped = list(flipped)
        for i, (points, vis) in held.items():
            points, vis = self._flip_points(points, vis)
            flipped[i] = dict(flipped[i], keypoints=points)
            if vis is not None:
                flipped[i][VISIBILITY] = vis
        if isinstance(sample, (tuple, list)):
            return type(sample)(flipped)
        return flipped[0]

    def _flip_points(self, points: tv_tensors.KeyPoints, vis: torch.Tensor | None
                     ) -> tuple[tv_tensors.KeyPoints, torch.Tensor | None]:
        width = points.canvas_size[1]
        xy = points.as_subclass(torch.Tensor).clone()  # (N, K, 2)
        xy[..., 0] = width - xy[..., 0]
        if self.flip_permutation is not None:
            k = xy.shape[-2]
            if len(self.flip_permutation) != k:
                raise UserError(f"flip permutation has {len(self.flip_permutation)} entries "
                                f"for {k} keypoints")
            xy = xy[..., self.flip_permutation, :]  # swap left/right along K
            if vis is not None:
                vis = vis[..., self.flip_permutation]
        return tv_tensors.wrap(xy, like=points), vis

    def extra_repr(self) -> str:
        return f"p={self.p}, flip_permutation={self.flip_permutation}"


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scale` (both sides, aspect kept).

    v2 has no relative random resize (`RandomResize` / `ScaleJitter` aim at absolute sizes).
    Masks use ``nearest-exact`` so that they stay aligned with the (bilinear) image.
    """

    def __init__(self, scale: tuple[float, float] = (0.75, 1.25)) -> None:
        super().__init__()
        lo, hi = scale
        if not 0 < lo <= hi:
            raise UserError(f"scale range must satisfy 0 < low <= high, got {scale}")
        self.scale = (float(lo), float(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        s = torch.empty(()).uniform_(*self.scale).item()
        return {"size": [max(1, round(height * s)), max(1, round(width * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return _resize_mask(inpt, params["size"])
        return self._call_kernel(F.resize, inpt, params["size"],
                                 interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


class ClassBalancedCrop(v2.RandomCrop):
    """`v2.RandomCrop(size, pad_if_needed=True)` that, with probability `balance`, centres the
    crop on a pixel of one class drawn uniformly among the classes of the semantic mask.

    Random crops of scenes where some classes cover 1-2 % of the pixels mostly show the large
    classes; this oversamples the rare ones as nnU-Net oversamples foreground patches (there a
    third of the patches; here every class present, stuff included, is equally likely, so no
    class list is needed). The centre is clamped so that the window stays inside the (padded)
    image. Only the window position differs from v2's crop: padding and the crop kernels are
    v2's. `void`: the mask value that is never a centre; inside `JointTransform` void is 0.
    """

    def __init__(self, size: int | Sequence[int], balance: float = 0.5, *, void: int = 0
                 ) -> None:
        super().__init__(size, pad_if_needed=True)
        if not 0.0 <= balance <= 1.0:
            raise UserError(f"crop balance must be in [0, 1], got {balance}")
        self.balance = float(balance)
        self.void = int(void)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        if torch.rand(()).item() >= self.balance:
            return params
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask) and x.ndim == 2]
        if len(masks) != 1:
            raise UserError("a class-balanced crop needs exactly one semantic mask (H, W)")
        mask = masks[0].as_subclass(torch.Tensor)
        classes = mask.unique()
        classes = classes[classes != self.void]
        if classes.numel() == 0:
            return params
        chosen = classes[torch.randint(classes.numel(), ())]
        where = (mask == chosen).nonzero()  # (P, 2) row, column
        y, x = where[torch.randint(len(where), ())].tolist()
        pad_left, pad_top, pad_right, pad_bottom = params["padding"]
        padded_height = mask.shape[0] + pad_top + pad_bottom
        padded_width = mask.shape[1] + pad_left + pad_right
        height, width = params["height"], params["width"]
        params["top"] = min(max(y + pad_top - height // 2, 0), padded_height - height)
        params["left"] = min(max(x + pad_left - width // 2, 0), padded_width - width)
        params["needs_crop"] = padded_height > height or padded_width > width
        return params

    def extra_repr(self) -> str:
        return f"size={self.size}, balance={self.balance}"


class Resize(v2.Resize):
    """`v2.Resize` with masks resized by ``nearest-exact`` (aligned with the image)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return _resize_mask(inpt, self.size, max_size=self.max_size)
        return self._call_kernel(F.resize, inpt, self.size, max_size=self.max_size,
                                 interpolation=self.interpolation, antialias=self.antialias)


# transforms that move or resample pixels but never fill any (no padding, no warp corners)
FILL_FREE = (HorizontalFlip, Resize)


def _resize_mask(mask: tv_tensors.Mask, size: list[int] | int | None, *,
                 max_size: int | None = None) -> tv_tensors.Mask:
    """A (H, W) or (..., H, W) mask resized by ``nearest-exact`` (pixel centres map to pixel
    centres, so the mask stays aligned with the bilinear image and its boxes). torchvision's
    mask kernel honours that mode only since 0.29 (before, it resized masks by ``nearest``,
    which shifts them by up to half an output pixel); its image kernel honours it in every
    version, so masks go through that one."""
    plain = mask.as_subclass(torch.Tensor)
    flat = plain.unsqueeze(0) if plain.ndim == 2 else plain  # (H, W) -> (1, H, W)
    out = F.resize_image(flat, size, interpolation=v2.InterpolationMode.NEAREST_EXACT,
                         max_size=max_size, antialias=False)
    return tv_tensors.wrap(out[0] if plain.ndim == 2 else out, like=mask)


# ----------------------------------------------------------------------------- presets


def train_transforms(
    *,
    schema: KeypointSchema | None = None,
    scale: tuple[float, float] | None = (0.75, 1.25),
    crop_size: int | tuple[int, int] | None = None,
    crop_balance: float = 0.0,
    rotate: float = 0.0,
    flip: float = 0.5,
    jitter: float = 0.2,
    min_size: float = 1.0,
) -> JointTransform:
    """Training augmentation: random scale, random crop (padded when the image is smaller),
    random rotation, horizontal flip (swapping left/right keypoints of `schema`), photometric
    jitter.

    scale: the resize factor range (None: no resize); crop_size: (H, W) or one side (None: no
    crop); crop_balance: the share of crops centred on a class (`ClassBalancedCrop`, semantic
    masks); rotate: the largest angle in degrees (0: none; corners get the fill, void for
    masks); flip: its probability; jitter: brightness / contrast / saturation strength (hue gets
    a quarter of it; 0: none).
    """
    steps: list[Callable[..., Any]] = []
    if scale is not None:
        steps.append(RandomScale(scale))
    if crop_size is not None:
        steps.append(ClassBalancedCrop(crop_size, crop_balance) if crop_balance > 0
                     else v2.RandomCrop(crop_size, pad_if_needed=True))
    if rotate > 0:
        steps.append(v2.RandomRotation(rotate, interpolation=v2.InterpolationMode.BILINEAR))
    if flip > 0:
        steps.append(HorizontalFlip(flip, schema.flip_permutation() if schema else None))
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
                                    hue=min(jitter / 4, 0.5)))
    return JointTransform(steps, min_size=min_size)


def eval_transforms(
    *,
    size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> JointTransform:
    """Evaluation: optional resize (`size` as `v2.Resize`: an int sets the shorter side) and
    optional normalisation (give both `mean` and `std`). With neither, the identity."""
    steps: list[Callable[..., Any]] = []
    if size is not None or max_size is not None:
        steps.append(Resize(size, max_size=max_size))
    if (mean is None) != (std is None):
        raise UserError("normalisation needs both mean and std")
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return JointTransform(steps)


TRANSFORM_PRESETS: dict[str, Callable[..., JointTransform]] = {
    "train": train_transforms,
    "eval": eval_transforms,
}


def make_transforms(name: str | Callable[..., JointTransform], **options: Any) -> JointTransform:
    """Build a preset by name (`TRANSFORM_PRESETS`) or call a given factory with `options`."""
    if callable(name):
        return name(**options)
    if name not in TRANSFORM_PRESETS:
        raise unknown_name("transform preset", name, TRANSFORM_PRESETS)
    return TRANSFORM_PRESETS[name](**options)
