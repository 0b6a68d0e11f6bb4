"""SOLOv2 model: configuration, upsampler option, training losses, eval outputs, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixelwise.data.coco import CocoInstances
from pixelwise.data.synthetic import synthesize
from pixelwise.errors import UserError
from pixelwise.models.solov2 import SOLOv2, points_nms, solov2
from pixelwise.upsample import UPSAMPLERS

TINY = dict(
    backbone="resnet18",
    grid_sizes=(8, 6, 4, 3, 2),
    scale_ranges=((1, 24), (12, 48), (24, 64), (48, 128), (64, 256)),
    head_channels=32,
    stacked_convs=1,
    kernel_channels=16,
    mask_channels=16,
)


def tiny(num_classes: int = 4, **options) -> SOLOv2:
    return solov2(num_classes, **{**TINY, **options})


def square_target(size: tuple[int, int], rects, labels) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(rects), *size, dtype=torch.uint8)
    for k, (top, bottom, left, right) in enumerate(rects):
        masks[k, top:bottom, left:right] = 1
    return {"masks": masks, "labels": torch.tensor(labels, dtype=torch.int64)}


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("name", [n for n in UPSAMPLERS if n != "max_unpool"])
def test_upsample_option_reaches_the_mask_feature_branch(name: str) -> None:
    model = tiny(upsample=name)
    ups = [m for m in model.mask_branch.modules() if isinstance(m, tuple(UPSAMPLERS.values()))]
    assert len(ups) == 1 + 2 + 3  # P3: 1 step, P4: 2, P5: 3
    assert all(type(m) is UPSAMPLERS[name] for m in ups)
    model.eval()
    out = model([torch.rand(3, 40, 56)])
    assert out[0]["masks"].shape[1:] == (1, 40, 56)


def test_upsample_factory_callable() -> None:
    """A callable factory is called as f(channels, scale=2) for each of the 6 steps."""
    calls = []

    def factory(channels: int, scale: int = 2) -> torch.nn.Module:
        calls.append((channels, scale))
        return UPSAMPLERS["nearest"](channels, scale)

    model = tiny(upsample=factory).eval()
    assert calls == [(16, 2)] * 6
    assert model([torch.rand(3, 45, 45)])[0]["masks"].shape[1:] == (1, 45, 45)


@pytest.mark.parametrize("options, message", [
    (dict(grid_sizes=(8, 6, 4)), "3 grid sizes for the 5 FPN levels"),
    (dict(scale_ranges=((1, 24), (12, 48))), "2 scale ranges for the 5 FPN levels"),
    (dict(upsample="max_unpool"), "max_unpool"),
    (dict(upsample="cubic"), "unknown upsampler 'cubic'"),
    (dict(backbone="vgg16"), "unknown backbone 'vgg16'"),
    (dict(nms_kernel="box"), "unknown Matrix NMS kernel"),
    (dict(grid_sizes=(8, 6, 4, 3, 0)), "grid sizes must be positive"),
    (dict(scale_ranges=((1, 24), (12, 48), (24, 64), (48, 128), (64, 2))), "0 <= low <= high"),
])
def test_configuration_errors(options, message) -> None:
    with pytest.raises(UserError, match=message) as info:
        tiny(**options)
    assert "\n" not in str(info.value)


def test_json_style_options() -> None:
    """Lists (as a checkpoint's JSON config gives them) build the same model as tuples."""
    model = tiny(grid_sizes=list(TINY["grid_sizes"]),
                 scale_ranges=[list(r) for r in TINY["scale_ranges"]])
    assert model.grid_sizes == TINY["grid_sizes"]
    assert model.scale_ranges == tuple((float(a), float(b)) for a, b in TINY["scale_ranges"])


def test_mobilenet_and_grey_inputs() -> None:
    model = tiny(backbone="mobilenet_v3_large", in_channels=1).eval()
    out = model([torch.rand(1, 33, 47)])
    assert out[0]["masks"].shape[1:] == (1, 33, 47)
    with pytest.raises(UserError, match=r"expected images of shape \(1, H, W\)"):
        model([torch.rand(3, 33, 47)])


# ----------------------------------------------------------------------------- training


def test_loss_dict_and_edge_cases() -> None:
    model = tiny().train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 60, 50)]
    many = [(2 * i, 2 * i + 2, 2 * j, 2 * j + 2) for i in range(12) for j in range(12)]
    targets = [
        # a normal object, one smaller than a level-0 cell (8 px), a crowd region (left out)
        {**square_target((64, 64), [(8, 40, 8, 40), (50, 52, 50, 52), (0, 5, 0, 5)], [1, 2, 3]),
         "iscrowd": torch.tensor([0, 0, 1])},
        square_target((60, 50), many, [1] * len(many)),  # 144 dots on an 8x8 finest grid
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_category", "loss_mask"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.kernel_out.weight.grad.abs().sum() > 0
    assert model.mask_branch.predictor[0].weight.grad.abs().sum() > 0


def test_images_without_objects() -> None:
    model = tiny().train()
    empty = {"masks": torch.zeros(0, 48, 48, dtype=torch.uint8),
             "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, 48, 48)] * 2, [empty, empty])
    assert losses["loss_mask"].item() == 0.0
    # all cells are negatives: the focal loss of the prior-initialised logits, normalised by 1
    assert 0 < losses["loss_category"].item() < 100
    sum(losses.values()).backward()  # the zero mask loss still reaches the mask parameters
    assert model.mask_branch.predictor[0].weight.grad is not None


def test_bad_targets() -> None:
    model = tiny().train()
    image = [torch.rand(3, 64, 64)]
    with pytest.raises(UserError, match="training mode needs targets"):
        model(image)
    with pytest.raises(UserError, match="labels must be in 1..3"):
        model(image, [square_target((64, 64), [(0, 8, 0, 8)], [4])])
    with pytest.raises(UserError, match="for an image of size"):
        model(image, [square_target((60, 64), [(0, 8, 0, 8)], [1])])
    with pytest.raises(UserError, match="needs 'masks'"):
        model(image, [{"labels": torch.tensor([1])}])


def test_loss_falls_on_synthetic_instances(tmp_path) -> None:
    root = synthesize("instance", tmp_path / "data", num=3, size=(64, 64), seed=1,
                      val_fraction=0.0)
    data = CocoInstances.from_layout(root, "train")
    samples = [data[i] for i in range(len(data))]
    samples = [(img, t) for img, t in samples if len(t["labels"])][:2]
    assert samples, "the synthetic scenes should hold objects"
    images = [img.as_subclass(torch.Tensor) for img, _ in samples]
    targets = [{"masks": t["masks"].as_subclass(torch.Tensor), "labels": t["labels"]}
               for _, t in samples]
    torch.manual_seed(0)
    model = tiny(num_classes=data.categories.num_classes).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["loss_mask"] < first["loss_mask"]
    assert last["loss_category"] < first["loss_category"]


# ----------------------------------------------------------------------------- inference


def test_eval_outputs_at_odd_sizes() -> None:
    model = tiny(score_threshold=0.0, update_threshold=0.0, max_detections=7).eval()
    out = model([torch.rand(3, 67, 71), torch.rand(3, 50, 33)])
    assert len(out) == 2 and len(out[0]["scores"]) > 0
    for det, (h, w) in zip(out, [(67, 71), (50, 33)]):
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        d = len(det["scores"])
        assert d <= 7
        assert det["masks"].shape == (d, 1, h, w) and det["masks"].dtype == torch.float32
        assert det["boxes"].shape == (d, 4) and det["labels"].dtype == torch.int64
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3
        binary = det["masks"][:, 0] > 0.5
        for box, m in zip(det["boxes"].tolist(), binary):  # each box encloses its mask tightly
            rows, cols = torch.nonzero(m, as_tuple=True)
            assert box == [cols.min().item(), rows.min().item(), cols.max().item() + 1,
                           rows.max().item() + 1]


def test_points_nms_keeps_local_maxima_of_the_up_left_window() -> None:
    probs = torch.tensor([[[[0.1, 0.5, 0.2], [0.3, 0.4, 0.9], [0.8, 0.1, 0.1]]]])
    kept = points_nms(probs)
    # a cell survives if it is >= its up, left and up-left neighbours
    expected = torch.tensor([[[[0.1, 0.5, 0.0], [0.3, 0.0, 0.9], [0.8, 0.0, 0.0]]]])
    torch.testing.assert_close(kept, expected)


def test_detect_hand_built_duplicates() -> None:
    """Two grid cells predict the same mask: Matrix NMS decays the second by exp(-2 * 1^2);
    the box comes from the upsampled mask."""
    model = tiny(num_classes=2, kernel_channels=1, grid_sizes=(2, 2, 2, 2, 2)).eval()
    feat = torch.full((1, 16, 16), -10.0)
    feat[0, 4:8, 4:12] = 10.0  # at 1/4 resolution: rows 4..7, cols 4..11
    cates = [torch.full((1, 2, 2), -10.0) for _ in range(5)]
    cates[0][0, 0, 0] = math.log(0.9 / 0.1)  # p = 0.9 at level 0, cell (0, 0)
    cates[1][0, 1, 1] = math.log(0.8 / 0.2)  # p = 0.8 at level 1, cell (1, 1)
    kernels = [torch.ones(1, 2, 2) for _ in range(5)]
    det = model.detect(cates, kernels, feat, (64, 64), (64, 64))
    m = torch.sigmoid(torch.tensor(10.0))  # maskness of a +-10 logit mask
    torch.testing.assert_close(det["scores"],
                               torch.stack([0.9 * m, 0.8 * m * math.exp(-2.0)]))
    assert det["labels"].tolist() == [1, 1]
    # bilinear x4: input rows 4..7 -> output rows 16..31, cols 4..11 -> 16..47
    assert det["boxes"].tolist() == [[16.0, 16.0, 48.0, 32.0]] * 2
    binary = det["masks"][0, 0] > 0.5
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[16:32, 16:48] = True
    for y, x in ((16, 16), (16, 47), (31, 16), (31, 47)):  # corners: 0.625^2 < 0.5 inside
        expected[y, x] = False
    assert torch.equal(binary, expected)


def test_min_mask_area() -> None:
    """A 2 x 3 mask at 1/4 resolution (96 input pixels): the official rule (area > stride 8 at
    1/4 resolution) drops it, the default keeps it, min_mask_area=100 drops it."""
    feat = torch.full((1, 16, 16), -10.0)
    feat[0, 4:6, 4:7] = 10.0
    cates = [torch.full((1, 2, 2), -10.0) for _ in range(5)]
    cates[0][0, 0, 0] = 5.0
    kernels = [torch.ones(1, 2, 2) for _ in range(5)]
    kept = {}
    for area in (None, 0, 95, 100):
        model = tiny(num_classes=2, kernel_channels=1, grid_sizes=(2, 2, 2, 2, 2),
                     min_mask_area=area).eval()
        kept[area] = len(model.detect(cates, kernels, feat, (64, 64), (64, 64))["scores"])
    assert kept == {None: 0, 0: 1, 95: 1, 100: 0}
    with pytest.raises(UserError, match="min_mask_area"):
        tiny(min_mask_area=-1)


def test_no_detections() -> None:
    model = tiny(score_threshold=1.0).eval()
    (det,) = model([torch.rand(3, 40, 40)])
    assert det["masks"].shape == (0, 1, 40, 40) and det["boxes"].shape == (0, 4)
    assert det["labels"].shape == (0,) and det["scores"].shape == (0,)


def test_detect_flip_test_hand_built() -> None:
    """The test-time flip: a cell's category probability averages with its mirror cell's
    (column S-1-j) of the mirrored canvas, its mask with the mirror cell's mask mirrored back."""
    model = tiny(num_classes=2, kernel_channels=1, grid_sizes=(2, 2, 2, 2, 2)).eval()
    feat = torch.full((1, 16, 16), -10.0)
    feat[0, 4:8, 4:12] = 10.0  # the canvas: columns 4..11 at 1/4 resolution
    cates = [torch.full((1, 2, 2), -10.0) for _ in range(5)]
    cates[0][0, 0, 0] = math.log(0.9 / 0.1)  # p = 0.9 at level 0, cell (0, 0)
    kernels = [torch.ones(1, 2, 2) for _ in range(5)]
    # the mirrored canvas: p = 0.5 at cell (0, 1) = the mirror of (0, 0); its kernel there
    # (and nowhere else) finds columns 8..11 (mirrored: 4..7) at +10 and 4..7 (mirrored: 8..11)
    # at -2
    m_cates = [torch.full((1, 2, 2), -10.0) for _ in range(5)]
    m_cates[0][0, 0, 1] = 0.0
    m_feat = torch.full((1, 16, 16), -10.0)
    m_feat[0, 4:8, 8:12] = 10.0
    m_feat[0, 4:8, 4:8] = -2.0
    m_kernels = [torch.full((1, 2, 2), -1.0) for _ in range(5)]
    m_kernels[0][0, 0, 1] = 1.0
    det = model.detect(cates, kernels, feat, (64, 64), (64, 64),
                       mirror=(m_cates, m_kernels, m_feat))
    high, low = torch.sigmoid(torch.tensor(10.0)), torch.sigmoid(torch.tensor(-2.0))
    mask = torch.full((16, 16), float(torch.sigmoid(torch.tensor(-10.0))))  # both -10
    mask[4:8, 4:8] = high
    mask[4:8, 8:12] = (high + low) / 2  # 0.56: still inside the mask
    maskness = mask[4:8, 4:12].mean()
    assert det["labels"].tolist() == [1]
    torch.testing.assert_close(det["scores"], (0.7 * maskness)[None])
    expected = F.interpolate(mask[None, None], size=(64, 64), mode="bilinear",
                             align_corners=False)[0]
    torch.testing.assert_close(det["masks"][0], expected)
    # without the mirror: the canvas's own cell, 0.9 and its own mask
    plain = model.detect(cates, kernels, feat, (64, 64), (64, 64))
    torch.testing.assert_close(plain["scores"], (0.9 * high)[None])


def test_flip_test_runs_the_mirrored_canvas() -> None:
    """`set_flip_test(True)`: each image's detections are `detect` with the network's maps of
    the mirrored (padded) canvas; images of two sizes in one batch; its mask classifier
    averages the crops' symmetries; off again: as before."""
    torch.manual_seed(0)
    model = tiny(score_threshold=0.0, update_threshold=0.0, mask_classifier=True,
                 classifier_size=8, classifier_widths=[8]).eval()
    images = [torch.rand(3, 40, 56), torch.rand(3, 64, 48)]
    calls = []
    classify = model.mask_classifier.forward
    model.mask_classifier.forward = lambda *a, **kw: calls.append(kw["symmetries"]) or classify(
        *a, **kw)
    with torch.no_grad():
        plain = model(images)
        assert calls == [False, False]
        model.set_flip_test(True)
        flipped = model(images)
        assert calls[2:] == [True, True]
        batch, sizes = model.batch_images(images)
        cates, kernels, features = model.predict_maps(batch)
        m_cates, m_kernels, m_features = model.predict_maps(batch.flip(-1))
        for b, det in enumerate(flipped):
            expected = model.detect([c[b] for c in cates], [k[b] for k in kernels], features[b],
                                    sizes[b], tuple(batch.shape[-2:]), batch[b],
                                    mirror=([c[b] for c in m_cates], [k[b] for k in m_kernels],
                                            m_features[b]))
            assert det.keys() == expected.keys()
            for key in det:
                torch.testing.assert_close(det[key], expected[key])
            assert det["masks"].shape[-2:] == images[b].shape[-2:]
            assert not torch.equal(det["scores"], plain[b]["scores"])
        model.set_flip_test(False)
        again = model(images)
    for before, after in zip(plain, again):
        torch.testing.assert_close(after["scores"], before["scores"])
