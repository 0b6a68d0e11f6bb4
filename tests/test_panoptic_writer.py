"""COCO panoptic prediction files: a round trip through `pixelwise metrics panoptic`, an
independent re-read of the PNGs, and the refusals of bad predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.errors import UserError
from pixelwise.metrics.panoptic import PanopticQuality
from pixelwise.panoptic import (FusionConfig, PanopticCategories, PanopticPredictionWriter,
                                fuse_panoptic, ids_from_masks)

CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    from pixelwise.data.panoptic import CocoPanoptic
    from pixelwise.data.synthetic import synthesize

    root = synthesize("panoptic", tmp_path_factory.mktemp("pan") / "data", num=5, size=(48, 64),
                      seed=11, val_fraction=0.0)
    return root, CocoPanoptic.from_layout(root, "train")


def _imperfect_prediction(target: dict, index: int) -> tuple[dict, torch.Tensor]:
    """Ground truth, spoilt: the first instance dropped, masks shifted by a pixel, and a band
    of the semantic map set to the first stuff class, so that PQ < 1."""
    keep = target["iscrowd"] == 0
    masks = target["masks"][keep].bool()[1:]
    masks = torch.roll(masks, shifts=index % 2, dims=-1)
    semantic = target["semantic"].as_subclass(torch.Tensor).clone()
    semantic[:, : 6 + index] = semantic.max()
    instances = {"masks": masks, "scores": torch.linspace(0.95, 0.6, masks.shape[0]),
                 "labels": target["labels"][keep][1:]}
    return instances, semantic


def test_round_trip_matches_in_memory_pq_and_independent_reread(dataset, tmp_path: Path,
                                                                 capsys) -> None:
    root, ds = dataset
    gt_json = root / "annotations" / "panoptic_train.json"
    categories = json.loads(gt_json.read_text())["categories"]
    cats = PanopticCategories(categories)
    metric = PanopticQuality(categories)
    fused = {}
    out = tmp_path / "pred"
    with PanopticPredictionWriter(out, categories) as writer:
        for index in range(len(ds)):
            _, target = ds[index]
            info = ds.images[index]
            result = fuse_panoptic(*_imperfect_prediction(target, index), cats,
                                   FusionConfig(stuff_area_threshold=8))
            writer.add(info["id"], info["file_name"], result.ids, result.segments,
                       size=(info["height"], info["width"]))
            metric.update(target["panoptic"].numpy(), target["segments"], result.ids.numpy(),
                          result.segments, image=index)
            fused[info["id"]] = result
    in_memory = metric.compute()
    assert 0.2 < in_memory["all"]["pq"] < 0.99  # imperfect, not hopeless

    code = main(["metrics", "panoptic", "--gt-json", str(gt_json), "--gt-dir",
                 str(root / "panoptic" / "train"), "--pred-json", str(out / "panoptic.json"),
                 "--pred-dir", str(out / "panoptic"), "--json"])
    assert code == 0
    from_files = json.loads(capsys.readouterr().out)
    for group in ("all", "things", "stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert from_files[group][key] == pytest.approx(in_memory[group][key], abs=1e-12)

    # independent: decode each PNG by hand, recount areas and boxes with numpy
    data = json.loads((out / "panoptic.json").read_text())
    assert data["categories"] == categories
    assert {im["id"] for im in data["images"]} == set(fused)
    for ann in data["annotations"]:
        with Image.open(out / "panoptic" / ann["file_name"]) as png:
            assert png.mode == "RGB"
            rgb = np.asarray(png).astype(np.int64)  # (H, W, 3)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        np.testing.assert_array_equal(ids, fused[ann["image_id"]].ids.numpy())
        assert sorted(s["id"] for s in ann["segments_info"]) == sorted(set(np.unique(ids)) - {0})
        for seg in ann["segments_info"]:
            ys, xs = np.nonzero(ids == seg["id"])
            assert seg["area"] == len(ys)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
            assert seg["iscrowd"] == 0
            assert set(seg) == {"id", "category_id", "area", "bbox", "iscrowd"}


def _ids() -> np.ndarray:
    ids = np.zeros((4, 5), np.int64)
    ids[:2, :2] = 7
    ids[2:, 1:] = 300_000  # needs all three bytes of the colour
    return ids


GOOD = [{"id": 7, "category_id": 1}, {"id": 300_000, "category_id": 2}]


@pytest.mark.parametrize(("ids", "segments", "size", "message"), [
    (_ids(), [GOOD[0], {"id": 300_000, "category_id": 9}], None,
     r"image 3 \(x.jpg\): segment 300000 has category_id 9, unknown"),
    (_ids(), GOOD[:1], None, r"image 3 \(x.jpg\): ids \[300000\] are in the panoptic map but not"),
    (_ids(), GOOD + [{"id": 8, "category_id": 1}], None, r"segments_info ids \[8\] do not occur"),
    (_ids(), GOOD, (4, 6), r"image 3 \(x.jpg\): the panoptic map is 4x5 but the image is 4x6"),
    (_ids(), GOOD + [{"id": 7, "category_id": 1}], None, "duplicate segment id 7"),
    (_ids().astype(float), GOOD, None, "must be integers"),
    (_ids() * 100, [{"id": 700, "category_id": 1}, {"id": 30_000_000, "category_id": 2}], None,
     r"must be in \[0, 2\^24\)"),
])
def test_bad_predictions_are_refused_and_nothing_is_written(tmp_path: Path, ids, segments, size,
                                                            message: str) -> None:
    out = tmp_path / "pred"
    with pytest.raises(UserError, match=message):
        with PanopticPredictionWriter(out, CATEGORIES) as writer:
            writer.add(3, "x.jpg", ids, segments, size=size)
    assert not out.exists() or not any(out.rglob("*"))


def test_good_prediction_and_duplicates(tmp_path: Path) -> None:
    writer = PanopticPredictionWriter(tmp_path, CATEGORIES)
    ann = writer.add(3, "sub/x.jpg", torch.from_numpy(_ids()), GOOD)
    assert ann["file_name"] == "sub/x.png"
    assert [s["area"] for s in ann["segments_info"]] == [4, 8]
    assert ann["segments_info"][1]["bbox"] == [1, 2, 4, 2]
    with pytest.raises(UserError, match="already written"):
        writer.add(3, "y.jpg", _ids(), GOOD)
    with pytest.raises(UserError, match="already wrote sub/x.png"):
        writer.add(4, "sub/x.tif", _ids(), GOOD)
    with pytest.raises(UserError, match="escapes"):
        writer.add(5, "../z.jpg", _ids(), GOOD)
    path = writer.close()
    assert [a["image_id"] for a in json.loads(path.read_text())["annotations"]] == [3]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["panoptic.json",
                                                                          "x.png"]


def test_ids_from_masks_refuses_overlap() -> None:
    masks = np.zeros((2, 3, 3), bool)
    masks[0, :2] = True
    masks[1, 1:] = True
    with pytest.raises(UserError, match=r"image 9: segments \[4, 5\] overlap \(3 pixels"):
        ids_from_masks(masks, [4, 5], image=9)
    masks[1, 1] = False
    ids = ids_from_masks(masks, [4, 5])
    np.testing.assert_array_equal(ids, [[4, 4, 4], [4, 4, 4], [5, 5, 5]])
