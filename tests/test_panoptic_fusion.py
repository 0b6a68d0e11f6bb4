"""Panoptic fusion: exact hand-built id maps, a naive per-pixel reference, PQ = 1 on ground
truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.metrics.panoptic import PanopticQuality
from pixelwise.panoptic import FusionConfig, PanopticCategories, fuse_panoptic

# ids 1 "a" and 3 "b" are things, 5 "sky" and 7 "grass" stuff. Semantic labels (by id):
# 0 -> a, 1 -> b, 2 -> sky, 3 -> grass. Instance labels: 1 -> a, 2 -> b.
CATEGORIES = [
    {"id": 5, "name": "sky", "isthing": 0},
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 7, "name": "grass", "isthing": 0},
    {"id": 3, "name": "b", "isthing": 1},
]
CATS = PanopticCategories(CATEGORIES)
A, B, SKY, GRASS = 0, 1, 2, 3


def _mask(rows: slice, cols: slice, size: tuple[int, int] = (6, 6)) -> torch.Tensor:
    m = torch.zeros(size, dtype=torch.bool)
    m[rows, cols] = True
    return m


def _scene() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    masks = torch.stack([
        _mask(slice(0, 2), slice(0, 4)),  # 0: a, 0.9, 8 px
        _mask(slice(1, 3), slice(0, 4)),  # 1: b, 0.8, 8 px, half under instance 0
        _mask(slice(0, 3), slice(0, 2)),  # 2: a, 0.7, 6 px, all under 0 and 1
        _mask(slice(4, 6), slice(4, 6)),  # 3: b, 0.95, 4 px, alone
        _mask(slice(3, 4), slice(0, 6)),  # 4: a, 0.3 < 0.5
    ])
    instances = {"masks": masks, "scores": torch.tensor([0.9, 0.8, 0.7, 0.95, 0.3]),
                 "labels": torch.tensor([1, 2, 1, 2, 1])}
    semantic = torch.full((6, 6), SKY)
    semantic[:3] = A
    semantic[4:, :2] = GRASS  # 4 px of grass
    return instances, semantic


def test_things_by_score_overlap_and_stuff_area() -> None:
    instances, semantic = _scene()
    result = fuse_panoptic(instances, semantic, CATS, FusionConfig(stuff_area_threshold=5))
    expected = torch.tensor([
        [2, 2, 2, 2, 0, 0],
        [2, 2, 2, 2, 0, 0],  # instance 1's covered row stays instance 0's
        [3, 3, 3, 3, 0, 0],  # uncovered thing-class pixels (cols 4-5) are void
        [4, 4, 4, 4, 4, 4],  # sky
        [0, 0, 4, 4, 1, 1],  # grass (4 px < 5) is void; the 0.95 instance is segment 1
        [0, 0, 4, 4, 1, 1],
    ])
    assert torch.equal(result.ids, expected)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in result.segments] == [
        (1, 3, True, 4), (2, 1, True, 8), (3, 3, True, 4), (4, 5, False, 10)]
    assert [s.get("instance") for s in result.segments] == [3, 0, 1, None]


def test_stuff_area_threshold_is_inclusive() -> None:
    instances, semantic = _scene()
    result = fuse_panoptic(instances, semantic, CATS, FusionConfig(stuff_area_threshold=4))
    grass = [s for s in result.segments if s["category_id"] == 7]
    assert len(grass) == 1 and grass[0]["area"] == 4
    assert (result.ids[4:, :2] == grass[0]["id"]).all()


@pytest.mark.parametrize(("threshold", "kept"), [(0.5, True), (0.49, False), (1.0, True)])
def test_overlap_threshold_boundary(threshold: float, kept: bool) -> None:
    """Instance 1 has exactly half its mask covered: kept while the covered fraction is not
    above the threshold. Instance 2 is fully covered: never kept (its new area is empty)."""
    instances, semantic = _scene()
    result = fuse_panoptic(instances, semantic, CATS, FusionConfig(overlap_threshold=threshold))
    from_instance = [s.get("instance") for s in result.segments if s["isthing"]]
    assert (1 in from_instance) is kept
    assert 2 not in from_instance


def test_probability_masks_logits_and_channel_dim_match_bool_input() -> None:
    instances, semantic = _scene()
    reference = fuse_panoptic(instances, semantic, CATS)
    probs = instances["masks"].float() * 0.6 + 0.2  # 0.8 inside, 0.2 outside
    logits = torch.nn.functional.one_hot(semantic, 4).permute(2, 0, 1).float()  # (H,W,C)->(C,H,W)
    other = fuse_panoptic({**instances, "masks": probs[:, None]}, logits * 3 - 1, CATS)
    assert torch.equal(other.ids, reference.ids)
    assert other.segments == reference.segments


def test_no_instances_gives_stuff_only() -> None:
    _, semantic = _scene()
    empty = {"masks": torch.zeros(0, 6, 6), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)}
    result = fuse_panoptic(empty, semantic, CATS, FusionConfig(stuff_area_threshold=1))
    expected = torch.zeros(6, 6, dtype=torch.int64)
    expected[3:] = 1  # sky: row 3 and the right of rows 4-5
    expected[4:, :2] = 2  # grass
    assert torch.equal(result.ids, expected)
    assert [(s["category_id"], s["area"]) for s in result.segments] == [(5, 14), (7, 4)]


def test_no_stuff_gives_things_and_void() -> None:
    instances, _ = _scene()
    semantic = torch.full((6, 6), B)
    semantic[5, 5] = 255  # void in the semantic map stays void
    result = fuse_panoptic(instances, semantic, CATS, FusionConfig(stuff_area_threshold=0))
    assert all(s["isthing"] for s in result.segments)
    assert int((result.ids == 0).sum()) == 36 - 16


def _naive_fusion(masks: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  semantic: np.ndarray, cfg: FusionConfig) -> np.ndarray:
    """The heuristic pixel by pixel with python loops (an independent reference)."""
    n, h, w = masks.shape
    ids = np.zeros((h, w), np.int64)
    next_id = 1
    for i in sorted(range(n), key=lambda k: (-scores[k], k)):
        if scores[i] < cfg.instance_score_thresh:
            continue
        pixels = [(y, x) for y in range(h) for x in range(w) if masks[i, y, x]]
        new = [(y, x) for y, x in pixels if ids[y, x] == 0]
        if not new or (len(pixels) - len(new)) > cfg.overlap_threshold * len(pixels):
            continue
        for y, x in new:
            ids[y, x] = next_id
        next_id += 1
    for label in range(len(CATS.semantic_ids)):
        if CATS.semantic_is_thing[label]:
            continue
        free = [(y, x) for y in range(h) for x in range(w)
                if ids[y, x] == 0 and semantic[y, x] == label]
        if free and len(free) >= cfg.stuff_area_threshold:
            for y, x in free:
                ids[y, x] = next_id
            next_id += 1
    return ids


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_reference_on_random_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w, n = 13, 11, 7
    boxes = rng.integers(0, [h, w], size=(n, 2))
    masks = np.zeros((n, h, w), bool)
    for i, (y, x) in enumerate(boxes):
        masks[i, y: y + rng.integers(2, 7), x: x + rng.integers(2, 7)] = True
    scores = rng.choice([0.2, 0.55, 0.7, 0.9], size=n)  # ties: the lower index goes first
    labels = rng.integers(1, 3, size=n)
    semantic = rng.integers(0, 4, size=(h, w))
    cfg = FusionConfig(overlap_threshold=0.4, stuff_area_threshold=9)
    result = fuse_panoptic({"masks": torch.from_numpy(masks), "scores": torch.from_numpy(scores),
                            "labels": torch.from_numpy(labels)}, torch.from_numpy(semantic),
                           CATS, cfg)
    np.testing.assert_array_equal(result.ids.numpy(), _naive_fusion(masks, scores, labels,
                                                                    semantic, cfg))
    for seg in result.segments:  # areas and categories agree with the map
        assert int((result.ids == seg["id"]).sum()) == seg["area"]


def test_ground_truth_inputs_fuse_to_pq_one(tmp_path) -> None:
    from pixelwise.data.panoptic import CocoPanoptic
    from pixelwise.data.synthetic import synthesize

    root = synthesize("panoptic", tmp_path / "data", num=4, size=(64, 64), seed=3,
                      val_fraction=0.0)
    dataset = CocoPanoptic.from_layout(root, "train")
    categories = PanopticCategories(dataset.dataset["categories"])
    metric = PanopticQuality(dataset.dataset["categories"])
    stuff_seen = things_seen = 0
    for index in range(len(dataset)):
        _, target = dataset[index]
        keep = target["iscrowd"] == 0  # a crowd region is not an instance prediction
        instances = {"masks": target["masks"][keep].bool(),
                     "scores": torch.linspace(0.99, 0.9, int(keep.sum())),
                     "labels": target["labels"][keep]}
        result = fuse_panoptic(instances, target["semantic"].as_subclass(torch.Tensor),
                               categories, FusionConfig(stuff_area_threshold=1))
        things_seen += sum(s["isthing"] for s in result.segments)
        stuff_seen += sum(not s["isthing"] for s in result.segments)
        metric.update(target["panoptic"].numpy(), target["segments"], result.ids.numpy(),
                      result.segments, image=index)
    scores = metric.compute()
    assert things_seen > 0 and stuff_seen > 0
    assert scores["all"]["pq"] == pytest.approx(1.0)
    assert scores["things"]["pq"] == pytest.approx(1.0)
    assert scores["stuff"]["pq"] == pytest.approx(1.0)


@pytest.mark.parametrize(("change", "message"), [
    ({"labels": torch.tensor([1, 2, 1, 3, 1])}, "instance label 3 is outside 1..2"),
    ({"masks": torch.zeros(5, 6, 7, dtype=torch.bool)}, "instance masks are (6, 7)"),
    ({"scores": torch.zeros(4)}, "5 masks, 4 scores"),
])
def test_bad_instances_are_one_line_errors(change: dict, message: str) -> None:
    instances, semantic = _scene()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fuse_panoptic({**instances, **change}, semantic, CATS)


def test_bad_semantic_and_config() -> None:
    instances, semantic = _scene()
    semantic[0, 0] = 9
    with pytest.raises(UserError, match="semantic label 9"):
        fuse_panoptic(instances, semantic, CATS)
    with pytest.raises(UserError, match="5 classes"):
        fuse_panoptic(instances, torch.zeros(5, 6, 6), CATS)
    with pytest.raises(UserError, match="overlap_threshold"):
        FusionConfig(overlap_threshold=1.5)
    with pytest.raises(UserError, match="stuff_area_threshold"):
        FusionConfig(stuff_area_threshold=-1)
    with pytest.raises(UserError, match="isthing"):
        PanopticCategories([{"id": 1, "name": "x"}])


def test_models_trained_apart_fuse_through_class_names() -> None:
    """A semantic model with its own class order and an instance model with another give the
    same panoptic result as the dataset-ordered inputs."""
    instances, semantic = _scene()
    reference = fuse_panoptic(instances, semantic, CATS, FusionConfig(stuff_area_threshold=1))
    sem_names = ["grass", "a", "sky", "b"]  # the semantic model's labels 0..3
    thing_names = ["b", "a"]  # the instance model's labels 1, 2
    names = [c["name"] for c in CATS.categories]  # the dataset's semantic order (by id)
    sem_perm = torch.tensor([sem_names.index(n) for n in names])  # dataset label -> model label
    relabel = torch.tensor([0, thing_names.index("a") + 1, thing_names.index("b") + 1])
    cats = PanopticCategories.from_class_names(sem_names, thing_names, CATEGORIES)
    assert cats.semantic_ids == (7, 1, 5, 3) and cats.thing_ids == (3, 1)
    other = fuse_panoptic({**instances, "labels": relabel[instances["labels"]]},
                          sem_perm[semantic], cats, FusionConfig(stuff_area_threshold=1))
    assert torch.equal(other.ids, reference.ids)
    assert other.segments == reference.segments
    # without the dataset's categories: ids 1..C in the semantic model's order
    made = PanopticCategories.from_class_names(sem_names, thing_names)
    assert made.semantic_ids == (1, 2, 3, 4) and made.thing_ids == (4, 2)
    assert made.semantic_is_thing == (False, True, False, True)
    with pytest.raises(UserError, match=r"instance classes \['c'\]"):
        PanopticCategories.from_class_names(sem_names, ["c"])
    with pytest.raises(UserError, match=r"classes \['mud'\] are not among"):
        PanopticCategories.from_class_names(sem_names + ["mud"], thing_names, CATEGORIES)
