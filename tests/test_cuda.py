"""The CUDA paths: float16 autocast with loss scaling, resume on a GPU, DDP over NCCL, every task
trained, evaluated and predicted on a GPU, and the GPU's results against torchvision's and the
CPU's. Skipped where no GPU is present (CI); on a GPU machine: `pytest tests/test_cuda.py`.

One GPU cannot hold two NCCL ranks (NCCL refuses a duplicate device), so DDP over NCCL is
checked with one rank here and with two only where two GPUs are present.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelwise.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = ["--device", "cuda", "--no-progress"]


@pytest.fixture(scope="module")
def semantic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pixelwise.data.synthetic import synthesize

    return synthesize("semantic", tmp_path_factory.mktemp("sem") / "set", num=20,
                      size=(64, 64), seed=0)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _eval(run: Path, data: Path, device: str, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--device", device, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_semantic_float16_training_resumes_and_evaluates_like_the_cpu(
        semantic_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.engine.checkpoint import load_checkpoint
    from pixelwise.engine.trainer import autocast_settings

    assert autocast_settings(None, torch.device("cuda")) == (True, torch.float16)
    run = tmp_path / "run"
    base = ["train", "--data", str(semantic_data), "--out", str(run), "--model", "unet",
            "--width", "16", "--depth", "3", "--batch-size", "4", "--lr", "0.01", "--amp",
            "--channels-last", *CUDA]
    assert main([*base, "--epochs", "2"]) == 0
    state, _ = load_checkpoint(run / "last.safetensors")
    assert state["scaler"]["scale"] > 0  # float16 on CUDA: the loss scaler is live and saved
    assert main([*base, "--epochs", "4", "--resume"]) == 0
    records = _records(run)
    assert [r["step"] for r in records] == [4, 8, 12, 16]  # 16 training images, batch 4
    assert all(torch.isfinite(torch.tensor(r["train"]["loss"])) for r in records)
    assert records[-1]["train"]["loss"] < records[0]["train"]["loss"]
    on_gpu, on_cpu = (_eval(run, semantic_data, d, capsys) for d in ("cuda", "cpu"))
    # cuDNN may use TF32 and other algorithms: a few pixels may change class, no more
    assert on_gpu["pixel_accuracy"] == pytest.approx(on_cpu["pixel_accuracy"], abs=0.01)
    assert on_gpu["miou"] == pytest.approx(on_cpu["miou"], abs=0.02)


@pytest.mark.parametrize(("task", "model", "headline"), [
    ("instance", "mask_rcnn", "segm"),
    ("keypoints", "keypoint_rcnn", "keypoints"),
    ("instance", "solov2", "segm"),
    ("panoptic", "panoptic_fpn", "pq"),
])
def test_every_task_trains_evaluates_and_predicts_on_cuda(
        task: str, model: str, headline: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.data.synthetic import synthesize

    data = synthesize(task, tmp_path / "data", num=10, size=(96, 96), seed=1)
    run = tmp_path / "run"
    options = [] if model == "solov2" else ["--backbone", "resnet18"]
    assert main(["train", "--task", task, "--model", model, *options, "--data", str(data),
                 "--out", str(run), "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                 "--amp", *CUDA]) == 0
    records = _records(run)
    assert len(records) == 2 and records[-1]["step"] == 4
    assert all(torch.isfinite(torch.tensor(r["train"]["loss"])) for r in records)
    metrics = _eval(run, data, "cuda", capsys)
    assert headline in metrics
    images = sorted((data / "images" / "val").iterdir())
    out = tmp_path / "pred"
    assert main(["predict", str(run), *map(str, images), "--out", str(out), "--device",
                 "cuda"]) == 0
    written = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert ".png" in written


def test_an_experiment_trains_on_the_gpu_and_scores_on_the_cpu(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The experiments train where `auto` says (here the GPU) and evaluate and time the trained
    models on the CPU (found on an H200: the trained model had stayed on the GPU)."""
    out = tmp_path / "upsamplers"
    capsys.readouterr()
    assert main(["experiment", "upsamplers", "--quick", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (out / "upsamplers.md").is_file() and (out / "upsamplers.png").is_file()
    assert report["rows"] and all(row["miou"] is not None for row in report["rows"])


def _twin_models(size: int, head_dtype: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """pixelwise's Mask R-CNN and torchvision's of the same build and weights, on the GPU (the
    pair of `test_models_rcnn.test_mask_rcnn_eval_equals_torchvision`)."""
    from test_models_rcnn import _rcnn_kwargs, _torchvision_twin
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    from pixelwise.models.rcnn import mask_rcnn

    torch.manual_seed(4)
    ours = mask_rcnn(5, backbone="resnet18", mask_head_layers=(32, 32), mask_threshold=None,
                     rpn_post_nms_top_n_test=300, head_dtype=head_dtype,
                     **_rcnn_kwargs(size)).eval()
    ref = _torchvision_twin(ours, "mask", **_rcnn_kwargs(size), rpn_post_nms_top_n_test=300,
                            mask_head=MaskRCNNHeads(256, (32, 32), 1),
                            mask_predictor=MaskRCNNPredictor(32, 32, 5))
    return ours.cuda(), ref.cuda()


@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
def test_mask_rcnn_on_cuda_equals_torchvisions(head_dtype: str) -> None:
    """Same weights on the GPU: the same boxes, labels and scores as torchvision's model; masks
    close (cuDNN computes float32 convolutions in TF32 by default, and the two models' mask
    heads may get different algorithms: measured up to 6e-3 apart on an H200)."""
    size = 128
    ours, ref = _twin_models(size, head_dtype)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, size, size, generator=g).cuda() for _ in range(2)]
    with torch.inference_mode():
        expected, got = ref(images), ours(images)
    for e, o in zip(expected, got):
        assert len(o["boxes"]) == len(e["boxes"]) > 0
        assert o["boxes"].is_cuda and o["masks"].is_cuda
        torch.testing.assert_close(o["boxes"], e["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(o["scores"], e["scores"], rtol=0, atol=1e-4)
        assert torch.equal(o["labels"], e["labels"])
        # close on average, few pixels change side at 0.5 (bfloat16 keeps ~3 digits)
        assert float((o["masks"] - e["masks"]).abs().mean()) < 2e-3
        inside = e["masks"] > 0
        flips = ((o["masks"] >= 0.5) != (e["masks"] >= 0.5)) & inside
        assert float(flips.sum()) <= 0.005 * float(inside.sum())


def test_optimised_unet_on_cuda_equals_the_plain_one() -> None:
    """`optimize_for_inference` (BN folded, sub-pixel rewrite of the decoder) keeps the model on
    its device and computes the same function there."""
    from pixelwise.models import build_model
    from pixelwise.models.fold import optimize_for_inference

    model = build_model("unet", 3, encoder="resnet18", upsample="nearest").cuda().eval()
    fast = optimize_for_inference(model)
    assert all(p.is_cuda for p in fast.parameters())
    x = torch.rand(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-2, atol=1e-2)


def test_upsamplers_on_cuda_equal_the_cpu() -> None:
    from pixelwise.upsample import UPSAMPLERS, MaxPoolWithIndices, make_upsampler

    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, to compare at 1e-5
    try:
        for name, cls in UPSAMPLERS.items():
            up = make_upsampler(name, 4)
            x = torch.randn(2, 4, 7, 9)
            kw = {}
            if cls.needs_indices:
                x, kw["indices"] = MaxPoolWithIndices(2)(torch.randn(2, 4, 14, 18))
            y_cpu = up(x, **kw)
            y_gpu = up.cuda()(x.cuda(), **{k: v.cuda() for k, v in kw.items()})
            torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        torch.backends.cudnn.allow_tf32 = True


def test_matrix_nms_on_cuda_equals_the_cpu() -> None:
    from pixelwise.ops.matrix_nms import matrix_nms

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 32, 32, generator=g) > 0.6
    scores = torch.rand(40, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    keep_cpu, scores_cpu = matrix_nms(masks, labels, scores, score_threshold=0.05)
    keep_gpu, scores_gpu = matrix_nms(masks.cuda(), labels.cuda(), scores.cuda(),
                                      score_threshold=0.05)
    assert keep_gpu.is_cuda and torch.equal(keep_gpu.cpu(), keep_cpu)
    torch.testing.assert_close(scores_gpu.cpu(), scores_cpu, rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_nccl_with_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL process group, pixelwise's reductions on it, and a DDP step of a U-Net: the
    gradients equal a plain step's (one rank: the mean over ranks is the rank's own)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pixelwise.engine import distributed
    from pixelwise.models import build_model

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert dist.get_backend() == "nccl"
        total = distributed.all_reduce_sum(torch.tensor([2.0, 3.0]))
        assert total.device.type == "cpu" and total.tolist() == [2.0, 3.0]
        assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
        torch.manual_seed(0)
        plain = build_model("unet", 3, width=8, depth=2).cuda()
        twin = build_model("unet", 3, width=8, depth=2).cuda()
        twin.load_state_dict(plain.state_dict())
        wrapped = DistributedDataParallel(twin, device_ids=[0])
        x = torch.rand(2, 3, 32, 32, device="cuda")
        y = torch.randint(0, 3, (2, 32, 32), device="cuda")
        for net in (plain, wrapped):
            torch.nn.functional.cross_entropy(net(x), y).backward()
        for (name, a), b in zip(plain.named_parameters(), twin.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_with_nccl(semantic_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pixelwise", "train", "--model", "unet", "--width", "8", "--depth", "2",
               "--data", str(semantic_data), "--out", str(out), "--epochs", "2",
               "--batch-size", "4", "--amp", *CUDA, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # rank 0 alone prints
    assert summary["steps"] == 8 and (out / "last.safetensors").is_file()
