"""The instance and keypoint tasks: COCO result conversion (hand-computed cases), training
through the CLI (a few steps, exact resume), eval keys, the keypoint schema in the checkpoint,
the schema-aware flip in the training data, and bad input (schema mismatch, wrong sigmas,
empty images, degenerate and crowd boxes) as one-line errors or handled."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from safetensors.torch import load_file

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.errors import UserError
from pixelwise.metrics.coco import COCO_STAT_NAMES
from pixelwise.tasks.instance import (
    InstanceTask,
    KeypointTask,
    masks_to_rle,
    rescale_detections,
    to_coco_results,
)

# small R-CNNs: few proposals and sampled RoIs, thin heads (the box/mask heads dominate)
LEAN = ["--backbone", "resnet18", "--batch-size", "2", "--epochs", "2", "--lr", "1e-4",
        "--no-progress", "--deterministic"]
for _key, _value in dict(box_batch_size_per_image=32, rpn_batch_size_per_image=32,
                         rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                         rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                         box_detections_per_img=20).items():
    LEAN += ["--model-option", f"{_key}={_value}"]
MASK = ["--task", "instance", "--model", "mask_rcnn", "--mask-head-layers", "16", *LEAN]
KEYPOINT = ["--task", "keypoints", "--model", "keypoint_rcnn", "--keypoint-head-layers", "16",
            *LEAN]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("instance_task")


@pytest.fixture(scope="module")
def instance_data(root: Path) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("instance", root / "inst", num=6, size=(80, 80), seed=1,
                      val_fraction=0.25)


@pytest.fixture(scope="module")
def keypoint_data(root: Path) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("keypoints", root / "kp", num=4, size=(80, 80), seed=1,
                      val_fraction=0.25)


@pytest.fixture(scope="module")
def mask_run(root: Path, instance_data: Path) -> Path:
    """Mask R-CNN trained 2 steps in one go."""
    out = root / "mask_run"
    assert main(["train", "--data", str(instance_data), "--out", str(out), "--max-steps", "2",
                 *MASK]) == 0
    return out


@pytest.fixture(scope="module")
def keypoint_run(root: Path, keypoint_data: Path) -> Path:
    out = root / "keypoint_run"
    assert main(["train", "--data", str(keypoint_data), "--out", str(out), "--max-steps", "1",
                 "--scale-jitter", "0.9,1.1", "--color-jitter", "0", *KEYPOINT]) == 0
    return out


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


# ----------------------------------------------------------------------------- conversion


def test_coco_results_of_hand_made_detections() -> None:
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[1, 0, 4:6, 0:2] = 0.7
    masks[1, 0, 0, 0] = 0.5  # not above the threshold
    det = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 2.0, 6.0]]),
        "labels": torch.tensor([2, 1]),
        "scores": torch.tensor([0.75, 0.5]),
        "masks": masks,
        "keypoints": torch.tensor([[[1.0, 2.0, 1.0]], [[3.5, 0.25, 1.0]]]),
    }
    results = to_coco_results(det, 42, category_ids=(7, 11))
    assert [r["category_id"] for r in results] == [11, 7]  # label l -> category_ids[l - 1]
    assert [r["bbox"] for r in results] == [[2.0, 1.0, 3.0, 2.0], [0.0, 4.0, 2.0, 2.0]]
    assert [r["score"] for r in results] == [0.75, 0.5]
    assert [r["image_id"] for r in results] == [42, 42]
    assert [r["keypoints"] for r in results] == [[1.0, 2.0, 1.0], [3.5, 0.25, 1.0]]
    for result, mask in zip(results, masks[:, 0]):
        assert isinstance(result["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]),
                                      (mask > 0.5).numpy().astype(np.uint8))
    assert json.loads(json.dumps(results)) == results  # JSON-ready
    with pytest.raises(UserError, match="labels"):
        to_coco_results(det, 1, category_ids=(7,))


def test_bool_masks_encode_as_they_are() -> None:
    masks = torch.rand(3, 1, 5, 7) > 0.5
    rles = masks_to_rle(masks)
    decoded = np.stack([mask_utils.decode(r) for r in rles])
    np.testing.assert_array_equal(decoded, masks[:, 0].numpy())
    assert masks_to_rle(torch.zeros(0, 1, 5, 7, dtype=torch.bool)) == []


def test_rescale_maps_detections_back_to_the_original_size() -> None:
    mask = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    mask[0, 0, 2:4, 6:8] = True
    det = {"boxes": torch.tensor([[6.0, 2.0, 8.0, 4.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.5]), "masks": mask,
           "keypoints": torch.tensor([[[0.0, 9.0, 1.0]]])}
    assert rescale_detections(det, (10, 10), (10, 10)) is det
    wide = rescale_detections(det, (10, 10), (20, 30))  # y x2, x x3
    torch.testing.assert_close(wide["boxes"], torch.tensor([[18.0, 4.0, 24.0, 8.0]]))
    # pixel (0, 9) has its centre at (0.5, 9.5) -> (1.5, 19.0) -> pixel (1.0, 18.5)
    torch.testing.assert_close(wide["keypoints"], torch.tensor([[[1.0, 18.5, 1.0]]]))
    assert torch.equal(wide["labels"], det["labels"])
    big = rescale_detections(det, (10, 10), (20, 20))
    # bilinear x2: the block's border rows/columns get 0.75, its corners 0.5625 (> 0.5), the
    # pixels outside 0.25 at most
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[4:8, 12:16] = True
    assert big["masks"].dtype == torch.bool
    assert torch.equal(big["masks"][0, 0], expected)


# ----------------------------------------------------------------------------- data


def test_training_data_flips_keypoints_with_the_schema(keypoint_data: Path) -> None:
    """flip=1: every training sample is the mirrored eval sample, left/right keypoints swapped."""
    task = KeypointTask.from_data(keypoint_data, flip=1.0, scale=None, jitter=0.0)
    perm = task.schema.flip_permutation()
    assert perm != list(range(len(perm)))
    train = task.dataset(keypoint_data, "train", train=True)
    plain = task.dataset(keypoint_data, "train", train=False)
    checked = 0
    for i in range(len(train)):
        image, target = train[i]
        ref_image, ref = plain[i]
        torch.testing.assert_close(image, ref_image.flip(-1))
        kps, ref_kps = target["keypoints"], ref["keypoints"][:, perm]  # (N, K, 3), swapped
        height, width = image.shape[-2:]
        visible = ref_kps[..., 2] > 0
        torch.testing.assert_close(kps[..., 2], ref_kps[..., 2])
        # pixel x -> W - 1 - x; points in the last pixel's far half (e.g. y = 79.2 of 80) are
        # clamped to the last index by the transforms
        mirrored = (width - 1 - ref_kps[..., 0]).clamp(0, width - 1)
        torch.testing.assert_close(kps[..., 0][visible], mirrored[visible])
        torch.testing.assert_close(kps[..., 1][visible],
                                   ref_kps[..., 1].clamp(0, height - 1)[visible])
        checked += int(visible.sum())
    assert checked > 10


def test_targets_carry_what_evaluation_needs(instance_data: Path) -> None:
    task = InstanceTask.from_data(instance_data)
    assert task.num_classes == 5 and task.categories.category_ids == (1, 3, 7, 8)
    image, target = task.dataset(instance_data, "val", size=(40, 48))[0]
    assert image.shape[-2:] == (40, 48)
    assert target["orig_size"] == (80, 80)
    assert Path(target["annotation_file"]).name == "instances_val.json"


# ----------------------------------------------------------------------------- CLI


def test_training_resumes_exactly(mask_run: Path, instance_data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(instance_data), "--out", str(out), "--max-steps", "1",
                 *MASK]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert set(records[-1]["train"]) >= {"loss", "loss_mask", "loss_classifier", "loss_box_reg",
                                         "loss_objectness", "loss_rpn_box_reg"}
    resumed, straight = _model_tensors(out / "last.safetensors"), \
        _model_tensors(mask_run / "last.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert (mask_run / "curves.png").is_file()


def test_eval_reports_coco_ap_for_boxes_and_masks(mask_run: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(mask_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"bbox", "segm", "segm_AP", "per_class"}
    for iou_type in ("bbox", "segm"):
        assert tuple(metrics[iou_type]) == COCO_STAT_NAMES[iou_type]
    assert metrics["segm_AP"] == metrics["segm"]["AP"]
    assert main(["eval", str(mask_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert [line.split()[0] for line in lines[1:3]] == ["bbox", "segm"]
    # the test-time flip (`rcnn_tta`): the same metrics' names
    assert main(["eval", str(mask_run), "--tta", "flip", "--json"]) == 0
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["segm"].keys() == metrics["segm"].keys()


def test_keypoint_run_keeps_the_schema_and_refuses_other_keypoints(
        keypoint_run: Path, keypoint_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((keypoint_run / "config.json").read_text())
    names = json.loads((keypoint_data / "annotations" / "keypoints_train.json").read_text()
                       )["categories"][0]["keypoints"]
    assert config["model"]["schema"]["keypoints"] == names
    assert config["task"]["schema"]["keypoints"] == names
    assert main(["eval", str(keypoint_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"bbox", "keypoints", "keypoints_AP", "per_class"}
    assert tuple(metrics["keypoints"]) == COCO_STAT_NAMES["keypoints"]
    (person,) = metrics["per_class"].values()  # one category: its AP is the headline AP
    assert person["keypoints"]["AP"] == pytest.approx(metrics["keypoints_AP"], abs=1e-12)

    other = tmp_path / "five"
    shutil.copytree(keypoint_data, other)
    for path in (other / "annotations").glob("*.json"):
        data = json.loads(path.read_text())
        data["categories"][0]["keypoints"] = names[:5]
        data["categories"][0]["skeleton"] = [[1, 2]]
        for ann in data["annotations"]:
            ann["keypoints"] = ann["keypoints"][:15]
        path.write_text(json.dumps(data))
    assert main(["eval", str(keypoint_run), "--data", str(other)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "17 keypoints" in err and "has 5" in err


def test_wrong_sigmas_are_a_one_line_error(keypoint_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(keypoint_data, data)
    path = data / "annotations" / "keypoints_train.json"
    coco = json.loads(path.read_text())
    coco["categories"][0]["sigmas"] = [0.05, 0.05, 0.05]
    path.write_text(json.dumps(coco))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"),
                 *KEYPOINT]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3 sigmas for 17 keypoints" in err
    assert not (tmp_path / "run").exists()


def test_semantic_options_and_models_are_refused(instance_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(instance_data), "--out", out, *MASK,
                 "--loss", "dice"]) == EXIT_USER_ERROR
    assert "--loss does not apply to the instance task" in capsys.readouterr().err
    assert main(["train", "--data", str(instance_data), "--out", out, "--task", "instance",
                 "--model", "unet", "--depth", "1", "--width", "4", "--max-steps", "1",
                 "--no-progress", "--overwrite"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "detection model" in err


def test_scale_and_color_jitter_set_the_task_augmentation(
        instance_data: Path, mask_run: Path, keypoint_run: Path) -> None:
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import _task_jitter

    def task_of(run: Path) -> dict:
        return json.loads((run / "config.json").read_text())["task"]
    assert (task_of(mask_run)["scale"], task_of(mask_run)["jitter"]) == ([0.75, 1.25], 0.2)
    assert (task_of(keypoint_run)["scale"], task_of(keypoint_run)["jitter"]) == ([0.9, 1.1], 0)
    with pytest.raises(UserError, match="color_jitter is for the semantic task"):
        TrainConfig(task="panoptic", color_jitter=0.1)
    cfg = TrainConfig(task="instance", scale_jitter=(1, 1), color_jitter=0.0)  # no crop needed
    task = InstanceTask.from_data(instance_data, **_task_jitter(cfg))
    assert (task.scale, task.jitter) == (None, 0.0)
    image, _ = task.dataset(instance_data, "train")[0]
    for seed in range(4):  # only the flip is left
        torch.manual_seed(seed)
        out, _ = task.dataset(instance_data, "train", train=True)[0]
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))


def test_resume_keeps_the_task_augmentation_of_older_runs() -> None:
    """A run saved before `color_jitter` reached the instance task stored 0.0 there while its
    task jittered at 0.2: resuming takes the task section's settings."""
    from pixelwise.cli.train import _with_task_augmentation

    old = {"task": "instance", "scale_jitter": None, "color_jitter": 0.0}
    resumed = _with_task_augmentation(old, {"name": "instance", "scale": [0.75, 1.25],
                                            "jitter": 0.2})
    assert (resumed["scale_jitter"], resumed["color_jitter"]) == ([0.75, 1.25], 0.2)
    off = _with_task_augmentation({**old, "task": "keypoints"}, {"scale": None, "jitter": 0.0})
    assert (off["scale_jitter"], off["color_jitter"]) == ([1.0, 1.0], 0.0)
    semantic = {"task": "semantic", "color_jitter": 0.1}
    assert _with_task_augmentation(semantic, {"name": "semantic"}) == semantic


def test_empty_images_degenerate_and_crowd_boxes_train(
        instance_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An image without annotations, a zero-width box (dropped with a warning) and a crowd
    region (kept in the data, never a training target) in one batch: the step runs."""
    from torchvision.models.detection import generalized_rcnn

    data = tmp_path / "data"
    shutil.copytree(instance_data, data)
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    first, second = (im["id"] for im in coco["images"][:2])
    anns = [a for a in coco["annotations"] if a["image_id"] != first]  # `first` is empty
    kept = [a for a in anns if a["image_id"] == second]
    assert kept, "the test needs objects in the second image"
    crowd = dict(kept[0], id=10_000, iscrowd=1)
    degenerate = dict(kept[0], id=10_001, bbox=[5, 5, 0, 9])
    coco["annotations"] = anns + [crowd, degenerate]
    coco["images"] = coco["images"][:2]
    path.write_text(json.dumps(coco))

    seen: list[dict] = []
    original = generalized_rcnn.GeneralizedRCNN.forward

    def spy(self, images, targets=None):  # noqa: ANN001, ANN202
        if targets is not None:
            seen.extend(targets)
        return original(self, images, targets)

    monkeypatch.setattr(generalized_rcnn.GeneralizedRCNN, "forward", spy)
    caplog.set_level(logging.WARNING)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 *MASK]) == 0
    assert "zero width or height" in caplog.text
    task = InstanceTask.from_data(data)
    dataset = task.dataset(data, "train", train=False)
    crowded = dataset[[im["id"] for im in dataset.images].index(second)][1]
    assert int(crowded["iscrowd"].sum()) == 1  # the data keeps it ...
    by_size = sorted(seen[:2], key=lambda t: len(t["boxes"]))
    assert len(by_size[0]["boxes"]) == 0  # the empty image
    assert len(by_size[1]["boxes"]) == len(crowded["boxes"]) - 1  # ... the model never sees it


@pytest.mark.slow
def test_torchrun_trains_mask_rcnn(tmp_path: Path) -> None:
    """Two gloo processes train (DDP with unused parameters allowed) and validate together.

    The recorded validation is not compared with `pixelwise eval` of the checkpoint: each rank
    keeps its own batch-norm running statistics after the last step, so rank 1 validates a
    slightly different model than rank 0 saves (the oracle test in test_predict_instance checks
    the reduction itself)."""
    import os
    import subprocess
    import sys

    from pixelwise.data.synthetic import synthesize

    data = synthesize("instance", tmp_path / "data", num=6, size=(80, 80), seed=1,
                      val_fraction=0.5)  # 3 val images: uneven shards
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "pixelwise", "train", "--data", str(data), "--out",
               str(out), "--max-steps", "1", "--json", *MASK]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["steps"] == 1 and summary["images"] == 2
    assert set(summary["val"]) == {"bbox", "segm", "segm_AP", "per_class"}
    assert (out / "last.safetensors").is_file()


def test_evaluation_scores_as_many_detections_as_the_model_keeps() -> None:
    """COCO's 100 unless the model keeps more per image (crowded scenes: cells)."""
    from pixelwise.models import build_model
    from pixelwise.tasks.instance import evaluation_max_dets

    small = {"backbone": "resnet18", "fpn_channels": 16}
    assert evaluation_max_dets(build_model("mask_rcnn", num_classes=2, **small)) is None
    crowded = build_model("mask_rcnn", num_classes=2, box_detections_per_img=300, **small)
    assert evaluation_max_dets(crowded) == 300
    assert evaluation_max_dets(build_model("solov2", num_classes=2, max_detections=250,
                                           **small)) == 250


def test_eval_reports_ap_per_class(mask_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each class's AP / AP50 (boxes and masks); the classes' mean AP is the headline AP
    (pycocotools averages over the categories with ground truth)."""
    assert main(["eval", str(mask_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    per_class = metrics["per_class"]
    assert list(per_class) == [c["name"] for c in json.loads(
        (mask_run / "config.json").read_text())["task"]["categories"]]
    for iou_type in ("bbox", "segm"):
        aps = [row[iou_type]["AP"] for row in per_class.values() if row[iou_type]["AP"] is not None]
        assert aps and metrics[iou_type]["AP"] == pytest.approx(sum(aps) / len(aps), abs=1e-12)
    assert main(["eval", str(mask_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("") + 1:]
    assert table[0].split() == ["class", "bbox", "AP", "bbox", "AP50", "segm", "AP", "segm",
                                "AP50"]
    assert [line.split()[0] for line in table[1:]] == list(per_class)


def test_head_dtype_flag_keeps_the_boxes(mask_run: Path, keypoint_run: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--head-dtype bfloat16 (eval, predict): the box branch is unchanged, so bbox AP is
    exactly the float32 one; the mask / keypoint metrics are there with the same keys."""
    for run, head in ((mask_run, "segm"), (keypoint_run, "keypoints")):
        assert main(["eval", str(run), "--json"]) == 0
        plain = json.loads(capsys.readouterr().out)
        assert main(["eval", str(run), "--json", "--head-dtype", "bfloat16"]) == 0
        low = json.loads(capsys.readouterr().out)
        assert low["bbox"] == plain["bbox"]
        assert tuple(low[head]) == tuple(plain[head])
    boxes = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["predict", str(mask_run), str(mask_run.parent / "inst" / "images" / "val"),
                     "--out", str(out), "--head-dtype", dtype, "--score-threshold", "0",
                     "--json"]) == 0
        boxes[dtype] = [(r["image_id"], r["bbox"], r["score"])
                        for r in json.loads((out / "results.json").read_text())]
    capsys.readouterr()
    assert boxes["float32"] and boxes["bfloat16"] == boxes["float32"]


def test_head_dtype_is_refused_for_other_models() -> None:
    from pixelwise.cli._common import apply_head_dtype
    from pixelwise.models import build_model

    model = build_model("fcn8s", num_classes=3)
    with pytest.raises(UserError, match=r"^run/best.safetensors: --head-dtype applies to "
                       r"mask_rcnn and keypoint_rcnn runs \(fast=true\), not to a"):
        apply_head_dtype(model, "bfloat16", "run/best.safetensors")
    apply_head_dtype(model, None, "run/best.safetensors")  # not asked: nothing to refuse
    rcnn = build_model("mask_rcnn", num_classes=2, backbone="resnet18")
    apply_head_dtype(rcnn, "bfloat16", "run/best.safetensors")
    assert rcnn.roi_heads.head_dtype is torch.bfloat16
    apply_head_dtype(rcnn, "float32", "run/best.safetensors")
    assert rcnn.roi_heads.head_dtype is None
