"""Semantic task: the losses against naive per-pixel references, ignore index and class weights,
gradients (float64 gradcheck), loss specs, target cropping, collation and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.tasks import TASKS, build_task
from pixelwise.tasks.losses import (
    LOSSES,
    AreaTarget,
    area_targets,
    make_losses,
    soft_dice_loss,
    softmax_focal_loss,
)
from pixelwise.tasks.semantic import SemanticTask, coarse_logits, collate, match_target

IGNORE = 255


def sample(n: int = 2, k: int = 3, h: int = 5, w: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, k, h, w, generator=g, dtype=dtype)
    target = torch.randint(0, k, (n, h, w), generator=g)
    target[0, 0, :3] = IGNORE
    target[-1, 2, 1] = IGNORE
    return logits, target


def dice_reference(logits, target, weight=None, smooth=1.0):
    n, k, h, w = logits.shape
    probs = logits.softmax(1)
    losses = []
    for c in range(k):
        inter = card_p = card_g = 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    t = int(target[i, y, x])
                    if t == IGNORE:
                        continue
                    p = float(probs[i, c, y, x])
                    g = 1.0 if t == c else 0.0
                    inter += p * g
                    card_p += p
                    card_g += g
        losses.append(1 - (2 * inter + smooth) / (card_p + card_g + smooth))
    if weight is None:
        return sum(losses) / k
    return sum(wc * lc for wc, lc in zip(weight, losses)) / sum(weight)


def focal_reference(logits, target, weight=None, gamma=2.0):
    n, k, h, w = logits.shape
    num = den = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == IGNORE:
                    continue
                z = [float(logits[i, c, y, x]) for c in range(k)]
                log_p = z[t] - math.log(sum(math.exp(v) for v in z))
                wt = 1.0 if weight is None else weight[t]
                num += -wt * (1 - math.exp(log_p)) ** gamma * log_p
                den += wt
    return num / den


@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5]])
def test_dice_matches_a_per_pixel_loop(weight) -> None:
    logits, target = sample()
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    got = soft_dice_loss(logits, target, ignore_index=IGNORE, weight=w)
    assert float(got) == pytest.approx(dice_reference(logits, target, weight), rel=1e-12)


def test_dice_gradient_equals_the_one_hot_formulas() -> None:
    """The loss gathers each pixel's class instead of multiplying by a one-hot target: its
    gradient must equal autograd's through the textbook one-hot expression."""
    logits, target = sample()
    ours = logits.clone().requires_grad_(True)
    soft_dice_loss(ours, target, ignore_index=IGNORE).backward()
    ref = logits.clone().requires_grad_(True)
    valid = (target != IGNORE).unsqueeze(1).double()  # (N, 1, H, W)
    onehot = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2) * valid
    probs = ref.softmax(1) * valid
    dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1) / (probs.sum((0, 2, 3))
                                                         + onehot.sum((0, 2, 3)) + 1)
    (1 - dice).mean().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5]])
def test_focal_matches_a_per_pixel_loop(gamma, weight) -> None:
    logits, target = sample()
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    got = softmax_focal_loss(logits, target, ignore_index=IGNORE, weight=w, gamma=gamma)
    assert float(got) == pytest.approx(focal_reference(logits, target, weight, gamma), rel=1e-12)


def test_focal_with_gamma_zero_is_torch_cross_entropy_with_weights_and_ignore() -> None:
    logits, target = sample()
    w = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)  # exact in float32 too
    expected = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    got = softmax_focal_loss(logits, target, ignore_index=IGNORE, weight=w, gamma=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    ce = make_losses("ce", ignore_index=IGNORE, class_weights=[0.25, 1.0, 3.0])["ce"]
    torch.testing.assert_close(ce(logits, target), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_change_nothing_and_get_no_gradient(name) -> None:
    logits, target = sample()
    loss = LOSSES[name](ignore_index=IGNORE)
    changed = logits.clone()
    changed[target.unsqueeze(1).expand_as(logits) == IGNORE] = 50.0
    assert torch.equal(loss(logits, target), loss(changed, target))
    x = logits.clone().requires_grad_(True)
    loss(x, target).backward()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(x)
    assert torch.all(x.grad[ignored] == 0) and torch.any(x.grad[~ignored] != 0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name) -> None:
    logits, target = sample(n=1, k=3, h=3, w=3)
    loss = LOSSES[name](ignore_index=IGNORE, weight=torch.tensor([1.0, 2.0, 0.5]))
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits.requires_grad_(True),))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_confident_correct_prediction_has_near_zero_loss(name) -> None:
    _, target = sample()
    logits = 30.0 * F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).double()
    assert float(LOSSES[name](ignore_index=IGNORE)(logits, target)) < 1e-6
    assert float(LOSSES[name](ignore_index=IGNORE)(-logits, target)) > 0.3


def test_loss_specs() -> None:
    assert list(make_losses("ce+dice")) == ["ce", "dice"]
    assert list(make_losses("focal + dice")) == ["focal", "dice"]
    with pytest.raises(UserError, match="valid names: ce, dice, focal"):
        make_losses("ce+lovasz")
    with pytest.raises(UserError, match="twice"):
        make_losses("ce+ce")
    with pytest.raises(UserError, match="2 class weights for 3 classes"):
        make_losses("ce", class_weights=[1, 2], num_classes=3)


def test_task_loss_dict_sums_the_terms_and_crops_a_smaller_output() -> None:
    logits, target = sample(h=6, w=6, dtype=torch.float32)
    task = SemanticTask(3, loss="ce+dice+focal")

    def valid_conv_model(images):  # like U-Net "valid": output 2 pixels smaller on each side
        return logits[..., 2:-2, 2:-2]

    terms = task.loss(valid_conv_model, (torch.zeros(2, 3, 6, 6), target))
    assert list(terms) == ["ce", "dice", "focal"]
    inner = target[..., 2:-2, 2:-2]
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits[..., 2:-2, 2:-2], inner,
                                                            ignore_index=IGNORE))
    assert torch.equal(match_target(logits, target), target)
    with pytest.raises(UserError, match="does not fit"):
        match_target(logits[..., :5, :], target)


def test_area_targets_by_hand() -> None:
    # one 3 x 3 image in 2 x 2 blocks (padded to 4 x 4 with unlabelled pixels)
    target = torch.tensor([[[0, 1, 2], [1, IGNORE, 2], [0, 0, 1]]])
    soft = area_targets(target, 2, 3, IGNORE)
    assert soft.mass.shape == (1, 3, 2, 2) and soft.valid.shape == (1, 2, 2)
    assert soft.mass[0, :, 0, 0].tolist() == [1, 2, 0]  # 0, 1 / 1, ignore
    assert soft.mass[0, :, 0, 1].tolist() == [0, 0, 2]  # 2 / 2, padding
    assert soft.mass[0, :, 1, 0].tolist() == [2, 0, 0]  # 0, 0, padding below
    assert soft.mass[0, :, 1, 1].tolist() == [0, 1, 0]
    assert soft.valid[0].tolist() == [[3, 2], [2, 1]]
    same = area_targets(target, 1, 3, IGNORE)  # one-pixel blocks: the one-hot labels
    assert torch.equal(same.mass.argmax(1)[same.valid > 0], target[target != IGNORE])
    with pytest.raises(UserError, match="labels must be in 0..2"):
        area_targets(torch.tensor([[[0, 3]]]), 2, 3, IGNORE)
    with pytest.raises(UserError, match="labels must be in 0..2"):
        area_targets(torch.tensor([[[0, -1]]]), 2, 3, IGNORE)
    # a negative ignore index (torch's -100) counts nowhere, as 255 does
    negative = area_targets(torch.where(target == IGNORE, -100, target), 2, 3, -100)
    assert torch.equal(negative.mass, soft.mass) and torch.equal(negative.valid, soft.valid)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5]])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_block_losses_equal_the_pixel_losses_on_repeated_logits(name, weight, factor) -> None:
    """The loss of coarse logits against `area_targets` == the integer-target loss of the same
    logits repeated over each block's pixels (the pixels padding adds are not counted)."""
    coarse, _ = sample(h=3, w=2)
    _, target = sample(h=3 * factor - (factor > 1), w=2 * factor - (factor > 1))
    weights = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = LOSSES[name](ignore_index=IGNORE, weight=weights)
    fine = coarse.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    fine = fine[..., :target.shape[1], :target.shape[2]]  # (N, K, H, W)
    expected = loss(fine, target)
    got = loss(coarse, area_targets(target, factor, 3, IGNORE))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_block_cross_entropy_by_hand() -> None:
    # one block: 3 pixels of class 0, 1 of class 1, logits (0, log 3): p = (1/4, 3/4)
    logits = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 2, 1, 1)
    soft = AreaTarget(torch.tensor([3.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1),
                      torch.tensor([[[4.0]]], dtype=torch.float64))
    expected = -(3 * math.log(1 / 4) + math.log(3 / 4)) / 4
    assert math.isclose(float(LOSSES["ce"]()(logits, soft)), expected, rel_tol=1e-12)


def test_loss_at_net_trains_a_coarse_unet_on_its_own_logits() -> None:
    from pixelwise.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", num_classes=3, width=4, depth=2, input_scale=0.25)
    images = torch.rand(2, 3, 30, 34)
    target = torch.randint(0, 3, (2, 30, 34))
    task = SemanticTask(3, loss="ce+dice", loss_at="net")
    terms = task.loss(model, (images, target))
    assert model.coarse_output is False  # switched back
    with coarse_logits(model) as factor:
        coarse = model(images)
    assert factor == 4 and coarse.shape == (2, 3, 8, 9)  # ceil(30 / 4), ceil(34 / 4)
    soft = area_targets(target, 4, 3, IGNORE)
    torch.testing.assert_close(terms["ce"], LOSSES["ce"]()(coarse, soft))
    torch.testing.assert_close(terms["dice"], LOSSES["dice"]()(coarse, soft))
    assert model(images).shape == (2, 3, 30, 34)  # outside: the image's resolution
    # models at the image's resolution, and the default "image", use the labels as they are
    full = SemanticTask(3, loss="ce").loss(model, (images, target))["ce"]
    torch.testing.assert_close(full, F.cross_entropy(model(images), target, ignore_index=IGNORE))
    plain = build_model("unet", num_classes=3, width=4, depth=2)
    with coarse_logits(plain) as factor:
        assert factor == 1 and plain(images).shape == (2, 3, 30, 34)
    with pytest.raises(UserError, match="loss_at"):
        SemanticTask(3, loss_at="pixels")


def test_evaluate_counts_pixels_like_a_direct_comparison() -> None:
    _, target = sample(n=3, h=8, w=7)
    g = torch.Generator().manual_seed(1)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target.clamp(max=2),
                       torch.randint(0, 3, target.shape, generator=g))
    one_hot = F.one_hot(pred, 3).permute(0, 3, 1, 2).float()  # (N, K, H, W)

    class Oracle(torch.nn.Module):  # returns the fixed prediction for image i (its value)
        def forward(self, images):
            return one_hot[images[:, 0, 0, 0].long()]

    images = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 1, 8, 7)
    batches = [(images[:2], target[:2]), (images[2:], target[2:])]
    metrics = SemanticTask(3, class_names=["a", "b", "c"]).evaluate(
        Oracle(), batches, device=torch.device("cpu"))
    valid = target != IGNORE
    assert metrics["pixel_accuracy"] == pytest.approx(
        float((pred == target)[valid].sum()) / float(valid.sum()), rel=1e-12)
    ious = []
    for c in range(3):
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        ious.append(float(inter) / float(union))
    assert metrics["miou"] == pytest.approx(sum(ious) / 3, rel=1e-12)
    assert list(metrics["per_class"]) == ["a", "b", "c"]


def test_collate_and_config_round_trip() -> None:
    images, masks = collate([(torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))] * 2)
    assert images.shape == (2, 3, 4, 5) and masks.shape == (2, 4, 5) and masks.dtype == torch.int64
    with pytest.raises(UserError, match="--size"):
        collate([(torch.zeros(3, 4, 5), torch.zeros(4, 5)),
                 (torch.zeros(3, 5, 5), torch.zeros(5, 5))])
    task = SemanticTask(3, class_names=["a", "b", "c"], loss="ce+dice", class_weights=[1, 2, 3])
    again = build_task(task.config())
    assert again.config() == task.config() and list(again.losses) == ["ce", "dice"]
    assert TASKS["semantic"] is SemanticTask
    with pytest.raises(UserError, match="valid names"):
        build_task({"name": "depth"})


def test_dataset_from_a_folder_resizes_images_and_masks(tmp_path) -> None:
    from pixelwise.data.synthetic import synthesize

    root = synthesize("semantic", tmp_path / "d", num=5, size=(24, 20), seed=0)
    task = SemanticTask.from_data(root, loss="dice")
    assert task.num_classes == len(task.class_names) and task.ignore_index == 255
    image, mask = task.dataset(root, "train", size=(16, 12), train=True)[0]
    assert image.shape[-2:] == (16, 12) and mask.shape == (16, 12) and mask.dtype == torch.int64
    image, mask = task.dataset(root, "val")[0]
    assert image.shape[-2:] == (24, 20)
