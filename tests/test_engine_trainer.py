"""The task-agnostic trainer on tiny in-test models and tensor datasets: the loss falls, resume is
bit-identical to an uninterrupted run, a NaN loss stops training and keeps the last checkpoint,
run directories are not silently overwritten."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from pixelwise.engine.checkpoint import load_checkpoint
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.trainer import NonFiniteLossError, Trainer
from pixelwise.errors import UserError
from pixelwise.tasks.semantic import SemanticTask

NUM, SIZE, CLASSES = 24, 16, 3


@pytest.fixture(autouse=True)
def _fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    # one thread: these tiny models only lose time to thread hand-offs on a busy machine; and the
    # curves PNG is drawn only where a test looks at it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if "curves" not in request.node.name:
        monkeypatch.setattr("pixelwise.engine.trainer.plot_curves", lambda *a, **k: None)
    yield
    torch.set_num_threads(threads)


class ToyDataset(Dataset):
    """Images whose class per pixel is the brightest channel; random flip and noise draw from the
    global torch RNG, as a transforms.v2 pipeline would."""

    def __init__(self, num: int = NUM, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(123)
        self.images = torch.rand(num, 3, SIZE, SIZE, generator=g)
        self.masks = self.images.argmax(dim=1)  # (N, H, W)
        self.masks[:, :2, :2] = 255  # some ignored pixels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[i], self.masks[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
            image = image + 0.02 * torch.randn_like(image)
        return image, mask


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.1),
        nn.Conv2d(8, CLASSES, 1),
    )


class NanAfter(nn.Module):
    """Wraps a model; its training-mode output turns to NaN after `after` forward calls."""

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


class NanGradAfter(NanAfter):
    """Finite outputs, but NaN gradients after `after` training forward calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after and out.requires_grad:
                out.register_hook(lambda grad: grad * float("nan"))
        return out


def config(out: Path, **changes) -> TrainConfig:
    # on the CPU also where a GPU is present: the tests compare bit for bit and bfloat16 autocast
    base = dict(out=str(out), epochs=2, batch_size=4, lr=0.02, deterministic=True, progress=False,
                seed=7, warmup_steps=2, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def run(out: Path, model: nn.Module | None = None, *, resume: bool = False,
        loss: str = "ce+dice", **changes) -> tuple[nn.Module, dict]:
    model = model if model is not None else tiny_model()
    task = SemanticTask(CLASSES, loss=loss)
    summary = Trainer(config(out, **changes), model, task, ToyDataset(),
                      ToyDataset(12, augment=False)).fit(resume=resume)
    return model, summary


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_files_and_curves_are_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _, summary = run(out, epochs=4, lr=0.05)
    recs = records(out)
    assert [r["step"] for r in recs] == [6, 12, 18, 24]  # 24 images / batch 4 = 6 steps per epoch
    assert recs[-1]["train"]["loss"] < 0.8 * recs[0]["train"]["loss"]
    assert set(recs[0]["train"]) == {"loss", "ce", "dice"}
    assert math.isclose(recs[0]["train"]["loss"], recs[0]["train"]["ce"] + recs[0]["train"]["dice"],
                        rel_tol=1e-6)
    assert set(recs[0]["val"]) == {"miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice",
                                   "per_class"}
    assert summary["best"] == max(r["val"]["miou"] for r in recs)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["lr"] == 0.05 and saved["task"]["num_classes"] == CLASSES
    _, meta = load_checkpoint(out / "best.safetensors")
    assert meta["kind"] == "best" and meta["metrics"]["miou"] == summary["best"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    # 2 epochs of 6 steps straight, versus 5 steps (mid-epoch) + resume; the second half loads
    # its data with 2 worker processes, which must not change anything either
    straight, _ = run(tmp_path / "straight")
    half, _ = run(tmp_path / "split", max_steps=5)
    halfway = zip(_state(half).values(), _state(straight).values())
    assert not all(torch.equal(a, b) for a, b in halfway)
    resumed, _ = run(tmp_path / "split", model=tiny_model(seed=99), resume=True, workers=2)
    expected, got = _state(straight), _state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    opt_a, _ = load_checkpoint(tmp_path / "straight" / "last.safetensors")
    opt_b, _ = load_checkpoint(tmp_path / "split" / "last.safetensors")
    for key, value in opt_a["optimizer"]["state"].items():
        for inner in value:
            assert torch.equal(value[inner], opt_b["optimizer"]["state"][key][inner])
    assert opt_a["scheduler"] == opt_b["scheduler"]
    # the per-epoch records agree too (the split run has one extra record at step 5)
    by_step = {r["step"]: r for r in records(tmp_path / "split")}
    for r in records(tmp_path / "straight"):
        assert r["train"] == by_step[r["step"]]["train"]
        assert r["val"] == by_step[r["step"]]["val"]
    assert sorted(by_step) == [5, 6, 12]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, model=NanAfter(tiny_model(), after=10**9), max_steps=6)  # one good epoch
    good = (out / "last.safetensors").read_bytes()
    model = NanAfter(tiny_model(), after=2)
    with pytest.raises(NonFiniteLossError) as info:
        run(out, model=model, resume=True)
    message = str(info.value)
    assert "\n" not in message
    assert "loss became nan at step 9" in message
    assert f"last good checkpoint: {out / 'last.safetensors'}" in message
    assert (out / "last.safetensors").read_bytes() == good
    assert [r["step"] for r in records(out)] == [6]


def test_nan_gradients_on_the_last_step_of_an_epoch_are_not_checkpointed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, model=NanGradAfter(tiny_model(), after=10**9), max_steps=6)
    good = (out / "last.safetensors").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"parameter inner\.0\.weight became non-finite "
                                                 r"by step 12; training stopped, last good"):
        run(out, model=NanGradAfter(tiny_model(), after=5), resume=True)  # step 12 is the 6th
    assert (out / "last.safetensors").read_bytes() == good


def test_max_steps_stops_and_the_schedule_still_spans_the_epochs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _, summary = run(out, max_steps=3, warmup_steps=0, epochs=2)
    assert summary["steps"] == 3
    (rec,) = records(out)
    assert rec["step"] == 3 and rec["epoch"] == 0.5
    # cosine over 12 steps (2 epochs), not over 3: after 3 steps 0.5 (1 + cos(pi 3/12))
    assert math.isclose(rec["lr"], 0.02 * 0.5 * (1 + math.cos(math.pi * 3 / 12)), rel_tol=1e-12)


def test_existing_run_directory_is_not_silently_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, max_steps=1)
    with pytest.raises(UserError, match="--overwrite"):
        run(out, max_steps=1)
    (out / "notes.txt").write_text("mine")
    trainer = Trainer(config(out, max_steps=2), tiny_model(), SemanticTask(CLASSES), ToyDataset())
    trainer.fit(overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # only run files are replaced
    assert [r["step"] for r in records(out)] == [2]
    with pytest.raises(UserError, match="nothing to resume"):
        run(tmp_path / "empty", resume=True)


def test_batch_size_must_split_over_processes_and_no_val_means_no_best(tmp_path: Path) -> None:
    out = tmp_path / "run"
    task = SemanticTask(CLASSES)
    summary = Trainer(config(out, max_steps=2), tiny_model(), task, ToyDataset()).fit()
    assert summary["best"] is None and not (out / "best.safetensors").exists()
    assert (out / "last.safetensors").is_file()


class DtypeSpy(nn.Module):
    """Wraps a model and records the dtype of its training-mode outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.seen.add(out.dtype)
        return out


@pytest.mark.parametrize("amp", [None, False, True])
def test_amp_on_cpu_is_bfloat16_and_only_when_asked_for(tmp_path: Path, amp) -> None:
    """On a CPU the default and --no-amp train in float32; --amp trains under bfloat16 autocast
    with float32 weights and optimizer state (no loss scaling), the loss still falls, and an
    amp run resumes bit-identically."""
    from pixelwise.engine.trainer import autocast_settings

    assert autocast_settings(amp, torch.device("cuda")) == (amp is not False, torch.float16)
    spy = DtypeSpy(tiny_model())
    _, summary = run(tmp_path / "run", model=spy, amp=amp, epochs=4)
    assert spy.seen == {torch.bfloat16 if amp else torch.float32}
    assert all(p.dtype == torch.float32 for p in spy.parameters())
    losses = [r["train"]["loss"] for r in records(tmp_path / "run")]
    assert losses[-1] < losses[0]
    if amp:
        straight = _state(spy)
        run(tmp_path / "split", model=DtypeSpy(tiny_model()), amp=True, epochs=4, max_steps=7)
        resumed = DtypeSpy(tiny_model(seed=5))
        run(tmp_path / "split", model=resumed, amp=True, epochs=4, resume=True)
        for name, value in _state(resumed).items():
            assert torch.equal(value, straight[name]), name


def test_channels_last_trains_the_same_and_resumes_exactly(tmp_path: Path) -> None:
    """--channels-last stores the conv weights channels_last while training; the losses equal a
    NCHW run's up to rounding, the checkpoint is an ordinary one, and resume is bit-identical."""
    model, _ = run(tmp_path / "cl", channels_last=True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    run(tmp_path / "plain")
    for a, b in zip(records(tmp_path / "cl"), records(tmp_path / "plain")):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-4)
    tree, _ = load_checkpoint(tmp_path / "cl" / "last.safetensors")
    for name, value in _state(model).items():
        assert torch.equal(tree["model"][name], value), name
    run(tmp_path / "split", channels_last=True, max_steps=5)
    resumed, _ = run(tmp_path / "split", model=tiny_model(seed=99), resume=True,
                     channels_last=True)
    for name, value in _state(model).items():
        assert torch.equal(_state(resumed)[name], value), name
