"""`pixelwise predict` for panoptic runs and for a semantic run fused with an instance run: COCO
panoptic files whose PQ, by a per-segment loop written here, equals `pixelwise eval` and
`pixelwise metrics panoptic`; image ids; overlays; bad input as one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import EXIT_USER_ERROR, main

TINY = {"backbone": "resnet18", "semantic_channels": 16, "mask_head_layers": [16],
        "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32,
        "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 30,
        "box_detections_per_img": 20}
SIZE, SEED = (64, 64), 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_run(out: Path, model: torch.nn.Module, task_config: dict, data: Path) -> Path:
    """A run directory as the trainer writes it (`best.safetensors` with its description)."""
    from pixelwise.engine.checkpoint import save_checkpoint
    from pixelwise.engine.config import TrainConfig

    out.mkdir(parents=True)
    train = TrainConfig(data=str(data), out=str(out), model=model.config["name"]).to_dict()
    save_checkpoint(out / "best.safetensors", {"model": model.state_dict()},
                    {"kind": "best", "model": model.config, "task": task_config, "train": train})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("panoptic", tmp_path_factory.mktemp("pan") / "set", num=6, size=SIZE,
                      seed=SEED, val_fraction=0.34)


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """panoptic_fpn with random weights but for its semantic head, fitted (on cached backbone
    features: seconds) to the val images' stuff, so that predictions match some ground-truth
    segments and miss others."""
    import torch.nn.functional as F

    from pixelwise.models import build_model
    from pixelwise.tasks.panoptic import PanopticTask

    torch.manual_seed(0)
    task = PanopticTask.from_data(data)
    model = build_model("panoptic_fpn", task.num_classes, num_things=task.num_things,
                        **TINY).eval()
    dataset = task.dataset(data, "val")
    images, targets = task.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        batch = model.detector.transform(images)[0].tensors  # (N, 3, 64, 64) normalised
        features = model.backbone(batch)
    target = torch.stack([t["semantic"].as_subclass(torch.Tensor) for t in targets])
    optimizer = torch.optim.AdamW(model.semantic_head.parameters(), lr=1e-2)
    model.semantic_head.train()
    for _ in range(40):
        logits = model.semantic_head(features, batch.shape[-2:])  # (N, C, 64, 64)
        loss = F.cross_entropy(logits, target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return _save_run(tmp_path_factory.mktemp("runs") / "panoptic", model, task.config(), data)


# ------------------------------------------------------------------ an independent PQ


def _ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)  # (H, W, 3)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def naive_pq(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    """PQ by the definition (Kirillov et al. 2019; COCO's void and crowd rules), one segment
    pair at a time."""
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    cats = {c["id"]: c for c in gt["categories"]}
    stats = {cid: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for cid in cats}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    for g_ann in gt["annotations"]:
        p_ann = preds[g_ann["image_id"]]
        g_ids, p_ids = _ids(gt_dir / g_ann["file_name"]), _ids(pred_dir / p_ann["file_name"])
        void = g_ids == 0
        matched_g, matched_p = set(), set()
        for g in g_ann["segments_info"]:
            if g.get("iscrowd"):
                continue
            g_mask = g_ids == g["id"]
            for p in p_ann["segments_info"]:
                if p["category_id"] != g["category_id"]:
                    continue
                p_mask = p_ids == p["id"]
                inter = int((g_mask & p_mask).sum())
                union = int((g_mask | p_mask).sum()) - int((p_mask & void).sum())
                if inter / union > 0.5:
                    stats[g["category_id"]]["tp"] += 1
                    stats[g["category_id"]]["iou"] += inter / union
                    matched_g.add(g["id"])
                    matched_p.add(p["id"])
        for g in g_ann["segments_info"]:
            if not g.get("iscrowd") and g["id"] not in matched_g:
                stats[g["category_id"]]["fn"] += 1
        for p in p_ann["segments_info"]:
            if p["id"] in matched_p:
                continue
            p_mask = p_ids == p["id"]
            crowd = np.zeros_like(p_mask)
            for g in g_ann["segments_info"]:
                if g.get("iscrowd") and g["category_id"] == p["category_id"]:
                    crowd = g_ids == g["id"]  # the last crowd segment of the category
            ignored = int((p_mask & void).sum()) + int((p_mask & crowd).sum())
            if ignored / int(p_mask.sum()) <= 0.5:
                stats[p["category_id"]]["fp"] += 1
    per_class = {}
    for cid, s in stats.items():
        seen = s["tp"] + s["fp"] + s["fn"]
        per_class[cid] = None if not seen else {
            "pq": s["iou"] / (s["tp"] + s["fp"] / 2 + s["fn"] / 2), **s}

    def mean(select) -> float | None:
        values = [v["pq"] for cid, v in per_class.items() if v is not None and select(cid)]
        return sum(values) / len(values) if values else None

    return {"all": mean(lambda c: True), "things": mean(lambda c: cats[c]["isthing"]),
            "stuff": mean(lambda c: not cats[c]["isthing"]), "per_class": per_class}


# ------------------------------------------------------------------ prediction of a panoptic run


def _predict(capsys, *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["predict", *args, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_predicted_files_give_the_same_pq_to_every_scorer(
        run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt_json = data / "annotations" / "panoptic_val.json"
    out = tmp_path / "pred"
    # on the CPU also where a GPU is present: there batch sizes change the convolutions' numbers
    code, summary, _ = _predict(capsys, str(run), str(data / "images" / "val"), "--out",
                                str(out), "--gt-json", str(gt_json), "--device", "cpu")
    assert code == 0 and summary["count"] == 2 and summary["panoptic_json"]
    naive = naive_pq(gt_json, data / "panoptic" / "val", out / "panoptic.json",
                     out / "panoptic")
    assert main(["metrics", "panoptic", "--gt-json", str(gt_json), "--gt-dir",
                 str(data / "panoptic" / "val"), "--pred-json", str(out / "panoptic.json"),
                 "--pred-dir", str(out / "panoptic"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--data", str(data), "--batch-size", "1", "--device", "cpu",
                 "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for result in (scored, evaluated):
        for group in ("all", "things", "stuff"):
            assert result[group]["pq"] == pytest.approx(naive[group], abs=1e-12), group
        for row in result["per_class"].values():
            mine = naive["per_class"][row["id"]]
            if mine is None:
                assert row["pq"] is None
            else:
                assert (row["tp"], row["fp"], row["fn"]) == (mine["tp"], mine["fp"], mine["fn"])
                assert row["pq"] == pytest.approx(mine["pq"], abs=1e-12)
    counted = [v for v in naive["per_class"].values() if v is not None]
    assert sum(v["tp"] for v in counted) > 0  # not a degenerate comparison:
    assert sum(v["fp"] + v["fn"] for v in counted) > 0  # matches and misses both occur


def test_files_follow_the_coco_panoptic_format(run: Path, data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    gt = json.loads((data / "annotations" / "panoptic_val.json").read_text())
    out = tmp_path / "pred"
    code, summary, _ = _predict(capsys, str(run), str(data / "images" / "val"), "--out",
                                str(out), "--score-threshold", "0.05")
    assert code == 0
    assert summary["image_ids"] == str(data / "annotations" / "panoptic_val.json")
    pred = json.loads((out / "panoptic.json").read_text())
    assert {c["id"] for c in pred["categories"]} == {c["id"] for c in gt["categories"]}
    assert sorted(im["id"] for im in pred["images"]) == sorted(im["id"] for im in gt["images"])
    for ann in pred["annotations"]:
        ids = _ids(out / "panoptic" / ann["file_name"])
        assert ids.shape == SIZE
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed  # every id listed, every listed id
        for seg in ann["segments_info"]:
            ys, xs = np.nonzero(ids == seg["id"])
            assert seg["area"] == len(ys)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
        overlay = np.asarray(Image.open(out / "overlays" / ann["file_name"]))
        image = np.asarray(Image.open(data / "images" / "val" / ann["file_name"]).convert("RGB"))
        assert overlay.shape[0] >= SIZE[0] and overlay.shape[1] >= SIZE[1]
        if ann["segments_info"]:
            assert not np.array_equal(overlay[: SIZE[0], : SIZE[1]], image)
    # outside a dataset folder: numbered 1..N
    loose = tmp_path / "loose"
    shutil.copytree(data / "images" / "val", loose)
    code, summary, _ = _predict(capsys, str(run), str(loose), "--out", str(tmp_path / "p2"))
    assert code == 0 and summary["image_ids"] == "sequential"
    pred = json.loads((tmp_path / "p2" / "panoptic.json").read_text())
    assert [im["id"] for im in pred["images"]] == [1, 2]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("pixelwise: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_prediction_files_are_one_line_errors_naming_the_image(
        run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt_json = data / "annotations" / "panoptic_val.json"
    out = tmp_path / "pred"
    assert _predict(capsys, str(run), str(data / "images" / "val"), "--out", str(out))[0] == 0
    pred = json.loads((out / "panoptic.json").read_text())
    ann = next(a for a in pred["annotations"] if a["segments_info"])
    png = out / "panoptic" / ann["file_name"]
    original = png.read_bytes()

    def score() -> str:
        capsys.readouterr()
        code = main(["metrics", "panoptic", "--gt-json", str(gt_json), "--gt-dir",
                     str(data / "panoptic" / "val"), "--pred-json", str(out / "panoptic.json"),
                     "--pred-dir", str(out / "panoptic")])
        assert code == EXIT_USER_ERROR
        return _one_line(capsys.readouterr().err)

    ids = _ids(png)
    rgb = np.asarray(Image.open(png).convert("RGB")).copy()
    rgb[0, 0] = (9, 9, 9)  # an id that segments_info does not list
    Image.fromarray(rgb).save(png)
    message = score()
    assert ann["file_name"] in message and "not in segments_info" in message
    png.write_bytes(original)
    rgb = np.asarray(Image.open(png).convert("RGB")).copy()
    rgb[ids == ann["segments_info"][0]["id"]] = 0  # a listed segment erased from the PNG
    Image.fromarray(rgb).save(png)
    message = score()
    assert ann["file_name"] in message and "absent from the PNG" in message
    Image.fromarray(rgb[:-3]).save(png)  # another size than the ground truth
    message = score()
    assert ann["file_name"] in message and "size" in message
    png.write_bytes(original)

    # ground truth whose category ids the run does not know: refused before anything is written
    other = json.loads(gt_json.read_text())
    for cat in other["categories"]:
        cat["id"] += 100
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps(other))
    code, _, err = _predict(capsys, str(run), str(data / "images" / "val"), "--out",
                            str(tmp_path / "p3"), "--gt-json", str(other_json))
    message = _one_line(err)
    assert code == EXIT_USER_ERROR and "unknown to the ground-truth categories" in message
    assert "000000.png" in message and not (tmp_path / "p3" / "panoptic.json").exists()
    # ground truth of another image size: that image is named and skipped, exit code 1
    resized = json.loads(gt_json.read_text())
    resized["images"][0]["height"] = 50
    sized_json = tmp_path / "sized.json"
    sized_json.write_text(json.dumps(resized))
    code, summary, err = _predict(capsys, str(run), str(data / "images" / "val"), "--out",
                                  str(tmp_path / "p4"), "--gt-json", str(sized_json))
    message = _one_line(err)
    assert code == 1 and summary["count"] == 1
    assert resized["images"][0]["file_name"] in message and "50x64" in message
    # options that do not apply
    for extra, words in ((["--tile", "32"], "--tile is for semantic models"),
                         (["--task", "semantic"], "a panoptic run, not semantic")):
        code, _, err = _predict(capsys, str(run), str(data / "images" / "val"), "--out",
                                str(tmp_path / "p5"), *extra)
        assert code == EXIT_USER_ERROR and words in _one_line(err)


# ------------------------------------------------------------------ fusion of two runs


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net trained two steps on the semantic version of the same scenes."""
    from pixelwise.data.synthetic import synthesize
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import train

    root = tmp_path_factory.mktemp("sem")
    sem = synthesize("semantic", root / "set", num=6, size=SIZE, seed=SEED, val_fraction=0.34)
    cfg = TrainConfig(data=str(sem), out=str(root / "run"), model="unet",
                      model_options={"width": 4, "depth": 2}, epochs=1, batch_size=4,
                      max_steps=2, lr=0.01, progress=False)
    train(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def instance_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mask R-CNN run made with the model API (random weights; low box threshold so that it
    detects things) and the instance task's checkpoint description."""
    from pixelwise.models import build_model

    gt = json.loads((data / "annotations" / "panoptic_train.json").read_text())
    things = sorted((c for c in gt["categories"] if c["isthing"]), key=lambda c: c["id"])
    torch.manual_seed(3)
    model = build_model("mask_rcnn", len(things) + 1, backbone="resnet18",
                        mask_head_layers=[16], box_detections_per_img=20, box_score_thresh=0.0,
                        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30)
    task = {"name": "instance", "num_classes": len(things) + 1,
            "categories": [{"id": c["id"], "name": c["name"]} for c in things],
            "class_names": ["__background__", *(c["name"] for c in things)]}
    return _save_run(tmp_path_factory.mktemp("inst") / "run", model.eval(), task, data)


def test_fusion_of_a_semantic_and_an_instance_run(
        semantic_run: Path, instance_run: Path, data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.data.images import read_image
    from pixelwise.engine.checkpoint import load_model
    from pixelwise.panoptic import FusionConfig, PanopticCategories, fuse_panoptic
    from pixelwise.predict.semantic import SemanticPredictor

    gt_json = data / "annotations" / "panoptic_val.json"
    gt = json.loads(gt_json.read_text())
    out = tmp_path / "fused"
    code, summary, _ = _predict(capsys, "--task", "panoptic", "--semantic", str(semantic_run),
                                "--instance", str(instance_run), str(data / "images" / "val"),
                                "--out", str(out), "--gt-json", str(gt_json),
                                "--score-threshold", "0.1", "--stuff-area-threshold", "10")
    assert code == 0 and summary["count"] == 2 and summary["task"] == "panoptic"

    # the same fusion, composed here from the two models and the categories matched by name
    sem_model, sem_meta = load_model(semantic_run)
    inst_model, _ = load_model(instance_run)
    names = sem_meta["task"]["class_names"]
    things = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])
              if c["isthing"]]
    cats = PanopticCategories.from_class_names(names, things, gt["categories"])
    config = FusionConfig(instance_score_thresh=0.1, stuff_area_threshold=10)
    pred = json.loads((out / "panoptic.json").read_text())
    by_id = {a["image_id"]: a for a in pred["annotations"]}
    thing_segments = 0
    for image in gt["images"]:
        pixels = read_image(data / "images" / "val" / image["file_name"])
        labels = SemanticPredictor(sem_model, sem_meta).predict([pixels])[0]
        with torch.no_grad():
            detections = inst_model([pixels.float() / 255])[0]
        want = fuse_panoptic(detections, labels, cats, config)
        ann = by_id[image["id"]]
        got = _ids(out / "panoptic" / ann["file_name"])
        assert np.array_equal(got, want.ids.numpy())
        assert [(s["id"], s["category_id"]) for s in ann["segments_info"]] == [
            (s["id"], s["category_id"]) for s in want.segments]
        thing_segments += sum(1 for s in want.segments if s["isthing"])
    assert thing_segments > 0  # the instance branch took part
    # the fused files are scored against the ground truth as they are
    assert main(["metrics", "panoptic", "--gt-json", str(gt_json), "--gt-dir",
                 str(data / "panoptic" / "val"), "--pred-json", str(out / "panoptic.json"),
                 "--pred-dir", str(out / "panoptic"), "--json"]) == 0


def test_fusion_errors_are_one_line(semantic_run: Path, instance_run: Path, run: Path,
                                    data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_checkpoint, save_checkpoint

    images = str(data / "images" / "val")
    cases = [
        (["--semantic", str(semantic_run)], "needs both --semantic RUN_A and --instance RUN_B"),
        (["--semantic", str(run), "--instance", str(instance_run)], "fusion needs a semantic run"),
        (["--semantic", str(semantic_run), "--instance", str(semantic_run)],
         "fusion needs an instance run"),
    ]
    # an instance run with a class the semantic run does not have
    state, meta = load_checkpoint(instance_run / "best.safetensors")
    meta["task"]["categories"][0]["name"] = "zebra"
    odd = tmp_path / "odd"
    odd.mkdir()
    save_checkpoint(odd / "best.safetensors", state, meta)
    cases.append((["--semantic", str(semantic_run), "--instance", str(odd)],
                  "classes ['zebra'] are not classes of the semantic run"))
    for k, (flags, words) in enumerate(cases):
        code, _, err = _predict(capsys, *flags, images, "--out", str(tmp_path / f"o{k}"))
        assert code == EXIT_USER_ERROR and words in _one_line(err), err
