"""DDP on CPU: `torchrun --nproc_per_node=2` (gloo) trains, writes one checkpoint, keeps the two
ranks' parameters identical, matches a one-process run with the same global batch, and reduces
the validation metrics over both ranks.

The test runs this very file under torchrun (see `_worker` at the bottom).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from pixelwise.engine.config import TrainConfig
from pixelwise.engine.trainer import Trainer
from pixelwise.tasks.semantic import SemanticTask

CLASSES, SIZE = 3, 16


class Toy(Dataset):
    """Per-pixel class = brightest channel; a random flip per sample (augmentation)."""

    def __init__(self, num: int, seed: int, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.augment = augment
        self.images = torch.rand(num, 3, SIZE, SIZE, generator=g)
        self.masks = self.images.argmax(dim=1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[i], self.masks[i]
        if self.augment and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def model() -> nn.Module:
    # no batch norm and no dropout: per-rank statistics would make DDP differ from one process
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, CLASSES, 1))


def fit(out: Path, minutes: float | None = None) -> tuple[nn.Module, SemanticTask, Toy]:
    """Two epochs, or `minutes` of wall time."""
    timing = {"warmup_steps": 1} if minutes is None else {"time_budget": minutes}
    cfg = TrainConfig(out=str(out), epochs=2, batch_size=4, lr=0.05, seed=3, progress=False,
                      deterministic=True, device="cpu", **timing)
    val = Toy(11, seed=2, augment=False)  # odd: uneven shards
    net, task = model(), SemanticTask(CLASSES, loss="ce")
    Trainer(cfg, net, task, Toy(16, seed=1), val).fit()
    return net, task, val


def _torchrun(out: Path, *args: str) -> list[dict[str, torch.Tensor]]:
    """Run `_worker` on 2 CPU processes; each rank's final parameters."""
    from safetensors.torch import load_file

    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]


def test_device_names_resolve_or_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` takes the process's local GPU where there is one; a process without a GPU of its
    own (torchrun with more processes than GPUs) is told so in one line."""
    from pixelwise.engine.distributed import resolve_device
    from pixelwise.errors import UserError

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"cuda:1 asked for, but 1 GPU\(s\) are visible"):
        resolve_device("auto", local_rank=1)
    with pytest.raises(UserError, match="at most one process per GPU"):
        resolve_device("cuda:3")


def test_two_cpu_processes_match_one(tmp_path: Path) -> None:
    ddp_out = tmp_path / "ddp"
    ranks = _torchrun(ddp_out)
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert (ddp_out / "last.safetensors").is_file() and (ddp_out / "best.safetensors").is_file()
    assert not list(ddp_out.glob(".*"))  # rank 1 wrote nothing; no temporary files left

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, task, val = fit(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    # same global batch (2 x 2 vs 4): the same gradients up to float summation order
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    records = [json.loads(line) for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]  # 16 images / global batch 4
    # validation on both ranks' shards (6 + 5 images), confusion matrices summed: equal to one
    # process evaluating rank 0's final model on all 11 images
    net = model()
    net.load_state_dict(ranks[0])
    expected = task.evaluate(net, [task.collate([val[i] for i in range(len(val))])],
                             device=torch.device("cpu"))
    assert records[-1]["val"]["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"],
                                                                 abs=1e-4)
    assert records[-1]["val"]["miou"] == pytest.approx(expected["miou"], abs=1e-3)


def test_a_time_budget_stops_both_ranks_together(tmp_path: Path) -> None:
    """Under a 2-second budget the ranks share one clock (its mean): the same learning rates,
    the same last step (else the run would hang in DDP), identical parameters."""
    out = tmp_path / "timed"
    ranks = _torchrun(out, "0.035")
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["time"] < 0.035 * 60 + 3 and records[-1]["step"] >= 2
    assert json.loads((out / "config.json").read_text())["train"]["time_budget"] == 0.035


def _worker(out: Path, minutes: float | None = None) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    net, _, _ = fit(out, minutes)
    # the trainer left the process group; each rank reports its parameters for the test
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(out / f"rank{os.environ['RANK']}.safetensors"))
    assert not dist.is_initialized()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else None)


@pytest.mark.slow
def test_torchrun_runs_the_pixelwise_train_command(tmp_path: Path) -> None:
    from pixelwise.data.synthetic import synthesize

    data = synthesize("semantic", tmp_path / "data", num=10, size=(32, 32), seed=0)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pixelwise", "train", "--model", "unet", "--width", "8", "--depth", "2",
               "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "4",
               "--device", "cpu", "--no-progress", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # rank 0 alone prints
    assert summary["steps"] == 4 and summary["images"] == 16
    assert (out / "last.safetensors").is_file() and (out / "curves.png").is_file()
