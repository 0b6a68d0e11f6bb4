"""`pixelwise predict` / `pixelwise eval` for instance and keypoint runs, checked with an oracle.

The oracle is a detection "model" that returns the ground truth of each image, perturbed (some
objects missed, boxes shifted, masks eroded, keypoints moved, a false positive, seeded scores):
its AP is known to lie strictly between 0 and 1, so that the agreement of `pixelwise eval` with
pycocotools run directly on `results.json` (`COCO.loadRes` + `COCOeval`) is a real check of the
category ids, image ids, RLE masks and keypoint conventions -- an untrained R-CNN scores 0
everywhere, which any bug would agree with.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.data.images import image_to_float, read_image
from pixelwise.metrics.coco import COCO_STAT_NAMES


pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


class Oracle(nn.Module):
    """Perturbed ground-truth detections of the images of one COCO json (module docstring)."""

    def __init__(self, num_classes: int, *, annotations: str = "", images: str = "",
                 seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # something for the checkpoint to hold
        data = json.loads(Path(annotations).read_text())
        labels = {c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"],
                                                                key=lambda c: c["id"]))}
        rng = np.random.default_rng(seed)
        num_keypoints = len(data["categories"][0].get("keypoints") or [])
        self.by_digest: dict[str, dict[str, torch.Tensor]] = {}
        for info in sorted(data["images"], key=lambda im: im["id"]):
            image = image_to_float(read_image(Path(images) / info["file_name"]))
            h, w = image.shape[-2:]
            anns = [a for a in data["annotations"]
                    if a["image_id"] == info["id"] and not a.get("iscrowd")]
            boxes, cats, masks, kps, scores = [], [], [], [], []
            for k, ann in enumerate(anns):
                if k % 3 == 2:
                    continue  # missed
                x, y, bw, bh = ann["bbox"]
                shift = rng.uniform(-2, 2, 4)
                boxes.append([x + shift[0], y + shift[1], x + bw + shift[2], y + bh + shift[3]])
                cats.append(labels[ann["category_id"]])
                rle = mask_utils.frPyObjects(ann["segmentation"], h, w) \
                    if isinstance(ann["segmentation"], list) else ann["segmentation"]
                mask = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle)
                if k % 2:  # erode a little: IoU below 1
                    mask = mask & np.roll(mask, 1, axis=0) & np.roll(mask, 1, axis=1)
                masks.append(mask)
                if num_keypoints:
                    points = np.asarray(ann["keypoints"], np.float32).reshape(-1, 3)
                    points[:, :2] += rng.uniform(-1.5, 1.5, (len(points), 2))
                    points[:, 2] = 1
                    kps.append(points)
                scores.append(rng.uniform(0.3, 1.0))
            boxes.append([1.0, 1.0, w / 3, h / 3])  # a false positive
            cats.append(1)
            fp = np.zeros((h, w), np.uint8)
            fp[1:h // 3, 1:w // 3] = 1
            masks.append(fp)
            if num_keypoints:
                kps.append(np.tile(np.float32([[w / 6, h / 6, 1]]), (num_keypoints, 1)))
            scores.append(0.9)
            det = {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(cats, dtype=torch.int64),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "masks": torch.from_numpy(np.stack(masks))[:, None].bool(),
            }
            if kps:
                det["keypoints"] = torch.from_numpy(np.stack(kps))
            self.by_digest[_digest(image)] = det

    def forward(self, images: list[torch.Tensor], targets=None):  # noqa: ANN001, ANN201
        if self.training:
            return {"loss_oracle": self.weight.sum() * 0}
        return [{k: v.clone() for k, v in self.by_digest[_digest(img)].items()}
                for img in images]


def oracle(num_classes: int, *, annotations: str = "", images: str = "", seed: int = 0
           ) -> Oracle:
    """Perturbed ground truth (a test model)."""
    return Oracle(num_classes, annotations=annotations, images=images, seed=seed)


@pytest.fixture(autouse=True)
def _oracle_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from pixelwise.models import MODELS

    monkeypatch.setitem(MODELS, "oracle", oracle)


def _oracle_run(data: Path, run: Path, task_name: str, split: str = "val") -> Path:
    """A run directory whose checkpoint is the oracle of `data`'s `split`."""
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.models import build_model
    from pixelwise.tasks import TASKS

    task = TASKS[task_name].from_data(data)
    kind = "instances" if task_name == "instance" else "keypoints"
    model = build_model("oracle", task.num_classes,
                        annotations=str(data / "annotations" / f"{kind}_{split}.json"),
                        images=str(data / "images" / split))
    run.mkdir(parents=True)
    save_checkpoint(run / "best.safetensors", {"model": model.state_dict()},
                    {"kind": "best", "model": model.config, "task": task.config(),
                     "train": {"data": str(data), "size": None}})
    return run


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("instance", tmp_path_factory.mktemp("inst") / "data", num=10,
                      size=(72, 80), seed=4, val_fraction=0.5)


@pytest.fixture(scope="module")
def keypoint_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("keypoints", tmp_path_factory.mktemp("kp") / "data", num=8,
                      size=(96, 96), seed=2, val_fraction=0.5)


def _cocoeval(gt_file: Path, results_file: Path, iou_type: str) -> dict[str, float]:
    """pycocotools on the files, nothing else (keypoints: the json's own sigmas)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(str(results_file))
        ev = COCOeval(gt, dt, iouType=iou_type)
        if iou_type == "keypoints":
            cat = gt.loadCats(gt.getCatIds())[0]
            if "sigmas" in cat:  # else pycocotools' own: COCO's 17 person sigmas
                ev.params.kpt_oks_sigmas = np.asarray(cat["sigmas"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(COCO_STAT_NAMES[iou_type], (float(v) for v in ev.stats)))


@pytest.mark.parametrize(("task", "iou_types"), [("instance", ("bbox", "segm")),
                                                 ("keypoints", ("bbox", "keypoints"))])
def test_results_json_scores_the_same_ap_with_pycocotools_as_eval(
        task: str, iou_types: tuple[str, ...], instance_data: Path, keypoint_data: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = instance_data if task == "instance" else keypoint_data
    run = _oracle_run(data, tmp_path / "run", task)
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {*iou_types, f"{iou_types[1]}_AP", "per_class"}
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(data / "images" / "val"), "--out", str(out),
                 "--score-threshold", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    kind = "instances" if task == "instance" else "keypoints"
    gt_file = data / "annotations" / f"{kind}_val.json"
    assert summary["image_ids"] == str(gt_file.resolve())
    assert not (out / "images.json").exists()
    results = json.loads((out / "results.json").read_text())
    gt = json.loads(gt_file.read_text())
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    for iou_type in iou_types:
        direct = _cocoeval(gt_file, out / "results.json", iou_type)
        assert 0.05 < direct["AP"] < 0.95  # the oracle is imperfect, not hopeless
        assert metrics[iou_type] == pytest.approx(direct, abs=1e-12)
    names = sorted(p.name for p in (out / "overlays").iterdir())
    assert names == sorted(p.stem + ".png" for p in (data / "images" / "val").iterdir())


def test_score_threshold_filters_results_and_images_outside_a_dataset_are_numbered(
        instance_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _oracle_run(instance_data, tmp_path / "run", "instance")
    loose = tmp_path / "loose"
    shutil.copytree(instance_data / "images" / "val", loose)
    files = sorted(loose.iterdir())
    out = tmp_path / "pred"
    assert main(["predict", str(run), *map(str, files), "--out", str(out), "--json",
                 "--score-threshold", "0.6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["image_ids"] == "sequential"
    images = json.loads((out / "images.json").read_text())
    assert [im["file_name"] for im in images] == [f.name for f in files]
    assert [im["id"] for im in images] == list(range(1, len(files) + 1))
    results = json.loads((out / "results.json").read_text())
    assert results and min(r["score"] for r in results) >= 0.6
    everything = sum(len(d["scores"]) for d in oracle(
        5, annotations=str(instance_data / "annotations" / "instances_val.json"),
        images=str(instance_data / "images" / "val")).by_digest.values())
    assert len(results) < everything
    assert [row["detections"] for row in summary["images"]] == [
        sum(r["image_id"] == i for r in results) for i in range(1, len(files) + 1)]
    # a mask decodes to the image's size
    first = results[0]
    assert mask_utils.decode(first["segmentation"]).shape == (
        images[0]["height"], images[0]["width"])


def test_predict_refuses_tiles_and_semantic_options(
        instance_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _oracle_run(instance_data, tmp_path / "run", "instance")
    image = next((instance_data / "images" / "val").iterdir())
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "a"),
                 "--tile", "32"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tile" in err
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "b"),
                 "--score-threshold", "1.5"]) == EXIT_USER_ERROR
    assert "score threshold" in capsys.readouterr().err


def test_evaluation_shards_merge_to_the_single_process_result(instance_data: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """DDP: each rank evaluates its images; the gathered match tables give the same AP."""
    from torch.utils.data import DataLoader, Subset

    import pixelwise.engine.distributed as dist
    import pixelwise.tasks.instance as instance_module
    from pixelwise.tasks import TASKS

    task = TASKS["instance"].from_data(instance_data)
    val = task.dataset(instance_data, "val")
    model = oracle(task.num_classes,
                   annotations=str(instance_data / "annotations" / "instances_val.json"),
                   images=str(instance_data / "images" / "val")).eval()
    device = torch.device("cpu")

    def loader(indices: list[int]) -> DataLoader:
        return DataLoader(Subset(val, indices), batch_size=2, collate_fn=task.collate)

    whole = task.evaluate(model, loader(list(range(len(val)))), device=device)
    shards: list = []
    monkeypatch.setattr(dist, "all_gather_objects", lambda obj: shards.append(obj) or [obj])
    task.evaluate(model, loader(list(range(1, len(val), 2))), device=device)  # "rank 1"
    rank1 = shards[-1]
    monkeypatch.setattr(dist, "all_gather_objects", lambda obj: [obj, rank1])
    monkeypatch.setattr(instance_module, "_rank", lambda: 0)
    merged = task.evaluate(model, loader(list(range(0, len(val), 2))), device=device)
    assert merged == whole
    assert 0 < whole["segm"]["AP"] < 1


@pytest.mark.slow
def test_two_processes_reduce_to_the_single_process_ap(instance_data: Path,
                                                       tmp_path: Path) -> None:
    """torchrun, two gloo ranks, each evaluating its shard of the 5 val images (uneven)."""
    run = _oracle_run(instance_data, tmp_path / "run", "instance")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, str(run), str(instance_data), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone = _evaluate_shard(run, instance_data, rank=0, world=1)
    assert ranks[0] == ranks[1] == alone
    assert 0 < alone["segm"]["AP"] < 1


def _evaluate_shard(run: Path, data: Path, *, rank: int, world: int) -> dict:
    from torch.utils.data import DataLoader

    from pixelwise.engine.checkpoint import load_model
    from pixelwise.engine.loader import ShardSampler
    from pixelwise.models import MODELS
    from pixelwise.tasks import build_task

    MODELS.setdefault("oracle", oracle)
    model, meta = load_model(run)
    task = build_task(meta["task"])
    val = task.dataset(data, "val")
    loader = DataLoader(val, sampler=ShardSampler(len(val), num_replicas=world, rank=rank),
                        batch_size=1, collate_fn=task.collate)
    return task.evaluate(model, loader, device=torch.device("cpu"))


if __name__ == "__main__":  # a rank of test_two_processes_reduce_to_the_single_process_ap
    from pixelwise.engine import distributed

    info = distributed.setup("cpu")
    metrics = _evaluate_shard(Path(sys.argv[1]), Path(sys.argv[2]), rank=info.rank,
                              world=info.world_size)
    Path(sys.argv[3], f"rank{info.rank}.json").write_text(json.dumps(metrics))
    distributed.cleanup()
