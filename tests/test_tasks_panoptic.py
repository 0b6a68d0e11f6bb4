"""Panoptic task: settings round trip, data checks, collation, fusion at another size, PQ of
hand-made outputs (exact), reduction over ranks, and train / resume / eval through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pixelwise.cli import EXIT_USER_ERROR, main
from pixelwise.errors import UserError
from pixelwise.panoptic import FusionConfig, PanopticCategories, fuse_panoptic
from pixelwise.tasks import TASKS, build_task
from pixelwise.tasks.panoptic import PanopticTask, fuse_model_output, list_collate

# a small panoptic_fpn through the CLI flags (the rest are the builder's defaults)
CLI_MODEL = ["--model", "panoptic_fpn", "--backbone", "resnet18", "--mask-head-layers", "16",
             "--box-detections-per-img", "20"]
# ... and a fast one for training in tests: few proposals and sampled RoIs, light heads
TINY = {"backbone": "resnet18", "semantic_channels": 16, "mask_head_layers": [16],
        "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32,
        "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 30,
        "box_detections_per_img": 20}
PQ_KEYS = {"all", "things", "stuff", "per_class"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("panoptic", tmp_path_factory.mktemp("pan") / "set", num=6, size=(64, 64),
                      seed=2, val_fraction=0.34)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 step of 4, then `pixelwise train --resume` to step 2: the trainer's resume on this
    task, through the CLI (the tiny model options have no CLI flags: the first part goes
    through the API with the `TrainConfig` the CLI builds)."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train

    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = TrainConfig(data=str(data), out=str(out), task="panoptic", model="panoptic_fpn",
                      model_options={**TINY, "num_things": 4}, epochs=2, batch_size=2,
                      max_steps=1, lr=1e-3, progress=False)
    train(cfg)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "2",
                 "--no-progress"]) == 0
    return out


def test_command_line_reaches_the_model_and_num_things_comes_from_the_data(data: Path) -> None:
    from pixelwise.cli import build_parser
    from pixelwise.cli.train import build_config

    args = build_parser().parse_args(["train", "--task", "panoptic", "--data", str(data),
                                      "--out", "R", *CLI_MODEL])
    cfg = build_config(args)
    assert cfg.model_options == {"backbone": "resnet18", "mask_head_layers": [16],
                                 "box_detections_per_img": 20, "num_things": 4}


def test_settings_round_trip_and_derived_counts(data: Path) -> None:
    task = PanopticTask.from_data(data)
    assert TASKS["panoptic"] is PanopticTask
    categories = json.loads((data / "annotations" / "panoptic_train.json").read_text())[
        "categories"]
    assert task.num_classes == len(categories)
    assert task.num_things == sum(c["isthing"] for c in categories)
    assert [c["id"] for c in task.categories] == sorted(c["id"] for c in categories)
    again = build_task(json.loads(json.dumps(task.config())))
    assert again.config() == task.config()
    assert task.model_options("panoptic_fpn") == {"num_things": task.num_things}
    assert task.model_options("unet") == {}
    custom = PanopticTask(categories, fusion={"stuff_area_threshold": 5})
    assert custom.fusion == FusionConfig(stuff_area_threshold=5)
    with pytest.raises(UserError, match="unknown fusion settings.*'area'"):
        PanopticTask(categories, fusion={"area": 5})
    with pytest.raises(UserError, match="--loss and --class-weights do not apply"):
        PanopticTask.from_data(data, loss="dice")
    with pytest.raises(UserError, match="num_things 9 does not fit"):
        PanopticTask(categories, num_things=9)


def test_check_data_refuses_other_categories(data: Path, tmp_path: Path) -> None:
    task = PanopticTask.from_data(data)
    task.check_data(data)
    cats = [dict(c) for c in task.categories]
    cats[0]["isthing"] = 1 - cats[0]["isthing"]
    with pytest.raises(UserError, match="differ from the model's"):
        PanopticTask(cats).check_data(data)
    (tmp_path / "images" / "train").mkdir(parents=True)  # a dataset, but not a panoptic one
    with pytest.raises(UserError, match="no panoptic annotations"):
        PanopticTask.from_data(tmp_path)


def test_collate_keeps_sizes_and_to_device_keeps_segments(data: Path) -> None:
    task = PanopticTask.from_data(data)
    dataset = task.dataset(data, "train", size=(48, 40), train=True)
    images, targets = list_collate([dataset[0], dataset[1]])
    assert [tuple(img.shape) for img in images] == [(3, 48, 40)] * 2
    assert type(images[0]) is torch.Tensor
    moved_images, moved = task.to_device((images, targets), torch.device("cpu"))
    assert moved[0]["segments"] == targets[0]["segments"]  # a list of dicts, left as it is
    assert moved[0]["semantic"].shape == (48, 40)
    assert task.num_images((images, targets)) == 2
    # evaluation: the image is resized for the model, the ground truth never
    val = task.dataset(data, "val", size=(48, 40), train=False)
    image, target = val[0]
    assert tuple(image.shape[-2:]) == (48, 40) and tuple(target["panoptic"].shape) == (64, 64)


def test_fusion_at_another_size_resizes_outputs_first() -> None:
    """fuse_model_output at (8, 8) from (4, 4) outputs = fuse_panoptic of the 2x nearest-
    upsampled inputs: bilinear 2x upsampling gives the nearest source pixel a weight >= 9/16,
    so one-hot logits keep their argmax and 0/1 masks their side of 0.5 -- exactly nearest."""
    cats = PanopticCategories([{"id": 1, "name": "a", "isthing": 1},
                               {"id": 5, "name": "sky", "isthing": 0}])
    sem_labels = torch.tensor([[1, 1, 1, 1]] * 2 + [[0, 0, 1, 1]] * 2)  # (4, 4)
    logits = nn.functional.one_hot(sem_labels, 2).permute(2, 0, 1).float() * 10  # (2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2:, :2] = True
    output = {"semantic": logits, "masks": mask, "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}
    config = FusionConfig(stuff_area_threshold=0)
    got = fuse_model_output(output, cats, config, size=(8, 8))
    big = sem_labels.repeat_interleave(2, 0).repeat_interleave(2, 1)  # (8, 8)
    big_mask = mask[:, 0].repeat_interleave(2, 1).repeat_interleave(2, 2)  # (1, 8, 8)
    want = fuse_panoptic({"masks": big_mask, "scores": output["scores"],
                          "labels": output["labels"]}, big, cats, config)
    assert torch.equal(got.ids, want.ids)
    assert got.segments == want.segments
    assert [s["category_id"] for s in got.segments] == [1, 5]
    assert got.ids.shape == (8, 8)


class _OracleModel(nn.Module):
    """Returns prepared outputs in order (the loader does not shuffle); looks like a panoptic
    model to the task."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]], num_classes: int,
                 num_things: int) -> None:
        super().__init__()
        self.outputs = list(outputs)
        self.num_classes, self.num_things = num_classes, num_things
        self.semantic_head = nn.Identity()
        self.calls = 0

    def forward(self, images):
        out = self.outputs[self.calls:self.calls + len(images)]
        self.calls += len(images)
        return out


def _oracle_outputs(task: PanopticTask, dataset, drop_first_thing: bool = False):
    """Perfect outputs from the ground truth: every thing instance as a mask with score 1, the
    semantic map as one-hot logits (void pixels get the first class)."""
    outputs, dropped = [], None
    for i in range(len(dataset)):
        _, target = dataset[i]
        masks = target["masks"].bool()[:, None]  # (N, 1, H, W)
        labels, scores = target["labels"].clone(), torch.ones(len(target["labels"]))
        if drop_first_thing and i == 0 and len(labels):
            dropped = task.panoptic_categories.thing_ids[int(labels[0]) - 1]
            masks, labels, scores = masks[1:], labels[1:], scores[1:]
        semantic = target["semantic"].clone()
        semantic[semantic == 255] = 0
        logits = nn.functional.one_hot(semantic, task.num_classes).permute(2, 0, 1).float()
        outputs.append({"masks": masks, "labels": labels, "scores": scores,
                        "semantic": logits})  # logits (C, H, W)
    return outputs, dropped


def _gt_counts(data: Path, split: str) -> dict[int, int]:
    """Segments per category id in the ground truth json (non-crowd)."""
    ann = json.loads((data / "annotations" / f"panoptic_{split}.json").read_text())
    counts: dict[int, int] = {}
    for image in ann["annotations"]:
        for seg in image["segments_info"]:
            if not seg.get("iscrowd"):
                counts[seg["category_id"]] = counts.get(seg["category_id"], 0) + 1
    return counts


@pytest.mark.parametrize("drop", [False, True])
def test_evaluate_is_exact_on_oracle_outputs(data: Path, drop: bool) -> None:
    from torch.utils.data import DataLoader

    task = PanopticTask(PanopticTask.from_data(data).categories,
                        fusion={"stuff_area_threshold": 0})
    dataset = task.dataset(data, "val")
    outputs, dropped = _oracle_outputs(task, dataset, drop_first_thing=drop)
    model = _OracleModel(outputs, task.num_classes, task.num_things)
    loader = DataLoader(dataset, batch_size=2, collate_fn=task.collate)
    result = task.evaluate(model, loader, device=torch.device("cpu"))
    assert set(result) == PQ_KEYS | {"pq"} and result["pq"] == result["all"]["pq"]
    counts = _gt_counts(data, "val")
    for row in result["per_class"].values():
        n = counts.get(row["id"], 0)
        if row["id"] == dropped:  # one FN, the others exact: PQ = (n-1) / (n-1 + 1/2)
            assert (row["tp"], row["fp"], row["fn"]) == (n - 1, 0, 1)
            assert row["pq"] == pytest.approx((n - 1) / (n - 0.5), abs=1e-12)
        elif n:
            assert (row["tp"], row["fp"], row["fn"]) == (n, 0, 0) and row["pq"] == 1.0
        else:
            assert row["pq"] is None
    if not drop:
        assert result["all"]["pq"] == 1.0 and result["things"]["pq"] == 1.0


def test_statistics_are_summed_over_ranks(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical ranks (all_reduce_sum doubling): counts double, PQ stays."""
    from torch.utils.data import DataLoader

    import pixelwise.tasks.panoptic as module

    task = PanopticTask(PanopticTask.from_data(data).categories,
                        fusion={"stuff_area_threshold": 0})
    dataset = task.dataset(data, "val")
    outputs, _ = _oracle_outputs(task, dataset, drop_first_thing=True)
    single = task.evaluate(_OracleModel(outputs, task.num_classes, task.num_things),
                           DataLoader(dataset, batch_size=1, collate_fn=task.collate),
                           device=torch.device("cpu"))
    monkeypatch.setattr(module, "all_reduce_sum", lambda t: t * 2)
    double = task.evaluate(_OracleModel(outputs, task.num_classes, task.num_things),
                           DataLoader(dataset, batch_size=1, collate_fn=task.collate),
                           device=torch.device("cpu"))
    assert double["pq"] == pytest.approx(single["pq"], abs=1e-12)
    for name, row in single["per_class"].items():
        assert double["per_class"][name]["tp"] == 2 * row["tp"]
        assert double["per_class"][name]["fn"] == 2 * row["fn"]


def test_loss_refuses_a_model_without_panoptic_heads(data: Path) -> None:
    from pixelwise.models import build_model

    task = PanopticTask.from_data(data)
    model = build_model("unet", task.num_classes, depth=2, width=4)
    batch = list_collate([task.dataset(data, "train")[0]])
    with pytest.raises(UserError, match="panoptic_fpn.*'unet' is not one"):
        task.loss(model, batch)


def test_train_resume_eval_through_the_cli(trained: Path, data: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_model

    config = json.loads((trained / "config.json").read_text())
    assert config["task"]["name"] == "panoptic" and config["task"]["num_things"] == 4
    assert config["model"]["num_things"] == 4 and config["model"]["backbone"] == "resnet18"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one record per segment, resumed at 1
    assert set(records[-1]["train"]) >= {"loss", "loss_semantic", "loss_mask", "loss_classifier"}
    assert PQ_KEYS <= set(records[-1]["val"])
    model, meta = load_model(trained, "last")  # rebuilt from the checkpoint alone
    assert model.num_things == 4 and meta["task"]["categories"]

    capsys.readouterr()
    assert main(["eval", str(trained), "--data", str(data), "--checkpoint", "last",
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == PQ_KEYS | {"pq"}
    assert set(metrics["all"]) == {"pq", "sq", "rq", "n"}
    assert metrics["pq"] == pytest.approx(records[-1]["val"]["pq"], abs=1e-12)
    assert main(["eval", str(trained), "--checkpoint", "last"]) == 0  # table, run's own data
    table = capsys.readouterr().out
    assert "things" in table and "stuff" in table and "person" in table


def test_cli_errors_are_one_line(trained: Path, data: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.data.synthetic import synthesize

    capsys.readouterr()
    assert main(["train", "--task", "panoptic", "--data", str(data), "--out",
                 str(tmp_path / "r"), *CLI_MODEL, "--loss", "dice"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error:") and "--loss" in err and "\n" not in err
    other = synthesize("panoptic", tmp_path / "other", num=2, size=(32, 32), seed=0,
                       val_fraction=0.5)
    for ann in (other / "annotations").glob("panoptic_*.json"):
        content = json.loads(ann.read_text())
        for cat in content["categories"]:
            cat["isthing"] = 0 if cat["isthing"] else 1
        ann.write_text(json.dumps(content))
    assert main(["eval", str(trained), "--data", str(other)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "differ from the model's" in err and "\n" not in err
    # a ground-truth PNG with an id that segments_info does not list: named, one line
    import shutil

    from PIL import Image

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    first = sorted((bad / "panoptic" / "val").iterdir())[0]
    rgb = np.array(Image.open(first).convert("RGB"))
    rgb[0, 0] = (7, 7, 7)  # id 7 + 7 * 256 + 7 * 65536: not listed
    Image.fromarray(rgb).save(first)
    assert main(["eval", str(trained), "--data", str(bad)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert first.name in err and "not in panoptic_val.json" in err and "\n" not in err
