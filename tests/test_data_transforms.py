"""Joint augmentation: masks, boxes and keypoints move with the image; flips swap left/right."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from pixelwise.data.keypoints import KeypointSchema
from pixelwise.data.transforms import (
    TRANSFORM_PRESETS,
    HorizontalFlip,
    JointTransform,
    RandomScale,
    Resize,
    eval_transforms,
    make_transforms,
    train_transforms,
)
from pixelwise.errors import UserError

H, W = 20, 30
SCHEMA = KeypointSchema(["nose", "left_eye", "right_eye"], sigmas=[0.1] * 3)


def _sample(height: int = H, width: int = W):
    """Image with two box-shaped instances; keypoints: instance 0 has nose (v=2) at (4, 3) and
    left_eye (v=1) at (7, 5), right_eye unlabelled; instance 1 nose at (21, 11), right_eye at
    (26, 13)."""
    image = tv_tensors.Image(torch.rand(3, height, width))
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[1, 10:15, 20:28] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[3.0, 2, 9, 6], [20, 10, 28, 15]]),
                                          format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([1, 2]),
        "masks": tv_tensors.Mask(masks),
        "iscrowd": torch.tensor([0, 1]),
        "area": torch.tensor([24.0, 40.0]),
        "image_id": 7,
        "keypoints": torch.tensor([[[4.0, 3, 2], [7, 5, 1], [0, 0, 0]],
                                   [[21, 11, 2], [0, 0, 0], [26, 13, 2]]]),
    }
    return image, target


class _Crop(v2.Transform):
    """A fixed crop (top, left, height, width) through v2's crop kernels."""

    def __init__(self, *box: int) -> None:
        super().__init__()
        self.box = box

    def transform(self, inpt, params):
        return self._call_kernel(v2.functional.crop, inpt, *self.box)


def test_flip_hand_computation_and_left_right_swap():
    image, target = _sample()
    out_image, out = JointTransform([HorizontalFlip(1.0, SCHEMA.flip_permutation())])(image, target)
    assert torch.equal(out_image, image.flip(-1))
    assert torch.equal(out["masks"], target["masks"].flip(-1))
    # box [x1, x2) -> [W - x2, W - x1)
    assert out["boxes"].tolist() == [[21, 2, 27, 6], [2, 10, 10, 15]]
    # point on pixel column x -> column W - 1 - x; left_eye and right_eye exchange slots
    assert out["keypoints"].tolist() == [
        [[25, 3, 2], [0, 0, 0], [22, 5, 1]],  # the left eye at x = 7 is now the right eye at 22
        [[8, 11, 2], [3, 13, 2], [0, 0, 0]],
    ]
    # each flipped point is on its flipped mask
    for i, (x, y, v) in enumerate(out["keypoints"][:, 0].tolist()):
        assert out["masks"][i, int(y), int(x)] == 1
    assert out["labels"].tolist() == [1, 2] and out["iscrowd"].tolist() == [0, 1]
    assert out["image_id"] == 7 and out["area"].tolist() == [24.0, 40.0]


def test_flip_twice_is_identity_and_probability():
    image, target = _sample()
    twice = JointTransform([HorizontalFlip(1.0, SCHEMA.flip_permutation())] * 2)
    out_image, out = twice(image, target)
    assert torch.equal(out_image, image)
    assert torch.equal(out["keypoints"], target["keypoints"])
    assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["masks"], target["masks"])
    never = JointTransform([HorizontalFlip(0.0, SCHEMA.flip_permutation())])
    assert torch.equal(never(image, target)[1]["keypoints"], target["keypoints"])
    torch.manual_seed(0)
    half = JointTransform([HorizontalFlip(0.5)])
    flipped = sum(bool(torch.equal(half(image, target)[0], image.flip(-1))) for _ in range(200))
    assert 70 < flipped < 130


def test_flip_without_permutation_mirrors_but_keeps_order():
    image, target = _sample()
    _, out = JointTransform([HorizontalFlip(1.0)])(image, target)
    assert out["keypoints"][0].tolist() == [[25, 3, 2], [22, 5, 1], [0, 0, 0]]
    with pytest.raises(UserError, match="2 entries for 3 keypoints"):
        JointTransform([HorizontalFlip(1.0, [1, 0])])(image, target)


GEOMETRIC = {
    "scale_up": RandomScale((1.6, 2.2)),
    "scale_down": RandomScale((0.6, 0.8)),
    "resize": Resize([31, 47]),
    "affine": v2.RandomAffine(degrees=30, translate=(0.1, 0.1), scale=(0.8, 1.3), shear=10),
    "rotation": v2.RandomRotation(40),
    "crop": v2.RandomCrop((40, 50), pad_if_needed=True),
    "train_preset": train_transforms(schema=SCHEMA, crop_size=(48, 56)),
}


def _discs(seed: int):
    """An image with 4 disc-shaped instances (radius 5) and one keypoint at each centre."""
    gen = torch.Generator().manual_seed(seed)
    height, width = 48, 64
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = [(int(torch.randint(8, width - 8, (), generator=gen)),
                int(torch.randint(8, height - 8, (), generator=gen))) for _ in range(4)]
    masks = torch.stack([((xx - x) ** 2 + (yy - y) ** 2 <= 25) for x, y in centres])
    boxes = torch.tensor([[x - 5, y - 5, x + 6, y + 6] for x, y in centres], dtype=torch.float32)
    kps = torch.tensor([[[x, y, 2], [0, 0, 0], [0, 0, 0]] for x, y in centres], dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.ones(4, dtype=torch.int64),
        "masks": tv_tensors.Mask(masks.to(torch.uint8)),
        "iscrowd": torch.zeros(4, dtype=torch.int64),
        "area": masks.flatten(1).sum(1).float(),
        "image_id": 1,
        "keypoints": kps,
    }
    return tv_tensors.Image(torch.rand(3, height, width, generator=gen)), target


@pytest.mark.parametrize("transform", GEOMETRIC.values(), ids=GEOMETRIC.keys())
def test_keypoints_stay_on_their_masks(transform):
    joint = transform if isinstance(transform, JointTransform) else JointTransform([transform])
    visible = 0
    for seed in range(8):
        torch.manual_seed(seed)
        image, target = _discs(seed)
        out_image, out = joint(image, target)
        height, width = out_image.shape[-2:]
        assert out["masks"].shape[-2:] == (height, width)
        assert out["keypoints"].shape == (out["masks"].shape[0], 3, 3)
        for mask, points in zip(out["masks"], out["keypoints"]):
            for x, y, v in points.tolist():
                if v > 0:
                    # a keypoint's pixel is inside its own transformed mask
                    assert mask[round(y), round(x)] == 1, (x, y)
                    visible += 1
        # every box holds its mask (boxes move with the masks too)
        for box, mask in zip(out["boxes"].tolist(), out["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box[0] <= xs.min() + 0.5 and xs.max() + 0.5 <= box[2] + 1e-4
            assert box[1] <= ys.min() + 0.5 and ys.max() + 0.5 <= box[3] + 1e-4
    assert visible > 8


@pytest.mark.parametrize("transform", [RandomScale((1.6, 2.2)), RandomScale((0.6, 0.8)),
                                       Resize([31, 47])], ids=["scale_up", "scale_down", "resize"])
def test_masks_are_resized_nearest_exact(transform):
    """Instance (N, H, W) and semantic (H, W) masks are resized by nearest-exact, as torch's
    interpolate does it (torchvision's own mask kernel used plain nearest before 0.29, half an
    output pixel off the image)."""
    image, target = _discs(0)
    torch.manual_seed(1)
    out_image, out = JointTransform([transform])(image, target)
    size = tuple(out_image.shape[-2:])
    expected = torch.nn.functional.interpolate(target["masks"][None].float(), size=size,
                                               mode="nearest-exact")[0].to(torch.uint8)
    assert torch.equal(out["masks"].as_subclass(torch.Tensor), expected)
    semantic = tv_tensors.Mask(target["masks"].amax(0))  # (H, W)
    torch.manual_seed(1)
    _, resized = transform(image, semantic)
    assert resized.shape == size and isinstance(resized, tv_tensors.Mask)
    assert torch.equal(resized.as_subclass(torch.Tensor), expected.amax(0))


def test_keypoints_move_exactly_under_integer_scale_and_crop():
    image, target = _sample()
    # x2: pixel (x, y) becomes the 2x2 block at (2x, 2y)..(2x+1, 2y+1), centre 2x + 0.5
    _, out = JointTransform([RandomScale((2.0, 2.0))])(image, target)
    assert out["keypoints"][0, 0].tolist() == [8.5, 6.5, 2]
    up = target["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2)  # (N, 2H, 2W)
    assert torch.equal(out["masks"], up)
    assert out["boxes"].tolist() == [[6, 4, 18, 12], [40, 20, 56, 30]]
    # crop at top=2, left=5: points shift by (-5, -2); those that leave get v = 0 and x = y = 0
    _, out = JointTransform([_Crop(2, 5, 10, 14)])(image, target)
    # nose (4, 3) -> (-1, 1): outside; left_eye (7, 5) -> (2, 3)
    assert out["keypoints"].tolist() == [[[0, 0, 0], [2, 3, 1], [0, 0, 0]]]
    assert out["boxes"].tolist() == [[0, 0, 4, 4]]  # instance 1 left the crop: dropped
    assert out["labels"].tolist() == [1] and out["iscrowd"].tolist() == [0]
    assert out["masks"].shape == (1, 10, 14) and out["area"].tolist() == [16.0]


def test_instances_dropped_together_and_area_recomputed():
    image, target = _sample()
    _, out = JointTransform([Resize([10, 15])])(image, target)
    assert len(out["labels"]) == 2
    assert out["area"].tolist() == out["masks"].flatten(1).sum(1).float().tolist()
    # a crop that keeps a 1-pixel-wide sliver of instance 0 drops it with min_size 2
    crop = JointTransform([_Crop(0, 8, 20, 22)], min_size=2)
    _, out = crop(image, target)
    assert out["labels"].tolist() == [2] and out["keypoints"].shape == (1, 3, 3)
    assert out["iscrowd"].tolist() == [1] and out["masks"].shape == (1, 20, 22)
    assert out["boxes"].tolist() == [[12, 10, 20, 15]]


def test_empty_target_passes_through():
    image = tv_tensors.Image(torch.rand(1, H, W))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(H, W)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.zeros(0, H, W, dtype=torch.uint8)),
        "iscrowd": torch.zeros(0, dtype=torch.int64),
        "area": torch.zeros(0),
        "image_id": 1,
        "keypoints": torch.zeros(0, 3, 3),
    }
    torch.manual_seed(0)
    out_image, out = train_transforms(schema=SCHEMA, crop_size=16, flip=1.0)(image, target)
    assert out_image.shape == (1, 16, 16)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 16, 16)
    assert out["keypoints"].shape == (0, 3, 3)


def test_semantic_target_fill_is_ignore():
    image = tv_tensors.Image(torch.rand(3, H, W))
    semantic = tv_tensors.Mask(torch.zeros(H, W, dtype=torch.int64))
    semantic[:, W // 2:] = 1
    semantic[0, 0] = 255
    _, out = JointTransform([v2.RandomRotation((30, 30))])(image, semantic)
    assert isinstance(out, tv_tensors.Mask) and out.shape == (H, W)
    assert int(out[0, 0]) == 255 and int(out[-1, -1]) == 255  # corners: outside -> ignore
    assert set(out.unique().tolist()) == {0, 1, 255}
    _, padded = JointTransform([v2.Pad(2)])(image, semantic)
    assert (padded[:2] == 255).all() and torch.equal(padded[2:-2, 2:-2], semantic)
    with pytest.raises(UserError, match="semantic labels"):
        JointTransform([v2.Pad(1)])(image, tv_tensors.Mask(torch.full((H, W), 300)))


def test_train_preset_types_and_eval_preset():
    image, target = _sample()
    torch.manual_seed(1)
    out_image, out = make_transforms("train", schema=SCHEMA, crop_size=(16, 24))(image, target)
    assert isinstance(out_image, tv_tensors.Image) and out_image.shape == (3, 16, 24)
    assert out_image.dtype == torch.float32 and 0 <= out_image.min() and out_image.max() <= 1
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes)
    assert out["boxes"].canvas_size == (16, 24)
    assert isinstance(out["masks"], tv_tensors.Mask)
    assert type(out["keypoints"]) is torch.Tensor and out["keypoints"].dtype == torch.float32
    assert "keypoints_visibility" not in out
    same_image, same = make_transforms("eval")(image, target)
    assert same_image is image and same is target
    normalised, _ = eval_transforms(mean=[0.5] * 3, std=[0.25] * 3)(image, target)
    assert torch.allclose(normalised, (image - 0.5) / 0.25)
    with pytest.raises(UserError, match="both mean and std"):
        eval_transforms(mean=[0.5] * 3)


def test_make_transforms_names_and_callables():
    assert set(TRANSFORM_PRESETS) == {"train", "eval"}
    with pytest.raises(UserError, match="valid names: eval, train"):
        make_transforms("bogus")
    built = make_transforms(lambda **kw: JointTransform([], **kw), min_size=3)
    assert built.min_size == 3


@pytest.mark.parametrize("steps", [[HorizontalFlip(1.0)], [Resize([13, 17]), HorizontalFlip(1.0)]])
def test_fill_free_semantic_path_equals_the_shifted_path(steps, monkeypatch):
    """Flips and resizes of a semantic map skip the label shift (nothing is filled); the result
    is the one of the shifted path, void included."""
    image = tv_tensors.Image(torch.rand(3, H, W))
    semantic = tv_tensors.Mask(torch.randint(0, 5, (H, W)))
    semantic[3:6, 4:9] = 255
    fast_image, fast = JointTransform(steps)(image, semantic)
    monkeypatch.setattr("pixelwise.data.transforms.FILL_FREE", ())
    slow_image, slow = JointTransform(steps)(image, semantic)
    assert isinstance(fast, tv_tensors.Mask) and isinstance(fast_image, tv_tensors.Image)
    assert torch.equal(fast, slow) and torch.equal(fast_image, slow_image)
    assert (fast == 255).any()
    if len(steps) == 1:  # the flip by hand
        assert torch.equal(fast, semantic.flip(-1))
